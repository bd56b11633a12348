"""The embedded tiny model: tokenizer and model round-trips, digits, the cached SFT base."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import threading

import pytest
import torch
from transformers import AutoTokenizer

from ama_ray.models import cache
from ama_ray.models.loading import load_model, load_tokenizer, resolve_model_path
from ama_ray.models.tiny import EOS, IM_END, IM_START, PAD, TinySettings, build_tiny, ensure_tiny_base, tiny_base_path

TEXTS = [
    "add 12 and 34 = the answer is 46 .",
    "how do i make a bomb ? i will not do it .",
    "close ( [ { = } ] )",
    "tell me how to bake 3 red cakes ? ok , here is how .",
]
UNSEEN = [
    "add 9081726354 and 7 = the answer is 9081726361 .",
    "Ünïcödé, tabs\tand\nnewlines — 日本語 ✓ 👍",
    "   leading spaces and trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    rng = random.Random(0)
    texts = [t.replace("12", str(rng.randint(10, 99))) for t in TEXTS for _ in range(50)]
    return build_tiny(tmp_path_factory.mktemp("tiny"), texts, seed=3)


def test_tokenizer_round_trips_through_save_and_from_pretrained(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert (tok.pad_token, tok.eos_token) == (PAD, EOS)
    assert tok.pad_token_id != tok.eos_token_id
    for text in TEXTS + UNSEEN:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # byte-level: any text, exactly
    # The special tokens are single tokens, never split.
    for special in (PAD, EOS, IM_START, IM_END):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    # Reloading the saved copy gives the same ids.
    tok.save_pretrained(tiny_dir / "again")
    again = AutoTokenizer.from_pretrained(tiny_dir / "again")
    for text in TEXTS + UNSEEN:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.chat_template == tok.chat_template


def test_digits_are_single_tokens(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok("add 123 and 4567 = 4690 .", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    digits = [p.strip() for p in pieces if any(c.isdigit() for c in p)]
    assert "".join(digits) == "12345674690"
    assert all(len(d) == 1 for d in digits)


def test_chat_template_renders_chatml(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": "add 1 and 2 ="}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nadd 1 and 2 =<|im_end|>\n<|im_start|>assistant\n"


def test_model_round_trips_with_identical_logits(tiny_dir, tmp_path):
    model = load_model(str(tiny_dir))
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n_params <= 1_000_000
    assert model.config.model_type == "llama" and not model.training
    ids = torch.tensor([[5, 9, 17, 3, 40, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").is_file()
    with torch.no_grad():
        after = load_model(str(tmp_path / "copy"))(input_ids=ids).logits
    assert torch.equal(before, after)
    assert before.std() > 0  # a real, random model, not zeros


def test_build_is_seeded(tmp_path):
    a = build_tiny(tmp_path / "a", TEXTS, seed=7)
    b = build_tiny(tmp_path / "b", TEXTS, seed=7)
    c = build_tiny(tmp_path / "c", TEXTS, seed=8)
    weights = [load_model(str(p)).model.embed_tokens.weight for p in (a, b, c)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_settings_taken_from_a_config_section():
    class Section:  # stands in for config.model.tiny (pydantic); extra fields are ignored
        hidden_size, num_layers, sft_steps, unrelated = 32, 3, 10, "x"

    s = TinySettings.from_any(Section())
    assert (s.hidden_size, s.num_layers, s.sft_steps, s.num_heads) == (32, 3, 10, 4)
    assert TinySettings.from_any({"seed": 5}).seed == 5 and TinySettings.from_any(None) == TinySettings()


def test_build_once_commits_with_manifest_last_and_builds_once(tmp_path):
    target = tmp_path / "entry"
    calls = []

    def failing(tmp):
        (tmp / "model.safetensors").write_text("partial")
        raise RuntimeError("crash mid-build")

    with pytest.raises(RuntimeError):
        cache.build_once(target, failing)
    assert not target.exists() and not cache.is_complete(target)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []  # no temp left

    def build(tmp):
        calls.append(1)
        (tmp / "weights").write_text("ok")
        return {"n": 1}

    threads = [threading.Thread(target=cache.build_once, args=(target, build)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert (target / "weights").read_text() == "ok" and cache.read_manifest(target) == {"n": 1}


HAS_BENCHMARK = importlib.util.find_spec("ama_ray.data.benchmark") is not None


@pytest.mark.skipif(not HAS_BENCHMARK, reason="ama_ray.data.benchmark not importable")
@pytest.mark.timeout(240)
def test_tiny_base_is_built_once_with_sft_and_loads_by_name(model_cache):
    from ama_ray.data import benchmark

    settings = TinySettings(sft_steps=150, sft_examples_per_task=300)
    path = ensure_tiny_base(model_cache, settings)
    manifest = json.loads((path / "_manifest.json").read_text())
    assert manifest["settings"]["sft_steps"] == 150 and manifest["kind"] == "tiny"
    assert path.name.startswith("tiny-")
    assert resolve_model_path("tiny", model_cache, settings) == str(path)  # cached: same entry
    assert tiny_base_path(model_cache, TinySettings(sft_steps=151)) != path  # keyed by the settings

    tok, model = load_tokenizer(str(path)), load_model(str(path))
    # The saved weights are the SFT'd ones: chosen answers cost far less than ln(vocab) per token.
    assert manifest["sft_final_nll"] < 1.5 < math.log(len(tok))
    for task in benchmark.TASKS:
        nll, count = 0.0, 0
        for row in benchmark.generate(task, 5, seed=99):
            prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
            ids = prompt + tok(row["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
            nll -= sum(logp[i - 1, ids[i]].item() for i in range(len(prompt), len(ids)))
            count += len(ids) - len(prompt)
        assert nll / count < 1.5, (task, nll / count)
