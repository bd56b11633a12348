"""The GPU path on one accelerator, without Ray, TRL or DeepSpeed (issue 18); run by `benchmarks/gpu_check.sh`.

1. **step**: the generalist step (`gpu_step.py`) on SmolLM2-135M's shapes and on Llama-3.2-1B's
   (random weights, bf16): pairs/s, tokens/s, MFU, peak memory.
2. **scorer**: the reference/score Ray Data callable (`stages.inference.LogpScorer`) constructed
   and called as an actor does, on CUDA in bf16, against the same on the CPU in float32.
3. **evaluation**: held-out metrics (`train.metrics.evaluate_rows`) and greedy-generation
   accuracy (`stages.evaluate.generation_accuracy`) on CUDA, the metrics against the CPU.
4. **collectives**: a training step, an evaluation, the end-of-run checks and ZeRO-3's row
   lockstep of the real `train.loop.Job` (told it has 2 workers, so every collective runs),
   model on CUDA, in a world-size-1 process group with the backend a GPU run gets
   (`train.launch.GPU_BACKEND`), plus one CUDA all-reduce.

It asserts the GPU did the work (parameters on CUDA, CUDA memory allocated) and that CUDA
agrees with the CPU within bf16 tolerance. `--cpu`: the same on the CPU with tiny shapes (the
fallback a CPU test runs; it proves the script, not the GPU). Writes `gpu_check.json` into
$OUT when set.

    bash benchmarks/gpu_check.sh           # on the GPU machine (brings pydantic along)
    python benchmarks/gpu_check.py --cpu   # anywhere
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets offline variables before transformers loads)
import gpu_step  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

SMOLLM2_LIKE = {"hidden_size": 576, "num_layers": 30, "num_heads": 9, "intermediate_size": 1536}  # scorer/eval model
BF16_RTOL = 0.03  # bf16 keeps 8 bits of mantissa; sums of ~100 token log-probs drift ~1%


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="CPU fallback with tiny shapes (proves the script runs)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device (use --cpu for the CPU fallback)")
    device = "cpu" if args.cpu else "cuda"
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shapes = common.TINY_SHAPES if args.cpu else SMOLLM2_LIKE
        path = common.model_dir("tiny", Path(tmp), **shapes)
        result["step"] = check_steps(device, args.cpu)
        result["scorer"] = check_scorer(path, device)
        result["evaluation"] = check_evaluation(path, device)
        result["collectives"] = check_collectives(path, device, Path(tmp))
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=2))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def check_steps(device: str, cpu: bool) -> list[dict]:
    runs = [["--tiny", "--device", device]] if cpu else [
        ["--shapes", "smollm2", "--batch", "32", "--steps", "20"],
        ["--shapes", "llama1b", "--batch", "16", "--steps", "10", "--warmup", "2"],
    ]
    out = []
    for argv in runs:
        res = gpu_step.measure(gpu_step.parse(argv))
        assert res["params_on"] == device, res
        assert math.isfinite(res["ms_per_step"]) and res["pairs_per_s"] > 0, res
        if device == "cuda":
            assert res["peak_memory_gib"] > 0.1, res
        out.append(res)
    return out


def _rows(tokenizer, n_per_task: int = 24) -> list[dict]:
    rows = [common.tokenize(tokenizer, row) for _, row in common.texts(["a", "b", "c"], n_per_task)]
    rng = np.random.default_rng(0)
    for row in rows:  # reference log-probs off the policy's, so the DPO losses are not all log 2
        row["ref_chosen_logps"] = float(-rng.uniform(5, 40))
        row["ref_rejected_logps"] = float(-rng.uniform(5, 40))
    return rows


def _scored_tasks(tokenizer) -> list[list[dict]]:
    """`_rows` with a specialist loss and an example id, dealt into three tasks."""
    rows = _rows(tokenizer)
    by_task = [rows[t::3] for t in range(3)]
    for t, task_rows in enumerate(by_task):
        for i, row in enumerate(task_rows):
            row.update(specialist_loss=0.6, example_id=f"t{t}-{i}")
    return by_task


def check_scorer(path: str, device: str) -> dict:
    from ama_ray.dpo import DPOLossConfig
    from ama_ray.models.loading import load_tokenizer
    from ama_ray.stages.inference import LogpScorer

    table = pa.Table.from_pylist([{"row": i, **r} for i, r in enumerate(_rows(load_tokenizer(path)))])
    refs = table.drop_columns(["ref_chosen_logps", "ref_rejected_logps"])
    loss = DPOLossConfig().__dict__
    dtype = "bfloat16"  # the CPU fallback too: the tolerance check runs there
    out = {}
    for mode, inp, cfg, column in (("reference", refs, None, "ref_chosen_logps"), ("score", table, loss, "specialist_loss")):
        want = LogpScorer(path, "float32", False, 4, cfg, 16, use_gpu=False)(inp)
        scorer = LogpScorer(path, dtype, False, 4, cfg, 16, use_gpu=device == "cuda")
        started = time.perf_counter()
        got = scorer(inp)
        seconds = time.perf_counter() - started
        on = next(scorer.model.parameters()).device.type
        assert on == device and str(next(scorer.model.parameters()).dtype) == f"torch.{dtype}", (on, dtype)
        assert got.num_rows == inp.num_rows and got.column_names[: len(inp.column_names)] == inp.column_names
        a, b = (np.asarray(t.sort_by("row")[column].to_pylist()) for t in (got, want))
        worst = float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))))
        assert worst < BF16_RTOL, (mode, worst)
        out[mode] = {"on": on, "dtype": dtype, "rows": got.num_rows, "seconds": seconds, "max_rel_diff_vs_cpu_fp32": worst}
    return out


def check_evaluation(path: str, device: str) -> dict:
    from ama_ray.data import benchmark
    from ama_ray.dpo import DPOLossConfig
    from ama_ray.models.loading import load_model, load_tokenizer
    from ama_ray.stages.evaluate import generation_accuracy
    from ama_ray.train.metrics import evaluate_rows, metrics_from_sums

    tokenizer = load_tokenizer(path)
    tasks = _scored_tasks(tokenizer)
    dtype = "bfloat16"  # the CPU fallback too: the tolerance check runs there
    net = load_model(path, dtype=dtype).to(device)
    cpu = load_model(path, dtype="float32")
    names = ["a", "b", "c"]
    got = metrics_from_sums(evaluate_rows(net, tasks, DPOLossConfig(), tokenizer.pad_token_id, 16), names, "eval")
    want = metrics_from_sums(evaluate_rows(cpu, tasks, DPOLossConfig(), tokenizer.pad_token_id, 16), names, "eval")
    diff = abs(got["eval/dpo_loss/mean"] - want["eval/dpo_loss/mean"])
    assert diff < 0.02, (got["eval/dpo_loss/mean"], want["eval/dpo_loss/mean"])
    prompts = [{"prompt": r["prompt"], "prompt_input_ids": common.tokenize(tokenizer, {**r, "chosen": "", "rejected": ""})["prompt_input_ids"]}
               for r in benchmark.generate("arithmetic", 16, seed=3)]
    started = time.perf_counter()
    accuracy = generation_accuracy(net, tokenizer, "arithmetic", prompts, {"max_new_tokens": 8, "batch_size": 16})
    assert 0.0 <= accuracy <= 1.0
    on = next(net.parameters()).device.type
    assert on == device
    return {"on": on, "dtype": dtype, "dpo_loss_diff_vs_cpu_fp32": diff, "generation_accuracy": accuracy,
            "generation_seconds": time.perf_counter() - started}


def check_collectives(path: str, device: str, tmp: Path) -> dict:
    import copy
    import hashlib

    import torch.distributed as dist

    from ama_ray.models.loading import load_model, load_tokenizer
    from ama_ray.train.engine import Engine
    from ama_ray.train.launch import process_group_backend

    backend = process_group_backend(use_gpu=device == "cuda")
    dist.init_process_group(backend, init_method=f"file://{tmp / 'pg'}", rank=0, world_size=1)
    try:
        tokenizer = load_tokenizer(path)
        by_task = _scored_tasks(tokenizer)
        model = load_model(path).to(device).train()
        # world=2: the job runs every collective it makes with more than one worker; the group has one rank
        job = common.make_job(model, tokenizer.pad_token_id, by_task, "ama_s", 8, rank=0, world=2)
        job.eval_rows = [r[:4] for r in by_task]
        job.alpha_digest = hashlib.sha256()
        metrics = job.train_step(0, job.mixer.alpha(0))
        evaluated = job.evaluate()
        checks = job.consistency()
        zero3 = copy.copy(job.engine)
        zero3.__class__ = type("Zero3View", (Engine,), {"zero3": True})
        kept = zero3.lockstep_rows([by_task[0][:3], by_task[1][:2]])
        grad = torch.ones(4, device=device)
        dist.all_reduce(grad)  # the gradient path (DDP / DeepSpeed): NCCL on CUDA
        assert math.isfinite(metrics["train/loss/mean"]) and math.isfinite(evaluated["eval/dpo_loss/mean"])
        assert checks["check/replica_max_diff"] == 0.0 and [len(k) for k in kept] == [3, 2]
        on = next(model.parameters()).device.type
        assert on == device
        return {"backend": backend, "on": on, "train_loss": metrics["train/loss/mean"],
                "cuda_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0}
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
