"""AMA-H (alpha moved by held-out excess) and `specialists.on_weak`, through the training loop.

The tiny run's prepared data, reference log-probs, specialists and scores are copied. A real
signal split comes from prepare (tests/stages/test_splits.py checks its assignment); here each
task's scored *validation* rows stand in for it (copied to `signal.parquet`), so the generalist
trains without rerunning the stages before it. The refusal specialist is made weak by rewriting
its validation scores to the base's loss (log 2): its target then falls back to the raw loss.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ama_ray.config import apply_override, dump_yaml, validate
from ama_ray.storage import MIXING_HISTORY, RunDir

M = 4  # mixing.heldout_every
OVERRIDES = ("data.signal_fraction=0.1", f"mixing.heldout_every={M}", "generalist.algorithms=[ama_h]", "merging.methods=[]",
             "generalist.optim.steps=16", "generalist.optim.checkpoint_every=8", "eval.every_n_steps=8", "scaling.max_failures=1")
WEAK = "refusal"


def _cfg(cfg, root, *extra):
    raw = cfg.model_dump(mode="json")
    for item in (f"storage.path={root}", *OVERRIDES, *extra):
        apply_override(raw, item)
    return validate(raw)


def _copied_run(tiny_run, root, *extra):
    """The tiny run's units under `root`, each task's scored validation rows as its signal split,
    and the refusal specialist's validation scores rewritten to the base's loss (weak)."""
    cfg0, src = tiny_run
    cfg = _cfg(cfg0, root, *extra)
    run = RunDir(cfg.run_dir)
    for stage in ("prepare", "reference", "specialists", "score"):
        for task in cfg.task_names:
            unit = run.stage_unit(stage, task)
            shutil.copytree(src / unit.label, unit.path)
    for task in cfg.task_names:
        scores = run.scores(task)
        manifest = scores.manifest()
        table = pq.read_table(scores.file(scores.split_file("validation")))
        if task == WEAK:
            table = table.set_column(table.schema.get_field_index("specialist_dpo_loss"), "specialist_dpo_loss",
                                     pa.array(np.full(table.num_rows, math.log(2)), pa.float32()))
            pq.write_table(table, scores.file(scores.split_file("validation")))
        pq.write_table(table, scores.file(scores.split_file("signal")))
        # committed again: the manifest records every file's size and digest
        scores.commit(manifest["config_hash"], **{k: v for k, v in manifest.items() if k not in ("config_hash", "committed_at", "versions", "files")})
    return cfg, run


def test_weak_specialists_are_found_from_the_validation_scores(tiny_run, tmp_path, caplog):
    from ama_ray.errors import StageInputError
    from ama_ray.stages.score import base_dpo_loss, raw_loss_tasks, weak_specialists

    cfg, run = _copied_run(tiny_run, tmp_path)
    assert base_dpo_loss(cfg) == pytest.approx(math.log(2), abs=1e-12)
    assert base_dpo_loss(_cfg(cfg, tmp_path, "dpo.loss_type=ipo", "dpo.beta=0.5")) == pytest.approx(1.0)  # (0 - 1/(2 beta))^2
    weak = weak_specialists(run, cfg)
    assert list(weak) == [WEAK]  # the tiny run's other two specialists learned their tasks
    assert weak[WEAK]["dpo_loss"] == pytest.approx(math.log(2), rel=1e-6) and weak[WEAK]["improved_share"] == 0.0
    assert raw_loss_tasks(run, cfg) == [WEAK]
    assert raw_loss_tasks(run, _cfg(cfg, tmp_path, "specialists.on_weak=warn")) == []
    assert raw_loss_tasks(run, _cfg(cfg, tmp_path, "mixing.excess_target=none")) == []  # nothing reads the specialists
    with caplog.at_level("WARNING"):
        raw_loss_tasks(run, _cfg(cfg, tmp_path, "specialists.on_weak=warn"), announce=True)
    assert "weak specialists -- refusal: validation DPO loss 0.6931" in caplog.text and "AMA may starve" in caplog.text
    with pytest.raises(StageInputError, match="refusal: validation DPO loss 0.6931 vs the base's 0.6931"):
        raw_loss_tasks(run, _cfg(cfg, tmp_path, "specialists.on_weak=stop"), announce=True)


@pytest.mark.timeout(180)
def test_on_weak_stop_exits_2_before_any_generalist_trains(tiny_run, tmp_path):
    # AMA-S without a signal split: the copied units are then complete for the stage's own checks
    cfg, run = _copied_run(tiny_run, tmp_path, "specialists.on_weak=stop", "data.signal_fraction=0", "generalist.algorithms=[ama_s]")
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(cfg))
    done = subprocess.run([sys.executable, "-m", "ama_ray.cli", "generalist", "--config", str(job)],
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "specialists not clearly better than the base: refusal: validation DPO loss 0.6931" in done.stderr
    assert "specialists.on_weak=raw_loss" in done.stderr  # what to do
    assert not (tmp_path / cfg.storage.run_name / "generalist").exists()


@pytest.mark.timeout(420)
def test_ama_h_moves_on_held_out_sums_with_a_raw_loss_fallback_through_a_worker_kill(tiny_run, tmp_path, monkeypatch):
    """One run whose worker is killed at step 13 and resumes from the step-8 checkpoint (a clean
    run's history equals a resumed one's in tests/reliability/test_faults.py; here the replayed
    policy and the measurement schedule are checked across the resume)."""
    from ama_ray.mixing import MixingSettings, make_policy
    from ama_ray.stages.generalist import generalist_hash, train_generalist, train_sizes

    cfg, run = _copied_run(tiny_run, tmp_path)
    tasks, weak = cfg.task_names, cfg.task_names.index(WEAK)
    model = run.reference(tasks[0]).manifest()["model"]
    monkeypatch.setenv("AMA_RAY_FAULT", "kill:rank=0:step=13")
    path = train_generalist(cfg, "ama_h", 0, model, train_sizes(run, cfg), force=False)
    gen = run.generalist("ama_h", 0)
    assert path == gen.path
    manifest = gen.manifest()
    assert manifest["final_metrics"]["check/resumed_at_step"] == 8
    assert manifest["raw_loss_tasks"] == [WEAK]
    assert manifest["config_hash"] == generalist_hash(cfg, "ama_h", 0, [WEAK]) != generalist_hash(cfg, "ama_h", 0)
    history = pq.read_table(gen.file(MIXING_HISTORY))
    rows = history.to_pylist()
    assert len(rows) == 16

    signal = {t: pq.read_table(run.scores(t).file(run.scores(t).split_file("signal"))) for t in tasks}
    for row in rows:
        measured = row["step"] % M == 0
        counts = [row[f"heldout_count/{t}"] for t in tasks]
        assert counts == ([signal[t].num_rows for t in tasks] if measured else [0, 0, 0])
        assert row[f"sum_specialist_loss/{WEAK}"] == 0.0  # the weak task's target is 0 in training ...
        assert row[f"heldout_sum_specialist_loss/{WEAK}"] == 0.0  # ... and in the held-out signal
        if not measured:
            assert [row[f"g_hat/{t}"] for t in tasks] == [0.0] * 3
            continue
        # g_hat = m x the held-out mean clipped excess (clip per_example)
        expected = [M * row[f"heldout_sum_clipped_excess/{t}"] / row[f"heldout_count/{t}"] for t in tasks]
        np.testing.assert_allclose([row[f"g_hat/{t}"] for t in tasks], expected, rtol=1e-12)
    first = rows[0]
    for i, t in enumerate(tasks):
        # Before the first update the policy is the base, its own reference: every loss is log 2 ...
        assert first[f"heldout_sum_loss/{t}"] == pytest.approx(signal[t].num_rows * math.log(2), rel=1e-4)
        # ... and the specialists' losses are the signal rows' scores (0 for the weak task).
        spec = 0.0 if i == weak else pc.sum(signal[t]["specialist_loss"]).as_py()
        assert first[f"heldout_sum_specialist_loss/{t}"] == pytest.approx(spec, rel=1e-5)
    # alpha changes only after measured steps
    alphas = np.array([[r[f"alpha/{t}"] for t in tasks] for r in rows])
    moved = np.flatnonzero(np.any(alphas[1:] != alphas[:-1], axis=1)) + 1
    assert set(moved.tolist()) <= {1, 1 + M, 1 + 2 * M, 1 + 3 * M} and len(moved) >= 2
    final = manifest["final_metrics"]
    assert final["check/heldout_seconds"] > 0 and 0 < final["check/heldout_share"] < 1
    # The recorded statistics, replayed through a fresh policy, give every alpha exactly.
    policy = make_policy("ama_h", tasks, train_sizes(run, cfg), MixingSettings(**cfg.mixing.to_dict()))
    for row in rows:
        assert [row[f"alpha/{t}"] for t in tasks] == policy.weights().tolist()
        keys = ("sum_loss", "sum_specialist_loss", "sum_clipped_excess", "count")
        stats = {k: [row[f"{k}/{t}"] for t in tasks] for k in keys}
        if policy.wants_heldout(policy.step):
            stats.update({f"heldout_{k}": [row[f"heldout_{k}/{t}"] for t in tasks] for k in keys})
        policy.update(stats)


def test_ama_h_needs_a_signal_split_and_a_specialist_free_target_is_refused(minimal_cfg, tmp_path):
    from ama_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="data.signal_fraction"):
        _cfg(minimal_cfg, tmp_path, "data.signal_fraction=0")
    with pytest.raises(ConfigError, match="mixing.excess_target"):
        _cfg(minimal_cfg, tmp_path, "mixing.excess_target=history")
    assert _cfg(minimal_cfg, tmp_path).splits == ("train", "validation", "test", "signal")


# jobs/minimal.yaml's hashes as commit 4f9d436 (before signal_fraction, heldout_every and on_weak) made them
OLD_PREPARE = "fd42a43c101e9d17"
OLD_GENERALIST = "fd42a43c101e9d17-502f5dc75e19234c-f2-8fbb119c392b2cfe-6eca9fe05ddd56d1-61eff3e0aee9e3c4-ama_s-0"
OLD_STUDY = "fd42a43c101e9d17-502f5dc75e19234c-f2-8fbb119c392b2cfe-40fb785eab6eab07"


def test_new_settings_leave_older_hashes_alone(minimal_cfg):
    """data.signal_fraction at 0, heldout_every without ama_h and on_weak never enter a section hash,
    so every unit committed before they existed stays valid; a weak task enters a generalist's hash
    only when its algorithm reads the target."""
    from ama_ray.stages.generalist import generalist_hash
    from ama_ray.stages.prepare import prepare_hash
    from ama_ray.stages.tune import study_hash

    assert (prepare_hash(minimal_cfg), generalist_hash(minimal_cfg, "ama_s", 0), study_hash(minimal_cfg)) == \
        (OLD_PREPARE, OLD_GENERALIST, OLD_STUDY)
    other = minimal_cfg.model_copy(deep=True)
    other.mixing.heldout_every = 3
    other.specialists.on_weak = "stop"
    assert (prepare_hash(other), generalist_hash(other, "ama_s", 0), study_hash(other)) == (OLD_PREPARE, OLD_GENERALIST, OLD_STUDY)
    signal = minimal_cfg.model_copy(deep=True)
    signal.data.signal_fraction = 0.1
    assert prepare_hash(signal) != OLD_PREPARE
    other.tune.search_space = {"algorithm": {"choice": ["ama_s", "ama_h"]}}  # ama_h in a study: heldout_every counts
    assert study_hash(other) != study_hash(minimal_cfg.model_copy(update={"tune": other.tune}))
    assert generalist_hash(minimal_cfg, "ama_s", 0, ["refusal"]) == OLD_GENERALIST + "-raw:refusal"
    assert generalist_hash(minimal_cfg, "balanced", 0, ["refusal"]) == generalist_hash(minimal_cfg, "balanced", 0)
    assert study_hash(minimal_cfg, ["refusal"]) == OLD_STUDY + "-raw:refusal"
