"""tune: a Ray Tune study over the generalist's settings, reusing one run's specialists and scores.

Each trial trains one generalist unit per trial seed (`tune/<trial_id>/<algorithm>/seed<k>/`,
k = 1000, 1001, ... for `tune.seeds_per_trial` seeds, each with its own mixing actor) from the
run's prepared data, reference log-probs and specialist scores, so a study costs only
generalist training. Under Ray Train V2 a trial is a Tune *function trainable* (a 0.01-CPU
share) that fits the seeds' `TorchTrainer`s at once, each with a callback sending its held-out
evaluations to the trial, which reports their mean to Tune once every seed has made that
evaluation; ASHA stops trials whose objective lags at a rung.

Outputs in the run directory: `tune/results.csv` (one row per trial: `trial_id`, the sampled
keys, `eval/excess_loss/worst`, `eval/loss/worst`, `eval/rewards/accuracies/mean`, `status`, `steps`,
`evaluations`), `tune/best.yaml` (the best trial's full config: `ama-ray run --config
tune/best.yaml` retrains that generalist in this run directory) and `tune/_manifest.json`.
See docs/tune.md.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback

from ama_ray.config import Config, dump_yaml
from ama_ray.errors import AmaError, ConfigError
from ama_ray.search_space import check_search_space, max_evaluations, trial_config
from ama_ray.stages import base_model_path, open_run
from ama_ray.stages.generalist import train_generalist, train_sizes
from ama_ray.stages.score import check_rows, raw_loss_tasks, rows_hash
from ama_ray.stages.tune_groups import OrphanedGroupCleanup
from ama_ray.storage import BEST_YAML, RESULTS_CSV, TRIAL_CONFIG, RunDir, Unit

log = logging.getLogger(__name__)
STAGE = "tune"
MODES = {"eval/excess_loss/worst": "min", "eval/loss/worst": "min", "eval/rewards/accuracies/mean": "max"}
REPORTED = tuple(MODES)
TRIAL_CPU = 0.01  # the trainable only waits on its TorchTrainer; {"cpu": 0} is rejected by Tune


TRIAL_SEEDS_FROM = 1000  # trial seeds are 1000, 1001, ...: a study never tunes on a reported seed


class EvaluationReport(UserCallback):
    """A Ray Train callback (on the seed's Train controller) that sends each held-out evaluation
    before the last step to the trial, as `(seed index, metrics)` on `queue`.

    The training loop also reports train-only metrics between evaluations; Tune refuses results
    without the objective, and ASHA's rungs should count evaluations, not report calls. The
    last evaluation is held back: `train_trial` reports it once every seed's unit is committed,
    because a STOP decision on it would kill the trial while it saves.
    """

    def __init__(self, queue, index: int, metric: str, last_step: int):
        self.queue, self.index, self.metric, self.last_step = queue, index, metric, last_step

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and self.metric in metrics[0] and metrics[0].get("step", 0) < self.last_step:
            self.queue.put((self.index, dict(metrics[0])))


def trial_seeds(cfg: Config) -> list[int]:
    """The seeds every trial trains (`tune.seeds_per_trial` of them from TRIAL_SEEDS_FROM); a
    ConfigError if one is also a reported seed (`generalist.seeds`)."""
    seeds = list(range(TRIAL_SEEDS_FROM, TRIAL_SEEDS_FROM + cfg.tune.seeds_per_trial))
    shared = sorted(set(seeds) & set(cfg.generalist.seeds))
    if shared:
        raise ConfigError(f"generalist.seeds {shared} are also trial seeds ({seeds[0]}-{seeds[-1]}): a study would tune on a reported seed",
                          where="generalist.seeds", fix=f"report seeds below {TRIAL_SEEDS_FROM}")
    return seeds


def mean_metrics(results: list[dict]) -> dict:
    """The mean of every numeric metric the seeds' results all have (one result per seed)."""
    keys = set.intersection(*(set(r) for r in results))
    out = {k: sum(r[k] for r in results) / len(results) for k in keys
           if all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool) for r in results)}
    return dict(sorted(out.items()))


def check_metric(cfg: Config) -> None:
    """A study without specialists cannot optimise an excess over them, nor an SFT study a
    reward accuracy (there are no pairs): ConfigError."""
    if "rewards" in cfg.tune.metric and not cfg.dpo.pairs:
        raise ConfigError(f"tune.metric {cfg.tune.metric} needs preference pairs; dpo.objective sft has none",
                          where="tune.metric", fix="set tune.metric=eval/excess_loss/worst or eval/loss/worst")
    if "excess" in cfg.tune.metric and not cfg.uses_specialists:
        raise ConfigError(
            f"tune.metric {cfg.tune.metric} needs specialists, and this run has none "
            f"(mixing.excess_target={cfg.mixing.excess_target}, no merging.methods)",
            where="tune.metric", fix="set tune.metric=eval/loss/worst (the worst task's held-out loss)",
        )


