"""Response-only sequence log-probs and the one per-example training loss (DPO, or SFT's NLL).

Every stage that needs a loss (specialists, scoring, the generalist, evaluation) calls
`per_example_loss`, so training and scoring cannot drift apart. This module imports torch,
numpy and the project's errors only: one training step runs on a bare GPU machine without Ray.

Batch layout (TRL's): rows `[prompt+chosen for all B; prompt+rejected for all B]`, and
`completion_mask` marks the completion tokens (which end with EOS). Rewards are
`beta * (log pi(y|x) - log pi_ref(y|x))`, TRL's implicit rewards. With `objective: sft` a
batch holds the B rows prompt+chosen only (`collate(..., pairs=False)`) and the loss is the
completion's per-token NLL, with no reference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ama_ray.errors import ConfigError

LOSS_TYPES = ("sigmoid", "ipo")
OBJECTIVES = ("dpo", "sft")


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    completion_starts: Sequence[int],
    pad_token_id: int,
    padding_side: str = "right",
) -> dict[str, Tensor]:
    """Pad token lists into a model batch.

    `completion_starts[i]` is the index in `sequences[i]` where its completion begins (the
    prompt length). Returns int64 tensors (N, L): `input_ids`, `attention_mask`,
    `completion_mask` (1 on completion tokens only) and `position_ids` (cumsum of the mask
    minus 1, so left and right padding give the same logits). Raises ValueError on an empty
    list or an unknown `padding_side`.
    """
    if not sequences:
        raise ValueError("pad_sequences needs at least one sequence")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    n, length = len(sequences), max(len(s) for s in sequences)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    completion_mask = torch.zeros((n, length), dtype=torch.long)
    for row, (seq, start) in enumerate(zip(sequences, completion_starts, strict=True)):
        offset = length - len(seq) if padding_side == "left" else 0
        span = slice(offset, offset + len(seq))
        input_ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, span] = 1
        completion_mask[row, offset + start : offset + len(seq)] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "position_ids": position_ids,
    }


def pair_length(row: dict) -> int:
    """A row's padded length in a micro-batch: prompt plus the longer completion, in tokens
    (`stages.inference.length_of` is the same over an Arrow table). SFT rows have no rejected side."""
    return len(row["prompt_input_ids"]) + max(len(row["chosen_input_ids"]), len(row.get("rejected_input_ids", ())))


def collate(examples: list[dict], pad_token_id: int, padding_side: str = "right", pairs: bool = True) -> dict[str, Tensor]:
    """Collate tokenized preference examples into one (2B, L) batch.

    Each example holds `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` (lists of
    ints; completions already end with EOS). Rows 0..B-1 are prompt+chosen, rows B..2B-1
    prompt+rejected. Other keys are ignored. `pairs=False` (the SFT objective,
    `DPOLossConfig.pairs`): the B rows prompt+chosen only, and `rejected_input_ids` may be absent.
    """
    sequences, starts = [], []
    for column in ("chosen_input_ids", "rejected_input_ids") if pairs else ("chosen_input_ids",):
        for ex in examples:
            prompt = list(ex["prompt_input_ids"])
            sequences.append(prompt + list(ex[column]))
            starts.append(len(prompt))
    return pad_sequences(sequences, starts, pad_token_id, padding_side)


LOGIT_CHUNK_ELEMENTS = 2**24  # float32 logits (64 MB) the log-softmax holds at once


def sequence_logps(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Sum of log pi(token) over each row's completion tokens.

    Returns float32 tensors of shape (N,): summed log-probs (differentiable), the number of
    completion tokens, and the mean logit over completion tokens (detached; TRL's
    `logits/chosen` metric). Prompt and padding tokens contribute nothing.

    The model is asked only for the logits a loss is taken on (`logits_to_keep`): with a boolean
    mask, exactly the positions that predict a completion token (a forward that slices through
    transformers' `slice_logits_to_keep`, as every transformers 5 causal LM does), else (an int)
    the positions from the first one any row's completion needs. The float32 log-softmax runs over chunks of at most
    LOGIT_CHUNK_ELEMENTS logits, so the full-vocabulary float32 logits of the micro-batch never
    exist at once (at 2 x 4 rows of 1,024 tokens and a 152k vocabulary they were 5 GB, held for
    backward). A model whose logits are not float32 has each chunk recomputed in backward
    (activation checkpointing), since its float32 copy would otherwise be kept; float32 logits are
    kept by backward anyway, so there the recompute would only cost time.

    Chunks are `split` views, not slices: a slice's backward fills a zero tensor of the whole
    logits for every chunk (at ~512 tokens on a 49k vocabulary that was ~1 s of a 14 s CPU step).
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    mask = batch["completion_mask"].to(device)[:, 1:].bool()  # position t predicts token t + 1
    labels = input_ids[:, 1:]
    inputs = {"input_ids": input_ids, "attention_mask": batch["attention_mask"].to(device),
              "position_ids": batch["position_ids"].to(device), "use_cache": False}
    n_tokens = mask.sum(dim=1).float()
    kind = _logits_to_keep_kind(model)
    if kind == "mask":
        keep = torch.nn.functional.pad(mask, (0, 1))  # the last position predicts nothing
        logits = model(**inputs, logits_to_keep=keep).logits  # (completion tokens, vocabulary), row-major
        if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
            raise RuntimeError(f"{type(model).__name__} did not honour a boolean logits_to_keep (got logits {tuple(logits.shape)})")
        token_logps, token_logits = _chunked(_token_logps, logits, labels[mask])
        rows = mask.nonzero()[:, 0]
        zeros = torch.zeros(mask.shape[0], dtype=torch.float32, device=device)
        sums, means = zeros.index_add(0, rows, token_logps), zeros.index_add(0, rows, token_logits)
    else:
        length = input_ids.shape[1]
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else length - 2  # the first position whose logits predict a completion token
        keep = length - first  # positions first .. length-1; the last predicts nothing and is dropped
        logits = model(**inputs, **({"logits_to_keep": keep} if kind == "int" else {})).logits
        logits = logits[:, logits.shape[1] - keep : -1]  # a model that ignored logits_to_keep returned every position
        sums, means = _chunked(_row_logps, logits, labels[:, first:], mask[:, first:])
    return sums, n_tokens, means.detach() / n_tokens.clamp(min=1.0)


def _chunked(fn: Any, logits: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor]:
    """`fn(logits, *rest)` (two outputs) over chunks along the first dimension of at most
    LOGIT_CHUNK_ELEMENTS logits, each output concatenated; checkpointed when the logits are not float32 (see `sequence_logps`)."""
    size = max(1, LOGIT_CHUNK_ELEMENTS // max(1, math.prod(logits.shape[1:])))
    checkpoint = torch.is_grad_enabled() and logits.requires_grad and logits.dtype != torch.float32
    outs = [torch.utils.checkpoint.checkpoint(fn, *part, use_reentrant=False) if checkpoint else fn(*part)
            for part in zip(logits.split(size), *(t.split(size) for t in rest))]  # an empty tensor splits into one empty chunk
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _token_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per kept token (rows of `logits`): the float32 log-prob of its label, and its mean logit."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1), logits.detach().mean(dim=-1)


def _row_logps(logits: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: the summed float32 log-probs of the masked tokens, and the summed mean logit there."""
    token_logps, token_logits = _token_logps(logits, labels)
    # where(), not a product: padded positions may hold NaN logits (fully masked attention rows).
    zeros = torch.zeros_like(token_logps)
    return torch.where(mask, token_logps, zeros).sum(dim=1), torch.where(mask, token_logits, zeros).sum(dim=1)


