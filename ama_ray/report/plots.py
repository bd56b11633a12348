"""The report's figures (matplotlib, Agg backend); each function returns PNG bytes.

Colours are fixed per algorithm (the same in every figure and every run) and per task.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ama_ray.mixing.settings import ALGORITHMS  # noqa: E402
from ama_ray.report.sources import History  # noqa: E402

# One color per algorithm, in `ALGORITHMS` order (the same color in every plot and report).
ALGORITHM_COLORS = dict(zip(ALGORITHMS, ("tab:blue", "tab:orange", "tab:purple", "tab:green", "tab:red", "tab:cyan", "tab:olive")))
BASE_COLOR, SPECIALIST_COLOR = "0.65", "0.2"
TASK_COLORS = plt.get_cmap("Dark2").colors
DPI = 110


MERGE_COLORS = {"merge_average": "tab:brown", "merge_task_arithmetic": "tab:pink", "merge_ties": "tab:gray"}


def algorithm_color(algorithm: str) -> str:
    return ALGORITHM_COLORS.get(algorithm) or MERGE_COLORS.get(algorithm, "tab:brown")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average that ignores NaN (a step where the task drew no example)."""
    if window <= 1 or len(values) == 0:
        return values
    ok = ~np.isnan(values)
    sums = np.convolve(np.where(ok, values, 0.0), np.ones(window), mode="full")[: len(values)]
    counts = np.convolve(ok.astype(float), np.ones(window), mode="full")[: len(values)]
    return np.divide(sums, counts, out=np.full(len(values), np.nan), where=counts > 0)


def metric_bars(groups: list[str], series: list[dict], metric: str, ylabel: str, note: str = "", split: str = "test") -> bytes:
    """Grouped bars: one group per task (plus aggregates), one bar per model.

    `series` items: {"label", "color", "values": [per group or None], "errors": [.. or None]}.
    """
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(groups) * max(1, len(series)) * 0.45 + 2), 3.8))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, s in enumerate(series):
        vals = np.array([np.nan if v is None else v for v in s["values"]], dtype=float)
        errs = s.get("errors")
        yerr = None if errs is None else np.array([0.0 if e is None else e for e in errs], dtype=float)
        ax.bar(x - 0.4 + width * (i + 0.5), vals, width, yerr=yerr, capsize=2, label=s["label"], color=s["color"], edgecolor="white", linewidth=0.5)
    if "accuracies" in metric:
        ax.axhline(0.5, color="0.4", lw=0.8, ls=":", label="chance (0.5)")
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{metric} per task ({split} split)" + (f"\n{note}" if note else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, ncol=min(len(series), 4), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    return _png(fig)


