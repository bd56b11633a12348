"""The evaluate and report stages on a finished minimal run (the session's `tiny_run`), plus pure
unit tests of the verdict, the aggregates, the specialist flag and greedy-generation scoring."""

from __future__ import annotations

from types import SimpleNamespace

import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ama_ray.report import render
from ama_ray.report.schema import aggregate_algorithms, model_aggregates
from ama_ray.stages import evaluate, report
from ama_ray.storage import RunDir

LOG2 = math.log(2)
METRICS = {"loss", "dpo_loss", "nll", "excess_loss", "rewards/accuracies", "rewards/margins", "logps/accuracies"}


def _copy_run(cfg, src: Path, root: Path):
    """A writable copy of a run directory and a config pointing at it."""
    shutil.copytree(src, root / cfg.storage.run_name, ignore=shutil.ignore_patterns("_checkpoints"))
    copy = cfg.model_copy(deep=True)
    copy.storage.path = str(root)
    return copy


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    """(cfg, run dir, metrics.json) of a copy of the session's run after `evaluate.run`."""
    cfg, path = tiny_run
    cfg = _copy_run(cfg, path, tmp_path_factory.mktemp("eval_run"))
    files = evaluate.run(cfg)
    run = Path(cfg.run_dir)
    assert files == [str(run / "eval" / "metrics.json"), str(run / "eval" / "metrics.csv")]
    return cfg, run, json.loads((run / "eval" / "metrics.json").read_text())


# The first test that uses `evaluated` may build the session's `tiny_run` (a few minutes on 2 CPUs)
# inside its setup, which counts against its timeout; the evaluation itself takes ~15 s.
@pytest.mark.timeout(900)
def test_metrics_schema_and_csv(evaluated):
    cfg, run, doc = evaluated
    tasks = cfg.task_names
    assert doc["schema_version"] == 2 and doc["run"]["split"] == "test"
    assert set(doc) == {"schema_version", "run", "tasks", "lower_is_better", "models", "aggregates", "flags"}
    for entry in doc["tasks"]:
        rows = json.loads((run / "prepared" / entry["name"] / "_manifest.json").read_text())["rows"]
        assert (entry["test_examples"], entry["validation_examples"], entry["train_examples"]) == (rows["test"], rows["validation"], rows["train"])
    assert [t["name"] for t in doc["tasks"]] == tasks and all(t["verifier"] for t in doc["tasks"])
    expected = {"base", *(f"specialist/{t}" for t in tasks)}
    expected |= {f"generalist/{a}/seed{s}" for a in cfg.generalist.algorithms for s in cfg.generalist.seeds}
    expected |= {f"merged/{m}" for m in cfg.merging.methods}
    assert cfg.merging.methods and set(doc["models"]) == expected
    for key, entry in doc["models"].items():
        assert set(entry["per_task"]) == set(tasks), key  # specialists too: every model on every task
        for task in tasks:
            assert set(entry["per_task"][task]) == METRICS | {"generation/accuracy"}, (key, task)
        worst = max(entry["per_task"][t]["excess_loss"] for t in tasks)
        assert entry["aggregates"]["worst"]["excess_loss"] == pytest.approx(worst)
        assert entry["aggregates"]["worst"]["logps/accuracies"] == pytest.approx(min(entry["per_task"][t]["logps/accuracies"] for t in tasks))
    assert set(doc["aggregates"]["algorithms"]) == {*cfg.generalist.algorithms, *(f"merge_{m}" for m in cfg.merging.methods)}
    rows = list(csv.DictReader(io.StringIO((run / "eval" / "metrics.csv").read_text())))
    n_values = sum(len(m) for e in doc["models"].values() for m in e["per_task"].values())
    n_values += sum(len(m) for e in doc["models"].values() for m in e["aggregates"].values())
    assert len(rows) == n_values
    row = next(r for r in rows if r["model"] == "specialist/refusal" and r["task"] == "arithmetic" and r["metric"] == "loss")
    assert float(row["value"]) == pytest.approx(doc["models"]["specialist/refusal"]["per_task"]["arithmetic"]["loss"])
    assert row["own_task"] == "refusal" and row["kind"] == "specialist"
    assert (run / "eval" / "_manifest.json").exists()


