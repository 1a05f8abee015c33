"""The statistics of sequential certification (pure functions; :meth:`diffaug.Smooth.certify_sequential` samples).

Draws of the base classifier arrive in batches; after each *look* the certifier decides whether it knows enough.
Two rules, both valid however the stopping time depends on the data:

* **Grid radii: exact group-sequential tests** (Jennison & Turnbull 2000, "Group Sequential Methods with
  Applications to Clinical Trials", ch. 7 and 12; alpha spending after Lan & DeMets 1983, Biometrika 70:659). For
  each grid threshold ``p_k = Phi(r_k / sigma)`` the test of ``H0: pA <= p_k`` rejects at look ``j`` when the
  successes reach ``c_kj``. The critical values are computed exactly from the binomial law: the chance under
  ``pA = p_k`` of crossing any of them up to look ``j`` is at most ``alpha * (t_j / max_n) ** power``, so
  at most ``alpha`` overall (and less for any ``pA < p_k``: the rejection region only grows with the votes).
  Radii are certified in order (fixed-sequence testing), so a radius above the true one needs the first false
  threshold's test to reject: probability <= alpha, as CERTIFY. The spending is a power of time, and each
  threshold gets its own exponent (:func:`spending_power`, fixed before any draw): the most front-loaded of
  ``SPENDING_POWERS`` whose last look still tolerates ``FINAL_ALLOWANCE`` (95 %) of the wrong votes CERTIFY's
  Clopper-Pearson bound tolerates at ``max_n``. Early spending lets clear cases stop near the fewest draws any
  level-alpha test needs; the allowance keeps the last look as strong as CERTIFY's where it is tight (a threshold
  near 1 that CERTIFY passes with only a few wrong votes in ``max_n`` gets a late spending, power 4 or more).
  The looks (:func:`look_schedule`: 10 % more draws each time, at most 250 more), the powers and the allowance were
  chosen on recorded votes of held-out cases (test digits 100-199, ``benchmarks/bench_certify.py --start 100``),
  then read on the benchmark's own digits (see benchmarks/RESULTS.md).
* **Continuous radius: an anytime-valid confidence sequence**, the beta-binomial mixture (Robbins 1970,
  "Statistical methods related to the law of the iterated logarithm"; Howard, Ramdas, McAuliffe & Sekhon 2021,
  "Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist., Sec. 3) at ``alpha / 2``,
  plus at ``max_n`` the fixed-n Clopper-Pearson bound at ``alpha / 2``.

Stopping early for **futility** never weakens a guarantee (it can only certify less): the grid rule stops testing
the next radius once the predictive probability (the beta-binomial law of the remaining votes under the Jeffreys
posterior) that the votes up to ``max_n`` reach its last critical value falls below ``futility`` (default 1 %),
or once no votes at all could reach it.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy.optimize import brentq
from scipy.special import betaln
from scipy.stats import beta, betabinom, binom

from .errors import InputError

CS_PRIOR = (1.0, 0.1)  # Beta(1, 0.1): mass near p = 1, where certification is hardest (see cs_side)
FIRST_LOOK = 32  # draws before the first look
LOOK_GROWTH = 1.1  # each look after 10 % more draws ...
LOOK_MAX_STEP = 250  # ... and at most 250 more (and at most one forward batch: see look_schedule)
SPENDING_POWERS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)  # alpha spent by draw t: alpha * (t / max_n) ** power
FINAL_ALLOWANCE = 0.95  # the last look tolerates at least this share of the wrong votes CERTIFY tolerates
FUTILITY = 0.01  # stop testing a radius when the chance of still certifying it by max_n is below this


def lower_confidence_bound(successes, trials, alpha: float):
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion: a float for counts given as
    numbers, an array (elementwise) for arrays of counts."""
    successes, trials = np.asarray(successes), np.asarray(trials)
    lower = np.where(successes > 0, beta.ppf(alpha, np.maximum(successes, 1), trials - successes + 1), 0.0)
    return float(lower) if lower.ndim == 0 else lower


