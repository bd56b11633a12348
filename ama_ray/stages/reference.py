"""reference: log-probs of the base model on every prepared example (Ray Data actor pool).

Writes `reference/<task>/{train,validation,test}.parquet`: the prepared rows' `example_id` and
token ids, plus `ref_chosen_logps` and `ref_rejected_logps` (TRL's names), streamed from the
prepared files through the actor pool (`ama_ray.stages.inference`). Under `dpo.objective: sft`
only `ref_chosen_logps`: no loss reads it, but it is the base's NLL on each example, which the
weak-specialist check compares a specialist with. From here on no training step
runs the reference model, and nothing joins the two by id: the rows carry their log-probs.
"""

from __future__ import annotations

import logging

from ama_ray.config import Config
from ama_ray.errors import StageInputError
from ama_ray.stages import base_model_path, model_identity, needs_work, open_run
from ama_ray.stages.inference import PADDING_SIDE, Source, infer
from ama_ray.stages.prepare import prepare_hash
from ama_ray.train.data import require_prepared

log = logging.getLogger(__name__)
STAGE = "reference"
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "length")  # prepared columns the later stages do not need
FORMAT = 2  # 2: rows carry their token ids (1 held ids and log-probs only, joined by id later)


def reference_hash(cfg: Config) -> str:
    # Under SFT (in prepare_hash) the rows carry the chosen side's log-prob only (`inference.LogpScorer`).
    return prepare_hash(cfg) + "-" + cfg.section_hash("model.dtype") + f"-f{FORMAT}"


def check_same_model(run_dir, tasks: list[str], model_path: str, identity: str) -> None:
    """Refuse to pair token ids from one tokenizer with another model (e.g. a rebuilt tiny base).

    Compares the model's identity (`stages.model_identity`), so the same model reached by another
    path passes; manifests written before identities were recorded compare paths."""
    for task in tasks:
        prepared = run_dir.prepared(task).manifest() or {}
        same = prepared.get("model_identity") == identity if "model_identity" in prepared else prepared.get("model") == model_path
        if not same:
            raise StageInputError(
                f"task '{task}' was tokenized for model {prepared.get('model')} but the base model is now {model_path}",
                where=run_dir.prepared(task).path,
                fix="rerun with --force prepare (the tokenizer may differ)",
            )


def run(cfg: Config, force: set[str] = frozenset()) -> list[str]:
    """Compute reference log-probs for every task not yet committed; returns unit paths."""
    run_dir = open_run(cfg)
    digest = reference_hash(cfg)
    pending = [t for t in cfg.task_names if needs_work(run_dir.reference(t), digest, STAGE, force)]
    if pending:
        for task in pending:
            require_prepared(run_dir, task, cfg.splits)
        model_path = base_model_path(cfg)
        check_same_model(run_dir, pending, model_path, model_identity(cfg))
        log.info("reference: %d tasks with %s", len(pending), model_path)
        for task in pending:
            run_dir.reference(task).begin()
        sources = [Source(t, split, run_dir.prepared(t), run_dir.reference(t)) for t in pending for split in cfg.splits]
        written = infer(cfg, sources, model_path, loss_cfg=None, drop=TEXT_COLUMNS, label=STAGE)
        for task in pending:
            run_dir.reference(task).commit(
                digest, stage=STAGE, model=model_path, dtype=cfg.model.dtype, padding_side=PADDING_SIDE,
                rows={split: written[f"{task}/{split}"] for split in cfg.splits},
            )
    return [run_dir.reference(t).path for t in cfg.task_names]