@pytest.mark.timeout(120)
def test_merged_models_are_built_selected_on_validation_and_reported(evaluated, tmp_path):
    """The merge stage's units (λ kept = the lowest validation worst-task excess of its grid; the
    average is the specialists' mean), then the merged arms in metrics.json, the report and compare."""
    from safetensors.torch import load_file

    from ama_ray.report import compare, stats

    cfg, run, doc = evaluated
    for method in cfg.merging.methods:
        man = json.loads((run / "merged" / method / "_manifest.json").read_text())
        assert man["method"] == method and man["selected_on"] == "validation" and man["lora"] is False
        grid = [c["lambda"] for c in man["candidates"]]
        assert grid == ([None] if method == "average" else cfg.merging.lambdas)
        best = min(man["candidates"], key=lambda c: c["eval/excess_loss/worst"])
        assert man["lambda"] == best["lambda"]
        entry = doc["models"][f"merged/{method}"]
        assert entry["kind"] == "merged" and entry["algorithm"] == f"merge_{method}" and "seed" not in entry
        arm = doc["aggregates"]["algorithms"][f"merge_{method}"]
        assert arm["deterministic"] and arm["seeds"] == cfg.generalist.seeds
        assert arm["mean"]["excess_loss/worst"] == pytest.approx(entry["aggregates"]["worst"]["excess_loss"])
    # The candidates were scored on validation: the first eval.max_examples rows of each task.
    from ama_ray import dpo
    from ama_ray.models.loading import load_model, load_tokenizer
    from ama_ray.train.data import load_task_split, rows_of
    from ama_ray.train.metrics import evaluate_rows, metrics_from_sums

    path = str(run / "merged" / "average" / "model")
    net, pad = load_model(path), load_tokenizer(path).pad_token_id
    kept = json.loads((run / "merged" / "average" / "_manifest.json").read_text())["candidates"][0]["eval/excess_loss/worst"]
    for split, same in (("validation", True), ("test", False)):
        rows = [rows_of(load_task_split(RunDir(str(run)), t, split, with_scores=True, limit=cfg.eval.max_examples)) for t in cfg.task_names]
        flat = metrics_from_sums(evaluate_rows(net, rows, dpo.DPOLossConfig(**cfg.dpo.to_dict()), pad, 64), cfg.task_names, "eval")
        assert (abs(flat["eval/excess_loss/worst"] - kept) < 1e-5) == same, split
    merged = load_file(run / "merged" / "average" / "model" / "model.safetensors")
    tuned = [load_file(run / "specialists" / t / "model" / "model.safetensors") for t in cfg.task_names]
    assert len(merged) > 5 and set(merged) == set(tuned[0])
    for name, tensor in merged.items():
        assert torch.allclose(tensor, sum(t[name] for t in tuned) / len(tuned), atol=1e-6), name
    assert any(not torch.equal(merged[n], tuned[0][n]) for n in merged)
    report.run(cfg)
    text = (run / "report" / "report.md").read_text()
    assert "merge_average (one model)" in text and "merge_ties (one model)" in text
    runs = [("r", doc)]
    header, body = compare.table(runs, "excess_loss")
    row = next(r for r in body if r[0] == "r merge_task_arithmetic")
    assert row[-1] == "one model" and "±" not in row[-2]
    _, rows = compare.paired_table(runs, ["excess_loss"], "r ama_s", "r merge_average")
    diff = doc["aggregates"]["algorithms"]["ama_s"]["mean"]["excess_loss/worst"] - arm_value(doc, "merge_average")
    assert rows[0][:2] == ["`excess_loss`", "worst"] and f"0: {stats.signed(diff)}" in rows[0][2]


