"""The run directory: its layout, committed units, manifests, and Parquet/JSON I/O over `pyarrow.fs`.

A *unit* (one prepared task, one specialist, one generalist seed, ...) is committed when its
`_manifest.json` is written, last. Readers ignore units without one; a rerun skips committed
units whose manifest matches and redoes the rest. Because committing needs no rename, this
works on object stores too.

The layout (every folder and file name; `RunDir`'s unit methods are the only way to reach them):

    prepared/<task>/{train,validation,test}.parquet     prepare
    reference/<task>/{train,validation,test}.parquet    reference
    specialists/<task>/model/                           specialists
    scores/<task>/{train,validation,test}.parquet       score
    generalist/<algorithm>/seed<k>/model/, mixing_history.parquet    generalist
    tune/results.csv, best.yaml, <trial>/config.yaml, <trial>/<algorithm>/seed<k>/   tune
    eval/metrics.json, metrics.csv, models/<model key>/result.json    evaluate
    report/report.md, report.html, *.png                report
    tensorboard/<unit>/    _checkpoints/<stage>/<unit>/    _checkpoints/best/<unit>/    _faults/
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ama_ray.errors import StageInputError, StorageError
from ama_ray.paths import join_uri, require_absolute, stream_digest

MANIFEST = "_manifest.json"
LOCK, LEASE = ".lock", "_lease.json"
LEASE_S = 3600.0  # an object-store lease not renewed for this long is abandoned
_HELD: dict[str, object] = {}  # run roots this process writes: the open lock file, or the lease token
# Where each stage writes (stage name -> top-level folder): the names differ for history's sake.
FOLDERS = {
    "partition": "partition", "prepare": "prepared", "reference": "reference", "specialists": "specialists", "score": "scores",
    "generalist": "generalist", "merge": "merged", "tune": "tune", "evaluate": "eval", "report": "report",
}
# Every task's splits, written by prepare and covered by reference and score: validation selects
# (best checkpoints, `eval/...` during training, ASHA, Tune), test reports (evaluate, report, compare).
SPLITS = ("train", "validation", "test")
SELECT_SPLIT, REPORT_SPLIT = "validation", "test"
# With `data.signal_fraction` > 0 a fourth split, held out of training like the other two, whose
# excess drives the `ama_h` mixing algorithm (`Config.splits` lists a run's splits).
SIGNAL_SPLIT = "signal"
ALL_SPLITS = SPLITS + (SIGNAL_SPLIT,)
ROW_GROUP_ROWS = 1024  # Parquet row group: what a streaming reader holds at a time
MODEL_DIR = "model"
MIXING_HISTORY = "mixing_history.parquet"
METRICS_JSON, METRICS_CSV = "metrics.json", "metrics.csv"
RESULTS_CSV, BEST_YAML, TRIAL_CONFIG = "results.csv", "best.yaml", "config.yaml"
REPORT_MD, REPORT_HTML = "report.md", "report.html"
log = logging.getLogger(__name__)
_SECRET = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)


def _holder_text(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}` since {holder.get('since')}"


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
        """The unit at `parts` under the root (prefer the named methods below); StorageError for
        parts that would leave the run directory (`..`, absolute parts)."""
        path = "/".join([self.root, *parts])
        inside = posixpath.normpath(path)
        if not parts or inside == self.root or not inside.startswith(self.root.rstrip("/") + "/") \
                or any(p in ("", ".", "..") or p.startswith("/") for p in parts):
            raise StorageError(f"unit {list(parts)} resolves outside the run directory", where=self.uri,
                               fix="use task, algorithm and run names of letters, digits, _ . - (not only dots)")
        return Unit(self, path, tuple(parts))

    # -- the layout ------------------------------------------------------------------------
    def stage_unit(self, stage: str, task: str) -> "Unit":
        """A per-task unit of `prepare`, `reference`, `specialists` or `score`."""
        return self.unit(FOLDERS[stage], task)

    def partition(self) -> "Unit":
        """`partition/`: the pooled sources' rows with their cluster (the partition stage)."""
        return self.unit(FOLDERS["partition"])

    def prepared(self, task: str) -> "Unit":
        return self.stage_unit("prepare", task)

    def reference(self, task: str) -> "Unit":
        return self.stage_unit("reference", task)

    def specialist(self, task: str) -> "Unit":
        return self.stage_unit("specialists", task)

    def scores(self, task: str) -> "Unit":
        return self.stage_unit("score", task)

    def generalist(self, algorithm: str, seed: int, trial: str | None = None) -> "Unit":
        """`generalist/<algorithm>/seed<k>`, or a Tune trial's `tune/<trial>/<algorithm>/seed<k>`."""
        if trial is None:
            return self.unit(FOLDERS["generalist"], algorithm, f"seed{seed}")
        return self.unit(FOLDERS["tune"], trial, algorithm, f"seed{seed}")

    def merged(self, method: str) -> "Unit":
        """`merged/<method>`: the specialists merged by `method` (the merge stage)."""
        return self.unit(FOLDERS["merge"], method)

    def tune(self, trial: str | None = None) -> "Unit":
        """The study (`tune/`) or one trial's folder (`tune/<trial>/`)."""
        return self.unit(FOLDERS["tune"], *([trial] if trial else []))

    def evaluation(self) -> "Unit":
        return self.unit(FOLDERS["evaluate"])

    def evaluated_model(self, key: str) -> "Unit":
        """`eval/models/<key>`: one model's evaluation (`base`, `generalist/ama_s/seed0`, ...),
        committed as soon as it is done, so an interrupted evaluate stage keeps it."""
        return self.unit(FOLDERS["evaluate"], "models", *key.split("/"))

    def report(self) -> "Unit":
        return self.unit(FOLDERS["report"])

    def committed_units(self) -> list["Unit"]:
        """Every unit with a manifest, in path order (checkpoints and TensorBoard logs excluded)."""
        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        found = sorted(posixpath.dirname(i.path) for i in self.fs.get_file_info(selector) if i.base_name == MANIFEST)
        prefix = self.root.rstrip("/") + "/"
        return [self.unit(*path[len(prefix):].split("/")) for path in found
                if path.startswith(prefix) and not path[len(prefix):].startswith(("_checkpoints", "tensorboard"))]

    def checkpoint_root(self, stage: str) -> str:
        """The folder (a path on `self.fs`) of a stage's resumable checkpoints: one Ray Train run
        per unit below it, named `Unit.run_name`."""
        return f"{self.root}/_checkpoints/{stage}"

    def checkpoint_storage(self, stage: str) -> dict[str, Any]:
        """`checkpoint_root` as Ray Train's and Tune's `RunConfig` take it: the path, plus this run
        directory's filesystem when remote (it carries the store's options, e.g. an endpoint)."""
        return {"storage_path": self.checkpoint_root(stage), "storage_filesystem": None if self.is_local else self.fs}

    def checkpoint_dir(self, stage: str, unit: "Unit") -> str:
        """The folder (on `self.fs`) of `unit`'s resumable checkpoints: its Ray Train run."""
        return f"{self.checkpoint_root(stage)}/{unit.run_name}"

    def best_dir(self, unit: "Unit") -> str:
        """The folder (on `self.fs`) of `unit`'s best-so-far weights: in the run directory, so a
        restart on another node finds them."""
        return f"{self.checkpoint_root('best')}/{unit.label}"

    def tensorboard(self, unit: "Unit") -> Path:
        return Path(self.root, "tensorboard", *unit.parts)

    def faults(self) -> Path:
        """Markers of injected test faults (`ama_ray.train.faults`): a local folder."""
        if self.is_local:
            return Path(self.root) / "_faults"
        return Path(tempfile.gettempdir()) / "ama_ray_faults" / self.root.replace("/", "_")

    def lock(self, command: str) -> None:
        """Become the one writer of this run directory for the rest of this process.

        Locally an exclusive `flock` on `<run>/.lock` (released when the process ends, however
        it ends); on object stores, which offer no lock, a lease object `<run>/_lease.json`
        (best-effort: a lease not renewed for LEASE_S counts as abandoned; each stage renews it).
        Re-entrant within a process, so `ama-ray tune` running earlier stages keeps its lock.
        A second writer gets StorageError naming the holder (the CLI exits 2).
        """
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if self.is_local:
            self._lock_local(me)
        else:
            self._lease(me)

    def _lock_local(self, me: dict) -> None:
        if self.root in _HELD:
            return
        Path(self.root).mkdir(parents=True, exist_ok=True)
        handle = open(Path(self.root) / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StorageError(f"another ama-ray is writing this run directory ({holder})", where=self.uri,
                               fix="wait for it to finish, or use another storage.run_name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(_holder_text(me))
        handle.flush()
        _HELD[self.root] = handle  # kept open: the lock lives as long as this process

    def _lease(self, me: dict) -> None:
        path = f"{self.root}/{LEASE}"
        try:
            with self.fs.open_input_stream(path) as f:
                lease = json.loads(f.read().decode())
        except (FileNotFoundError, OSError, ValueError):
            lease = None
        mine = _HELD.get(self.root)
        if lease and lease.get("token") != mine:
            age = time.time() - float(lease.get("renewed", 0))
            if age < LEASE_S:
                raise StorageError(f"another ama-ray holds this run directory's lease ({_holder_text(lease)}, renewed {age:.0f} s ago)",
                                   where=self.uri, fix="wait for it to finish, or use another storage.run_name")
            log.warning("%s: taking over a lease not renewed for %.0f s (%s)", self.uri, age, _holder_text(lease))
        token = mine or f"{me['host']}:{me['pid']}:{time.time_ns()}"
        self.fs.create_dir(self.root, recursive=True)
        with self.fs.open_output_stream(path) as out:
            out.write(json.dumps({**me, "token": token, "renewed": time.time()}).encode())
        _HELD[self.root] = token

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

    def __init__(self, run: RunDir, path: str, parts: tuple[str, ...] = ()):
        self.run, self.fs, self.path, self.parts = run, run.fs, path, parts
        self.damage = ""  # why the last `manifest()` call counted a written manifest as not committed

    def __repr__(self) -> str:
        return f"Unit({self.path})"

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def run_name(self) -> str:
        """The unit's name below its stage folder, flat: Ray Train's run name for its checkpoints."""
        return "_".join(self.parts[1:])

    @property
    def label(self) -> str:
        """`specialists/arithmetic`, `generalist/ama_s/seed0`, ...: for logs and progress bars."""
        return "/".join(self.parts)

    def split_file(self, split: str) -> str:
        """The Parquet file of one split (train, validation, test) in a per-task unit."""
        return f"{split}.parquet"

    def model_dir(self) -> str:
        return self.file(MODEL_DIR)

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    # -- commit protocol -------------------------------------------------------------------
    def manifest(self) -> dict | None:
        """The manifest of a committed unit, or None when the unit is absent or uncommitted.

        An unreadable manifest (a crash mid-write where the store cannot rename atomically) counts
        as not committed, with a warning: the unit is redone.
        """
        self.damage = ""
        manifest, error = self._read_manifest()
        if error:
            self.damage = f"unreadable manifest ({error})"
            log.warning("%s: unreadable manifest (%s); the unit counts as not committed and will be redone",
                        self.file(MANIFEST), error)
        if manifest is None:
            return None
        changed = self.changed_files(manifest, deep=False)
        if changed:
            self.damage = "; ".join(changed)
            log.warning("%s: %s since it was committed; the unit counts as not committed and will be redone",
                        self.path, "; ".join(changed))
            return None
        return manifest

    def _read_manifest(self) -> tuple[dict | None, str]:
        """(the manifest as written, or None; why it could not be parsed, or "" )."""
        try:
            with self.fs.open_input_stream(self.file(MANIFEST)) as f:
                text = f.read().decode()
        except (FileNotFoundError, OSError):
            return None, ""
        try:
            manifest = json.loads(text)
        except ValueError as err:
            return None, str(err)
        return (manifest if isinstance(manifest, dict) else None), ""

    def files(self, digests: bool) -> dict[str, dict[str, Any]]:
        """The unit's files (relative path -> size, and sha256 when `digests`), without its manifest,
        hidden temporaries, or units nested inside it (a Tune study's trials)."""
        out: dict[str, dict[str, Any]] = {}
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        infos = [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]
        nested = {posixpath.dirname(i.path) for i in infos if i.base_name == MANIFEST} - {self.path}
        for info in infos:
            rel = info.path[len(self.path.rstrip("/")) + 1:]
            if info.base_name == MANIFEST or info.base_name.startswith(".") \
                    or any(info.path.startswith(n + "/") for n in nested):
                continue
            out[rel] = {"size": info.size}
            if digests:
                with self.fs.open_input_stream(info.path) as f:
                    out[rel]["sha256"] = stream_digest(f)
        return out

    def changed_files(self, manifest: dict, deep: bool) -> list[str]:
        """What differs from the files `manifest` recorded: a missing file or another size (always
        checked: one listing), another sha256 (only when `deep`: it reads every byte). Manifests
        written before files were recorded check nothing."""
        recorded = manifest.get("files")
        if not isinstance(recorded, dict):
            return []
        now = self.files(digests=deep)
        problems = []
        for rel, want in sorted(recorded.items()):
            have = now.get(rel)
            if have is None:
                problems.append(f"{rel} is missing")
            elif have["size"] != want.get("size"):
                problems.append(f"{rel} has {have['size']} bytes, {want.get('size')} committed")
            elif deep and have["sha256"] != want.get("sha256"):
                problems.append(f"{rel} changed (sha256 differs)")
        return problems

    def verify(self) -> list[str]:
        """Problems of a committed unit, every byte checked against its manifest's sha256 values
        (`ama-ray verify`); [] when intact. An uncommitted unit is one problem."""
        manifest, _ = self._read_manifest()
        if manifest is None:
            return ["not committed (no readable manifest)"]
        return self.changed_files(manifest, deep=True)

    def is_committed(self, config_hash: str | None = None) -> bool:
        man = self.manifest()
        return man is not None and (config_hash is None or man.get("config_hash") == config_hash)

    def begin(self, keep_nested: bool = False) -> None:
        """Start (re)writing the unit: drop any stale or half-written contents. With `keep_nested`,
        units committed inside it stay (the evaluation's per-model results): its manifest goes
        first, so a crash part-way leaves an uncommitted unit, then its own files."""
        info = self.fs.get_file_info(self.path)
        if info.type != pafs.FileType.NotFound and keep_nested:
            if self.exists(MANIFEST):
                self.fs.delete_file(self.file(MANIFEST))
            for rel in self.files(digests=False):
                self.fs.delete_file(self.file(rel))
            return
        if info.type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.path)
        self.fs.create_dir(self.path, recursive=True)

    def commit(self, config_hash: str, **fields: Any) -> dict:
        """Write `_manifest.json` last: from now on readers see the unit. It records every file's
        size (checked whenever the unit is read or skipped) and sha256 (`verify`)."""
        man = {
            "config_hash": config_hash,
            "committed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "versions": versions(),
            **fields,
            "files": self.files(digests=True),  # always what is there now (a copied manifest's list is stale)
        }
        self.write_json(MANIFEST, man)
        return man

    def require(self, what: str, fix: str) -> dict:
        """The manifest of a unit an earlier stage must have committed; StageInputError if not."""
        man = self.manifest()
        if man is None and self.damage:
            raise StageInputError(f"{what} is damaged ({self.damage}), so it counts as not committed", where=self.path, fix=fix)
        if man is None:
            raise StageInputError(f"{what} is missing (no committed {self.path})", fix=fix)
        return man

    # -- I/O -------------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> None:
        """Write `obj` as JSON. On a local disk: to a temporary name, fsync, then rename, so a
        crash leaves the old file or the new one, never half of one (object stores write an
        object whole)."""
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        if not self.run.is_local:
            with self.fs.open_output_stream(self.file(name)) as out:
                out.write(data)
            return
        tmp = self.file(f".{name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.file(name))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def read_json(self, name: str) -> Any:
        with self.fs.open_input_stream(self.file(name)) as f:
            return json.loads(f.read().decode())

    def write_parquet(self, name: str, table: pa.Table) -> None:
        """Write `table` in row groups of ROW_GROUP_ROWS, the unit readers stream by."""
        pq.write_table(table, self.file(name), filesystem=self.fs, row_group_size=ROW_GROUP_ROWS)

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


class SplitWriters:
    """Parquet writers of several unit files (`{key: (unit, split)}`), each written in row groups
    of exactly ROW_GROUP_ROWS (the last one shorter), whatever the sizes of the tables handed to
    `add`. A file opens on entry with `schema`, or with its first table's schema when `schema` is
    None (a file that gets no rows is then not written). `check(key, table)` sees every row group
    before it is written and may raise; `written[key]` counts the rows written. On an exception
    the files are closed without their pending rows (the unit is not committed anyway)."""

    def __init__(self, files: dict[str, tuple["Unit", str]], schema: pa.Schema | None = None, check=None):
        self.files, self.schema, self.check = files, schema, check
        self.open: dict[str, tuple[Any, pq.ParquetWriter]] = {}
        self.pending: dict[str, list[pa.Table]] = {key: [] for key in files}
        self.written: dict[str, int] = {key: 0 for key in files}

    def __enter__(self) -> "SplitWriters":
        if self.schema is not None:
            for key in self.files:
                self._writer(key, self.schema)
        return self

    def _writer(self, key: str, schema: pa.Schema) -> pq.ParquetWriter:
        if key not in self.open:
            unit, split = self.files[key]
            stream = unit.fs.open_output_stream(unit.file(unit.split_file(split)))
            self.open[key] = (stream, pq.ParquetWriter(stream, schema))
        return self.open[key][1]

    def _write(self, key: str, table: pa.Table) -> None:
        if self.check is not None:
            self.check(key, table)
        self._writer(key, table.schema).write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.written[key] += table.num_rows

    def add(self, key: str, table: pa.Table) -> None:
        self.pending[key].append(table)
        rows = sum(t.num_rows for t in self.pending[key])
        if rows >= ROW_GROUP_ROWS:
            whole = pa.concat_tables(self.pending[key])
            cut = rows - rows % ROW_GROUP_ROWS
            self._write(key, whole.slice(0, cut))
            self.pending[key] = [whole.slice(cut)] if cut < rows else []

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                for key, pending in self.pending.items():
                    if pending:
                        self._write(key, pa.concat_tables(pending))
        finally:
            for stream, writer in self.open.values():
                writer.close()
                stream.close()
