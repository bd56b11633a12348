"""Relative paths mean the directory the command ran from, resolved once on the driver; workers
refuse relative paths; configs hash what a path holds, not where it is (issue 15)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from ama_ray.config import load_config
from ama_ray.errors import ConfigError

JOB = {
    "model": {"name": "./models/base", "cache_dir": "cache"},
    "data": {"tasks": [
        {"name": "a", "path": "data/a.jsonl"},
        {"name": "b", "hf_dataset": {"path": "json", "data_files": {"train": "data/b.jsonl", "test": ["data/c.jsonl"]}}},
        {"name": "c", "hf_dataset": {"path": "./data/hfdir", "split": "train"}},
        {"name": "d", "benchmark": "brackets"},
        {"name": "e", "hf_dataset": {"path": "Anthropic/hh-rlhf", "data_files": "s3://bucket/x.jsonl"}},
    ]},
    "storage": {"path": "./runs"},
}


@pytest.fixture
def job_dir(tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "job.yaml").write_text(yaml.safe_dump(JOB))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path, work


def test_every_relative_path_means_the_working_directory(job_dir):
    root, work = job_dir
    cfg = load_config("../jobs/job.yaml")  # --config itself is relative too
    assert cfg.storage.path == str(work / "runs") and cfg.run_dir == str(work / "runs" / "laptop")
    assert cfg.model.cache_dir == str(work / "cache")
    assert cfg.model.name == str(work / "models" / "base")
    a, b, c, d, e = cfg.data.tasks
    assert a.path == str(work / "data" / "a.jsonl")  # not against the job file's folder
    assert b.hf_dataset["data_files"] == {"train": str(work / "data" / "b.jsonl"), "test": [str(work / "data" / "c.jsonl")]}
    assert b.hf_dataset["path"] == "json"  # a builder name, not a path
    assert c.hf_dataset["path"] == str(work / "data" / "hfdir")
    assert e.hf_dataset == {"path": "Anthropic/hh-rlhf", "data_files": "s3://bucket/x.jsonl"}  # hub id and URI untouched
    assert d.benchmark == "brackets" and d.path is None
    cfg.require_resolved("a test")  # nothing left relative


def test_home_uris_and_builtin_names(job_dir, monkeypatch):
    _, work = job_dir
    (work / "tiny").mkdir()  # a folder named like a built-in model does not capture the name
    cfg = load_config("../jobs/job.yaml", ["storage.path=s3://bucket/runs", "model.name=tiny", "model.cache_dir=~/mc"])
    assert cfg.storage.path == "s3://bucket/runs" and cfg.run_dir == "s3://bucket/runs/laptop"
    assert cfg.model.name == "tiny" and cfg.model.cache_dir == os.path.expanduser("~/mc")
    hub = load_config("../jobs/job.yaml", ["model.name=HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert hub.model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def _relative_cfg():
    from ama_ray.config import validate

    return validate({"data": {"tasks": [{"name": "a", "benchmark": "brackets"}]}, "storage": {"path": "./runs"}})


def test_workers_refuse_relative_paths():
    from ama_ray.stages.evaluate import evaluate_model
    from ama_ray.stages.inference import LogpScorer
    from ama_ray.stages.prepare import Tokenize
    from ama_ray.storage import RunDir
    from ama_ray.train.loop import UnitSpec, train_loop_per_worker

    cfg = _relative_cfg()  # validated without load_config: storage.path stays "./runs"
    spec = UnitSpec(cfg=cfg.model_dump(mode="json"), kind="specialist", tasks=["a"], algorithm="specialist", seed=0,
                    steps=1, model_path="/abs/model", out_unit=["specialists", "a"])
    with pytest.raises(ConfigError, match="storage.path.*Ray Train worker.*relative"):
        train_loop_per_worker(spec.to_dict())
    absolute = cfg.resolve_paths("/somewhere").model_dump(mode="json")
    spec.cfg, spec.model_path = absolute, "./models/base"
    with pytest.raises(ConfigError, match="model.name.*Ray Train worker"):
        train_loop_per_worker(spec.to_dict())
    with pytest.raises(ConfigError, match="inference actor"):
        LogpScorer("./models/base", "float32", False, 1, None, 8)
    with pytest.raises(ConfigError, match="tokenizing actor"):
        Tokenize("../base", False, 8, 8)
    with pytest.raises(ConfigError, match="evaluation task"):
        evaluate_model("runs/x", {"path": "/abs", "unit": None}, [], {})
    with pytest.raises(ConfigError, match="run directory"):
        RunDir("runs/x")


def test_the_driver_refuses_an_unresolved_config():
    from ama_ray.stages import open_run

    with pytest.raises(ConfigError, match="storage.path"):
        open_run(_relative_cfg())


def test_hash_covers_what_files_hold_not_where_they_are(tmp_path):
    from ama_ray.config import validate

    def cfg_at(folder: Path):
        raw = {"model": {"name": str(folder / "model")},
               "data": {"tasks": [{"name": "a", "path": str(folder / "a.jsonl")},
                                  {"name": "b", "hf_dataset": {"path": "json", "data_files": [str(folder / "b.jsonl")]}}]}}
        return validate(raw)

    one = tmp_path / "one"
    (one / "model").mkdir(parents=True)
    (one / "model" / "config.json").write_text('{"model_type": "llama"}')
    (one / "a.jsonl").write_text('{"prompt": "x", "chosen": "y", "rejected": "z"}\n')
    (one / "b.jsonl").write_text('{"prompt": "p", "chosen": "q", "rejected": "r"}\n')
    two = tmp_path / "two"
    shutil.copytree(one, two)
    sections = ("model.name", "data")
    assert cfg_at(one).section_hash(*sections) == cfg_at(two).section_hash(*sections)
    (two / "a.jsonl").write_text('{"prompt": "x", "chosen": "y", "rejected": "ww"}\n')
    assert cfg_at(one).section_hash(*sections) != cfg_at(two).section_hash(*sections)
    shutil.copy(one / "a.jsonl", two / "a.jsonl")
    (two / "model" / "config.json").write_text('{"model_type": "qwen2"}')
    assert cfg_at(one).section_hash(*sections) != cfg_at(two).section_hash(*sections)
