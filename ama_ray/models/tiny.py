"""The embedded tiny model: a byte-level BPE tokenizer and a small Llama, built offline.

`build_tiny` trains the tokenizer on given texts and initialises the model; `ensure_tiny_base`
builds them on the offline benchmark, gives the model a short SFT on the benchmark's chosen
responses (DPO from a random init cannot make it generate) and caches the result as a
`save_pretrained` directory, so later stages load it like any other model.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ama_ray.dpo import pad_sequences, sequence_logps
from ama_ray.models import cache
from ama_ray.models.tiny_settings import TinySettings

logger = logging.getLogger(__name__)

PAD, EOS, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Bump when the build recipe changes, so cached bases from an older recipe are not reused.
RECIPE_VERSION = 1


def train_tokenizer(texts: Iterable[str], num_merges: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with one token per digit, trained on `texts` (< 1 s).

    Any text is encodable (byte-level alphabet); digits are never merged (merged digits make
    addition unlearnable for a tiny model). Special tokens: pad, eos, ChatML markers.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(alphabet) + num_merges,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=1 << 30,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, settings: TinySettings) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by `settings`, with the tokenizer's special ids."""
    torch.manual_seed(settings.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        intermediate_size=settings.intermediate_size,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    # A chat-formatted answer ends at <|im_end|>; a plain one at eos. Either stops generation.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 256,
    num_merges: int = 300,
    seed: int = 0,
) -> Path:
    """Train a tokenizer on `texts`, initialise a tiny Llama, `save_pretrained` both to `out_dir`.

    No SFT (see `ensure_tiny_base`); writes no manifest. Returns `out_dir`.
    """
    settings = TinySettings(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        num_merges=num_merges,
        seed=seed,
    )
    tokenizer = train_tokenizer(texts, num_merges)
    model = build_model(tokenizer, settings)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tokenize_sft_examples(
    tokenizer: PreTrainedTokenizerFast, rows: Iterable[dict], chosen_share: float = 1.0, seed: int = 0
) -> list[tuple[list[int], int]]:
    """(prompt + completion + eos token ids, prompt length) per benchmark row.

    The completion is the chosen response with probability `chosen_share`, else the rejected
    one: a base that has seen both knows the format and vocabulary of every task without
    already holding its preferences, so DPO has something to learn on each task.
    Prompt and completion are tokenized separately; the prepare stage must do the same so
    that SFT and DPO see the same token boundaries.
    """
    rng = random.Random(seed)
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        text = row["chosen"] if rng.random() < chosen_share else row["rejected"]
        completion = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((prompt + completion, len(prompt)))
    return out


def sft(
    model: LlamaForCausalLM,
    examples: list[tuple[list[int], int]],
    pad_token_id: int,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Supervised fine-tuning on completions only (prompt masked): AdamW, cosine decay.

    `examples` are (token ids, prompt length) pairs. Returns the per-step mean NLL per token.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        seqs, starts = zip(*(examples[i] for i in idx))
        logps, n_tokens, _ = sequence_logps(model, pad_sequences(seqs, starts, pad_token_id))
        loss = -logps.sum() / n_tokens.sum().clamp(min=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _benchmark():
    from ama_ray.data import benchmark  # imported late: the tiny model is usable without it

    return benchmark


def _base_key(settings: TinySettings) -> str:
    benchmark_source = inspect.getsource(_benchmark())
    payload = json.dumps(
        {"settings": asdict(settings), "recipe": RECIPE_VERSION, "benchmark": benchmark_source}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _build_base(out: Path, settings: TinySettings) -> dict:
    """Tokenizer + model + SFT on the benchmark's chosen responses into `out`; returns stats."""
    benchmark = _benchmark()
    start = time.perf_counter()
    tokenizer = train_tokenizer(benchmark.corpus(seed=settings.seed), settings.num_merges)
    model = build_model(tokenizer, settings)
    rows = []
    for i, task in enumerate(benchmark.TASKS):
        # A seed offset keeps the SFT draws apart from the seeds the prepare stage uses.
        rows += benchmark.generate(task, settings.sft_examples_per_task, seed=10_000 + 97 * settings.seed + i)
    examples = tokenize_sft_examples(tokenizer, rows, settings.sft_chosen_share, settings.seed)
    # One intra-op thread: at this size threads only add sync overhead, and on a busy 2-CPU
    # host (Ray workers alongside) two spinning threads made each step 5-20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = sft(
            model,
            examples,
            tokenizer.pad_token_id,
            steps=settings.sft_steps,
            batch_size=settings.sft_batch_size,
            lr=settings.sft_lr,
            seed=settings.seed,
        )
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tail = losses[-50:]
    return {
        "kind": "tiny",
        "settings": asdict(settings),
        "recipe": RECIPE_VERSION,
        "vocab_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "sft_examples": len(examples),
        "sft_final_nll": sum(tail) / max(len(tail), 1),
        "build_seconds": round(time.perf_counter() - start, 2),
    }


def ensure_tiny_base(cache_dir: str | os.PathLike, settings: Any = None) -> Path:
    """The cached tiny SFT base for `settings`, built first if absent (~15-20 s on 2 CPUs).

    `settings` is a `TinySettings`, the config's `model.tiny` section, a dict, or None.
    The directory `<cache_dir>/tiny-<hash>` holds `save_pretrained` output and a
    `_manifest.json`, written last; concurrent callers build it once (file lock).
    """
    resolved = TinySettings.from_any(settings)
    return cache.build_once(tiny_base_path(cache_dir, resolved), lambda tmp: _build_base(tmp, resolved))


def tiny_base_path(cache_dir: str | os.PathLike, settings: Any = None) -> Path:
    """Where the tiny base for `settings` is cached (built or not); builds nothing."""
    return Path(cache_dir).expanduser() / f"tiny-{_base_key(TinySettings.from_any(settings))}"
