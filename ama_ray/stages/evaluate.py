"""evaluate: per-task held-out metrics for the base, every specialist, generalist and merged model.

Each model is one Ray task (`num_cpus=1`, torch on one thread), so on a cluster the models are
evaluated in parallel. Every model runs on every task's `test` split (what reports; validation
is what selected the checkpoints and settings, so it would flatter them): the same
`ama_ray.train.metrics` code as training's held-out evaluation (loss, excess loss over the
specialist's scores, reward and log-prob accuracies), plus greedy-generation accuracy with the
benchmark verifiers. Specialists are evaluated on all tasks, so the report can show what training
on one task does to the others. Writes `eval/metrics.json` and `eval/metrics.csv` (schema:
docs/metrics.md) and commits the unit; specialists that did not clearly beat the base on their
own task are logged as warnings and listed in `flags`. Each model's result is committed on its own
(`eval/models/<key>/result.json`) as soon as it is done, so an interrupted evaluation resumes
with the models it has not finished.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass

from ama_ray.config import Config, short_hash
from ama_ray.errors import StageInputError
from ama_ray.report.schema import aggregate_algorithms, csv_text, model_aggregates, specialists_own_task
from ama_ray.stages import base_model_path, model_identity, open_run
from ama_ray.storage import METRICS_CSV, METRICS_JSON, MODEL_DIR, RunDir
from ama_ray.train.data import REPORT_SPLIT, SELECT_SPLIT, require_split_unit

log = logging.getLogger(__name__)
STAGE = "evaluate"
SCHEMA_VERSION = 2  # 2: metrics are on the test split, labelled `run.split`; 1 read the train/eval split
LOG2 = math.log(2.0)
RESULT_JSON = "result.json"  # one model's evaluation, in eval/models/<key>/
GENERATION = "generation/accuracy"
# Metrics whose smaller value is better: the worst task is the maximum for these.
LOWER_IS_BETTER = frozenset({"loss", "dpo_loss", "nll", "excess_loss"})
# At theta = pi_ref these are 0 by definition; measured values are float round-off only.
REFERENCE_DEGENERATE = ("rewards/accuracies", "rewards/margins")
# A specialist must beat these on its own task's held-out data (see docs/metrics.md, "Flags").
MIN_ACCURACY_GAIN = 0.02
MIN_LOSS_DROP = 0.01


@dataclass(frozen=True)
class ModelRef:
    """One model to evaluate: `key` is its name in metrics.json (`base`, `specialist/<task>`, ...)."""

    key: str
    kind: str  # base | specialist | generalist | merged
    unit: tuple[str, ...] | None  # run-dir unit holding `model/`; None for the base
    path: str  # the base's directory or hub id; the unit path otherwise
    committed_at: str | None
    own_task: str | None = None  # a specialist's task
    algorithm: str | None = None
    seed: int | None = None


def run(cfg: Config, force: set[str] = frozenset()) -> list[str]:
    """Evaluate every committed model on every task; returns the eval unit's files.

    Skips when `eval/` is committed with the same settings and the same model manifests.
    Raises StageInputError when scores (needed for the excess loss) are missing.
    """
    run_dir = open_run(cfg)
    unit = run_dir.evaluation()
    models, missing = find_models(cfg, run_dir)
    digest = evaluate_hash(cfg, run_dir, models)
    files = [unit.file(METRICS_JSON), unit.file(METRICS_CSV)]
    if STAGE not in force and unit.is_committed(digest):
        log.info("evaluate: already committed for these models, skipping")
        warn(unit.read_json(METRICS_JSON)["flags"])
        return files
    if STAGE in force:
        unit.begin()  # everything, the per-model results of models no longer configured too
    results = evaluate_all(cfg, run_dir, models, redo=STAGE in force)
    doc = build_document(cfg, run_dir, models, results, missing, digest)
    warn(doc["flags"])
    unit.begin(keep_nested=True)  # the per-model results (eval/models/...) stay
    unit.write_json(METRICS_JSON, doc)
    with unit.fs.open_output_stream(unit.file(METRICS_CSV)) as out:
        out.write(csv_text(doc).encode())
    unit.commit(digest, stage=STAGE, schema_version=SCHEMA_VERSION, models=[m.key for m in models], flags=len(doc["flags"]))
    log.info("evaluate: %d models x %d tasks -> %s", len(models), len(cfg.task_names), unit.path)
    return files


def warn(flags: list[dict]) -> None:
    """Every flag as one WARNING line: what is wrong and what to do."""
    for flag in flags:
        log.warning("evaluate: %s %s", flag["message"], flag["fix"])


def find_models(cfg: Config, run_dir: RunDir) -> tuple[list[ModelRef], list[str]]:
    """The base, committed specialists, configured generalists and merged models; and the missing keys.

    A run without specialists (`Config.uses_specialists`) lists none and needs the reference
    log-probs only; with them, the scores (each example's specialist loss: the excess)."""
    for task in cfg.task_names:
        require_split_unit(run_dir, "score" if cfg.uses_specialists else "reference", task)
    models = [ModelRef("base", "base", None, base_model_path(cfg), None)]
    wanted = [("specialist/" + t, "specialist", run_dir.specialist(t), dict(own_task=t))
              for t in cfg.task_names if cfg.uses_specialists]
    wanted += [
        (f"generalist/{a}/seed{s}", "generalist", run_dir.generalist(a, s), dict(algorithm=a, seed=s))
        for a in cfg.generalist.algorithms for s in cfg.generalist.seeds
    ]
    wanted += [(f"merged/{m}", "merged", run_dir.merged(m), dict(algorithm=merged_arm(m))) for m in cfg.merging.methods]
    missing = []
    for key, kind, unit, extra in wanted:
        man = unit.manifest()
        if man is None:
            missing.append(key)
            continue
        models.append(ModelRef(key, kind, unit.parts, unit.path, man.get("committed_at"), **extra))
    return models, missing


def merged_arm(method: str) -> str:
    """The arm name of a merged model in aggregates, reports and compare (`merge_<method>`)."""
    return f"merge_{method}"


def evaluate_hash(cfg: Config, run_dir: RunDir, models: list[ModelRef]) -> str:
    """Settings + the commit times of every evaluated model and its inputs: a retrained model re-evaluates."""
    inputs = {m.key: m.committed_at or model_identity(cfg) for m in models} | stage_inputs(cfg, run_dir)
    return _settings_hash(cfg) + "-" + short_hash({"schema": SCHEMA_VERSION, "inputs": inputs})


def model_hash(cfg: Config, model: ModelRef, inputs: dict[str, str | None], settings: dict) -> str:
    """`evaluate_hash` for one model's own result (`eval/models/<key>`): the same settings and
    split inputs (`stage_inputs`), that model's commit time, and every setting `evaluate_model`
    runs with (device, batch size, revision too): results read back into one metrics.json were
    computed alike."""
    own = {model.key: model.committed_at or model_identity(cfg)}
    return _settings_hash(cfg) + "-" + short_hash({"schema": SCHEMA_VERSION, "inputs": own | inputs, "settings": settings})


def stage_inputs(cfg: Config, run_dir: RunDir) -> dict[str, str | None]:
    """The commit time of every split and log-prob unit an evaluation reads, by unit label."""
    inputs = {}
    for stage in ("prepare", "reference", "score") if cfg.uses_specialists else ("prepare", "reference"):
        for task in cfg.task_names:
            unit = run_dir.stage_unit(stage, task)
            inputs[unit.label] = (unit.manifest() or {}).get("committed_at")
    return inputs


def _settings_hash(cfg: Config) -> str:
    return cfg.section_hash("model.name", "model.dtype", "data", "dpo", "eval.generation_examples", "eval.max_new_tokens")


# --- the Ray tasks ---------------------------------------------------------------------------

def evaluate_all(cfg: Config, run_dir: RunDir, models: list[ModelRef], redo: bool = False) -> dict[str, dict]:
    """`evaluate_model` for every model as parallel Ray tasks; returns {key: result}.

    Each result is committed as its own unit (`RunDir.evaluated_model`) when it arrives, and one
    committed with the same settings, inputs and model is read back instead (unless `redo`): an
    evaluation interrupted after some of its models (each minutes on a real model) keeps them.
    """
    import ray

    from ama_ray.cluster import ensure_ray

    tasks = [(t.name, t.benchmark) for t in cfg.data.tasks]
    settings = {
        "loss": cfg.dpo.to_dict(), "dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code,
        "revision": cfg.model.revision,
        "batch_size": cfg.reference.batch_size, "generation_examples": cfg.eval.generation_examples,
        "max_new_tokens": cfg.eval.max_new_tokens, "use_gpu": cfg.scaling.use_gpu, "benchmark_chat": cfg.data.benchmark_chat,
        "with_scores": cfg.uses_specialists,
    }
    inputs = stage_inputs(cfg, run_dir)
    digests = {m.key: model_hash(cfg, m, inputs, {"tasks": tasks, **settings}) for m in models}
    results: dict[str, dict] = {}
    for m in models:
        unit = run_dir.evaluated_model(m.key)
        if not redo and unit.is_committed(digests[m.key]):
            results[m.key] = unit.read_json(RESULT_JSON)
    if results:
        log.info("evaluate: %d of %d models already evaluated with these settings, kept: %s",
                 len(results), len(models), ", ".join(results))
    todo = [m for m in models if m.key not in results]
    if not todo:
        return results
    ensure_ray()
    remote = ray.remote(num_cpus=1, num_gpus=1 if cfg.scaling.use_gpu else 0)(evaluate_model)
    pending = {remote.remote(run_dir.uri, asdict(m), tasks, settings): m.key for m in todo}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(done[0])
        results[key] = ray.get(done[0])
        unit = run_dir.evaluated_model(key)
        unit.begin()
        unit.write_json(RESULT_JSON, results[key])
        unit.commit(digests[key], stage=STAGE, model=key)
        log.info("evaluate: %s done in %.1f s (%d/%d)", key, results[key]["seconds"], len(results), len(models))
    return results


def evaluate_model(run_uri: str, model: dict, tasks: list[tuple[str, str | None]], settings: dict) -> dict:
    """Held-out metrics of one model on every task: {"per_task": {task: {metric: value}}, "seconds"}.

    Runs inside a Ray task (or directly): loads the model, the eval splits with reference
    log-probs and specialist scores, and decodes greedily for tasks with a verifier.
    """
    import torch

    from ama_ray import dpo
    from ama_ray.models.loading import compute_device, load_model, load_tokenizer
    from ama_ray.train.data import load_task_split, rows_of
    from ama_ray.train.metrics import evaluate_rows, metrics_from_sums

    from ama_ray.paths import require_absolute
    from ama_ray.stages.inference import check_model_path

    require_absolute(run_uri, "storage.path", "an evaluation task")
    check_model_path(model["path"], "an evaluation task")
    start = time.perf_counter()
    torch.set_num_threads(1)  # one Ray CPU per task; more threads only contend on small hosts
    run = RunDir(run_uri)
    copy = None if model["unit"] is None else run.unit(*model["unit"]).local_copy()
    path = model["path"] if copy is None else str(copy / MODEL_DIR)
    net = load_model(path, dtype=settings["dtype"], trust_remote_code=settings["trust_remote_code"], revision=settings["revision"])
    tokenizer = load_tokenizer(path, trust_remote_code=settings["trust_remote_code"], revision=settings["revision"])
    if copy is not None and not run.is_local:
        shutil.rmtree(copy, ignore_errors=True)  # a download from object storage; the weights are in memory now
    net = net.to(compute_device(settings.get("use_gpu", False)))
    names = [name for name, _ in tasks]
    # Without specialists there is nothing to measure an excess against: no excess_loss at all.
    with_scores = settings.get("with_scores", True)
    rows = [rows_of(load_task_split(run, name, REPORT_SPLIT, with_scores=with_scores)) for name in names]
    sums = evaluate_rows(net, rows, dpo.DPOLossConfig(**settings["loss"]), tokenizer.pad_token_id, settings["batch_size"])
    flat = metrics_from_sums(sums, names, "eval", with_excess=with_scores)
    per_task = {name: {} for name in names}
    for key, value in flat.items():
        metric, _, scope = key.removeprefix("eval/").rpartition("/")
        if scope in per_task:
            per_task[scope][metric] = value
    for name, benchmark in tasks:
        if benchmark and settings["generation_examples"] > 0:
            prepared = run.prepared(name)
            prompts = prepared.read_parquet(prepared.split_file(REPORT_SPLIT), columns=["example_id", "prompt", "prompt_input_ids"])
            prompts = prompts.sort_by("example_id").slice(0, settings["generation_examples"]).to_pylist()
            per_task[name][GENERATION] = generation_accuracy(net, tokenizer, benchmark, prompts, settings)
    return {"per_task": per_task, "seconds": time.perf_counter() - start}


def generation_accuracy(net, tokenizer, benchmark: str, rows: list[dict], settings: dict) -> float:
    """Share of prompts whose greedy completion (`greedy_replies`) the benchmark verifier accepts.
    With `benchmark_chat` the verifier judges the answer's content, not its wording
    (`ama_ray.data.benchmark.verify`)."""
    from ama_ray.data.benchmark import verify

    replies = greedy_replies(net, tokenizer, rows, settings)
    chat = settings.get("benchmark_chat", False)
    return sum(verify(benchmark, row["prompt"], text, by_content=chat) for row, text in zip(rows, replies)) / len(rows) if rows else math.nan


def greedy_replies(net, tokenizer, rows: list[dict], settings: dict) -> list[str]:
    """The greedy completion of each row's `prompt_input_ids`, decoded (`settings`: `batch_size`,
    `max_new_tokens`). Left-padded batches (so every row's new tokens start at the same column),
    decoding stops at the tokenizer's eos or the model's declared end tokens, and only the new
    tokens are decoded. Also used by scripts/generation_probe.py."""
    import torch
    from transformers import GenerationConfig

    from ama_ray import dpo

    # Stop at the tokenizer's eos or any end token the model's generation config names (a chat
    # model's end-of-turn may not be its eos).
    declared = getattr(getattr(net, "generation_config", None), "eos_token_id", None)
    stops = [tokenizer.eos_token_id] + [i for i in (declared if isinstance(declared, list) else [declared])
                                        if i is not None and i != tokenizer.eos_token_id]
    gen_cfg = GenerationConfig(
        max_new_tokens=settings["max_new_tokens"], do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id
    )
    replies = []
    device = next(net.parameters()).device
    for start in range(0, len(rows), settings["batch_size"]):
        chunk = rows[start : start + settings["batch_size"]]
        ids = [list(r["prompt_input_ids"]) for r in chunk]
        batch = dpo.pad_sequences(ids, [len(s) for s in ids], tokenizer.pad_token_id, padding_side="left")
        with torch.no_grad():
            out = net.generate(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), generation_config=gen_cfg
            )
        for new in out[:, batch["input_ids"].shape[1]:].tolist():
            new = new[: min((new.index(i) for i in stops if i in new), default=len(new))]
            replies.append(tokenizer.decode(new, skip_special_tokens=True))
    return replies


