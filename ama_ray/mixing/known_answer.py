"""Known-answer check: quadratic tasks whose minimax point is the smallest enclosing ball's centre.

Task i has per-example loss L_i(theta, z) = 1/2 |theta - mu_i - eps_z|^2 with eps_z ~ N(0, sigma^2 I)
(the same noise for every task) and its specialist sits at mu_i, so s_z = 1/2 |eps_z|^2. The
excess L - s = 1/2 d^2 - (theta - mu_i).eps_z with d = |theta - mu_i|, and its clipped mean is
f(d) = a Phi(a/b) + b phi(a/b) (a = d^2/2, b = d sigma), the same strictly increasing function
for every task. So min_theta max_i f(d_i) is attained where max_i d_i is smallest: at the centre
of the smallest ball enclosing the mu_i, whatever the clipping. Proportional mixing of the plain
loss converges to the size-weighted mean of the mu_i, balanced to their centroid.

Examples are drawn fresh each step (the population version of uniform sampling within a task),
so the answer is exact; `sizes` only sets the proportional mixture. `simulate` runs the same
policy objects and torch objective helpers as the training loop.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ama_ray.mixing.excess import batch_objective
from ama_ray.mixing.policies import MixingPolicy
from ama_ray.mixing.settings import HELDOUT_PREFIX


def smallest_enclosing_ball(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and radius of the smallest ball containing `points` (shape (k, d)); brute force.

    The ball is the circumscribed ball (within their affine hull) of some subset of at most
    d + 1 points; try them all and keep the smallest that encloses every point. For small k only.
    """
    points = np.asarray(points, dtype=np.float64)
    best = (points[0], math.inf)
    for size in range(1, min(len(points), points.shape[1] + 1) + 1):
        for subset in itertools.combinations(range(len(points)), size):
            centre = _circumcentre(points[list(subset)])
            radius = float(np.linalg.norm(points[subset[0]] - centre))
            encloses = np.all(np.linalg.norm(points - centre, axis=1) <= radius * (1 + 1e-12))
            if encloses and radius < best[1]:
                best = (centre, radius)
    return best


def _circumcentre(points: np.ndarray) -> np.ndarray:
    # c = p0 + V^T lam with 2 (p_j - p0).(c - p0) = |p_j - p0|^2 for every j.
    base, span = points[0], points[1:] - points[0]
    if len(span) == 0:
        return base.copy()
    lam = np.linalg.solve(2 * span @ span.T, (span**2).sum(axis=1))
    return base + lam @ span


def clipped_excess_mean(distance: np.ndarray, sigma: float) -> np.ndarray:
    """f(d) = E max(1/2 d^2 - d sigma Z, 0), Z ~ N(0, 1): a task's expected clipped excess."""
    d = np.asarray(distance, dtype=np.float64)
    a, b = 0.5 * d**2, d * sigma
    z = np.divide(a, b, out=np.zeros_like(d), where=b > 0)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    pdf = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    return a * cdf + b * pdf


@dataclass
class QuadraticTasks:
    """k quadratic tasks: centres `mu` (shape (k, d)), train `sizes`, noise scale `sigma`."""

    mu: np.ndarray
    sizes: tuple[int, ...]
    sigma: float

    @property
    def centre(self) -> np.ndarray:
        return smallest_enclosing_ball(self.mu)[0]

    @property
    def weighted_mean(self) -> np.ndarray:
        return np.average(self.mu, axis=0, weights=self.sizes)

    @property
    def diameter(self) -> float:
        return max(np.linalg.norm(a - b) for a, b in itertools.combinations(self.mu, 2))

    def minimax_gap(self, theta: np.ndarray) -> np.ndarray:
        """max_i f(|theta - mu_i|) - min_theta' max_i f(|theta' - mu_i|), in loss units (>= 0).

        theta has shape (..., d); the gap has shape (...).
        """
        radius = smallest_enclosing_ball(self.mu)[1]
        worst = np.linalg.norm(np.asarray(theta)[..., None, :] - self.mu, axis=-1).max(axis=-1)
        return clipped_excess_mean(worst, self.sigma) - clipped_excess_mean(radius, self.sigma)


