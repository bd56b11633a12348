"""One module per pipeline stage; each exposes `run(cfg, force=...) -> list[str]` (paths written)."""

from __future__ import annotations

from ama_ray.config import Config
from ama_ray.storage import RunDir


def open_run(cfg: Config) -> RunDir:
    """The run directory of `cfg`, checked writable (StorageError otherwise)."""
    run = RunDir(cfg.run_dir)
    run.check_writable()
    return run


def base_model_path(cfg: Config) -> str:
    """The directory (or hub id) of the base model, building the tiny base when asked."""
    from ama_ray.models.loading import resolve_model_path

    return resolve_model_path(cfg.model.name, cfg.model.cache_dir, cfg.model.tiny)
