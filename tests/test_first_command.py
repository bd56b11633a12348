"""The README's first command the way a user types it: the real CLI in a subprocess, from a
working directory that is not the repository root, with a job file whose paths are all relative
(`storage.path`, `model.cache_dir`, a task's `path`, `--config` itself) and no overrides. Ray
Train workers run in their own processes and their own working directories, so a relative path
that reached a worker would point somewhere else (issue 15).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(420)

BIN = Path(sys.executable).parent
JOB = """\
model: {name: tiny, cache_dir: ./cache}
data:
  tasks:
    - {name: sums, path: data/sums.jsonl}
    - {name: brackets, benchmark: brackets, size: 240}
  validation_fraction: 0.2
  test_fraction: 0.2
  min_heldout_examples: 20
  max_heldout_examples: 40
specialists:
  optim: {steps: 12, lr: 2.0e-3, batch_size: 16, warmup_steps: 2, checkpoint_every: 12}
generalist:
  algorithms: [ama_s]
  optim: {steps: 8, lr: 2.0e-3, batch_size: 16, warmup_steps: 2, checkpoint_every: 8}
merging: {methods: [average, ties], lambdas: [1.0]}
scaling: {num_workers: 1, cpus_per_worker: 0.5}
eval: {every_n_steps: 6, log_every_n_steps: 4, max_examples: 40, generation_examples: 4}
storage: {path: ./runs, run_name: first}
"""


@pytest.fixture
def user_dir(tmp_path, model_cache):
    """A fresh working directory: the job file, a JSONL task and the (already built) tiny model."""
    from ama_ray.models.tiny_settings import TinySettings
    from ama_ray.data.benchmark import generate
    from ama_ray.models.loading import resolve_model_path

    resolve_model_path("tiny", model_cache, TinySettings())  # built once per session
    shutil.copytree(model_cache, tmp_path / "cache")
    (tmp_path / "data").mkdir()
    rows = generate("arithmetic", 240, seed=3)
    (tmp_path / "data" / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "job.yaml").write_text(JOB)
    return tmp_path


def _ama_ray_run(cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    out = subprocess.run(["ama-ray", "run", "--config", "job.yaml"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _manifests(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): p.read_text() for p in sorted(run_dir.rglob("_manifest.json"))}


def test_run_from_another_directory_with_relative_paths(user_dir, tmp_path_factory):
    out = _ama_ray_run(user_dir)
    run_dir = user_dir / "runs" / "first"
    assert (run_dir / "report" / "report.html").is_file()
    assert (run_dir / "generalist" / "ama_s" / "seed0" / "model" / "model.safetensors").is_file()
    for method in ("average", "ties"):  # merged in a Ray task, in its own process and directory
        assert (run_dir / "merged" / method / "model" / "model.safetensors").is_file()
    assert "merge_ties (one model)" in (run_dir / "report" / "report.md").read_text()
    # Manifests and the console show the absolute paths the relative ones meant.
    prepared = json.loads((run_dir / "prepared" / "sums" / "_manifest.json").read_text())
    assert prepared["task"]["path"] == str(user_dir / "data" / "sums.jsonl")
    assert str(run_dir) in out.stderr

    # The same files reached by another path (a copied working directory: data, model cache and
    # run directory) are the same inputs: the rerun commits nothing new.
    moved = tmp_path_factory.mktemp("moved") / "copy"
    shutil.copytree(user_dir, moved)
    before = _manifests(moved / "runs" / "first")
    _ama_ray_run(moved)
    assert _manifests(moved / "runs" / "first") == before, "a copied run directory redid committed work"
