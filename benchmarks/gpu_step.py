"""One generalist training step without Ray on one accelerator: pairs/s and model FLOPs utilisation.

The step is the generalist's (AMA-S), built from `ama_ray.dpo` and `ama_ray.mixing` only (torch
and transformers; no Ray, no run directory): labels drawn from alpha (`draw_tasks`), examples
grouped by task, `collate`, `per_example_loss`, `clipped_excess`, `batch_objective`, backward,
the policy update from per-task sums, gradient clipping, AdamW. The model is built from a config
with SmolLM2-135M's shapes (random weights, bf16); token ids are random with fixed lengths.

MFU = achieved model FLOP/s / the chip's bf16 matmul rate measured here (an n x n matmul), with
model FLOPs per step = 6 * params * tokens + 12 * layers * hidden * seq_len * tokens (PaLM's
count: forward + backward, attention included; padded positions count, they are computed).

    python benchmarks/gpu_step.py                       # on a GPU: SmolLM2-135M shapes, bf16
    python benchmarks/gpu_step.py --shapes llama1b      # Llama-3.2-1B's shapes (1.24B parameters)
    python benchmarks/gpu_step.py --tiny --device cpu   # seconds on a CPU: proves the script runs
Writes `gpu_step.json` into $OUT when that variable is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from ama_ray import dpo
from ama_ray.mixing import MixingSettings, batch_objective, clipped_excess, draw_tasks, make_policy

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
# Llama-3.2-1B's shapes: the "1-7B config" of the GPU check (random weights; 1.24B parameters).
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)
TASKS = ("arithmetic", "refusal", "brackets")


SHAPES = {"smollm2": SMOLLM2_135M, "llama1b": LLAMA_1B, "tiny": TINY}


def build_model(shapes: dict, dtype: torch.dtype, device: str):
    """A random-weight Llama of `shapes`, built directly on `device` in `dtype` (no host copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shapes, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.train()


def make_rows(n: int, prompt_len: int, completion_len: int, vocab: int, rng: np.random.Generator) -> list[dict]:
    """Random examples with fixed lengths, reference log-probs and specialist losses."""
    ids = lambda k: rng.integers(2, vocab, k).tolist()  # noqa: E731
    return [{"prompt_input_ids": ids(prompt_len), "chosen_input_ids": ids(completion_len - 1) + [1],
             "rejected_input_ids": ids(completion_len - 1) + [1],
             "ref_chosen_logps": float(-rng.uniform(2.0, 3.0) * completion_len * 3.5),
             "ref_rejected_logps": float(-rng.uniform(2.0, 3.0) * completion_len * 3.5),
             "specialist_loss": float(rng.uniform(0.55, 0.85))} for _ in range(n)]


def generalist_step(model, optimizer, policy, streams: list[list[dict]], batch: int, rng, loss_cfg) -> float:
    """One AMA-S step; returns the objective (a float, which also synchronises the device)."""
    labels = np.sort(draw_tasks("sample", policy.weights(), batch, rng), kind="stable")
    examples = [streams[t][int(rng.integers(len(streams[t])))] for t in labels]
    out = dpo.per_example_loss(model, dpo.collate(examples, pad_token_id=0),
                               [r["ref_chosen_logps"] for r in examples],
                               [r["ref_rejected_logps"] for r in examples], loss_cfg)
    device = out["loss"].device
    spec = torch.tensor([r["specialist_loss"] for r in examples], device=device)
    e = clipped_excess(out["loss"], spec, "per_example", "specialist")
    task_ids = torch.as_tensor(labels, device=device)
    objective = batch_objective(e, task_ids, None)
    objective.backward()
    k = len(streams)
    loss = out["loss"].detach().double().cpu()
    ids = torch.as_tensor(labels)
    sums = lambda v: torch.zeros(k, dtype=torch.float64).index_add_(0, ids, v).numpy()  # noqa: E731
    policy.update({"sum_loss": sums(loss), "sum_specialist_loss": sums(spec.double().cpu()),
                   "sum_clipped_excess": sums(torch.relu(loss - spec.double().cpu())),
                   "count": np.bincount(labels, minlength=k).astype(float)})
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return objective.item()


def matmul_tflops(device: str, dtype: torch.dtype, n: int, iters: int) -> float:
    """Measured dense matmul rate (TFLOP/s) of an n x n x n product in `dtype`."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke run)")
    parser.add_argument("--shapes", default="smollm2", choices=sorted(SHAPES), help="model shapes (--tiny: tiny)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=32, help="preference pairs per step")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--completion-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--matmul-n", type=int, default=8192)
    args = parser.parse_args(argv)
    if args.tiny:
        args.shapes, args.batch, args.prompt_len, args.completion_len, args.warmup, args.steps, args.matmul_n = "tiny", 4, 16, 16, 1, 3, 256
    return args


def main(argv: list[str] | None = None) -> dict:
    result = measure(parse(argv))
    print("| " + " | ".join(result) + " |\n|" + "---|" * len(result))
    print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in result.values()) + " |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_step.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def measure(args: argparse.Namespace) -> dict:
    """Time `args.steps` generalist steps after `args.warmup`; pairs/s, tokens/s, MFU, peak memory."""
    dtype = getattr(torch, args.dtype)
    shapes = SHAPES[args.shapes]
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(shapes, dtype, args.device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    policy = make_policy("ama_s", TASKS, [1000, 1000, 1000], MixingSettings())
    rng = np.random.default_rng(0)
    streams = [make_rows(64, args.prompt_len, args.completion_len, shapes["vocab_size"], rng) for _ in TASKS]
    loss_cfg = dpo.DPOLossConfig()
    for _ in range(args.warmup):
        generalist_step(model, optimizer, policy, streams, args.batch, rng, loss_cfg)
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        generalist_step(model, optimizer, policy, streams, args.batch, rng, loss_cfg)
    sync(args.device)
    seconds = (time.perf_counter() - start) / args.steps
    seq = args.prompt_len + args.completion_len
    tokens = 2 * args.batch * seq
    flops = 6 * params * tokens + 12 * shapes["num_hidden_layers"] * shapes["hidden_size"] * seq * tokens
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    on_device = {p.device.type for p in model.parameters()}
    del model, optimizer
    peak = matmul_tflops(args.device, dtype, args.matmul_n, 20 if cuda else 3)
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "shapes": args.shapes,
            "params_on": ",".join(sorted(on_device)),
            "dtype": args.dtype, "params": params, "batch_pairs": args.batch, "seq_len": seq,
            "ms_per_step": seconds * 1e3, "pairs_per_s": args.batch / seconds, "tokens_per_s": tokens / seconds,
            "model_tflops": flops / seconds / 1e12, "matmul_tflops": peak, "mfu": flops / seconds / 1e12 / peak,
            "peak_memory_gib": peak_memory, "alpha_after": policy.weights().tolist()}


if __name__ == "__main__":
    main(sys.argv[1:])
