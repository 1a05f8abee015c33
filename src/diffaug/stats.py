"""Small statistics for reports: intervals and sample sizes for differences paired by seed (pure functions)."""

from __future__ import annotations

import math
import statistics


def paired_t_interval(diffs, level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided ``level`` interval for the mean of paired differences (one per seed): Student's t with n - 1
    degrees of freedom, ``mean +- t_{(1 + level) / 2, n - 1} * std / sqrt(n)``. None for fewer than 2 values."""
    from scipy.stats import t as student_t

    diffs = [float(d) for d in diffs]
    n = len(diffs)
    if n < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def seeds_to_settle(mean: float, std: float, level: float = 0.95, max_seeds: int = 10_000) -> int | None:
    """The fewest seeds whose ``level`` paired-t interval would exclude zero if the mean difference and its
    spread stayed as measured: the smallest n >= 2 with ``t_{(1 + level) / 2, n - 1} * std / sqrt(n) < |mean|``.
    None when no number up to ``max_seeds`` would (a mean of zero, say)."""
    from scipy.stats import t as student_t

    if mean == 0 or not math.isfinite(mean) or not math.isfinite(std):
        return None
    if std == 0:
        return 2
    lo, hi = 2, max_seeds  # the half-width falls with n, so bisect on the first n that is narrow enough

    def narrow(n: int) -> bool:
        return float(student_t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n) < abs(mean)

    if not narrow(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if narrow(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
