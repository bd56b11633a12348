"""partition: one mixed preference dataset split into k tasks by clustering its prompts.

With `data.partition` set, the rows of `partition.sources` are pooled (normalised as prepare
normalises them; duplicates across sources kept once), every prompt gets a feature vector, and
scikit-learn's k-means splits them into `partition.k` clusters. `partition/rows.parquet` holds
the pooled rows with their cluster; the config's `data.tasks` is one task per cluster
(`TaskConfig.cluster`), so prepare reads a cluster like any other task and every later stage is
unchanged. The manifest records the cluster sizes, the prompts nearest each cluster's centre
(the report's table) and, when rows carry a known label (`partition.label_field`, or the source's
name when there are several sources), the adjusted Rand index against it and the contingency
table. Labels never reach the clustering.

Features (`partition.method`):
- `embedding`: the base model's last hidden state averaged over the prompt's tokens, computed by
  a Ray Data actor pool over the pooled rows (the reference stage's machinery and settings:
  `reference.num_actors`, `cpus_per_actor`, `gpus_per_actor`, `batch_size`), centred and scaled
  to unit length (so k-means compares directions, as cosine similarity does);
- `tfidf`: the prompts' TF-IDF vectors (scikit-learn), a lexical baseline.

The driver holds the feature matrix (rows x hidden size floats, or a sparse TF-IDF matrix) and
one int per row: k-means needs every point at once. The rows themselves are streamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ama_ray.config import Config, PartitionConfig
from ama_ray.errors import DataError, StageInputError
from ama_ray.stages import base_model_path, model_identity, needs_work, open_run
from ama_ray.storage import ROW_GROUP_ROWS, SplitWriters, Unit

log = logging.getLogger(__name__)
STAGE = "partition"
ROWS, POOLED = "rows", ".pooled"  # partition/rows.parquet; the staging file (hidden: never in a manifest)
POOLED_SCHEMA = pa.schema([("row", pa.int64()), ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                           ("source", pa.string()), ("label", pa.string())])
ROWS_SCHEMA = pa.schema([*POOLED_SCHEMA, ("cluster", pa.int32())])
EXAMPLE_CHARS = 300  # an example prompt in the manifest and report keeps its last this many characters


def run(cfg: Config, force: set[str] = frozenset()) -> list[str]:
    """Partition the sources unless committed with the same settings; returns the unit path."""
    part = cfg.data.partition
    if part is None:
        log.debug("partition: data.partition is not set; the tasks are data.tasks")  # `ama-ray partition` refuses such a job
        return []
    run_dir = open_run(cfg)
    unit = run_dir.partition()
    digest = partition_hash(cfg)
    if not needs_work(unit, digest, STAGE, force):
        log.info("partition: already committed, skipping")
        return [unit.path]
    model_path = base_model_path(cfg)
    from ama_ray.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    unit.begin()
    try:
        n, drops = pool(cfg, part, tokenizer, unit)
        if n < part.k:
            raise DataError(f"the sources have {n} usable rows, fewer than partition.k={part.k} clusters",
                            where="data.partition.sources", fix="add rows or lower data.partition.k")
        log.info("partition: %d rows pooled from %d source(s); clustering %s features into %d tasks",
                 n, len(part.sources), part.method, part.k)
        features = embeddings(cfg, model_path, unit, n) if part.method == "embedding" else tfidf(unit)
        cluster, nearest = kmeans(features, part.k, part.seed, part.examples)
        check_sizes(cfg, cluster)
        summary = write_rows(unit, part, cluster, nearest)
        unit.fs.delete_file(unit.file(unit.split_file(POOLED)))
        unit.commit(digest, stage=STAGE, method=part.method, k=part.k, seed=part.seed, model=model_path,
                    model_identity=model_identity(cfg), rows=n, dropped=dict(drops), **summary)
    except BaseException:
        if unit.manifest() is None:  # no half-written unit stays behind
            unit.fs.delete_dir(unit.path)
        raise
    sizes = summary["sizes"]
    log.info("partition: %s%s", " ".join(f"{name}={size}" for name, size in sizes.items()),
             f" adjusted Rand index {summary['ari']:.3f} against {summary['label_source']}" if summary["ari"] is not None else "")
    return [unit.path]


def partition_hash(cfg: Config) -> str:
    """The clustering's settings, plus what only its manifest reads (`examples`, `label_field`:
    `Config.section_hash` leaves those out of every later stage's hash, so they redo this stage only)."""
    from ama_ray.config import short_hash

    part = cfg.data.partition
    summary = short_hash({"examples": part.examples, "label_field": part.label_field})[:8]
    return cfg.section_hash("model.name", "model.revision", "model.tiny", "model.dtype", "data.partition", "data.max_prompt_length",
                            "data.benchmark_chat", "data.seed", "data.arithmetic_flagged_share") + "-" + summary


