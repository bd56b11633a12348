"""merge: the specialists merged into one model for each of `merging.methods` (docs/merging.md).

The paper compares AMA with merging the specialists as well as with mixing their data. Each
method is one unit `merged/<method>/` holding `model/` (save_pretrained, with the tokenizer),
evaluated, reported and compared beside the generalists. A method with a λ grid
(`task_arithmetic`, `ties`) tries every λ on the validation split (the first
`eval.max_examples` rows of each task in `example_id` order, with the specialists' scores, and
the metrics of training's held-out evaluation) and keeps the lowest worst-task excess loss; the
manifest records every candidate.
Each method is one Ray task (1 CPU, or a GPU with `scaling.use_gpu`), so methods merge in
parallel. The arithmetic is in `ama_ray.merging` (PEFT's merge functions).
"""

from __future__ import annotations

import logging
import shutil
import time

from ama_ray.config import Config, short_hash
from ama_ray.errors import ConfigError
from ama_ray.stages import base_model_path, needs_work, open_run
from ama_ray.stages.score import check_scores_match, score_hash
from ama_ray.storage import MODEL_DIR, RunDir
from ama_ray.train.data import SELECT_SPLIT

log = logging.getLogger(__name__)
STAGE = "merge"
KEPT = ("eval/excess_loss/worst", "eval/excess_loss/mean", "eval/dpo_loss/mean", "eval/rewards/accuracies/mean")


def merge_hash(cfg: Config, method: str) -> str:
    """The specialists and scores it merges, and only the settings `method` reads."""
    settings: dict = {"method": method}
    if method != "average":  # the λ grid, and the validation rows that choose from it
        settings.update(lambdas=cfg.merging.lambdas, max_examples=cfg.eval.max_examples)
    if method == "ties":
        settings["density"] = cfg.merging.density
    return f"{score_hash(cfg)}-{short_hash(settings)}"


def run(cfg: Config, force: set[str] = frozenset()) -> list[str]:
    """Build every configured merged model not yet committed; returns unit paths."""
    if cfg.merging.methods and len(cfg.task_names) < 2:
        raise ConfigError(f"merging needs at least 2 tasks' specialists, this job has {len(cfg.task_names)}",
                          where="merging.methods", fix="set merging.methods: [] for a one-task job")
    run_dir = open_run(cfg)
    pending = [m for m in cfg.merging.methods if needs_work(run_dir.merged(m), merge_hash(cfg, m), STAGE, force)]
    for method in cfg.merging.methods:
        if method not in pending:
            log.info("merge: %s already committed, skipping", method)
    if pending:
        _merge_all(cfg, run_dir, pending)
    return [run_dir.merged(m).path for m in cfg.merging.methods]


def _merge_all(cfg: Config, run_dir: RunDir, methods: list[str]) -> None:
    import ray

    from ama_ray.cluster import ensure_ray
    from ama_ray.train.launch import find_user_error, forwarded_env

    committed = {t: run_dir.specialist(t).require(f"specialist of task '{t}'", fix="run `ama-ray specialists` first")
                 for t in cfg.task_names}
    check_scores_match(run_dir, cfg)
    ensure_ray()
    settings = {
        "tasks": cfg.task_names, "base": base_model_path(cfg), "lora": cfg.lora_for("specialist").enabled, "dtype": cfg.model.dtype,
        "trust_remote_code": cfg.model.trust_remote_code, "revision": cfg.model.revision, "loss": cfg.dpo.to_dict(),
        "batch_size": cfg.reference.batch_size, "max_examples": cfg.eval.max_examples, "lambdas": cfg.merging.lambdas,
        "density": cfg.merging.density, "use_gpu": cfg.scaling.use_gpu,
    }
    remote = ray.remote(num_cpus=1, num_gpus=1 if cfg.scaling.use_gpu else 0,
                        runtime_env={"env_vars": forwarded_env(cpu_only=not cfg.scaling.use_gpu)})(merge_method)
    pending = {}
    for method in methods:
        run_dir.merged(method).begin()
        pending[remote.remote(run_dir.uri, method, settings)] = method
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        method = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except Exception as err:  # a user error inside the task (a missing file, a bad model) reads as itself
            raise find_user_error(err) or err from None
        run_dir.merged(method).commit(
            merge_hash(cfg, method), stage=STAGE, method=method, base_model=settings["base"], lora=settings["lora"],
            dtype=cfg.model.dtype, selected_on=SELECT_SPLIT, selected_by=KEPT[0], **{"lambda": result["lambda"]},
            candidates=result["candidates"], specialists={t: m["committed_at"] for t, m in committed.items()},
            seconds=round(result["seconds"], 2),
        )
        chosen = "" if result["lambda"] is None else f" (λ = {result['lambda']:g} of {len(result['candidates'])} on validation)"
        log.info("merge: %s committed%s in %.1f s", method, chosen, result["seconds"])
        grid = cfg.merging.lambdas
        if result["lambda"] is not None and len(grid) > 1 and result["lambda"] in (min(grid), max(grid)):
            log.warning("merge: %s kept λ = %g, the %s end of merging.lambdas %s: the best λ may lie beyond the grid; "
                        "extend it to see", method, result["lambda"], "low" if result["lambda"] == min(grid) else "high", grid)


