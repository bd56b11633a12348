"""Shared pieces of the benchmarks: offline setup, models, data, a Ray-free worker, timing, tables.

Every benchmark compares arms measured side by side in one process and one run, as ratios:
`alternate` runs the arms in blocks, in an order that flips every repetition, and ratios are
medians of per-repetition ratios, so a neighbour that loads this shared machine for a while
slows every arm of that repetition alike.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def quiet() -> None:
    """Silence progress bars and info logs of datasets/transformers (the tables are the output)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

JOB_FILE = Path(__file__).resolve().parent.parent / "jobs" / "minimal.yaml"
TINY_SHAPES = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}


# -- models ------------------------------------------------------------------------------------
def model_dir(name: str, workdir: Path, cache_dir: str = "~/.cache/ama_ray", **shapes) -> str:
    """A `save_pretrained` directory for `name`.

    `tiny`: the embedded tiny model's shapes (or `shapes`), tokenizer trained on the benchmark,
    random weights: speed does not depend on the weights, and the SFT base takes ~20 s to
    build. Anything else goes through `resolve_model_path` (e.g. `smollm2-135m` once fetched).
    """
    if name != "tiny":
        from ama_ray.models.loading import resolve_model_path

        return resolve_model_path(name, cache_dir)
    from ama_ray.data import benchmark
    from ama_ray.models.tiny import build_tiny

    out = workdir / "tiny-model"
    if not (out / "config.json").exists():
        build_tiny(out, benchmark.corpus(seed=0, n_per_task=300), **{**TINY_SHAPES, **shapes})
    return str(out)


def load(path: str):
    """(model in train mode, tokenizer), float32."""
    from ama_ray.models.loading import load_model, load_tokenizer

    return load_model(path, dtype="float32").train(), load_tokenizer(path)


# -- data --------------------------------------------------------------------------------------
def texts(tasks: list[str], n_per_task: int, seed: int = 0) -> list[tuple[int, dict]]:
    """(task index, text row) pairs; task j uses benchmark generator j mod 3 with its own seed."""
    from ama_ray.data import benchmark

    out = []
    for j, _ in enumerate(tasks):
        generator = benchmark.TASKS[j % len(benchmark.TASKS)]
        out += [(j, row) for row in benchmark.generate(generator, n_per_task, seed=seed + j)]
    return out


def tokenize(tokenizer, row: dict) -> dict:
    """Token ids the way the prepare stage writes them (completions end with EOS)."""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tokenizer.eos_token_id]
    return {
        "prompt_input_ids": ids(row["prompt"]),
        "chosen_input_ids": ids(row["chosen"]) + eos,
        "rejected_input_ids": ids(row["rejected"]) + eos,
    }


def with_scores(rows: list[dict], model, pad_id: int, seed: int = 0) -> list[dict]:
    """Rows plus real reference log-probs (from `model`) and synthetic specialist losses.

    Specialist losses are drawn around log 2, so about half the examples have a positive
    clipped excess: the masked and the unmasked paths both run, as in a real generalist.
    """
    from ama_ray.dpo import reference_logps

    ref_c, ref_r = reference_logps(model, rows, pad_id, batch_size=64)
    spec = np.random.default_rng(seed).uniform(0.55, 0.85, len(rows))
    return [
        {**r, "ref_chosen_logps": float(c), "ref_rejected_logps": float(j), "specialist_loss": float(s)}
        for r, c, j, s in zip(rows, ref_c, ref_r, spec)
    ]


# -- the generalist step without Ray -----------------------------------------------------------
def load_cfg(batch_size: int, lr: float = 1e-4):
    from ama_ray.config import load_config

    return load_config(JOB_FILE, [f"generalist.optim.batch_size={batch_size}", f"generalist.optim.lr={lr}",
                                  "generalist.optim.warmup_steps=0", "generalist.optim.schedule=constant"])


