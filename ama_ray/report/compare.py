"""`ama-ray compare`: one table per metric across several evaluated run directories.

A study often spans run directories: a tuned baseline trained apart from the others, the same
job at another `dpo.sft_weight`. Each generalist algorithm of each run becomes a row (mean ±
sample std over its seeds, per task, mean and worst task, as in the report); `--paired A B`
adds the per-seed differences of two rows, the comparison seeds make fair: for every metric, on
the worst task, the mean over tasks and each task, with a bootstrap interval and a sign test.
Directories given the same label are one run whose seeds were trained apart (`merge_same_label`).
"""

from __future__ import annotations

import statistics

from ama_ray.errors import ConfigError
from ama_ray.report import stats
from ama_ray.report.render import fmt, to_markdown
from ama_ray.report.schema import flat_metrics, model_aggregates

DEFAULT_METRICS = ("excess_loss", "rewards/accuracies", "generation/accuracy")
NO_SPECIALIST_METRICS = ("loss", "rewards/accuracies", "generation/accuracy")  # no excess without specialists


def default_metrics(runs: list[tuple[str, dict]]) -> list[str]:
    """DEFAULT_METRICS, or with the loss first when no run has specialists (hence no excess);
    without the reward accuracy when every run is SFT (`dpo.objective: sft`: no pairs)."""
    has_excess = any(doc["run"].get("specialists", True) for _, doc in runs)
    metrics = list(DEFAULT_METRICS if has_excess else NO_SPECIALIST_METRICS)
    if all((doc["run"].get("dpo") or {}).get("objective") == "sft" for _, doc in runs):
        metrics = [m if m != "rewards/accuracies" else "nll" for m in metrics]
    return metrics


def label_runs(args: list[str]) -> list[tuple[str, str]]:
    """`DIR` or `DIR=LABEL` -> (label, dir); the label defaults to the directory's last part."""
    out = []
    for arg in args:
        path, _, label = arg.partition("=")
        out.append((label or path.rstrip("/").rsplit("/", 1)[-1], path))
    return out


def _references(doc: dict) -> dict:
    """What every seed of a run is measured against: the base's and each specialist's metrics."""
    return {"base": (doc["models"].get("base") or {}).get("per_task"),
            "specialists": doc["aggregates"].get("specialists_own_task", {})}


def merge_same_label(runs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Runs that share a label become one: a job's seeds trained in separate directories (a
    seed per cluster job, a rerun of the seeds a lost machine took with it) pair as one study.

    That is only fair when every directory measured its generalists against the same base and
    specialists, so their metrics must be equal value for value (a deterministic rerun of the
    earlier stages gives them bit for bit); a seed that two directories hold must also be equal.
    Either mismatch is a ConfigError. The first directory's `run` and aggregates are kept."""
    merged: dict[str, dict] = {}
    for label, doc in runs:
        if label not in merged:
            merged[label] = {**doc, "models": dict(doc["models"])}
            continue
        into = merged[label]
        for what, first, other in (("tasks", [t["name"] for t in into["tasks"]], [t["name"] for t in doc["tasks"]]),
                                   ("split", into["run"]["split"], doc["run"]["split"]),
                                   ("base and specialists", _references(into), _references(doc))):
            if first != other:
                raise ConfigError(f"the directories labelled '{label}' differ in their {what}, so their seeds are not one study",
                                  where=label, fix="give each directory its own label, or rerun the earlier stages with the same config")
        for key, entry in doc["models"].items():
            if key in into["models"] and into["models"][key]["per_task"] != entry["per_task"]:  # paths, times may differ
                raise ConfigError(f"'{key}' is in two directories labelled '{label}' with different metrics", where=label,
                                  fix="label one of them differently, or keep one copy of that seed")
            into["models"].setdefault(key, entry)
    return list(merged.items())


def rows_of(label: str, doc: dict) -> dict[str, dict]:
    """Row name -> {"reference": bool, "per_seed": {seed: flat metrics}} (`schema.flat_metrics`
    keys): the base and the specialists on their own tasks (references), then each generalist
    algorithm with one entry per seed, then each merged model (`"deterministic": True`: its one
    value under every generalist seed, so `--paired` tests a generalist's seeds against it)."""
    rows: dict[str, dict] = {}
    models = doc["models"]
    if "base" in models:
        rows[f"{label} base"] = {"reference": True, "per_seed": {0: flat_metrics(models["base"])}}
    own = doc["aggregates"].get("specialists_own_task", {})
    if own:  # each specialist on its own task; mean and worst over those, as for one model
        entry = {"per_task": own, "aggregates": model_aggregates(own, set(doc.get("lower_is_better", ())))}
        rows[f"{label} specialists (own task)"] = {"reference": True, "per_seed": {0: flat_metrics(entry)}}
    for entry in models.values():
        if entry["kind"] == "generalist":
            row = rows.setdefault(f"{label} {entry['algorithm']}", {"reference": False, "per_seed": {}})
            row["per_seed"][entry["seed"]] = flat_metrics(entry)
    seeds = sorted({e["seed"] for e in models.values() if e["kind"] == "generalist"}) or [0]
    for entry in models.values():
        if entry["kind"] == "merged":  # one model, no seed: a fixed value beside every generalist seed
            rows[f"{label} {entry['algorithm']}"] = {"reference": False, "deterministic": True,
                                                     "per_seed": {s: flat_metrics(entry) for s in seeds}}
    return rows


