"""The Tune study: trials reuse the run's scores, ASHA stops a diverging trial, outputs are ready to use."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest

from ama_ray.config import load_config
from ama_ray.errors import ConfigError

GOOD_LRS = [0.002, 0.003]  # two good trials fill ASHA's first rung before the bad one reports
BAD_LR = 0.5  # AdamW at lr 0.5 wrecks the tiny model within 5 steps: its excess loss explodes


def _study_cfg(run_root, minimal_cfg, **extra):
    overrides = [
        f"storage.path={run_root}", f"model.cache_dir={minimal_cfg.model.cache_dir}",
        "generalist.algorithms=[ama_s]", "generalist.optim.steps=20", "generalist.optim.warmup_steps=2",
        "eval.every_n_steps=5", "eval.log_every_n_steps=5", "eval.max_examples=30",
        # The bad value comes last: trials run one at a time in grid order, so ASHA's first rung
        # already holds the good trials' values when the bad one reports.
        f"tune.search_space={{generalist.optim.lr: {{grid: {GOOD_LRS + [BAD_LR]}}}}}",
        "tune.max_concurrent_trials=1", "tune.num_samples=1", "tune.grace_period=1", "tune.reduction_factor=2",
    ]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(Path(__file__).resolve().parent.parent / "jobs" / "minimal.yaml", overrides)


@pytest.mark.timeout(420)
def test_study_stops_the_bad_trial_and_writes_a_runnable_best_config(tiny_run, tmp_path):
    import ray

    from ama_ray.stages import tune

    cfg0, run_dir = tiny_run
    shutil.copytree(run_dir, tmp_path / run_dir.name)
    cfg = _study_cfg(tmp_path, cfg0)
    start = time.perf_counter()
    written = tune.run(cfg)
    elapsed = time.perf_counter() - start

    with open(written[0], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["generalist.optim.lr"]) for r in rows] == GOOD_LRS + [BAD_LR]  # trial ids follow grid order
    by_lr = {float(r["generalist.optim.lr"]): r for r in rows}
    bad = by_lr[BAD_LR]
    good_steps = [int(by_lr[lr]["steps"]) for lr in GOOD_LRS]
    # The first trial has nobody to lose against: it runs all 20 steps (4 evaluations).
    assert by_lr[GOOD_LRS[0]]["status"] == "completed" and good_steps[0] == 20
    # The diverging trial is stopped at the first rung (grace period 1 = its first evaluation).
    assert bad["status"] == "stopped" and int(bad["steps"]) == 5 and int(bad["evaluations"]) == 1
    assert int(bad["steps"]) < max(good_steps)
    assert float(bad["eval/excess_loss/worst"]) > max(float(by_lr[lr]["eval/excess_loss/worst"]) for lr in GOOD_LRS)

    # best.yaml is a complete config: it loads, names the best trial's lr and this run directory.
    best = load_config(written[1])
    best_row = min((r for r in rows if r["status"] == "completed"), key=lambda r: float(r["eval/excess_loss/worst"]))
    assert best.generalist.optim.lr == float(best_row["generalist.optim.lr"])
    assert best.generalist.algorithms == ["ama_s"] and best.run_dir == cfg.run_dir

    # Outputs isolated per trial: completed trials committed their unit, stopped ones did not.
    study = tmp_path / run_dir.name / "tune"
    manifest = json.loads((study / "_manifest.json").read_text())
    assert manifest["best_trial"] == best_row["trial_id"] and bad["trial_id"] in manifest["stopped_early"]
    for r in rows:
        unit = study / r["trial_id"] / "ama_s" / "seed1000"  # trial seeds are never reported seeds
        assert (unit / "_manifest.json").exists() == (r["status"] == "completed"), r
        assert (study / r["trial_id"] / "config.yaml").exists()
    # The generalist stage's own units were not touched by the study.
    assert (tmp_path / run_dir.name / "generalist" / "ama_s" / "seed0" / "_manifest.json").exists()

    # Stopped trials leave no placement group behind: all CPUs are free again.
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == pytest.approx(ray.cluster_resources()["CPU"])

    # A second call with the same settings finds the committed study and trains nothing.
    again = time.perf_counter()
    assert tune.run(cfg) == written
    assert time.perf_counter() - again < 10
    print(f"study of {len(rows)} trials: {elapsed:.0f} s")


def test_search_space_domains_and_errors(minimal_cfg):
    from ray.tune.search.sample import Categorical, Float, Integer

    from ama_ray.stages.tune import max_evaluations, search_space, trial_config

    cfg = minimal_cfg.model_copy(deep=True)
    cfg.tune.search_space = {
        "mixing.eta_alpha": {"loguniform": [0.01, 1.0]},
        "mixing.smoothing": {"choice": [0.05, 0.1]},
        "generalist.optim.steps": {"randint": [10, 101]},
    }
    space = search_space(cfg)
    assert isinstance(space["mixing.eta_alpha"], Float) and space["mixing.eta_alpha"].lower == 0.01
    assert isinstance(space["mixing.smoothing"], Categorical)
    assert isinstance(space["generalist.optim.steps"], Integer)
    # minimal.yaml lists two algorithms: without an `algorithm` key they become a grid.
    assert space["algorithm"] == {"grid_search": ["proportional", "ama_s"]}
    # max_t counts evaluations of the longest trial: randint's high is exclusive, so 100 steps;
    # evaluated every 50 -> 2, every 30 -> 4 (the last at step 100).
    assert max_evaluations(cfg) == 2
    cfg.eval.every_n_steps = 30
    assert max_evaluations(cfg) == 4

    trial = trial_config(cfg.model_dump(mode="json"), {"algorithm": "ama_r", "mixing.eta_alpha": 0.37})
    assert trial.generalist.algorithms == ["ama_r"] and trial.mixing.eta_alpha == 0.37

    for bad, where in [
        ({"mixing.eta_alpah": {"choice": [0.1]}}, "tune.search_space.mixing.eta_alpah"),  # unknown key
        ({"mixing.smoothing": {"choice": [0.5, 2.0]}}, "tune.search_space.mixing.smoothing"),  # 2.0 > 1
        ({"mixing.eta_alpha": {"normal": [0, 1]}}, "tune.search_space.mixing.eta_alpha"),  # unknown domain
        ({"mixing.eta_alpha": {"loguniform": [0.0, 1.0]}}, "tune.search_space.mixing.eta_alpha"),
        ({"mixing.eta_alpha": {"uniform": [1.0, 0.5]}}, "tune.search_space.mixing.eta_alpha"),
        ({"dpo.beta": {"choice": [0.1, 0.5]}}, "tune.search_space.dpo.beta"),  # would make the scores stale
        # minimal.yaml merges, so it keeps its specialists; without merging, history would drop them
        ({"mixing.excess_target": {"choice": ["specialist", "history"]}}, None),
    ]:
        cfg.tune.search_space = bad
        if where is None:
            search_space(cfg)  # allowed while merging keeps the specialists in every trial
            cfg.merging.methods = []
            where = "tune.search_space.mixing.excess_target"
        with pytest.raises(ConfigError) as err:
            search_space(cfg)
        assert err.value.where == where


def test_fixed_weights_are_searched_per_task(minimal_cfg):
    """A 'fixed (tuned)' baseline: one weight per task is a key of its own; the policy normalises."""
    from ray.tune.search.sample import Float

    from ama_ray.mixing import make_policy
    from ama_ray.stages.tune import search_space, trial_config

    cfg = minimal_cfg.model_copy(deep=True)
    cfg.generalist.algorithms = ["fixed"]
    cfg.mixing.fixed_weights = {t: 1.0 for t in cfg.task_names}
    cfg.tune.search_space = {f"mixing.fixed_weights.{t}": {"uniform": [0.02, 1.0]} for t in cfg.task_names}
    space = search_space(cfg)
    assert all(isinstance(space[k], Float) for k in cfg.tune.search_space) and "algorithm" not in space
    params = dict(zip(cfg.tune.search_space, [0.6, 0.3, 0.1]))
    trial = trial_config(cfg.model_dump(mode="json"), params)
    policy = make_policy("fixed", trial.task_names, [1] * len(trial.task_names), trial.mixing)
    assert policy.weights().tolist() == pytest.approx([0.6, 0.3, 0.1])

    cfg.tune.search_space = {"mixing.fixed_weights.brackts": {"uniform": [0.02, 1.0]}}
    with pytest.raises(ConfigError) as err:
        search_space(cfg)
    assert err.value.where == "tune.search_space.mixing.fixed_weights.brackts" and "brackts" in str(err.value)


def test_best_row_prefers_completed_trials_and_respects_the_mode():
    from ama_ray.stages.tune import best_row

    rows = [
        {"trial_id": "a", "status": "completed", "eval/excess_loss/worst": 0.30, "eval/rewards/accuracies/mean": 0.7},
        {"trial_id": "b", "status": "stopped", "eval/excess_loss/worst": 0.10, "eval/rewards/accuracies/mean": 0.9},
        {"trial_id": "c", "status": "completed", "eval/excess_loss/worst": 0.20, "eval/rewards/accuracies/mean": 0.6},
        {"trial_id": "d", "status": "error", "eval/excess_loss/worst": None, "eval/rewards/accuracies/mean": None},
    ]
    assert best_row(rows, "eval/excess_loss/worst")["trial_id"] == "c"  # b is lower but did not finish
    assert best_row(rows, "eval/rewards/accuracies/mean")["trial_id"] == "a"  # max mode


@pytest.mark.timeout(420)
def test_a_trial_reports_the_mean_of_its_seeds_in_lockstep(tiny_run, tmp_path):
    """tune.seeds_per_trial = 2: both seeds train at once, Tune sees one result per evaluation
    (steps 5, 10, 15 once each, not one per seed), and the final objective is the seeds' mean."""
    from ama_ray.stages import tune

    cfg0, run_dir = tiny_run
    shutil.copytree(run_dir, tmp_path / run_dir.name)
    cfg = _study_cfg(tmp_path, cfg0, **{"tune.seeds_per_trial": 2, "tune.search_space": "{generalist.optim.lr: {grid: [0.003]}}"})
    written = tune.run(cfg)
    with open(written[0], newline="") as f:
        (row,) = list(csv.DictReader(f))
    study = tmp_path / run_dir.name / "tune"
    finals = [json.loads((study / row["trial_id"] / "ama_s" / f"seed{s}" / "_manifest.json").read_text())["final_metrics"]
              for s in (1000, 1001)]
    metric = "eval/excess_loss/worst"
    assert finals[0][metric] != finals[1][metric]  # two different runs
    assert float(row[metric]) == pytest.approx((finals[0][metric] + finals[1][metric]) / 2)
    assert row["status"] == "completed" and int(row["evaluations"]) == 4
    (progress,) = list((tmp_path / run_dir.name / "_checkpoints" / "tune").rglob("progress.csv"))
    with open(progress, newline="") as f:
        reports = list(csv.DictReader(f))
    assert [float(r["step"]) for r in reports] == [5, 10, 15, 20]
    # Each intermediate report is the mean of the two seeds' own evaluations at that step.
    from ama_ray.report.sources import load_scalars
    from ama_ray.storage import RunDir

    run = RunDir(str(tmp_path / run_dir.name))
    scalars = [dict(zip(*load_scalars(run, run.generalist("ama_s", s, row["trial_id"]))[metric])) for s in (1000, 1001)]
    for r in reports[:-1]:
        step = int(float(r["step"]))
        assert float(r[metric]) == pytest.approx((scalars[0][step] + scalars[1][step]) / 2, abs=1e-5), step


def test_trial_seeds_are_never_reported_seeds(minimal_cfg):
    from ama_ray.stages.tune import trial_seeds

    cfg = minimal_cfg.model_copy(deep=True)
    cfg.tune.seeds_per_trial = 3
    assert trial_seeds(cfg) == [1000, 1001, 1002]
    cfg.generalist.seeds = [0, 1001]
    with pytest.raises(ConfigError, match="tune on a reported seed") as err:
        trial_seeds(cfg)
    assert err.value.where == "generalist.seeds"


def test_mean_metrics_averages_what_every_seed_reported():
    from ama_ray.stages.tune import mean_metrics

    out = mean_metrics([{"a": 1.0, "b": 2, "s": "x", "only": 1.0}, {"a": 3.0, "b": 4, "s": "y"}])
    assert out == {"a": 2.0, "b": 3.0}