def look_schedule(max_n: int, batch_size: int, first: int = FIRST_LOOK, growth: float = LOOK_GROWTH,
                  max_step: int = LOOK_MAX_STEP) -> tuple[int, ...]:
    """Draw counts at which the certifier looks: ``first``, then ``growth`` times more each time but at most
    ``min(max_step, batch_size)`` more, up to ``max_n`` (always the last look). Fixed before any draw, as the tests
    need. Looks every few hundred draws cost little: the boundaries are computed once per threshold and cached,
    and :meth:`diffaug.Smooth.certify_sequential_many` packs several images' small requests into full passes."""
    if max_n < 1 or batch_size < 1 or first < 1 or max_step < 1:
        raise InputError(f"max_n, batch_size, first and max_step must be >= 1, got {max_n}, {batch_size}, {first} "
                         f"and {max_step}")
    looks = []
    t = min(first, max_n)
    while t < max_n:
        looks.append(t)
        t += min(max(1, math.ceil(t * growth) - t), batch_size, max_step)
    return tuple(looks) + (max_n,)


def fixed_n_critical(p0: float, n: int, alpha: float) -> int:
    """The fewest successes in ``n`` draws whose Clopper-Pearson lower bound at ``alpha`` exceeds ``p0`` (what
    CERTIFY needs to pass ``p0``); ``n + 1`` when none does."""
    if lower_confidence_bound(n, n, alpha) <= p0:
        return n + 1
    low, high = 0, n  # the bound grows with the successes: bisect for the first that passes
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if lower_confidence_bound(mid, n, alpha) > p0 else (mid, high)
    return high


def spending_power(p0: float, looks: tuple[int, ...], alpha: float) -> float:
    """The exponent of the threshold ``p0``'s alpha spending: the first of ``SPENDING_POWERS`` (most front-loaded
    first) whose last critical value tolerates at least ``FINAL_ALLOWANCE`` of the wrong votes that CERTIFY's
    Clopper-Pearson bound tolerates at ``max_n``; the last (most back-loaded) when none does. It depends on
    ``p0``, the looks and alpha only, never on the draws, so each test keeps its level."""
    max_n = looks[-1]
    tolerated = max_n - fixed_n_critical(p0, max_n, alpha)
    if tolerated < 0:  # CERTIFY cannot pass p0 within max_n draws either
        return SPENDING_POWERS[-1]
    for power in SPENDING_POWERS:
        if max_n - rejection_boundaries(p0, looks, alpha, power)[-1] >= FINAL_ALLOWANCE * tolerated:
            return power
    return SPENDING_POWERS[-1]


def grid_boundaries(p0: float, looks: tuple[int, ...], alpha: float) -> tuple[int, ...]:
    """The critical values of the threshold ``p0``'s test in :func:`grid_test`, at its :func:`spending_power`."""
    return rejection_boundaries(p0, looks, alpha, spending_power(p0, looks, alpha))


@functools.lru_cache(maxsize=256)
def rejection_boundaries(p0: float, looks: tuple[int, ...], alpha: float, power: float) -> tuple[int, ...]:
    """Exact critical values ``c_j`` of the group-sequential test of ``H0: p <= p0`` at the draw counts ``looks``.

    ``H0`` is rejected at the first look ``j`` with ``successes >= c_j`` (``c_j = t_j + 1``: no rejection there).
    Each ``c_j`` is the smallest value whose probability under ``p = p0`` of a first crossing at look ``j``, added
    to that of the earlier looks, stays within ``alpha * (t_j / max_n) ** power``: the sub-density of the paths not
    yet rejected is carried from look to look by convolving with the binomial law of the new draws.
    ``power`` shapes the spending (3: little early, a last look close to the fixed-n test's; 0.5: most early).
    """
    max_n = looks[-1]
    alive, low = np.ones(1), 0  # P(S_t = low + i and no rejection so far), i = 0..len - 1
    spent, previous, critical = 0.0, 0, []
    for t in looks:
        alive = np.convolve(alive, _binomial_pmf(t - previous, p0))
        allowed = alpha * (t / max_n) ** power * (1 - 1e-9) - spent  # the margin absorbs float rounding
        tail = np.cumsum(alive[::-1])[::-1]  # tail[i] = P(S_t >= low + i and no rejection before)
        ok = np.flatnonzero(tail <= allowed)
        if len(ok):  # reject from low + i on (from 0 on when all that is left may go)
            i = int(ok[0])
            c = low + i if i else 0
            spent += float(tail[i])
            alive = alive[:i]
        else:  # only the negligible tail above the kept law, if any, may go
            c = min(low + len(alive), t + 1)
        critical.append(c)
        previous = t
        alive, low = _trimmed(alive, low)
    return tuple(critical)


