"""One module per pipeline stage; each exposes `run(cfg, force=...) -> list[str]` (paths written).

`STAGES` is the one list of them, in pipeline order: `ama_ray.pipeline.run` runs them in this
order, the CLI makes a subcommand of each, and `--force` accepts their names (and `tune`).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads STAGES before anything heavy is imported
    from ama_ray.config import Config
    from ama_ray.storage import RunDir

STAGES = {
    "prepare": "read, normalise, split and tokenize every task",
    "reference": "reference log-probs of the base model (Ray Data)",
    "specialists": "one DPO specialist per task, trained concurrently (Ray Train)",
    "score": "per-example specialist losses (Ray Data)",
    "generalist": "the mixed generalist for each algorithm and seed (Ray Train + mixing actor)",
    "evaluate": "per-task test-split metrics for base, specialists and generalists",
    "report": "report.md and report.html from the saved files",
}


def stage(name: str) -> ModuleType:
    """The module of stage `name` (`ama_ray.stages.<name>`)."""
    return importlib.import_module(f"ama_ray.stages.{name}")


def open_run(cfg: Config) -> RunDir:
    """The run directory of `cfg`, checked writable (StorageError otherwise)."""
    from ama_ray.storage import RunDir

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
