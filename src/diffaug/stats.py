"""Small statistics for reports: intervals, tests and sample sizes for differences paired by seed (pure
functions)."""

from __future__ import annotations

import math
import statistics


def _checked(diffs, level: float) -> list[float]:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    diffs = [float(d) for d in diffs]
    if not all(math.isfinite(d) for d in diffs):
        raise ValueError(f"paired differences must be finite numbers, got {diffs}")
    return diffs


SPREAD_REL = 1e-9  # a std below this times the values' magnitude is float rounding, not spread


def has_spread(diffs, rel: float = SPREAD_REL) -> bool:
    """Whether paired differences vary by more than float rounding: their sample std above ``rel`` times their
    largest magnitude (equal counts subtracted and scaled leave a std of ~1e-17, not 0). False for fewer than 2."""
    diffs = [float(d) for d in diffs]
    return len(diffs) > 1 and statistics.stdev(diffs) > rel * max(abs(d) for d in diffs)


def paired_t_interval(diffs, level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided ``level`` interval for the mean of paired differences (one per seed): Student's t with n - 1
    degrees of freedom, ``mean +- t_{(1 + level) / 2, n - 1} * std / sqrt(n)``. None for fewer than 2 values, and
    for differences without spread (:func:`has_spread`), where the interval is undefined (SciPy gives NaN or a
    width of rounding error): equal values of a count metric (images right, samples of a class) are no evidence
    of a zero-width interval."""
    from scipy.stats import t as student_t

    diffs = _checked(diffs, level)
    n = len(diffs)
    if not has_spread(diffs):
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def one_sided_p(diffs) -> float | None:
    """p-value of the one-sided paired t-test that the mean difference is above zero (SciPy's ``ttest_1samp``,
    ``alternative="greater"``); None where :func:`paired_t_interval` has no interval."""
    from scipy.stats import ttest_1samp

    diffs = _checked(diffs, 0.5)
    if not has_spread(diffs):
        return None
    return float(ttest_1samp(diffs, 0.0, alternative="greater").pvalue)


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: the k-th smallest of m p-values is multiplied by
    m - k + 1, made non-decreasing and capped at 1. Rejecting where the adjusted value is below ``a`` keeps the
    chance of any false rejection among the m tests at most ``a`` (Holm 1979), whatever their dependence."""
    p = [float(v) for v in pvalues]
    if not all(0 <= v <= 1 for v in p):
        raise ValueError(f"p-values must lie in [0, 1], got {p}")
    m, adjusted, running = len(p), [0.0] * len(p), 0.0
    for rank, i in enumerate(sorted(range(m), key=p.__getitem__)):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def seeds_to_settle(mean: float, std: float, level: float = 0.95, max_seeds: int = 10_000) -> int | None:
    """The fewest seeds whose ``level`` paired-t interval would exclude zero if the mean difference and its
    spread stayed as measured: the smallest n >= 2 with ``t_{(1 + level) / 2, n - 1} * std / sqrt(n) < |mean|``.
    A plug-in figure, not a power calculation: were the measured mean and spread the truth, that many seeds would
    settle the claim in as few as about half of reruns. None when no number up to ``max_seeds`` would (a mean of
    zero), or without spread."""
    from scipy.stats import t as student_t

    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    if not math.isfinite(mean) or not math.isfinite(std) or mean == 0 or std <= SPREAD_REL * abs(mean):
        return None  # no effect, or no spread (see has_spread)
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
