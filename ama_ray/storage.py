"""The run directory: committed units, manifests, and Parquet/JSON I/O over `pyarrow.fs`.

A *unit* (one prepared task, one specialist, one generalist seed, ...) is committed when its
`_manifest.json` is written, last. Readers ignore units without one; a rerun skips committed
units whose manifest matches and redoes the rest. Because committing needs no rename, this
works on object stores too.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ama_ray.errors import StageInputError, StorageError
from ama_ray.paths import require_absolute

MANIFEST = "_manifest.json"
log = logging.getLogger(__name__)
_SECRET = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)


def redact_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment with values of names containing TOKEN/KEY/SECRET/PASSWORD replaced."""
    env = dict(os.environ if env is None else env)
    return {k: ("<redacted>" if _SECRET.search(k) else v) for k, v in env.items()}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("ama_ray", "torch", "transformers", "ray", "trl", "peft", "deepspeed"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


class RunDir:
    """A run directory (`storage.path/run_name`) on a local disk or any pyarrow.fs URI."""

    def __init__(self, uri: str):
        self.uri = uri
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            # Relative paths were resolved on the driver when the config was loaded; a relative
            # one here would mean this process's working directory (a Ray worker's is its own).
            require_absolute(uri, "storage.path", "the run directory")
            self.fs, self.root = pafs.LocalFileSystem(), os.path.normpath(uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def unit(self, *parts: str) -> "Unit":
        return Unit(self, "/".join([self.root, *parts]))

    def check_writable(self) -> None:
        """Raise StorageError early when the run directory cannot be created or written."""
        probe = f"{self.root}/.write_probe"
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as out:
                out.write(b"ok")
            self.fs.delete_file(probe)
        except (OSError, pa.ArrowException) as err:
            raise StorageError(
                f"cannot write the run directory ({err.__class__.__name__}: {err})",
                where=self.uri,
                fix="set storage.path to a writable location",
            ) from None


class Unit:
    """One committable output folder."""

    def __init__(self, run: RunDir, path: str):
        self.run, self.fs, self.path = run, run.fs, path

    def __repr__(self) -> str:
        return f"Unit({self.path})"

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    # -- commit protocol -------------------------------------------------------------------
    def manifest(self) -> dict | None:
        """The manifest of a committed unit, or None when the unit is absent or uncommitted."""
        try:
            with self.fs.open_input_stream(self.file(MANIFEST)) as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            return None

    def is_committed(self, config_hash: str | None = None) -> bool:
        man = self.manifest()
        return man is not None and (config_hash is None or man.get("config_hash") == config_hash)

    def begin(self) -> None:
        """Start (re)writing the unit: drop any stale or half-written contents."""
        info = self.fs.get_file_info(self.path)
        if info.type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.path)
        self.fs.create_dir(self.path, recursive=True)

    def commit(self, config_hash: str, **fields: Any) -> dict:
        """Write `_manifest.json` last: from now on readers see the unit."""
        man = {
            "config_hash": config_hash,
            "committed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "versions": versions(),
            **fields,
        }
        self.write_json(MANIFEST, man)
        return man

    def require(self, what: str, fix: str) -> dict:
        """The manifest of a unit an earlier stage must have committed; StageInputError if not."""
        man = self.manifest()
        if man is None:
            raise StageInputError(f"{what} is missing (no committed {self.path})", fix=fix)
        return man

    # -- I/O -------------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> None:
        with self.fs.open_output_stream(self.file(name)) as out:
            out.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, name: str) -> Any:
        with self.fs.open_input_stream(self.file(name)) as f:
            return json.loads(f.read().decode())

    def write_parquet(self, name: str, table: pa.Table) -> None:
        pq.write_table(table, self.file(name), filesystem=self.fs)

    def read_parquet(self, name: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.file(name), filesystem=self.fs, columns=columns)

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.file(name)).type != pafs.FileType.NotFound

    @contextlib.contextmanager
    def local_dir(self) -> Iterator[Path]:
        """A local folder to write into (e.g. `save_pretrained`), uploaded on exit if remote."""
        if self.run.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            yield Path(self.path)
            return
        tmp = Path(tempfile.mkdtemp(prefix="ama_ray_"))
        try:
            yield tmp
            pafs.copy_files(str(tmp), self.path, destination_filesystem=self.fs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def local_copy(self) -> Path:
        """A local path holding the unit's files (the unit itself when local)."""
        if self.run.is_local:
            return Path(self.path)
        tmp = Path(tempfile.mkdtemp(prefix="ama_ray_"))
        pafs.copy_files(self.path, str(tmp), source_filesystem=self.fs)
        return tmp
