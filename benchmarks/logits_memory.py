"""Peak memory of the DPO log-probs: `ama_ray.dpo.sequence_logps` against the plain computation.

The plain computation casts the logits of every position of the micro-batch to float32 over
the whole vocabulary and keeps them for backward; `sequence_logps` asks the model only for the
positions from the first completion token on (`logits_to_keep`) and runs the float32
log-softmax in checkpointed row chunks. Each arm runs in a fresh process (forward + backward of
the summed log-probs of one micro-batch, a random-weight model with SmolLM2-135M's shapes in
float32, prompts and completions of L/2 tokens each); reported: the process's peak RSS above
what it held after building the model and the batch, and the max difference of the two arms'
log-probs (computed in one process).

    python benchmarks/logits_memory.py                 # L = 512 and 2048, 2 pairs
    python benchmarks/logits_memory.py --quick         # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import common  # noqa: F401  (offline variables before transformers loads)
import gpu_step

ARMS = ("plain", "sequence_logps")


def plain_logps(model, batch):
    ids = batch["input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits[:, :-1].float()
    mask = batch["completion_mask"][:, 1:].bool()
    token = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
    return torch.where(mask, token, torch.zeros_like(token)).sum(dim=1)


def setup(shapes: str, length: int, pairs: int):
    from ama_ray import dpo

    torch.manual_seed(0)
    model = gpu_step.build_model(gpu_step.SHAPES[shapes], torch.float32, "cpu")
    rows = gpu_step.make_rows(pairs, length // 2, length // 2, gpu_step.SHAPES[shapes]["vocab_size"], np.random.default_rng(0))
    return model, dpo.collate(rows, pad_token_id=0)


def run_arm(arm: str, shapes: str, length: int, pairs: int) -> dict:
    from ama_ray.dpo import sequence_logps

    torch.set_num_threads(2)
    model, batch = setup(shapes, length, pairs)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logps = plain_logps(model, batch) if arm == "plain" else sequence_logps(model, batch)[0]
    logps.sum().backward()
    return {"arm": arm, "peak_above_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before,
            "logps": logps.detach().tolist()}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--shapes", default="smollm2", choices=sorted(gpu_step.SHAPES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.shapes, int(args.lengths), args.pairs)))
        return ""
    if args.quick:
        args.lengths, args.shapes = "64", "tiny"
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        out = {}
        for arm in ARMS:
            cmd = [sys.executable, __file__, "--arm", arm, "--shapes", args.shapes, "--lengths", str(length), "--pairs", str(args.pairs)]
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent)
            out[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
        diff = float(np.max(np.abs(np.subtract(out["plain"]["logps"], out["sequence_logps"]["logps"]))))
        vocab = gpu_step.SHAPES[args.shapes]["vocab_size"]
        rows.append([length, 2 * args.pairs, vocab, round(out["plain"]["peak_above_mb"]), round(out["sequence_logps"]["peak_above_mb"]),
                     f"{out['sequence_logps']['peak_above_mb'] / max(out['plain']['peak_above_mb'], 1e-9):.2f}", f"{diff:.2e}"])
    table = common.table(["tokens per sequence", "rows", "vocabulary", "plain: peak above model (MB)",
                          "sequence_logps: peak above model (MB)", "ratio", "max |logps difference|"], rows)
    out = common.header("Logits memory: sequence_logps vs the plain float32 log-softmax", shapes=args.shapes, pairs=args.pairs) + "\n" + table
    print(out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