# --- metrics.json ----------------------------------------------------------------------------

def build_document(cfg: Config, run_dir: RunDir, models: list[ModelRef], results: dict, missing: list[str], digest: str) -> dict:
    """The metrics.json document (schema_version `SCHEMA_VERSION`, docs/metrics.md)."""
    entries = {}
    for m in models:
        per_task = {task: results[m.key]["per_task"][task] for task in cfg.task_names}  # a read-back result's are sorted
        entry = {k: v for k, v in asdict(m).items() if k not in ("key", "unit") and v is not None}
        if m.kind == "base" and cfg.dpo.pairs:  # SFT has no reference, and no implicit rewards
            entry["reference_check"] = reference_check(per_task)
            for metrics in per_task.values():
                metrics.update({name: 0.0 for name in REFERENCE_DEGENERATE})
            entry["degenerate_metrics"] = list(REFERENCE_DEGENERATE)
        entry["per_task"] = per_task
        entry["aggregates"] = model_aggregates(per_task, LOWER_IS_BETTER)
        entry["eval_seconds"] = round(results[m.key]["seconds"], 2)
        entries[m.key] = entry
    doc = {
        "schema_version": SCHEMA_VERSION,
        "run": {
            "run_dir": run_dir.uri, "run_name": cfg.storage.run_name, "config_hash": digest, "split": REPORT_SPLIT,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(), "base_model": base_model_path(cfg),
            "dpo": cfg.dpo.to_dict(), "generation_examples": cfg.eval.generation_examples,
            "max_new_tokens": cfg.eval.max_new_tokens, "algorithms": cfg.generalist.algorithms, "seeds": cfg.generalist.seeds,
            "excess_target": cfg.mixing.excess_target, "specialists": cfg.uses_specialists,
        },
        "tasks": [_task_entry(run_dir, t) for t in cfg.data.tasks],
        "lower_is_better": sorted(LOWER_IS_BETTER),
        "models": entries,
    }
    doc["aggregates"] = {"algorithms": aggregate_algorithms(entries), "specialists_own_task": specialists_own_task(entries)}
    doc["flags"] = compute_flags(doc, missing) + raw_loss_flags(run_dir, models)
    return _finite(doc)


