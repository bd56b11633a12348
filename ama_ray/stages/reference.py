"""reference: log-probs of the base model on every prepared example (Ray Data actor pool).

Writes `reference/<task>/{train,validation,test}.parquet` with `example_id`, `ref_chosen_logps`,
`ref_rejected_logps` (TRL's names). From here on no training step runs the reference model.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from ama_ray.config import Config
from ama_ray.errors import StageInputError
from ama_ray.stages import base_model_path, model_identity, open_run
from ama_ray.stages.inference import PADDING_SIDE, infer
from ama_ray.stages.prepare import prepare_hash
from ama_ray.train.data import SPLITS, require_prepared

log = logging.getLogger(__name__)
STAGE = "reference"
PREPARED_COLUMNS = ["example_id", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]


def reference_hash(cfg: Config) -> str:
    return prepare_hash(cfg) + "-" + cfg.section_hash("model.dtype")


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
    pending = [t for t in cfg.task_names if STAGE in force or not run_dir.reference(t).is_committed(digest)]
    if pending:
        tables = []
        for task in pending:
            require_prepared(run_dir, task)
            for split in SPLITS:
                prepared = run_dir.prepared(task)
                t = prepared.read_parquet(prepared.split_file(split), columns=PREPARED_COLUMNS)
                tables.append(t.append_column("split", pa.array([f"{task}/{split}"] * t.num_rows)))
        model_path = base_model_path(cfg)
        check_same_model(run_dir, pending, model_path, model_identity(cfg))
        log.info("reference: %d tasks with %s", len(pending), model_path)
        result = infer(cfg, pa.concat_tables(tables), model_path, loss_cfg=None)
        for task in pending:
            unit = run_dir.reference(task)
            unit.begin()
            rows = {}
            for split in SPLITS:
                part = result.filter(pc.equal(result["split"], f"{task}/{split}")).drop_columns(["split"]).sort_by("example_id")
                unit.write_parquet(unit.split_file(split), part)
                rows[split] = part.num_rows
            unit.commit(digest, stage=STAGE, model=model_path, dtype=cfg.model.dtype, padding_side=PADDING_SIDE, rows=rows)
    return [run_dir.reference(t).path for t in cfg.task_names]