NEGLIGIBLE = 1e-40  # sub-density below this is dropped (at most ~1e-33 in all: far inside the 1e-9 margin above)


def _trimmed(alive: np.ndarray, low: int) -> tuple[np.ndarray, int]:
    """``alive`` without its negligible ends (the binomial tails far from ``p0 t``): the convolutions then cost the
    width of the law, not ``t``, which keeps ``max_n = 100,000`` with hundreds of looks fast."""
    kept = np.flatnonzero(alive > NEGLIGIBLE)
    if not len(kept):
        return np.zeros(1), low
    return alive[kept[0]:kept[-1] + 1], low + int(kept[0])


@functools.lru_cache(maxsize=64)
def _binomial_pmf(m: int, p: float) -> np.ndarray:
    return binom.pmf(np.arange(m + 1), m, p)


def predictive_chance(successes: int, trials: int, final_critical: int, max_n: int) -> float:
    """The predictive probability of :func:`futile` (0 when even all remaining votes fall short; 1 when reached)."""
    need, remaining = final_critical - successes, max_n - trials
    if need > remaining:
        return 0.0
    if need <= 0:
        return 1.0
    return float(betabinom.sf(need - 1, remaining, successes + 0.5, trials - successes + 0.5))


@functools.lru_cache(maxsize=65536)
def least_hopeful_successes(trials: int, final_critical: int, max_n: int, futility: float,
                            chance=predictive_chance) -> int:
    """The fewest successes in ``trials`` draws whose ``chance`` (:func:`predictive_chance`) is at least ``futility``
    (found by bisection: the chance grows with the successes); ``trials + 1`` when no count qualifies."""
    low = max(0, final_critical - (max_n - trials))  # fewer cannot reach final_critical at all
    high = min(final_critical, trials + 1)  # final_critical is already there; trials + 1: not reachable now
    if low >= high:
        return low if low <= trials else trials + 1
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if chance(mid, trials, final_critical, max_n) < futility else (low, mid)
    return low


def futile(successes: int, trials: int, final_critical: int, max_n: int, futility: float,
           chance=predictive_chance) -> bool:
    """Whether the votes up to ``max_n`` will reach ``final_critical`` with probability below ``futility``: by
    default the predictive probability (:func:`predictive_chance`: the remaining votes are beta-binomial under the
    Jeffreys posterior ``Beta(S + 1/2, F + 1/2)``), or ``chance(successes, trials, final_critical, max_n)``, any
    such probability that grows with the successes. This reads the cached :func:`least_hopeful_successes`."""
    return successes < least_hopeful_successes(trials, final_critical, max_n, futility, chance)


def grid_steps(thresholds: list[float], alpha: float, looks: tuple[int, ...], futility: float = FUTILITY,
               is_futile=futile):
    """The grid rule as a coroutine: yields how many new draws it wants, is sent how many of them voted for the
    selected class, and returns ``(k, trials)`` (see :func:`grid_test`). Several images can then share forward
    passes (:meth:`diffaug.Smooth.certify_sequential_many`), each running its own copy of the rule."""
    critical = [grid_boundaries(float(p), looks, alpha) for p in thresholds]
    passed, successes, trials = -1, 0, 0
    for j, t in enumerate(looks):
        successes += int((yield t - trials))
        trials = t
        while passed + 1 < len(thresholds) and successes >= critical[passed + 1][j]:
            passed += 1  # fixed-sequence: radius k is tested only once k - 1 is certified
        if passed + 1 == len(thresholds) or is_futile(successes, trials, critical[passed + 1][-1], looks[-1],
                                                      futility):
            break
    return passed, trials


def grid_test(draw, thresholds: list[float], alpha: float, looks: tuple[int, ...],
              futility: float = FUTILITY, is_futile=futile) -> tuple[int, int]:
    """Run the grid rule on a stream of votes; returns ``(k, trials)``: the index of the largest threshold passed
    (-1: none, abstain) and the draws it took.

    Args:
        draw: ``draw(m)`` -> how many of ``m`` new draws voted for the selected class.
        thresholds: increasing ``Phi(r_k / sigma)`` of the grid radii (the first is 1/2 for radius 0).
        alpha: failure probability of the certificate.
        looks: :func:`look_schedule`.
        futility: see :func:`futile`.
        is_futile: the futility rule, called as :func:`futile` (its default). Giving up a radius early never
            weakens the certificate, so any rule keeps the guarantee: ``benchmarks/bench_certify.py --oracle``
            passes one that knows each simulated case's true rate, to measure how much any futility rule could save.
    """
    steps = grid_steps(thresholds, alpha, looks, futility, is_futile)
    wanted = next(steps)
    while True:
        try:
            wanted = steps.send(draw(wanted))
        except StopIteration as stop:
            return stop.value