def _task_entry(run_dir: RunDir, task) -> dict:
    rows = (run_dir.prepared(task.name).manifest() or {}).get("rows", {})
    return {
        "name": task.name, "benchmark": task.benchmark, "verifier": task.benchmark is not None,
        "test_examples": rows.get(REPORT_SPLIT), "validation_examples": rows.get(SELECT_SPLIT), "train_examples": rows.get("train"),
    }


def reference_check(per_task: dict) -> dict:
    """How far the base is from being its own reference: |dpo_loss - log 2| and |margin|, worst task."""
    return {
        "max_abs_dpo_loss_minus_log2": max(abs(m["dpo_loss"] - LOG2) for m in per_task.values()),
        "max_abs_reward_margin": max(abs(m["rewards/margins"]) for m in per_task.values()),
    }


def compute_flags(doc: dict, missing: list[str]) -> list[dict]:
    """Problems the report must show: weak specialists, a base that is not its reference, missing models."""
    flags = []
    models = doc["models"]
    base = models["base"]["per_task"]
    check = models["base"].get("reference_check")
    if check and check["max_abs_dpo_loss_minus_log2"] > 1e-3:
        flags.append({
            "kind": "reference_mismatch", "model": "base", "task": None, "evidence": check,
            "message": f"the base model's held-out DPO loss differs from log 2 by {check['max_abs_dpo_loss_minus_log2']:.4f}: "
            "the reference log-probs were not computed with this model, tokenizer or dtype.",
            "fix": "Rerun with --force reference (and the later stages).",
        })
    for task in (t["name"] for t in doc["tasks"]):
        spec = models.get(f"specialist/{task}")
        if spec is not None:
            flag = weak_specialist(task, spec["per_task"][task], base[task])
            if flag:
                flags.append(flag)
    for key in missing:
        flags.append({
            "kind": "missing_model", "model": key, "task": None, "evidence": {},
            "message": f"{key} is configured but not committed, so it was not evaluated.",
            "fix": "Run `ama-ray specialists` / `ama-ray generalist` / `ama-ray merge` (or `ama-ray run`), then evaluate again.",
        })
    return flags


