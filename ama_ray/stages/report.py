"""report: `report/report.md` and a self-contained `report/report.html`, plus the PNGs, from saved files.

Reads only the run directory (`ama_ray.report.sources`): eval/metrics.json, the generalists'
mixing histories, TensorBoard event files and, when present, tune/results.csv. So
`ama-ray report --run-dir DIR` rebuilds the report of any finished run without its config.
"""

from __future__ import annotations

import logging

from ama_ray.config import Config, short_hash
from ama_ray.report import plots, render, sources
from ama_ray.report.schema import model_aggregates
from ama_ray.stages.evaluate import load_metrics
from ama_ray.storage import METRICS_CSV, METRICS_JSON, REPORT_HTML, REPORT_MD, RunDir

log = logging.getLogger(__name__)
STAGE = "report"
REPORT_VERSION = 4  # bump when the report text or plots change, so committed reports are rebuilt
# (metric, axis label) of the per-task bar charts, in report order.
BAR_METRICS = (
    ("excess_loss", "clipped excess loss (lower is better)"),
    ("rewards/accuracies", "reward accuracy"),
    ("logps/accuracies", "log-prob accuracy"),
    ("generation/accuracy", "generation accuracy (verifier)"),
)
TABLE_METRICS = ("excess_loss", "rewards/accuracies", "logps/accuracies", "generation/accuracy", "loss")


def run(cfg: Config, force: set[str] = frozenset(), run_dir: str | None = None) -> list[str]:
    """Build the report of `run_dir` (default: the config's run directory); returns report.md and report.html.

    Skips when committed for the same evaluation and Tune results unless "report" is in `force`.
    Raises StageInputError when eval/metrics.json is missing.
    """
    run = RunDir(run_dir) if run_dir else RunDir(cfg.run_dir)
    doc = load_metrics(run)
    run.check_writable()
    run.lock("ama-ray report")
    unit = run.report()
    files = [unit.file(REPORT_MD), unit.file(REPORT_HTML)]
    digest = report_hash(run)
    if STAGE not in force and unit.is_committed(digest):
        log.info("report: up to date, skipping (%s)", files[1])
        log_verdict(doc)
        return files
    blocks, images = build(run, doc)
    title = f"AMA report: {doc['run']['run_name']}"
    unit.begin()
    for name, png in images.items():
        with unit.fs.open_output_stream(unit.file(name)) as out:
            out.write(png)
    with unit.fs.open_output_stream(files[0]) as out:
        out.write(render.to_markdown(blocks).encode())
    with unit.fs.open_output_stream(files[1]) as out:
        out.write(render.to_html(blocks, images, title).encode())
    unit.commit(digest, stage=STAGE, images=sorted(images), flags=len(doc["flags"]))
    log.info("report: %s", files[1])
    log_verdict(doc)
    return files


def log_verdict(doc: dict) -> None:
    """The report's verdict on the console, so the answer is there when the run ends."""
    headline, lines = render.verdict(doc)
    log.info("verdict: %s", headline.replace("**", ""))
    for line in lines:
        log.info("  %s", line.replace("**", ""))


def report_hash(run: RunDir) -> str:
    """The evaluation it shows, the Tune results and the report version."""
    man = run.evaluation().manifest() or {}
    tune = sources.load_tune(run)
    inputs = {"eval": [man.get("config_hash"), man.get("committed_at")], "tune": tune, "version": REPORT_VERSION,
              "partition": (run.partition().manifest() or {}).get("config_hash")}
    return short_hash(inputs)


