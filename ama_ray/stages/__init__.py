"""One module per pipeline stage; each exposes `run(cfg, force=...) -> list[str]` (paths written).

`STAGES` is the one list of them, in pipeline order: `ama_ray.pipeline.run` runs them in this
order, the CLI makes a subcommand of each, and `--force` accepts their names (and `tune`).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads STAGES before anything heavy is imported
    from ama_ray.config import Config
    from ama_ray.storage import RunDir

STAGES = {
    "partition": "with data.partition: the mixed sources split into tasks by clustering their prompts",
    "prepare": "read, normalise, split and tokenize every task",
    "reference": "reference log-probs of the base model (Ray Data)",
    "specialists": "one DPO specialist per task, trained concurrently (Ray Train)",
    "score": "per-example specialist losses (Ray Data)",
    "generalist": "the mixed generalist for each algorithm and seed (Ray Train + mixing actor)",
    "merge": "the specialists merged into one model per merging.methods (baselines)",
    "evaluate": "per-task test-split metrics for base, specialists and generalists",
    "report": "report.md and report.html from the saved files",
}


def needs_work(unit, digest: str, stage_name: str, force: set[str] | frozenset) -> bool:
    """Whether a compute stage must (re)write `unit`: not committed, or forced.

    A unit committed with other settings is never replaced silently (it may be another job's
    work under the same run_name): StageInputError asking for `--force <stage>` or a new run
    name, unless this stage or an earlier one is forced (a forced stage's successors are stale
    by construction and are redone).
    """
    manifest = unit.manifest()
    if manifest is None:
        return True
    if any(name in force for name in list(STAGES)[: list(STAGES).index(stage_name) + 1]):
        return True
    if manifest.get("config_hash") == digest:
        return False
    from ama_ray.errors import StageInputError

    raise StageInputError(
        f"{unit.label} was committed with other settings (config hash {manifest.get('config_hash')}, this job {digest}); "
        "not replaced silently",
        where=unit.path,
        fix=f"rerun with --force {stage_name} to replace it (the later stages follow), or set another storage.run_name",
    )


def stage(name: str) -> ModuleType:
    """The module of stage `name` (`ama_ray.stages.<name>`)."""
    return importlib.import_module(f"ama_ray.stages.{name}")


def open_run(cfg: Config) -> RunDir:
    """The run directory of `cfg`, checked writable (StorageError otherwise)."""
    from ama_ray.storage import RunDir

    cfg.require_resolved("the driver")
    run = RunDir(cfg.run_dir)
    run.check_writable()
    run.lock(" ".join(["ama-ray", *sys.argv[1:2]]) if sys.argv else "ama_ray")
    return run


def run_identity(cfg: Config) -> str:
    """This command's claim on the run's cluster-wide names (mixing and progress actors): the
    resolved run directory and the Ray job, so two drivers never share or kill each other's actors."""
    import ray

    from ama_ray.config import short_hash

    return f"{short_hash(cfg.run_dir)[:8]}:{ray.get_runtime_context().get_job_id()}"


def progress_name(cfg: Config, stage_name: str) -> str:
    return f"progress:{run_identity(cfg)}:{stage_name}"


def model_identity(cfg: Config) -> str:
    """What the base model is, not where it is: the tiny model's settings, a fetched model's name,
    a local directory's content digest, or a hub id. Compared instead of paths, so a moved model
    cache or a copied run directory keeps its committed units."""
    return cfg.section_hash("model.name", "model.tiny")


def base_model_path(cfg: Config) -> str:
    """The directory (or hub id) of the base model, building the tiny base when asked."""
    from ama_ray.models.loading import resolve_model_path

    return resolve_model_path(cfg.model.name, cfg.model.cache_dir, cfg.model.tiny)
