"""Model and optimizer wrapping for the training loop: plain DDP, PEFT LoRA, DeepSpeed ZeRO-2/3.

The loop sees one `Engine`: `module` (what forward goes through), `bare` (the Hugging Face
model; a PeftModel under LoRA), `no_sync(last)` and `autocast()` around each micro-batch,
`backward(loss, last)`, `step()` (clip, optimizer, scheduler), `save_checkpoint` /
`load_checkpoint`, `trainable_state()` and `consolidate()` + `export()`. Modes
(docs/scaling.md):

- DDP (`scaling.deepspeed.zero_stage: 0`): `ray.train.torch.prepare_model`. With
  `model.dtype: bfloat16` full-weight training keeps float32 weights and runs forward under
  bf16 autocast (torch AMP: float32 master weights); rank 0 writes the checkpoint.
- LoRA (`model.lora.enabled`, or per stage `specialists.lora` / `generalist.lora`): PEFT adapters on a frozen base loaded in `model.dtype`; the
  adapters stay float32. Precomputed reference log-probs mean no reference model is needed.
  Combines with DDP or ZeRO.
- ZeRO-2/3: one DeepSpeed engine per Ray Train worker on Ray's process group. DeepSpeed builds
  AdamW (torch's; cpu_adam with optimizer offload), clips and steps the scheduler; its bf16
  keeps bf16 weights and float32 optimizer state. Every rank writes its shard of a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ama_ray.config import Config, LoraConfig, OptimConfig
from ama_ray.errors import ConfigError, StorageError
from ama_ray.train import checkpointing

log = logging.getLogger(__name__)
TAG = "engine"  # DeepSpeed's checkpoint tag (sub-directory) inside a Ray checkpoint


@dataclass
class Engine:
    """One worker's model, optimizer and scheduler behind the interface the loop uses (module doc)."""

    module: torch.nn.Module  # forward goes through this: DDP wrapper, DeepSpeed engine or the bare model
    bare: torch.nn.Module  # the Hugging Face model (PeftModel under LoRA)
    optimizer: Any
    scheduler: Any
    max_grad_norm: float = 0.0
    ds: Any = None  # deepspeed.DeepSpeedEngine, or None for DDP / a single process
    lora: LoraConfig | None = None
    autocast_dtype: torch.dtype | None = None
    rank: int = 0
    world: int = 1
    model_path: str = ""
    dtype: str = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    loaded_share: float = 1.0  # share of the model's weights this rank held right after loading (ZeRO-3: ~1/world)

    @property
    def zero3(self) -> bool:
        return self.ds is not None and self.ds.zero_optimization_partition_weights()

    # -- one optimizer step ----------------------------------------------------------------------
    def no_sync(self, last: bool):
        """Around a micro-batch's forward and backward: DDP all-reduces gradients only on the last.

        DeepSpeed ZeRO reduces (partitions) gradients on every backward, so it needs nothing here.
        """
        if last or self.world == 1 or self.ds is not None:
            return contextlib.nullcontext()
        return self.module.no_sync()

    def autocast(self):
        """bf16 autocast for forward passes of float32 weights (DDP with `model.dtype: bfloat16`)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(self.bare.parameters()).device
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate the gradient of `loss`, already this micro-batch's share of the step's objective."""
        if self.ds is None:
            loss.backward()
            return
        self.ds.backward(loss, scale_wrt_gas=False)
        if not last:
            self.ds.step()  # DeepSpeed counts micro-batches in step(); it updates only at the last

    def step(self, on_nonfinite=None) -> float:
        """Clip, optimizer and scheduler step, zero the gradients; returns the gradient norm before clipping.

        `on_nonfinite(norm)` is called when the norm is not finite: before the optimizer step
        under DDP (the norm is of the all-reduced gradients, the same on every rank), after
        DeepSpeed's step (which computes it inside).
        """
        if self.ds is not None:
            self.ds.step()
            norm = self.ds.get_global_grad_norm()
            if norm is None:  # DeepSpeed did not compute one this step
                return math.nan
            if on_nonfinite is not None and not math.isfinite(float(norm)):
                on_nonfinite(float(norm))
            return float(norm)
        params = [p for p in self.bare.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or math.inf)
        if on_nonfinite is not None and not math.isfinite(float(norm)):
            on_nonfinite(float(norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- views of the weights --------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor] | None:
        """Trainable weights by `bare` parameter name (LoRA: the adapters), on CPU; rank 0 only (None elsewhere).

        Collective under ZeRO-3: every rank must call it. Gathers one parameter at a time, so
        no rank ever holds more than one whole weight beyond its shard.
        """
        out: dict[str, torch.Tensor] = {}
        for name, p in self.bare.named_parameters():
            if not p.requires_grad:
                continue
            with self._gathered([p]):
                if self.rank == 0:
                    # clone + contiguous: safetensors refuses shared (tied) storages.
                    out[name] = p.detach().cpu().clone().contiguous()
        return out if self.rank == 0 else None

    def replica_params(self) -> torch.Tensor | None:
        """This rank's trainable weights as one float64 vector; None under ZeRO-3 (sharded, not replicated)."""
        if self.zero3:
            return None
        return torch.cat([p.detach().double().flatten().cpu() for p in self.bare.parameters() if p.requires_grad])

    def lockstep_rows(self, task_rows: list[list[dict]]) -> list[list[dict]]:
        """Under ZeRO-3 every forward is collective: cut each task's rows to the fewest any rank holds."""
        if not self.zero3 or self.world == 1:
            return task_rows
        counts = torch.tensor([len(rows) for rows in task_rows], dtype=torch.long)
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MIN)
        return [rows[:n] for rows, n in zip(task_rows, counts.tolist())]

    def _gathered(self, params: list[torch.nn.Parameter]):
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path) -> bool:
        """Write this rank's part of the resumable state into `directory`; True if it wrote files.

        DeepSpeed: collective, every rank writes its optimizer (ZeRO-3: and weight) shard under
        `directory/engine/`; Ray Train merges the workers' directories. Otherwise rank 0 writes
        the trainable weights (LoRA: only the adapters), optimizer and scheduler.
        """
        if self.ds is not None:
            self.ds.save_checkpoint(str(directory), tag=TAG, exclude_frozen_parameters=self.lora is not None)
            return True
        state = self.trainable_state()
        if self.rank != 0:
            return False
        checkpointing.save_weights(directory, state, self.optimizer, self.scheduler)
        return True

    def load_checkpoint(self, directory: Path) -> None:
        """Restore weights, optimizer and scheduler from a checkpoint `save_checkpoint` wrote (every rank)."""
        written_by_deepspeed = (directory / TAG).is_dir()
        if written_by_deepspeed != (self.ds is not None):
            raise StorageError(
                f"the checkpoint was written {'with' if written_by_deepspeed else 'without'} DeepSpeed, "
                f"this run {'uses' if self.ds is not None else 'does not use'} it",
                where=str(directory),
                fix="keep scaling.deepspeed as it was, or restart the stage with --force <stage>",
            )
        if self.ds is None:
            checkpointing.load_weights(directory, self.bare, self.optimizer, self.scheduler)
            return
        path, _ = self.ds.load_checkpoint(str(directory), tag=TAG, load_module_strict=self.lora is None)
        if path is None:
            raise StorageError("DeepSpeed found no checkpoint to load", where=str(directory / TAG), fix="restart the stage with --force <stage>")

    # -- the trained model -----------------------------------------------------------------------
    def consolidate(self) -> dict[str, torch.Tensor] | None:
        """ZeRO-3: the whole state dict gathered layer by layer onto rank 0 (collective); else None."""
        return self.ds._zero3_consolidated_16bit_state_dict() if self.zero3 else None

    def export(self, out: Path, whole: dict[str, torch.Tensor] | None, best: dict[str, torch.Tensor] | None) -> None:
        """Rank 0: write the model as a plain `save_pretrained` directory `out` in `model.dtype`.

        `whole` is `consolidate()`'s result under ZeRO-3 (rank 0's own weights are only a shard);
        `best` (optional) replaces the trainable weights, e.g. a specialist's best held-out step.
        LoRA: the adapters go to `out/adapter` (PEFT format) and `out` holds the merged model.
        """
        from ama_ray.models.loading import DTYPES, load_model

        model = self.bare
        if whole is not None:
            model = load_model(self.model_path, dtype=self.dtype, trust_remote_code=self.trust_remote_code, revision=self.revision)
            model = add_lora(model, self.lora) if self.lora is not None else model
            _load_exact(model, whole, "consolidated ZeRO-3 weights")
        if best is not None:
            _load_exact(model, best, "best checkpoint")
        if self.lora is not None:
            model.save_pretrained(out / "adapter", safe_serialization=True)
            model = model.merge_and_unload()
        model.to(DTYPES[self.dtype]).save_pretrained(out, safe_serialization=True)


