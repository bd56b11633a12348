"""The one training loop, run by every Ray Train worker, for specialists (k=1) and generalists.

Per optimizer step t (DESIGN.md "Protocol"):
1. every worker holds alpha_t (from the mixing service by step number, so all agree);
2. it asks its policy (`ama_ray.mixing.policies`, which owns every rule of its algorithm) for
   the task labels (seeded by (seed, t, rank)) and draws the examples from its streams;
3. forward/backward over the micro-batches on the policy's per-example objective, reduced with
   its loss weights (`batch_objective`); clipping masks, so every worker runs backward every step;
4. per-task sums are all-reduced (one small tensor) and reported to the mixing service (rank 0
   sends them to the actor with `.remote()` while the optimizer steps); every worker then
   fetches alpha_{t+1}.
Sampling is stateless (seeded per step) and streams save their positions, so a resumed run
replays exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging
import math
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ama_ray.config import Config, OptimConfig
from ama_ray.dpo import pair_length
from ama_ray.errors import NumericalError, StorageError
from ama_ray.mixing import LocalMixer, batch_objective
from ama_ray.mixing.targets import make_target
from ama_ray.storage import MODEL_DIR, RunDir, Unit
from ama_ray.train import checkpointing
from ama_ray.mixing.settings import HELDOUT_PREFIX
from ama_ray.train.data import SELECT_SPLIT, SIGNAL_SPLIT, ShardStream, draw_batch, load_task_split, rows_of
from ama_ray.train.engine import Engine, build_engine, lr_lambda  # noqa: F401 - lr_lambda: re-exported
from ama_ray.train.faults import maybe_inject_fault
from ama_ray.train.metrics import (
    ROW, evaluate_rows, metrics_from_sums, mixing_stats, per_example, specialist_losses, task_sums,
)
from ama_ray.train.progress import ProgressClient
from ama_ray.train.spec import UnitSpec, WorkerState  # noqa: F401 - re-exported: the stages build specs from here

log = logging.getLogger(__name__)


def check_handed_paths(cfg: Config, model_path: str | None, who: str) -> None:
    """Refuse a config or model path with a relative local path: `who` runs in a working directory
    of its own, so only the driver may resolve paths (ama_ray.paths). Raises ConfigError."""
    from ama_ray.paths import looks_local, require_absolute

    cfg.require_resolved(who)
    if model_path and looks_local(model_path):
        require_absolute(model_path, "model.name", who)


def _quiet_data() -> None:
    """Ray Data's per-dataset progress bars and plan logs, once per epoch and task, only with `ama-ray -v`."""
    from ray.data import DataContext

    if not logging.getLogger("ama_ray").isEnabledFor(logging.DEBUG):
        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled", per worker


