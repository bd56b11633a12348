"""`data.partition`: one mixed preference file split into tasks by clustering its prompts.

The command as a user types it (the CLI in a subprocess, relative paths, TF-IDF: no Ray), the
adjusted Rand index against a hand computation from the written rows, the embedding features
against a direct forward pass of each prompt alone (padding must not move them), and prepare
reading the clusters as ordinary tasks through the session's Ray.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from math import comb
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ama_ray.errors import ConfigError

pytestmark = pytest.mark.timeout(300)
BIN = Path(sys.executable).parent
SIZES = {"arithmetic": 120, "refusal": 120, "brackets": 120}


def write_mixture(path: Path, sizes: dict[str, int] = SIZES, seed: int = 7) -> list[dict]:
    """The offline benchmark's tasks shuffled into one JSONL file, each row labelled `task`."""
    from ama_ray.data import benchmark

    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "task": task}
            for task, n in sizes.items() for r in benchmark.generate(task, n, seed=seed)]
    random.Random(seed).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def hand_ari(truth: list[str], found: list[int]) -> float:
    """Hubert and Arabie's adjusted Rand index from pair counts (no library)."""
    pairs = lambda counts: sum(comb(c, 2) for c in counts)  # noqa: E731
    both = pairs(Counter(zip(truth, found)).values())
    a, b, total = pairs(Counter(truth).values()), pairs(Counter(found).values()), comb(len(truth), 2)
    expected = a * b / total
    return (both - expected) / ((a + b) / 2 - expected)


