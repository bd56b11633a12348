"""CPU guards for the GPU path (issue 18): what a multi-GPU run needs that a CPU run cannot show.

- Every collective the loop makes hands tensors on a device its process group has a backend for.
  A GPU run's group is `launch.process_group_backend(True)`; NCCL alone takes CUDA tensors only,
  and the loop's bookkeeping tensors (per-task sums, replica checks, counts) live on the CPU.
- Labels are moved to the device of the per-example losses (the `meta` device stands in for CUDA).
- A global batch draws the same per-step task counts for 1 and 2 workers, and its per-worker
  objectives average to the one-worker objective (DDP and DeepSpeed average gradients).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ama_ray.mixing import LocalMixer, batch_objective
from ama_ray.train.data import ShardStream, TableSource
from ama_ray.train.engine import Engine
from ama_ray.train.launch import process_group_backend
from ama_ray.train.loop import Job, UnitSpec, WorkerState, lr_lambda
from ama_ray.train.progress import ProgressClient

pytestmark = pytest.mark.timeout(120)
TASKS = ["a", "b", "c"]


class FakeGroup:
    """torch.distributed for one rank of a world of 2 whose group has `backend`: every collective
    checks its tensors' devices (and otherwise leaves them as rank 0's)."""

    def __init__(self, backend: str):
        self.backend = backend
        parts = [item.split(":") for item in backend.split(",")]
        by_device = {p[0]: p[1] for p in parts if len(p) == 2}
        if not by_device:  # a plain backend name
            by_device = {"cuda": backend} if backend == "nccl" else {"cpu": backend}
        self.devices = set(by_device)
        self.calls: list[str] = []

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        self.calls.append(name)
        assert tensor.device.type in self.devices, (
            f"{name} got a {tensor.device.type} tensor; a '{self.backend}' group only takes {sorted(self.devices)} tensors")

    def install(self, monkeypatch) -> None:
        dist = torch.distributed
        monkeypatch.setattr(dist, "get_backend", lambda group=None: self.backend)
        monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None, async_op=False: self._check("all_reduce", t))
        monkeypatch.setattr(dist, "broadcast", lambda t, src=0, group=None, async_op=False: self._check("broadcast", t))
        monkeypatch.setattr(dist, "barrier", lambda group=None, async_op=False: self.calls.append("barrier"))
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

        def all_gather_object(out, obj, group=None):
            # torch sends objects as byte tensors on the group's object device (CPU whenever it has gloo)
            self._check("all_gather_object", torch.zeros(1, dtype=torch.uint8, device="cpu" if "cpu" in self.devices else "cuda"))
            out[:] = [obj] * len(out)

        monkeypatch.setattr(dist, "all_gather_object", all_gather_object)


def _rows(task: str, n: int, rng: np.random.Generator, varied: bool = False) -> list[dict]:
    ids = lambda k: rng.integers(3, 40, k).tolist()  # noqa: E731
    size = (lambda k: int(rng.integers(1, 4 * k))) if varied else (lambda k: k)  # noqa: E731
    return [{"example_id": f"{task}{i}", "prompt_input_ids": ids(size(3)), "chosen_input_ids": ids(size(2)),
             "rejected_input_ids": ids(size(2)), "ref_chosen_logps": -8.0, "ref_rejected_logps": -8.0, "specialist_loss": 0.6}
            for i in range(n)]


def _job(minimal_cfg, rank: int = 0, world: int = 2, global_batch: int | None = None, grad_accum: int = 1,
         varied: bool = False) -> Job:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, pad_token_id=0)).train()
    optim = minimal_cfg.generalist.optim.model_copy(update={"batch_size": 8, "global_batch_size": global_batch, "grad_accum": grad_accum})
    spec = UnitSpec(cfg={}, kind="generalist", tasks=TASKS, algorithm="ama_s", seed=0, steps=10, model_path="",
                    out_unit=["generalist", "ama_s", "seed0"], sizes=[50] * 3, settings=minimal_cfg.mixing.to_dict())
    rng = np.random.default_rng(1)
    rows = {t: _rows(t, 50, rng, varied) for t in TASKS}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = Engine(module=model, bare=model, optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, 10)),
                    rank=rank, world=world)
    return Job(spec=spec, cfg=minimal_cfg, optim=optim, run=None, rank=rank, world=world, engine=engine,
               streams=[ShardStream(t, TableSource(rows[t]), 0, rank, world) for t in TASKS],
               eval_rows=[rows[t][:4] for t in TASKS], loss_cfg=minimal_cfg.dpo, policy=spec.policy(),
               mixer=LocalMixer(spec.policy()), progress=ProgressClient(None, "test", rank), pad_id=0, state=WorkerState(),
               writer=None, tasks=TASKS, k=3, best_dir=None)


class _Zero3View(Engine):
    zero3 = True  # lockstep_rows is ZeRO-3's


def _run_loop_collectives(job: Job) -> None:
    import copy
    import hashlib

    job.alpha_digest = hashlib.sha256()
    job.train_step(0, job.mixer.alpha(0))
    job.evaluate()
    job.consistency()
    zero3 = copy.copy(job.engine)
    zero3.__class__ = _Zero3View
    zero3.lockstep_rows([[{}] * 3, [{}] * 2])


def test_a_gpu_group_takes_every_tensor_the_loop_hands_to_a_collective(minimal_cfg, monkeypatch):
    group = FakeGroup(process_group_backend(use_gpu=True))
    group.install(monkeypatch)
    _run_loop_collectives(_job(minimal_cfg))
    # the per-step sums, the eval sums, the replica check and the ZeRO-3 row counts all went through it
    assert group.calls.count("all_reduce") >= 4 and "broadcast" in group.calls and "all_gather_object" in group.calls


def test_an_nccl_only_group_would_refuse_the_loops_cpu_tensors(minimal_cfg, monkeypatch):
    """What every multi-GPU run did before (Ray's default backend with use_gpu): step 0 fails."""
    FakeGroup("nccl").install(monkeypatch)
    with pytest.raises(AssertionError, match="all_reduce got a cpu tensor"):
        _run_loop_collectives(_job(minimal_cfg))


def test_cpu_runs_keep_gloo():
    assert process_group_backend(use_gpu=False) == "gloo"
    assert set(process_group_backend(use_gpu=True).split(",")) == {"cpu:gloo", "cuda:nccl"}


def test_labels_follow_the_losses_to_their_device():
    """batch_objective on per-example losses that live on another device (meta stands in for CUDA)."""
    e = torch.ones(4, device="meta")
    ids = torch.tensor([0, 1, 1, 0])
    with pytest.raises(RuntimeError, match="same device"):
        torch.zeros(2, device="meta").index_add(0, ids, e)  # what the objective did with CPU labels
    out = batch_objective(e, ids, np.array([0.5, 0.5]), torch.bincount(ids, minlength=2), 4)
    assert out.device.type == "meta" and out.shape == ()
    assert batch_objective(e, ids, None).device.type == "meta"


@pytest.mark.parametrize("algorithm_mode", ["sample", "reweight"])
def test_a_global_batch_draws_the_same_step_for_any_number_of_workers(minimal_cfg, algorithm_mode):
    one = _job(minimal_cfg, rank=0, world=1, global_batch=24)
    two = [_job(minimal_cfg, rank=r, world=2, global_batch=24) for r in range(2)]
    for job in (one, *two):
        job.policy.mode = algorithm_mode
    rng = np.random.default_rng(5)
    for step in range(6):
        alpha = rng.dirichlet(np.ones(3))
        labels, counts, total = one.sample_labels(step, alpha)
        shares = [job.sample_labels(step, alpha) for job in two]
        assert total == 24 and all(s[2] == 24 for s in shares)
        assert [len(s[0]) for s in shares] == [12, 12]
        together = np.concatenate([s[0] for s in shares])
        np.testing.assert_array_equal(np.bincount(together, minlength=3), np.bincount(labels, minlength=3))
        for s in shares:  # every worker normalises by the whole step's counts
            assert torch.equal(s[1], counts)
        # per-worker objectives x world, averaged as DDP averages gradients, = the one-worker objective
        e = torch.rand(24, dtype=torch.float64)
        weights = one.policy.loss_weights(alpha)
        whole = batch_objective(e, torch.as_tensor(labels), weights, counts, total)
        order = {r: np.flatnonzero(np.arange(24) % 2 == r) for r in range(2)}
        parts = [2 * batch_objective(e[order[r]], torch.as_tensor(labels[order[r]]), weights, counts, total) for r in range(2)]
        assert torch.allclose(sum(parts) / 2, whole)


def test_per_worker_batches_stay_per_worker(minimal_cfg):
    """Without global_batch_size each worker draws its own batch_size labels (the old behaviour)."""
    jobs = [_job(minimal_cfg, rank=r, world=2) for r in range(2)]
    alpha = np.full(3, 1 / 3)
    (a, ca, ta), (b, cb, tb) = (job.sample_labels(0, alpha) for job in jobs)
    assert len(a) == len(b) == ta == tb == 8 and not np.array_equal(a, b)
    assert int(ca.sum()) == int(cb.sum()) == 8


def test_global_batch_must_split_into_workers_and_micro_batches(minimal_cfg):
    from ama_ray.config import apply_override, validate
    from ama_ray.errors import ConfigError

    raw = minimal_cfg.model_dump(mode="json")
    for item in ["scaling.num_workers=2", "generalist.optim.grad_accum=2", "generalist.optim.global_batch_size=6"]:
        apply_override(raw, item)
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert err.value.where == "generalist.optim.global_batch_size" and "multiple of" in err.value.fix and "4" in err.value.fix
    apply_override(raw, "generalist.optim.global_batch_size=8")
    cfg = validate(raw)
    assert cfg.generalist.optim.worker_batch(2) == 4 and cfg.specialists.optim.worker_batch(2) == cfg.specialists.optim.batch_size


def test_a_reserved_gpu_that_torch_cannot_use_is_an_error(monkeypatch):
    """Inference and evaluation given a GPU compute on it; a CPU-only torch there is refused, not
    silently slow (the scorer used to reserve a GPU and compute on the CPU)."""
    from ama_ray.errors import ResourceError
    from ama_ray.models.loading import compute_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device(False) == torch.device("cpu")
    with pytest.raises(ResourceError) as err:
        compute_device(True)
    assert "CUDA build" in err.value.fix


def test_micro_batches_group_a_steps_pairs_by_length_and_train_the_same_step(minimal_cfg, monkeypatch):
    """With grad_accum > 1 a step's pairs are split into micro-batches of consecutive lengths (less
    padding than the draw order gave), and the step is the one a single micro-batch trains."""
    import ama_ray.train.loop as loop
    from ama_ray.dpo import collate

    real = []
    per_example = loop.per_example

    def counting(model, rows, *args):
        real.append(int(collate(rows, 0)["attention_mask"].sum()))
        return per_example(model, rows, *args)

    monkeypatch.setattr(loop, "per_example", counting)
    steps = {}
    for accum in (1, 4):
        job = _job(minimal_cfg, world=1, grad_accum=accum, varied=True)
        real.clear()
        metrics = [job.train_step(s, job.mixer.alpha(s)) for s in range(3)]
        steps[accum] = (metrics, [p.detach().clone() for p in job.engine.module.parameters()], sum(real), len(real))
    (one, w1, real1, calls1), (four, w4, real4, calls4) = steps[1], steps[4]
    assert real1 == real4 and (calls1, calls4) == (3, 12)  # the same tokens, in one and in four micro-batches a step
    for a, b in zip(one, four):
        assert a.keys() == b.keys()
        for key in a:
            if key != "train/data_seconds":
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(w1, w4):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # In draw order, four micro-batches of two would pad more than the length-grouped ones did.
    job = _job(minimal_cfg, world=1, grad_accum=4, varied=True)
    labels, _, _ = job.sample_labels(0, job.mixer.alpha(0))
    examples, _ = loop.draw_batch(job.streams, labels)
    in_order = sum(collate(examples[i : i + 2], 0)["input_ids"].numel() for i in range(0, 8, 2))
    grouped = sum(collate([examples[i] for i in idx], 0)["input_ids"].numel() for idx in loop.micro_batches(examples, 4))
    assert grouped < in_order
    assert [len(idx) for idx in loop.micro_batches(examples, 4)] == [2, 2, 2, 2]
    assert loop.micro_batches(examples, 1)[0].tolist() == list(range(8))
