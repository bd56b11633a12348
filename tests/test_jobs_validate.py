"""Every job file resolves, fits the cluster in cluster.yaml, and names data the readers understand."""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path

import pytest
import yaml

from ama_ray.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
SHARED_MOUNT = "/mnt/shared"  # what cluster.yaml's setup commands mount on every node


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _capacity(cluster: dict) -> dict:
    """The largest cluster cluster.yaml can scale to: per-node and total CPUs and GPUs."""
    types = cluster["available_node_types"]
    nodes = [types[cluster["head_node_type"]]["resources"]]
    for name, node in types.items():
        if name != cluster["head_node_type"]:
            nodes += [node["resources"]] * node["max_workers"]
    return {
        "node_cpu": max(n.get("CPU", 0) for n in nodes), "node_gpu": max(n.get("GPU", 0) for n in nodes),
        "cpu": sum(n.get("CPU", 0) for n in nodes), "gpu": sum(n.get("GPU", 0) for n in nodes),
    }


def test_cluster_yaml_passes_rays_launcher_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = _cluster()
    prepared = prepare_config(copy.deepcopy(cluster))  # fills the AWS defaults as `ray up` does
    validate_config(prepared)  # Ray's JSON schema + its own cross-field checks; raises on error
    head = cluster["available_node_types"][cluster["head_node_type"]]
    gpu_types = [t for n, t in cluster["available_node_types"].items() if n != cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is CPU-only"
    assert len(gpu_types) == 1 and gpu_types[0]["resources"]["GPU"] > 0
    assert 0 <= gpu_types[0]["min_workers"] <= gpu_types[0]["max_workers"] <= cluster["max_workers"]
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start, "dashboard only through `ray dashboard` port forwarding"
    setup = " ".join(cluster["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install" in setup and SHARED_MOUNT in setup


def test_launcher_validation_rejects_a_broken_cluster_file():
    """The validation above can fail: the same code refuses typos and impossible worker counts."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    typo = _cluster()
    typo["max_worker"] = typo.pop("max_workers")
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(typo))
    too_many = _cluster()
    for name, node in too_many["available_node_types"].items():
        if name != too_many["head_node_type"]:
            node["min_workers"] = too_many["max_workers"] + 1
    with pytest.raises(ValueError, match="min_workers"):
        validate_config(prepare_config(too_many))


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_job_resolves_and_fits_the_cluster(job):
    cfg = load_config(job)
    cap = _capacity(_cluster())
    problems = resource_problems(cfg, cap)
    assert not problems, f"{job.name}: " + "; ".join(problems)
    if cfg.scaling.use_gpu:
        # Several nodes write one run directory: it must be on the shared mount or an object store.
        for key, value in (("storage.path", cfg.storage.path), ("model.cache_dir", cfg.model.cache_dir)):
            assert value.startswith(SHARED_MOUNT) or "://" in value, f"{job.name}: {key}={value} is node-local"


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_job_dataset_specs_parse(job):
    import datasets

    from ama_ray.data.benchmark import TASKS as BENCHMARKS
    from ama_ray.data.formats import LAYOUTS

    load_kwargs = set(inspect.signature(datasets.load_dataset).parameters)
    for task in load_config(job).data.tasks:
        where = f"{job.name}: task {task.name}"
        assert task.layout in LAYOUTS, where
        if task.benchmark is not None:
            assert task.benchmark in BENCHMARKS, where
        if task.path is not None:
            assert (ROOT / task.path).is_file() or Path(task.path).is_file(), f"{where}: {task.path} missing"
        if task.hf_dataset is not None:
            spec = task.hf_dataset
            assert isinstance(spec.get("path"), str) and spec["path"], f"{where}: hf_dataset needs a path"
            assert set(spec) <= load_kwargs, f"{where}: {sorted(set(spec) - load_kwargs)} are not load_dataset arguments"
            assert task.layout != "auto", f"{where}: name the layout of a hub dataset"


@pytest.mark.parametrize("job", [j for j in JOBS if load_config(j).tune.search_space], ids=lambda j: j.name)
def test_tune_jobs_search_spaces_resolve(job):
    from ama_ray.stages.tune import max_evaluations, search_space, trial_config

    cfg = load_config(job)
    space = search_space(cfg)  # every candidate value validated against the config
    assert set(cfg.tune.search_space) <= set(space)
    assert max_evaluations(cfg) >= cfg.tune.grace_period, f"{job.name}: ASHA's grace period exceeds the evaluations"
    trial_config(cfg.model_dump(mode="json"), {})


def resource_problems(cfg: Config, cap: dict) -> list[str]:
    """What in `cfg` the largest cluster of cluster.yaml could never place (empty: all fits)."""
    s, problems = cfg.scaling, []
    gpus_per_worker = 1 if s.use_gpu else 0
    k = len(cfg.data.tasks)
    runs = {
        "specialists": min(cfg.specialists.max_concurrent or k, k),
        "generalist": cfg.generalist.max_concurrent,
    }
    if s.cpus_per_worker > cap["node_cpu"] or gpus_per_worker > cap["node_gpu"]:
        problems.append(f"one worker needs {s.cpus_per_worker} CPU / {gpus_per_worker} GPU, more than any node")
    for stage, concurrent in runs.items():
        # A run that does not fit at full concurrency still runs, but the job asked for it: flag it.
        need_gpu = concurrent * s.num_workers * gpus_per_worker
        if need_gpu > cap["gpu"]:
            problems.append(f"{stage}: {concurrent} x {s.num_workers} GPU workers > {cap['gpu']} GPUs")
        if concurrent * s.num_workers * s.cpus_per_worker > cap["cpu"]:
            problems.append(f"{stage}: {concurrent} x {s.num_workers} x {s.cpus_per_worker} CPUs > {cap['cpu']}")
    r = cfg.reference
    if r.gpus_per_actor > cap["node_gpu"] or r.cpus_per_actor > cap["node_cpu"]:
        problems.append("reference: one inference actor is bigger than any node")
    if r.num_actors * r.gpus_per_actor > cap["gpu"]:
        problems.append(f"reference: {r.num_actors} actors x {r.gpus_per_actor} GPU > {cap['gpu']} GPUs")
    trials = cfg.tune.max_concurrent_trials
    if trials and trials * s.num_workers * gpus_per_worker > cap["gpu"]:
        problems.append(f"tune: {trials} trials x {s.num_workers} GPU workers > {cap['gpu']} GPUs")
    if s.use_gpu and s.num_workers > cap["gpu"]:
        problems.append("one run needs more GPUs than the cluster has")
    return problems


def test_resource_check_catches_a_job_too_big_for_the_cluster():
    cfg = load_config(ROOT / "jobs" / "paper_hh_code.yaml")
    cap = _capacity(_cluster())
    assert resource_problems(cfg, cap) == []
    big = cfg.model_copy(deep=True)
    big.scaling.num_workers = math.floor(cap["gpu"] / 2) + 1  # two concurrent generalists no longer fit
    assert any(p.startswith("generalist:") for p in resource_problems(big, cap))
    fat = cfg.model_copy(deep=True)
    fat.scaling.cpus_per_worker = cap["node_cpu"] + 1
    assert any("more than any node" in p for p in resource_problems(fat, cap))