def table(runs: list[tuple[str, dict]], metric: str, references: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one metric: every run's generalists (and the first run's base and
    specialists when `references`)."""
    tasks = [t["name"] for t in runs[0][1]["tasks"]]
    for label, doc in runs[1:]:
        if [t["name"] for t in doc["tasks"]] != tasks:
            raise ConfigError(f"run '{label}' has tasks {[t['name'] for t in doc['tasks']]}, the first run {tasks}",
                              where=label, fix="compare runs of the same tasks")
    header = ["run / model", *tasks, "mean", "worst", "seeds"]
    body = []
    for i, (label, doc) in enumerate(runs):
        for name, row in rows_of(label, doc).items():
            if row["reference"] and not (references and i == 0):
                continue
            cells = []
            seeds = list(row["per_seed"].values())[:1] if row.get("deterministic") else row["per_seed"].values()
            for col in (*tasks, "mean", "worst"):
                vals = [v[f"{metric}/{col}"] for v in seeds if v.get(f"{metric}/{col}") is not None]
                cells.append(fmt(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals)) if vals else "–")
            count = "one model" if row.get("deterministic") else str(len(row["per_seed"]))
            body.append([name, *cells, "" if row["reference"] else count])
    return header, body


def _pair_rows(runs: list[tuple[str, dict]], a: str, b: str) -> tuple[dict, dict]:
    """The `rows_of` entries of rows a and b; ConfigError when either is missing or two
    generalist rows share no seed."""
    rows: dict[str, dict] = {}
    for label, doc in runs:
        rows.update(rows_of(label, doc))
    for name in (a, b):
        if name not in rows:
            raise ConfigError(f"no row '{name}'", where="--paired", fix=f"use row names from the table: {', '.join(rows)}")
    ra, rb = rows[a], rows[b]
    if not (ra.get("deterministic") or rb.get("deterministic")) and not set(ra["per_seed"]) & set(rb["per_seed"]):
        raise ConfigError(f"'{a}' (seeds {sorted(ra['per_seed'])}) and '{b}' (seeds {sorted(rb['per_seed'])}) share no seed",
                          where="--paired", fix="pair rows trained on the same generalist.seeds")
    return ra, rb


def _seed_values(ra: dict, rb: dict, key: str) -> tuple[dict, dict]:
    """({seed: a's value}, {seed: b's value}) of `key` (`metric/column`). A merged model's one
    value stands beside every seed of the other side (its own run's seeds need not be the other
    run's)."""
    va, vb = ({s: m.get(key) for s, m in row["per_seed"].items()} for row in (ra, rb))
    if ra.get("deterministic"):
        va = dict.fromkeys(vb, next(iter(va.values())))
    elif rb.get("deterministic"):
        vb = dict.fromkeys(va, next(iter(vb.values())))
    return va, vb


def paired_table(runs: list[tuple[str, dict]], metrics: list[str], a: str, b: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-seed differences a - b (`ama_ray.report.stats.paired`: bootstrap
    interval, sign test): one row per metric and column (the worst task, the mean over tasks,
    then each task). Two merged rows are shown, not tested (no seeds); a metric neither row has
    on a column is `–`; ConfigError when no requested metric has a value at all."""
    ra, rb = _pair_rows(runs, a, b)
    tasks = [t["name"] for t in runs[0][1]["tasks"]]
    lower = set().union(*(doc.get("lower_is_better", ()) for _, doc in runs))
    header = ["metric", "task", "a − b per seed", "mean", "95% bootstrap CI", "seeds better", "sign test p", "verdict"]
    body, tested = [], 0
    both_merged = ra.get("deterministic") and rb.get("deterministic")
    for metric in metrics:
        for column in ("worst", "mean", *tasks):
            key = f"{metric}/{column}"
            if both_merged:
                one, two = (next(iter(r["per_seed"].values())).get(key) for r in (ra, rb))
                body.append([f"`{metric}`", column, f"{fmt(one)} − {fmt(two)}: one model each (merged models have no seeds)",
                             "–", "–", "–", "–", "not tested"])
                tested += one is not None and two is not None
                continue
            result = stats.paired_over_seeds(*_seed_values(ra, rb, key))
            if result is None:
                body.append([f"`{metric}`", column, "–", "–", "–", "–", "–", "–"])
                continue
            tested += 1
            body.append([f"`{metric}`", column, ", ".join(f"{s}: {stats.signed(d)}" for s, d in zip(result.seeds, result.diffs)),
                         stats.signed(result.mean), result.interval(), result.better(metric in lower),
                         f"{result.sign_p:.3g}", result.verdict()])
    if not tested:
        raise ConfigError(f"'{a}' and '{b}' have no {' or '.join(metrics)} in common", where="--paired",
                          fix="pair on a metric both rows have (--metric; runs without specialists have no excess_loss: use loss)")
    return header, body


def split_of(runs: list[tuple[str, dict]]) -> str:
    """The split every run's metrics.json was computed on; ConfigError if they differ."""
    splits = {doc["run"]["split"] for _, doc in runs}
    if len(splits) != 1:
        raise ConfigError(f"the runs were evaluated on different splits ({', '.join(sorted(splits))})", where="ama-ray compare",
                          fix="compare runs evaluated by the same ama_ray version (rerun `ama-ray evaluate --force evaluate`)")
    return splits.pop()


def render(runs: list[tuple[str, dict]], metrics: list[str], pairs: list[tuple[str, str]]) -> str:
    blocks: list[tuple] = []
    for metric in metrics:
        header, body = table(runs, metric)
        blocks += [("h3", f"`{metric}` ({split_of(runs)} split; mean ± std over seeds)"), ("table", header, body)]
    for a, b in pairs:
        blocks += [("h3", f"Paired differences: {a} − {b} (per seed; separated: the bootstrap interval excludes 0)"),
                   ("table", *paired_table(runs, metrics, a, b))]
    return to_markdown(blocks)
