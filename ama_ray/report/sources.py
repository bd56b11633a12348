"""Everything the report reads, from the run directory only (no config, no models).

* `eval/metrics.json` (the evaluate stage; required),
* `generalist/<algorithm>/seed<k>/mixing_history.parquet` (α and per-task training statistics
  for every optimizer step; the source of the α and excess-over-steps plots),
* `tensorboard/<unit>/events.out.tfevents.*` (training curves and the held-out evaluations every
  `eval.every_n_steps`; written for local run directories, optional),
* `tune/results.csv` (a Tune study, optional).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from ama_ray.storage import MIXING_HISTORY, RESULTS_CSV, RunDir, Unit

log = logging.getLogger(__name__)
TUNE_OBJECTIVE = "eval/excess_loss/worst"


@dataclass
class History:
    """One generalist's per-step record: `steps` (T,), and per task `alpha` and train `excess`, `loss` (T,)."""

    algorithm: str
    seed: int
    steps: np.ndarray
    alpha: dict[str, np.ndarray] = field(default_factory=dict)
    excess: dict[str, np.ndarray] = field(default_factory=dict)
    loss: dict[str, np.ndarray] = field(default_factory=dict)


def generalists(doc: dict) -> list[tuple[str, int]]:
    """(algorithm, seed) of every evaluated generalist, in metrics.json order."""
    return [(e["algorithm"], int(e["seed"])) for e in doc["models"].values() if e["kind"] == "generalist"]


def load_histories(run: RunDir, doc: dict) -> list[History]:
    """The mixing history of every evaluated generalist that has one (missing files are logged)."""
    tasks = [t["name"] for t in doc["tasks"]]
    out = []
    for algorithm, seed in generalists(doc):
        unit = run.generalist(algorithm, seed)
        if not unit.exists(MIXING_HISTORY):
            log.warning("report: no mixing history in %s", unit.path)
            continue
        table = unit.read_parquet(MIXING_HISTORY).to_pydict()
        hist = History(algorithm, seed, np.asarray(table["step"]) + 1)  # stored step t is the t-th update, 0-based
        for task in tasks:
            hist.alpha[task] = np.asarray(table[f"alpha/{task}"], dtype=float)
            hist.excess[task] = _per_example(table, "sum_clipped_excess", task)
            hist.loss[task] = _per_example(table, "sum_loss", task)
        out.append(hist)
    return out


def _per_example(table: dict, name: str, task: str) -> np.ndarray:
    """A per-step sum divided by the step's example count for the task; NaN where the task drew none."""
    count = np.asarray(table[f"count/{task}"], dtype=float)
    total = np.asarray(table[f"{name}/{task}"], dtype=float)
    return np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)


def load_scalars(run: RunDir, unit: Unit) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """TensorBoard scalars of one training unit as {tag: (steps, values)}; {} when none were written.

    A resumed run repeats steps: the last value written for a step wins.
    """
    folder = run.tensorboard(unit)
    if not run.is_local or not folder.is_dir() or not any(folder.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # it logs every file it finishes at INFO

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        steps = np.array(sorted(by_step))
        out[tag] = (steps, np.array([by_step[s] for s in steps], dtype=float))
    return out


def load_tune(run: RunDir) -> list[dict] | None:
    """Rows of `tune/results.csv` ({column: value}, numbers as floats), or None when there is no study."""
    path = run.tune().file(RESULTS_CSV)
    from pyarrow import fs as pafs

    if run.fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with run.fs.open_input_stream(path) as f:
        text = f.read().decode()
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        rows.append({k: _number(v) for k, v in row.items()})
    return rows


def _number(text: str):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return value if math.isfinite(value) else math.nan
