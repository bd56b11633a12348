"""score: each specialist's per-example loss on its own task (Ray Data batch inference).

Writes `scores/<task>/{train,validation,test}.parquet`: the reference rows (ids, token ids,
reference log-probs) plus `specialist_loss` (the full per-example training objective of
`ama_ray.dpo`, the number the generalist's loss is compared with) and `specialist_dpo_loss`,
streamed through the actor pool. These are the rows the generalist trains on and evaluate
reads. The loss settings, dtype and padding are recorded in the manifest; the generalist
refuses scores made with other settings. Skipped, like the specialists, when the run has none.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow.parquet as pq

from ama_ray.config import Config
from ama_ray.errors import StageInputError
from ama_ray.stages import needs_work, open_run
from ama_ray.stages.inference import PADDING_SIDE, Source, infer
from ama_ray.stages.reference import reference_hash
from ama_ray.stages.specialists import specialist_hash
from ama_ray.storage import MODEL_DIR
from ama_ray.train.data import SELECT_SPLIT, SPLITS, require_split_unit

log = logging.getLogger(__name__)
STAGE = "score"


def score_hash(cfg: Config) -> str:
    return specialist_hash(cfg)


def rows_hash(cfg: Config) -> str:
    """What a generalist's training depends on before its own settings: the scores (which cover
    the DPO loss through the specialists), or without specialists the reference log-probs and
    the DPO loss."""
    return score_hash(cfg) if cfg.uses_specialists else reference_hash(cfg) + "-" + cfg.section_hash("dpo")


def check_rows(run_dir, cfg: Config) -> None:
    """Refuse to train a generalist on missing or mismatched rows: the scores when the run has
    specialists (`check_scores_match`), else every task's reference log-probs."""
    if cfg.uses_specialists:
        check_scores_match(run_dir, cfg)
        return
    for task in cfg.task_names:
        check_split_rows(run_dir, "reference", task, "--force reference", cfg.splits)


def check_split_rows(run_dir, stage: str, task: str, force: str, splits: tuple[str, ...] = SPLITS) -> dict:
    """The committed `stage` unit of `task` (its manifest), refused when a split's file, its
    manifest and the prepared split disagree on the row count (the data changed after it ran),
    or when one of `splits` is missing."""
    unit = run_dir.stage_unit(stage, task)
    prepared = require_split_unit(run_dir, "prepare", task, splits)["rows"]
    man = require_split_unit(run_dir, stage, task, splits)
    also = "" if stage == "reference" else " (or --force reference if the data itself changed)"
    for split in splits:
        path = unit.file(unit.split_file(split))
        rows = pq.ParquetFile(path, filesystem=unit.fs).metadata.num_rows  # the footer: cheap at any size
        if not rows == man["rows"][split] == prepared[split]:
            raise StageInputError(
                f"holds {rows} rows (its manifest says {man['rows'][split]}) but the prepared {split} split has {prepared[split]}",
                where=path,
                fix=f"the data changed after this stage ran: rerun `ama-ray run {force}`{also}",
            )
    return man


def run(cfg: Config, force: set[str] = frozenset()) -> list[str]:
    """Score every task whose scores are not committed; returns unit paths."""
    run_dir = open_run(cfg)
    if not cfg.uses_specialists:
        log.info("score: not needed (no specialists in this run); skipped")
        return []
    digest = score_hash(cfg)
    for task in cfg.task_names:
        unit = run_dir.scores(task)
        if not needs_work(unit, digest, STAGE, force):
            log.info("score: %s already committed, skipping", task)
            continue
        spec_unit = run_dir.specialist(task)
        spec_man = spec_unit.require(f"specialist of task '{task}'", fix="run `ama-ray specialists` first")
        require_split_unit(run_dir, "reference", task, cfg.splits)
        model_dir = spec_unit.local_copy() / MODEL_DIR
        log.info("score: %s with %s", task, model_dir)
        unit.begin()
        written = infer(cfg, [Source(task, split, run_dir.reference(task), unit) for split in cfg.splits], str(model_dir),
                        loss_cfg=cfg.dpo.to_dict(), label=f"score: {task}")
        unit.commit(
            digest, stage=STAGE, task=task, specialist=spec_unit.path, specialist_committed_at=spec_man["committed_at"],
            dtype=cfg.model.dtype, padding_side=PADDING_SIDE, loss=cfg.dpo.to_dict(),
            rows={split: written[f"{task}/{split}"] for split in cfg.splits},
        )
    return [run_dir.scores(t).path for t in cfg.task_names]


def check_scores_match(run_dir, cfg: Config) -> None:
    """Refuse scores made with another loss, dtype or padding than this generalist trains with, or
    for other data (their row counts differ from the prepared splits')."""
    for task in cfg.task_names:
        unit = run_dir.scores(task)
        man = check_split_rows(run_dir, STAGE, task, "--force score", cfg.splits)
        wanted = {"loss": cfg.dpo.to_dict(), "dtype": cfg.model.dtype, "padding_side": PADDING_SIDE}
        found = {k: man.get(k) for k in wanted}
        if found != wanted:
            diff = [k for k in wanted if found[k] != wanted[k]]
            raise StageInputError(
                f"scores of task '{task}' were computed with other {', '.join(diff)} ({found}) than the generalist uses ({wanted})",
                where=unit.path,
                fix="rerun `ama-ray score --force score` (and specialists if the loss changed)",
            )