def raw_loss_flags(run_dir: RunDir, models: list[ModelRef]) -> list[dict]:
    """One flag per task that generalists trained against its raw loss (a weak specialist under
    `specialists.on_weak: raw_loss`), naming those generalists (their manifests' `raw_loss_tasks`)."""
    trained: dict[str, list[str]] = {}
    for model in models:
        if model.kind == "generalist":
            for task in (run_dir.unit(*model.unit).manifest() or {}).get("raw_loss_tasks", []):
                trained.setdefault(task, []).append(model.key)
    return [{
        "kind": "raw_loss_target", "model": None, "task": task, "evidence": {"generalists": keys},
        "message": f"{len(keys)} generalist(s) trained task '{task}' against its raw loss, not its specialist's "
        "(the specialist was weak; specialists.on_weak=raw_loss): their excess on it is measured against a "
        "specialist they never aimed at.",
        "fix": f"Train the specialist of '{task}' longer or harder and rerun with --force specialists, or set "
        "specialists.on_weak=stop to be told before the generalists train.",
    } for task, keys in sorted(trained.items())]


def weak_specialist(task: str, own: dict, base: dict) -> dict | None:
    """A flag when a specialist did not clearly beat the base on its own task's held-out data, else None.

    Clearly better = held-out DPO loss below log 2 - MIN_LOSS_DROP (the base's loss is log 2) and an
    accuracy gain of at least MIN_ACCURACY_GAIN: logps/accuracies over the base's, or
    rewards/accuracies over chance (0.5; the base's implicit rewards are 0 by definition).
    Under SFT (no pair metrics): held-out NLL at least MIN_LOSS_DROP below the base's.
    """
    if "dpo_loss" not in own:
        return weak_sft_specialist(task, own, base)
    gain = max(own["logps/accuracies"] - base["logps/accuracies"], own["rewards/accuracies"] - 0.5)
    learned = own["dpo_loss"] < LOG2 - MIN_LOSS_DROP
    if learned and gain >= MIN_ACCURACY_GAIN:
        return None
    evidence = {
        "dpo_loss": own["dpo_loss"], "log2": LOG2, "logps/accuracies": own["logps/accuracies"],
        "base_logps/accuracies": base["logps/accuracies"], "rewards/accuracies": own["rewards/accuracies"], "accuracy_gain": gain,
    }
    return {
        "kind": "weak_specialist", "model": f"specialist/{task}", "task": task, "evidence": evidence,
        "message": f"specialist of task '{task}' is not clearly better than the base on its held-out data "
        f"(DPO loss {own['dpo_loss']:.4f} vs log 2 = {LOG2:.4f}; accuracy gain {gain:+.3f}, needs +{MIN_ACCURACY_GAIN}): "
        "its scores set a target of 'nothing to learn', so AMA will starve this task.",
        "fix": f"Train it longer or harder (data.tasks[{task}].specialist_steps, specialists.optim.steps or .lr), "
        "check the task's data, then rerun with --force specialists.",
    }


