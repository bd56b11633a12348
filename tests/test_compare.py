"""`ama-ray compare`: tables across run directories, checked against hand-computed means and stds."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from ama_ray.cli import main
from ama_ray.report import compare
from ama_ray.stages.evaluate import load_metrics
from ama_ray.storage import RunDir

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent
TASKS = ("a", "b")


def _model(kind: str, per_task: dict[str, float], **fields) -> dict:
    return {"kind": kind, **fields, "per_task": {t: {"excess_loss": v} for t, v in per_task.items()},
            "aggregates": {"mean": {"excess_loss": statistics.fmean(per_task.values())},
                           "worst": {"excess_loss": max(per_task.values())}}}


def _doc(generalists: dict[str, dict[str, float]]) -> dict:
    models = {"base": _model("base", {"a": 0.5, "b": 0.7})}
    models.update({k: _model("generalist", v, algorithm=k.split("/")[1], seed=int(k.rsplit("seed", 1)[1]))
                   for k, v in generalists.items()})
    return {"schema_version": 2, "run": {"split": "test"}, "tasks": [{"name": t} for t in TASKS], "models": models, "lower_is_better": ["excess_loss"],
            "aggregates": {"specialists_own_task": {"a": {"excess_loss": 0.0}, "b": {"excess_loss": 0.0}}}}


RUN1 = _doc({"generalist/ama_s/seed0": {"a": 0.1, "b": 0.3}, "generalist/ama_s/seed1": {"a": 0.2, "b": 0.5},
             "generalist/balanced/seed0": {"a": 0.1, "b": 0.4}, "generalist/balanced/seed1": {"a": 0.1, "b": 0.4}})
RUN2 = _doc({"generalist/fixed/seed0": {"a": 0.3, "b": 0.2}})


def test_table_means_stds_and_reference_rows():
    header, rows = compare.table([("r1", RUN1), ("r2", RUN2)], "excess_loss")
    assert header == ["run / model", "a", "b", "mean", "worst", "seeds"]
    by_name = {r[0]: r[1:] for r in rows}
    # base and specialists only from the first run; generalists of every run
    assert list(by_name) == ["r1 base", "r1 specialists (own task)", "r1 ama_s", "r1 balanced", "r2 fixed"]
    # ama_s: b over seeds = 0.3, 0.5 -> 0.400 ± 0.141; worst per seed 0.3, 0.5 -> same
    assert by_name["r1 ama_s"] == ["0.150 ± 0.071", "0.400 ± 0.141", "0.275 ± 0.106", "0.400 ± 0.141", "2"]
    assert by_name["r2 fixed"] == ["0.300", "0.200", "0.250", "0.300", "1"]
    assert by_name["r1 specialists (own task)"][:4] == ["0.000"] * 4


def _rows(runs, metrics, a, b):
    header, rows = compare.paired_table(runs, metrics, a, b)
    return {(r[0].strip("`"), r[1]): dict(zip(header[2:], r[2:])) for r in rows}


def test_paired_differences_per_seed():
    row = _rows([("r1", RUN1)], ["excess_loss"], "r1 ama_s", "r1 balanced")[("excess_loss", "worst")]
    # worst per seed 0.3, 0.5 against 0.4, 0.4
    assert row["a − b per seed"] == "0: -0.100, 1: +0.100" and row["seeds better"] == "1 of 2 seeds lower"
    # mean 0; resampled means of (-0.1, +0.1) are -0.1, 0, +0.1: the interval spans 0
    assert (row["mean"], row["95% bootstrap CI"]) == ("+0.000", "[-0.100, +0.100]")
    assert (row["sign test p"], row["verdict"]) == ("1", "not separated")
    from ama_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="no row 'r1 fixed'"):
        compare.paired_table([("r1", RUN1)], ["excess_loss"], "r1 fixed", "r1 balanced")
    with pytest.raises(ConfigError, match=r"share no seed"):  # RUN2 trained seed 0 only; give it seed 5
        other = json.loads(json.dumps(RUN2))
        other["models"]["generalist/fixed/seed0"]["seed"] = 5
        compare.paired_table([("r1", RUN1), ("r2", other)], ["excess_loss"], "r1 ama_s", "r2 fixed")


def test_paired_table_every_column_of_every_metric():
    """Every metric on the worst task, the mean and each task, against the seeds' values by hand."""
    doc = json.loads(json.dumps(RUN1))
    for model in doc["models"].values():  # a second metric, higher is better: 1 - excess
        for entry in (*model["per_task"].values(), *model["aggregates"].values()):
            entry["rewards/accuracies"] = 1 - entry["excess_loss"]
    header, rows = compare.paired_table([("r1", doc)], ["excess_loss", "rewards/accuracies"], "r1 ama_s", "r1 balanced")
    assert [r[:2] for r in rows] == [[f"`{m}`", c] for m in ("excess_loss", "rewards/accuracies") for c in ("worst", "mean", "a", "b")]
    by = _rows([("r1", doc)], ["excess_loss", "rewards/accuracies"], "r1 ama_s", "r1 balanced")
    # task a: ama_s 0.1, 0.2 against balanced 0.1, 0.1 -> 0, +0.1; one nonzero difference, higher
    assert list(by[("excess_loss", "a")].values()) == ["0: +0.000, 1: +0.100", "+0.050", "[+0.000, +0.100]",
                                                      "0 of 2 seeds lower", "1", "not separated"]
    # mean over tasks: ama_s 0.2, 0.35 against 0.25, 0.25
    assert by[("excess_loss", "mean")]["a − b per seed"] == "0: -0.050, 1: +0.100"
    # accuracies are 1 - excess: differences flip sign, "better" counts the higher ones
    acc = by[("rewards/accuracies", "a")]
    assert (acc["a − b per seed"], acc["mean"], acc["seeds better"]) == ("0: +0.000, 1: -0.100", "-0.050", "0 of 2 seeds higher")
    # a metric neither row has: its rows are dashes beside the tested ones ...
    mixed = _rows([("r1", RUN1)], ["excess_loss", "generation/accuracy"], "r1 ama_s", "r1 balanced")
    assert all(set(v.values()) == {"–"} for k, v in mixed.items() if k[0] == "generation/accuracy")
    # ... and a one-line error when nothing at all can be paired
    from ama_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="no generation/accuracy in common"):
        compare.paired_table([("r1", RUN1)], ["generation/accuracy"], "r1 ama_s", "r1 balanced")


