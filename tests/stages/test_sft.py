"""`dpo.objective: sft`: AMA over supervised fine-tuning, through every stage.

One short pipeline (the CLI in this process, a job file with relative paths) on two tasks: the
benchmark's arithmetic preference rows (SFT reads their chosen side) and a prompt/completion JSONL
file. Its numbers are checked against independent computations: each stored NLL against plain
cross-entropy on the unpadded sequence with the model loaded by `from_pretrained`, the evaluated
excess against those, and the specialists against the base on held-out rows.
"""

from __future__ import annotations

import json
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.timeout(420)
DUPLICATES = 10
JOB = """\
model: {{name: tiny, cache_dir: {cache}}}
dpo: {{objective: {objective}}}
data:
  tasks:
    - {{name: arithmetic, benchmark: arithmetic, size: 600}}
    - {{name: brackets, path: brackets.jsonl}}
  validation_fraction: 0.15
  test_fraction: 0.15
  min_heldout_examples: 20
  max_heldout_examples: 40
specialists:
  optim: {{steps: 60, lr: 1.0e-3, batch_size: 16, warmup_steps: 4, checkpoint_every: 20}}
generalist:
  algorithms: [ama_s]
  optim: {{steps: 20, lr: 2.0e-3, batch_size: 16, warmup_steps: 2, checkpoint_every: 20}}
merging: {{methods: []}}
reference: {{batch_size: 32}}
scaling: {{num_workers: 1, cpus_per_worker: 0.5}}
eval: {{every_n_steps: 20, max_examples: 40, generation_examples: 10}}
storage: {{path: ./runs, run_name: sft}}
"""


def direct_nll(model, prompt: list[int], completion: list[int]) -> float:
    """Per-token NLL of `completion` after `prompt`: plain cross-entropy on one unpadded sequence."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    return float(losses[len(prompt) - 1 :].mean())


@pytest.fixture(scope="module")
def sft_run(ray_session, model_cache, tmp_path_factory, monkeypatch_module):
    from ama_ray.cli import main
    from ama_ray.data import benchmark

    root = tmp_path_factory.mktemp("sft")
    rows = benchmark.generate("brackets", 240, seed=5)
    with open(root / "brackets.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({"prompt": row["prompt"], "completion": row["chosen"]}) + "\n")
        for row in rows[:DUPLICATES]:  # the same prompt and completion as pairs, twice: one SFT example each
            for rejected in (row["rejected"], row["rejected"] + " )"):
                f.write(json.dumps({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": rejected}) + "\n")
    monkeypatch_module.chdir(root)
    (root / "dpo.yaml").write_text(JOB.format(cache=model_cache, objective="dpo"))
    # DPO cannot train on completions: said (file and line) before anything commits.
    from ama_ray.config import load_config
    from ama_ray.errors import DataError
    from ama_ray.stages import prepare

    with pytest.raises(DataError, match=r"brackets.jsonl:1: .*prompt/completion row.*dpo.objective=sft"):
        prepare.run(load_config("dpo.yaml", ["storage.run_name=dpo"]))
    assert not (root / "runs" / "dpo" / "prepared" / "brackets" / "_manifest.json").exists()
    (root / "job.yaml").write_text(JOB.format(cache=model_cache, objective="sft"))
    assert main(["run", "--config", "job.yaml"]) == 0
    return root / "runs" / "sft"


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_rows_are_prepared_without_a_rejected_side_and_once_each(sft_run):
    for task in ("arithmetic", "brackets"):  # preference rows (their chosen side), a prompt/completion file
        splits = {split: pq.read_table(sft_run / "prepared" / task / f"{split}.parquet").to_pylist()
                  for split in ("train", "validation", "test")}
        rows = [r for split in splits.values() for r in split]
        assert rows and all(r["rejected_input_ids"] == [] and r["rejected"] == "" for r in rows)
        assert all(r["chosen_input_ids"][-1] == 1 for r in rows)  # the tiny tokenizer's eos
        # Pairs that differ only in their rejected response are one SFT example: no prompt and
        # completion is in two splits (it would be trained on and reported).
        assert len({(r["prompt"], r["chosen"]) for r in rows}) == len(rows)
    man = json.loads((sft_run / "prepared" / "brackets" / "_manifest.json").read_text())
    assert man["dropped"] == {"duplicate": 2 * DUPLICATES}
    reference = pq.read_table(sft_run / "reference" / "brackets" / "train.parquet")
    assert "ref_chosen_logps" in reference.column_names and "ref_rejected_logps" not in reference.column_names


def test_stored_losses_equal_plain_cross_entropy(sft_run):
    from ama_ray.models.loading import load_model

    base = load_model(json.loads((sft_run / "reference" / "arithmetic" / "_manifest.json").read_text())["model"]).eval()
    for task in ("arithmetic", "brackets"):
        spec = load_model(str(sft_run / "specialists" / task / "model")).eval()
        rows = pq.read_table(sft_run / "scores" / task / "validation.parquet").slice(0, 6).to_pylist()
        for r in rows:
            n = len(r["chosen_input_ids"])
            assert -r["ref_chosen_logps"] / n == pytest.approx(direct_nll(base, r["prompt_input_ids"], r["chosen_input_ids"]), rel=1e-4)
            assert r["specialist_loss"] == pytest.approx(direct_nll(spec, r["prompt_input_ids"], r["chosen_input_ids"]), rel=1e-4)


def test_metrics_are_sft_metrics_and_the_excess_is_measured_against_the_specialists(sft_run):
    from ama_ray.models.loading import load_model

    doc = json.loads((sft_run / "eval" / "metrics.json").read_text())
    assert doc["run"]["dpo"]["objective"] == "sft"
    models = doc["models"]
    for task in ("arithmetic", "brackets"):
        own, base = models[f"specialist/{task}"]["per_task"][task], models["base"]["per_task"][task]
        assert own["loss"] == own["nll"] and own["nll"] < base["nll"] - 0.01  # the specialist really learned its task
        for entry in models.values():
            assert not {"rewards/accuracies", "logps/accuracies", "dpo_loss"} & set(entry["per_task"][task])
    assert "generation/accuracy" in models["base"]["per_task"]["arithmetic"]  # the benchmark task has a verifier
    assert "reference_check" not in models["base"]
    # The generalist's excess on the completion task, recomputed: relu(its NLL - the specialist's) per test row.
    gen = load_model(str(sft_run / "generalist" / "ama_s" / "seed0" / "model")).eval()
    rows = pq.read_table(sft_run / "scores" / "brackets" / "test.parquet").to_pylist()
    excess = [max(0.0, direct_nll(gen, r["prompt_input_ids"], r["chosen_input_ids"]) - r["specialist_loss"]) for r in rows]
    assert models["generalist/ama_s/seed0"]["per_task"]["brackets"]["excess_loss"] == pytest.approx(np.mean(excess), rel=1e-3)
    report = (sft_run / "report" / "report.md").read_text()
    assert "completion NLL per token" in report and "reward accuracy" not in report