def test_partition_command_from_relative_paths(tmp_path, model_cache):
    rows = write_mixture(tmp_path / "mixed.jsonl")[:300]  # the source's max_rows
    (tmp_path / "job.yaml").write_text(f"""\
model: {{name: tiny, cache_dir: {model_cache}}}
data:
  partition:
    sources: [{{name: mixed, path: mixed.jsonl, max_rows: 300}}]
    k: 3
    method: tfidf
    label_field: task
    names: [big, mid, small]
  min_heldout_examples: 10
storage: {{path: ./runs, run_name: part}}
""")
    out = subprocess.run([str(BIN / "ama-ray"), "partition", "--config", "job.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    unit = tmp_path / "runs" / "part" / "partition"
    man = json.loads((unit / "_manifest.json").read_text())
    table = pq.read_table(unit / "rows.parquet").to_pylist()
    assert [r["row"] for r in table] == list(range(len(rows))) and not (unit / ".pooled.parquet").exists()
    # The rows are the file's, in its order, each in one cluster; the labels never left the manifest's scoring.
    assert [(r["prompt"], r["label"]) for r in table] == [(r["prompt"], r["task"]) for r in rows]
    sizes = Counter(r["cluster"] for r in table)
    assert man["sizes"] == {name: sizes[i] for i, name in enumerate(["big", "mid", "small"])}
    assert list(man["sizes"].values()) == sorted(man["sizes"].values(), reverse=True)  # named largest first
    assert man["ari"] == pytest.approx(hand_ari([r["label"] for r in table], [r["cluster"] for r in table]), abs=1e-9)
    assert man["ari"] > 0.6, man["contingency"]  # the benchmark's tasks differ in their words
    # The brackets task shares no word with the others: TF-IDF finds it exactly.
    assert {"brackets": sum(r["task"] == "brackets" for r in rows)} in man["contingency"].values()
    for c, name in enumerate(["big", "mid", "small"]):
        members = {r["prompt"] for r in table if r["cluster"] == c}
        assert len(man["examples"][name]) == 5 and set(man["examples"][name]) <= members
        assert sum(man["contingency"][name].values()) == man["sizes"][name]


def test_partition_command_without_a_partition_is_one_clear_line(tmp_path):
    for argv in (["partition"], ["prepare", "--force", "partition"]):
        out = subprocess.run([str(BIN / "ama-ray"), *argv, f"storage.path={tmp_path}"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "this job has no data.partition" in out.stderr, out.stderr[-2000:]


def test_partition_config_shapes(tmp_path):
    from ama_ray.config import Config

    raw = {"model": {"name": "tiny"}, "storage": {"path": str(tmp_path)},
           "data": {"partition": {"sources": [{"name": "m", "benchmark": "brackets"}], "k": 2}}}
    cfg = Config.model_validate(raw)
    assert [(t.name, t.cluster) for t in cfg.data.tasks] == [("cluster0", 0), ("cluster1", 1)]
    assert Config.model_validate(cfg.model_dump(mode="json")) == cfg  # a dumped config reads back (Tune's best.yaml)
    with pytest.raises(ConfigError, match="data.tasks and data.partition are both set"):
        Config.model_validate({**raw, "data": {**raw["data"], "tasks": [{"name": "a", "benchmark": "arithmetic"}]}})
    with pytest.raises(ConfigError, match="needs data.partition"):
        Config.model_validate({**raw, "data": {"tasks": [{"name": "a", "cluster": 0}]}})
    with pytest.raises(ValueError, match="2 names for k=3"):
        Config.model_validate({**raw, "data": {"partition": {**raw["data"]["partition"], "k": 3, "names": ["a", "b"]}}})
    # A partitioned job's hashes move with the partition settings; a job without one keeps its old hashes
    # (tests/stages/test_heldout_mixing.py holds them).
    other = Config.model_validate({**raw, "data": {"partition": {**raw["data"]["partition"], "method": "tfidf"}}})
    assert other.section_hash("data") != cfg.section_hash("data")
    # What only the partition's manifest reads redoes the partition alone, not the stages after it.
    from ama_ray.stages.partition import partition_hash

    fewer = Config.model_validate({**raw, "data": {"partition": {**raw["data"]["partition"], "examples": 2}}})
    assert fewer.section_hash("data") == cfg.section_hash("data") and partition_hash(fewer) != partition_hash(cfg)


def test_partitioned_job_files_take_overrides(tmp_path):
    """A dumped partitioned config (`ama-ray config`, Tune's best.yaml) reads back and takes
    overrides of the partition and of one found task; a bad partition key is named as such."""
    from ama_ray.config import Config, dump_yaml, load_config

    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(Config.model_validate({
        "model": {"name": "tiny"}, "storage": {"path": str(tmp_path)},
        "data": {"partition": {"sources": [{"name": "m", "benchmark": "brackets"}], "k": 2}}})))
    cfg = load_config(job, ["data.partition.k=3", "data.tasks.1.specialist_steps=7"])
    assert [(t.name, t.cluster, t.specialist_steps) for t in cfg.data.tasks] == [("cluster0", 0, None), ("cluster1", 1, 7), ("cluster2", 2, None)]
    with pytest.raises(ConfigError, match="unknown key 'data.partition.kk'"):
        load_config(job, ["data.partition.kk=3"])
    with pytest.raises(ConfigError, match="duplicate names"):
        load_config(job, ["data.partition.sources=[{name: m, benchmark: brackets}, {name: m, benchmark: refusal}]"])
    with pytest.raises(ConfigError, match="data.tasks=null"):
        load_config(None, ["data.partition={sources: [{name: m, benchmark: brackets}], k: 2}"])


def test_a_cluster_too_small_to_split_stops_before_anything_commits(tmp_path):
    import numpy as np

    from ama_ray.config import Config
    from ama_ray.errors import DataError
    from ama_ray.stages.partition import check_sizes

    cfg = Config.model_validate({"model": {"name": "tiny"}, "storage": {"path": str(tmp_path)},
                                 "data": {"partition": {"sources": [{"name": "m", "benchmark": "brackets"}], "k": 2}}})
    check_sizes(cfg, np.array([0] * 200 + [1] * 150))
    with pytest.raises(DataError, match="task 'cluster1' has 30 usable rows") as err:
        check_sizes(cfg, np.array([0] * 300 + [1] * 30))
    assert "partition cluster 1" in str(err.value) and "300, 30 rows" in str(err.value)


def test_prompt_embedder_ignores_padding(model_cache):
    """A prompt's embedding is the mean of its own last hidden states, whatever it is batched with."""
    import pyarrow as pa
    import torch

    from ama_ray.models.loading import load_model, load_tokenizer
    from ama_ray.models.tiny import ensure_tiny_base
    from ama_ray.stages.partition import PromptEmbedder

    path = str(ensure_tiny_base(model_cache))
    prompts = ["add 1 and 2 =", "close < ( [ { < ( =", "tell me how to hide 6 cheap gun ?", "add 44 and 71 ="]
    embedder = PromptEmbedder(path, "float32", False, 1, batch_size=3, max_prompt=64)
    got = embedder(pa.table({"row": pa.array(range(len(prompts)), pa.int64()), "prompt": prompts}))
    assert got["row"].to_pylist() == list(range(len(prompts)))
    model, tok = load_model(path, dtype="float32").eval(), load_tokenizer(path)
    for prompt, vector in zip(prompts, got["embedding"].to_pylist()):
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            want = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
        torch.testing.assert_close(torch.tensor(vector), want.float(), atol=1e-5, rtol=1e-5)


def test_embedding_partition_feeds_prepare(ray_session, tmp_path, model_cache):
    """Embeddings on the session's Ray; prepare then writes each cluster as an ordinary task."""
    from ama_ray.config import load_config
    from ama_ray.stages import partition, prepare
    from ama_ray.stages.report import partition_section
    from ama_ray.storage import RunDir

    rows = write_mixture(tmp_path / "mixed.jsonl", {"arithmetic": 60, "brackets": 60})
    cfg = load_config(None, [
        "model.name=tiny", f"model.cache_dir={model_cache}", f"storage.path={tmp_path / 'runs'}",
        f"data.partition={{sources: [{{name: mixed, path: {tmp_path / 'mixed.jsonl'}}}], k: 2, label_field: task, examples: 2}}",
        "data.tasks=null", "data.min_heldout_examples=5", "reference.num_actors=1",
    ])
    assert [t.name for t in cfg.data.tasks] == ["cluster0", "cluster1"]
    partition.run(cfg)
    run = RunDir(cfg.run_dir)
    man = run.partition().manifest()
    table = pq.read_table(run.partition().file("rows.parquet")).to_pylist()
    assert man["method"] == "embedding" and man["rows"] == len(rows) == len(table)
    assert man["ari"] == pytest.approx(hand_ari([r["label"] for r in table], [r["cluster"] for r in table]), abs=1e-9)
    prepare.run(cfg)
    for c, task in enumerate(cfg.data.tasks):
        unit = run.prepared(task.name)
        assert unit.manifest()["rows"] and (Path(unit.path) / "train.parquet").exists()
        prepared = [r for split in ("train", "validation", "test") for r in pq.read_table(Path(unit.path) / f"{split}.parquet").to_pylist()]
        assert sorted(r["prompt"] for r in prepared) == sorted(r["prompt"] for r in table if r["cluster"] == c)
        assert all(r["chosen_input_ids"] for r in prepared)
    # A rerun skips the committed partition; the report shows the clusters.
    assert partition.run(cfg) == [run.partition().path] and run.partition().manifest() == man
    blocks = partition_section(run)
    assert blocks[0] == ("h2", "Tasks found by partitioning") and f"{man['ari']:.3f}" in blocks[1][1]
    assert [r[0] for r in blocks[2][2]] == ["cluster0", "cluster1"]


def test_prompt_completion_sources_come_back_as_completion_rows(tmp_path, model_cache):
    """An SFT partition (`dpo.objective: sft`): rows pooled without a rejected side reach prepare
    as prompt/completion rows, not as pairs with an empty rejected response (dropped)."""
    from ama_ray.config import Config
    from ama_ray.data.formats import normalize_row
    from ama_ray.stages import partition

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in write_mixture(tmp_path / "mixed.jsonl")]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config.model_validate({
        "model": {"name": "tiny", "cache_dir": model_cache}, "dpo": {"objective": "sft"},
        "storage": {"path": str(tmp_path / "runs"), "run_name": "p"}, "data": {"min_heldout_examples": 10, "partition": {
            "sources": [{"name": "mixed", "path": str(tmp_path / "sft.jsonl")}], "k": 3, "method": "tfidf"}}})
    partition.run(cfg)
    found = [row for c in range(3) for _, row in partition.cluster_rows(cfg, c)]
    assert len(found) == len(rows) and all(set(row) == {"prompt", "completion"} for row in found)
    assert sorted((r["prompt"], r["completion"]) for r in found) == sorted((r["prompt"], r["completion"]) for r in rows)
    assert all(normalize_row(row)["rejected"] is None for row in found)
