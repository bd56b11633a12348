"""What a run directory's bytes are checked against: manifests record each file's size and
sha256, checkpoints record what each rank wrote, and a damaged file is never used.

- a committed unit whose file changed size counts as not committed (redone, with a warning);
  `ama-ray verify RUN_DIR` (the real CLI) reads every byte and names a same-size change;
- a checkpoint file that differs from its record, or that no rank of the run wrote (a planted
  DeepSpeed `.pt` pickle), is never loaded: resume falls back to the previous checkpoint and
  the finished specialist equals an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ama_ray.storage import RunDir
from ama_ray.train import checkpointing
from tests.reliability.test_faults import assert_same_weights, copy_run, derived, weights, _base

ROOT = Path(__file__).resolve().parents[2]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_sizes_guard_skips_and_verify_reads_every_byte(tiny_run, tmp_path, caplog):
    _, run_dir = tiny_run
    run_path = copy_run(run_dir, tmp_path)
    run = RunDir(str(run_path))
    unit = run.prepared("arithmetic")
    recorded = unit.manifest()["files"]
    assert set(recorded) == {"train.parquet", "validation.parquet", "test.parquet"}
    assert recorded["train.parquet"]["size"] == (run_path / "prepared" / "arithmetic" / "train.parquet").stat().st_size

    cli = [sys.executable, "-m", "ama_ray.cli", "verify", run_path.name]
    ok = subprocess.run(cli, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "DAMAGED" not in ok.stdout and "intact" in ok.stdout

    # Same size, other bytes: a skip does not read them, `verify` does.
    _flip_last_byte(run_path / "specialists" / "refusal" / "model" / "model.safetensors")
    assert run.specialist("refusal").manifest() is not None
    bad = subprocess.run(cli, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "DAMAGED specialists/refusal: model/model.safetensors changed" in bad.stdout
    assert "--force" in bad.stderr

    # Another size: the unit is no longer committed, so the stage redoes it.
    with open(run_path / "prepared" / "arithmetic" / "train.parquet", "ab") as f:
        f.write(b"\0")
    with caplog.at_level(logging.WARNING, logger="ama_ray.storage"):
        assert unit.manifest() is None
    assert "train.parquet has" in caplog.text and "redone" in caplog.text


def test_checkpoint_digests_refuse_changed_and_foreign_files(tmp_path):
    ckpt = tmp_path / "step_000010"
    (ckpt / "engine").mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    (ckpt / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"rank0 weights")
    checkpointing.record_digests(ckpt, 0)
    other = tmp_path / "rank1"
    (other / "engine").mkdir(parents=True)
    (other / "engine" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"rank1 shard")
    checkpointing.record_digests(other, 1)
    shutil.copytree(other, ckpt, dirs_exist_ok=True)  # what Ray Train's merge of the ranks' folders does
    assert checkpointing.problems(ckpt) == []

    (ckpt / "engine" / "evil.pt").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    assert checkpointing.problems(ckpt) == ["engine/evil.pt was not written by this run"]
    (ckpt / "engine" / "evil.pt").unlink()
    _flip_last_byte(ckpt / "engine" / "zero_pp_rank_1_optim_states.pt")
    assert checkpointing.problems(ckpt) == ["engine/zero_pp_rank_1_optim_states.pt changed since it was written (sha256 differs)"]
    (ckpt / "state.json").unlink()
    assert "state.json is missing" in checkpointing.problems(ckpt)
    shutil.rmtree(ckpt / checkpointing.DIGESTS)
    assert "no digests recorded" in checkpointing.problems(ckpt)[0]


@pytest.mark.timeout(300)
def test_corrupt_checkpoint_falls_back_to_the_previous_one(tiny_run, tmp_path, monkeypatch):
    from ama_ray.errors import AmaError
    from ama_ray.stages.specialists import specialist_hash, train_specialist

    cfg0, run_dir = tiny_run
    run = copy_run(run_dir, tmp_path)
    cfg = derived(cfg0, tmp_path, "specialists.optim.checkpoint_every=10", "scaling.max_failures=0")
    model_path, digest = _base(run), specialist_hash(cfg)
    unit = RunDir(str(run)).specialist("refusal")
    train_specialist(cfg, "refusal", 30, model_path, digest, force=True)
    clean = weights(run / "specialists" / "refusal" / "model")

    # Killed at step 25 with no retries: checkpoints of steps 10 and 20 are left, nothing committed.
    monkeypatch.setenv("AMA_RAY_FAULT", "kill:rank=0:step=25")
    with pytest.raises(Exception):
        train_specialist(cfg, "refusal", 30, model_path, digest, force=True)
    monkeypatch.delenv("AMA_RAY_FAULT")
    folder = run / "_checkpoints" / "specialists" / "refusal"
    assert sorted(p.name for p in folder.glob("step_*")) == ["step_000010", "step_000020"]
    assert unit.manifest() is None

    _flip_last_byte(folder / "step_000020" / "model.safetensors")
    train_specialist(cfg, "refusal", 30, model_path, digest, force=False)
    assert unit.manifest()["final_metrics"]["check/resumed_at_step"] == 10
    assert_same_weights(weights(run / "specialists" / "refusal" / "model"), clean)

    # With no intact checkpoint left, the run stops with one clear error instead of loading one.
    for ckpt in folder.glob("step_*"):
        with open(ckpt / "model.safetensors", "r+b") as f:
            f.truncate(100)
    unit.begin()
    with pytest.raises(AmaError, match="no intact checkpoint"):
        train_specialist(cfg, "refusal", 30, model_path, digest, force=False)