def build(run: RunDir, doc: dict) -> tuple[list[tuple], dict[str, bytes]]:
    """The report's blocks and its PNGs ({file name: bytes})."""
    tasks = [t["name"] for t in doc["tasks"]]
    images: dict[str, bytes] = {}
    headline, lines = render.verdict(doc)
    info = doc["run"]
    split = info["split"]
    blocks: list[tuple] = [
        ("h1", f"AMA report: {info['run_name']}"),
        ("p", f"Run directory `{info['run_dir']}`; base model `{info['base_model']}`; evaluated {info['created_at'][:19]} UTC. "
              f"Tasks ({split} examples): " + ", ".join(f"{t['name']} ({t[f'{split}_examples']})" for t in doc["tasks"]) + ". "
              f"Every number below is on the **{split}** split; checkpoints and settings were selected on the validation "
              "split, which no table reports."),
        ("h2", "Verdict"), ("p", headline), ("list", lines),
        ("h2", "Flags"), flags_block(doc),
        *partition_section(run),
        ("h2", f"Metrics per task ({split} split)"),
        ("p", "Bars: the base, each task's specialist on its own task, each generalist (mean over seeds, error bar: "
              "std) and each merged model (`merge_<method>`, one model: docs/merging.md). " + excess_words(info) +
              " In the tables a specialist is shown on every task; its own task is marked (own)."),
    ]
    for metric, label in BAR_METRICS:
        bars = metric_bars(doc, metric, label)
        if bars is not None:
            images[f"bars_{metric.replace('/', '_')}.png"] = bars
            blocks.append(("img", f"bars_{metric.replace('/', '_')}.png", f"{metric} per task ({split} split)."))
    for metric in TABLE_METRICS:
        if not any(metric in m for e in doc["models"].values() for m in e["per_task"].values()):
            continue  # e.g. no excess without specialists
        header, rows = render.metric_table(doc, metric)
        blocks += [("h3", f"`{metric}` ({split} split)"), ("table", header, rows)]
    blocks += dynamics(run, doc, tasks, images)
    blocks += tune_section(run, images)
    evaluation = run.evaluation()
    blocks += [("h2", "Files"), ("p", f"Every number above is in `{evaluation.file(METRICS_JSON)}` and `{evaluation.file(METRICS_CSV)}` "
                                       "(schema: docs/metrics.md).")]
    return blocks, images


def partition_section(run: RunDir) -> list[tuple]:
    """With `data.partition`: the tasks it found, their sizes, the prompts nearest each cluster's
    centre and, when the rows carried labels, how the clusters match them."""
    man = run.partition().manifest()
    if man is None:
        return []
    labelled = man.get("ari") is not None
    cell = lambda text: " ".join(text.split())  # noqa: E731  one line per prompt
    header = ["task", "rows", *(["known labels"] if labelled else []), "prompts nearest the cluster's centre"]
    rows = [[name, str(size), *([", ".join(f"{label} {n}" for label, n in man["contingency"][name].items())] if labelled else []),
             " · ".join(cell(p) for p in man["examples"][name])] for name, size in man["sizes"].items()]
    text = (f"The tasks were found by `data.partition`: {man['rows']} rows pooled and split into {man['k']} clusters by k-means "
            f"on {'the base model’s prompt embeddings' if man['method'] == 'embedding' else 'the prompts’ TF-IDF vectors'} "
            "(docs/partition.md).")
    if labelled:
        text += f" Adjusted Rand index against the {man['label_source']}: **{man['ari']:.3f}** (1 = the known tasks exactly)."
    return [("h2", "Tasks found by partitioning"), ("p", text), ("table", header, rows)]


def excess_words(info: dict) -> str:
    """What "excess loss" means in this run's tables, or why there is none."""
    if not info.get("specialists", True):
        return (f"This run has no specialists (`mixing.excess_target: {info.get('excess_target')}`, no merging), so no "
                "excess loss is reported: the generalists are compared on their own loss and accuracies.")
    loss = ("completion NLL per token (`dpo.objective: sft`)" if (info.get("dpo") or {}).get("objective") == "sft"
            else "training loss (DPO + `dpo.sft_weight` × NLL)")
    words = (f"Excess loss is the mean clipped excess of the {loss} over the "
             "specialist's on the same example (0 = as good as the specialist).")
    if info.get("excess_target", "specialist") != "specialist":
        words += (f" The generalists were trained with `mixing.excess_target: {info['excess_target']}`: the specialists "
                  "serve as a yardstick here (and for merging), not as their mixing target.")
    return words


def flags_block(doc: dict) -> tuple:
    if not doc["run"].get("specialists", True) and not doc["flags"]:
        return ("p", "None (this run has no specialists to check).")
    if not doc["flags"]:
        return ("p", f"None: every specialist clearly beat the base on its own task's {doc['run']['split']} split.")
    return ("list", [f"**WARNING ({f['kind']})**: {f['message']} {f['fix']}" for f in doc["flags"]])


