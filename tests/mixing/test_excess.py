"""The per-example excess theta follows and its reduction to the step objective."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ama_ray.mixing import MixingSettings, batch_objective, clipped_excess, make_policy

LOSS = [1.0, 0.5, 2.0, 0.7]
SPECIALIST = [0.5, 1.0, 2.0, 0.2]


def value_and_grad(clip, target):
    loss = torch.tensor(LOSS, dtype=torch.float64, requires_grad=True)
    e = clipped_excess(loss, torch.tensor(SPECIALIST, dtype=torch.float64), clip, target)
    e.sum().backward()
    return e.detach().tolist(), loss.grad.tolist()


def test_per_example_clip_masks_the_gradient():
    value, grad = value_and_grad("per_example", "specialist")
    assert value == pytest.approx([0.5, 0.0, 0.0, 0.5], abs=1e-15)
    # masked where loss <= specialist (ties included), but every example keeps a gradient entry
    assert grad == [1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("clip", ["per_task_mean", "none"])
def test_unclipped_modes_keep_every_gradient(clip):
    value, grad = value_and_grad(clip, "specialist")
    assert value == pytest.approx([0.5, -0.5, 0.0, 0.5], abs=1e-15)
    assert grad == [1.0] * 4


@pytest.mark.parametrize("clip", ["per_example", "per_task_mean", "none"])
def test_excess_target_none_is_the_raw_loss(clip):
    assert value_and_grad(clip, "none") == (LOSS, [1.0] * 4)


def test_whole_batch_below_specialist_still_backpropagates():
    loss = torch.tensor([0.1, 0.2], requires_grad=True)
    clipped_excess(loss, torch.tensor([1.0, 1.0]), "per_example", "specialist").mean().backward()
    assert loss.grad is not None and loss.grad.tolist() == [0.0, 0.0]


def test_baselines_minimise_the_loss_unless_asked_for_the_excess():
    loss, spec = torch.tensor(LOSS), torch.tensor(SPECIALIST)
    plain = make_policy("balanced", "abc", (1, 1, 1), MixingSettings())
    assert plain.objective(loss, spec).tolist() == pytest.approx(LOSS)
    ablation = make_policy("balanced", "abc", (1, 1, 1),
                           MixingSettings(baseline_objective="excess"))
    assert ablation.objective(loss, spec).tolist() == pytest.approx([0.5, 0.0, 0.0, 0.5])
    ama = make_policy("ama_s", "abc", (1, 1, 1), MixingSettings())
    assert ama.objective(loss, spec).tolist() == pytest.approx([0.5, 0.0, 0.0, 0.5])


def test_batch_objective_hand_computed():
    e = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    tasks = torch.tensor([0, 0, 1, 2, 2])
    assert batch_objective(e, tasks, None).item() == pytest.approx(16 / 5)
    # AMA-R: 0.5 * (1+2)/2 + 0.3 * 3/1 + 0.2 * (4+6)/2 = 0.75 + 0.9 + 1.0
    weights = np.array([0.5, 0.3, 0.2])
    assert batch_objective(e, tasks, weights).item() == pytest.approx(2.65)
    # a task absent from the batch contributes nothing
    assert batch_objective(e[:2], tasks[:2], weights).item() == pytest.approx(0.75)


def test_read_only_weights_from_the_mixing_actor_raise_no_warning():
    """Ray hands the actor's numpy weights over read-only; torch warned on every AMA-R step."""
    weights = np.array([0.5, 0.3, 0.2])
    weights.setflags(write=False)
    e = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert batch_objective(e, torch.tensor([0, 0, 1, 2, 2]), weights).item() == pytest.approx(2.65)


def test_micro_batches_add_up_to_the_step_objective():
    e = torch.arange(1.0, 9.0, dtype=torch.float64)
    tasks = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    weights = np.array([0.2, 0.5, 0.3])
    counts = torch.bincount(tasks, minlength=3)
    for lw in (weights, None):
        whole = batch_objective(e, tasks, lw)
        parts = sum(batch_objective(e[i:i + 3], tasks[i:i + 3], lw, task_counts=counts,
                                    total=len(e)) for i in range(0, 8, 3))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-14)
