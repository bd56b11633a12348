"""Batch inference on Ray Data shared by the reference and score stages, streamed end to end.

Each input unit's split files are read by Ray Data, scored by an actor pool and written to the
output unit as the batches arrive: no process holds a whole split. Every output row carries its
input columns through (token ids, and in score mode the reference log-probs), so the next stage
and the trainers read one file per split and never join by id (`ama_ray.train.data`).

Inside an actor each Ray Data batch of `reference.batch_size × BUCKETS` rows is sorted by length
and scored in sub-batches of `reference.batch_size`, so sequences of similar length share a
forward pass (little padding) without a global sort. The actor pool uses fractional CPUs so it
cannot deadlock against the rest of the pipeline on a small machine. Both stages call
`ama_ray.dpo`, the same code training runs, with right padding and the configured dtype; both
are recorded in the manifests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ama_ray.errors import StageInputError
from ama_ray.storage import SplitWriters, Unit
from ama_ray.train.data import TAG, check_finite, output_blocks, parquet_dataset

if TYPE_CHECKING:  # LogpScorer runs without pydantic (benchmarks/gpu_check.py on a bare GPU machine)
    from ama_ray.config import Config

log = logging.getLogger(__name__)
PADDING_SIDE = "right"
BUCKETS = 8  # sub-batches per Ray Data batch, sorted by length between them


@dataclass(frozen=True)
class Source:
    """One split of one unit to score, and where its output goes."""

    task: str
    split: str
    inp: Unit
    out: Unit

    @property
    def key(self) -> str:
        return f"{self.task}/{self.split}"


class LogpScorer:
    """Ray Data callable: per-example sequence log-probs, and in score mode the per-example loss.

    Takes and returns Arrow batches; every input column passes through. Reference mode
    (`loss_cfg` None) writes `ref_chosen_logps` and `ref_rejected_logps`, or with `objective`
    `sft` the chosen side's only (the base's completion log-prob; SFT trains without a reference).
    """

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool, threads: int, loss_cfg: dict | None,
                 batch_size: int, revision: str | None = None, use_gpu: bool = False, objective: str = "dpo"):
        import torch

        from ama_ray.dpo import DPOLossConfig
        from ama_ray.models.loading import compute_device, load_model, load_tokenizer

        check_model_path(model_path, "a reference/score inference actor")
        torch.set_num_threads(max(1, threads))
        # In `dtype` on this actor's GPU when it has one (inputs follow the model: `ama_ray.dpo`).
        self.device = compute_device(use_gpu)
        self.model = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision).to(self.device).eval()
        self.pad_id = load_tokenizer(model_path, trust_remote_code=trust_remote_code, revision=revision).pad_token_id
        self.loss_cfg = DPOLossConfig(**loss_cfg) if loss_cfg is not None else None
        self.pairs = (self.loss_cfg.objective if self.loss_cfg is not None else objective) == "dpo"
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from ama_ray import dpo

        batch = batch.take(pc.sort_indices(length_of(batch)))
        columns = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
        rows = batch.select(columns).to_pylist()
        outputs: dict[str, list[np.ndarray]] = {}
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                collated = dpo.collate(chunk, self.pad_id, padding_side=PADDING_SIDE, pairs=self.pairs)
                if self.loss_cfg is None:
                    logps, _, _ = dpo.sequence_logps(self.model, collated)
                    logps = logps.float().cpu()
                    values = ({"ref_chosen_logps": logps} if not self.pairs else
                              dict(zip(("ref_chosen_logps", "ref_rejected_logps"), logps.chunk(2))))
                else:
                    part = batch.slice(start, len(chunk))
                    refs = ((part["ref_chosen_logps"].to_numpy(), part["ref_rejected_logps"].to_numpy()) if self.pairs
                            else (None, None))  # SFT has no reference
                    res = dpo.per_example_loss(self.model, collated, *refs, self.loss_cfg)
                    values = {"specialist_loss": res["loss"], **({"specialist_dpo_loss": res["dpo_loss"]} if self.pairs else {})}
                for name, value in values.items():
                    outputs.setdefault(name, []).append(value.float().cpu().numpy())
        for name, parts in outputs.items():
            batch = batch.append_column(name, pa.array(np.concatenate(parts), pa.float32()))
        return batch


def length_of(table: pa.Table) -> pa.Array:
    """Prompt plus the longer completion, in tokens, per row."""
    return pc.add(
        pc.list_value_length(table["prompt_input_ids"]),
        pc.max_element_wise(pc.list_value_length(table["chosen_input_ids"]), pc.list_value_length(table["rejected_input_ids"])),
    )


def check_model_path(model_path: str, who: str) -> None:
    """Refuse a relative local model path handed to a Ray worker (ConfigError): it would mean the
    worker's own working directory. Hub ids pass."""
    from ama_ray.paths import looks_local, require_absolute

    if looks_local(model_path):
        require_absolute(model_path, "model.name", who)