def test_paired_one_seed_and_one_side_missing():
    one = _rows([("r1", RUN1), ("r2", RUN2)], ["excess_loss"], "r2 fixed", "r1 balanced")[("excess_loss", "b")]
    assert one["a − b per seed"] == "0: -0.200" and one["95% bootstrap CI"] == "none (one seed)"
    assert one["verdict"] == "not separated"
    doc = json.loads(json.dumps(RUN1))
    for key in ("generalist/balanced/seed0", "generalist/balanced/seed1"):  # b has no value on task a
        del doc["models"][key]["per_task"]["a"]["excess_loss"]
    by = _rows([("r1", doc)], ["excess_loss"], "r1 ama_s", "r1 balanced")
    assert by[("excess_loss", "a")]["a − b per seed"] == "–" and by[("excess_loss", "b")]["a − b per seed"] == "0: -0.100, 1: +0.100"


def test_runs_without_specialists_compare_on_the_loss():
    doc = json.loads(json.dumps(RUN1))
    doc["run"]["specialists"] = False
    assert compare.default_metrics([("r", doc)]) == ["loss", "rewards/accuracies", "generation/accuracy"]
    assert compare.default_metrics([("r", doc), ("s", RUN1)])[0] == "excess_loss"  # one run has them
    from ama_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="no loss in common"):  # not "share no seed"
        compare.paired_table([("r1", RUN1)], ["loss"], "r1 ama_s", "r1 balanced")


def test_cli_reads_committed_evaluations(tmp_path, capsys):
    for name, doc in (("one", RUN1), ("two", RUN2)):
        unit = tmp_path / name / "eval"
        unit.mkdir(parents=True)
        (unit / "metrics.json").write_text(json.dumps(doc))
        (unit / "_manifest.json").write_text("{}")
    assert main(["compare", str(tmp_path / "one"), f"{tmp_path / 'two'}=tuned", "--metric", "excess_loss",
                 "--paired", "one ama_s", "one balanced"]) == 0
    out = capsys.readouterr().out
    assert "| tuned fixed | 0.300 | 0.200 | 0.250 | 0.300 | 1 |" in out and "Paired differences: one ama_s − one balanced" in out
    assert "| `excess_loss` | b | 0: -0.100, 1: +0.100 | +0.000 | [-0.100, +0.100] | 1 of 2 seeds lower | 1 | not separated |" in out
    assert "`excess_loss` (test split; mean ± std over seeds)" in out  # every table names its split
    # an uncommitted run directory is a one-line user error
    assert main(["compare", str(tmp_path / "missing")]) == 2


def test_paired_verdict_by_hand():
    """Against hand computations: the sign test is the exact binomial tail, the interval the
    bootstrap of the mean difference, 'separated' only when the interval excludes 0."""
    from ama_ray.report.stats import paired

    five = paired([0.10, 0.12, 0.15, 0.11, 0.09], [0.20, 0.25, 0.22, 0.30, 0.21])
    assert five.diffs == pytest.approx((-0.10, -0.13, -0.07, -0.19, -0.12))
    assert five.mean == pytest.approx(-0.122) and (five.below, five.above) == (5, 0)
    assert five.sign_p == pytest.approx(2 * 0.5**5)  # both tails of 5 of 5
    assert -0.19 <= five.low < five.mean < five.high <= -0.07 and five.separated
    mixed = paired([0.1, 0.3, 0.1, 0.2, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2])  # -0.1, +0.1, -0.1, 0, -0.1
    assert (mixed.below, mixed.above) == (3, 1) and mixed.sign_p == pytest.approx(2 * 5 / 16)  # ties dropped: 3 of 4
    assert mixed.low < 0 < mixed.high and not mixed.separated
    one = paired([0.1], [0.3])
    assert math.isnan(one.low) and not one.separated and "no interval (one seed)" in one.describe()
    same = paired([0.5, 0.5], [0.25, 0.25])  # every resample has mean +0.25
    assert same.low == same.high == 0.25 and same.separated
    assert "1 of 5 seeds higher" in mixed.describe(lower_is_better=False)
    with pytest.raises(ValueError, match="same seeds"):
        paired([0.1, 0.2], [0.1])