def cluster_rows(cfg: Config, cluster: int):
    """(where, row) pairs of cluster `cluster` of the committed partition: what prepare reads
    for a task made by `data.partition`. StageInputError when the partition is not committed."""
    from ama_ray.storage import RunDir

    unit = RunDir(cfg.run_dir).partition()
    manifest = unit.manifest()
    if manifest is None or manifest.get("config_hash") != partition_hash(cfg):
        raise StageInputError("the tasks come from data.partition, whose partition is not committed with these settings",
                              where=unit.path, fix="run `ama-ray partition` (or `ama-ray run`) first")
    path = unit.file(unit.split_file(ROWS))
    for batch in pq.ParquetFile(path, filesystem=unit.fs).iter_batches(batch_size=ROW_GROUP_ROWS):
        table = pa.Table.from_batches([batch])
        for row in table.filter(pc.equal(table["cluster"], cluster)).to_pylist():
            # A prompt/completion source's rows were pooled with no rejected side ("").
            yield f"{path}#row{row['row']}", ({k: row[k] for k in ("prompt", "chosen", "rejected")} if row["rejected"] else
                                              {"prompt": row["prompt"], "completion": row["chosen"]})


# --- pooling ------------------------------------------------------------------------------

def pool(cfg: Config, part: PartitionConfig, tokenizer: Any, unit: Unit) -> tuple[int, Counter]:
    """Stream every source's usable rows, as text, into the unit's `.pooled.parquet`; returns
    (rows, drop counts). DataError for a row without `label_field`."""
    from ama_ray.data.formats import Dropped, normalize_row, to_text
    from ama_ray.stages.prepare import raw_rows

    label_of = _labeller(part)
    drops: Counter = Counter()
    seen: set[bytes] = set()
    pending: list[dict] = []
    n = 0
    with SplitWriters({POOLED: (unit, POOLED)}, POOLED_SCHEMA) as writer:
        for source in part.sources:
            kept = 0
            for where, raw in raw_rows(cfg, source):
                if source.max_rows and kept >= source.max_rows:
                    break
                label = label_of(source.name, where, raw)
                norm = normalize_row({k: v for k, v in raw.items() if k != part.label_field}, source.layout, source.column_map,
                                     source.pku_pair_key)
                if isinstance(norm, Dropped):
                    drops[norm.reason] += 1
                    continue
                prompt, chosen, rejected = to_text(norm, tokenizer)
                key = hashlib.sha1(json.dumps([prompt, chosen, rejected], ensure_ascii=False).encode()).digest()[:12]
                if key in seen:
                    drops["duplicate"] += 1
                    continue
                seen.add(key)
                pending.append({"row": n, "prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source.name, "label": label})
                n, kept = n + 1, kept + 1
                if len(pending) == ROW_GROUP_ROWS:
                    writer.add(POOLED, pa.Table.from_pylist(pending, POOLED_SCHEMA))
                    pending = []
        if pending:
            writer.add(POOLED, pa.Table.from_pylist(pending, POOLED_SCHEMA))
    return n, drops


def labelled(part: PartitionConfig) -> bool:
    """Whether rows carry a known label: a `label_field`, or several sources (their names)."""
    return part.label_field is not None or len(part.sources) > 1


def _labeller(part: PartitionConfig):
    """The known label of a raw row: its `label_field`, else its source's name when there are
    several sources, else none."""
    if part.label_field:
        field = part.label_field

        def label(source: str, where: str, raw: dict) -> str:
            if raw.get(field) is None:
                raise DataError(f"row has no '{field}' (data.partition.label_field)", where=where,
                                fix=f"give every row a '{field}' value, or unset data.partition.label_field")
            return str(raw[field])

        return label
    return (lambda source, where, raw: source) if labelled(part) else (lambda source, where, raw: None)


# --- features and clusters ------------------------------------------------------------------

def tfidf(unit: Unit):
    """The prompts' TF-IDF vectors (sparse, unit length), in row order."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    prompts = pq.read_table(unit.file(unit.split_file(POOLED)), columns=["prompt"], filesystem=unit.fs)["prompt"].to_pylist()
    return TfidfVectorizer(sublinear_tf=True).fit_transform(prompts)


class PromptEmbedder:
    """Ray Data callable: each row's prompt -> the model's last hidden state averaged over the
    prompt's tokens (the end of the prompt kept, as prepare truncates)."""

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool, threads: int, batch_size: int, max_prompt: int,
                 revision: str | None = None, use_gpu: bool = False):
        import torch

        from ama_ray.models.loading import compute_device, load_model, load_tokenizer
        from ama_ray.stages.inference import check_model_path

        check_model_path(model_path, "a partition embedding actor")
        torch.set_num_threads(max(1, threads))
        self.device = compute_device(use_gpu)
        self.model = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision).to(self.device).eval()
        self.tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code, revision=revision)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.batch_size, self.max_prompt = batch_size, max_prompt

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        ids = [p[-self.max_prompt :] or [self.pad_id] for p in self.tok(batch["prompt"].to_pylist(), add_special_tokens=False)["input_ids"]]
        order = np.argsort([len(p) for p in ids], kind="stable")  # similar lengths share a forward pass
        out = np.zeros((len(ids), 0), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(ids), self.batch_size):
                chunk = order[start : start + self.batch_size]
                width = max(len(ids[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for j, i in enumerate(chunk):
                    input_ids[j, : len(ids[i])] = torch.tensor(ids[i])
                    mask[j, : len(ids[i])] = 1
                hidden = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                    output_hidden_states=True).hidden_states[-1].float()
                mask = mask.to(self.device).unsqueeze(-1).float()
                mean = ((hidden * mask).sum(1) / mask.sum(1)).cpu().numpy()
                if not out.shape[1]:
                    out = np.zeros((len(ids), mean.shape[1]), dtype=np.float32)
                out[chunk] = mean
        return pa.table({"row": batch["row"], "embedding": pa.array(list(out), pa.list_(pa.float32()))})


def embeddings(cfg: Config, model_path: str, unit: Unit, n: int) -> np.ndarray:
    """Every pooled prompt's embedding (rows x hidden), centred and unit length, computed on a
    Ray Data actor pool configured like the reference stage's."""
    from ama_ray.cluster import ensure_ray
    from ama_ray.stages.inference import on_actor_pool
    from ama_ray.train.data import output_blocks, parquet_dataset

    ensure_ray()
    ref = cfg.reference
    ds = on_actor_pool(cfg, parquet_dataset([(unit, POOLED)], drop=("chosen", "rejected", "source", "label")), PromptEmbedder,
                       (model_path, cfg.model.dtype, cfg.model.trust_remote_code, max(1, int(ref.cpus_per_actor)), ref.batch_size,
                        cfg.data.max_prompt_length, cfg.model.revision, ref.gpus_per_actor > 0))
    features: np.ndarray | None = None
    done = 0
    for batch in output_blocks(ds):
        rows = batch["row"].to_numpy()
        values = np.stack(batch["embedding"].to_numpy(zero_copy_only=False))
        if features is None:
            features = np.zeros((n, values.shape[1]), dtype=np.float32)
        features[rows] = values
        done += len(rows)
    if done != n or features is None:
        raise StageInputError(f"embedded {done} of {n} pooled rows", where=unit.path,
                              fix="rerun with --force partition; if it repeats, report it as a bug")
    features -= features.mean(axis=0)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def kmeans(features, k: int, seed: int, examples: int) -> tuple[np.ndarray, list[list[int]]]:
    """(cluster of each row, the rows nearest each cluster's centre), clusters numbered largest
    first (ties: the cluster holding the earlier row first), so names follow sizes, not k-means'
    arbitrary numbering."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features)
    raw = km.labels_
    sizes = np.bincount(raw, minlength=k)
    first = np.array([np.flatnonzero(raw == c)[0] if sizes[c] else len(raw) for c in range(k)])
    order = sorted(range(k), key=lambda c: (-sizes[c], first[c]))
    renumber = np.empty(k, dtype=np.int32)
    renumber[order] = np.arange(k, dtype=np.int32)
    cluster = renumber[raw]
    distance = km.transform(features)[np.arange(len(raw)), raw]
    nearest = []
    for c in order:
        members = np.flatnonzero(raw == c)
        nearest.append([int(i) for i in members[np.argsort(distance[members], kind="stable")[:examples]]])
    return cluster, nearest


def _tail(prompt: str) -> str:
    """A prompt's last EXAMPLE_CHARS characters: a chat template puts its boilerplate first, the
    question last."""
    return prompt if len(prompt) <= EXAMPLE_CHARS else "…" + prompt[-EXAMPLE_CHARS:]


def check_sizes(cfg: Config, cluster: np.ndarray) -> None:
    """DataError before anything commits when a cluster is too small to split into training,
    validation and test rows (prepare's rule, `prepare.heldout_sizes`)."""
    from ama_ray.stages.prepare import heldout_sizes

    sizes = np.bincount(cluster, minlength=cfg.data.partition.k)
    for c, name in enumerate(cfg.data.partition.task_names()):
        try:
            heldout_sizes(int(sizes[c]), cfg.data, name, f"partition cluster {c} ({name})")
        except DataError as err:
            raise DataError(err.what, where=err.where,
                            fix=f"lower data.partition.k (clusters: {', '.join(str(int(n)) for n in sizes)} rows), or {err.fix}") from None


def write_rows(unit: Unit, part: PartitionConfig, cluster: np.ndarray, nearest: list[list[int]]) -> dict:
    """Stream the pooled rows into `rows.parquet` with their cluster; returns the manifest's
    summary (sizes, example prompts, labels' contingency table and adjusted Rand index)."""
    from sklearn.metrics import adjusted_rand_score

    names, has_labels = part.task_names(), labelled(part)
    wanted = {i: c for c, rows in enumerate(nearest) for i in rows}
    examples: dict[str, list[str]] = {name: [] for name in names}
    labels: list[str] = []
    contingency: dict[str, Counter] = {name: Counter() for name in names}
    with SplitWriters({ROWS: (unit, ROWS)}, ROWS_SCHEMA) as writer:
        for batch in pq.ParquetFile(unit.file(unit.split_file(POOLED)), filesystem=unit.fs).iter_batches(batch_size=ROW_GROUP_ROWS):
            table = pa.Table.from_batches([batch])
            rows = table["row"].to_numpy()
            writer.add(ROWS, table.append_column("cluster", pa.array(cluster[rows], pa.int32())).cast(ROWS_SCHEMA))
            for i, prompt in zip(rows, table["prompt"].to_pylist()):
                if i in wanted:
                    examples[names[wanted[i]]].append((int(i), _tail(prompt)))
            if has_labels:
                for i, label in zip(rows, table["label"].to_pylist()):
                    labels.append(label)
                    contingency[names[cluster[i]]][label] += 1
    for c, name in enumerate(names):  # nearest the centre first
        rank = {i: r for r, i in enumerate(nearest[c])}
        examples[name] = [p for _, p in sorted(examples[name], key=lambda e: rank[e[0]])]
    sizes = np.bincount(cluster, minlength=part.k)
    return {
        "tasks": names,
        "sizes": {name: int(sizes[c]) for c, name in enumerate(names)},
        "examples": examples,
        "label_source": (f"field '{part.label_field}'" if part.label_field else "source name") if has_labels else None,
        "ari": float(adjusted_rand_score(labels, [names[c] for c in cluster])) if has_labels else None,
        "contingency": {name: dict(sorted(counts.items())) for name, counts in contingency.items()} if has_labels else None,
    }