def triangle_tasks(height: float = 0.93, sigma: float = 0.5) -> QuadraticTasks:
    """Three tasks in 2-D, sizes 10:1:1, the big task at (0, height), the small ones at (+-1, 0).

    For height < 1 the smallest enclosing ball has centre (0, 0) and radius 1 (the two small
    tasks are active, the big one is not), the centroid is (0, height/3) and the size-weighted
    mean (0, 10 height/12): at height 0.93 both are >= 0.15 diameters from the centre.
    """
    mu = np.array([[0.0, height], [-1.0, 0.0], [1.0, 0.0]])
    return QuadraticTasks(mu=mu, sizes=(10, 1, 1), sigma=sigma)


def simulate(policy: MixingPolicy, tasks: QuadraticTasks, steps: int, lr: float, batch: int,
             seed: int, theta0: np.ndarray | None = None, heldout: int = 64) -> np.ndarray:
    """Run `steps` SGD steps of theta against `policy`; return the averaged iterate (shape (d,)).

    Each step follows the training loop's protocol: labels from `policy.sample`, per-example
    objective from `policy.objective`, reduction by `batch_objective` with the policy's
    `loss_weights`, one theta step, then `policy.update` with the step's per-task sums, plus, at
    the steps `policy.wants_heldout` names (`ama_h`), the sums of `heldout` fresh examples per
    task at the current theta (the population's held-out slice, forward only).
    theta0 defaults to the big task's centre mu_0. The average is over theta_0..theta_{T-1}.
    """
    import torch

    rng = np.random.default_rng(seed)
    k, dim = tasks.mu.shape
    mu = torch.as_tensor(tasks.mu)
    theta = torch.tensor(tasks.mu[0] if theta0 is None else theta0, dtype=torch.float64)
    theta_sum = torch.zeros(dim, dtype=torch.float64)
    for _ in range(steps):
        measured = {}
        if policy.wants_heldout(policy.step):
            held = np.repeat(np.arange(k), heldout)
            eps = rng.standard_normal((len(held), dim)) * tasks.sigma
            loss = 0.5 * ((theta.numpy() - tasks.mu[held] - eps) ** 2).sum(axis=1)
            stats = _step_stats(held, loss, 0.5 * (eps**2).sum(axis=1), k)
            measured = {HELDOUT_PREFIX + key: value for key, value in stats.items()}
        labels = torch.as_tensor(policy.sample(batch, rng))
        eps = torch.as_tensor(rng.standard_normal((batch, dim)) * tasks.sigma)
        theta_sum += theta
        theta.requires_grad_(True)
        loss = 0.5 * ((theta - mu[labels] - eps) ** 2).sum(dim=1)
        specialist = 0.5 * (eps**2).sum(dim=1)
        objective = batch_objective(policy.objective(loss, specialist), labels,
                                    policy.loss_weights(policy.weights()))
        (grad,) = torch.autograd.grad(objective, theta)
        theta = (theta - lr * grad).detach()
        policy.update({**_step_stats(labels.numpy(), loss.detach().numpy(), specialist.numpy(), k), **measured})
    return (theta_sum / steps).numpy()


def _step_stats(labels: np.ndarray, loss: np.ndarray, specialist: np.ndarray,
                k: int) -> dict[str, np.ndarray]:
    def per_task(values):
        return np.bincount(labels, weights=values, minlength=k)

    return {"sum_loss": per_task(loss), "sum_specialist_loss": per_task(specialist),
            "sum_clipped_excess": per_task(np.maximum(loss - specialist, 0.0)),
            "count": np.bincount(labels, minlength=k)}
