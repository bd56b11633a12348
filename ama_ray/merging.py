"""Merging the specialists into one model, the paper's other family of baselines (docs/merging.md).

No training: a merged model is built from the base θ₀ and the k specialists θ₁..θₖ through their
task vectors τᵢ = θᵢ − θ₀ (per tensor):

| method            | merged model                                   | λ                          |
|-------------------|------------------------------------------------|----------------------------|
| `average`         | θ₀ + (1/k) Σ τᵢ  (= the uniform mean of the θᵢ) | none                       |
| `task_arithmetic` | θ₀ + λ Σ τᵢ                                    | `merging.lambdas`, on validation |
| `ties`            | θ₀ + TIES(λτ₁..λτₖ; density)                   | `merging.lambdas`, on validation |

TIES (Yadav et al., 2023) keeps each τᵢ's `density` largest-magnitude entries, elects a sign per
entry from the sum, and averages the entries that agree with it.

The arithmetic is PEFT's own: `peft.utils.merge_utils` for full-weight specialists, and
`add_weighted_adapter` on the saved adapters for LoRA specialists. For LoRA, `average` and
`task_arithmetic` use its `cat` combination, the exact weighted sum of the adapters' updates
(ΔW = Σ wᵢ BᵢAᵢ, so the merged LoRA model equals the full-weight merge of the merged
specialists); PEFT's `linear` combination sums the A and B factors separately, which adds cross
terms between specialists (PEFT documents it as a rough approximation), so it is not used.

Pure torch/PEFT: no Ray (the merge stage runs these inside Ray tasks).
"""

from __future__ import annotations

import math
import warnings

import torch

METHODS = ("average", "task_arithmetic", "ties")
LORA_COMBINATION = {"average": "cat", "task_arithmetic": "cat", "ties": "ties"}
SELECT = "eval/excess_loss/worst"  # what picks λ, on the validation split (lower is better)


def candidates(method: str, lambdas: list[float]) -> list[float | None]:
    """The λ values a method is tried at (None: `average`, which has no λ)."""
    if method not in METHODS:
        raise ValueError(f"unknown merging method {method!r}; allowed: {', '.join(METHODS)}")
    return [None] if method == "average" else [float(x) for x in lambdas]


def weights(method: str, lam: float | None, k: int) -> torch.Tensor:
    """The weight of each of the k task vectors."""
    return torch.full((k,), 1.0 / k if method == "average" else float(lam), dtype=torch.float32)


def merge_tensor(base: torch.Tensor, tuned: list[torch.Tensor], method: str, lam: float | None, density: float) -> torch.Tensor:
    """One merged tensor: θ₀ + merge(τ₁..τₖ), computed in float32, returned in `base`'s dtype.
    Tensors that are not floating point (buffers such as position ids) are the base's."""
    from peft.utils import merge_utils

    if not base.is_floating_point():
        return base
    anchor = base.float()
    taus = [t.float() - anchor for t in tuned]
    w = weights(method, lam, len(taus))
    if method == "ties":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns once per tensor that density 1 trims nothing
            delta = merge_utils.ties(taus, w, density, majority_sign_method="total")
    else:
        delta = merge_utils.task_arithmetic(taus, w)
    return (anchor + delta).to(base.dtype)


def merge_state(base: dict[str, torch.Tensor], specialists: list[dict[str, torch.Tensor]], method: str,
                lam: float | None, density: float) -> dict[str, torch.Tensor]:
    """The merged state dict of full-weight specialists (every state dict has the base's names)."""
    for i, state in enumerate(specialists):
        missing = sorted(set(base) - set(state))
        if missing:
            raise ValueError(f"specialist {i} lacks {len(missing)} of the base's tensors, e.g. {missing[:3]}")
    return {name: merge_tensor(tensor, [s[name] for s in specialists], method, lam, density) for name, tensor in base.items()}


def add_lora_candidates(model, adapters: list[str], method: str, lambdas: list[float], density: float) -> dict[str, float | None]:
    """Add one merged adapter per candidate λ to a PEFT model holding the specialists' adapters
    (named `adapters`); returns {adapter name: λ}."""
    out = {}
    for i, lam in enumerate(candidates(method, lambdas)):
        name = f"merged_{method}_{i}"
        w = weights(method, lam, len(adapters)).tolist()
        extra = {"density": density} if method == "ties" else {}
        model.add_weighted_adapter(adapters, w, name, combination_type=LORA_COMBINATION[method], **extra)
        out[name] = lam
    return out


def best_candidate(scores: dict, key: str = SELECT):
    """The candidate with the lowest finite `key` (ties: the first); ValueError when none is finite."""
    finite = [(c, s[key]) for c, s in scores.items() if s.get(key) is not None and math.isfinite(s[key])]
    if not finite:
        raise ValueError(f"no merging candidate has a finite {key}: {scores}")
    return min(finite, key=lambda cs: cs[1])[0]
