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

import pyarrow.parquet as pq

from ama_ray.config import Config
from ama_ray.errors import StageInputError
from ama_ray.stages import needs_work, open_run
from ama_ray.stages.inference import PADDING_SIDE, Source, infer
from ama_ray.stages.reference import reference_hash
from ama_ray.stages.specialists import specialist_hash
from ama_ray.storage import MODEL_DIR
from ama_ray.train.data import SPLITS, require_split_unit

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
        check_split_rows(run_dir, "reference", task, "--force reference")


def check_split_rows(run_dir, stage: str, task: str, force: str) -> dict:
    """The committed `stage` unit of `task` (its manifest), refused when a split's file, its
    manifest and the prepared split disagree on the row count (the data changed after it ran)."""
    unit = run_dir.stage_unit(stage, task)
    man = require_split_unit(run_dir, stage, task)
    also = "" if stage == "reference" else " (or --force reference if the data itself changed)"
    prepared = require_split_unit(run_dir, "prepare", task)["rows"]
    for split in SPLITS:
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
        require_split_unit(run_dir, "reference", task)
        model_dir = spec_unit.local_copy() / MODEL_DIR
        log.info("score: %s with %s", task, model_dir)
        unit.begin()
        written = infer(cfg, [Source(task, split, run_dir.reference(task), unit) for split in SPLITS], str(model_dir),
                        loss_cfg=cfg.dpo.to_dict())
        unit.commit(
            digest, stage=STAGE, task=task, specialist=spec_unit.path, specialist_committed_at=spec_man["committed_at"],
            dtype=cfg.model.dtype, padding_side=PADDING_SIDE, loss=cfg.dpo.to_dict(),
            rows={split: written[f"{task}/{split}"] for split in SPLITS},
        )
    return [run_dir.scores(t).path for t in cfg.task_names]


def check_scores_match(run_dir, cfg: Config) -> None:
    """Refuse scores made with another loss, dtype or padding than this generalist trains with, or
    for other data (their row counts differ from the prepared splits')."""
    for task in cfg.task_names:
        unit = run_dir.scores(task)
        man = check_split_rows(run_dir, STAGE, task, "--force score")
        wanted = {"loss": cfg.dpo.to_dict(), "dtype": cfg.model.dtype, "padding_side": PADDING_SIDE}
        found = {k: man.get(k) for k in wanted}
        if found != wanted:
            diff = [k for k in wanted if found[k] != wanted[k]]
            raise StageInputError(
                f"scores of task '{task}' were computed with other {', '.join(diff)} ({found}) than the generalist uses ({wanted})",
                where=unit.path,
                fix="rerun `ama-ray score --force score` (and specialists if the loss changed)",
            )
