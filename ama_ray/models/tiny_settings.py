"""The settings of the embedded tiny model (`model.tiny` in the config): defaults, help and checks.

Light on purpose (no torch): the config imports it. `ama_ray.models.tiny` builds the model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ama_ray.checks import check_number


@dataclass(frozen=True)
class TinySettings:
    """Everything that determines the tiny base; its hash keys the cache directory."""

    hidden_size: int = 64
    """Hidden width of the embedded tiny model."""
    num_layers: int = 2
    """Transformer layers of the tiny model."""
    num_heads: int = 4
    """Attention heads of the tiny model."""
    intermediate_size: int = 128
    """MLP width of the tiny model."""
    max_position_embeddings: int = 256
    """Longest sequence the tiny model takes."""
    num_merges: int = 300
    """BPE merges of the tiny tokenizer (digits are never merged)."""
    seed: int = 0
    """Seed of the tiny model's initialisation and SFT."""
    sft_steps: int = 800
    """SFT steps on benchmark responses that make the base."""
    sft_examples_per_task: int = 2000
    """Benchmark examples per task used for the base SFT."""
    sft_batch_size: int = 32
    """Sequences per SFT step."""
    sft_lr: float = 3e-3
    """Learning rate of the base SFT (1e-3 left 2-digit addition at ~4% exact match after 1,200 steps; 3e-3: ~89%)."""
    sft_chosen_share: float = 0.5
    """Share of SFT targets that are the chosen response (else the rejected): the base learns every task's format without its preferences (1.0 saturated them: refusal at 100%)."""

    def __post_init__(self) -> None:
        for name, low in (("hidden_size", 8), ("num_layers", 1), ("num_heads", 1), ("intermediate_size", 8),
                          ("max_position_embeddings", 16), ("num_merges", 0), ("sft_steps", 0),
                          ("sft_examples_per_task", 10), ("sft_batch_size", 1)):
            check_number(f"model.tiny.{name}", getattr(self, name), low=low, integer=True)
        check_number("model.tiny.seed", self.seed, integer=True)
        check_number("model.tiny.sft_lr", self.sft_lr, low=0.0, low_open=True)
        check_number("model.tiny.sft_chosen_share", self.sft_chosen_share, low=0.0, high=1.0)

    @classmethod
    def from_any(cls, settings: Any = None) -> "TinySettings":
        """Take the matching fields of a config section, a mapping or None (defaults)."""
        if settings is None or isinstance(settings, cls):
            return settings or cls()
        get = settings.get if isinstance(settings, dict) else lambda k, d: getattr(settings, k, d)
        return cls(**{f.name: get(f.name, f.default) for f in fields(cls)})
