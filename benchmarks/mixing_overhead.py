"""What adaptive mixing costs: generalist step time with AMA-S vs a fixed mix, all else equal.

Arms (the library's `Job.train_step`, same model copy, rows, batch size, one torch thread):
  fixed              `balanced` (a fixed uniform mix), in-process policy;
  ama_s              AMA-S, in-process policy (sampling from alpha, clipped excess, EXP3 update);
  fixed+actor        `balanced` through a real mixing actor (`RayMixer`, local Ray, loopback);
  ama_s+actor        AMA-S through a real mixing actor: what a generalist worker runs.
Every actor arm fetches alpha_t before step t (`RayMixer.alpha`) and asks for alpha_{t+1} right
after sending step t's report, as `Job.train_step` does. The round trip of one `get_alpha` call
to the idle actor is measured as well.

    python benchmarks/mixing_overhead.py [--reps 7] [--block 20] [--batch 8]
    python benchmarks/mixing_overhead.py --quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import common

TARGET = 1.03


def actor_rtt_ms(job, calls: int) -> float:
    """Median wall time of `ray.get(get_alpha(current step))` on the job's actor, in ms."""
    import ray

    actor, step = job.mixer.actor, job.mixer._pending[0]
    ray.get(actor.get_alpha.remote(step))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        ray.get(actor.get_alpha.remote(step))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def build_rows(args, workdir: Path):
    model, tokenizer = common.load(common.model_dir("tiny", workdir))
    labelled = common.texts(["arithmetic", "refusal", "brackets"], args.rows_per_task)
    rows = common.with_scores([common.tokenize(tokenizer, r) for _, r in labelled], model, tokenizer.pad_token_id)
    by_task: list[list[dict]] = [[], [], []]
    for (task, _), row in zip(labelled, rows):
        by_task[task].append(row)
    return model, tokenizer.pad_token_id, by_task


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows-per-task", type=int, default=300)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--no-ray", action="store_true", help="skip the actor arms")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows_per_task, args.reps, args.block = 12, 1, 2
    torch.set_num_threads(1)
    common.quiet()
    with tempfile.TemporaryDirectory() as tmp:
        model, pad_id, by_task = build_rows(args, Path(tmp))
        job = lambda algorithm, client=None: common.make_job(  # noqa: E731
            copy.deepcopy(model), pad_id, by_task, algorithm, args.batch, client=client)
        jobs = {"fixed": job("balanced"), "ama_s": job("ama_s")}
        if not args.no_ray:
            from ama_ray.cluster import ensure_ray
            from ama_ray.mixing.actor import RayMixer

            ensure_ray(num_cpus=1)
            jobs.update({"fixed+actor": job("balanced", RayMixer), "ama_s+actor": job("ama_s", RayMixer)})
        times = common.alternate({name: common.job_block(j) for name, j in jobs.items()}, args.reps, args.block)
        rtt = None if args.no_ray else actor_rtt_ms(jobs["ama_s+actor"], 20 if args.quick else 200)
    out = common.header("Mixing overhead: AMA-S vs a fixed mix", reps=args.reps, block=args.block,
                        batch_pairs=args.batch, k=3)
    out += "\n" + report(times, rtt)
    print(out)
    return out


def report(times: dict, rtt: float | None) -> str:
    rows = [[name, common.med(times, name, "wall") * 1e3, common.med(times, name, "cpu") * 1e3] for name in times]
    checks = [("ama_s", "fixed", f"<= {TARGET}")]
    if "ama_s+actor" in times:
        checks += [("ama_s+actor", "fixed+actor", f"<= {TARGET}"), ("ama_s+actor", "ama_s", "(actor cost)"),
                   ("ama_s+actor", "fixed", "(all-in)")]
    ratio_rows = []
    for num, den, target in checks:
        row = [f"{num} / {den}"]
        for kind in ("cpu", "wall"):
            values = common.ratios(times, num, den, kind, speed=False)
            met = "yes" if statistics.median(values) <= TARGET else "NO"
            row += [common.spread(values), met if target.startswith("<=") else ""]
        ratio_rows.append(row + [target])
    out = common.table(["arm", "wall ms/step", "CPU ms/step"], rows) + "\n\n"
    out += common.table(["step-time ratio", "CPU time: median [min-max]", "met", "wall time: median [min-max]",
                         "met", "target"], ratio_rows)
    if rtt is not None:
        out += f"\n\nget_alpha round trip to the idle actor: {rtt:.2f} ms (median, wall)"
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
