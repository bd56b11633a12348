"""Shared fixtures: offline HF, one local Ray session on loopback, expensive artefacts built once.

Budget (docs/development.md): the whole suite runs in <= 30 minutes on 2 CPUs; every test has
a timeout (pytest-timeout; 300 s default, less where marked).
"""

from __future__ import annotations

import os

# Before any HF/Ray import: never reach a hub, keep Ray on loopback, fast Train health checks.
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_k, _v)
os.environ.pop("RAY_ADDRESS", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, loopback, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            namespace="ama_ray",
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A model cache shared by the session (the tiny base is built into it once)."""
    path = os.environ.get("AMA_RAY_TEST_CACHE") or str(tmp_path_factory.mktemp("model_cache"))
    return path


@pytest.fixture(scope="session")
def minimal_cfg(tmp_path_factory, model_cache):
    """`jobs/minimal.yaml` writing into a session temp dir, with the session's model cache."""
    from ama_ray.config import load_config

    root = tmp_path_factory.mktemp("runs")
    return load_config(Path(__file__).resolve().parent.parent / "jobs" / "minimal.yaml",
                       [f"storage.path={root}", f"model.cache_dir={model_cache}"])


@pytest.fixture(scope="session")
def tiny_run(ray_session, minimal_cfg):
    """A finished minimal pipeline through the merge stage (every trained or merged model), built
    once per session.

    Returns (cfg, run_dir path). Tests must not modify it; copy it first (shutil.copytree).
    """
    from ama_ray import pipeline

    # Its two generalists train side by side (one thread each on the session's 2 CPUs): the same
    # units as one at a time, as `generalist.max_concurrent` is in no hash of a unit written here.
    side_by_side = minimal_cfg.model_copy(deep=True)
    side_by_side.generalist.max_concurrent = 2
    pipeline.run(side_by_side, through="merge")
    return minimal_cfg, Path(minimal_cfg.run_dir)


# Exit with pytest's status without running interpreter finalization. Once, at the end of a CI
# run whose 477 tests had all passed, a Ray background thread (a streaming-generator peek left from
# a Ray Data execution) called into Ray after `ray.shutdown()` and Ray aborted the process
# ("Check failed: stream_it != object_ref_streams_.end()"), turning a green run into exit 134.
# The tests' results are final by `pytest_unconfigure`; nothing after it can change them.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config):
    if _EXIT_STATUS and not hasattr(config, "workerinput"):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[0])
