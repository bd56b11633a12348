"""AMA-S keeps the worst task closer to its specialist than proportional and balanced mixing.

The configuration is designed for it: the minimal job's three tasks at equal sizes, which differ
in difficulty (brackets stays furthest from its specialist), 150 generalist steps, the default
mixing settings (eta_alpha 0.1, smoothing 0.1, not tuned for this test). Measured on seeds 0, 1, 2
(worst-task held-out excess, AMA-S vs the better baseline): 0.145 vs 0.254, 0.216 vs 0.325,
0.214 vs 0.348 -- margins 0.11 to 0.13. CI runs seed 0; AMA_RAY_TEST_SEEDS=0,1,2 runs all three.
"""

from __future__ import annotations

import os
import shutil

import pytest

from ama_ray.config import apply_override, validate
from ama_ray.stages.generalist import train_generalist, train_sizes
from ama_ray.storage import RunDir

SEEDS = [int(s) for s in os.environ.get("AMA_RAY_TEST_SEEDS", "0").split(",")]
MARGIN = 0.05


@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", SEEDS)
def test_ama_s_beats_proportional_and_balanced_on_the_worst_task(tiny_run, tmp_path, seed):
    cfg, src = tiny_run
    raw = cfg.model_dump(mode="json")
    for item in (f"storage.path={tmp_path}", "generalist.optim.steps=150", "generalist.optim.checkpoint_every=150"):
        apply_override(raw, item)
    cfg = validate(raw)
    for stage in ("prepared", "reference", "specialists", "scores"):
        shutil.copytree(src / stage, tmp_path / cfg.storage.run_name / stage)
    run = RunDir(cfg.run_dir)
    model_path = run.unit("reference", cfg.task_names[0]).manifest()["model"]
    worst = {}
    for algorithm in ("proportional", "balanced", "ama_s"):
        train_generalist(cfg, algorithm, seed, model_path, train_sizes(run, cfg), force=True)
        worst[algorithm] = run.unit("generalist", algorithm, f"seed{seed}").manifest()["final_metrics"]["eval/excess_loss/worst"]
    assert worst["ama_s"] + MARGIN < min(worst["proportional"], worst["balanced"]), worst
