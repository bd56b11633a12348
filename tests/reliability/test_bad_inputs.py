"""The bad-input catalogue: every input a user can get wrong ends in one clear line and exit code 2.

Each case runs the real CLI (`ama_ray.cli.main`) in-process and checks the error's kind, that the
message names the file/row/key and what to do, that stderr holds exactly that one line, and that
no half-written unit (a unit folder without `_manifest.json`) is left behind. Cases that need an
earlier stage's outputs run on a copy of the session's tiny pipeline.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from ama_ray import cli, errors
from ama_ray.config import dump_yaml
from ama_ray.storage import FOLDERS

# 300 s, not less: the first case may build the session's shared tiny run (~100 s on a quiet machine).
pytestmark = pytest.mark.timeout(300)

GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
UNIT_STAGES = [FOLDERS[s] for s in ("prepare", "reference", "specialists", "score")]


@dataclass
class Case:
    """One bad input: `setup(ctx)` writes files and returns the CLI arguments."""

    setup: Callable[["Ctx"], list[str]]
    kind: type
    needles: list[str]  # substrings the message must hold; "{x}" placeholders filled from ctx.names
    needs_run: bool = False  # needs a copy of the finished tiny pipeline


@dataclass
class Ctx:
    tmp: Path
    config: Path  # a valid job file writing into `root`
    root: Path
    names: dict[str, str] = field(default_factory=dict)

    def data(self, name: str, content: bytes | str | list) -> str:
        path = self.tmp / name
        if isinstance(content, list):
            content = "".join(json.dumps(r) + "\n" for r in content)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        self.names["file"] = str(path)
        return str(path)

    def task(self, stage: str, path: str, *extra: str) -> list[str]:
        return [stage, "--config", str(self.config), f"data.tasks=[{{name: t, path: '{path}'}}]", *extra]


def _rows(n: int, **change) -> list[dict]:
    return [{**GOOD, "prompt": f"What is {i}+2?", **change} for i in range(n)]


def _not_causal(ctx: Ctx) -> list[str]:
    model = ctx.tmp / "t5_model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    ctx.names["file"] = str(model)
    return ["prepare", "--config", str(ctx.config), f"model.name={model}"]


def _no_specialist(ctx: Ctx) -> list[str]:
    for stage in ("specialists", "scores"):
        shutil.rmtree(ctx.root / "minimal" / stage / "brackets")
    return ["score", "--config", str(ctx.config)]


def _ids_mismatch(ctx: Ctx) -> list[str]:
    """The prepared data was redone with another row count after the scores were computed."""
    manifest = ctx.root / "minimal" / "prepared" / "refusal" / "_manifest.json"
    man = json.loads(manifest.read_text())
    man["rows"]["train"] += 1
    manifest.write_text(json.dumps(man))
    ctx.names["file"] = str(ctx.root / "minimal" / "scores" / "refusal" / "train.parquet")
    return ["generalist", "--config", str(ctx.config), "generalist.seeds=[7]"]


def _score_truncated(ctx: Ctx) -> list[str]:
    import pyarrow.parquet as pq

    path = ctx.root / "minimal" / "scores" / "refusal" / "train.parquet"
    pq.write_table(pq.read_table(path).slice(1), path)
    return ["generalist", "--config", str(ctx.config), "generalist.seeds=[7]"]


def _under_a_file(ctx: Ctx) -> list[str]:
    blocker = ctx.tmp / "plainfile"
    blocker.write_text("not a directory")
    ctx.names["file"] = str(blocker)
    return ["prepare", "--config", str(ctx.config), f"storage.path={blocker}/runs"]


def _a_directory(ctx: Ctx) -> list[str]:
    path = ctx.tmp / "dir.jsonl"
    path.mkdir()
    ctx.names["file"] = str(path)
    return ctx.task("prepare", str(path))


def _broken_yaml(ctx: Ctx) -> list[str]:
    path = ctx.tmp / "broken.yaml"
    path.write_text("model: [tiny\ndata: {}\n")
    ctx.names["file"] = str(path)
    return ["prepare", "--config", str(path)]


CASES = {
    "config-unknown-key": Case(lambda c: ["prepare", "--config", str(c.config), "mixing.eta=0.3"],
                               errors.ConfigError, ["'mixing.eta'", "allowed keys here: eta_alpha"]),
    "config-wrong-type": Case(lambda c: ["prepare", "--config", str(c.config), "mixing.eta_alpha=fast"],
                              errors.ConfigError, ["'mixing.eta_alpha'", '"fast"', "docs/configuration.md"]),
    "config-out-of-range": Case(lambda c: ["prepare", "--config", str(c.config), "mixing.smoothing=1.5"],
                                errors.ConfigError, ["'mixing.smoothing'", "1.5", "in [0, 1]"]),
    "config-unknown-algorithm": Case(lambda c: ["generalist", "--config", str(c.config), "--algorithm", "ama_x"],
                                     errors.ConfigError, ["generalist.algorithms", "ama_x", "allowed: proportional"]),
    "config-fixed-without-weights": Case(lambda c: ["run", "--config", str(c.config), "--algorithm", "fixed"],
                                         errors.ConfigError, ["mixing.fixed_weights", "needs weights", "one non-negative weight per task"]),
    "config-weight-for-unknown-task": Case(
        lambda c: ["run", "--config", str(c.config), "mixing.initial_weights={nosuchtask: 1}"],
        errors.ConfigError, ["mixing.initial_weights", "unknown tasks ['nosuchtask']", "one weight per task"]),
    "config-file-missing": Case(lambda c: ["prepare", "--config", str(c.tmp / "nope.yaml")],
                                errors.ConfigError, ["nope.yaml does not exist", "pass --config"]),
    "config-broken-yaml": Case(_broken_yaml, errors.ConfigError, ["{file}", "cannot parse YAML", "fix the YAML"]),
    "config-duplicate-task-names": Case(
        lambda c: ["prepare", "--config", str(c.config), "data.tasks=[{name: a, benchmark: arithmetic}, {name: a, benchmark: brackets}]"],
        errors.ConfigError, ["'data.tasks'", "duplicate task names ['a']", "own name"]),
    "config-unknown-force-stage": Case(lambda c: ["prepare", "--config", str(c.config), "--force", "prepair"],
                                       errors.AmaError, ["--force prepair", "use one of partition, prepare"]),
    "config-unknown-benchmark": Case(lambda c: ["prepare", "--config", str(c.config), "data.tasks=[{name: a, benchmark: chess}]"],
                                     errors.ConfigError, ["data.tasks[a].benchmark", "chess", "use one of"]),
    "config-column-map-unknown-field": Case(
        lambda c: c.task("prepare", c.data("a.jsonl", _rows(3)), "data.tasks.0.column_map={answer: chosen}"),
        errors.ConfigError, ["column_map", "'answer'", "map any of prompt"]),
    "data-missing-file": Case(lambda c: c.task("prepare", str(c.tmp / "absent.jsonl")),
                              errors.DataError, ["absent.jsonl", "file not found", "check the path"]),
    "data-empty-file": Case(lambda c: c.task("prepare", c.data("empty.jsonl", b"")),
                            errors.DataError, ["{file}", "file is empty", "point to a file with rows"]),
    "data-unreadable-parquet": Case(lambda c: c.task("prepare", c.data("junk.parquet", b"PAR1 this is not parquet")),
                                    errors.DataError, ["{file}", "not a readable Parquet file", "rewrite it"]),
    "data-is-a-directory": Case(_a_directory, errors.DataError, ["{file}", "is a directory", "name one data file"]),
    "data-unsupported-type": Case(lambda c: c.task("prepare", c.data("rows.xlsx", b"x")),
                                  errors.DataError, ["{file}", "unsupported file type '.xlsx'", "use one of .jsonl"]),
    "data-broken-json-line": Case(
        lambda c: c.task("prepare", c.data("broken.jsonl", json.dumps(GOOD) + "\n{\"prompt\": \"x\", \n" + json.dumps(GOOD) + "\n")),
        errors.DataError, ["{file}:2", "broken JSON", "fix or delete that line"]),
    "data-line-not-an-object": Case(lambda c: c.task("prepare", c.data("text.jsonl", '"just text"\n')),
                                    errors.DataError, ["{file}:1", "line is a JSON str, not an object", "one JSON object per line"]),
    "data-rows-missing-fields": Case(lambda c: c.task("prepare", c.data("missing.jsonl", [{"prompt": "p", "chosen": "c"}] * 3)),
                                     errors.DataError, ["{file}:1", "no usable rows", "missing_field", "column names"]),
    "data-wrong-types": Case(lambda c: c.task("prepare", c.data("types.jsonl", _rows(3, chosen=4))),
                             errors.DataError, ["{file}:1", "wrong_type", "chosen is int"]),
    "data-chosen-equals-rejected": Case(lambda c: c.task("prepare", c.data("same.jsonl", _rows(3, rejected="4"))),
                                        errors.DataError, ["{file}:1", "identical", "chosen == rejected"]),
    "data-non-utf8": Case(lambda c: c.task("prepare", c.data("latin1.jsonl", json.dumps(GOOD).encode() + b"\n{\"prompt\": \"caf\xe9\"}\n")),
                          errors.DataError, ["{file}:2", "not UTF-8", "re-encode the file as UTF-8"]),
    "data-zero-usable-rows": Case(lambda c: c.task("prepare", c.data("blank.jsonl", _rows(4, chosen="   "))),
                                  errors.DataError, ["task 't' has no usable rows", "{file}:1", "empty_field"]),
    "data-malformed-csv": Case(lambda c: c.task("prepare", c.data("rows.csv", "prompt,chosen,rejected\na,b,c\nd,e,f,g\n")),
                               errors.DataError, ["{file}:3", "record has 4 fields, the header 3", "quote fields"]),
    "model-path-missing": Case(lambda c: ["prepare", "--config", str(c.config), f"model.name={c.tmp}/no_model"],
                               errors.ModelError, ["no_model", "model directory does not exist", "set model.name"]),
    "model-not-causal-lm": Case(_not_causal, errors.ModelError, ["{file}/config.json", "'t5' is not a causal language model", "set model.name"]),
    "storage-not-writable": Case(_under_a_file, errors.StorageError, ["{file}/runs", "cannot write the run directory", "set storage.path"]),
    "stage-missing-specialist": Case(_no_specialist, errors.StageInputError,
                                     ["specialist of task 'brackets' is missing", "specialists/brackets", "run `ama-ray specialists` first"],
                                     needs_run=True),
    "stage-score-ids-mismatch": Case(_ids_mismatch, errors.StageInputError,
                                     ["{file}", "holds 420 rows (its manifest says 420) but the prepared train split has 421", "--force score"],
                                     needs_run=True),
    "stage-score-file-changed": Case(_score_truncated, errors.StageInputError,
                                     ["scores of task 'refusal' is damaged", "train.parquet has", "counts as not committed",
                                      "run `ama-ray score` first"], needs_run=True),
    "resources-never-satisfiable": Case(lambda c: ["specialists", "--config", str(c.config), "--force", "specialists", "scaling.cpus_per_worker=64"],
                                        errors.ResourceError, ["scaling.cpus_per_worker", "64 CPU", "lower scaling.cpus_per_worker"],
                                        needs_run=True),
}


@pytest.fixture
def ctx(request, tmp_path, minimal_cfg, model_cache) -> Ctx:
    """A job file writing into tmp_path; for `needs_run` cases, with a copy of the tiny pipeline."""
    case = CASES[request.node.callspec.params["name"]]
    root = tmp_path / "runs"
    if case.needs_run:
        _cfg, run_dir = request.getfixturevalue("tiny_run")
        shutil.copytree(run_dir, root / "minimal", ignore=shutil.ignore_patterns("_checkpoints", "tensorboard"))
    else:
        request.getfixturevalue("tiny_run")  # the tiny base model is built (cached) there
    raw = yaml.safe_load(dump_yaml(minimal_cfg))
    raw["storage"]["path"] = str(root)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    return Ctx(tmp=tmp_path, config=config, root=root)


def _manifests(root: Path) -> dict[Path, str]:
    return {p: p.read_text() for p in root.rglob("_manifest.json")} if root.exists() else {}


def _half_written_units(root: Path) -> list[Path]:
    units = [d for run in root.glob("*") for s in UNIT_STAGES for d in (run / s).glob("*") if d.is_dir()]
    units += [d for run in root.glob("*") for d in (run / "generalist").glob("*/seed*")]
    return [d for d in units if not (d / "_manifest.json").exists()]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line_and_exit_2(name, ctx, capsys, monkeypatch):
    case = CASES[name]
    argv = case.setup(ctx)
    before = _manifests(ctx.root)
    seen: list[errors.AmaError] = []
    real = cli._user_error
    monkeypatch.setattr(cli, "_user_error", lambda err: seen.append(err) or real(err))
    capsys.readouterr()

    assert cli.main(argv) == 2

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ama-ray:")]
    assert len(lines) == 1 and lines[0].startswith("ama-ray: error: "), err
    assert len(seen) == 1 and type(seen[0]) is case.kind, (type(seen[0]), seen[0])
    message = lines[0]
    assert str(seen[0]) in message
    for needle in case.needles:
        assert needle.format(**ctx.names) in message, f"{needle!r} not in {message!r}"
    assert seen[0].fix, "every error says what to do"
    assert _half_written_units(ctx.root) == []
    assert _manifests(ctx.root) == before, "a failed command changed committed units"


# --- inputs that are handled, not errors ------------------------------------------------------

def test_tokenizer_without_pad_token_gets_eos_as_pad(tiny_run, tmp_path):
    from ama_ray.models.loading import load_tokenizer

    _cfg, run_dir = tiny_run
    base = json.loads((run_dir / "reference" / "arithmetic" / "_manifest.json").read_text())["model"]
    tok = load_tokenizer(base)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    assert json.loads((tmp_path / "nopad" / "tokenizer_config.json").read_text()).get("pad_token") is None
    loaded = load_tokenizer(str(tmp_path / "nopad"))
    assert loaded.pad_token == loaded.eos_token and loaded.pad_token_id == tok.eos_token_id


@pytest.mark.timeout(240)
def test_overlong_and_bad_rows_are_counted_and_secrets_stay_out(tiny_run, tmp_path, monkeypatch):
    """Prompts over data.max_prompt_length are left-truncated and counted; pairs whose completion
    exceeds data.max_completion_length are dropped and counted, like rows missing a field, identical
    pairs and duplicates. The manifest holds no secret from the environment."""
    from ama_ray.config import validate
    from ama_ray.stages import prepare

    cfg0, _run_dir = tiny_run
    monkeypatch.setenv("HF_TOKEN", "s3cr3t-value-do-not-log")
    words = "one two three four five six seven eight nine ten".split()
    good = [{"prompt": f"add {i} and {j}", "chosen": f"{i + j}", "rejected": f"{i + j + 1}"} for i in range(6) for j in range(2)]
    rows = good + [
        {"prompt": " ".join(words * 2) + " add 9 and 9", "chosen": "18", "rejected": "19"},  # long prompt: truncated, kept
        {"prompt": "count", "chosen": " ".join(words), "rejected": "one"},  # completion too long: dropped
        {"prompt": "no rejected", "chosen": "x"},  # missing field
        {"prompt": "same", "chosen": "y", "rejected": "y"},  # identical
        good[0],  # duplicate
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = cfg0.model_dump(mode="json")
    raw["storage"]["path"] = str(tmp_path / "runs")
    raw["data"].update(tasks=[{"name": "t", "path": str(path)}], max_prompt_length=6, max_completion_length=4,
                       validation_fraction=0.2, test_fraction=0.2, min_heldout_examples=1)
    cfg = validate(raw)
    prepare.run(cfg)
    unit = tmp_path / "runs" / "minimal" / "prepared" / "t"
    text = (unit / "_manifest.json").read_text()
    man = json.loads(text)
    assert man["dropped"] == {"too_long": 1, "missing_field": 1, "identical": 1, "duplicate": 1}
    assert man["prompt_truncated"] == 1
    assert sum(man["rows"].values()) == len(good) + 1
    import pyarrow.parquet as pq

    ids = [p for split in ("train", "validation", "test") for p in pq.read_table(unit / f"{split}.parquet")["prompt_input_ids"].to_pylist()]
    assert max(len(p) for p in ids) == 6
    assert "s3cr3t-value-do-not-log" not in text


def _raise_in_ray_task(cfg, **_kwargs):
    import ray

    @ray.remote(num_cpus=0)
    def read():
        raise errors.DataError("broken JSON (Expecting value at column 1)", where="/data/x.jsonl:7", fix="fix or delete that line")

    return ray.get(read.remote())


@pytest.mark.timeout(60)
def test_error_raised_inside_a_ray_task_reaches_the_cli_as_one_line(ray_session, minimal_cfg, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_stage_entry", lambda name: _raise_in_ray_task)
    monkeypatch.setattr(cli, "_resolve", lambda args: minimal_cfg)
    capsys.readouterr()
    assert cli.main(["prepare"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["ama-ray: error: /data/x.jsonl:7: broken JSON (Expecting value at column 1) -- fix or delete that line"]