def weak_sft_specialist(task: str, own: dict, base: dict) -> dict | None:
    """`weak_specialist` under `dpo.objective: sft`: its held-out NLL against the base's."""
    if own["nll"] < base["nll"] - MIN_LOSS_DROP:
        return None
    return {
        "kind": "weak_specialist", "model": f"specialist/{task}", "task": task,
        "evidence": {"nll": own["nll"], "base_nll": base["nll"]},
        "message": f"specialist of task '{task}' is not clearly better than the base on its held-out data "
        f"(NLL {own['nll']:.4f} vs the base's {base['nll']:.4f}, needs {MIN_LOSS_DROP} lower): "
        "its scores set a target of 'nothing to learn', so AMA will starve this task.",
        "fix": f"Train it longer or harder (data.tasks[{task}].specialist_steps, specialists.optim.steps or .lr), "
        "check the task's data, then rerun with --force specialists.",
    }


def _finite(obj):
    """NaN/inf become None: metrics.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def load_metrics(run_dir: RunDir) -> dict:
    """The committed metrics.json of a run directory; StageInputError if absent or of another schema."""
    unit = run_dir.evaluation()
    unit.require(f"the evaluation ({unit.file(METRICS_JSON)})", fix="run `ama-ray evaluate` first")
    doc = unit.read_json(METRICS_JSON)
    if doc.get("schema_version") == 1:
        raise StageInputError(
            "metrics.json was computed on the train/eval split of an older ama_ray (schema_version 1), not the test split",
            where=unit.file(METRICS_JSON),
            fix="rerun `ama-ray run --force prepare` in this run directory (selection now reads validation and reports read test)",
        )
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise StageInputError(
            f"metrics.json has schema_version {doc.get('schema_version')}, this ama_ray reads {SCHEMA_VERSION}",
            where=unit.file(METRICS_JSON),
            fix="rerun `ama-ray evaluate --force evaluate`",
        )
    return doc