_LOGITS_TO_KEEP: dict[type, str | None] = {}


def _logits_to_keep_kind(model: Any) -> str | None:
    """How the causal LM under DDP / DeepSpeed / PEFT wrappers takes `logits_to_keep`: "mask" (a
    boolean (rows, positions) mask: its forward calls transformers' `slice_logits_to_keep`),
    "int" (the last k positions, the form remote code that has the argument handles), or None
    (not at all)."""
    import inspect

    bare = model
    for _ in range(4):
        if hasattr(bare, "get_base_model"):
            bare = bare.get_base_model()
        elif hasattr(bare, "module") and isinstance(bare.module, torch.nn.Module):
            bare = bare.module
        else:
            break
    kind = type(bare)
    if kind not in _LOGITS_TO_KEEP:
        takes = "logits_to_keep" in inspect.signature(bare.forward).parameters
        code = getattr(inspect.unwrap(bare.forward), "__code__", None)  # the forward this instance runs
        slices = takes and code is not None and "slice_logits_to_keep" in code.co_names
        _LOGITS_TO_KEEP[kind] = ("mask" if slices else "int") if takes else None
    return _LOGITS_TO_KEEP[kind]


def _vector(values: Tensor | np.ndarray | Sequence[float], device: torch.device) -> Tensor:
    """float32 on `device`; arrays are copied (rows read from Arrow are read-only, which
    `torch.as_tensor` would warn about and share)."""
    if isinstance(values, Tensor):
        return values.to(device=device, dtype=torch.float32)
    return torch.tensor(np.asarray(values, dtype=np.float32), device=device)


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_n_tokens: Tensor | None = None,
    rejected_n_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example DPO losses (B,) and the implicit rewards (B,) of chosen and rejected.

    `sigmoid`: -(1-ls)*log sigma(beta*d) - ls*log sigma(-beta*d) with d the difference of log
    ratios (conservative DPO; ls = 0 is plain DPO and TRL 1.16's `sigmoid`). `ipo`: TRL 1.16's
    length-normalised IPO, (d_tok - 1/(2 beta))^2 where each log ratio is divided by its
    completion length, so it needs `chosen_n_tokens` and `rejected_n_tokens`. Rewards are
    `beta * log ratio`, detached.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        logits = beta * (chosen_logratios - rejected_logratios)
        losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        if chosen_n_tokens is None or rejected_n_tokens is None:
            raise ValueError("loss_type='ipo' needs chosen_n_tokens and rejected_n_tokens")
        delta = chosen_logratios / chosen_n_tokens.clamp(min=1.0) - rejected_logratios / rejected_n_tokens.clamp(
            min=1.0
        )
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@dataclass
class DPOLossConfig:
    """The settings of the one training loss (`dpo.*` in the config; field names follow TRL's
    `DPOConfig`): the one class that owns their defaults, help and checks."""

    objective: str = "dpo"
    """`dpo` (preference pairs) or `sft`: the completion's per-token NLL of prompt/completion rows (or the chosen side of preference rows), no reference; the other `dpo.*` keys then do not apply (docs/sft.md)."""
    beta: float = 0.1
    """DPO temperature; for `ipo` the regularisation parameter tau."""
    loss_type: str = "sigmoid"
    """`sigmoid` (DPO) or `ipo`."""
    label_smoothing: float = 0.0
    """Conservative-DPO label noise in [0, 0.5); `sigmoid` only (with `ipo` it is refused when the config loads)."""
    sft_weight: float = 0.0
    """Weight of the NLL of the chosen response (per token) added to each example's loss."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}", where="dpo.objective", fix=f"use one of {OBJECTIVES}")
        if self.objective == "sft" and self.sft_weight:
            raise ConfigError("sft_weight adds an NLL term to the DPO loss; with objective sft the loss is that NLL",
                              where="dpo.sft_weight", fix="set dpo.sft_weight=0 with dpo.objective=sft")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be > 0, got {self.beta}", where="dpo.beta")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"unknown loss_type {self.loss_type!r}", where="dpo.loss_type", fix=f"use one of {LOSS_TYPES}"
            )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}", where="dpo.label_smoothing"
            )
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(
                "label_smoothing applies to loss_type 'sigmoid' only",
                where="dpo.label_smoothing",
                fix="set dpo.label_smoothing=0 or dpo.loss_type=sigmoid",
            )
        if not self.sft_weight >= 0:
            raise ConfigError(f"sft_weight must be >= 0, got {self.sft_weight}", where="dpo.sft_weight")

    @property
    def pairs(self) -> bool:
        """Whether batches hold chosen and rejected rows (DPO) or the chosen rows only (SFT)."""
        return self.objective == "dpo"

    def to_dict(self) -> dict:
        """A plain, JSON-serialisable copy (for Ray Data actors and manifests); `objective` only
        when it is not `dpo`, so manifests written before it existed still compare equal."""
        out = asdict(self)
        if self.objective == "dpo":
            out.pop("objective")
        return out


def per_example_loss(
    model: Any,
    batch: dict[str, Tensor],
    ref_chosen_logps: Tensor | np.ndarray | Sequence[float] | None,
    ref_rejected_logps: Tensor | np.ndarray | Sequence[float] | None,
    cfg: DPOLossConfig,
) -> dict[str, Tensor]:
    """The per-example DPO (+ optional NLL) loss of `model` on a `collate`d batch.

    Returns float32 vectors (B,): `loss` = `dpo_loss` + `cfg.sft_weight` * `nll`, where
    `nll` = -chosen_logps / n_chosen_tokens (per token); these three carry gradients. Also,
    detached: `chosen_logps`, `rejected_logps`, `chosen_rewards`, `rejected_rewards`.
    The caller reduces (mean, masked mean, per-task sums).

    With `cfg.objective == "sft"` the batch is `collate(..., pairs=False)`, the references are
    not read (pass None), and the output is `loss` = `nll` and `chosen_logps` only.
    """
    logps, n_tokens, _ = sequence_logps(model, batch)
    if not cfg.pairs:
        nll = -logps / n_tokens.clamp(min=1.0)
        return {"loss": nll, "nll": nll, "chosen_logps": logps.detach()}
    chosen_logps, rejected_logps = logps.chunk(2)
    n_chosen, n_rejected = n_tokens.chunk(2)
    ref_chosen, ref_rejected = _vector(ref_chosen_logps, logps.device), _vector(ref_rejected_logps, logps.device)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen_logps,
        rejected_logps,
        ref_chosen,
        ref_rejected,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
        chosen_n_tokens=n_chosen,
        rejected_n_tokens=n_rejected,
    )
    nll = -chosen_logps / n_chosen.clamp(min=1.0)
    total = losses + cfg.sft_weight * nll if cfg.sft_weight else losses
    return {
        "loss": total,
        "dpo_loss": losses,
        "nll": nll,
        "chosen_logps": chosen_logps.detach(),
        "rejected_logps": rejected_logps.detach(),
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
    }


@torch.no_grad()
def reference_logps(
    model: Any, examples: list[dict], pad_token_id: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """`ref_chosen_logps`, `ref_rejected_logps` (float32 arrays, len(examples)) in one process.

    Runs `model` in eval mode (restored afterwards), without gradients, right-padded.
    """
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        for start in range(0, len(examples), batch_size):
            logps, _, _ = sequence_logps(model, collate(examples[start : start + batch_size], pad_token_id))
            c, r = logps.chunk(2)
            chosen.append(c.cpu().numpy())
            rejected.append(r.cpu().numpy())
    finally:
        model.train(was_training)
    empty = np.zeros(0, dtype=np.float32)
    return (np.concatenate(chosen) if chosen else empty), (np.concatenate(rejected) if rejected else empty)


def batch_metrics(out: dict[str, Tensor]) -> dict[str, float]:
    """Batch means of a `per_example_loss` output under TRL's metric names."""
    chosen_r, rejected_r = out["chosen_rewards"].float(), out["rejected_rewards"].float()
    chosen_lp, rejected_lp = out["chosen_logps"].float(), out["rejected_logps"].float()
    return {
        "loss": out["loss"].detach().float().mean().item(),
        "rewards/chosen": chosen_r.mean().item(),
        "rewards/rejected": rejected_r.mean().item(),
        "rewards/accuracies": (chosen_r > rejected_r).float().mean().item(),
        "rewards/margins": (chosen_r - rejected_r).mean().item(),
        "logps/chosen": chosen_lp.mean().item(),
        "logps/rejected": rejected_lp.mean().item(),
        "logps/accuracies": (chosen_lp > rejected_lp).float().mean().item(),
    }