def metric_bars(doc: dict, metric: str, label: str) -> bytes | None:
    """Grouped bars for one metric; None when no model has it (e.g. no task with a verifier)."""
    tasks = [t["name"] for t in doc["tasks"]]
    groups = [*tasks, "mean", "worst"]
    models = doc["models"]
    series = []
    base = models["base"]
    if metric not in base.get("degenerate_metrics", []):
        series.append({"label": "base", "color": plots.BASE_COLOR, "values": _values(base, metric, tasks)})
    own = doc["aggregates"]["specialists_own_task"]
    if own:
        lower = set(doc["lower_is_better"])
        spec = {"per_task": own, "aggregates": model_aggregates(own, lower)}
        series.append({"label": "specialist (own task)", "color": plots.SPECIALIST_COLOR, "values": _values(spec, metric, tasks)})
    for algo, agg in doc["aggregates"]["algorithms"].items():
        series.append({
            "label": algo, "color": plots.algorithm_color(algo),
            "values": [agg["mean"].get(f"{metric}/{g}") for g in groups],
            "errors": [agg["std"].get(f"{metric}/{g}") for g in groups] if len(agg["seeds"]) > 1 and not agg.get("deterministic") else None,
        })
    if all(v is None for s in series for v in s["values"]):
        return None
    note = ""
    if metric in base.get("degenerate_metrics", []):
        note = "base omitted: its implicit rewards are 0 by definition"
    elif metric == "excess_loss":
        note = "specialists: 0 on their own task by construction"
    return plots.metric_bars(groups, series, metric, label, note, split=doc["run"]["split"])


def _values(entry: dict, metric: str, tasks: list[str]) -> list:
    return [entry["per_task"].get(t, {}).get(metric) for t in tasks] + [entry["aggregates"][s].get(metric) for s in ("mean", "worst")]


def dynamics(run: RunDir, doc: dict, tasks: list[str], images: dict[str, bytes]) -> list[tuple]:
    """α and excess over steps (mixing histories) and training curves (TensorBoard)."""
    blocks: list[tuple] = [("h2", "Training dynamics")]
    histories = sources.load_histories(run, doc)
    gen_scalars = {(a, s): sources.load_scalars(run, run.generalist(a, s)) for a, s in sources.generalists(doc)}
    if histories:
        images["alpha.png"] = plots.alpha_over_steps(histories, tasks)
        images["excess_over_steps.png"] = plots.excess_over_steps(histories, tasks, gen_scalars)
        target = doc["run"].get("excess_target", "specialist")
        against = {"specialist": "the specialist's loss", "none": "0 (the raw loss)",
                   "history": "the task's history target (docs/algorithms.md)"}.get(target, target)
        blocks += [
            ("img", "alpha.png", "Mixing weight α per task over optimizer steps (AMA-S, AMA-H: sampling distribution; AMA-R: "
                                 "loss weights; baselines: their fixed mix)."),
            ("img", "excess_over_steps.png", f"Per-task clipped excess loss over steps: training batches (smoothed; over "
                                             f"{against}, the mixing target) and, where the run has specialists, the periodic "
                                             "evaluations on the validation split (over the specialist)."),
        ]
    else:
        blocks.append(("p", "No mixing history found (no generalist was trained)."))
    spec_scalars = {t: sources.load_scalars(run, run.specialist(t)) for t in tasks}
    if any(spec_scalars.values()) or any(gen_scalars.values()):
        images["training.png"] = plots.training_curves(spec_scalars, gen_scalars, tasks)
        blocks.append(("img", "training.png", "Training curves from the TensorBoard event files."))
    else:
        blocks.append(("p", "No TensorBoard event files in this run directory (written for local run directories only)."))
    return blocks


def tune_section(run: RunDir, images: dict[str, bytes]) -> list[tuple]:
    """A plot of the Tune objective per trial when `tune/results.csv` exists, else nothing."""
    rows = sources.load_tune(run)
    if rows is None:
        return []
    # The study's own objective (its manifest); older studies without one optimised the excess.
    metric = (run.tune().manifest() or {}).get("metric", sources.TUNE_OBJECTIVE)
    if not rows or metric not in rows[0]:
        return [("h2", "Tune study"), ("p", f"`tune/results.csv` has no `{metric}` column.")]
    images["tune.png"] = plots.tune_objective(rows, metric)
    usable = [r for r in rows if isinstance(r[metric], float) and r[metric] == r[metric]]
    best = (min if "loss" in metric else max)(usable, key=lambda r: r[metric]) if usable else None
    text = f"{len(rows)} trials; best `{best.get('trial_id')}` with {metric} = {best[metric]:.4f}." if best else f"{len(rows)} trials, none finished."
    return [("h2", "Tune study"), ("p", text), ("img", "tune.png", f"{metric} per trial.")]
