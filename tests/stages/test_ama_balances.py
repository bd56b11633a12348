"""AMA-S moves toward the task furthest from its specialist and, over seeds, keeps the worst task
closer to it than proportional mixing (at equal task sizes proportional and balanced are the
same mix, so one baseline run covers both).

The configuration: the minimal job's three tasks at equal sizes (420 training pairs each since
train/validation/test splits), which differ in difficulty (brackets stays furthest from its
specialist), 150 generalist steps, the default mixing settings (eta_alpha 0.1, smoothing 0.1,
not tuned for this test). Measured on seeds 0, 1, 2 (worst-task validation excess, AMA-S vs
proportional), 2026-12-01 after the chunked log-probs (numerically equal within 1e-6, but a
sampled trajectory follows every last bit): 0.212 vs 0.434, 0.259 vs 0.313, 0.332 vs 0.371 --
AMA-S better on all three, by 0.105 on average. The same day before that change: 0.223 vs
0.152, 0.175 vs 0.240, 0.248 vs 0.415 (better on 2 of 3, by 0.054): seed 0 was the honest
counter-example, AMA-S putting alpha ~0.9 on brackets, whose 420 pairs were each drawn ~8
times while the held-out excess stalled (the over-fitting docs/results.md describes at
10:1:1). Per-seed wins are not what this configuration supports, so the test asserts the
mechanism on every seed and the advantage on the mean. The mechanism is "AMA-S moves alpha
toward the task furthest from its specialist": its mean alpha on that task is above the
proportional share 1/k (measured: 0.547, 0.638, 0.440). That it is the largest of the three is
not the mechanism: on seed 2 refusal -- far from its specialist early in training, the closest
at the end (held-out excess 0.012 under proportional) -- got a mean alpha of 0.475.
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


# Slow (2 min 13 s in CI on 2026-12-01: six generalists of 150 steps): the suite was over its
# 30-minute budget. CI keeps the mechanism at 10:1:1 (tests/stages/test_imbalance.py), and
# docs/results.md measures this configuration with 5 seeds (AMA-S − balanced −0.101, separated).
@pytest.mark.slow
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
        # The mechanism, on every seed: AMA-S moves alpha toward the task that is furthest from its
        # specialist under the baseline: above the proportional share (1/k at equal sizes).
        excess = {t: final["proportional"][f"eval/excess_loss/{t}"] for t in cfg.task_names}
        furthest = max(excess, key=excess.get)
        history = pq.read_table(run.generalist("ama_s", seed).file(MIXING_HISTORY)).to_pandas()
        mean_alpha = {t: history[f"alpha/{t}"].mean() for t in cfg.task_names}
        share = 1 / len(cfg.task_names)
        assert mean_alpha[furthest] > share + 0.05, (seed, excess, mean_alpha)
    assert np.mean(worst["ama_s"]) + MARGIN < np.mean(worst["proportional"]), worst
