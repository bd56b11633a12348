"""Derived views of the metrics.json document (schema: docs/metrics.md): aggregates and the CSV.

Pure functions over plain dicts, shared by the evaluate stage (which writes them) and the
report (which reads them), so the two cannot disagree on what "worst task" means.
"""

from __future__ import annotations

import csv
import io
import math
import statistics

CSV_COLUMNS = ("model", "kind", "algorithm", "seed", "own_task", "task", "aggregate", "metric", "value")


def model_aggregates(per_task: dict[str, dict[str, float]], lower_is_better: frozenset[str] | set[str]) -> dict:
    """{"mean": {metric: v}, "worst": {metric: v}} over the tasks that have the metric.

    Worst is the maximum for metrics in `lower_is_better` and the minimum for the others;
    NaN values are skipped. A metric no task has is absent.
    """
    out: dict[str, dict[str, float]] = {"mean": {}, "worst": {}}
    names = sorted({m for metrics in per_task.values() for m in metrics})
    for name in names:
        seen = [v for v in (m.get(name) for m in per_task.values()) if v is not None and not math.isnan(v)]
        if seen:
            out["mean"][name] = sum(seen) / len(seen)
            out["worst"][name] = max(seen) if name in lower_is_better else min(seen)
    return out


def flat_metrics(entry: dict) -> dict[str, float]:
    """One model entry as `{metric}/{task}` plus `{metric}/mean` and `{metric}/worst` keys."""
    out = {f"{m}/{task}": v for task, metrics in entry["per_task"].items() for m, v in metrics.items()}
    for scope, metrics in entry["aggregates"].items():
        out.update({f"{m}/{scope}": v for m, v in metrics.items()})
    return out


def aggregate_algorithms(models: dict[str, dict]) -> dict[str, dict]:
    """Per algorithm across its seeds: {"seeds": [...], "mean": {key: v}, "std": {key: v},
    "per_seed": {key: [v per seed, in "seeds" order]}} (per_seed: for the paired verdicts).

    Keys are `flat_metrics` keys; std is the sample standard deviation (0 with one seed). A merged
    model (`merge_<method>`) is an arm too, marked `"deterministic": true`: it has no seed, so its
    one value stands beside every generalist seed, and pairing a generalist with it tests the
    generalist's seeds against that fixed value.
    """
    by_algo: dict[str, list[dict]] = {}
    for entry in models.values():
        if entry["kind"] == "generalist":
            by_algo.setdefault(entry["algorithm"], []).append(entry)
    out = {}
    seeds = sorted({e["seed"] for entries in by_algo.values() for e in entries})
    for entry in models.values():
        if entry["kind"] == "merged":  # one model, no seed: a fixed value beside every generalist seed
            flat = {k: v for k, v in flat_metrics(entry).items() if v is not None and not math.isnan(v)}
            out[entry["algorithm"]] = {
                "seeds": seeds, "deterministic": True, "mean": dict(flat), "std": {k: 0.0 for k in flat},
                "per_seed": {k: [v] * len(seeds) for k, v in flat.items()},
            }
    for algo, entries in by_algo.items():
        entries.sort(key=lambda e: e["seed"])
        flats = [flat_metrics(e) for e in entries]
        keys = sorted(set().union(*flats))
        values = {k: [f[k] for f in flats if f.get(k) is not None and not math.isnan(f[k])] for k in keys}
        out[algo] = {
            "seeds": [e["seed"] for e in entries],
            "mean": {k: sum(v) / len(v) for k, v in values.items() if v},
            "std": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items() if v},
            "per_seed": {k: [f.get(k) for f in flats] for k in keys},
        }
    return out


def specialists_own_task(models: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{task: metrics of that task's specialist on its own task}."""
    return {
        e["own_task"]: e["per_task"][e["own_task"]]
        for e in models.values()
        if e["kind"] == "specialist" and e["own_task"] in e["per_task"]
    }


def csv_rows(doc: dict) -> list[dict]:
    """Long format: one row per model x (task or aggregate) x metric."""
    rows = []
    for key, entry in doc["models"].items():
        base = {
            "model": key, "kind": entry["kind"], "algorithm": entry.get("algorithm", ""),
            "seed": entry.get("seed", ""), "own_task": entry.get("own_task", ""),
        }
        for task, metrics in entry["per_task"].items():
            rows += [{**base, "task": task, "aggregate": "", "metric": m, "value": v} for m, v in sorted(metrics.items())]
        for scope, metrics in entry["aggregates"].items():
            rows += [{**base, "task": "", "aggregate": scope, "metric": m, "value": v} for m, v in sorted(metrics.items())]
    return rows


def csv_text(doc: dict) -> str:
    """metrics.csv: `CSV_COLUMNS`, empty cells for not-applicable fields and missing values."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(doc):
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()
