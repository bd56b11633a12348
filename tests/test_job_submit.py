"""`ray job submit` of the pipeline to a separate loopback Ray cluster started with `ray start --head`, into
a copy of the shared tiny run: the job skips the committed units and trains, merges, evaluates and reports.

The test session's own Ray (the `ray_session` fixture) is untouched: the head here has its own
temp dir and ports, and only `ray` CLI subprocesses talk to it. The head is always stopped, by the
pids of its own processes (`ray stop` would end every Ray on the machine, the session's included).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: `ray` and `ama-ray` live here
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
              "--metrics-export-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray(args: list[str], env: dict, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"ray {' '.join(args[:2])} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture
def head():
    """A `ray start --head` on loopback with auth disabled; yields (dashboard URL, env, job ids).

    Jobs whose ids the test appends are stopped first, then the head's processes.
    """
    temp_dir = Path("/tmp") / f"ama_head_{uuid.uuid4().hex[:8]}"  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({
        "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's entrypoint finds `ama-ray` here
    })
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
    start = ["start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
             "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats",
             *[f"{flag}={port}" for flag, port in ports.items()]]
    try:
        _ray(start, env, timeout=120)
        url = f"http://127.0.0.1:{ports['--dashboard-port']}"
        _wait_for_dashboard(url, env)
        jobs: list[str] = []
        yield url, env, jobs
        for job_id in jobs:
            _ray(["job", "stop", "--address", url, job_id], env, timeout=60, check=False)
    finally:
        _stop_head(temp_dir)


def _stop_head(temp_dir: Path) -> None:
    """End this head's processes by pid (SIGTERM, then SIGKILL): `ray stop` would end every Ray on the machine."""
    def pids() -> list[int]:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and str(temp_dir).encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:  # the process ended while we looked
                continue
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while pids() and time.monotonic() < deadline:
            time.sleep(0.5)
    assert not pids(), f"head processes survived: {pids()}"
    shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(url: str, env: dict) -> None:
    deadline = time.monotonic() + 60
    while True:
        out = _ray(["job", "list", "--address", url], env, timeout=60, check=False)
        if out.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"dashboard at {url} never answered: {out.stderr[-2000:]}")
        time.sleep(1)


# The job file as typed, shortened by overrides (as a user would), submitted into a copy of the
# session's finished tiny run without its generalists and merges: the path under test is the
# submission, the job's runtime environment and its logs, and a job that finds committed units
# skips them (prepare, reference, specialists, score) and does the rest: a generalist trained by
# Ray Train, two merges, evaluate and report. Every unit from scratch took ~95 s more in CI. The
# `merging.methods` list has a space in it, so it also checks that a YAML list survives the
# submission's shell quoting (split at the space it would not parse).
SHORTER = ["generalist.optim.steps=20", "generalist.optim.checkpoint_every=10", "generalist.algorithms=[ama_s]",
           "eval.every_n_steps=10", "eval.generation_examples=8", "merging.methods=[average, ties]"]


@pytest.mark.timeout(400)
def test_ray_job_submit_runs_the_pipeline(head, tmp_path, tiny_run, model_cache):
    url, env, jobs = head
    runs = tmp_path / "runs"
    _, finished = tiny_run
    run_dir = runs / finished.name
    shutil.copytree(finished, run_dir, ignore=shutil.ignore_patterns("_checkpoints", "tensorboard", "generalist", "merged", "eval", "report"))
    job_id = f"ama_test_{uuid.uuid4().hex[:8]}"
    jobs.append(job_id)
    _ray(["job", "submit", "--address", url, "--submission-id", job_id, "--no-wait", "--working-dir", ".", "--",
          "ama-ray", "run", "--config", "jobs/minimal.yaml", f"storage.path={runs}", f"model.cache_dir={model_cache}", *SHORTER],
         env, timeout=120)
    status = _wait_for_job(url, job_id, env, timeout=360)
    logs = _ray(["job", "logs", "--address", url, job_id], env, timeout=60).stdout
    assert status == "SUCCEEDED", f"job ended {status}:\n{logs[-5000:]}"
    # Stage progress reached the job logs, in pipeline order.
    stages = ("prepare", "specialists", "generalist", "evaluate", "report")
    marks = [m.start() for m in (re.search(rf"INFO ama_ray\.stages\.{s}\b", logs) for s in stages) if m]
    assert len(marks) == len(stages) and marks == sorted(marks), logs[-5000:]
    for task in ("arithmetic", "refusal", "brackets"):
        assert f"specialists: {task} already committed, skipping" in logs
    assert re.search(r"generalist/ama_s/seed0: step 20/20", logs), "per-unit training progress"
    assert "pipeline finished" in logs
    assert (run_dir / "report" / "report.html").stat().st_size > 1000
    assert sorted(p.parent.parent.name + "/" + p.parent.name for p in (run_dir / "generalist").glob("*/*/_manifest.json")) == ["ama_s/seed0"]
    assert sorted(p.parent.name for p in (run_dir / "merged").glob("*/_manifest.json")) == ["average", "ties"]


def _wait_for_job(url: str, job_id: str, env: dict, timeout: float) -> str:
    """Poll `ray job status` until the job ends; returns SUCCEEDED, FAILED, STOPPED or TIMEOUT."""
    ended = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}  # the CLI's wording per end state
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = _ray(["job", "status", "--address", url, job_id], env, timeout=60, check=False)
        text = out.stdout + out.stderr
        for words, status in ended.items():
            if f"Job '{job_id}' {words}" in text:
                return status
        time.sleep(3)
    return "TIMEOUT"
