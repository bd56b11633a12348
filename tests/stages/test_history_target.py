"""`mixing.excess_target: history` through the pipeline: no specialists, no scores, no excess.

The tiny run's prepared data and reference log-probs are copied; `ama_ray.pipeline.run` then
skips the specialists and score stages (nothing is written for them), trains the generalists on
the reference rows with the history target, evaluates without a specialist and without an excess
column, and reports on the loss. The target each step used is recomputed from the mixing history
with a fresh `HistoryTarget`, and a worker killed mid-run resumes with the same targets.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from ama_ray.config import apply_override, validate
from ama_ray.errors import ConfigError
from ama_ray.mixing.targets import HistoryTarget
from ama_ray.storage import MIXING_HISTORY, RunDir

OVERRIDES = ("mixing.excess_target=history", "mixing.clip=per_task_mean", "mixing.history_window=16", "merging.methods=[]",
             "generalist.optim.steps=24", "generalist.optim.checkpoint_every=8", "eval.every_n_steps=8",
             "eval.generation_examples=4", "scaling.max_failures=1",
             "generalist.max_concurrent=2")  # its two generalists side by side, one thread each


def _cfg(cfg, root, *extra):
    raw = cfg.model_dump(mode="json")
    for item in (f"storage.path={root}", *OVERRIDES, *extra):
        apply_override(raw, item)
    return validate(raw)


def _targets_replayed(history, tasks: list[str], window: float) -> None:
    """Each step's sum_specialist_loss / count is the target a fresh HistoryTarget gives after
    the earlier steps' losses and counts."""
    target = HistoryTarget(len(tasks), window)
    for row in history.to_pylist():
        count = np.array([row[f"count/{t}"] for t in tasks], dtype=float)
        used = np.array([row[f"sum_specialist_loss/{t}"] for t in tasks])
        expected = target.targets() * count
        np.testing.assert_allclose(used, expected, rtol=1e-6, atol=1e-9)
        target.update([row[f"sum_loss/{t}"] for t in tasks], count)


@pytest.mark.timeout(420)
def test_history_target_runs_without_specialists_and_resumes(tiny_run, tmp_path, monkeypatch):
    from ama_ray import pipeline
    from ama_ray.stages.generalist import train_generalist, train_sizes

    cfg0, src = tiny_run
    cfg = _cfg(cfg0, tmp_path)
    assert not cfg.uses_specialists
    run = RunDir(cfg.run_dir)
    for stage in ("prepare", "reference"):
        for task in cfg.task_names:
            shutil.copytree(src / run.stage_unit(stage, task).label, run.stage_unit(stage, task).path)

    pipeline.run(cfg)

    root = tmp_path / cfg.storage.run_name
    assert not (root / "specialists").exists() and not (root / "scores").exists()
    gen = run.generalist("ama_s", 0)
    history = pq.read_table(gen.file(MIXING_HISTORY))
    assert history.num_rows == 24
    _targets_replayed(history, cfg.task_names, 16)
    final = gen.manifest()["final_metrics"]
    assert "eval/loss/worst" in final and not any("excess" in k for k in final), sorted(final)
    assert all(final[f"mix/target/{t}"] > 0 for t in cfg.task_names)

    doc = json.loads((root / "eval" / "metrics.json").read_text())
    assert doc["run"]["specialists"] is False and doc["run"]["excess_target"] == "history"
    assert sorted(doc["models"]) == ["base", "generalist/ama_s/seed0", "generalist/proportional/seed0"]
    assert not any("excess_loss" in m for e in doc["models"].values() for m in e["per_task"].values())
    assert all("loss/worst" in a["mean"] for a in doc["aggregates"]["algorithms"].values())
    assert doc["flags"] == []
    report = (root / "report" / "report.md").read_text()
    assert "lowest worst-task test-split loss (no specialists in this run" in report
    assert "`excess_loss`" not in report

    # A worker killed at step 13 resumes from the step-8 checkpoint with the targets it had then:
    # the run replays the uninterrupted one's history exactly.
    monkeypatch.setenv("AMA_RAY_FAULT", "kill:rank=0:step=13")
    train_generalist(cfg, "ama_s", 0, run.reference(cfg.task_names[0]).manifest()["model"], train_sizes(run, cfg), force=True)
    assert (root / "_faults").exists()
    assert gen.manifest()["final_metrics"]["check/resumed_at_step"] == 8
    assert pq.read_table(gen.file(MIXING_HISTORY)).equals(history)


def test_per_example_clip_against_a_history_target_is_advised_against(minimal_cfg, tmp_path):
    from ama_ray.stages.generalist import target_advice

    assert target_advice(_cfg(minimal_cfg, tmp_path)) is None
    assert "mixing.clip=per_task_mean" in target_advice(_cfg(minimal_cfg, tmp_path, "mixing.clip=per_example"))
    assert target_advice(minimal_cfg) is None  # the specialist's per-example loss: per_example is the default


def test_hashes(minimal_cfg, tmp_path):
    """Without specialists the generalist's hash covers the DPO loss itself (the scores did before);
    `history_window` counts only for the history target, so older hashes stay valid."""
    from ama_ray.stages.generalist import generalist_hash
    from ama_ray.stages.tune import study_hash

    history = _cfg(minimal_cfg, tmp_path)
    assert generalist_hash(history, "ama_s", 0) != generalist_hash(_cfg(minimal_cfg, tmp_path, "dpo.beta=0.5"), "ama_s", 0)
    assert generalist_hash(history, "ama_s", 0) != generalist_hash(_cfg(minimal_cfg, tmp_path, "mixing.history_window=8"), "ama_s", 0)
    plain = minimal_cfg.model_copy(deep=True)
    other = minimal_cfg.model_copy(deep=True)
    other.mixing.history_window = 8
    assert study_hash(plain) == study_hash(other) and plain.section_hash("mixing") == other.section_hash("mixing")


def test_a_run_without_specialists_cannot_tune_on_excess(minimal_cfg, tmp_path):
    from ama_ray.stages.tune import check_metric

    cfg = _cfg(minimal_cfg, tmp_path)
    with pytest.raises(ConfigError, match="eval/loss/worst"):
        check_metric(cfg)
    check_metric(_cfg(minimal_cfg, tmp_path, "tune.metric=eval/loss/worst"))
    # Merging needs the specialists, so they are trained and the excess stays available.
    assert _cfg(minimal_cfg, tmp_path, "merging.methods=[average]").uses_specialists


def test_an_sft_study_cannot_tune_on_reward_accuracy(tmp_path):
    from ama_ray.config import load_config
    from ama_ray.stages.tune import check_metric

    job = "jobs/minimal.yaml"
    with pytest.raises(ConfigError, match="needs preference pairs"):
        check_metric(load_config(job, [f"storage.path={tmp_path}", "dpo.objective=sft", "tune.metric=eval/rewards/accuracies/mean"]))
    check_metric(load_config(job, [f"storage.path={tmp_path}", "dpo.objective=sft"]))  # the excess is there under SFT
    check_metric(load_config(job, [f"storage.path={tmp_path}", "tune.metric=eval/rewards/accuracies/mean"]))  # and pairs under DPO
