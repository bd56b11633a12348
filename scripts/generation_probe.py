"""A model's greedy replies to a run's first test prompts, with the verifier's verdict, to look into
a generation accuracy (docs/results.md, "A real model": the base's 0.00 on brackets).

    python scripts/generation_probe.py RUN_DIR MODEL_DIR [--tasks brackets,arithmetic] [-n 12]

`--tasks` names the run's tasks; each is judged by the verifier of the benchmark it was prepared
from (its prepare manifest). Decodes with the evaluate stage's own `greedy_replies` (batches of 16,
`max_new_tokens` 16), and judges by content when the run's prompts are chat turns rendered by a
chat template, whichever (`benchmark.rendered_as_chat`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq

from ama_ray.data.benchmark import rendered_as_chat, verify
from ama_ray.errors import AmaError
from ama_ray.models.loading import load_model, load_tokenizer
from ama_ray.stages.evaluate import greedy_replies
from ama_ray.storage import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("model", help="a save_pretrained directory (the base: the reference stage's `model`)")
    parser.add_argument("--tasks", default="brackets,arithmetic")
    parser.add_argument("-n", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    net, tok = load_model(args.model, dtype="float32").eval(), load_tokenizer(args.model)
    for task in args.tasks.split(","):
        prepared = RunDir(str(args.run_dir.resolve())).prepared(task)
        try:
            benchmark = prepared.require(f"task {task}'s prepared data", fix="give a task of this run")["task"].get("benchmark")
        except AmaError as err:
            parser.error(str(err))
        if benchmark is None:
            parser.error(f"task {task} is not from the offline benchmark: there is no verifier to judge its replies")
        rows = pq.read_table(prepared.file("test.parquet")).sort_by("example_id").slice(0, args.n).to_pylist()
        chat = rendered_as_chat(benchmark, rows[0]["prompt"])
        ok = 0
        for row, text in zip(rows, greedy_replies(net, tok, rows, {"batch_size": 16, "max_new_tokens": args.max_new_tokens})):
            good = verify(benchmark, row["prompt"], text, by_content=chat)
            ok += good
            print(f"{task} {'ok ' if good else 'no '} {row['prompt'][-40:]!r} -> {text[:60]!r}")
        print(f"{task}: {ok} of {len(rows)} verified")


if __name__ == "__main__":
    main()