def infer(cfg: Config, sources: list[Source], model_path: str, loss_cfg: dict | None, drop: tuple[str, ...] = (),
          label: str = "inference") -> dict[str, int]:
    """Score every source split on a Ray Data actor pool and stream the rows into the sources'
    output units (one Parquet file per split, `Unit.split_file`); returns rows written per source key.

    `drop` names input columns not to carry into the output; `label` starts the progress lines
    (`RowProgress`). Raises StageInputError when a source's output row count differs from its input's.
    """
    from ama_ray.cluster import ensure_ray

    ensure_ray()
    ref = cfg.reference
    by_key = {s.key: s for s in sources}
    expected = {key: pq.ParquetFile(s.inp.file(s.inp.split_file(s.split)), filesystem=s.inp.fs).metadata.num_rows
                for key, s in by_key.items()}
    progress = RowProgress(label, sum(expected.values()))
    ds = parquet_dataset([(s.inp, s.split) for s in sources], tags=[s.key for s in sources], drop=drop)
    ds = on_actor_pool(cfg, ds, LogpScorer, (model_path, cfg.model.dtype, cfg.model.trust_remote_code, max(1, int(ref.cpus_per_actor)),
                                             loss_cfg, ref.batch_size, cfg.model.revision, ref.gpus_per_actor > 0,
                                             cfg.dpo.objective))
    # Rows come back in input order, so the written files (and so training's pass order) are the
    # same on every rerun; the actors still score out of order.
    ds.context.execution_options.preserve_order = True
    check = lambda key, table: check_finite(table, f"{by_key[key].out.path} ({key})")  # noqa: E731
    with SplitWriters({key: (s.out, s.split) for key, s in by_key.items()}, check=check) as writers:
        for batch in output_blocks(ds):
            for key in pc.unique(batch[TAG]).to_pylist():
                writers.add(key, batch.filter(pc.equal(batch[TAG], key)).drop_columns([TAG]))
            progress.add(batch.num_rows)
    written = writers.written
    for key, source in by_key.items():
        if written[key] != expected[key]:
            raise StageInputError(f"scored {written[key]} of {expected[key]} rows of {key}", where=source.out.path,
                                  fix="rerun the stage with --force; if it repeats, report it as a bug")
    return written


class RowProgress:
    """A log line each time another tenth of `total` rows is done, with the time so far and a
    linear estimate of the time left: a real model's reference or score pass runs for tens of
    minutes, and Ray Data's own progress bars are off without a terminal (`cluster.ensure_ray`).
    The clock starts before the actors load the model, so the first estimates run a little high."""

    def __init__(self, label: str, total: int, clock=time.monotonic):
        self.label, self.total, self.clock = label, total, clock
        self.done, self.shown, self.start = 0, 0, clock()

    def add(self, rows: int) -> None:
        self.done += rows
        tenths = min(10, 10 * self.done // self.total) if self.total else 10
        if tenths <= self.shown or not self.done:
            return
        self.shown = tenths
        elapsed = self.clock() - self.start
        left = max(0.0, elapsed * (self.total - self.done) / self.done)
        log.info("%s: %s of %s rows (%d%%) in %s, ~%s left", self.label, f"{self.done:,}", f"{self.total:,}",
                 100 * self.done // max(1, self.total), _minutes(elapsed), _minutes(left))


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def on_actor_pool(cfg: Config, ds, fn: type, args: tuple):
    """`ds.map_batches(fn(*args))` on the inference actor pool `reference.*` describes (its size,
    CPUs and GPUs per actor; Arrow batches of `reference.batch_size` x BUCKETS rows), checked to
    fit the cluster first. Shared by reference/score and the partition stage's embeddings."""
    import ray

    from ama_ray.cluster import check_fits

    ref = cfg.reference
    check_fits("inference actors", {"CPU": ref.cpus_per_actor, "GPU": ref.gpus_per_actor}, ref.num_actors, "reference.num_actors")
    return ds.map_batches(
        fn,
        fn_constructor_args=args,
        batch_size=ref.batch_size * BUCKETS,
        batch_format="pyarrow",
        num_cpus=ref.cpus_per_actor,
        num_gpus=ref.gpus_per_actor or None,
        compute=ray.data.ActorPoolStrategy(size=ref.num_actors),
    )


def padding_share(table: pa.Table, batch_size: int) -> float:
    """Share of padded tokens among all tokens processed when `table` is batched in its order."""
    lengths = length_of(table).to_numpy()
    padded = real = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start : start + batch_size]
        padded += chunk.max() * len(chunk)
        real += chunk.sum()
    return float(1 - real / padded) if padded else 0.0
