"""`ama-ray run` end to end on the minimal job: every stage's outputs, the metrics schema, the
report, and a rerun that skips every stage. Starts from a copy of the session's tiny run, so the
training stages are exercised by the shared fixture and here only their skip path runs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from ama_ray.cli import main

pytestmark = pytest.mark.timeout(600)


def _manifests(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): p.read_text() for p in sorted(run_dir.rglob("_manifest.json"))}


def test_run_end_to_end_then_rerun_skips(tiny_run, tmp_path, model_cache, caplog):
    cfg, src = tiny_run
    root = tmp_path / "runs"
    shutil.copytree(src, root / cfg.storage.run_name)
    args = ["run", "--config", "jobs/minimal.yaml", f"storage.path={root}", f"model.cache_dir={model_cache}"]
    assert main(args) == 0
    run_dir = root / cfg.storage.run_name
    for task in cfg.task_names:
        for stage in ("prepared", "reference", "specialists", "scores"):
            assert (run_dir / stage / task / "_manifest.json").is_file(), (stage, task)
        assert (run_dir / "specialists" / task / "model" / "model.safetensors").is_file()
    for algo in cfg.generalist.algorithms:
        unit = run_dir / "generalist" / algo / "seed0"
        assert (unit / "_manifest.json").is_file() and (unit / "mixing_history.parquet").is_file()
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["schema_version"] == 2 and metrics["run"]["split"] == "test"
    assert {"base", *(f"specialist/{t}" for t in cfg.task_names), "generalist/ama_s/seed0"} <= set(metrics["models"])
    assert (run_dir / "eval" / "metrics.csv").is_file()
    html = (run_dir / "report" / "report.html").read_text()
    assert "data:image/png;base64" in html and (run_dir / "report" / "report.md").is_file()

    before = _manifests(run_dir)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ama_ray"):
        assert main(args) == 0
    assert _manifests(run_dir) == before, "a rerun redid committed work"
    # The answer is on the console when the run ends, even when every stage was skipped.
    verdict = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verdict: ")]
    assert len(verdict) == 1 and "worst task" in verdict[0]
