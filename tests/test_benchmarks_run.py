"""Every benchmark runs in its `--quick` mode and prints its table.

Benchmarks are not tests: no speed figure is checked here (this machine is shared and noisy).
What is checked is that each script still runs against the library and reports every arm, so
a change to the training step, the loader or the stages cannot silently break them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# script -> (needs Ray, strings its quick output must contain: one per arm or table)
EXPECTED = {
    "dpo_throughput": (False, ["| trl |", "| trl-precomp |", "| ours |", "| floor |", "ours / trl-precomp", "floor_ran_our_batches=yes"]),
    "mixing_overhead": (True, ["| fixed |", "| ama_s |", "| ama_s+actor |", "ama_s / fixed", "get_alpha round trip"]),
    "inference": (True, ["| loop-1t |", "| ray-2a |", "ray-2a / ray-1a", "bucketed in windows"]),
    "growth": (True, ["| 1x |", "| 2x |", "| in memory |", "| streamed |", "SmolLM2-135M shapes", "store peak: reference / score / train"]),
    "logits_memory": (False, ["| 64 |", "sequence_logps: peak above model (MB)"]),
    "profile_step": (False, ["whole step (train_step)", "whole batch (LogpScorer.__call__)", "torch op"]),
}


def _load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their shared `common` module
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# growth's quick mode starts Ray stages per data size (~2 min in CI): slow, run with -m slow.
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "growth" else n for n in EXPECTED])
def test_benchmark_quick_mode_prints_every_arm(name, monkeypatch, request):
    needs_ray, expected = EXPECTED[name]
    if needs_ray:
        request.getfixturevalue("ray_session")
    out = _load(name, monkeypatch).main(["--quick"])
    assert out.startswith("## ")
    missing = [s for s in expected if s not in out]
    assert not missing, f"{name} --quick output lacks {missing}:\n{out}"


# ~36 s of CI for a second mode of a benchmark whose quick mode runs above: slow (run with -m slow).
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_dpo_throughput_memory_mode_measures_every_arm_at_a_length(monkeypatch):
    """`--memory`: each arm in its own process on synthetic rows of the given length (`--length`),
    a peak above set-up per arm."""
    out = _load("dpo_throughput", monkeypatch).main(["--quick", "--memory", "48"])
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 48 |")]
    assert [r[2].strip() for r in rows] == ["trl", "trl-precomp", "ours", "floor"]
    assert all(float(r[3]) > 0 for r in rows), out


@pytest.mark.timeout(120)
def test_gpu_step_runs_on_cpu_with_a_tiny_config(monkeypatch):
    result = _load("gpu_step", monkeypatch).main(["--tiny", "--device", "cpu"])
    assert result["device"] == "cpu" and result["dtype"] == "bfloat16"
    assert result["pairs_per_s"] > 0 and 0 < result["mfu"] < 1
    # The AMA-S policy moved: alpha is no longer uniform, and still a distribution.
    assert abs(sum(result["alpha_after"]) - 1) < 1e-9 and max(result["alpha_after"]) > 1 / 3 + 1e-6


@pytest.mark.timeout(180)
def test_gpu_check_cpu_fallback_runs_without_ray_trl_or_deepspeed(tmp_path):
    """`benchmarks/gpu_check.sh --cpu` as typed, in a Python where Ray, TRL and DeepSpeed cannot be
    imported (the GPU machine has none of them): every part runs and the bf16 checks hold."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    shim = tmp_path / "shim"
    shim.mkdir()
    # sitecustomize runs at interpreter start: the three packages look uninstalled (find_spec -> None)
    (shim / "sitecustomize.py").write_text("import sys\nfor m in ('ray', 'trl', 'deepspeed'):\n    sys.modules[m] = None\n")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "PYTHONPATH": str(shim)}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu"], cwd=root, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["device"] == "cpu" and result["collectives"]["backend"] == "gloo"
    assert result["step"][0]["params_on"] == "cpu" and result["step"][0]["pairs_per_s"] > 0
    for mode in ("reference", "score"):
        scorer = result["scorer"][mode]
        assert scorer["dtype"] == "bfloat16" and scorer["rows"] == 72 and 0 < scorer["max_rel_diff_vs_cpu_fp32"] < 0.03
    assert 0 < result["evaluation"]["dpo_loss_diff_vs_cpu_fp32"] < 0.02