def arm_value(doc: dict, arm: str) -> float:
    return doc["aggregates"]["algorithms"][arm]["mean"]["excess_loss/worst"]


@pytest.mark.timeout(60)
def test_base_is_its_own_reference(evaluated):
    """Loss log 2 and zero implicit rewards; log-prob accuracy agrees with the reference stage's log-probs."""
    cfg, run, doc = evaluated
    base = doc["models"]["base"]
    assert base["reference_check"]["max_abs_dpo_loss_minus_log2"] < 1e-5
    assert base["reference_check"]["max_abs_reward_margin"] < 1e-4
    assert base["degenerate_metrics"] == ["rewards/accuracies", "rewards/margins"]
    for task in cfg.task_names:
        metrics = base["per_task"][task]
        assert metrics["dpo_loss"] == pytest.approx(LOG2, abs=1e-5)
        assert metrics["rewards/accuracies"] == 0.0 and metrics["rewards/margins"] == 0.0
        ref = pq.read_table(run / "reference" / task / "test.parquet").to_pydict()
        agree = np.mean(np.array(ref["ref_chosen_logps"]) > np.array(ref["ref_rejected_logps"]))
        assert metrics["logps/accuracies"] == pytest.approx(agree, abs=0.02)  # batching round-off may flip near-ties


@pytest.mark.timeout(60)
def test_specialists_against_their_scores_and_the_base(evaluated):
    cfg, run, doc = evaluated
    base = doc["models"]["base"]["per_task"]
    for task in cfg.task_names:
        own = doc["models"][f"specialist/{task}"]["per_task"][task]
        # Same model, same examples as the score stage's test split: evaluate reports on test, not on
        # the validation split that selected the specialist's checkpoint.
        # (A specialist's loss on its own task can be ~1e-5: compare relative to it.)
        test = float(pq.read_table(run / "scores" / task / "test.parquet").column("specialist_loss").to_numpy().mean())
        validation = float(pq.read_table(run / "scores" / task / "validation.parquet").column("specialist_loss").to_numpy().mean())
        assert own["loss"] == pytest.approx(test, rel=1e-3, abs=1e-8)
        assert abs(own["loss"] - validation) > 10 * abs(own["loss"] - test), (task, own["loss"], test, validation)
        assert own["excess_loss"] < 1e-4
        assert own["logps/accuracies"] > base[task]["logps/accuracies"] or own["rewards/accuracies"] > 0.5, task
    assert max(base[t]["generation/accuracy"] for t in cfg.task_names) >= 0.3  # the SFT base generates
    assert not [f for f in doc["flags"] if f["kind"] == "reference_mismatch"]


@pytest.mark.timeout(60)
def test_generation_accuracy_matches_an_unbatched_greedy_loop(evaluated):
    """The stage's batched, left-padded `generate` against one prompt at a time with argmax, no cache."""
    from ama_ray.models.loading import load_model, load_tokenizer

    cfg, run, doc = evaluated
    path = doc["run"]["base_model"]
    model, tok = load_model(path), load_tokenizer(path)
    n = cfg.eval.generation_examples
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only spin against the Ray workers
    try:
        counts = {task: _greedy_correct(model, tok, run, task, n, cfg.eval.max_new_tokens) for task in ("arithmetic", "brackets")}
    finally:
        torch.set_num_threads(threads)
    for task, correct in counts.items():
        assert doc["models"]["base"]["per_task"][task]["generation/accuracy"] == pytest.approx(correct / n, abs=1.01 / n)


def _greedy_correct(model, tok, run: Path, task: str, n: int, max_new_tokens: int) -> int:
    """Verified completions among the first n held-out prompts, decoding one prompt at a time."""
    from ama_ray.data.benchmark import verify

    rows = pq.read_table(run / "prepared" / task / "test.parquet").sort_by("example_id").slice(0, n).to_pylist()
    declared = model.generation_config.eos_token_id  # the tiny model also ends a chat turn
    stops = {tok.eos_token_id, *(declared if isinstance(declared, list) else [declared])}
    correct = 0
    for row in rows:
        ids, new = list(row["prompt_input_ids"]), []
        with torch.no_grad():
            while len(new) < max_new_tokens and (not new or new[-1] not in stops):
                new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
        text = tok.decode([i for i in new if i not in stops], skip_special_tokens=True)
        correct += verify(task, row["prompt"], text)
    return correct