# --- is each specialist worth comparing with? -------------------------------------------------

MIN_LOSS_DROP = 0.01  # nats below the base's loss
MIN_IMPROVED_GAIN = 0.02  # share of pairs improved, over chance (0.5)


def base_dpo_loss(cfg: Config) -> float:
    """The DPO loss of a model that is its own reference (every log ratio 0): log 2 for `sigmoid`
    (with or without label smoothing), 1 / (4 beta^2) for `ipo`."""
    import torch

    from ama_ray.dpo import dpo_loss

    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    losses, _, _ = dpo_loss(zero, zero, zero, zero, beta=cfg.dpo.beta, loss_type=cfg.dpo.loss_type,
                            label_smoothing=cfg.dpo.label_smoothing, chosen_n_tokens=one, rejected_n_tokens=one)
    return float(losses[0])


def weak_specialists(run_dir, cfg: Config) -> dict[str, dict]:
    """Task -> evidence, for every specialist not clearly better than the base on its task's
    validation split, read from the score stage's rows (no model runs).

    Clearly better: mean DPO loss at least MIN_LOSS_DROP below the base's (`base_dpo_loss`), and
    the share of pairs on which its DPO loss is below the base's at least 0.5 + MIN_IMPROVED_GAIN
    (for `sigmoid` that share is exactly `rewards/accuracies`). The same thresholds as the
    report's `weak_specialist` flag, which also compares `logps/accuracies` with the base's. Tasks
    without committed scores are left out (the generalist refuses to train without them).
    Under `dpo.objective: sft` the same thresholds compare the specialist's per-token NLL on each
    example with the base's (from the reference log-prob the rows carry).
    """
    weak = {}
    for task in cfg.task_names:
        unit = run_dir.scores(task)
        if unit.manifest() is None:
            continue
        losses, base = _validation_losses(unit, cfg)
        if not len(losses):
            continue
        mean, base_mean, improved = float(losses.mean()), float(np.mean(base)), float((losses < base).mean())
        if not (mean < base_mean - MIN_LOSS_DROP and improved >= 0.5 + MIN_IMPROVED_GAIN) or not math.isfinite(mean):
            weak[task] = {"dpo_loss": mean, "base_dpo_loss": base_mean, "improved_share": improved, "examples": len(losses)}
    return weak


def _validation_losses(unit, cfg: Config) -> tuple[np.ndarray, np.ndarray | float]:
    """A task's validation losses under its specialist, and the base's (one number for DPO, whose
    base is its own reference: `base_dpo_loss`; per example for SFT)."""
    if cfg.dpo.pairs:
        column = unit.read_parquet(unit.split_file(SELECT_SPLIT), columns=["specialist_dpo_loss"])["specialist_dpo_loss"]
        return np.asarray(column.to_numpy(), dtype=np.float64), base_dpo_loss(cfg)
    import pyarrow.compute as pc

    table = unit.read_parquet(unit.split_file(SELECT_SPLIT), columns=["specialist_loss", "ref_chosen_logps", "chosen_input_ids"])
    tokens = np.maximum(1, np.asarray(pc.list_value_length(table["chosen_input_ids"]).to_numpy(), dtype=np.float64))
    base = -np.asarray(table["ref_chosen_logps"].to_numpy(), dtype=np.float64) / tokens
    return np.asarray(table["specialist_loss"].to_numpy(), dtype=np.float64), base


def raw_loss_tasks(run_dir, cfg: Config, announce: bool = False) -> list[str]:
    """The tasks whose excess target falls back to 0 (the raw loss) under `specialists.on_weak`:
    the weak specialists' tasks with `raw_loss`, else none. Only with `mixing.excess_target:
    specialist` (no other target reads the specialists).

    `announce` (once, before the generalists start): a warning per weak specialist, and with
    `on_weak: stop` a StageInputError (exit 2) naming the tasks and their numbers.
    """
    if cfg.mixing.excess_target != "specialist":
        return []
    weak = weak_specialists(run_dir, cfg)
    policy = cfg.specialists.on_weak
    if announce and weak:
        loss_name = "DPO loss" if cfg.dpo.pairs else "NLL"
        numbers = "; ".join(
            f"{task}: validation {loss_name} {e['dpo_loss']:.4f} vs the base's {e['base_dpo_loss']:.4f} (needs < "
            f"{e['base_dpo_loss'] - MIN_LOSS_DROP:.4f}), better than the base on {e['improved_share']:.0%} of "
            f"{e['examples']} {'pairs' if cfg.dpo.pairs else 'examples'} (needs >= {0.5 + MIN_IMPROVED_GAIN:.0%})" for task, e in weak.items())
        if policy == "stop":
            raise StageInputError(
                f"specialists not clearly better than the base: {numbers}; their excess would tell AMA there is nothing "
                "to learn and it would starve those tasks",
                where=", ".join(run_dir.specialist(t).path for t in weak),
                fix="train them longer or harder (data.tasks[i].specialist_steps, specialists.optim.steps or .lr) and rerun "
                "with --force specialists, or set specialists.on_weak=raw_loss (or warn) to train the generalists anyway",
            )
        then = {"raw_loss": "their excess target falls back to the raw loss (specialists.on_weak=raw_loss)",
                "warn": "training on against them (specialists.on_weak=warn): AMA may starve those tasks"}[policy]
        log.warning("weak specialists -- %s; %s", numbers, then)
    return sorted(weak) if policy == "raw_loss" else []