def study_hash(cfg: Config, raw_tasks: list[str] = ()) -> str:
    """What a study ran with; `raw_tasks` (`raw_loss_tasks`) count when there are any."""
    raw = f"-raw:{','.join(raw_tasks)}" if raw_tasks else ""
    return rows_hash(cfg) + "-" + cfg.section_hash("generalist", "mixing", "eval", "scaling", "tune", "seed") + raw


def run(cfg: Config, force: set[str] = frozenset()) -> list[str]:
    """Run the study (earlier stages first where not committed); returns results.csv and best.yaml."""
    from ama_ray import pipeline
    from ama_ray.cluster import ensure_ray
    from ama_ray.train.launch import check_unit_resources

    run_dir = open_run(cfg)
    study = run_dir.tune()
    outputs = [study.file(RESULTS_CSV), study.file(BEST_YAML)]
    # A committed study's scores exist, so the weak specialists it trained against can be read now.
    if STAGE not in force and study.is_committed(study_hash(cfg, raw_loss_tasks(run_dir, cfg))):
        log.info("tune: study already committed, skipping (use --force tune to redo it)")
        return outputs
    space = search_space(cfg)
    check_metric(cfg)
    trial_seeds(cfg)  # a study that would tune on a reported seed fails before anything runs
    pipeline.run(cfg, force, through="score")
    check_rows(run_dir, cfg)
    digest = study_hash(cfg, raw_loss_tasks(run_dir, cfg, announce=True))  # weak specialists: the line, or the stop
    ensure_ray()
    check_unit_resources(cfg, cfg.tune.seeds_per_trial, STAGE)
    study.begin()
    _drop_stale_study(study)
    results = _fit_study(cfg, space, _trial_base(cfg), base_model_path(cfg), train_sizes(run_dir, cfg))
    rows = result_rows(results, cfg)
    best = best_row(rows, cfg.tune.metric)
    _write_text(study, RESULTS_CSV, results_csv(rows, list(space)))
    _write_text(study, BEST_YAML, dump_yaml(trial_config(cfg.model_dump(mode="json"), best["params"])))
    study.commit(
        digest, stage=STAGE, metric=cfg.tune.metric, mode=MODES[cfg.tune.metric], trials=len(rows),
        best_trial=best["trial_id"], best_value=best[cfg.tune.metric], best_params=best["params"],
        stopped_early=[r["trial_id"] for r in rows if r["status"] == "stopped"],
    )
    log.info("tune: best trial %s (%s = %.4f): %s", best["trial_id"], cfg.tune.metric, best[cfg.tune.metric], best["params"])
    return outputs


# --- the search space -------------------------------------------------------------------

def search_space(cfg: Config) -> dict[str, Any]:
    """`tune.search_space` as Ray Tune domains (checked when the config loaded:
    `ama_ray.search_space`). Without an `algorithm` key, several `generalist.algorithms` become a grid."""
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    space: dict[str, Any] = {key: make[kind](args) for key, (kind, args) in check_search_space(cfg).items()}
    if "algorithm" not in space and len(cfg.generalist.algorithms) > 1:
        space["algorithm"] = tune.grid_search(list(cfg.generalist.algorithms))
    return space


def _trial_base(cfg: Config) -> dict:
    """The config dump trials start from (its local paths are absolute: trials run elsewhere)."""
    cfg.require_resolved("the Tune study")
    return cfg.model_dump(mode="json")


# --- the study --------------------------------------------------------------------------

def train_trial(params: dict, *, base: dict, model_path: str, sizes: list[int], metric: str) -> None:
    """Tune function trainable: train the sampled settings on every trial seed at once, reporting
    the seeds' mean in lockstep (evaluation n once every seed has made its n-th), so ASHA always
    compares complete means."""
    import threading

    from ray import tune
    from ray.util.queue import Empty, Queue

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params)
    cfg.require_resolved("a Tune trial")
    run = RunDir(cfg.run_dir)
    _write_text(run.tune(trial_id), TRIAL_CONFIG, dump_yaml(cfg))
    algorithm, steps, seeds = cfg.generalist.algorithms[0], cfg.generalist.optim.steps, trial_seeds(cfg)
    queue, errors = Queue(actor_options={"num_cpus": 0}), []  # a 1-CPU default could wait behind the trainers

    def train(index: int, seed: int) -> None:
        try:
            train_generalist(cfg, algorithm, seed, model_path, sizes, force=True, trial=trial_id,
                             callbacks=[EvaluationReport(queue, index, metric, steps)])
        except BaseException as err:  # noqa: BLE001 - re-raised in the trial's thread below
            errors.append(err)

    threads = [threading.Thread(target=train, args=(i, s), daemon=True) for i, s in enumerate(seeds)]
    for thread in threads:
        thread.start()
    # By step, not by arrival: a seed whose worker group restarts from a checkpoint
    # (scaling.max_failures) evaluates its steps since that checkpoint again.
    evaluations: list[dict[int, dict]] = [{} for _ in seeds]
    reported = 0  # the last step reported to Tune
    while any(t.is_alive() for t in threads) or not queue.empty():
        if errors:  # one seed failed: the trial fails now (the other seeds' trainers die with it)
            raise errors[0]
        try:
            index, metrics = queue.get(timeout=1.0)
        except Empty:  # nothing yet: look at the threads again
            continue
        evaluations[index][int(metrics["step"])] = metrics
        for step in sorted(set.intersection(*(set(e) for e in evaluations))):
            if step > reported:
                tune.report(mean_metrics([e[step] for e in evaluations]))
                reported = step
    if errors:
        raise errors[0]
    finals = [run.generalist(algorithm, seed, trial_id).manifest()["final_metrics"] for seed in seeds]
    tune.report({**mean_metrics(finals), "seeds": len(seeds)})


