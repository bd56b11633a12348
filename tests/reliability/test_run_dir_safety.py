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