def merge_method(run_uri: str, method: str, s: dict) -> dict:
    """Inside a Ray task: build `method`'s candidates, keep the best on validation and save it
    into `merged/<method>/model/`; returns {"lambda", "candidates", "seconds"}."""
    import torch

    from ama_ray import dpo, merging
    from ama_ray.models.loading import compute_device, load_model, load_tokenizer
    from ama_ray.paths import require_absolute
    from ama_ray.train.data import load_task_split, rows_of
    from ama_ray.train.metrics import evaluate_rows, metrics_from_sums

    require_absolute(run_uri, "storage.path", "a merge task")
    start = time.perf_counter()
    torch.set_num_threads(1)  # one Ray CPU per task
    run = RunDir(run_uri)
    tasks = s["tasks"]
    copies = [run.specialist(t).local_copy() for t in tasks]
    load = dict(trust_remote_code=s["trust_remote_code"], revision=s["revision"])
    device = compute_device(s["use_gpu"])
    tokenizer = load_tokenizer(s["base"], **load)
    rows = [rows_of(load_task_split(run, t, SELECT_SPLIT, with_scores=True, limit=s["max_examples"])) for t in tasks]
    loss = dpo.DPOLossConfig(**s["loss"])

    def score(net) -> dict:
        flat = metrics_from_sums(evaluate_rows(net, rows, loss, tokenizer.pad_token_id, s["batch_size"]), tasks, "eval")
        return {k: flat.get(k) for k in KEPT}

    def build():
        if s["lora"]:
            from peft import PeftModel

            # Adapter names of our own: PEFT refuses names inside its "lora_" prefix (a task named "a").
            adapters = [f"specialist_{i}" for i in range(len(tasks))]
            net = PeftModel.from_pretrained(load_model(s["base"], dtype=s["dtype"], **load), str(copies[0] / MODEL_DIR / "adapter"),
                                            adapter_name=adapters[0])
            for name, copy in zip(adapters[1:], copies[1:]):
                net.load_adapter(str(copy / MODEL_DIR / "adapter"), adapter_name=name)
            names = merging.add_lora_candidates(net, adapters, method, s["lambdas"], s["density"])
            net = net.to(device)
            scores = {}
            for name in names:
                net.set_adapter(name)
                scores[name] = score(net)
            best = merging.best_candidate(scores)
            merged, lam = net.merge_and_unload(adapter_names=[best]), names[best]
            candidates = [{"lambda": names[n], **scores[n]} for n in names]
        else:
            # The base as the specialists were trained from (model.dtype), so each τᵢ is only what
            # training changed, not also the rounding of a more precise checkpoint to model.dtype.
            merged = load_model(s["base"], dtype=s["dtype"], **load)
            base = {k: v.clone() for k, v in merged.state_dict().items()}
            delta = merging.delta_state(base, [load_model(str(c / MODEL_DIR), dtype=s["dtype"], **load).state_dict() for c in copies],
                                        method, s["density"])  # the specialists are freed here: only the delta stays
            merged = merged.to(device)
            scores = {}
            for lam in merging.candidates(method, s["lambdas"]):
                merged.load_state_dict(merging.apply_delta(base, delta, lam))
                scores[lam] = score(merged)
            lam = merging.best_candidate(scores)
            merged.load_state_dict(merging.apply_delta(base, delta, lam))
            candidates = [{"lambda": c, **v} for c, v in scores.items()]
        return merged, lam, candidates

    try:
        merged, lam, candidates = build()
    finally:
        if not run.is_local:
            for copy in copies:  # downloads from object storage: the weights are in memory (or the task failed)
                shutil.rmtree(copy, ignore_errors=True)
    with run.merged(method).local_dir() as out:
        merged.to("cpu").save_pretrained(out / MODEL_DIR, safe_serialization=True)
        tokenizer.save_pretrained(out / MODEL_DIR)
    return {"lambda": lam, "candidates": candidates, "seconds": time.perf_counter() - start}
