"""generalist: for each algorithm and seed, the training loop over all k tasks with a shared mixing actor.

Each unit `generalist/<algorithm>/seed<k>/` holds the model (`model/`, save_pretrained) and
`mixing_history.parquet` (one row per optimizer step: `step`, and per task `alpha/<task>`,
`g_hat/<task>`, `bound_fired/<task>`, `sum_loss/<task>`, `sum_specialist_loss/<task>`,
`sum_clipped_excess/<task>`, `count/<task>`). See docs/generalist.md for the protocol.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pyarrow as pa

from ama_ray.cluster import NAMESPACE
from ama_ray.config import Config, short_hash
from ama_ray.errors import AmaError
from ama_ray.mixing import POLICIES
from ama_ray.stages import base_model_path, needs_work, open_run, progress_name, run_identity
from ama_ray.stages.score import check_rows, raw_loss_tasks, rows_hash
from ama_ray.storage import MIXING_HISTORY, RunDir
from ama_ray.train.checkpointing import fresh_checkpoints
from ama_ray.train.data import require_prepared
from ama_ray.train.launch import check_unit_resources, fit_unit, run_concurrently
from ama_ray.train.loop import UnitSpec

log = logging.getLogger(__name__)
STAGE = "generalist"


def generalist_hash(cfg: Config, algorithm: str, seed: int, raw_tasks: list[str] = ()) -> str:
    """What a generalist unit was trained with; only the mixing settings its algorithm reads
    count, so e.g. adding a tuned `fixed` arm leaves the committed AMA units valid. `raw_tasks`
    (`raw_loss_tasks`: weak specialists measured against the raw loss) count when there are any
    and the algorithm reads the target (a baseline on the plain loss never does)."""
    mixing = short_hash(cfg.mixing.used_by(algorithm))
    own_lora = ("generalist.lora",) if cfg.generalist.lora is not None else ()  # absent: model.lora, as before
    training = cfg.section_hash("generalist.optim", "scaling.num_workers", "model.lora", "scaling.deepspeed", *own_lora)
    raw = f"-raw:{','.join(raw_tasks)}" if raw_tasks and POLICIES[algorithm].reads_target(cfg.mixing) else ""
    return f"{rows_hash(cfg)}-{training}-{mixing}-{algorithm}-{seed}{raw}"


def units(cfg: Config) -> list[tuple[str, int]]:
    return [(a, s) for a in cfg.generalist.algorithms for s in cfg.generalist.seeds]


def run(cfg: Config, force: set[str] = frozenset()) -> list[str]:
    """Train every (algorithm, seed) not yet committed; returns unit paths."""
    from ama_ray.cluster import ensure_ray

    run_dir = open_run(cfg)
    raw = raw_loss_tasks(run_dir, cfg)
    every = units(cfg)
    pending = [(a, s) for a, s in every if needs_work(run_dir.generalist(a, s), generalist_hash(cfg, a, s, raw), STAGE, force)]
    if kept := [f"{a}/seed{s}" for a, s in every if (a, s) not in pending]:
        log.info("generalist: %d of %d already committed, kept: %s", len(kept), len(every), ", ".join(kept))
    if pending:
        if (advice := target_advice(cfg)) is not None:
            log.warning("generalist: %s", advice)
        check_rows(run_dir, cfg)
        raw_loss_tasks(run_dir, cfg, announce=True)  # the weak specialists' line, or the stop
        ensure_ray()
        check_unit_resources(cfg, 1, STAGE)
        model_path = base_model_path(cfg)
        sizes = train_sizes(run_dir, cfg)
        jobs = [
            (f"{a}/seed{s}", functools.partial(train_generalist, cfg, a, s, model_path, sizes, STAGE in force, raw_tasks=raw))
            for a, s in pending
        ]
        run_concurrently(jobs, cfg.generalist.max_concurrent, progress_name=progress_name(cfg, STAGE))
    return [run_dir.generalist(a, s).path for a, s in every]


def target_advice(cfg: Config) -> str | None:
    """A warning for a target and clip that work against each other, else None.

    The per-example clip masks every example whose loss is below its target. Against a
    specialist's per-example loss that keeps the examples the generalist can still learn; against
    the history target, one number per task, it masks the easier half of every task's examples,
    which stalls the task: measured at 10:1:1, worst-task test excess 0.233 against 0.119 with
    `per_task_mean` (docs/results.md, "Ablations")."""
    if cfg.mixing.excess_target == "history" and cfg.mixing.clip == "per_example":
        return ("mixing.excess_target=history with mixing.clip=per_example masks every example below its task's one "
                "target number and stalls learning (docs/results.md, Ablations): set mixing.clip=per_task_mean")
    return None


def train_sizes(run_dir: RunDir, cfg: Config) -> list[int]:
    return [int(require_prepared(run_dir, t)["rows"]["train"]) for t in cfg.task_names]


def actor_name(cfg: Config, algorithm: str, seed: int, trial: str | None = None) -> str:
    """The unit's mixing actor: named by the run's identity (run directory and Ray job), so
    another driver on the same cluster, even with the same run_name, has other actors."""
    return f"mixer:{run_identity(cfg)}:{trial or ''}:{algorithm}:seed{seed}"


_CREATED: set[str] = set()  # mixing actors this process created: the only ones it may kill


def train_generalist(
    cfg: Config, algorithm: str, seed: int, model_path: str, sizes: list[int], force: bool,
    trial: str | None = None, callbacks: list | None = None, raw_tasks: list[str] | None = None,
) -> str:
    """Train one generalist unit end to end: fresh actor, TorchTrainer, history, manifest.

    With `trial` (a Tune trial id) the unit is `tune/<trial>/<algorithm>/seed<k>`; `callbacks`
    (Ray Train `UserCallback`s, e.g. Tune's report callback) go to the TorchTrainer. `raw_tasks`
    defaults to `raw_loss_tasks` of the run.
    """
    import ray

    from ama_ray.mixing.actor import create_mixing_actor

    run_dir = RunDir(cfg.run_dir)
    unit = run_dir.generalist(algorithm, seed, trial)
    stage = STAGE if trial is None else "tune"
    raw_tasks = raw_loss_tasks(run_dir, cfg) if raw_tasks is None else raw_tasks
    if not POLICIES[algorithm].reads_target(cfg.mixing):  # a baseline on the plain loss: its excess stays the specialist's
        raw_tasks = []
    digest = generalist_hash(cfg, algorithm, seed, raw_tasks)
    fresh_checkpoints(run_dir, stage, unit, digest, force)
    unit.begin()
    name = actor_name(cfg, algorithm, seed, trial)
    _kill_actor(name)
    settings = cfg.mixing
    actor = create_mixing_actor(name, algorithm, cfg.task_names, sizes, settings)
    _CREATED.add(name)
    spec = UnitSpec(
        cfg=cfg.model_dump(mode="json"), kind="generalist", tasks=cfg.task_names, algorithm=algorithm, seed=seed,
        steps=cfg.generalist.optim.steps, model_path=model_path, out_unit=list(unit.parts), sizes=list(sizes),
        settings=settings.to_dict(), actor_name=name, progress_name=progress_name(cfg, STAGE), raw_tasks=list(raw_tasks),
    )
    try:
        result = fit_unit(cfg, spec, stage, callbacks=callbacks)
        history = ray.get(actor.history.remote())
    except Exception as err:
        if _alive(actor):
            raise
        # A fresh actor would restart from uniform weights: stop instead; a rerun restores it.
        raise AmaError(
            f"the mixing actor of {unit.label} died during training; stopped rather than train on with reset mixing weights",
            where=f"actor {NAMESPACE}/{name}",
            fix="rerun the same command: training resumes from the last checkpoint, which restores the actor's state",
        ) from err
    finally:
        ray.kill(actor)
    unit.write_parquet(MIXING_HISTORY, history_table(history, cfg.task_names))
    final = dict(result.metrics or {})
    alphas = np.array([np.asarray(r["alpha"], dtype=float) for r in history]) if history else np.zeros((0, len(sizes)))
    unit.commit(
        digest, stage=STAGE, algorithm=algorithm, seed=seed, steps=spec.steps, base_model=model_path, dtype=cfg.model.dtype,
        tasks=cfg.task_names, train_sizes=sizes, final_metrics=final,
        raw_loss_tasks=list(raw_tasks),
        final_alpha=alphas[-1].tolist() if len(alphas) else None, mean_alpha=alphas.mean(axis=0).tolist() if len(alphas) else None,
    )
    log.info("generalist: %s/seed%d committed", algorithm, seed)
    return unit.path


def _alive(actor) -> bool:
    import ray

    try:
        ray.get(actor.describe.remote(), timeout=30)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False


def _kill_actor(name: str) -> None:
    """Kill a mixing actor left by an earlier attempt of this process (never another driver's)."""
    import ray

    if name not in _CREATED:
        return
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass


def history_table(history: list[dict], tasks: list[str]) -> pa.Table:
    """The actor's per-step records as a flat table: `step` plus `<field>/<task>` columns."""
    columns: dict[str, list] = {"step": [int(r["step"]) for r in history]}
    if history:
        for key, value in history[0].items():
            if key == "step":
                continue
            if np.ndim(value) == 1 and len(value) == len(tasks):
                for i, task in enumerate(tasks):
                    columns[f"{key}/{task}"] = [np.asarray(r[key])[i].item() for r in history]
            elif np.ndim(value) == 0:
                columns[key] = [np.asarray(r[key]).item() for r in history]
    return pa.table(columns)