def recorded(votes):
    """A ``draw(m)`` for :func:`grid_test` that reads recorded votes (1 = for the selected class) in order: to
    replay a fixed-n run's draws through the sequential rule, as ``benchmarks/bench_certify.py`` does."""
    votes = np.asarray(votes)
    position = 0

    def draw(m: int) -> int:
        nonlocal position
        if position + m > len(votes):
            raise ValueError(f"asked for draws {position}..{position + m} of {len(votes)} recorded votes")
        position += m
        return int(votes[position - m:position].sum())
    return draw


# ---------------------------------------------------------------------- the continuous radius
def log_mixture_martingale(successes: int, trials: int, p: float, prior: tuple[float, float] = CS_PRIOR) -> float:
    """Log of the beta-binomial mixture martingale ``M_t(p)`` (Robbins 1970; Howard et al. 2021, Sec. 3).

    ``M_t(p) = B(a + S, b + t - S) / B(a, b) / (p^S (1 - p)^(t - S))`` with ``S`` successes in ``t`` Bernoulli(p)
    trials and a ``Beta(a, b)`` prior: a nonnegative martingale with mean 1 when the true rate is ``p``.
    """
    a, b = prior
    failures = trials - successes
    log_lik = (successes * math.log(p) if successes else 0.0) + (failures * math.log1p(-p) if failures else 0.0)
    return float(betaln(a + successes, b + failures) - betaln(a, b)) - log_lik


def cs_side(successes: int, trials: int, alpha: float, p: float, prior: tuple[float, float] = CS_PRIOR) -> int:
    """Where ``p`` lies against the confidence sequence ``{p : M_t(p) < 1 / alpha}`` at ``t = trials``.

    Returns -1 when the lower bound is above ``p``, +1 when the upper bound is below it, 0 when ``p`` is inside.
    The set is an interval around ``S / t`` because ``log M_t`` is convex in ``p`` and ``M_t(S / t) <= 1``.
    """
    if trials == 0 or log_mixture_martingale(successes, trials, p, prior) < math.log(1.0 / alpha):
        return 0
    return -1 if p < successes / trials else 1


def confidence_sequence(successes: int, trials: int, alpha: float,
                        prior: tuple[float, float] = CS_PRIOR) -> tuple[float, float]:
    """Anytime-valid ``(lower, upper)`` bounds on a Bernoulli rate: the ends of ``{p : M_t(p) < 1 / alpha}``.

    By Ville's inequality ``P(exists t: M_t(p) >= 1 / alpha) <= alpha``, so with probability >= 1 - alpha the
    interval holds the true rate at every ``t`` at once, and sampling may stop at any data-dependent time.
    """
    if trials == 0:
        return 0.0, 1.0
    p_hat = successes / trials

    def excess(p: float) -> float:
        return log_mixture_martingale(successes, trials, p, prior) - math.log(1.0 / alpha)

    lo_end, hi_end = 1e-300, 1 - 1e-16
    lower = 0.0 if successes == 0 or excess(lo_end) < 0 else brentq(excess, lo_end, p_hat, xtol=1e-14)
    upper = 1.0 if successes == trials or excess(hi_end) < 0 else brentq(excess, p_hat, hi_end, xtol=1e-14)
    return lower, upper


def sequence_bounds(successes: int, trials: int, alpha: float, max_n: int) -> tuple[float, float]:
    """The ``(lower, upper)`` bounds of the continuous rule at ``trials`` draws: the mixture confidence sequence at
    ``alpha / 2``, and at ``trials == max_n`` also the fixed-n Clopper-Pearson lower bound at ``alpha / 2``. Both
    hold together with probability >= 1 - alpha (union bound), at every look."""
    lower, upper = confidence_sequence(successes, trials, alpha / 2)
    if trials == max_n:
        lower = max(lower, lower_confidence_bound(successes, trials, alpha / 2))
    return lower, upper
