"""Local paths and URIs as a job means them, and digests of what they hold.

One rule (docs/configuration.md): every relative local path a user writes means the directory
the command ran from. It is resolved once, on the driver, when the config is loaded
(`ama_ray.config.load_config`); Ray workers run in working directories of their own, so they
only ever receive absolute paths or URIs, and `require_absolute` refuses anything else.

Configs hash what a path holds, not where it is (`content_digest`), so a run directory stays
reusable when its inputs are the same files reached by another path (a copied run directory,
a cluster mount).
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Any

from ama_ray.errors import ConfigError

_CHUNK = 1 << 20


def is_uri(path: str) -> bool:
    """Whether `path` names a location through a scheme (`s3://`, `gs://`, `hf://`, ...)."""
    return "://" in path


def join_uri(base: str, *parts: str) -> str:
    """`base/part/...`; a URI's query (`s3://bucket/runs?endpoint_override=...`: options of the
    store, not part of the path) stays at the end."""
    head, sep, query = base.partition("?") if is_uri(base) else (base, "", "")
    return "/".join([head.rstrip("/"), *parts]) + sep + query


def stream_digest(handle, chunk: int = _CHUNK) -> str:
    """sha256 (hex) of what an open binary file or pyarrow stream holds, read in chunks (not memoised)."""
    h = hashlib.sha256()
    while block := handle.read(chunk):
        h.update(block)
    return h.hexdigest()


def absolute(path: str, base: str | os.PathLike) -> str:
    """`path` as an absolute local path (against `base` when relative, `~` expanded); URIs unchanged.

    Normalised without following symbolic links, so messages show the path the user wrote.
    """
    if is_uri(path):
        return path
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def looks_local(name: str, base: str | os.PathLike | None = None) -> bool:
    """Whether a model name or dataset `path` means a local directory rather than a hub id:
    it starts with `/`, `./`, `../` or `~`, or it exists relative to `base`."""
    if is_uri(name):
        return False
    if name.startswith(("/", "./", "../", "~")) or name in (".", ".."):
        return True
    return base is not None and os.path.exists(os.path.join(base, name))


def require_absolute(path: str, key: str, who: str) -> None:
    """Refuse a relative local path handed to a Ray worker, task or actor (`who`): it would mean
    that worker's own working directory. Raises ConfigError naming the key."""
    if path and not is_uri(path) and not os.path.isabs(path):
        raise ConfigError(
            f"{who} was handed the relative path {path!r}; workers never resolve paths",
            where=key,
            fix="load the config with ama_ray.config.load_config (or Config.resolve_paths), which makes local paths absolute on the driver",
        )


def map_data_files(data_files: Any, fn) -> Any:
    """Apply `fn` to every file name in a `datasets.load_dataset` `data_files` value
    (a string, a list, or a mapping of split to either)."""
    if isinstance(data_files, str):
        return fn(data_files)
    if isinstance(data_files, list):
        return [map_data_files(f, fn) for f in data_files]
    if isinstance(data_files, dict):
        return {k: map_data_files(v, fn) for k, v in data_files.items()}
    return data_files


# --- content digests ----------------------------------------------------------------------

_memo: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (memoised per process by path, size and modification time)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _memo:
        with open(path, "rb") as f:
            _memo[key] = stream_digest(f)
    return _memo[key]


def content_digest(path: str) -> str:
    """A digest of what a local file, directory or glob pattern holds, independent of where it is.

    A file: the SHA-256 of its bytes. A directory: of its files' relative names and digests
    (hidden files and `_manifest.json` of caches skipped). A glob: of the matched files' digests
    in name order. URIs and names that match nothing are returned as they are (a hub id or a
    remote object, which the loader reads by name).
    """
    if is_uri(path):
        return path
    if os.path.isfile(path):
        return file_digest(path)
    if os.path.isdir(path):
        h = hashlib.sha256()
        root = Path(path)
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = file.relative_to(root).as_posix()
            if rel.startswith(".") or "/." in rel or rel == "_manifest.json":
                continue
            h.update(f"{rel}\0{file_digest(file)}\0".encode())
        return "dir:" + h.hexdigest()
    matches = sorted(glob.glob(path, recursive=True))
    if matches:
        h = hashlib.sha256()
        for match in matches:
            h.update(f"{content_digest(match)}\0".encode())
        return "glob:" + h.hexdigest()
    return path
