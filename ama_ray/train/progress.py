"""Live progress of concurrent training runs: rank 0 of each run tells a small actor its step,
and the driver draws one bar per run (or, without a terminal, a log line per 10% of its steps)."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("ama_ray.train.launch")  # the driver's progress lines keep their logger name
SHOWN = ("train/loss/mean", "eval/dpo_loss/mean", "eval/excess_loss/worst")  # an SFT run has no dpo_loss: two shown


class Progress:
    """A tiny actor every run's rank 0 tells its step; the driver draws one bar per unit."""

    def __init__(self):
        self.units: dict[str, tuple[int, int, dict]] = {}

    def update(self, unit: str, step: int, total: int, metrics: dict) -> None:
        self.units[unit] = (step, total, metrics)

    def snapshot(self) -> dict:
        return dict(self.units)


class ProgressClient:
    """Rank 0's side: every 10th step and the last, the step and a few metrics."""

    def __init__(self, name: str | None, unit: str, rank: int):
        self.unit, self.actor = unit, _progress_actor(name) if rank == 0 else None

    def update(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if self.actor is not None and (step % 10 == 0 or step == total):
            self.actor.update.remote(self.unit, step, total, {k: v for k, v in metrics.items() if k in SHOWN})


def _progress_actor(name: str | None):
    if not name:
        return None
    import ray

    from ama_ray.cluster import NAMESPACE

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def draw(snapshot: dict, bars: dict) -> None:
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        _log_progress(snapshot, bars)
        return
    for unit, (step, total, metrics) in sorted(snapshot.items()):
        bar = bars.get(unit)
        if bar is None:
            bar = bars[unit] = tqdm(total=total, desc=unit, position=len(bars), leave=True, dynamic_ncols=True)
        bar.n = step
        bar.set_postfix({k.split("/")[-2] if k.count("/") > 1 else k: f"{v:.3f}" for k, v in metrics.items()}, refresh=True)



def _log_progress(snapshot: dict, last: dict) -> None:
    """Without a terminal: one log line per unit whenever it advanced by >= 10% of its steps."""
    for unit, (step, total, metrics) in sorted(snapshot.items()):
        shown = last.get(unit, _Shown()).step
        if step == total and shown != total or step - shown >= max(1, total // 10):
            values = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            log.info("%s: step %d/%d %s", unit, step, total, values)
            last[unit] = _Shown(step)


class _Shown:
    """What `_log_progress` printed last for a unit (closes like a bar)."""

    def __init__(self, step: int = -1):
        self.step = step

    def close(self) -> None:
        pass
