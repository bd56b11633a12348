"""Files of a resumable checkpoint: trainable weights, optimizer and scheduler, and the loop's state.

A checkpoint directory holds `state.json` (step, best held-out step, stream positions, mixing
state; written by rank 0) plus either `model.safetensors` + `optim.pt` (DDP and single
process; rank 0) or DeepSpeed's `engine/` directory, to which every rank writes its shard
(`ama_ray.train.engine`). Weights are written with safetensors; the optimizer and scheduler
with `torch.save` and read back with `weights_only=True`, so loading a DDP checkpoint never
unpickles arbitrary objects. DeepSpeed's `engine/*.pt` files are its own `torch.save` pickles,
which DeepSpeed loads with full unpickling; so every rank records the sha256 of each file it
wrote (`_digests/rank<r>.json`), and resuming loads nothing until every file in the checkpoint
matches a record (`problems`). A checkpoint that fails the check is skipped for the one before
it (`candidates`), with a warning.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from ama_ray.paths import stream_digest
from ama_ray.storage import RunDir, Unit

MODEL = "model.safetensors"
OPTIM = "optim.pt"
STATE = "state.json"
CONFIG_MARKER = ".config_hash"
DIGESTS = "_digests"  # rank<r>.json: relative path -> size and sha256 of each file rank r wrote


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


def record_digests(directory: Path, rank: int) -> None:
    """Record size and sha256 of every file this rank wrote into `directory` (before Ray Train
    merges the ranks' directories into one checkpoint)."""
    files = {}
    for rel, path in _written_files(directory).items():
        with open(path, "rb") as f:
            files[rel] = {"size": path.stat().st_size, "sha256": stream_digest(f)}
    (directory / DIGESTS).mkdir(exist_ok=True)
    (directory / DIGESTS / f"rank{rank}.json").write_text(json.dumps(files, sort_keys=True))


def problems(directory: Path) -> list[str]:
    """Why the checkpoint in `directory` must not be loaded; [] when every file in it is one a rank
    of this run recorded (`record_digests`) and still holds what was written."""
    records = sorted((directory / DIGESTS).glob("rank*.json"))
    if not records:
        return ["no digests recorded: not written by this version of ama-ray"]
    known: dict[str, list[dict]] = {}
    for record in records:
        try:
            for rel, entry in json.loads(record.read_text()).items():
                known.setdefault(rel, []).append(entry)
        except (ValueError, AttributeError) as err:
            return [f"{DIGESTS}/{record.name} is unreadable ({err})"]
    present = _written_files(directory)
    out = [f"{rel} is missing" for rel in sorted(set(known) - set(present))]
    for rel, path in sorted(present.items()):
        if rel not in known:
            out.append(f"{rel} was not written by this run")
            continue
        size = path.stat().st_size
        if all(size != e.get("size") for e in known[rel]):
            out.append(f"{rel} has {size} bytes, {known[rel][0].get('size')} were written")
            continue
        with open(path, "rb") as f:
            digest = stream_digest(f)
        if all(digest != e.get("sha256") for e in known[rel]):
            out.append(f"{rel} changed since it was written (sha256 differs)")
    return out


def _written_files(directory: Path) -> dict[str, Path]:
    """The checkpoint's files (relative POSIX path -> path) other than its digest records, in name order."""
    return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*"))
            if p.is_file() and p.relative_to(directory).parts[0] != DIGESTS}


def candidates(checkpoint) -> Iterator[Any]:
    """The checkpoint Ray Train resumes from, then the older ones beside it, newest first.

    Ray Train hands a restarted run only its latest registered checkpoint; when that one is
    corrupt every retry would fail the same way, so the loop walks back to an intact one.
    """
    import pyarrow.fs as pafs
    import ray.train

    yield checkpoint
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = posixpath.split(path)
    siblings = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    older = sorted((i.base_name for i in siblings if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("step_") and i.base_name < name), reverse=True)
    for other in older:
        yield ray.train.Checkpoint(path=f"{parent}/{other}", filesystem=fs)


def fresh_checkpoints(run: RunDir, stage: str, unit: Unit, digest: str, force: bool) -> None:
    """Drop `unit`'s resumable checkpoints (Ray Train's run and the best-step weights) when forced
    or written under other settings: a `.config_hash` marker in the Ray Train run's folder records
    the settings they belong to. Through `run.fs`, so object stores behave like a local disk."""
    import pyarrow.fs as pafs

    fs, folder = run.fs, run.checkpoint_dir(stage, unit)
    marker = f"{folder}/{CONFIG_MARKER}"
    try:
        with fs.open_input_stream(marker) as f:
            recorded = f.read().decode()
    except (FileNotFoundError, OSError):
        recorded = None
    if force or recorded != digest:
        for stale in (folder, run.best_dir(unit)):
            if fs.get_file_info(stale).type != pafs.FileType.NotFound:
                fs.delete_dir(stale)
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(marker) as out:
        out.write(digest.encode())


def save_best(run: RunDir, folder: str, weights: dict[str, torch.Tensor]) -> None:
    """Write the best-so-far weights into `folder` on the run's filesystem: a temporary name, then
    a move, so a crash mid-write never leaves a truncated file under the real name."""
    from safetensors.torch import save

    run.fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.{MODEL}.tmp"
    with run.fs.open_output_stream(tmp) as out:
        out.write(save(weights))
    run.fs.move(tmp, f"{folder}/{MODEL}")


def load_best(run: RunDir, folder: str) -> dict[str, torch.Tensor] | None:
    """What `save_best` wrote into `folder`, or None when nothing was."""
    from safetensors.torch import load

    try:
        with run.fs.open_input_stream(f"{folder}/{MODEL}") as f:
            return load(f.read())
    except FileNotFoundError:
        return None


def _plain(obj: Any) -> Any:
    """JSON for numpy values in the mixing history (arrays -> lists, scalars -> numbers)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")
