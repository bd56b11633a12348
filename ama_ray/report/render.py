"""The verdict, the summary tables, and one document rendered as Markdown and as self-contained HTML.

A report is a list of blocks (`("h2", text)`, `("p", text)`, `("list", items)`,
`("table", header, rows)`, `("img", file name, caption)`); text may use `**bold**` and
`` `code` ``. The Markdown links the PNG files next to it; the HTML embeds them as base64.
"""

from __future__ import annotations

import base64
import html
import math
import re

from ama_ray.report import stats

# (flat key, words, lower is better): the verdict's criteria, most important first.
CRITERIA = (
    ("excess_loss/worst", "worst-task excess loss", True),
    ("excess_loss/mean", "mean excess loss", True),
    ("rewards/accuracies/worst", "worst-task reward accuracy", False),
    ("rewards/accuracies/mean", "mean reward accuracy", False),
    ("generation/accuracy/worst", "worst-task generation accuracy", False),
    ("generation/accuracy/mean", "mean generation accuracy", False),
)
# Without specialists (`mixing.excess_target` none or history, no merging) there is no excess:
# the worst task's held-out loss leads instead.
LOSS_CRITERIA = (
    ("loss/worst", "worst-task loss", True),
    ("loss/mean", "mean loss", True),
    *CRITERIA[2:],
)
Block = tuple


def fmt(value: float | None, std: float | None = None, n: int | None = None) -> str:
    """`0.123`, or `0.123 ± 0.004` when several seeds were averaged; `–` for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.3f}"
    if n is not None and n > 1 and std is not None:
        text += f" ± {std:.3f}"
    return text


def verdict(doc: dict) -> tuple[str, list[str]]:
    """(headline, one line per criterion) computed from the per-algorithm aggregates.

    With several seeds the values are mean ± sample std, and a lead is "separated" only when the
    paired per-seed differences' bootstrap interval excludes 0 (`ama_ray.report.stats.paired`,
    the same verdict as `ama-ray compare --paired`).
    """
    algos = doc["aggregates"]["algorithms"]
    if not algos:
        return "No generalist was evaluated: nothing to compare.", []
    lines, caveats, winners = [], {}, {}
    with_excess = any("excess_loss/worst" in a["mean"] for a in algos.values())
    for key, words, lower in CRITERIA if with_excess else LOSS_CRITERIA:
        ranked = sorted((a for a in algos if key in algos[a]["mean"]), key=lambda a: algos[a]["mean"][key], reverse=not lower)
        if not ranked:
            continue
        best = winners[key] = ranked[0]
        line = f"Best {words}: **{best}** ({_cell(algos[best], key)})"
        if len(ranked) > 1:
            second = ranked[1]
            gap = abs(algos[best]["mean"][key] - algos[second]["mean"][key])
            if gap < 1e-12:
                caveats[key] = f"tied with {second}"
                line = f"Best {words}: a tie between **{best}** and **{second}** ({_cell(algos[best], key)})"
            else:
                line += f", next {second} ({_cell(algos[second], key)})"
                result = _paired(algos[best], algos[second], key)
                if algos[best].get("deterministic") and algos[second].get("deterministic"):
                    caveats[key] = f"not tested against {second}: one model each (merged models have no seeds)"
                elif result is None:
                    if len(algos[best]["seeds"]) > 1:
                        caveats[key] = f"not separated from {second}: no seeds in common to pair"
                elif len(result.diffs) == 1:
                    caveats[key] = f"one seed: not tested against {second}"
                elif not result.separated:
                    caveats[key] = f"not separated from {second}: {result.describe(lower)}"
                if key in caveats:
                    line += "; " + caveats[key]
                elif result is not None and len(result.diffs) > 1:
                    line += f"; paired over seeds: {result.describe(lower)}"
        lines.append(line + ".")
    if len(algos) == 1:
        only = next(iter(algos))
        return f"Only one algorithm was trained (**{only}**): no comparison; see the tables against the base and specialists.", lines
    split = doc["run"]["split"]
    if with_excess:
        key, mean_key, mean_words = "excess_loss/worst", "excess_loss/mean", "average excess loss"
        headline = f"**{winners[key]}** keeps the worst task closest to its specialist (lowest worst-task {split}-split excess loss"
    else:
        key, mean_key, mean_words = "loss/worst", "loss/mean", "average loss"
        headline = f"**{winners[key]}** has the lowest worst-task {split}-split loss (no specialists in this run, so no excess"
    headline += f"; {caveats[key]})" if key in caveats else ")"
    mean_best = winners.get(mean_key)
    if mean_best and mean_best != winners[key]:
        headline += f"; **{mean_best}** has the lowest {mean_words}"
    return headline + ".", lines


def _paired(a: dict, b: dict, key: str):
    """The paired comparison of two algorithms' aggregates on `key` over their shared seeds;
    None when they share none (or the aggregates predate per-seed values)."""
    if "per_seed" not in a or "per_seed" not in b:
        return None
    return stats.paired_over_seeds(dict(zip(a["seeds"], a["per_seed"].get(key, []))), dict(zip(b["seeds"], b["per_seed"].get(key, []))))


def _cell(agg: dict, key: str) -> str:
    return fmt(agg["mean"].get(key), agg["std"].get(key), 1 if agg.get("deterministic") else len(agg["seeds"]))


def metric_table(doc: dict, metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows: base, every specialist on every task (own task starred), every algorithm."""
    tasks = [t["name"] for t in doc["tasks"]]
    header = ["model", *tasks, "mean", "worst"]
    rows = []
    for key, entry in doc["models"].items():
        if entry["kind"] in ("generalist", "merged"):  # rows per arm below
            continue
        cells = [fmt(entry["per_task"].get(t, {}).get(metric)) for t in tasks]
        if entry["kind"] == "specialist":
            own = tasks.index(entry["own_task"])
            cells[own] = f"**{cells[own]}** (own)"
        rows.append([key, *cells, *(fmt(entry["aggregates"][s].get(metric)) for s in ("mean", "worst"))])
    for algo, agg in doc["aggregates"]["algorithms"].items():
        n = len(agg["seeds"])
        label = f"{algo} (one model)" if agg.get("deterministic") else f"{algo} ({n} seed{'s' if n > 1 else ''})"
        rows.append([label, *(_cell(agg, f"{metric}/{s}") for s in (*tasks, "mean", "worst"))])
    return header, rows


# --- rendering ---------------------------------------------------------------------------------

def to_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + block[1])
        elif kind == "p":
            out.append(block[1])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]  # a cell's | is text
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})\n\n*{block[2]}*")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def to_html(blocks: list[Block], images: dict[str, bytes], title: str) -> str:
    """One HTML file with every image embedded (`data:image/png;base64,...`)."""
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(images[block[1]]).decode()
            body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{_inline(block[2])}</figcaption></figure>")
    return _PAGE.format(title=html.escape(title), body="\n".join(body))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ margin: 1em 0 2em; }} img {{ max-width: 100%; }} figcaption {{ font-size: 0.85em; color: #555; }}
li {{ margin: 0.3em 0; }}
</style></head><body>
{body}
</body></html>
"""
