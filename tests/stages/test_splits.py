"""Train, validation and test splits (issue 16): deterministic by example id and seed, minimum
sizes with an error naming the task, old two-split run directories refused in one line."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from ama_ray.cli import main
from ama_ray.config import DataConfig, validate
from ama_ray.errors import ConfigError, DataError
from ama_ray.stages.prepare import assign_splits, heldout_sizes

pytestmark = pytest.mark.timeout(120)


def _data(**kw) -> DataConfig:
    return DataConfig(tasks=[{"name": "t", "benchmark": "brackets"}], **kw)


def test_assignment_is_disjoint_deterministic_and_independent_of_row_order():
    ids = [f"id{i:04d}" for i in range(500)]
    one = assign_splits(ids, seed=0, n_val=40, n_test=60)
    assert one == assign_splits(list(reversed(ids)), seed=0, n_val=40, n_test=60)
    counts = {s: sum(v == s for v in one.values()) for s in ("train", "validation", "test")}
    assert counts == {"train": 400, "validation": 40, "test": 60}
    other = assign_splits(ids, seed=1, n_val=40, n_test=60)
    assert {i for i, s in one.items() if s == "test"} != {i for i, s in other.items() if s == "test"}  # the seed matters


def test_a_signal_split_comes_out_of_training_and_leaves_validation_and_test_alone():
    ids = [f"id{i:04d}" for i in range(500)]
    plain = assign_splits(ids, seed=0, n_val=40, n_test=60)
    signal = assign_splits(ids, seed=0, n_val=40, n_test=60, n_signal=50)
    assert {s: sum(v == s for v in signal.values()) for s in ("train", "validation", "test", "signal")} == \
        {"train": 350, "validation": 40, "test": 60, "signal": 50}
    assert all(signal[i] == plain[i] for i in ids if plain[i] != "train")  # the same validation and test examples
    assert all(plain[i] == "train" for i in ids if signal[i] == "signal")
    data = _data(validation_fraction=0.1, test_fraction=0.1, signal_fraction=0.05, min_heldout_examples=30)
    assert heldout_sizes(1000, data, "t", "w") == (100, 100, 50)
    assert heldout_sizes(1000, _data(validation_fraction=0.1, test_fraction=0.1), "t", "w") == (100, 100)
    with pytest.raises(DataError, match="30 validation and 30 test and 30 signal"):
        heldout_sizes(90, data, "t", "w")
    with pytest.raises(ConfigError, match="validation_fraction \\+ test_fraction \\+ signal_fraction = 1 leaves no training data"):
        validate({"data": {"tasks": [{"name": "t", "benchmark": "brackets"}], "validation_fraction": 0.4, "test_fraction": 0.4,
                           "signal_fraction": 0.2}})


def test_heldout_sizes_fraction_minimum_and_cap():
    data = _data(validation_fraction=0.1, test_fraction=0.2, min_heldout_examples=30, max_heldout_examples=150)
    assert heldout_sizes(1000, data, "t", "w") == (100, 150)  # 10 %; 20 % capped at 150
    assert heldout_sizes(200, data, "t", "w") == (30, 40)  # 10 % = 20 raised to the minimum
    with pytest.raises(DataError) as err:
        heldout_sizes(60, data, "brackets", "benchmark:brackets")
    assert "task 'brackets' has 60 usable rows" in str(err.value) and "data.min_heldout_examples" in str(err.value)


def test_config_refuses_old_keys_and_impossible_fractions():
    base = {"tasks": [{"name": "t", "benchmark": "brackets"}]}
    with pytest.raises(ConfigError, match="data.eval_fraction was replaced by data.validation_fraction and data.test_fraction"):
        validate({"data": {**base, "eval_fraction": 0.1}})
    with pytest.raises(ConfigError, match="max_heldout_examples"):
        validate({"data": {**base, "max_eval_examples": 10}})
    with pytest.raises(ConfigError, match="leaves no training data"):
        validate({"data": {**base, "validation_fraction": 0.5, "test_fraction": 0.5}})
    with pytest.raises(ConfigError, match="min_heldout_examples 90 is above max_heldout_examples 80"):
        validate({"data": {**base, "min_heldout_examples": 90, "max_heldout_examples": 80}})


def test_adding_a_task_does_not_reshuffle_another(ray_session, model_cache, tmp_path):
    from ama_ray.stages import prepare

    def prepared(run_name: str, tasks: list[dict]):
        cfg = validate({"data": {"tasks": tasks, "min_heldout_examples": 20},
                        "storage": {"path": str(tmp_path), "run_name": run_name}, "model": {"cache_dir": model_cache}})
        prepare.run(cfg)
        unit = tmp_path / run_name / "prepared" / "brackets"
        return {s: pq.read_table(unit / f"{s}.parquet")["example_id"].to_pylist() for s in ("train", "validation", "test")}

    brackets = {"name": "brackets", "benchmark": "brackets", "size": 300}
    alone = prepared("alone", [brackets])
    together = prepared("together", [{"name": "sums", "benchmark": "arithmetic", "size": 300}, brackets])
    assert alone == together
    assert [len(alone[s]) for s in ("train", "validation", "test")] == [240, 30, 30]
    assert not set(alone["train"]) & set(alone["validation"]) and not set(alone["validation"]) & set(alone["test"])


def _old_run(tmp_path) -> str:
    """A run directory prepared by an older ama_ray: train and eval only."""
    unit = tmp_path / "runs" / "old" / "prepared" / "t"
    unit.mkdir(parents=True)
    (unit / "_manifest.json").write_text(json.dumps({"config_hash": "x", "rows": {"train": 90, "eval": 10}}))
    return str(tmp_path / "runs")


def test_old_two_split_run_directories_fail_in_one_line(tmp_path, capsys):
    root = _old_run(tmp_path)
    overrides = [f"storage.path={root}", "storage.run_name=old", "data.tasks=[{name: t, benchmark: brackets}]"]
    assert main(["reference", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "older ama_ray" in err and "--force prepare" in err
    from ama_ray.storage import RunDir
    from ama_ray.train.data import load_task_split

    with pytest.raises(Exception, match="--force prepare"):
        load_task_split(RunDir(f"{root}/old"), "t", "validation", with_scores=False)


def test_old_evaluations_fail_in_one_line(tmp_path, capsys):
    unit = tmp_path / "old" / "eval"
    unit.mkdir(parents=True)
    (unit / "metrics.json").write_text(json.dumps({"schema_version": 1}))
    (unit / "_manifest.json").write_text("{}")
    assert main(["compare", str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train/eval split" in err and "--force prepare" in err
