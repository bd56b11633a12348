"""Files of a resumable checkpoint: trainable weights, optimizer and scheduler, and the loop's state.

A checkpoint directory holds `state.json` (step, best held-out step, stream positions, mixing
state; written by rank 0) plus either `model.safetensors` + `optim.pt` (DDP and single
process; rank 0) or DeepSpeed's `engine/` directory, to which every rank writes its shard
(`ama_ray.train.engine`). Weights are written with safetensors; the optimizer and scheduler
with `torch.save` and read back with `weights_only=True`, so loading a DDP checkpoint never
unpickles arbitrary objects. DeepSpeed's `engine/*.pt` files are its own `torch.save` pickles,
which DeepSpeed loads with full unpickling: resume only from checkpoint directories you wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ama_ray.storage import RunDir, Unit

MODEL = "model.safetensors"
OPTIM = "optim.pt"
STATE = "state.json"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP (or any `.module` wrapper)."""
    return model.module if hasattr(model, "module") else model


def save_weights(directory: Path, weights: dict[str, torch.Tensor], optimizer, scheduler) -> None:
    """Write `weights` (name -> tensor), optimizer and scheduler into `directory` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(directory / MODEL))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / OPTIM)


def load_weights(directory: Path, model, optimizer, scheduler) -> None:
    """Restore what `save_weights` wrote; weights absent from the file (frozen ones) stay as they are."""
    unwrap(model).load_state_dict(load_file(str(directory / MODEL)), strict=False)
    optim = torch.load(directory / OPTIM, weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])


def save_state(directory: Path, state: dict[str, Any]) -> None:
    """Write the loop's state (JSON) into `directory` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE).write_text(json.dumps(state, default=_plain))


def load_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STATE).read_text())


def fresh_checkpoints(run: RunDir, stage: str, unit: Unit, digest: str, force: bool) -> None:
    """Drop `unit`'s resumable checkpoints when forced or written under other settings (a
    `.config_hash` marker in each checkpoint folder records the settings they belong to)."""
    if not run.is_local:
        return
    for folder in map(Path, run.checkpoint_dirs(stage, unit)):
        marker = folder / ".config_hash"
        if folder.exists() and (force or not marker.exists() or marker.read_text() != digest):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(digest)


def _plain(obj: Any) -> Any:
    """JSON for numpy values in the mixing history (arrays -> lists, scalars -> numbers)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")
