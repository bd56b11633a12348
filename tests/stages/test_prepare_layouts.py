"""`prepare` on local files in every supported layout (JSONL, Parquet, CSV; plain and chat)."""

from __future__ import annotations

import pytest

from ama_ray.config import validate
from ama_ray.stages import prepare
from ama_ray.storage import RunDir
from tests.data.test_formats import CASES, write

N_ROWS = 20


def _vary(obj, i: int):
    """A distinct copy of a raw row: append a marker to every free-text string (not roles, ids, ratings)."""
    if isinstance(obj, dict):
        return {k: (v if k in ("role", "model") else _vary(v, i)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_vary(v, i) for v in obj]
    if isinstance(obj, str) and len(obj) > 3:
        return f"{obj} v{i}"
    return obj


@pytest.mark.timeout(600)
def test_prepare_writes_every_layout(ray_session, model_cache, tmp_path):
    tasks = []
    for n, (layout, name, raw, options, _expected) in enumerate(CASES):
        path = write(tmp_path, name, [_vary(raw, i) for i in range(N_ROWS)])
        tasks.append({"name": f"t{n}_{name.split('.')[0]}", "path": str(path), "layout": layout, **options})
    cfg = validate({
        "data": {"tasks": tasks, "validation_fraction": 0.2, "test_fraction": 0.2, "min_heldout_examples": 2},
        "storage": {"path": str(tmp_path / "runs"), "run_name": "layouts"},
        "model": {"cache_dir": model_cache},
    })
    prepare.run(cfg)
    run = RunDir(cfg.run_dir)
    for task in cfg.data.tasks:
        man = run.unit("prepared", task.name).manifest()
        assert man is not None, task.name
        assert man["rows"] == {"train": N_ROWS - 8, "validation": 4, "test": 4}, (task.name, man)
        table = run.unit("prepared", task.name).read_parquet("train.parquet")
        eos = None
        for row in table.to_pylist():
            assert row["prompt_input_ids"] and row["chosen_input_ids"] and row["rejected_input_ids"]
            eos = eos or row["chosen_input_ids"][-1]
            assert row["chosen_input_ids"][-1] == row["rejected_input_ids"][-1] == eos
            assert row["chosen"] != row["rejected"]
        if any(layout in task.layout for layout in ("hh_rlhf", "ultrafeedback", "codeultrafeedback")) or "chat" in task.name:
            assert "<|im_start|>" in table["prompt"][0].as_py(), task.name  # rendered with the chat template


@pytest.mark.timeout(300)
def test_benchmark_as_chat_turns(ray_session, model_cache, tmp_path):
    """`data.benchmark_chat`: benchmark rows become a user turn and assistant turns, rendered with
    the model's chat template, ending with one end of turn and one eos (not two), and the
    verifier finds the task's prompt inside the rendering."""
    from ama_ray.data.benchmark import verify
    from ama_ray.models.loading import load_tokenizer, resolve_model_path

    cfg = validate({
        "data": {"tasks": [{"name": "sums", "benchmark": "arithmetic", "size": 40}], "benchmark_chat": True,
                 "validation_fraction": 0.2, "test_fraction": 0.2, "min_heldout_examples": 2},
        "storage": {"path": str(tmp_path / "runs"), "run_name": "chat"},
        "model": {"cache_dir": model_cache},
    })
    prepare.run(cfg)
    tok = load_tokenizer(resolve_model_path("tiny", model_cache, cfg.model.tiny))
    rows = RunDir(cfg.run_dir).unit("prepared", "sums").read_parquet("train.parquet").to_pylist()
    assert len(rows) == 24
    for row in rows:
        assert row["prompt"].startswith("<|im_start|>user\n") and row["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert row["chosen"].startswith("the answer is ") and row["chosen"].endswith(" .<|im_end|>\n")
        assert verify("arithmetic", row["prompt"], row["chosen"], by_content=True)
        assert not verify("arithmetic", row["prompt"], row["rejected"], by_content=True)
        for side in ("chosen", "rejected"):
            ids = row[f"{side}_input_ids"]
            assert ids == tok(row[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert ids.count(tok.eos_token_id) == 1


@pytest.mark.timeout(120)
def test_prepare_finishes_with_the_inference_actors_on_every_cpu(ray_session, model_cache, tmp_path):
    """`reference.cpus_per_actor` equal to the whole cluster (the SmolLM2 job's 2 on a 2-CPU
    laptop) is good for the inference passes, but prepare's tokenizing pool took it too, and Ray
    Data's sort after that pool waited forever for a free CPU. Rows enough for the sort to run
    tasks (two tasks of 3,000; 600 each did not show it)."""
    cpus = ray_session.cluster_resources()["CPU"]
    cfg = validate({
        "data": {"tasks": [{"name": "a", "benchmark": "arithmetic", "size": 3000},
                           {"name": "b", "benchmark": "brackets", "size": 3000}]},
        "reference": {"cpus_per_actor": cpus, "num_actors": 4},  # nor four actors of the tokenizer's 0.5 CPU
        "storage": {"path": str(tmp_path / "runs"), "run_name": "all_cpus"},
        "model": {"cache_dir": model_cache},
    })
    prepare.run(cfg)
    run = RunDir(cfg.run_dir)
    for task in ("a", "b"):
        ids = run.unit("prepared", task).read_parquet("train.parquet")["example_id"].to_pylist()
        assert len(ids) > 2000 and ids == sorted(ids), task
