"""The run directory cannot be escaped or half-committed (issue 20): `.`/`..` names are refused,
a manifest is written atomically, an unreadable one means "not committed", and a task that drew
no examples in a step reports no per-task numbers instead of NaN."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch

from ama_ray.config import validate
from ama_ray.errors import ConfigError, StorageError
from ama_ray.storage import MANIFEST, RunDir

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("override", [{"data": {"tasks": [{"name": "..", "benchmark": "brackets"}]}},
                                      {"data": {"tasks": [{"name": ".", "benchmark": "brackets"}]}},
                                      {"data": {"tasks": [{"name": "a", "benchmark": "brackets"}]}, "storage": {"run_name": ".."}}])
def test_dot_names_are_refused_when_the_config_loads(override):
    with pytest.raises(ConfigError, match="name"):
        validate(override)


def test_a_unit_never_resolves_outside_the_run(tmp_path):
    run = RunDir(str(tmp_path / "runs" / "r"))
    assert run.unit("prepared", "a").path == str(tmp_path / "runs" / "r" / "prepared" / "a")
    for parts in (("prepared", ".."), ("..",), ("prepared", "..", "..", "x"), ("/etc",)):
        with pytest.raises(StorageError, match="outside the run directory"):
            run.unit(*parts)


def test_an_unreadable_manifest_is_not_a_commit(tmp_path, caplog):
    unit = RunDir(str(tmp_path)).prepared("a")
    unit.begin()
    unit.commit("h1", rows={"train": 1})
    assert unit.is_committed("h1")
    with open(unit.file(MANIFEST), "w") as f:
        f.write('{"config_hash": "h1", "rows"')  # a crash mid-write on a filesystem without atomic rename
    with caplog.at_level(logging.WARNING, logger="ama_ray.storage"):
        assert unit.manifest() is None and not unit.is_committed("h1")
    assert "unreadable" in caplog.text and "redone" in caplog.text


def test_rewriting_the_evaluation_keeps_its_committed_model_results(tmp_path):
    """`begin(keep_nested=True)`: the evaluation's own files and manifest go, a committed per-model
    unit inside it stays committed, and a half-written one goes with the rest."""
    run = RunDir(str(tmp_path))
    evaluation, done, half = run.evaluation(), run.evaluated_model("generalist/ama_s/seed0"), run.evaluated_model("base")
    assert done.path == str(tmp_path / "eval" / "models" / "generalist" / "ama_s" / "seed0")
    for unit in (evaluation, done, half):
        unit.begin()
        unit.write_json("result.json", {"unit": unit.label})
    done.commit("m1")
    evaluation.write_json("metrics.json", {"models": 1})
    evaluation.commit("e1")
    assert set(evaluation.manifest()["files"]) == {"metrics.json", "result.json", "models/base/result.json"}
    evaluation.begin(keep_nested=True)
    assert not evaluation.is_committed() and not os.path.exists(evaluation.file("metrics.json"))
    assert not os.path.exists(half.file("result.json"))
    assert done.is_committed("m1") and done.read_json("result.json") == {"unit": "eval/models/generalist/ama_s/seed0"}
    evaluation.begin()  # without keep_nested, everything
    assert not done.is_committed() and os.listdir(evaluation.path) == []


def test_a_local_commit_is_all_or_nothing(tmp_path, monkeypatch):
    unit = RunDir(str(tmp_path)).prepared("a")
    unit.begin()

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        unit.commit("h1", rows={"train": 1})
    assert not os.path.exists(unit.file(MANIFEST)) and unit.manifest() is None
    monkeypatch.undo()
    unit.commit("h1", rows={"train": 1})
    assert json.loads(open(unit.file(MANIFEST)).read())["config_hash"] == "h1"
    assert sorted(os.listdir(unit.path)) == [MANIFEST]  # no temporary file left behind


def test_a_task_without_examples_in_a_step_has_no_per_task_numbers():
    from ama_ray.train.metrics import ROW, SUM_KEYS, metrics_from_sums

    sums = torch.zeros(len(SUM_KEYS), 2, dtype=torch.float64)
    sums[ROW["count"], 0], sums[ROW["loss"], 0] = 4, 2.0
    metrics = metrics_from_sums(sums, ["drawn", "absent"], "train")
    assert metrics["train/loss/drawn"] == 0.5 and "train/loss/absent" not in metrics
    assert metrics["train/loss/mean"] == 0.5 and metrics["train/loss/worst"] == 0.5
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in metrics.values())


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    import subprocess
    import sys
    import time

    root = tmp_path / "runs"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ama_ray.storage import RunDir; "
        f"RunDir({str(root / 'minimal')!r}).lock('ama-ray specialists'); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StorageError, match=f"another ama-ray is writing this run directory \\(pid {holder.pid} .*ama-ray specialists"):
            RunDir(str(root / "minimal")).lock("ama-ray generalist")
        from ama_ray.cli import main

        assert main(["prepare", "--config", "jobs/minimal.yaml", f"storage.path={root}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"pid {holder.pid}" in err and "another storage.run_name" in err
        RunDir(str(root / "other")).lock("ama-ray prepare")  # another run directory is free
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    RunDir(str(root / "minimal")).lock("ama-ray generalist")  # the holder is gone: the lock is free
    RunDir(str(root / "minimal")).lock("ama-ray evaluate")  # and re-entrant within a process


def test_a_non_finite_step_stops_every_rank_naming_the_unit_step_and_task():
    from types import SimpleNamespace

    from ama_ray.errors import NumericalError
    from ama_ray.train.loop import Job
    from ama_ray.train.metrics import ROW, SUM_KEYS

    job = SimpleNamespace(tasks=["math", "code"], spec=SimpleNamespace(out_unit=["generalist", "ama_s", "seed0"]))
    sums = torch.ones(len(SUM_KEYS), 2, dtype=torch.float64)
    Job.check_finite(job, 4, sums)  # finite: nothing happens
    sums[ROW["loss"], 1] = math.nan
    with pytest.raises(NumericalError, match=r"generalist/ama_s/seed0: non-finite loss or statistic at step 5 for task\(s\) code"):
        Job.check_finite(job, 4, sums)


def test_a_non_finite_gradient_stops_before_the_optimizer_step():
    from ama_ray.train.engine import Engine

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine = Engine(module=model, bare=model, optimizer=optimizer,
                    scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), max_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.tensor([[1.0, 2.0, math.inf]])).sum()).backward()
    seen = []

    def stop(norm):
        seen.append(norm)
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        engine.step(on_nonfinite=stop)
    assert len(seen) == 1 and not math.isfinite(seen[0])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_non_finite_reference_or_specialist_numbers_are_refused_when_read(tmp_path):
    import pyarrow as pa

    from ama_ray.errors import StageInputError
    from ama_ray.train.data import ShardStream, TableSource, check_finite

    table = pa.table({"example_id": ["a", "b"], "ref_chosen_logps": pa.array([-3.0, math.nan], pa.float32())})
    with pytest.raises(StageInputError, match="ref_chosen_logps is not finite .* example b"):
        check_finite(table, "reference/t/train.parquet")
    with pytest.raises(StageInputError, match="training rows of task 't'"):
        ShardStream("t", TableSource(table), seed=0).take(1)


def test_a_unit_of_other_settings_is_not_replaced_without_force(tmp_path):
    from ama_ray.errors import StageInputError
    from ama_ray.stages import needs_work

    unit = RunDir(str(tmp_path)).specialist("math")
    assert needs_work(unit, "h1", "specialists", set())  # nothing committed yet
    unit.begin()
    unit.commit("h1")
    assert not needs_work(unit, "h1", "specialists", set())  # committed with these settings: skipped
    with pytest.raises(StageInputError, match="specialists/math was committed with other settings.*--force specialists"):
        needs_work(unit, "h2", "specialists", set())
    assert needs_work(unit, "h2", "specialists", {"specialists"})
    assert needs_work(unit, "h2", "specialists", {"reference"})  # an earlier stage redone: this one follows
    with pytest.raises(StageInputError):
        needs_work(unit, "h2", "specialists", {"generalist"})  # a later stage's force does not reach back


@pytest.mark.timeout(900)
def test_a_job_with_other_settings_under_the_same_run_name_asks_for_force(tiny_run, tmp_path, capsys):
    """`jobs/tune_mixing.yaml` (dpo.sft_weight 0) used to retrain `jobs/laptop.yaml`'s specialists
    (0.1) under the same run_name: now the command stops before touching them."""
    import shutil

    from ama_ray.cli import main

    cfg, src = tiny_run
    root = tmp_path / "runs"
    shutil.copytree(src, root / cfg.storage.run_name, ignore=shutil.ignore_patterns("_checkpoints", "tensorboard"))
    before = {p: p.read_text() for p in root.rglob("_manifest.json")}
    args = ["specialists", "--config", "jobs/minimal.yaml", f"storage.path={root}", f"model.cache_dir={cfg.model.cache_dir}",
            f"dpo.sft_weight={cfg.dpo.sft_weight + 0.5}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "committed with other settings" in err and "--force specialists" in err
    assert {p: p.read_text() for p in root.rglob("_manifest.json")} == before