def _fit_study(cfg: Config, space: dict, base: dict, model_path: str, sizes: list[int]):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tc = cfg.tune
    max_t = max_evaluations(cfg)
    trainable = tune.with_parameters(train_trial, base=base, model_path=model_path, sizes=sizes, metric=tc.metric)
    run = RunDir(cfg.run_dir)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": TRIAL_CPU}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=tc.metric, mode=MODES[tc.metric], num_samples=tc.num_samples,
            # The generator itself limits concurrency: Tune ignores max_concurrent_trials when given one.
            search_alg=BasicVariantGenerator(max_concurrent=tc.max_concurrent_trials or concurrent_trials(cfg), random_state=cfg.seed),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                    grace_period=min(tc.grace_period, max_t), reduction_factor=tc.reduction_factor),
        ),
        run_config=tune.RunConfig(name="study", **run.checkpoint_storage(STAGE), verbose=1, callbacks=[OrphanedGroupCleanup()]),
    )
    log.info("tune: %d sample(s) over %s, ASHA on %s (%s), up to %d evaluations per trial",
             tc.num_samples, ", ".join(space) or "nothing", tc.metric, MODES[tc.metric], max_t)
    return tuner.fit()


def _drop_stale_study(study: Unit) -> None:
    """Remove an earlier study's Tune state and trial checkpoints (trial ids never repeat)."""
    import pyarrow.fs as pafs

    root = study.run.checkpoint_root(STAGE)
    if study.fs.get_file_info(root).type != pafs.FileType.NotFound:
        study.fs.delete_dir(root)


def concurrent_trials(cfg: Config) -> int:
    """How many trials' worker groups the cluster holds at once (at least 1)."""
    import ray

    total = ray.cluster_resources()
    workers = cfg.scaling.num_workers
    seeds = cfg.tune.seeds_per_trial  # a trial trains its seeds at once
    fits = [total.get("CPU", 0.0) // (seeds * workers * cfg.scaling.cpus_per_worker + TRIAL_CPU)]
    if cfg.scaling.use_gpu:
        fits.append(total.get("GPU", 0.0) // (seeds * workers))
    return max(1, int(min(fits)))


# --- results ----------------------------------------------------------------------------

def result_rows(results, cfg: Config) -> list[dict]:
    """One dict per trial: trial_id, params, reported objectives, status, steps, evaluations.

    status: `completed` (ran all its steps), `stopped` (ASHA stopped it early) or `error`.
    Raises the first trial's error when no trial reported the objective.
    """
    from ama_ray.train.launch import find_user_error

    base = cfg.model_dump(mode="json")
    rows = []
    for result in results:
        metrics, params = dict(result.metrics or {}), dict(result.config or {})
        steps = trial_config(base, params).generalist.optim.steps
        reached = int(metrics.get("step", 0))
        status = "error" if result.error else ("completed" if reached >= steps else "stopped")
        rows.append({"trial_id": metrics.get("trial_id") or Path(result.path).name, "params": params,
                     **{m: metrics.get(m) for m in REPORTED}, "status": status, "steps": reached,
                     "evaluations": int(metrics.get("training_iteration", 0)), "error": str(result.error or "")[:300]})
    if not any(r[cfg.tune.metric] is not None for r in rows):
        errors = [r.error for r in results if r.error]
        if errors:
            raise (find_user_error(errors[0]) or errors[0])
        raise AmaError("no tune trial reported an evaluation", where="tune", fix="check eval.every_n_steps <= generalist.optim.steps")
    return sorted(rows, key=lambda r: r["trial_id"])


def best_row(rows: list[dict], metric: str) -> dict:
    """The best trial by its last reported objective, preferring trials that ran to the end."""
    scored = [r for r in rows if r[metric] is not None]
    finished = [r for r in scored if r["status"] == "completed"] or scored
    sign = 1.0 if MODES[metric] == "min" else -1.0
    return min(finished, key=lambda r: (sign * r[metric], r["trial_id"]))


def results_csv(rows: list[dict], keys: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trial_id", *keys, *REPORTED, "status", "steps", "evaluations", "error"])
    for r in rows:
        writer.writerow([r["trial_id"], *(r["params"].get(k) for k in keys), *(r[m] for m in REPORTED),
                         r["status"], r["steps"], r["evaluations"], r["error"]])
    return out.getvalue()


def _write_text(unit: Unit, name: str, text: str) -> None:
    unit.fs.create_dir(unit.path, recursive=True)
    with unit.fs.open_output_stream(unit.file(name)) as out:
        out.write(text.encode())
