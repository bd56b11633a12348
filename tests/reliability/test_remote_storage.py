"""A run directory on an S3-compatible store behaves like a local one: checkpoint markers and
cleanup go through `pyarrow.fs`, so a changed config or `--force` trains afresh and never resumes
the old weights. The store is moto's S3 server, started by the test on loopback; the Ray Train
workers, Ray Data readers and the driver all reach it through the URI's options."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid

import pyarrow.fs as pafs
import pytest
from safetensors.torch import load as load_safetensors

from ama_ray.storage import RunDir
from tests.reliability.test_faults import assert_same_weights, copy_run, derived, _base

BUCKET = "ama"


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("moto", reason="moto's S3 server (the test extra) is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        yield f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1&allow_bucket_creation=true"
    finally:
        server.terminate()
        server.wait(timeout=10)


def _remote_weights(run: RunDir, task: str) -> dict:
    with run.fs.open_input_stream(run.specialist(task).file("model/model.safetensors")) as f:
        return load_safetensors(f.read())


@pytest.mark.timeout(420)
def test_changed_config_and_force_never_resume_old_checkpoints_on_s3(tiny_run, tmp_path, monkeypatch, s3_endpoint):
    from ama_ray.stages.specialists import specialist_hash, train_specialist

    cfg0, run_dir = tiny_run
    local = copy_run(run_dir, tmp_path)
    storage = f"s3://key:secret@{BUCKET}/{uuid.uuid4().hex[:8]}/runs?{s3_endpoint}"  # fault markers are per run root
    short = ["specialists.optim.checkpoint_every=5", "scaling.max_failures=0"]
    cfg_a = derived(cfg0, tmp_path, *short)
    cfg_a = cfg_a.model_copy(update={"storage": cfg_a.storage.model_copy(update={"path": storage})})
    cfg_b = derived(cfg_a, tmp_path, *short, "specialists.optim.lr=0.003")
    cfg_b = cfg_b.model_copy(update={"storage": cfg_b.storage.model_copy(update={"path": storage})})
    run = RunDir(cfg_a.run_dir)
    assert not run.is_local and run.root.startswith(f"{BUCKET}/") and run.root.endswith(f"/runs/{local.name}")
    run.fs.create_dir(BUCKET)
    for stage in ("prepared", "reference"):
        pafs.copy_files(str(local / stage), f"{run.root}/{stage}", destination_filesystem=run.fs)
    model_path, steps = _base(local), 20
    digest_a, digest_b = specialist_hash(cfg_a), specialist_hash(cfg_b)
    assert digest_a != digest_b
    unit = run.specialist("refusal")
    folder = run.checkpoint_dir("specialists", unit)

    # Config A is killed at step 12: its step-5 and step-10 checkpoints stay on the store.
    monkeypatch.setenv("AMA_RAY_FAULT", "kill:rank=0:step=12")
    with pytest.raises(Exception):
        train_specialist(cfg_a, "refusal", steps, model_path, digest_a, force=False)
    monkeypatch.delenv("AMA_RAY_FAULT")
    left = sorted(i.base_name for i in run.fs.get_file_info(pafs.FileSelector(folder)) if i.base_name.startswith("step_"))
    assert left == ["step_000005", "step_000010"], left

    # Config B must start from step 0, not from A's step 10.
    train_specialist(cfg_b, "refusal", steps, model_path, digest_b, force=False)
    assert unit.manifest()["final_metrics"]["check/resumed_at_step"] == 0
    first_b = _remote_weights(run, "refusal")

    # --force with the same config trains again from step 0 to the same weights (not B's step 20 resumed).
    train_specialist(cfg_b, "refusal", steps, model_path, digest_b, force=True)
    assert unit.manifest()["final_metrics"]["check/resumed_at_step"] == 0
    assert_same_weights(_remote_weights(run, "refusal"), first_b)


@pytest.mark.timeout(60)
def test_rewriting_the_evaluation_keeps_committed_model_results_on_s3(s3_endpoint):
    """`Unit.begin(keep_nested=True)` on an object store, where folders are only key prefixes: the
    evaluation's own files and manifest go, a committed per-model unit inside it stays."""
    run = RunDir(f"s3://key:secret@{BUCKET}/{uuid.uuid4().hex[:8]}/runs/r?{s3_endpoint}")
    run.fs.create_dir(BUCKET)
    evaluation, done = run.evaluation(), run.evaluated_model("merged/ties")
    for unit in (evaluation, done):
        unit.begin()
        unit.write_json("result.json", {"unit": unit.label})
    done.commit("m1")
    evaluation.write_json("metrics.json", {})
    evaluation.commit("e1")
    assert set(evaluation.manifest()["files"]) == {"metrics.json", "result.json"}
    evaluation.begin(keep_nested=True)
    assert not evaluation.is_committed() and not evaluation.exists("metrics.json") and not evaluation.exists("result.json")
    assert done.is_committed("m1") and done.read_json("result.json") == {"unit": "eval/models/merged/ties"}