def _load_exact(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """`load_state_dict(strict=False)` that still refuses names the model does not have."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{what}: names unknown to the model: {result.unexpected_keys[:5]}")


def build_engine(cfg: Config, optim: OptimConfig, model_path: str, steps: int, rank: int, world: int, *,
                 kind: str) -> Engine:
    """Load the base from `model_path` and wrap it as the LoRA settings of `kind` (a `specialist`
    or `generalist`: `Config.lora_for`) and `cfg.scaling.deepspeed` say.

    Call inside a Ray Train worker (the process group is Ray's). Raises ConfigError for LoRA
    target modules the model does not have, ModelError if the model cannot be loaded.
    """
    from ama_ray.models.loading import load_model

    zero = cfg.scaling.deepspeed.zero_stage
    lora = cfg.lora_for(kind) if cfg.lora_for(kind).enabled else None
    bf16 = cfg.model.dtype == "bfloat16"
    # Full weights under DDP train in float32 with bf16 autocast; a frozen LoRA base and
    # DeepSpeed (its own float32 optimizer copy) take the configured dtype directly.
    load_dtype = cfg.model.dtype if (lora is not None or zero) else "float32"
    ds_config = deepspeed_config(cfg, optim, world) if zero else None
    with partitioned_construction(ds_config):
        model = load_model(model_path, dtype=load_dtype, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
        loaded_share = resident_share(model)
        if cfg.model.gradient_checkpointing:
            # Non-reentrant: works with frozen inputs (LoRA) and with DDP without extra hooks.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if lora is not None:
            model = add_lora(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    factor = lr_lambda(optim, steps)
    common = dict(
        bare=model, max_grad_norm=optim.max_grad_norm, lora=lora, rank=rank, world=world, model_path=model_path,
        dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision,
        loaded_share=loaded_share,
    )
    if zero:
        ds, scheduler = _deepspeed(model, params, ds_config, factor)
        return Engine(module=ds, optimizer=ds.optimizer, scheduler=scheduler, ds=ds, **common)
    import ray.train.torch

    module = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    autocast = torch.bfloat16 if bf16 and lora is None else None
    return Engine(module=module, optimizer=optimizer, scheduler=scheduler, autocast_dtype=autocast, **common)


@contextlib.contextmanager
def partitioned_construction(ds_config: dict | None):
    """Under ZeRO-3 (`ds_config` stage 3), models built inside are partitioned as they load.

    transformers' `from_pretrained` constructs inside `deepspeed.zero.Init` and loads each weight
    into its shards while an `HfDeepSpeedConfig` is alive, so no rank ever holds the whole model
    (without it every rank loads all of it in host memory, then DeepSpeed partitions). Collective:
    every rank loads together. Closed before anything else loads (e.g. rank 0's export), which
    must not construct partitioned on one rank alone.
    """
    if not ds_config or ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


def resident_share(model: torch.nn.Module) -> float:
    """Share of the model's weights this process holds: 1.0, or its partition's share under ZeRO-3."""
    held = full = 0
    for p in model.parameters():
        full += getattr(p, "ds_numel", p.numel())
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return held / max(full, 1)


def add_lora(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """Wrap `model` with fresh PEFT LoRA adapters (B = 0: the wrapped model equals the base)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: str | list[str] = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            # PEFT reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning per
            # training run about code that is not ours (gone when PEFT reads the new name).
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            return get_peft_model(model, peft_cfg)
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"LoRA cannot adapt this model: {str(err).splitlines()[0][:200]}",
            where="model.lora.target_modules",
            fix=f"use names of its linear layers ({', '.join(names)}) or [all-linear]",
        ) from None


def deepspeed_config(cfg: Config, optim: OptimConfig, world: int = 1) -> dict:
    """The DeepSpeed config dict for `scaling.deepspeed` on `world` workers (train_batch_size left
    for DeepSpeed to derive)."""
    ds = cfg.scaling.deepspeed
    adam: dict[str, Any] = {"lr": optim.lr, "weight_decay": optim.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8}
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}  # DeepSpeed's cpu_adam (compiled)
    else:
        adam["torch_adam"] = True  # FusedAdam would JIT-compile a CUDA kernel; torch's AdamW needs nothing
    # No train_batch_size: it is micro x accumulation x world, and "auto" broke ZeRO-3 here (FIELD-NOTES).
    return {
        "train_micro_batch_size_per_gpu": optim.worker_batch(world) // optim.grad_accum,
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": optim.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _deepspeed(model: torch.nn.Module, params: list, config: dict, factor: Callable[[int], float]):
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if torch.cuda.is_available():
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    # The process group Ray Train set up is reused (gloo on CPU, nccl on GPUs).
    ds, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
    )
    return ds, scheduler


def lr_lambda(optim: OptimConfig, steps: int):
    """Linear warm-up, then constant, linear or cosine decay to 0 at `steps`."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        if optim.schedule == "constant":
            return 1.0
        progress = (step - optim.warmup_steps) / max(1, steps - optim.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if optim.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
