"""Launching training runs: one `TorchTrainer` per unit, several at once, with live progress."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ama_ray.cluster import NAMESPACE, check_fits, verbose
from ama_ray.config import Config
from ama_ray.errors import AmaError
from ama_ray.storage import RunDir
from ama_ray.train.data import data_config, task_dataset
from ama_ray.train.loop import UnitSpec, train_loop_per_worker
from ama_ray.train.progress import Progress, draw

log = logging.getLogger(__name__)
# NCCL takes CUDA tensors only, and the loop's bookkeeping collectives (per-task sums, stream
# positions, checkpoint names, replica checks) are small CPU tensors and objects: a GPU group
# gets gloo for CPU tensors and NCCL for CUDA ones (gradients, DeepSpeed's partitions).
GPU_BACKEND = "cpu:gloo,cuda:nccl"


def process_group_backend(use_gpu: bool) -> str:
    """The torch.distributed backend of a training run's process group."""
    return GPU_BACKEND if use_gpu else "gloo"


def fit_unit(cfg: Config, spec: UnitSpec, stage: str, callbacks: list | None = None) -> object:
    """Train one unit with a `TorchTrainer`; resumes from its latest checkpoint if one exists.

    `callbacks` are Ray Train `UserCallback`s (e.g. the Tune study's report callback).

    Each task's training rows reach the workers as a Ray Data dataset (`ama_ray.train.data`):
    the scored rows for a generalist, the reference rows for a specialist. Checkpoints live in
    `RunDir.checkpoint_root(stage)`, one Ray Train run per unit. Errors a user can fix that a
    worker raised are re-raised here as the original AmaError.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run = RunDir(cfg.run_dir)
    unit = run.unit(*spec.out_unit)
    scaling = cfg.scaling
    with_scores = spec.reads_scores(cfg)
    datasets = {task: task_dataset(run, task, with_scores) for task in spec.tasks}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.to_dict(),
        datasets=datasets,
        dataset_config=data_config(datasets),
        torch_config=TorchConfig(backend=process_group_backend(scaling.use_gpu)),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": worker_cpus(cfg, stage)},
        ),
        run_config=RunConfig(
            name=unit.run_name,
            **run.checkpoint_storage(stage),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": forwarded_env(cpu_only=not scaling.use_gpu)},
            callbacks=list(callbacks or []),
            # Ray Train's per-run INFO lines (worker group started, checkpoint saved, ...) only
            # with `ama-ray -v`: the driver prints one progress line per run instead.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )
    try:
        return trainer.fit()
    except Exception as err:  # noqa: BLE001 - re-raised unchanged unless a user error hides inside
        raise (find_user_error(err) or err) from None


def worker_cpus(cfg: Config, stage: str) -> float:
    return cfg.scaling.cpus_per_worker


def check_unit_resources(cfg: Config, concurrent: int, stage: str) -> None:
    """Fail fast if `concurrent` runs of `scaling.num_workers` workers can never be placed."""
    bundle = {"CPU": worker_cpus(cfg, stage), "GPU": 1.0 if cfg.scaling.use_gpu else 0.0}
    check_fits(f"{stage}: {concurrent} run(s) of {cfg.scaling.num_workers} worker(s)", bundle, concurrent * cfg.scaling.num_workers, "scaling.cpus_per_worker")


def forwarded_env(cpu_only: bool = False) -> dict[str, str]:
    """The allow-listed driver variables workers get (never secrets). CPU-only workers also get
    DS_ACCELERATOR=cpu: DeepSpeed would pick the CPU anyway, after a warning on every import."""
    import os

    keys = ("AMA_RAY_FAULT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR")
    env = {k: os.environ[k] for k in keys if k in os.environ}
    if cpu_only:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def find_user_error(err: BaseException) -> AmaError | None:
    """The AmaError inside a Ray/Train exception chain, if any."""
    seen: set[int] = set()
    stack: list[BaseException] = [err]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, AmaError):
            return cur
        stack += [cur.__cause__, cur.__context__, getattr(cur, "cause", None)]
        for attr in ("worker_failures", "errors"):
            value = getattr(cur, attr, None)
            if isinstance(value, dict):
                stack += list(value.values())
            elif isinstance(value, (list, tuple)):
                stack += list(value)
        as_cause = getattr(cur, "as_instanceof_cause", None)
        if callable(as_cause):
            try:
                stack.append(as_cause())
            except Exception:  # noqa: BLE001 - best effort unwrapping
                pass
    return None


def run_concurrently(jobs: list[tuple[str, Callable[[], object]]], max_workers: int, progress_name: str) -> dict[str, object]:
    """Run `jobs` (name, fn) in threads, `max_workers` at once, drawing progress until all end.

    Returns name -> result; the first exception is re-raised after all jobs ended (committed
    units of the others are kept).
    """
    import ray
    from tqdm.auto import tqdm

    actor = ray.remote(num_cpus=0)(Progress).options(name=progress_name, namespace=NAMESPACE, get_if_exists=True).remote()
    results: dict[str, object] = {}
    errors: list[BaseException] = []
    bars: dict[str, tqdm] = {}
    lock = threading.Lock()

    def wrap(name: str, fn: Callable[[], object]) -> None:
        try:
            out = fn()
            with lock:
                results[name] = out
        except BaseException as err:  # noqa: BLE001 - collected and re-raised below
            with lock:
                errors.append(err)
            log.error("%s failed: %s", name, err)

    pool = ThreadPoolExecutor(max_workers=max(1, max_workers))
    try:
        futures = [pool.submit(wrap, name, fn) for name, fn in jobs]
        while not all(f.done() for f in futures):
            time.sleep(1.0)
            draw(ray.get(actor.snapshot.remote()), bars)
        draw(ray.get(actor.snapshot.remote()), bars)
    except BaseException:
        # Ctrl-C, or the driver loop itself failed: queued runs never start, and the running ones
        # stop when this driver leaves Ray (a local Ray it started goes down with it). Their
        # checkpoints stay, so rerunning the command resumes them.
        pool.shutdown(wait=False, cancel_futures=True)
        ray.shutdown()
        raise
    finally:
        for bar in bars.values():
            bar.close()
        if ray.is_initialized():
            ray.kill(actor)
    pool.shutdown(wait=True)
    if errors:
        raise errors[0]
    return results