@pytest.mark.timeout(60)
def test_rerun_skips_and_report_rebuilds_from_run_dir_alone(evaluated):
    from ama_ray.cli import main

    cfg, run, doc = evaluated
    evaluate.run(cfg)
    assert json.loads((run / "eval" / "metrics.json").read_text())["run"]["created_at"] == doc["run"]["created_at"]
    md, html = (Path(p) for p in report.run(cfg))
    text = md.read_text()
    assert "## Verdict" in text and any(f"**{a}**" in text.split("## Flags")[0] for a in cfg.generalist.algorithms)
    page = html.read_text()
    pngs = sorted(p.name for p in (run / "report").glob("*.png"))
    assert {"alpha.png", "excess_over_steps.png", "training.png", "bars_excess_loss.png"} <= set(pngs)
    assert page.count("data:image/png;base64,") == len(pngs)
    for name in pngs:
        assert (run / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.rmtree(run / "report")
    assert main(["report", "--run-dir", str(run)]) == 0  # the default config knows nothing of this run
    assert (run / "report" / "report.html").read_text().count("data:image/png;base64,") == len(pngs)


@pytest.mark.timeout(120)
def test_an_interrupted_evaluation_keeps_the_models_it_finished(evaluated, tmp_path, caplog):
    """A crash after all but one model: metrics.json uncommitted, one model's unit never committed.
    The rerun evaluates that model only, to the same numbers; `--force evaluate` redoes them all."""
    cfg, run, doc = evaluated
    cfg = _copy_run(cfg, run, tmp_path)
    copy = RunDir(cfg.run_dir)
    lost = f"generalist/{cfg.generalist.algorithms[0]}/seed{cfg.generalist.seeds[0]}"
    Path(copy.evaluation().file("_manifest.json")).unlink()
    Path(copy.evaluated_model(lost).file("_manifest.json")).unlink()
    kept = {key: copy.evaluated_model(key).manifest()["committed_at"] for key in doc["models"] if key != lost}
    with caplog.at_level("INFO", logger="ama_ray.stages.evaluate"):
        evaluate.run(cfg)
    assert {key: copy.evaluated_model(key).manifest()["committed_at"] for key in kept} == kept
    assert f"{len(kept)} of {len(doc['models'])} models already evaluated" in caplog.text
    assert [r.getMessage().split()[1] for r in caplog.records if " done in " in r.getMessage()] == [lost]
    new = json.loads((Path(cfg.run_dir) / "eval" / "metrics.json").read_text())
    assert new["run"]["created_at"] != doc["run"]["created_at"] and set(new["models"]) == set(doc["models"])
    for key, entry in doc["models"].items():
        for task, metrics in entry["per_task"].items():
            assert new["models"][key]["per_task"][task] == pytest.approx(metrics, abs=1e-6), (key, task)
    gone = copy.evaluated_model("generalist/removed/seed9")  # a model no longer configured
    gone.begin()
    gone.commit("x")
    evaluate.run(cfg, force={"evaluate"})
    assert all(copy.evaluated_model(key).manifest()["committed_at"] != at for key, at in kept.items())
    assert not gone.is_committed() and copy.evaluation().is_committed()


@pytest.mark.timeout(60)
def test_report_tune_section(evaluated, tmp_path):
    cfg, run, _ = evaluated
    (tmp_path / "r" / "tune").mkdir(parents=True)
    (tmp_path / "r" / "tune" / "results.csv").write_text(
        "trial_id,eval/excess_loss/worst,mixing.eta_alpha\nt0,0.30,0.1\nt1,0.12,0.5\nt2,nan,1.0\n"
    )
    images: dict[str, bytes] = {}
    md = render.to_markdown(report.tune_section(RunDir(str(tmp_path / "r")), images))
    assert "## Tune study" in md and "3 trials; best `t1`" in md and "0.1200" in md
    assert images["tune.png"][:4] == b"\x89PNG"
    assert report.tune_section(RunDir(str(run)), {}) == []  # no study, no section
    # The study's own objective (its manifest), e.g. the loss of a run without specialists.
    (tmp_path / "r" / "tune" / "results.csv").write_text("trial_id,eval/excess_loss/worst,eval/loss/worst\nt0,,0.5\nt1,,0.4\n")
    (tmp_path / "r" / "tune" / "_manifest.json").write_text(json.dumps({"config_hash": "x", "metric": "eval/loss/worst"}))
    md = render.to_markdown(report.tune_section(RunDir(str(tmp_path / "r")), {}))
    assert "best `t1` with eval/loss/worst = 0.4000" in md


@pytest.mark.timeout(90)
def test_bad_specialist_is_flagged_and_reevaluated(evaluated, tmp_path, caplog):
    """A specialist replaced by the base model: a new commit re-evaluates, and the flag names the task."""
    cfg, run, doc = evaluated
    cfg = _copy_run(cfg, run, tmp_path)
    unit = RunDir(cfg.run_dir).unit("specialists", "refusal")
    man = unit.manifest()
    model_dir = Path(unit.path) / "model"
    shutil.rmtree(model_dir)
    shutil.copytree(doc["run"]["base_model"], model_dir, ignore=shutil.ignore_patterns("_manifest.json"))
    unit.commit(man["config_hash"], **{k: v for k, v in man.items() if k not in ("config_hash", "committed_at", "versions")})
    with caplog.at_level("WARNING", logger="ama_ray.stages.evaluate"):
        evaluate.run(cfg)
    new = json.loads((Path(cfg.run_dir) / "eval" / "metrics.json").read_text())
    assert new["run"]["created_at"] != doc["run"]["created_at"]
    flags = [f for f in new["flags"] if f["kind"] == "weak_specialist"]
    assert [f["task"] for f in flags] == ["refusal"]
    assert flags[0]["evidence"]["dpo_loss"] == pytest.approx(LOG2, abs=1e-5)
    assert any("specialist of task 'refusal'" in r.getMessage() and "--force specialists" in r.getMessage() for r in caplog.records)
    assert "WARNING (weak_specialist)" in render.to_markdown([report.flags_block(new)])


# --- pure unit tests (no Ray) -------------------------------------------------------------------

def _algo_entry(algo: str, seed: int, excess: dict[str, float]) -> dict:
    per_task = {t: {"excess_loss": v} for t, v in excess.items()}
    return {"kind": "generalist", "algorithm": algo, "seed": seed, "per_task": per_task,
            "aggregates": model_aggregates(per_task, {"excess_loss"})}


def test_aggregates_and_verdict_by_hand():
    models = {
        "a0": _algo_entry("ama_s", 0, {"x": 0.10, "y": 0.20}),
        "a1": _algo_entry("ama_s", 1, {"x": 0.12, "y": 0.24}),
        "p0": _algo_entry("proportional", 0, {"x": 0.01, "y": 0.50}),
        "p1": _algo_entry("proportional", 1, {"x": 0.03, "y": 0.40}),
    }
    algos = aggregate_algorithms(models)
    assert algos["ama_s"]["seeds"] == [0, 1]
    assert algos["ama_s"]["mean"]["excess_loss/worst"] == pytest.approx(0.22)
    assert algos["ama_s"]["std"]["excess_loss/worst"] == pytest.approx(math.sqrt(2) * 0.02)  # sample std of 0.20, 0.24
    assert algos["proportional"]["mean"]["excess_loss/mean"] == pytest.approx((0.255 + 0.215) / 2)
    headline, lines = render.verdict({"run": {"split": "test"}, "aggregates": {"algorithms": algos}})
    assert headline.startswith("**ama_s** keeps the worst task") and "not separated" not in headline
    assert "test-split excess loss" in headline
    assert lines[0].startswith("Best worst-task excess loss: **ama_s** (0.220 ± 0.028)")
    # ama_s wins the mean too (0.165 vs 0.235)
    assert "lowest average" not in headline
    assert "paired over seeds: mean -0.230" in lines[0] and "separated (the interval excludes 0)" in lines[0]
    # per seed 0.20 vs 0.18 and 0.24 vs 0.28: ama_s leads on the mean, not on every seed
    close = {"ama_s": algos["ama_s"], "balanced": {"seeds": [0, 1], "mean": {"excess_loss/worst": 0.23},
                                                   "std": {"excess_loss/worst": 0.07}, "per_seed": {"excess_loss/worst": [0.18, 0.28]}}}
    headline, _ = render.verdict({"run": {"split": "test"}, "aggregates": {"algorithms": close}})
    assert "not separated from balanced: mean -0.010, 95% bootstrap CI [-0.040, +0.020]" in headline
    single = {a: aggregate_algorithms({k: v for k, v in models.items() if k.endswith("0")})[a] for a in ("ama_s", "proportional")}
    headline, _ = render.verdict({"run": {"split": "test"}, "aggregates": {"algorithms": single}})
    assert "one seed: not tested against proportional" in headline


def _merged_entry(method: str, excess: dict[str, float | None]) -> dict:
    per_task = {t: {"excess_loss": v} for t, v in excess.items()}
    return {"kind": "merged", "algorithm": f"merge_{method}", "per_task": per_task,
            "aggregates": model_aggregates({t: m for t, m in per_task.items() if m["excess_loss"] is not None}, {"excess_loss"})}


def test_merged_arms_in_the_aggregates_the_verdict_and_compare():
    """A merged model is one value beside every generalist seed; two merged models are never
    "separated" by a test over repeated copies of one number; a missing metric is skipped."""
    from ama_ray.report import compare

    models = {
        "a0": _algo_entry("ama_s", 0, {"x": 0.10, "y": 0.20}),
        "a1": _algo_entry("ama_s", 1, {"x": 0.12, "y": 0.24}),
        "a2": _algo_entry("ama_s", 2, {"x": 0.11, "y": 0.26}),
        "m": _merged_entry("average", {"x": 0.05, "y": 0.50}),
        "t": _merged_entry("ties", {"x": 0.60, "y": None}),
    }
    algos = aggregate_algorithms(models)
    average = algos["merge_average"]
    assert average["deterministic"] and average["seeds"] == [0, 1, 2]
    assert average["per_seed"]["excess_loss/worst"] == [0.50] * 3 and average["std"]["excess_loss/worst"] == 0.0
    assert "excess_loss/y" not in algos["merge_ties"]["mean"]  # null metrics are skipped, not averaged
    doc = {"run": {"split": "test"}, "tasks": [{"name": "x"}, {"name": "y"}], "lower_is_better": ["excess_loss"],
           "models": models, "aggregates": {"algorithms": algos, "specialists_own_task": {}}}
    headline, lines = render.verdict(doc)
    # ama_s's three seeds against the fixed 0.50: every seed lower (-0.30, -0.26, -0.24).
    assert lines[0].startswith("Best worst-task excess loss: **ama_s**") and "next merge_average (0.500)" in lines[0]
    assert "3 of 3 seeds lower" in lines[0]
    both = {k: algos[k] for k in ("merge_average", "merge_ties")}
    headline, lines = render.verdict({**doc, "aggregates": {"algorithms": both}})
    assert "one model each" in lines[0] and "separated" not in lines[0]
    header, rows = render.metric_table(doc, "excess_loss")
    assert any(r[0] == "merge_average (one model)" and r[-1] == "0.500" for r in rows)
    # compare: a merged row pairs with every seed of a generalist of another run
    other = {**doc, "models": {k: v for k, v in models.items() if k.startswith("a")}}
    _, rows = compare.paired_table([("one", {**doc, "models": {"m": models["m"]}}), ("two", other)], ["excess_loss"],
                                   "two ama_s", "one merge_average")
    assert rows[0][1:3] == ["worst", "0: -0.300, 1: -0.260, 2: -0.240"] and rows[0][5] == "3 of 3 seeds lower"
    _, rows = compare.paired_table([("r", doc)], ["excess_loss"], "r merge_average", "r merge_ties")
    assert "one model each" in rows[0][2] and rows[0][-1] == "not tested"


def test_weak_specialist_thresholds():
    base = {"logps/accuracies": 0.60}
    good = {"dpo_loss": 0.50, "logps/accuracies": 0.70, "rewards/accuracies": 0.80}
    assert evaluate.weak_specialist("t", good, base) is None
    stuck = {"dpo_loss": LOG2 - 0.005, "logps/accuracies": 0.70, "rewards/accuracies": 0.80}
    assert evaluate.weak_specialist("t", stuck, base)["task"] == "t"
    no_gain = {"dpo_loss": 0.60, "logps/accuracies": 0.61, "rewards/accuracies": 0.51}
    assert evaluate.weak_specialist("t", no_gain, base)["evidence"]["accuracy_gain"] == pytest.approx(0.01)


class _Tok:
    """Whitespace tokenizer over a fixed vocabulary; eos = 1, pad = 0."""

    eos_token_id, pad_token_id = 1, 0

    def __init__(self, words):
        self.vocab = {w: i + 2 for i, w in enumerate(words)}
        self.inv = {i: w for w, i in self.vocab.items()}

    def encode(self, text):
        return [self.vocab[w] for w in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return " " + " ".join(self.inv[i] for i in ids if i > 1)


class _EchoModel(torch.nn.Module):
    """`generate` appends a fixed completion per prompt (then eos and junk) and checks left padding."""

    END_OF_TURN = 99  # an end token the model declares besides the tokenizer's eos (chat models)

    def __init__(self, completions):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.completions = completions
        self.generation_config = SimpleNamespace(eos_token_id=[1, self.END_OF_TURN])

    def generate(self, input_ids, attention_mask, generation_config):
        assert bool((attention_mask[:, -1] == 1).all()), "prompts must be left-padded"
        assert generation_config.do_sample is False and generation_config.eos_token_id == [1, self.END_OF_TURN]
        rows = []
        for ids in input_ids.tolist():
            key = tuple(i for i in ids if i != 0)
            rows.append(self.completions[key] + [1, 7, 7])  # junk after eos must be ignored
        width = max(map(len, rows))
        tail = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, tail], dim=1)


def test_generation_accuracy_decodes_new_tokens_until_eos():
    words = "add and = the answer is . 1 2 3 4 5 6 7 8 9 0".split()
    tok = _Tok(words)
    prompts = ["add 1 2 and 3 4 =", "add 5 and 6 =", "add 1 0 and 2 =", "add 9 and 9 ="]
    answers = ["the answer is 4 6 .", "the answer is 1 1 .", "the answer is 1 2 .", "the answer is 1 9 ."]  # last is wrong (18)
    rows = [{"prompt": p, "prompt_input_ids": tok.encode(p)} for p in prompts]
    completions = {tuple(tok.encode(p)): tok.encode(a) for p, a in zip(prompts, answers)}
    completions[tuple(tok.encode(prompts[1]))] += [_EchoModel.END_OF_TURN, tok.vocab["7"]]  # "... 1 1 . 7" if not cut there
    model = _EchoModel(completions)
    acc = evaluate.generation_accuracy(model, tok, "arithmetic", rows, {"max_new_tokens": 8, "batch_size": 3})
    assert acc == pytest.approx(0.75)

