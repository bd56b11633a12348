"""specialists: one DPO run per task, all launched at once, each its own `TorchTrainer`.

A specialist is the training loop with k=1 and the plain DPO loss, started from the base model.
Its best checkpoint on the validation split (lowest DPO loss) is saved with `save_pretrained` to
`specialists/<task>/model/` and committed on its own, so a crash in one keeps the others.
Skipped when the run needs no specialists (`Config.uses_specialists`: a target other than the
specialist's loss and no merging).
"""

from __future__ import annotations

import functools
import logging

from ama_ray.config import Config
from ama_ray.stages import base_model_path, needs_work, open_run, progress_name
from ama_ray.stages.reference import reference_hash
from ama_ray.storage import RunDir
from ama_ray.train.checkpointing import fresh_checkpoints
from ama_ray.train.data import require_split_unit
from ama_ray.train.launch import check_unit_resources, fit_unit, run_concurrently
from ama_ray.train.loop import UnitSpec

log = logging.getLogger(__name__)
STAGE = "specialists"


def specialist_hash(cfg: Config) -> str:
    return reference_hash(cfg) + "-" + cfg.section_hash("dpo", "specialists", "seed", "scaling.num_workers", "model.lora", "scaling.deepspeed")


def run(cfg: Config, force: set[str] = frozenset()) -> list[str]:
    """Train every specialist not yet committed, concurrently; returns unit paths."""
    from ama_ray.cluster import ensure_ray

    run_dir = open_run(cfg)
    if not cfg.uses_specialists:
        log.info("specialists: not needed (mixing.excess_target=%s, no merging.methods); skipped", cfg.mixing.excess_target)
        return []
    digest = specialist_hash(cfg)
    pending = [t for t in cfg.data.tasks if needs_work(run_dir.specialist(t.name), digest, STAGE, force)]
    for t in cfg.data.tasks:
        if t not in pending:
            log.info("specialists: %s already committed, skipping", t.name)
    if pending:
        for t in pending:
            require_split_unit(run_dir, "reference", t.name)
        ensure_ray()
        concurrent = cfg.specialists.max_concurrent or len(pending)
        check_unit_resources(cfg, 1, STAGE)
        model_path = base_model_path(cfg)
        jobs = [
            (t.name, functools.partial(train_specialist, cfg, t.name, t.specialist_steps or cfg.specialists.optim.steps, model_path, digest, STAGE in force))
            for t in pending
        ]
        run_concurrently(jobs, concurrent, progress_name=progress_name(cfg, STAGE))
    return [run_dir.specialist(t).path for t in cfg.task_names]


def train_specialist(cfg: Config, task: str, steps: int, model_path: str, digest: str, force: bool) -> str:
    run_dir = RunDir(cfg.run_dir)
    unit = run_dir.specialist(task)
    fresh_checkpoints(run_dir, STAGE, unit, digest, force)
    unit.begin()
    spec = UnitSpec(
        cfg=cfg.model_dump(mode="json"), kind="specialist", tasks=[task], algorithm="specialist", seed=cfg.seed,
        sizes=[int(require_split_unit(run_dir, "prepare", task)["rows"]["train"])],
        steps=steps, model_path=model_path, out_unit=list(unit.parts), progress_name=progress_name(cfg, STAGE),
    )
    result = fit_unit(cfg, spec, STAGE)
    final = dict(result.metrics or {})
    unit.commit(
        digest, stage=STAGE, task=task, base_model=model_path, steps=steps, dtype=cfg.model.dtype,
        best_step=final.get("eval/best_step"), final_metrics=final,
    )
    log.info("specialists: %s committed (best held-out step %s)", task, final.get("eval/best_step"))
    return unit.path