def make_job(model, pad_id: int, rows_by_task: list[list[dict]], algorithm: str, batch_size: int,
             *, client=None, lr: float = 1e-4, seed: int = 0, tensorboard_dir: str | None = None, rank: int = 0, world: int = 1):
    """A `ama_ray.train.loop.Job` for one worker (rank `rank` of `world`, default 0 of 1) built from in-memory rows.

    Its `train_step(step, alpha)` is the library's own step: the policy's labels, `draw_batch`,
    collate, `per_example_loss`, the policy's objective, `batch_objective`, backward, per-task
    sums, mixer report, gradient clipping, AdamW and the metric dict. The mixer is the
    library's in-process `LocalMixer` (no Ray: the policy update runs inside the step, so its
    cost is counted and the actor's round trip is not), or, when `client` is given (e.g.
    `ama_ray.mixing.actor.RayMixer`), a fresh mixing actor on the running Ray and
    `client(actor_name, 0)`. The model is used as is (no DDP wrapper); with world > 1 the
    step's collectives need a process group (benchmarks/gpu_check.py starts one). With
    `tensorboard_dir`, `Job._log` writes TensorBoard scalars there, as rank 0 of a local run does.
    """
    from ama_ray.mixing import LocalMixer
    from ama_ray.train.data import ShardStream, TableSource
    from ama_ray.train.loop import Job, UnitSpec, WorkerState, lr_lambda
    from ama_ray.train.progress import ProgressClient

    cfg = load_cfg(batch_size, lr)
    tasks = [f"task{i}" for i in range(len(rows_by_task))]
    spec = UnitSpec(cfg={}, kind="generalist", tasks=tasks, algorithm=algorithm, seed=seed, steps=10**9,
                    model_path="", out_unit=["bench", algorithm], sizes=[len(r) for r in rows_by_task],
                    settings=cfg.mixing.to_dict())
    if client is None:
        mixer = LocalMixer(spec.policy())
    else:
        from ama_ray.mixing.actor import create_mixing_actor

        spec.actor_name = f"bench-{algorithm}-{time.time_ns()}"
        owner = create_mixing_actor(spec.actor_name, algorithm, tasks, spec.sizes, cfg.mixing)
        mixer = client(spec.actor_name, 0)
        mixer.owner = owner  # a named actor dies with its creator's last handle
    optim = cfg.generalist.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    return Job(
        spec=spec, cfg=cfg, optim=optim, run=None, rank=rank, world=world, model=model,
        streams=[ShardStream(t, TableSource(rows), seed, rank, world) for t, rows in zip(tasks, rows_by_task)], eval_rows=[],
        optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, spec.steps)),
        loss_cfg=cfg.dpo, policy=spec.policy(), mixer=mixer, progress=ProgressClient(None, "bench", 0),
        pad_id=pad_id, state=WorkerState(),
        writer=_writer(tensorboard_dir), tasks=tasks, k=len(tasks), best_dir=None,
    )


def _writer(log_dir: str | None):
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)


def job_block(job, log: bool = False) -> Callable[[int], tuple[float, float]]:
    """A block runner for `alternate`: n steps of `job`, alpha fetched per step as `Job.train` does.

    log=True also runs `Job._log` after each step (TensorBoard scalars when the job has a
    writer), which `Job.train` does every step.
    """
    counter = SimpleNamespace(step=0)

    def run(n: int) -> tuple[float, float]:
        start = clock()
        for _ in range(n):
            metrics = job.train_step(counter.step, job.mixer.alpha(counter.step))
            counter.step += 1
            if log:
                job.state.step = counter.step
                job._log(metrics)
        return since(start, n)

    return run


# -- timing ------------------------------------------------------------------------------------
def clock() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds), for `since`."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float], n: int) -> tuple[float, float]:
    """(wall, CPU) seconds per unit since `start` = `clock()`, over n units."""
    wall, cpu = clock()
    return (wall - start[0]) / n, (cpu - start[1]) / n


def alternate(arms: dict[str, Callable[[int], tuple[float, float]]], reps: int, block: int,
              warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Per arm, {"wall": [...], "cpu": [...]}: seconds per unit, one figure per repetition.

    Each arm is a callable `run(n) -> (wall, CPU) seconds per unit`. Every arm first runs
    `warmup` units untimed; then each repetition runs every arm for `block` units, in an order
    reversed on odd repetitions (no arm always runs first or last). On a shared, oversubscribed
    machine the CPU time of a one-thread arm is the steadier measure (it does not count the
    time other processes hold the core); wall time is what a user waits.
    """
    names = list(arms)
    for name in names:
        if warmup:
            arms[name](warmup)
    out: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            wall, cpu = arms[name](block)
            out[name]["wall"].append(wall)
            out[name]["cpu"].append(cpu)
    return out


def ratios(times: dict, num: str, den: str, kind: str, speed: bool = True) -> list[float]:
    """Per-repetition ratios of arm `num` to arm `den` on `kind` ("wall" or "cpu").

    speed=True: speed of num over speed of den (time den / time num); False: time num / time den.
    """
    pairs = zip(times[num][kind], times[den][kind])
    return [d / n if speed else n / d for n, d in pairs]


def med(times: dict, name: str, kind: str) -> float:
    return statistics.median(times[name][kind])


def spread(values: list[float]) -> str:
    """`median [min-max]` of a list of ratios, for the tables."""
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats with 3 significant digits."""
    def cell(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def header(title: str, **facts) -> str:
    """A one-line heading with the run's facts (threads, torch version, ...)."""
    facts = {"torch": torch.__version__, "threads": torch.get_num_threads(), **facts}
    return f"## {title}\n\n" + ", ".join(f"{k}={v}" for k, v in facts.items()) + "\n"