def test_sft_runs_compare_on_the_nll_not_reward_accuracy():
    sft = json.loads(json.dumps(RUN1))
    sft["run"]["dpo"] = {**sft["run"].get("dpo", {}), "objective": "sft"}
    assert compare.default_metrics([("r", sft)]) == ["excess_loss", "nll", "generation/accuracy"]
    assert "rewards/accuracies" in compare.default_metrics([("r", sft), ("s", RUN1)])  # a DPO run among them has pairs


def _split_by_seed(doc: dict, seed: int) -> dict:
    """A copy of `doc` holding only the generalists of `seed` (one of a job's seeds trained apart)."""
    part = json.loads(json.dumps(doc))
    part["models"] = {k: m for k, m in part["models"].items() if m["kind"] != "generalist" or m["seed"] == seed}
    return part


def test_directories_with_one_label_are_one_run_of_their_seeds(tmp_path, capsys):
    from ama_ray.errors import ConfigError

    apart = [("imb", _split_by_seed(RUN1, 0)), ("imb", _split_by_seed(RUN1, 1))]
    merged = compare.merge_same_label(apart)
    assert [label for label, _ in merged] == ["imb"]
    # the same table and the same per-seed pairs as the run that trained both seeds
    assert compare.table(merged, "excess_loss") == compare.table([("imb", RUN1)], "excess_loss")
    assert _rows(merged, ["excess_loss"], "imb ama_s", "imb balanced") == _rows([("imb", RUN1)], ["excess_loss"], "imb ama_s", "imb balanced")
    again = json.loads(json.dumps(RUN1))  # a seed held twice: the same metrics, its own path and time
    again["models"]["generalist/ama_s/seed0"].update(path="/elsewhere", eval_seconds=9.0)
    assert compare.merge_same_label([("imb", RUN1), ("imb", again)])[0][1]["models"] == RUN1["models"]
    other_specialists = _split_by_seed(RUN1, 1)
    other_specialists["aggregates"]["specialists_own_task"]["b"]["excess_loss"] = 0.01
    with pytest.raises(ConfigError, match="differ in their base and specialists"):
        compare.merge_same_label([apart[0], ("imb", other_specialists)])
    rerun = json.loads(json.dumps(RUN1))
    rerun["models"]["generalist/ama_s/seed0"]["per_task"]["a"]["excess_loss"] = 0.11
    with pytest.raises(ConfigError, match="'generalist/ama_s/seed0' is in two directories"):
        compare.merge_same_label([("imb", RUN1), ("imb", rerun)])
    with pytest.raises(ConfigError, match="differ in their split"):
        compare.merge_same_label([apart[0], ("imb", {**apart[1][1], "run": {"split": "validation"}})])
    # the CLI as typed: two directories, one label
    for name, (_, doc) in zip(("seed0", "seed1"), apart):
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "eval" / "metrics.json").write_text(json.dumps(doc))
        (tmp_path / name / "eval" / "_manifest.json").write_text("{}")
    assert main(["compare", f"{tmp_path / 'seed0'}=imb", f"{tmp_path / 'seed1'}=imb", "--metric", "excess_loss",
                 "--paired", "imb ama_s", "imb balanced"]) == 0
    assert "| `excess_loss` | b | 0: -0.100, 1: +0.100 | +0.000 | [-0.100, +0.100] | 1 of 2 seeds lower | 1 | not separated |" in capsys.readouterr().out


def test_kept_real_model_evidence_reads_and_matches_results_md(capsys):
    """docs/evidence/smollm2_imbalance is what docs/results.md's 10:1:1 verdicts rest on: this
    ama_ray still reads it (a schema change must carry it along), and the page's per-seed
    worst-task excess is the file's."""
    evidence = ROOT / "docs" / "evidence" / "smollm2_imbalance"
    assert main(["compare", f"{evidence}=imb", "--metric", "excess_loss", "--paired", "imb ama_s", "imb balanced"]) == 0
    out = capsys.readouterr().out
    assert "| imb ama_s |" in out and "0: -0.034, 1: -0.280, 2: -0.067" in out
    results = (ROOT / "docs" / "results.md").read_text()
    per_seed = " ".join(results.split("Per seed (0 / 1 / 2), worst-task excess:", 1)[1].split("\n\n", 1)[0].split())
    doc = load_metrics(RunDir(str(evidence)))
    for algo, label in (("ama_s", "AMA-S"), ("ama_r", "AMA-R"), ("balanced", "balanced"), ("proportional", "proportional")):
        worst = [doc["models"][f"generalist/{algo}/seed{s}"]["aggregates"]["worst"]["excess_loss"] for s in (0, 1, 2)]
        assert f"{label} " + " / ".join(f"{w:.3f}" for w in worst) in per_seed, (label, worst, per_seed)
