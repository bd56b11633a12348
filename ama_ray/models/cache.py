"""Build-once, atomic model cache directories.

A cached model is a directory whose `_manifest.json` is written last: a directory without
one is an interrupted build and is never read. Builds go to a temporary sibling that is
renamed into place, under a file lock so concurrent processes (Ray workers) build once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ama_ray.errors import StorageError

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"


def is_complete(path: Path) -> bool:
    """Whether `path` is a finished cache entry (its manifest exists)."""
    return (path / MANIFEST).is_file()


def read_manifest(path: Path) -> dict:
    """The manifest of a finished cache entry."""
    return json.loads((path / MANIFEST).read_text())


def build_once(target: Path, build: Callable[[Path], dict]) -> Path:
    """Return `target`, first running `build(tmp_dir) -> manifest dict` if it is not complete.

    `build` writes model files into `tmp_dir`; the manifest is written after it returns and
    the directory is then renamed to `target`. Raises StorageError if the cache directory
    cannot be written.
    """
    if is_complete(target):
        return target
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(parent / f".{target.name}.lock", "w")
    except OSError as err:
        raise StorageError(
            f"cannot write the model cache ({err.strerror})",
            where=str(parent),
            fix="set model.cache_dir to a writable directory",
        ) from err
    with lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        if is_complete(target):  # another process built it while we waited
            return target
        if target.exists():
            logger.warning("removing an unfinished model cache entry %s", target)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            logger.info("building %s", target)
            manifest = build(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built %s", target)
    return target
