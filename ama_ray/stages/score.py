"""score: each specialist's per-example loss on its own task (Ray Data batch inference).

Writes `scores/<task>/{train,validation,test}.parquet` with `example_id`, `specialist_loss` (the full
per-example training objective of `ama_ray.dpo`, the number the generalist's loss is compared
with) and `specialist_dpo_loss`. The loss settings, dtype and padding are recorded in the
manifest; the generalist refuses scores made with other settings.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from ama_ray.config import Config
from ama_ray.errors import StageInputError
from ama_ray.stages import open_run
from ama_ray.stages.inference import PADDING_SIDE, infer
from ama_ray.stages.reference import PREPARED_COLUMNS
from ama_ray.stages.specialists import specialist_hash
from ama_ray.storage import MODEL_DIR
from ama_ray.train.data import SPLITS, join_by_id, require_split_unit

log = logging.getLogger(__name__)
STAGE = "score"


def score_hash(cfg: Config) -> str:
    return specialist_hash(cfg)


def run(cfg: Config, force: set[str] = frozenset()) -> list[str]:
    """Score every task whose scores are not committed; returns unit paths."""
    run_dir = open_run(cfg)
    digest = score_hash(cfg)
    for task in cfg.task_names:
        unit = run_dir.scores(task)
        if STAGE not in force and unit.is_committed(digest):
            log.info("score: %s already committed, skipping", task)
            continue
        spec_unit = run_dir.specialist(task)
        spec_man = spec_unit.require(f"specialist of task '{task}'", fix="run `ama-ray specialists` first")
        table = _inputs(run_dir, task)
        model_dir = spec_unit.local_copy() / MODEL_DIR
        log.info("score: %s with %s (%d examples)", task, model_dir, table.num_rows)
        result = infer(cfg, table, str(model_dir), loss_cfg=cfg.dpo.to_dict())
        unit.begin()
        rows = {}
        for split in SPLITS:
            part = result.filter(pc.equal(result["split"], split)).drop_columns(["split"]).sort_by("example_id")
            unit.write_parquet(unit.split_file(split), part)
            rows[split] = part.num_rows
        unit.commit(
            digest, stage=STAGE, task=task, specialist=spec_unit.path, specialist_committed_at=spec_man["committed_at"],
            dtype=cfg.model.dtype, padding_side=PADDING_SIDE, loss=cfg.dpo.to_dict(), rows=rows,
        )
    return [run_dir.scores(t).path for t in cfg.task_names]


def _inputs(run_dir, task: str) -> pa.Table:
    tables = []
    for split in SPLITS:
        prepared = run_dir.prepared(task).read_parquet(run_dir.prepared(task).split_file(split), columns=PREPARED_COLUMNS)
        ref = run_dir.reference(task)
        require_split_unit(run_dir, "reference", task)
        joined = join_by_id(prepared, ref.read_parquet(ref.split_file(split)), ref.file(ref.split_file(split)))
        tables.append(joined.append_column("split", pa.array([split] * joined.num_rows)))
    return pa.concat_tables(tables)


def check_scores_match(run_dir, cfg: Config) -> None:
    """Refuse scores made with another loss, dtype or padding than this generalist trains with."""
    for task in cfg.task_names:
        unit = run_dir.scores(task)
        man = require_split_unit(run_dir, STAGE, task)
        wanted = {"loss": cfg.dpo.to_dict(), "dtype": cfg.model.dtype, "padding_side": PADDING_SIDE}
        found = {k: man.get(k) for k in wanted}
        if found != wanted:
            diff = [k for k in wanted if found[k] != wanted[k]]
            raise StageInputError(
                f"scores of task '{task}' were computed with other {', '.join(diff)} ({found}) than the generalist uses ({wanted})",
                where=unit.path,
                fix="rerun `ama-ray score --force score` (and specialists if the loss changed)",
            )
        _check_ids(run_dir, task)


def _check_ids(run_dir, task: str) -> None:
    """Refuse scores whose example ids differ from the prepared data, before any worker starts."""
    for split in SPLITS:
        ids = {}
        for unit in (run_dir.prepared(task), run_dir.scores(task)):
            ids[unit] = set(unit.read_parquet(unit.split_file(split), columns=["example_id"])["example_id"].to_pylist())
        prepared, scored = ids.values()
        if prepared != scored:
            raise StageInputError(
                f"example ids do not match the prepared data ({len(prepared - scored)} missing, {len(scored - prepared)} unknown)",
                where=run_dir.scores(task).file(run_dir.scores(task).split_file(split)),
                fix="the data changed after scoring: rerun `ama-ray score --force score`",
            )
