"""The excess: per example for theta's gradient (torch), per task for alpha's update (numpy).

Both halves live here so the meaning of `clip` and `excess_target` is defined in one place:

| clip / excess_target   | theta's per-example e  | alpha's per-task sum S_i                      |
|------------------------|------------------------|-----------------------------------------------|
| per_example/specialist | max(L - s, 0) (masked) | sum_clipped_excess_i                          |
| per_task_mean/special. | L - s                  | max(sum_loss_i - sum_specialist_loss_i, 0)    |
| none/specialist        | L - s                  | sum_loss_i - sum_specialist_loss_i            |
| any/none               | L                      | sum_loss_i                                    |

With `excess_target: history` the target s is the task's history target T_i
(`ama_ray.mixing.targets.HistoryTarget`) for every example of task i, and the table's
`specialist` rows apply unchanged (the training loop passes T_i where a specialist loss would go,
so `sum_specialist_loss_i` is n_i T_i).

`per_task_mean` clips the task's batch mean (count_i * max(mean L - mean s, 0) is the same
sum): it only changes alpha's statistic; theta's gradient is that of L - s, i.e. of L.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from ama_ray.mixing.settings import HELDOUT_KEYS, STAT_KEYS

if TYPE_CHECKING:  # torch is imported lazily: the actor process only needs numpy
    import torch


def clipped_excess(loss: "torch.Tensor", specialist_loss: "torch.Tensor", clip: str,
                   excess_target: str) -> "torch.Tensor":
    """Per-example e whose gradient theta follows; same shape as `loss`.

    per_example: relu(loss - specialist_loss). Where loss <= specialist_loss the value and the
    gradient are 0 but the example stays in the graph (masked, never dropped), so every DDP
    worker runs backward even when its whole batch has zero excess.
    per_task_mean / none: loss - specialist_loss. excess_target none: loss itself. `history`: as
    `specialist`, with the task's history target in `specialist_loss`.
    """
    import torch

    if excess_target == "none":
        return loss
    if excess_target not in ("specialist", "history"):
        raise ValueError(f"unknown excess_target {excess_target!r}")
    diff = loss - specialist_loss.to(loss.dtype)
    if clip == "per_example":
        return torch.relu(diff)
    if clip in ("per_task_mean", "none"):
        return diff
    raise ValueError(f"unknown clip {clip!r}")


def check_stats(stats: Mapping[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Return `stats` as float64 arrays of shape (k,), or raise ValueError (a caller's bug).

    Needs exactly the keys of STAT_KEYS (a training step's sums), or those and HELDOUT_KEYS (with
    the held-out sums of a step at which `ama_h` measures them), finite values and counts that are
    non-negative integers.
    """
    keys = STAT_KEYS + (HELDOUT_KEYS if set(HELDOUT_KEYS) & set(stats) else ())
    if set(stats) != set(keys):
        raise ValueError(f"stats must have keys {STAT_KEYS} (and optionally {HELDOUT_KEYS}), got {sorted(stats)}")
    out = {}
    for key in keys:
        value = np.array(stats[key], dtype=np.float64)  # a copy: records must not alias
        if value.shape != (k,) or not np.all(np.isfinite(value)):
            raise ValueError(f"stats[{key!r}] must be {k} finite numbers, got {value!r}")
        out[key] = value
    for key in (k for k in keys if k.endswith("count")):
        count = out[key]
        if np.any(count < 0) or np.any(count != np.round(count)):
            raise ValueError(f"stats[{key!r}] must be non-negative integers, got {count!r}")
    return out


def task_excess_sums(stats: Mapping[str, np.ndarray], clip: str,
                     excess_target: str) -> np.ndarray:
    """Per-task sum S_i of the excess that drives alpha, shape (k,), float64 (table above)."""
    if excess_target == "none":
        return stats["sum_loss"].copy()
    if clip == "per_example":
        return stats["sum_clipped_excess"].copy()
    diff = stats["sum_loss"] - stats["sum_specialist_loss"]
    if clip == "per_task_mean":
        return np.maximum(diff, 0.0)
    return diff


def batch_objective(e: "torch.Tensor", task_ids: "torch.Tensor",
                    loss_weights: np.ndarray | None, task_counts: "torch.Tensor | None" = None,
                    total: int | None = None) -> "torch.Tensor":
    """Reduce per-example e (shape (n,)) to the scalar theta steps on.

    loss_weights None (sample mode): sum(e) / total, total defaulting to n.
    Otherwise (AMA-R): sum_i loss_weights_i * sum_{task i} e / task_counts_i, where task_counts
    (shape (k,)) default to the counts in this batch; a task with count 0 contributes 0.
    Pass the whole step's `total` / `task_counts` when the step is split into micro-batches,
    so that the micro-batch terms add up to the step's objective.
    """
    import torch

    if loss_weights is None:
        return e.sum() / (e.numel() if total is None else total)
    # torch.tensor copies: the weights arrive read-only from the mixing actor (Ray's zero-copy
    # numpy), and as_tensor warned on every step that it cannot share a non-writable array.
    weights = torch.tensor(loss_weights, dtype=e.dtype, device=e.device)
    task_ids = task_ids.to(e.device)  # labels are drawn on the CPU; e lives on the model's device
    sums = torch.zeros(len(weights), dtype=e.dtype, device=e.device).index_add(0, task_ids, e)
    if task_counts is None:
        task_counts = torch.bincount(task_ids, minlength=len(weights))
    counts = task_counts.to(device=e.device, dtype=e.dtype).clamp(min=1)  # sums are 0 where the count is 0
    return (weights * sums / counts).sum()
