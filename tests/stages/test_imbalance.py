"""AMA-S at 10:1:1: the small tasks get a larger share of samples than under proportional mixing,
and the worst task ends closer to its specialist.

The imbalance is made from the shared tiny run by keeping 10% of the two minority tasks' training
rows (prepared data, reference log-probs and specialist scores are per example, so they are cut
consistently and the specialists stay as trained). The excess compared is the one AMA minimises:
the training excess per task over the last 25 steps, from `mixing_history.parquet`. Held-out
excess is not asserted here: with ~50 minority rows AMA-S's extra weight over-fits them (measured:
held-out worst 1.01 vs proportional's 0.68), the data-limited regime docs/results.md discusses;
its 5-seed 10:1:1 run (305 minority rows) and tests/stages/test_ama_balances.py cover held-out.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from ama_ray.config import apply_override, validate
from ama_ray.stages.generalist import train_generalist, train_sizes
from ama_ray.storage import RunDir

MINORITY = ("refusal", "brackets")


def _shrink(run: RunDir, task: str, keep: float) -> None:
    ids = None
    for stage in ("prepared", "reference", "scores"):
        unit = run.unit(stage, task)
        man = unit.manifest()
        table = unit.read_parquet("train.parquet").sort_by("example_id")
        if ids is None:
            ids = set(table["example_id"].to_pylist()[: max(8, int(table.num_rows * keep))])
        mask = [i in ids for i in table["example_id"].to_pylist()]
        unit.write_parquet("train.parquet", table.filter(mask))
        man["rows"]["train"] = len(ids)
        unit.commit(**man)  # records the new file's size and digest


@pytest.mark.timeout(900)
def test_ama_s_favours_small_tasks_and_lowers_worst_excess_at_10_1_1(tiny_run, tmp_path):
    cfg, src = tiny_run
    raw = cfg.model_dump(mode="json")
    for item in (f"storage.path={tmp_path}", "generalist.optim.steps=100", "generalist.optim.checkpoint_every=100"):
        apply_override(raw, item)
    cfg = validate(raw)
    dst = tmp_path / cfg.storage.run_name
    for stage in ("prepared", "reference", "specialists", "scores"):
        shutil.copytree(src / stage, dst / stage)
    run = RunDir(cfg.run_dir)
    for task in MINORITY:
        _shrink(run, task, keep=0.1)
    sizes = train_sizes(run, cfg)
    assert sizes[0] >= 9 * max(sizes[1:]), sizes
    model_path = run.unit("reference", cfg.task_names[0]).manifest()["model"]
    algorithms = ("proportional", "ama_s")
    with ThreadPoolExecutor(2) as pool:  # side by side, as the stage runs its units: one thread each
        for done in [pool.submit(train_generalist, cfg, a, 0, model_path, sizes, force=True) for a in algorithms]:
            done.result()
    share, worst = {}, {}
    for algorithm in algorithms:
        unit = run.unit("generalist", algorithm, "seed0")
        hist = pq.read_table(f"{unit.path}/mixing_history.parquet").to_pandas()
        share[algorithm] = sum(hist[f"count/{t}"].sum() for t in MINORITY) / sum(hist[f"count/{t}"].sum() for t in cfg.task_names)
        tail = hist.tail(25)
        worst[algorithm] = max(tail[f"sum_clipped_excess/{t}"].sum() / max(tail[f"count/{t}"].sum(), 1) for t in cfg.task_names)
    assert share["ama_s"] > share["proportional"] + 0.2, share
    assert worst["ama_s"] < 0.8 * worst["proportional"], worst
