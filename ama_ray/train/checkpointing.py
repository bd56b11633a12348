"""Resumable training state: model (safetensors), optimizer, scheduler, stream positions, mixing state.

Weights are written with safetensors; the optimizer and scheduler with `torch.save` and read
back with `weights_only=True`, so loading a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL = "model.safetensors"
OPTIM = "optim.pt"
STATE = "state.json"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP (or any `.module` wrapper)."""
    return model.module if hasattr(model, "module") else model


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone + contiguous: safetensors refuses shared (tied) storages.
    return {k: v.detach().cpu().clone().contiguous() for k, v in unwrap(model).state_dict().items()}


def save(directory: Path, model, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Write one checkpoint into `directory` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model_state(model), str(directory / MODEL))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / OPTIM)
    (directory / STATE).write_text(json.dumps(state, default=_plain))


def load(directory: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore model, optimizer and scheduler from `directory`; returns the saved `state` dict."""
    unwrap(model).load_state_dict(load_file(str(directory / MODEL)), strict=False)
    optim = torch.load(directory / OPTIM, weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    return json.loads((directory / STATE).read_text())


def _plain(obj: Any) -> Any:
    """JSON for numpy values in the mixing history (arrays -> lists, scalars -> numbers)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")
