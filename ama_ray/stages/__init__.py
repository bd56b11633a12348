"""One module per pipeline stage; each exposes `run(cfg, force=...) -> list[str]` (paths written)."""

from __future__ import annotations

from ama_ray.config import Config
from ama_ray.storage import RunDir


def open_run(cfg: Config) -> RunDir:
    """The run directory of `cfg`, checked writable (StorageError otherwise)."""
    cfg.require_resolved("the driver")
    run = RunDir(cfg.run_dir)
    run.check_writable()
    return run


def model_identity(cfg: Config) -> str:
    """What the base model is, not where it is: the tiny model's settings, a fetched model's name,
    a local directory's content digest, or a hub id. Compared instead of paths, so a moved model
    cache or a copied run directory keeps its committed units."""
    return cfg.section_hash("model.name", "model.tiny")


def base_model_path(cfg: Config) -> str:
    """The directory (or hub id) of the base model, building the tiny base when asked."""
    from ama_ray.models.loading import resolve_model_path

    return resolve_model_path(cfg.model.name, cfg.model.cache_dir, cfg.model.tiny)
