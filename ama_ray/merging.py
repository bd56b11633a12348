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


def delta_tensor(base: torch.Tensor, tuned: list[torch.Tensor], method: str, density: float) -> torch.Tensor:
    """merge(τ₁..τₖ) of one tensor at λ = 1 (`average`: weights 1/k), in float32.

    Every method is linear in λ (TIES trims and elects signs on the τᵢ, whatever their common
    weight), so a candidate λ is θ₀ + λ · this: the task vectors are merged once per method."""
    from peft.utils import merge_utils

    anchor = base.float()
    taus = [t.float() - anchor for t in tuned]
    w = weights(method, 1.0, len(taus))
    if method == "ties":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns once per tensor that density 1 trims nothing
            return merge_utils.ties(taus, w, density, majority_sign_method="total")
    return merge_utils.task_arithmetic(taus, w)


def delta_state(base: dict[str, torch.Tensor], specialists: list[dict[str, torch.Tensor]], method: str,
                density: float) -> dict[str, torch.Tensor]:
    """`delta_tensor` of every floating-point tensor of the base (every state dict has its names)."""
    for i, state in enumerate(specialists):
        missing = sorted(set(base) - set(state))
        if missing:
            raise ValueError(f"specialist {i} lacks {len(missing)} of the base's tensors, e.g. {missing[:3]}")
    return {name: delta_tensor(t, [s[name] for s in specialists], method, density)
            for name, t in base.items() if t.is_floating_point()}


def apply_delta(base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], lam: float | None) -> dict[str, torch.Tensor]:
    """θ₀ + λ · delta (λ None: 1), each tensor in the base's dtype; tensors that are not floating
    point (buffers such as position ids) are the base's."""
    scale = 1.0 if lam is None else float(lam)
    return {name: (t.float() + scale * delta[name]).to(t.dtype) if name in delta else t for name, t in base.items()}


def merge_state(base: dict[str, torch.Tensor], specialists: list[dict[str, torch.Tensor]], method: str,
                lam: float | None, density: float) -> dict[str, torch.Tensor]:
    """The merged state dict of full-weight specialists at one λ."""
    return apply_delta(base, delta_state(base, specialists, method, density), lam)


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