def alpha_over_steps(histories: list[History], tasks: list[str]) -> bytes:
    """α per task over optimizer steps, one panel per generalist (dashed: running mean of α)."""
    n = len(histories)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows), squeeze=False, sharey=True)
    for ax, hist in zip(axes.flat, histories):
        for j, task in enumerate(tasks):
            alpha = hist.alpha[task]
            color = TASK_COLORS[j % len(TASK_COLORS)]
            ax.plot(hist.steps, alpha, color=color, lw=1.3, label=task)
            ax.plot(hist.steps, np.cumsum(alpha) / np.arange(1, len(alpha) + 1), color=color, lw=1, ls="--")
        ax.axhline(1 / len(tasks), color="0.5", lw=0.8, ls=":")
        ax.set_title(f"{hist.algorithm} (seed {hist.seed})", fontsize=10, color=algorithm_color(hist.algorithm))
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("α (task weight)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(tasks), fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.suptitle("Mixing weights α per task (solid: α_t, dashed: running mean, dotted: uniform 1/k)", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _png(fig)


def excess_over_steps(histories: list[History], tasks: list[str], held_out: dict[tuple[str, int], dict]) -> bytes:
    """Per-task clipped excess loss over steps, one panel per task, one line per algorithm (mean over seeds).

    Solid: training batches (smoothed); markers: held-out evaluations (`held_out[(algo, seed)]` holds
    TensorBoard scalars, may be empty).
    """
    algos = list(dict.fromkeys(h.algorithm for h in histories))
    cols = min(len(tasks), 3)
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax, task in zip(axes.flat, tasks):
        for algo in algos:
            runs = [h for h in histories if h.algorithm == algo]
            color = algorithm_color(algo)
            window = max(1, len(runs[0].steps) // 15)
            curve = np.nanmean(np.stack([smooth(h.excess[task], window) for h in _same_length(runs)]), axis=0)
            ax.plot(_same_length(runs)[0].steps, curve, color=color, lw=1.3, label=f"{algo} (train)")
            series = [held_out.get((algo, h.seed), {}).get(f"eval/excess_loss/{task}") for h in runs]
            series = [s for s in series if s is not None]
            if series:
                steps = series[0][0]
                values = np.mean([v for st, v in series if np.array_equal(st, steps)], axis=0)
                ax.plot(steps, values, color=color, ls="--", marker="o", ms=4, lw=0.9, label=f"{algo} (held-out)")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("clipped excess loss")  # over the run's mixing target (the report's caption names it)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle("Excess loss over the mixing target, per task (mean over seeds)", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _png(fig)


def _same_length(runs: list[History]) -> list[History]:
    """Runs cut to the shortest one, so seeds can be averaged step by step."""
    n = min(len(h.steps) for h in runs)
    return [History(h.algorithm, h.seed, h.steps[:n], excess={t: v[:n] for t, v in h.excess.items()}) for h in runs]


def training_curves(specialists: dict[str, dict], generalists: dict[tuple[str, int], dict], tasks: list[str]) -> bytes:
    """Two panels from TensorBoard scalars: specialists' DPO loss (or SFT NLL) per task, generalists' mean loss.

    Solid lines are training batches (smoothed), dashed lines with markers held-out evaluations.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    # DPO specialists log `dpo_loss`; SFT ones (`dpo.objective: sft`) have no pairs: their loss is the NLL.
    dpo = any(key.startswith("train/dpo_loss/") for scalars in specialists.values() for key in scalars)
    name = "dpo_loss" if dpo else "loss"
    for j, task in enumerate(tasks):
        scalars = specialists.get(task, {})
        _curve(left, scalars, f"train/{name}/{task}", f"eval/{name}/{task}", TASK_COLORS[j % len(TASK_COLORS)], task)
    if dpo:
        left.axhline(math.log(2), color="0.5", lw=0.8, ls=":", label="log 2 (the base)")
    left.set_title(f"Specialists: {'DPO loss' if dpo else 'NLL'} on their own task", fontsize=10)
    for (algo, seed), scalars in sorted(generalists.items()):
        _curve(right, scalars, "train/loss/mean", "eval/loss/mean", algorithm_color(algo), f"{algo} s{seed}")
    right.set_title("Generalists: loss, mean over tasks", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Training curves (solid: training batches, smoothed; dashed + markers: held-out)", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def _curve(ax, scalars: dict, train_tag: str, eval_tag: str, color, label: str) -> None:
    if train_tag in scalars:
        steps, values = scalars[train_tag]
        ax.plot(steps, smooth(values, max(1, len(values) // 15)), color=color, lw=1.3, label=label)
    if eval_tag in scalars:
        steps, values = scalars[eval_tag]
        ax.plot(steps, values, color=color, lw=0.9, ls="--", marker="o", ms=3.5)


def tune_objective(rows: list[dict], metric: str) -> bytes:
    """The objective of every Tune trial, sorted, best highlighted (lower is better for losses)."""
    lower = "loss" in metric
    usable = [r for r in rows if isinstance(r.get(metric), float) and not math.isnan(r[metric])]
    usable.sort(key=lambda r: r[metric], reverse=not lower)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.45 * len(usable) + 2), 3.4))
    colors = ["tab:red" if i == 0 else "tab:gray" for i in range(len(usable))]
    ax.bar(range(len(usable)), [r[metric] for r in usable], color=colors)
    ax.set_xticks(range(len(usable)), [str(r.get("trial_id", i)) for i, r in enumerate(usable)], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("trial (best first)")
    ax.set_ylabel(metric)
    ax.set_title(f"Tune study: {metric} per trial ({'lower' if lower else 'higher'} is better; best in red)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