def _seed(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: build, resume, train `spec.steps` steps, save. See module doc."""
    import ray.train

    spec = UnitSpec(**config)
    cfg = Config.model_validate(spec.cfg)
    check_handed_paths(cfg, spec.model_path, "a Ray Train worker")
    _quiet_data()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    optim_cfg = cfg.specialists.optim if spec.kind == "specialist" else cfg.generalist.optim
    run = RunDir(cfg.run_dir)
    job = Job.build(spec, cfg, optim_cfg, run, rank, world)
    job.resume(ray.train.get_checkpoint())
    job.train()
    job.finish()


def micro_batches(examples: list[dict], grad_accum: int) -> list[np.ndarray]:
    """The step's examples split into `grad_accum` micro-batches of consecutive lengths (prompt
    plus the longer completion), so each pads to lengths close to its own: split in draw order,
    one long pair made a whole micro-batch pad to it. One micro-batch keeps the draw order. The
    gradient is the same sum either way; only padding (and floating-point summation order) moves.
    """
    if grad_accum <= 1:
        return [np.arange(len(examples))]
    return np.array_split(np.argsort([pair_length(r) for r in examples], kind="stable"), grad_accum)


class Job:
    """One worker's training run: model, streams, optimizer and the mixing client."""

    def __init__(self, **kw: Any):
        if "engine" not in kw:  # a bare model, optimizer and scheduler (one process, e.g. benchmarks)
            model = kw.pop("model")
            kw["engine"] = Engine(module=model, bare=checkpointing.unwrap(model), optimizer=kw.pop("optimizer"),
                                  scheduler=kw.pop("scheduler"), max_grad_norm=kw["optim"].max_grad_norm,
                                  rank=kw["rank"], world=kw["world"])
        self.__dict__.update(kw)

    @classmethod
    def build(cls, spec: UnitSpec, cfg: Config, optim_cfg: OptimConfig, run: RunDir, rank: int, world: int) -> "Job":
        from ama_ray.models.loading import load_tokenizer

        torch.manual_seed(spec.seed)
        tokenizer = load_tokenizer(spec.model_path, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
        engine = build_engine(cfg, optim_cfg, spec.model_path, spec.steps, rank, world, kind=spec.kind)
        import ray.train

        with_scores = spec.reads_scores(cfg)
        # Each task's training rows stream from its Ray Data dataset (`fit_unit` passes them).
        streams = [ShardStream(t, ray.train.get_dataset_shard(t), spec.seed, rank, world) for t in spec.tasks]
        per_worker_eval = math.ceil(cfg.eval.max_examples / world)
        # The periodic `eval/...` metrics select (best checkpoint, ASHA, Tune): the validation split.
        eval_rows = engine.lockstep_rows([
            rows_of(load_task_split(run, t, SELECT_SPLIT, with_scores=with_scores, rank=rank, world=world, limit=per_worker_eval))
            for t in spec.tasks
        ])
        policy = spec.policy()
        settings = policy.settings
        # A task whose specialist failed its check (`specialists.on_weak: raw_loss`) is measured
        # against 0, its raw loss, in training and in the held-out signal alike.
        raw = torch.tensor([t in spec.raw_tasks for t in spec.tasks]) if spec.raw_tasks else None
        signal_rows = None
        if policy.uses_heldout:  # ama_h: the whole signal split, each rank its share, read once
            signal_rows = engine.lockstep_rows([
                _raw_targets(rows_of(load_task_split(run, t, SIGNAL_SPLIT, with_scores=with_scores, rank=rank, world=world)),
                             t in spec.raw_tasks)
                for t in spec.tasks
            ])
        if spec.actor_name:
            from ama_ray.mixing.actor import RayMixer

            mixer = RayMixer(spec.actor_name, rank)
        else:
            mixer = LocalMixer(spec.policy())
        unit = run.unit(*spec.out_unit)
        return cls(
            spec=spec, cfg=cfg, optim=optim_cfg, run=run, rank=rank, world=world, engine=engine, streams=streams,
            eval_rows=eval_rows, loss_cfg=cfg.dpo, policy=policy, mixer=mixer, progress=ProgressClient(spec.progress_name, unit.label, rank),
            pad_id=tokenizer.pad_token_id, state=WorkerState(), writer=_tensorboard(run, unit, rank),
            tasks=list(spec.tasks), k=len(spec.tasks), best_dir=run.best_dir(unit),
            target=make_target(settings, len(spec.tasks)), raw=raw, signal_rows=signal_rows,
            # Excess metrics only against a specialist: eval rows carry its losses (yardstick) when
            # the run has specialists; training batches when the target is the specialist's loss.
            eval_excess=with_scores, train_excess=with_scores and settings.excess_target != "history",
        )

    # Defaults for jobs built by hand (benchmarks, tests): a specialist-loss target, excess metrics.
    target = None  # HistoryTarget with mixing.excess_target history
    eval_excess = train_excess = True
    raw = None  # bool per task: measured against its raw loss (a weak specialist); None when no task is
    signal_rows = None  # ama_h: this rank's rows of every task's signal split
    heldout_seconds = step_seconds = 0.0  # this attempt: forward time on the signal split; time in steps

    # -- resume and checkpoints ----------------------------------------------------------------
    checkpoint_suffix = ""  # appended to checkpoint folder names after resuming past a corrupt one
    def resume(self, checkpoint) -> None:
        """Continue from `checkpoint`, or from the newest older one when its files are not the
        ones this run wrote (`checkpointing.problems`): nothing unverified is ever loaded."""
        if checkpoint is None:
            return
        unit = "/".join(self.spec.out_unit)
        tried = []
        for candidate in checkpointing.candidates(checkpoint):
            with candidate.as_directory() as d:
                found = checkpointing.problems(Path(d))
                if not found:
                    self.engine.load_checkpoint(Path(d))
                    saved = checkpointing.load_state(Path(d))
                    break
            tried.append(f"{candidate.path}: {'; '.join(found)}")
            log.warning("%s: not resuming from %s (%s)", unit, candidate.path, "; ".join(found))
        else:
            raise StorageError(f"{unit}: no intact checkpoint to resume from ({' | '.join(tried)})",
                               where=str(Path(checkpoint.path).parent),
                               fix=f"rerun with --force {'specialists' if self.spec.kind == 'specialist' else 'generalist'} to start the unit over")
        self.state = WorkerState(
            step=saved["step"], best_eval=saved["best_eval"], best_step=saved["best_step"], positions=saved["positions"][str(self.rank)],
            resumed_at=saved["step"],
        )
        for stream in self.streams:
            stream.seek(self.state.positions[stream.task])
        self.mixer.restore(saved.get("mixer"), self.state.step)
        if self.target is not None:
            self.target.load_state_dict(saved["target"])
        if tried:
            # Later checkpoints get new folder names: re-reporting a skipped one's name would make Ray
            # Train's checkpoint manager delete the folder of the new one with the old (rank 0's
            # name suffix, so every rank reports the same).
            self.checkpoint_suffix = _all_gather_obj(f".{time.time_ns()}", self.world)[0]
        _barrier(self.world)
        log.info("%s: resumed at step %d", "/".join(self.spec.out_unit), self.state.step)

    def checkpoint(self, metrics: dict[str, float]) -> None:
        import ray.train

        positions = {s.task: s.position() for s in self.streams}
        all_positions = _all_gather_obj(positions, self.world)
        with tempfile.TemporaryDirectory() as tmp:
            # Every rank may write a part (DeepSpeed shards); Ray Train merges the directories.
            wrote = self.engine.save_checkpoint(Path(tmp))
            if self.rank == 0:
                checkpointing.save_state(Path(tmp), {
                    "step": self.state.step,
                    "best_eval": self.state.best_eval,
                    "best_step": self.state.best_step,
                    "positions": {str(r): p for r, p in enumerate(all_positions)},
                    "mixer": self.mixer.state(),
                    "target": None if self.target is None else self.target.state_dict(),
                })
            checkpoint = None
            if wrote or self.rank == 0:
                checkpointing.record_digests(Path(tmp), self.rank)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{self.state.step:06d}{self.checkpoint_suffix}")

    # -- training ------------------------------------------------------------------------------
    def train(self) -> None:
        import ray.train

        unit = "/".join(self.spec.out_unit)
        self.alpha_digest = hashlib.sha256()
        self.mixer.prefetch(self.state.step)
        last = time.perf_counter()
        while self.state.step < self.spec.steps:
            step = self.state.step
            maybe_inject_fault(self.spec.fault, step, self.rank, self.run, unit)
            alpha = self.mixer.alpha(step)
            self.alpha_digest.update(np.asarray(alpha, dtype=np.float64).tobytes())
            metrics = self.train_step(step, alpha)
            self.state.step = step + 1
            now = time.perf_counter()
            metrics["train/seconds_per_step"] = now - last
            self.step_seconds += now - last
            last = now
            done = self.state.step == self.spec.steps
            if self.state.step % self.cfg.eval.every_n_steps == 0 or done:
                metrics.update(self.evaluate())
            if done:
                metrics.update(self.consistency())
            self._log(metrics)
            if self.state.step % self.optim.checkpoint_every == 0 or done:
                self.checkpoint(metrics)
            elif self.state.step % self.cfg.eval.log_every_n_steps == 0:
                # report() is a barrier across workers: every step would cost a sync per step.
                ray.train.report(metrics)

    def train_step(self, step: int, alpha: np.ndarray) -> dict[str, float]:
        heldout = self.measure_heldout(step) if self.policy.wants_heldout(step) else {}
        torch.manual_seed(_seed(self.spec.seed, step, self.rank))
        waited = time.perf_counter()
        labels, step_counts, total = self.sample_labels(step, alpha)
        examples, labels = draw_batch(self.streams, labels)
        waited = time.perf_counter() - waited
        task_ids = torch.as_tensor(labels)
        loss_weights = self.policy.loss_weights(alpha)
        # The objective is normalised by the step's counts: this worker's, or with a global batch
        # the whole step's, times the world size because DDP and DeepSpeed average gradients.
        scale = self.world if self.optim.global_batch_size else 1
        sums = torch.zeros(len(ROW), self.k, dtype=torch.float64)
        targets = None if self.target is None else torch.as_tensor(self.target.targets())
        chunks = micro_batches(examples, self.optim.grad_accum)
        engine = self.engine
        for j, idx in enumerate(chunks):
            last = j == len(chunks) - 1
            with engine.no_sync(last):
                rows = [examples[i] for i in idx]
                with engine.autocast():
                    out = per_example(engine.module, rows, self.loss_cfg, self.pad_id)
                spec_loss = (specialist_losses(rows, out["loss"]) if targets is None
                             else targets.to(out["loss"].dtype)[task_ids[idx]].to(out["loss"].device))
                if self.raw is not None and spec_loss is not None:
                    spec_loss = spec_loss.masked_fill(self.raw[task_ids[idx]].to(spec_loss.device), 0.0)
                e = self.policy.objective(out["loss"], spec_loss)
                engine.backward(scale * batch_objective(e, task_ids[idx], loss_weights, step_counts, total), last)
            sums += task_sums(out, task_ids[idx], spec_loss, self.k)
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        # Every rank holds the same all-reduced sums, so every rank stops at the same step,
        # before a non-finite statistic reaches the mixing policy (which would stall the others).
        self.check_finite(step, sums)
        self.mixer.report(step, {**mixing_stats(sums), **heldout})
        if self.target is not None:  # the same all-reduced sums on every rank: the copies agree
            self.target.update(sums[ROW["loss"]].numpy(), sums[ROW["count"]].numpy())
        # Ask for alpha_{t+1} now: the actor answers once step t's report is applied, which
        # overlaps clipping and the optimizer step.
        self.mixer.prefetch(step + 1)
        grad_norm = engine.step(on_nonfinite=lambda norm: self._nonfinite_gradient(step, norm))
        metrics = metrics_from_sums(sums, self.tasks, "train", with_excess=self.train_excess)
        metrics.update({f"mix/alpha/{t}": float(a) for t, a in zip(self.tasks, alpha)})
        if targets is not None:
            metrics.update({f"mix/target/{t}": float(v) for t, v in zip(self.tasks, targets.tolist())})
        metrics.update({f"mix/count/{t}": float(c) for t, c in zip(self.tasks, sums[ROW["count"]].tolist())})
        metrics.update({"step": step + 1, "train/grad_norm": grad_norm, "train/lr": engine.lr(), "train/data_seconds": waited})
        return metrics

    def measure_heldout(self, step: int) -> dict[str, list[float]]:
        """ama_h, before step `step`: every task's sums on the signal split with the model as it
        is (forward only, all ranks), as the HELDOUT_KEYS the step's report carries.

        Its metrics, `signal/...` (the `eval/...` family on the signal split) and
        `mix/heldout_seconds`, go to TensorBoard at once, at global step `step` (the model after
        `step` updates, as `eval/...` counts), whatever `eval.log_every_n_steps` says."""
        started = time.perf_counter()
        with self.engine.autocast():
            sums = evaluate_rows(self.engine.bare, self.signal_rows, self.loss_cfg, self.pad_id, self.cfg.reference.batch_size)
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        self.check_finite(step, sums)
        seconds = time.perf_counter() - started
        self.heldout_seconds += seconds
        metrics = metrics_from_sums(sums, self.tasks, "signal", with_excess=self.train_excess)
        metrics["mix/heldout_seconds"] = seconds
        self._scalars(metrics, step)
        return {HELDOUT_PREFIX + key: value for key, value in mixing_stats(sums).items()}

    def _nonfinite_gradient(self, step: int, norm: float) -> None:
        raise NumericalError(
            f"non-finite gradient norm ({norm}) at step {step + 1}; stopped before the optimizer step",
            where="/".join(self.spec.out_unit),
            fix="lower the learning rate or optim.max_grad_norm (or use float32), then rerun (it resumes from the last checkpoint)",
        )

    def check_finite(self, step: int, sums: torch.Tensor) -> None:
        """NumericalError naming the unit, step and tasks when a step's per-task sums are not finite."""
        bad = [t for t, ok in zip(self.tasks, torch.isfinite(sums).all(dim=0).tolist()) if not ok]
        if bad:
            raise NumericalError(
                f"non-finite loss or statistic at step {step + 1} for task(s) {', '.join(bad)}; stopped before the "
                "optimizer step and the mixing update",
                where="/".join(self.spec.out_unit),
                fix="lower the learning rate (or use float32), check those tasks' data, then rerun (it resumes from the last checkpoint)",
            )

    def sample_labels(self, step: int, alpha: np.ndarray) -> tuple[np.ndarray, torch.Tensor, int]:
        """Task index per example of this worker's batch for step `step` (stateless, replayable),
        with the per-task counts and the size of the batch the objective is normalised by.

        Per-worker batches (`optim.batch_size`) are drawn per rank and normalised by themselves.
        A global batch (`optim.global_batch_size`) is drawn once for the step (the same on every
        rank and for any number of workers) and dealt round-robin, rank r taking r::world; its
        counts are the whole step's.
        """
        if not self.optim.global_batch_size:
            rng = np.random.default_rng(_seed(self.spec.seed, "labels", step, self.rank))
            labels = self.policy.labels(alpha, self.optim.batch_size, rng)
            return labels, torch.bincount(torch.as_tensor(labels), minlength=self.k), len(labels)
        rng = np.random.default_rng(_seed(self.spec.seed, "labels", step))
        everyone = self.policy.labels(alpha, self.optim.global_batch_size, rng)
        return everyone[self.rank :: self.world], torch.bincount(torch.as_tensor(everyone), minlength=self.k), len(everyone)

    def evaluate(self) -> dict[str, float]:
        with self.engine.autocast():
            sums = evaluate_rows(self.engine.bare, self.eval_rows, self.loss_cfg, self.pad_id, self.cfg.reference.batch_size)
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        metrics = metrics_from_sums(sums, self.tasks, "eval", with_excess=self.eval_excess)
        # A specialist keeps its best held-out DPO loss (its NLL under SFT): the number its task's
        # excess is measured against, without the sft_weight term.
        score = metrics["eval/dpo_loss/mean" if self.loss_cfg.pairs else "eval/loss/mean"]
        if self.spec.kind == "specialist" and score < self.state.best_eval:
            self.state.best_eval, self.state.best_step = score, self.state.step
            self._save_best()
        metrics["eval/best_step"] = self.state.best_step
        return metrics

    def consistency(self) -> dict[str, float]:
        """Cross-worker checks at the end: DDP replicas identical, every worker used the same alphas.

        `check/replica_max_diff` is the largest parameter difference between any worker and rank 0
        (0 when data parallelism is correct; absent under ZeRO-3, whose ranks hold different shards);
        `check/alpha_agree` is 1 when every worker hashed the same sequence of alphas since this
        attempt started; `check/resumed_at_step` is the checkpoint step this attempt started from;
        `check/peak_rss_mb` is this worker's peak resident memory (rank 0's is reported);
        `check/loaded_param_share` the share of the model's weights rank 0 held right after
        loading (1/world under ZeRO-3, which constructs the model partitioned; else 1).
        """
        params = self.engine.replica_params()
        digests = _all_gather_obj(self.alpha_digest.hexdigest(), self.world)
        out = {"check/alpha_agree": float(len(set(digests)) == 1), "check/resumed_at_step": self.state.resumed_at,
               "check/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "check/loaded_param_share": self.engine.loaded_share}
        if self.signal_rows is not None:  # ama_h's measuring cost in this attempt: seconds, share of the loop's time
            out["check/heldout_seconds"] = self.heldout_seconds
            out["check/heldout_share"] = self.heldout_seconds / max(self.step_seconds, 1e-9)
        if params is None:  # ZeRO-3: each rank holds a different shard, there is no replica to compare
            return out
        diff = torch.zeros((), dtype=torch.float64)
        if self.world > 1:
            reference = params.clone()
            torch.distributed.broadcast(reference, src=0)
            diff = (params - reference).abs().max()
            torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
        return {"check/replica_max_diff": float(diff), **out}

    def _save_best(self) -> None:
        """Every rank (collective under ZeRO-3); rank 0 writes the trainable weights."""
        state = self.engine.trainable_state()
        if self.rank == 0:
            checkpointing.save_best(self.run, self.best_dir, state)

    def _log(self, metrics: dict[str, float]) -> None:
        step = self.state.step
        # ~40 scalars per step cost 12-20% of a tiny model's step (benchmarks/dpo_throughput.py):
        # write them on log steps, evaluations and the last step only.
        logged = step % self.cfg.eval.log_every_n_steps == 0 or step == self.spec.steps or "eval/loss/mean" in metrics
        if logged:
            self._scalars(metrics, step)
        self.progress.update(step, self.spec.steps, metrics)

    def _scalars(self, metrics: dict[str, float], step: int) -> None:
        """Finite numbers of `metrics` to TensorBoard at global step `step` (rank 0 of a local run)."""
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    # -- the end -------------------------------------------------------------------------------
    def finish(self) -> None:
        """Save the final model (specialists: the best held-out step) into the output unit.

        Every rank calls it (ZeRO-3 gathers its shards onto rank 0); rank 0 writes.
        """
        if self.writer is not None:
            self.writer.close()
        for stream in self.streams:
            stream.close()
        _barrier(self.world)
        whole = self.engine.consolidate()
        if self.rank != 0:
            return
        best = checkpointing.load_best(self.run, self.best_dir) if self.spec.kind == "specialist" else None
        unit = self.run.unit(*self.spec.out_unit)
        with unit.local_dir() as out:
            self.engine.export(out / MODEL_DIR, whole, best)
            from ama_ray.models.loading import load_tokenizer

            load_tokenizer(self.spec.model_path, trust_remote_code=self.cfg.model.trust_remote_code,
                           revision=self.cfg.model.revision).save_pretrained(out / MODEL_DIR)


def _raw_targets(rows: list[dict], raw: bool) -> list[dict]:
    """Rows whose specialist loss is 0 when their task is measured against its raw loss."""
    if raw:
        for row in rows:
            if "specialist_loss" in row:
                row["specialist_loss"] = 0.0
    return rows


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _all_gather_obj(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _tensorboard(run: RunDir, unit: Unit, rank: int):
    if rank != 0 or not run.is_local:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run.tensorboard(unit)))
