"""AMA-S moves toward the task furthest from its specialist and, over seeds, keeps the worst task
closer to it than proportional mixing (at equal task sizes proportional and balanced are the
same mix, so one baseline run covers both).

The configuration: the minimal job's three tasks at equal sizes (420 training pairs each since
train/validation/test splits), which differ in difficulty (brackets stays furthest from its
specialist), 150 generalist steps, the default mixing settings (eta_alpha 0.1, smoothing 0.1,
not tuned for this test). Measured on seeds 0, 1, 2 (worst-task validation excess, AMA-S vs
proportional): 0.223 vs 0.152, 0.175 vs 0.240, 0.248 vs 0.415 -- AMA-S better on 2 of 3 seeds,
by 0.054 on average. Seed 0 is the honest counter-example: AMA-S puts alpha ~0.9 on brackets,
its 420 pairs are each drawn ~8 times, and the training excess keeps falling while the held-out
excess does not (the over-fitting docs/results.md describes at 10:1:1). Before the splits (510
training pairs, one held-out split) AMA-S won on all three seeds by 0.11-0.13; per-seed wins are
not what this configuration supports now, so the test asserts the mechanism on every seed and
the advantage on the mean.
"""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from ama_ray.config import apply_override, validate
from ama_ray.stages.generalist import train_generalist, train_sizes
from ama_ray.storage import MIXING_HISTORY, RunDir

SEEDS = (0, 1, 2)
MARGIN = 0.03  # on the mean over SEEDS of the worst-task excess; measured 0.054


@pytest.mark.timeout(900)
def test_ama_s_follows_the_worst_task_and_lowers_its_excess_on_average(tiny_run, tmp_path):
    cfg, src = tiny_run
    raw = cfg.model_dump(mode="json")
    for item in (f"storage.path={tmp_path}", "generalist.optim.steps=150", "generalist.optim.checkpoint_every=150"):
        apply_override(raw, item)
    cfg = validate(raw)
    run = RunDir(cfg.run_dir)
    for stage in ("prepare", "reference", "specialists", "score"):
        for task in cfg.task_names:
            shutil.copytree(src / run.stage_unit(stage, task).label, run.stage_unit(stage, task).path)
    model_path = run.reference(cfg.task_names[0]).manifest()["model"]
    worst: dict[str, list[float]] = {"proportional": [], "ama_s": []}
    for seed in SEEDS:
        final = {}
        for algorithm in worst:
            train_generalist(cfg, algorithm, seed, model_path, train_sizes(run, cfg), force=True)
            final[algorithm] = run.generalist(algorithm, seed).manifest()["final_metrics"]
            worst[algorithm].append(final[algorithm]["eval/excess_loss/worst"])
        # The mechanism, on every seed: AMA-S's mean alpha is largest on the task that is furthest
        # from its specialist under the baseline.
        furthest = max(cfg.task_names, key=lambda t: final["proportional"][f"eval/excess_loss/{t}"])
        history = pq.read_table(run.generalist("ama_s", seed).file(MIXING_HISTORY)).to_pandas()
        mean_alpha = {t: history[f"alpha/{t}"].mean() for t in cfg.task_names}
        assert max(mean_alpha, key=mean_alpha.get) == furthest, (seed, furthest, mean_alpha)
    assert np.mean(worst["ama_s"]) + MARGIN < np.mean(worst["proportional"]), worst
