"""Paired comparisons of two generalists over the seeds they share: the verdict `ama-ray compare
--paired` prints and the report's verdict uses.

Each seed trains both arms on the same data order and initialisation, so the per-seed
difference is what to test, not the two means apart. The interval is a percentile bootstrap
of the mean difference (scipy.stats.bootstrap) and the sign test an exact binomial test
(scipy.stats.binomtest) on the seeds whose difference is not zero. "Separated" means the
interval excludes 0; with fewer than two seeds there is no interval and nothing is separated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

CONFIDENCE = 0.95
RESAMPLES = 9999


def signed(x: float) -> str:
    """`+0.050`; a difference that rounds to zero prints `+0.000`, never `-0.000`."""
    return f"{round(x, 3) + 0.0:+.3f}"


@dataclass(frozen=True)
class Paired:
    diffs: tuple[float, ...]  # a - b per shared seed, in seed order
    mean: float
    low: float  # bootstrap interval of the mean difference (nan with < 2 seeds)
    high: float
    below: int  # seeds where a < b
    above: int  # seeds where a > b
    sign_p: float  # two-sided exact sign test (1.0 when every difference is 0)
    seeds: tuple = ()  # the seeds of `diffs` (`paired_over_seeds`)

    @property
    def separated(self) -> bool:
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)

    def interval(self) -> str:
        """`[-0.120, -0.031]`, or `none (one seed)`."""
        return f"[{signed(self.low)}, {signed(self.high)}]" if not math.isnan(self.low) else "none (one seed)"

    def better(self, lower_is_better: bool = True) -> str:
        """`3 of 3 seeds lower`: how many seeds favour a."""
        count = self.below if lower_is_better else self.above
        return f"{count} of {len(self.diffs)} seeds {'lower' if lower_is_better else 'higher'}"

    def verdict(self) -> str:
        return "separated (the interval excludes 0)" if self.separated else "not separated"

    def describe(self, lower_is_better: bool = True) -> str:
        """`mean -0.081, 95% bootstrap CI [-0.120, -0.031], 3 of 3 seeds lower, sign test p = 0.25: separated ...`."""
        interval = f"{CONFIDENCE:.0%} bootstrap CI {self.interval()}" if not math.isnan(self.low) else "no interval (one seed)"
        return f"mean {signed(self.mean)}, {interval}, {self.better(lower_is_better)}, sign test p = {self.sign_p:.3g}: {self.verdict()}"


def paired(a: list[float], b: list[float], seed: int = 0) -> Paired:
    """The paired comparison of `a` and `b` (one value per seed, same seeds, same order)."""
    import numpy as np
    from scipy import stats

    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need the same seeds on both sides, got {len(a)} and {len(b)}")
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    low = high = math.nan
    if len(diffs) > 1:
        if np.ptp(diffs) == 0:  # every resample has the same mean: the interval is that point
            low = high = float(diffs[0])
        else:
            ci = stats.bootstrap((diffs,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES,
                                 method="percentile", rng=np.random.default_rng(seed)).confidence_interval
            low, high = float(ci.low), float(ci.high)
    below, above = int((diffs < 0).sum()), int((diffs > 0).sum())
    sign_p = float(stats.binomtest(below, below + above, 0.5).pvalue) if below + above else 1.0
    return Paired(tuple(float(d) for d in diffs), float(diffs.mean()), low, high, below, above, sign_p)


def paired_over_seeds(a: dict, b: dict) -> Paired | None:
    """`paired` over the seeds both `{seed: value}` maps hold a finite value for; None when
    there is none."""
    ok = lambda v: v is not None and not math.isnan(v)  # noqa: E731
    seeds = [s for s in sorted(set(a) & set(b)) if ok(a[s]) and ok(b[s])]
    return replace(paired([a[s] for s in seeds], [b[s] for s in seeds]), seeds=tuple(seeds)) if seeds else None
