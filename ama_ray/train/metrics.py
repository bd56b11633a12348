"""Per-task sums of per-example outputs, and the metric names built from them (TRL names).

Workers sum per task, all-reduce one small tensor, and turn sums into means here, so training
logs, held-out evaluation and the evaluate stage compute every metric the same way.
"""

from __future__ import annotations


import torch

from ama_ray import dpo

SUM_KEYS = ("loss", "dpo_loss", "specialist_loss", "clipped_excess", "count", "reward_acc", "margin", "logps_acc", "nll", "pairs")
ROW = {key: i for i, key in enumerate(SUM_KEYS)}
# sum key -> metric name (TRL's where it has one)
METRIC_NAMES = {
    "loss": "loss",
    "dpo_loss": "dpo_loss",
    "clipped_excess": "excess_loss",
    "reward_acc": "rewards/accuracies",
    "margin": "rewards/margins",
    "logps_acc": "logps/accuracies",
    "nll": "nll",
}
# Measured on preference pairs only (averaged over the `pairs` count): absent under `dpo.objective: sft`.
PAIR_KEYS = ("dpo_loss", "reward_acc", "margin", "logps_acc")


def task_sums(out: dict[str, torch.Tensor], task_index: torch.Tensor, specialist_loss: torch.Tensor | None, k: int) -> torch.Tensor:
    """(len(SUM_KEYS), k) float64 sums over the examples of each task; detached. The PAIR_KEYS
    rows (and `pairs`, their count) stay 0 for an SFT output, which has no rejected side."""
    loss = out["loss"].detach().double()
    spec = specialist_loss.double() if specialist_loss is not None else torch.zeros_like(loss)
    values = {
        "loss": loss,
        "specialist_loss": spec,
        "clipped_excess": torch.relu(loss - spec),
        "count": torch.ones_like(loss),
        "nll": out["nll"].detach().double(),
    }
    if "rejected_logps" in out:
        values.update({
            "dpo_loss": out["dpo_loss"].detach().double(),
            "reward_acc": (out["chosen_rewards"] > out["rejected_rewards"]).double(),
            "margin": (out["chosen_rewards"] - out["rejected_rewards"]).double(),
            "logps_acc": (out["chosen_logps"] > out["rejected_logps"]).double(),
            "pairs": torch.ones_like(loss),
        })
    sums = torch.zeros(len(SUM_KEYS), k, dtype=torch.float64)
    idx = task_index.to(torch.long).cpu()
    for key, vec in values.items():
        sums[ROW[key]].index_add_(0, idx, vec.cpu())
    return sums


def mixing_stats(sums: torch.Tensor) -> dict[str, list[float]]:
    """The four per-task statistics the mixing policy takes, from `task_sums` output."""
    return {
        "sum_loss": sums[ROW["loss"]].tolist(),
        "sum_specialist_loss": sums[ROW["specialist_loss"]].tolist(),
        "sum_clipped_excess": sums[ROW["clipped_excess"]].tolist(),
        "count": sums[ROW["count"]].tolist(),
    }


def metrics_from_sums(sums: torch.Tensor, tasks: list[str], prefix: str, with_excess: bool = True) -> dict[str, float]:
    """Per-task means, plus `mean` over tasks and `worst` task, as `{prefix}/{metric}/{task}`.

    `worst` is the highest for losses and the lowest for accuracies and margins. A task with no
    examples (e.g. none drawn in a training step) has no per-task keys, not NaN ones, and does
    not enter `mean` and `worst`; so are the pair metrics (PAIR_KEYS) of a task without pairs (SFT).
    """
    out: dict[str, float] = {}
    for key, name in METRIC_NAMES.items():
        if key == "clipped_excess" and not with_excess:
            continue
        counts = sums[ROW["pairs" if key in PAIR_KEYS else "count"]]
        seen = []
        for i, task in enumerate(tasks):
            if counts[i] > 0:
                out[f"{prefix}/{name}/{task}"] = value = (sums[ROW[key], i] / counts[i]).item()
                seen.append(value)
        if seen:
            out[f"{prefix}/{name}/mean"] = sum(seen) / len(seen)
            lower_is_better = key in ("loss", "dpo_loss", "clipped_excess", "nll")
            out[f"{prefix}/{name}/worst"] = max(seen) if lower_is_better else min(seen)
    return out


@torch.no_grad()
def evaluate_rows(
    model, task_rows: list[list[dict]], loss_cfg: dpo.DPOLossConfig, pad_token_id: int, batch_size: int
) -> torch.Tensor:
    """`task_sums` over held-out rows of every task (eval mode, no gradients, right padding).

    Rows carry `ref_chosen_logps`, `ref_rejected_logps` and optionally `specialist_loss`.
    """
    was_training = model.training
    model.eval()
    k = len(task_rows)
    total = torch.zeros(len(SUM_KEYS), k, dtype=torch.float64)
    try:
        for i, rows in enumerate(task_rows):
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                out = per_example(model, chunk, loss_cfg, pad_token_id)
                spec = specialist_losses(chunk)
                total += task_sums(out, torch.full((len(chunk),), i), spec, k)
    finally:
        model.train(was_training)
    return total


def per_example(model, rows: list[dict], loss_cfg: dpo.DPOLossConfig, pad_token_id: int) -> dict[str, torch.Tensor]:
    """`dpo.per_example_loss` on rows that carry their reference log-probs (DPO; SFT reads none)."""
    batch = dpo.collate(rows, pad_token_id, pairs=loss_cfg.pairs)
    refs = ([r["ref_chosen_logps"] for r in rows], [r["ref_rejected_logps"] for r in rows]) if loss_cfg.pairs else (None, None)
    return dpo.per_example_loss(model, batch, *refs, loss_cfg)


def specialist_losses(rows: list[dict], like: torch.Tensor | None = None) -> torch.Tensor | None:
    """The rows' `specialist_loss` as a tensor (dtype/device of `like`, else float64), or None without scores."""
    if rows and "specialist_loss" in rows[0]:
        dtype, device = (like.dtype, like.device) if like is not None else (torch.float64, None)
        return torch.tensor([r["specialist_loss"] for r in rows], dtype=dtype, device=device)
    return None
