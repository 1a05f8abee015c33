import functools
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import binom, binomtest, norm
from torch import nn

from diffaug import ABSTAIN, InputError, Smooth
from diffaug.classifier import create_classifier, save_classifier
from diffaug.cli import main
from diffaug import sequential
from diffaug.sequential import (confidence_sequence, cs_side, futile, grid_test, log_mixture_martingale,
                                look_schedule, lower_confidence_bound, recorded, rejection_boundaries)
from conftest import tiny_denoiser


class Threshold(nn.Module):
    """Class 1 iff pixel (0, 0) exceeds 0.5: a linear classifier with a known distance to its boundary."""

    def forward(self, x):
        z = (x[:, 0, 0, 0] - 0.5) * 100
        return torch.stack([-z, z], dim=1)


class Constant(nn.Module):
    def __init__(self, k, num_classes=10):
        super().__init__()
        self.k, self.num_classes = k, num_classes

    def forward(self, x):
        return nn.functional.one_hot(torch.full((x.shape[0],), self.k), self.num_classes).float()


@pytest.mark.parametrize("k, n, alpha", [(0, 100, 0.001), (37, 100, 0.001), (990, 1000, 0.01), (100, 100, 0.05)])
def test_clopper_pearson_matches_scipy_binomtest(k, n, alpha):
    ref = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert lower_confidence_bound(k, n, alpha) == pytest.approx(ref, abs=1e-12)


def test_constant_classifier_radius_is_exact():
    smooth = Smooth(Constant(3), 10, sigma=0.5)
    label, radius = smooth.certify(torch.rand(1, 4, 4), n0=10, n=500, alpha=0.001, batch_size=64,
                                   generator=torch.Generator().manual_seed(0))
    assert label == 3
    assert radius == pytest.approx(0.5 * norm.ppf(0.001 ** (1 / 500)), rel=1e-9)
    assert smooth.predict(torch.rand(1, 4, 4), n=50, alpha=0.001, batch_size=7) == 3


def test_radius_never_exceeds_the_true_distance_of_a_linear_boundary():
    x = torch.full((1, 2, 2), 0.2)
    x[0, 0, 0] = 0.8  # distance 0.3 to the boundary x00 = 0.5
    smooth = Smooth(Threshold(), 2, sigma=0.25)
    radii = []
    for seed in range(5):
        label, radius = smooth.certify(x, 100, 20_000, 0.001, 5000, generator=torch.Generator().manual_seed(seed))
        assert label == 1
        radii.append(radius)
    assert max(radii) <= 0.3 and min(radii) > 0.27  # valid, and tight for a linear classifier


def test_predict_abstains_on_a_coin_flip():
    x = torch.full((1, 2, 2), 0.5)  # on the boundary: each class half the time
    smooth = Smooth(Threshold(), 2, sigma=0.25)
    assert smooth.predict(x, 1000, 0.001, 500, generator=torch.Generator().manual_seed(0)) == ABSTAIN
    assert smooth.certify(x, 100, 1000, 0.001, 500, generator=torch.Generator().manual_seed(0)) == (ABSTAIN, 0.0)


def test_counts_are_reproducible_and_equal_the_reference_loop():
    model = create_classifier("small_cnn", 10, 1, seed=0).eval()
    smooth = Smooth(model, 10, 0.5)
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1))
    a = smooth.sample_counts(x, 300, 128, torch.Generator().manual_seed(5))
    gen, ref, left = torch.Generator().manual_seed(5), torch.zeros(10, dtype=torch.long), 300
    with torch.no_grad():
        while left:
            b = min(128, left)
            batch = x.repeat(b, 1, 1, 1)
            pred = model(batch + torch.randn(batch.shape, generator=gen) * 0.5).argmax(1)
            ref += torch.bincount(pred, minlength=10)
            left -= b
    assert torch.equal(a, ref) and a.sum() == 300


def test_dds_feeds_the_denoiser_an_exact_x_t():
    den = tiny_denoiser()
    t = 321
    sigma = float(den.sigma(t)) / 2  # pixel noise whose model-space level is exactly sigma(t)
    seen = {}

    class Spy(nn.Module):
        def forward(self, x_t, tt, y):
            seen["x_t"], seen["t"] = x_t.clone(), tt.clone()
            return torch.zeros_like(x_t)

    den.net = Spy()
    smooth = Smooth(Constant(0), 10, sigma, denoiser=den)
    assert smooth.t_star == t and smooth.dds_mismatch == pytest.approx(1.0, abs=1e-5)
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    smooth.sample_counts(x, 4, 4, torch.Generator().manual_seed(9))
    eps = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(9))
    expected = den.q_sample(den.encode(x).expand(4, 1, 8, 8), torch.full((4,), t), eps)
    torch.testing.assert_close(seen["x_t"], expected, atol=1e-5, rtol=1e-5)
    assert (seen["t"] == t).all()


def test_errors_and_warning():
    model = Constant(0)
    with pytest.raises(InputError, match="sigma must be a positive"):
        Smooth(model, 10, 0.0)
    with pytest.raises(InputError, match="needs 200"):
        Smooth(model, 10, 100.0, denoiser=tiny_denoiser())
    smooth = Smooth(model, 10, 0.25)
    x = torch.rand(1, 4, 4)
    with pytest.raises(InputError, match=r"alpha must lie in \(0, 1\)"):
        smooth.certify(x, 10, 10, 1.5, 10)
    with pytest.raises(InputError, match="n0 must be >= 1"):
        smooth.certify(x, 0, 10, 0.001, 10)
    with pytest.raises(InputError, match="n must be >= 1"):
        smooth.predict(x, 0, 0.001, 10)
    with pytest.raises(InputError, match="batch_size must be >= 1"):
        smooth.certify(x, 10, 10, 0.001, 0)
    with pytest.raises(InputError, match="min 0.* max 2"):
        smooth.certify(x * 2 + 0.5, 10, 10, 0.001, 10)
    # 0.001 ** (1 / 9) = 0.464 < 0.5: n = 9 can never certify at alpha = 0.001, n = 10 can (0.501)
    with pytest.warns(UserWarning, match="n=9 is too small .* at least 10"):
        assert smooth.certify(x, 10, 9, 0.001, 10) == (ABSTAIN, 0.0)
    label, radius = smooth.certify(x, 10, 10, 0.001, 10)
    assert label == 0 and 0 < radius < 0.01
    with pytest.raises(InputError, match="num_classes=5"):
        Smooth(model, 5, 0.25).certify(x, 10, 10, 0.001, 10)  # a 10-class classifier


def test_denoised_smoothing_checks_the_image_against_the_denoiser():
    smooth = Smooth(Constant(0), 10, 0.25, denoiser=tiny_denoiser())
    with pytest.raises(InputError, match="16x16 but the denoiser was built for 8x8"):
        smooth.certify(torch.full((1, 16, 16), 0.5), 10, 10, 0.001, 10)  # error paths: no global RNG
    with pytest.raises(InputError, match="3 channels but the denoiser was built for 1"):
        smooth.predict(torch.full((3, 8, 8), 0.5), 10, 0.001, 10)
    with pytest.raises(InputError, match=r"must lie in \[0, 1\]"):
        smooth.certify(torch.full((1, 8, 8), 1.5), 10, 10, 0.001, 10)


# ---------------------------------------------------------------------- sequential certification
@pytest.mark.parametrize("successes, trials, p", [(0, 10, 0.3), (7, 10, 0.2), (95, 100, 0.8), (290, 300, 0.9)])
def test_mixture_martingale_matches_numerical_integration(successes, trials, p):
    from scipy.integrate import quad
    from scipy.stats import beta as beta_dist

    a, b = sequential.CS_PRIOR
    failures = trials - successes
    ratio = lambda q: (q / p) ** successes * ((1 - q) / (1 - p)) ** failures * beta_dist.pdf(q, a, b)  # noqa: E731
    ref = sum(quad(ratio, lo, hi, limit=200, epsabs=0)[0] for lo, hi in ((0, p), (p, 0.99), (0.99, 1)))
    assert math.exp(log_mixture_martingale(successes, trials, p)) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("successes, trials", [(0, 40), (13, 40), (40, 40), (930, 1000), (9990, 10000)])
def test_confidence_sequence_is_the_interval_the_martingale_defines(successes, trials):
    lo, hi = confidence_sequence(successes, trials, 0.001)
    p_hat = successes / trials
    assert lo <= p_hat <= hi and (lo == 0) == (successes == 0) and (hi == 1) == (successes == trials)
    level = math.log(1000)
    for end in (lo, hi):
        if 0 < end < 1:
            assert log_mixture_martingale(successes, trials, end) == pytest.approx(level, abs=1e-6)
    assert cs_side(successes, trials, 0.001, (lo + hi) / 2) == 0
    if lo > 1e-9:
        assert cs_side(successes, trials, 0.001, lo * (1 - 1e-6)) == -1
    if hi < 1 - 1e-9:
        assert cs_side(successes, trials, 0.001, hi + 1e-6 * (1 - hi)) == 1
    # wider than the fixed-n Clopper-Pearson bound at the same alpha (the price of looking at every t)
    assert lo <= lower_confidence_bound(successes, trials, 0.001)


@pytest.mark.parametrize("batch", [1000, 100])
def test_look_schedule_is_geometric_capped_by_the_batch_and_ends_at_max_n(batch):
    looks = look_schedule(10_000, batch)
    assert looks[0] == sequential.FIRST_LOOK and looks[-1] == 10_000
    cap = min(batch, sequential.LOOK_MAX_STEP)
    steps = [b - a for a, b in zip(looks, looks[1:])]
    assert all(0 < d <= min(cap, math.ceil(a * sequential.LOOK_GROWTH) - a) for a, d in zip(looks, steps[:-1]))
    assert max(steps) == cap and look_schedule(5, 10) == (5,) and look_schedule(33, 10) == (32, 33)
    old = look_schedule(10_000, 1000, growth=1.25, max_step=1000)  # the schedule of earlier versions
    assert max(b - a for a, b in zip(old, old[1:])) == 1000 and len(old) < len(look_schedule(10_000, 1000))


def reference_boundaries(p0, looks, alpha, power):
    """The critical values of ``rejection_boundaries`` computed the plain way: the whole sub-density, 0..t, carried
    forward at every look (no trimming of negligible tails)."""
    alive, spent, previous, critical = np.ones(1), 0.0, 0, []
    for t in looks:
        alive = np.convolve(alive, binom.pmf(np.arange(t - previous + 1), t - previous, p0))
        tail = np.cumsum(alive[::-1])[::-1]
        ok = np.flatnonzero(tail <= alpha * (t / looks[-1]) ** power * (1 - 1e-9) - spent)
        c = int(ok[0]) if len(ok) else t + 1
        if c <= t:
            spent += float(tail[c])
            alive[c:] = 0.0
        critical.append(c)
        previous = t
    return tuple(critical)


@pytest.mark.parametrize("max_n, batch, growth", [(300, 1000, 1.25), (10_000, 1000, 1.1), (5000, 100, 1.05)])
def test_trimmed_boundaries_equal_the_whole_law_computation(max_n, batch, growth):
    looks = look_schedule(max_n, batch, growth=growth)
    for p0, alpha, power in itertools.product((0.3, 0.5, 0.8413, 0.97725, 0.99865, 0.99997), (0.001, 0.05, 0.9),
                                              (0.5, 3.0, 8.0)):
        assert rejection_boundaries(p0, looks, alpha, power) == reference_boundaries(p0, looks, alpha, power), \
            (p0, alpha, power)


def crossing_rate(critical, looks, p, paths: int, seed: int) -> float:
    """Monte Carlo: the share of Bernoulli(p) paths whose successes reach ``critical[j]`` at some look ``j``."""
    rng = np.random.default_rng(seed)
    counts = np.cumsum(rng.binomial(np.diff((0,) + looks), p, size=(paths, len(looks))), axis=1)
    return float((counts >= np.asarray(critical)).any(axis=1).mean())


@pytest.mark.parametrize("p0, power", [(0.5, 3.0), (0.841, 0.5), (0.977, 3.0), (0.977, 0.5)])
def test_group_sequential_boundaries_spend_alpha_exactly(p0, power):
    looks, alpha = look_schedule(2000, 500), 0.05
    critical = rejection_boundaries(p0, looks, alpha, power)
    assert all(c <= t + 1 for c, t in zip(critical, looks)) and critical[-1] <= looks[-1]
    # the simulated crossing rate under H0 is within alpha and close to it (the boundaries are not loose)
    rate = crossing_rate(critical, looks, p0, 250_000, seed=1)
    assert 0.6 * alpha < rate < alpha + 4 * math.sqrt(alpha / 250_000), rate
    # lower rates cross less often (the test holds for all of H0: p <= p0)
    assert crossing_rate(critical, looks, p0 - 0.02, 200_000, seed=2) < rate
    # the last look is nearly as strong as Clopper-Pearson's fixed-n bound at alpha
    fixed = min(s for s in range(looks[-1] + 1) if lower_confidence_bound(s, looks[-1], alpha) > p0)
    assert fixed <= critical[-1] <= fixed + 0.01 * looks[-1]
    # per-look Clopper-Pearson (the naive rule) crosses far more often than alpha
    naive = [min([s for s in range(t + 1) if lower_confidence_bound(s, t, alpha) > p0] or [t + 1]) for t in looks]
    assert crossing_rate(naive, looks, p0, 200_000, seed=3) > 1.5 * alpha


def test_each_threshold_spends_as_early_as_its_last_look_allows():
    looks, alpha = look_schedule(10_000, 1000), 0.001
    for p0 in (0.5, 0.6915, 0.8413, 0.9332, 0.9772, 0.99865, 0.99997):
        fixed = sequential.fixed_n_critical(p0, 10_000, alpha)
        # CERTIFY's critical value: the fewest successes whose Clopper-Pearson bound passes p0
        assert lower_confidence_bound(fixed, 10_000, alpha) > p0 or fixed == 10_001
        assert fixed == 10_001 or lower_confidence_bound(fixed - 1, 10_000, alpha) <= p0
        power = sequential.spending_power(p0, looks, alpha)
        critical = sequential.grid_boundaries(p0, looks, alpha)
        assert critical == rejection_boundaries(p0, looks, alpha, power)
        if fixed > 10_000:  # Phi(4): no test passes it within 10,000 draws
            assert power == sequential.SPENDING_POWERS[-1] and critical[-1] == 10_001
            continue
        # its last look tolerates >= 95 % of the wrong votes CERTIFY tolerates, and no earlier power would
        assert 10_000 - critical[-1] >= sequential.FINAL_ALLOWANCE * (10_000 - fixed)
        for earlier in sequential.SPENDING_POWERS[:sequential.SPENDING_POWERS.index(power)]:
            tolerated = 10_000 - rejection_boundaries(p0, looks, alpha, earlier)[-1]
            assert tolerated < sequential.FINAL_ALLOWANCE * (10_000 - fixed)
    # Phi(3) (r = 0.75 at sigma 0.25): CERTIFY passes it with at most 3 wrong votes in 10,000, so only a late
    # spending (power 4) keeps all 3; Phi(2) (r = 0.5): CERTIFY tolerates 182, the earliest spending keeps >= 95 %
    assert sequential.spending_power(0.99865, looks, alpha) == 4.0
    assert sequential.spending_power(0.97725, looks, alpha) == 0.5
    assert 10_000 - sequential.fixed_n_critical(0.99865, 10_000, alpha) == 3


def test_futility_is_the_beta_binomial_predictive_probability():
    from scipy.stats import betabinom

    assert futile(10, 20, 1000, 100, 0.01)  # 980 more votes needed, 80 draws left
    assert not futile(50, 50, 40, 100, 0.01)  # already there
    # 60 of 100 so far, 50 more needed in the last 100 draws: likely; 90 more needed: not
    assert not futile(60, 100, 110, 200, 0.01) and futile(60, 100, 150, 200, 0.01)
    assert futile(60, 100, 130, 200, 0.5) == (betabinom.sf(69, 100, 60.5, 40.5) < 0.5)
    # the cached threshold in successes gives the direct computation's answer at every count
    rng = np.random.default_rng(0)
    for max_n in (40, 300, 10_000):
        for _ in range(25):
            trials = int(rng.integers(1, max_n + 1))
            critical = int(rng.integers(0, max_n + 2))
            for level in (0.0, 0.01, 0.2):
                least = sequential.least_hopeful_successes(trials, critical, max_n, level)
                every = range(0, trials + 1, max(1, trials // 60))
                for successes in {*every, least - 1, least} & set(range(trials + 1)):  # and both sides of it
                    need, left = critical - successes, max_n - trials
                    direct = need > left or (need > 0 and betabinom.sf(need - 1, left, successes + 0.5,
                                                                       trials - successes + 0.5) < level)
                    assert futile(successes, trials, critical, max_n, level) == direct


def test_grid_test_certifies_in_order_and_stops_at_the_last_radius():
    thresholds = [0.5, 0.69, 0.84]
    looks = look_schedule(5000, 1000)
    passed, trials = grid_test(recorded(np.ones(5000, dtype=int)), thresholds, 0.001, looks)
    assert passed == 2 and trials < 200
    passed, trials = grid_test(recorded(np.zeros(5000, dtype=int)), thresholds, 0.001, looks)
    assert passed == -1 and trials == looks[0]  # futile at once: abstain
    # pA = 0.75 sits between the second and third thresholds: radius index 1, long before max_n
    votes = (np.random.default_rng(0).random(5000) < 0.75).astype(int)
    passed, trials = grid_test(recorded(votes), thresholds, 0.001, looks)
    assert passed == 1 and trials < 2000


def test_grid_test_asks_the_given_futility_rule_about_the_next_radius():
    thresholds, alpha = [0.5, 0.69, 0.84], 0.001
    looks = look_schedule(2000, 1000)
    votes = (np.random.default_rng(1).random(2000) < 0.75).astype(int)
    asked = []

    def never(successes, trials, final_critical, max_n, futility):
        asked.append((successes, trials, final_critical, max_n, futility))
        return False

    passed, trials = grid_test(recorded(votes), thresholds, alpha, looks, 0.05, is_futile=never)
    assert passed == 1 and trials == 2000  # pA = 0.75 never passes 0.84, and nothing gives it up early
    finals = [sequential.grid_boundaries(p, looks, alpha)[-1] for p in thresholds]
    assert [a[1] for a in asked] == list(looks)
    assert all(a[0] == votes[:a[1]].sum() and a[3] == 2000 and a[4] == 0.05 for a in asked)
    assert {a[2] for a in asked} <= set(finals) and asked[-1][2] == finals[2]  # the next radius's last critical value
    # the default rule is sequential.futile: the same answer as passing it explicitly
    assert grid_test(recorded(votes), thresholds, alpha, looks) == grid_test(recorded(votes), thresholds, alpha,
                                                                             looks, is_futile=futile)
    assert grid_test(recorded(votes), thresholds, alpha, looks)[1] < 2000


class LinearMargin(nn.Module):
    """Two classes, ``w . x`` with ``w = (1, 1, 1, 1) / 2`` (unit norm) on 1x2x2 images: the smoothed classifier's
    ``pA`` is ``Phi(w . x / sigma)`` and its true L2 radius is ``w . x`` (Cohen et al., linear case)."""

    def forward(self, x):
        z = x.flatten(1).sum(1) / 2
        return torch.stack([-z, z], dim=1)


@functools.lru_cache(maxsize=None)
def naive_boundaries(p0, looks, alpha, power=None):
    """The naive rule: CERTIFY's Clopper-Pearson bound at alpha, re-used at every look."""
    return tuple(min([s for s in range(t + 1) if lower_confidence_bound(s, t, alpha) > p0] or [t + 1])
                 for t in looks)


def over_certified(alpha: float, inputs: int, max_n: int = 300) -> tuple[int, float]:
    """Certify ``inputs`` images whose margins sit 0.01 sigma below a grid radius; how many got a certificate that
    is false (a radius above the true one, or the wrong class), and the mean draws."""
    sigma, grid = 0.5, (0.0, 0.25, 0.5, 0.75, 1.0)
    smooth = Smooth(LinearMargin(), 2, sigma)
    bad = draws = 0
    for i in range(inputs):
        margin = grid[1 + i % 4] - 0.01 * sigma
        cert = smooth.certify_sequential(torch.full((1, 2, 2), margin / 2), alpha, max_n, 1000, radii=grid, n0=10,
                                         generator=torch.Generator().manual_seed(i))
        bad += cert.label != ABSTAIN and (cert.label != 1 or cert.radius > margin)
        draws += cert.num_samples
    return bad, draws / inputs


def test_several_classifiers_label_the_same_draws():
    den = tiny_denoiser()
    a, b = create_classifier("small_cnn", 10, 1, seed=0).eval(), create_classifier("small_cnn", 10, 1, seed=1).eval()
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    both = Smooth(a, 10, 0.25, denoiser=den).sample_labels(x, 50, 20, torch.Generator().manual_seed(1),
                                                           classifiers=[a, b])
    for k, clf in enumerate((a, b)):
        alone = Smooth(clf, 10, 0.25, denoiser=den).sample_labels(x, 50, 20, torch.Generator().manual_seed(1))
        assert torch.equal(both[k], alone)
    assert both.shape == (2, 50)


def test_linear_classifier_votes_at_the_closed_form_rate():
    smooth, margin = Smooth(LinearMargin(), 2, 0.5), 0.5 - 0.005
    votes = smooth.sample_counts(torch.full((1, 2, 2), margin / 2), 40_000, 10_000, torch.Generator().manual_seed(0))
    assert binomtest(int(votes[1]), 40_000, norm.cdf(margin / 0.5)).pvalue > 1e-4


def test_sequential_certificates_are_valid_at_margins_just_below_the_grid():
    bad, draws = over_certified(0.001, 2000)
    # H0: the false-certificate rate is <= alpha; rejected at 99.9 % when it is above
    assert binomtest(bad, 2000, 0.001, alternative="greater").pvalue > 0.001, (bad, draws)
    assert 10 + 32 < draws < 10 + 300  # it stopped early on some inputs and not at once on all


def test_naive_peeking_with_clopper_pearson_breaks_in_the_same_harness(monkeypatch):
    # alpha = 0.05 makes the failure decisive with 500 inputs (the naive rule over-certifies at about 3x alpha;
    # at alpha = 0.001 its excess, ~0.5 % vs 0.1 %, would need many more inputs to show as reliably)
    bad, _ = over_certified(0.05, 500)
    assert binomtest(bad, 500, 0.05, alternative="greater").pvalue > 0.001, bad  # the confidence sequence holds
    monkeypatch.setattr(sequential, "rejection_boundaries", naive_boundaries)
    naive, _ = over_certified(0.05, 500)
    assert binomtest(naive, 500, 0.05, alternative="greater").pvalue < 0.001, (naive, bad)


def test_sequential_stops_early_when_the_answer_is_clear():
    smooth = Smooth(Constant(3), 10, sigma=0.5)
    cert = smooth.certify_sequential(torch.rand(1, 4, 4), 0.001, 10_000, 1000, radii=(0.0, 0.5, 1.0), n0=10,
                                     generator=torch.Generator().manual_seed(0))
    assert (cert.label, cert.radius) == (3, 1.0) and cert.num_samples < 1000  # the last grid radius is certified

    class Argmax3(nn.Module):  # three classes with pA = 1/3 each: abstain as soon as the upper bound is below 1/2
        def forward(self, x):
            return x.flatten(1)[:, :3]

    cert = Smooth(Argmax3(), 3, 0.5).certify_sequential(torch.full((1, 2, 2), 0.5), 0.001, 10_000, 1000,
                                                        radii=(0.0, 0.5), n0=10,
                                                        generator=torch.Generator().manual_seed(0))
    assert cert.label == ABSTAIN and cert.num_samples < 1000
    # sigma = 0.1, grid to 1.0: the radius 0.5 needs pA > Phi(5); 300 draws can never show that, so it stops as
    # soon as 0.25 (Phi(2.5)) is certified, long before max_n
    cert = Smooth(Constant(3), 10, sigma=0.1).certify_sequential(torch.rand(1, 4, 4), 0.001, 300, 100,
                                                                 radii=(0.0, 0.25, 0.5, 1.0), n0=10,
                                                                 generator=torch.Generator().manual_seed(0))
    assert cert.radius == 0.0 or cert.radius == 0.25
    assert cert.num_samples < 10 + 300


def test_sequential_continuous_radius_is_valid_and_tight():
    x = torch.full((1, 2, 2), 0.2)
    x[0, 0, 0] = 0.8  # distance 0.3 to the boundary x00 = 0.5
    smooth = Smooth(Threshold(), 2, sigma=0.25)
    fixed = smooth.certify(x, 100, 20_000, 0.001, 5000, generator=torch.Generator().manual_seed(0))[1]
    cert = smooth.certify_sequential(x, 0.001, 20_000, 5000, n0=100, generator=torch.Generator().manual_seed(0))
    assert cert.label == 1 and 0.26 < cert.radius <= 0.3 and cert.radius < fixed + 0.01
    loose = smooth.certify_sequential(x, 0.001, 20_000, 5000, n0=100, radius_tol=0.05,
                                      generator=torch.Generator().manual_seed(0))
    assert loose.label == 1 and 0.2 < loose.radius <= 0.3 and loose.num_samples < cert.num_samples


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clf") / "plain"
    save_classifier(create_classifier("small_cnn", 10, 1, seed=0), folder, extra={"recipe": "plain"})
    return folder


def test_certify_cli_writes_rows_table_plot_and_resumes(tmp_path, trained):
    args = ["certify", "--classifier", str(trained), "--denoiser", "digits", "--sigma", "0.25", "0.5",
            "--n0", "10", "--n", "200", "--batch", "100", "--skip", "30", "--limit", "4", "--out", str(tmp_path),
            "--quiet"]
    assert main(args) == 0
    tsv = tmp_path / "plain" / "sigma_0.25" / "certify.tsv"
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time", "num_samples"]
    assert {ln.split("\t")[6] for ln in lines[1:]} == {"210"}  # n0 + n
    assert [ln.split("\t")[0] for ln in lines[1:]] == ["0", "30", "60", "90"]
    assert (tmp_path / "certified_accuracy.png").stat().st_size > 5000
    table = (tmp_path / "table.md").read_text()
    assert "| plain | best |" in table and "t*=" in table
    # an interrupted run: drop the last two rows of the shard and run again; the same rows come back
    shard = tmp_path / "plain" / "sigma_0.25" / "certify.rank0.tsv"
    before = [ln.split("\t")[:5] for ln in shard.read_text().splitlines()]
    shard.write_text("\n".join(shard.read_text().splitlines()[:3]) + "\n")
    assert main(args) == 0
    after = [ln.split("\t")[:5] for ln in shard.read_text().splitlines()]
    assert after == before
    # a run on two processes left half the rows in rank 1's file: one process resumes without redoing them
    lines = shard.read_text().splitlines()
    (shard.parent / "certify.rank1.tsv").write_text("\n".join([lines[0], *lines[3:]]) + "\n")
    shard.write_text("\n".join(lines[:3]) + "\n")
    assert main(args) == 0
    assert shard.read_text().splitlines() == lines[:3]  # nothing certified again
    assert [ln.split("\t")[:5] for ln in tsv.read_text().splitlines()] == before  # the merged table is whole



def test_certify_cli_refuses_other_settings_in_the_same_out_and_reports_only_its_selection(tmp_path, trained, capsys):
    args = ["certify", "--classifier", str(trained), "--sigma", "0.25", "--n0", "10", "--n", "100", "--batch", "100",
            "--skip", "30", "--limit", "3", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    folder = tmp_path / "plain" / "sigma_0.25"
    shard = (folder / "certify.rank0.tsv").read_text()
    capsys.readouterr()
    for change, said in ((["--n", "200"], "n 100 there, 200 now"), (["--sequential"], "sequential False there"),
                         (["--seed", "1"], "seed 0 there, 1 now")):
        assert main([*args, *change]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0] and "another --out" in err[0]
        assert (folder / "certify.rank0.tsv").read_text() == shard  # refused before any work
    assert main([*args, "--limit", "2"]) == 0  # the same settings on fewer images: their rows, not all on disk
    rows = (folder / "certify.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[0] for r in rows] == ["0", "30"]
    assert "| plain | 0.25 | 2 |" in capsys.readouterr().out
    assert (folder / "certify.rank0.tsv").read_text() == shard  # the third image's row is kept for later
    (folder / "certify.json").unlink()  # a folder from before certify.json: adopted, and said so
    assert main([*args, "--n", "200"]) == 0
    assert "predates certify.json" in capsys.readouterr().out


def test_certify_cli_sequential_counts_samples_and_reads_older_tsvs(tmp_path, trained, capsys):
    args = ["certify", "--classifier", str(trained), "--sigma", "0.25", "--n0", "10", "--sequential", "--max-n",
            "300", "--batch", "100", "--skip", "40", "--limit", "3", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = [ln.split("\t") for ln in (tmp_path / "plain" / "sigma_0.25" / "certify.tsv").read_text().splitlines()]
    assert rows[0][-1] == "num_samples" and len(rows) == 4
    used = [int(r[6]) for r in rows[1:]]
    assert all(10 + 32 <= u <= 10 + 300 for u in used)
    assert all(float(r[3]) in (0.0, 0.25, 0.5, 0.75) for r in rows[1:])  # radii on the table's grid
    line = f"| plain | 0.25 | 3 | {sum(used)} | {sum(used) / 3:.0f} |"
    assert line in printed and line in (tmp_path / "table.md").read_text()
    # a shard written before the num_samples column: still read, resumed, its rows counted as unknown
    shard = tmp_path / "plain" / "sigma_0.25" / "certify.rank0.tsv"
    shard.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t0\t-1\t0.0000\t0\t1.0\n40\t7\t7\t0.2")
    assert main(args) == 0
    rows = [ln.split("\t") for ln in (tmp_path / "plain" / "sigma_0.25" / "certify.tsv").read_text().splitlines()]
    assert [r[0] for r in rows[1:]] == ["0", "40", "80"] and rows[1][6] == "-" and rows[2][6] != "-"
    assert "1 rows from an older version" in (tmp_path / "table.md").read_text()
    shard.write_text("something\telse\n1\t2\n")
    assert main(args) == 2 and "not a certify TSV" in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [(["--sigma", "-1"], "sigma must be a positive"),
                                          (["--sigma", "0.5", "--alpha", "2"], "alpha must lie"),
                                          (["--sigma", "0.5", "--skip", "0"], "--skip must be >= 1")])
def test_certify_cli_errors(tmp_path, trained, capsys, extra, match):
    argv = ["certify", "--classifier", str(trained), "--out", str(tmp_path / "o"), "--n", "10", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


@pytest.mark.slow
def test_certify_shards_across_two_ranks(tmp_path, trained):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["certify", "--classifier", str(trained), "--sigma", "0.25", "--n0", "10", "--num-samples", "100",
              "--batch", "100", "--skip", "40", "--limit", "6", "--quiet", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffaug.cli", *common, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    rows = lambda p: [r.split("\t")[:5] for r in (p / "plain" / "sigma_0.25" / "certify.tsv").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "ddp") == rows(tmp_path / "one") and len(rows(tmp_path / "one")) == 7
    assert (tmp_path / "ddp" / "plain" / "sigma_0.25" / "certify.rank1.tsv").exists()


class BatchSizes(nn.Module):
    """Wraps a classifier and records the size of every forward pass."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.inner(x)


def test_pooled_images_get_the_certificates_they_get_alone_in_fewer_larger_passes():
    den, grid = tiny_denoiser(), (0.0, 0.25, 0.5)
    clf = BatchSizes(create_classifier("small_cnn", 10, 1, seed=0).eval())
    smooth = Smooth(clf, 10, 0.25, denoiser=den)
    xs = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    alone = [smooth.certify_sequential(x, 0.001, 400, 200, radii=grid, n0=20,
                                       generator=torch.Generator().manual_seed(i)) for i, x in enumerate(xs)]
    alone_passes, clf.sizes = len(clf.sizes), []
    pooled = dict(smooth.certify_sequential_many(((i, x, torch.Generator().manual_seed(i)) for i, x in enumerate(xs)),
                                                 0.001, 400, 200, radii=grid, n0=20))
    assert [pooled[i] for i in range(6)] == alone
    assert max(clf.sizes) <= 200 and sum(clf.sizes) == sum(c.num_samples for c in alone)
    assert len(clf.sizes) < alone_passes


def test_pooled_images_must_share_one_shape():
    smooth = Smooth(Constant(3), 10, sigma=0.5)
    g = torch.Generator().manual_seed(0)
    images = [(0, torch.rand(1, 4, 4, generator=g), None), (1, torch.rand(1, 5, 5, generator=g), None)]
    with pytest.raises(InputError, match="share one shape"):
        list(smooth.certify_sequential_many(images, 0.001, 100, 50, radii=(0.0,), n0=10))
    float64 = torch.rand(1, 4, 4, generator=g, dtype=torch.float64)
    mixed = [(0, torch.rand(1, 4, 4, generator=g), None), (1, float64, None)]
    with pytest.raises(InputError, match="dtype"):  # torch.cat would promote the first image's copies
        list(smooth.certify_sequential_many(mixed, 0.001, 100, 50, radii=(0.0,), n0=10))
    read = []
    for kwargs, message in [({"radii": None}, "pass radii"), ({"radii": (0.5, 0.25)}, "increasing"),
                            ({"radii": (0.0,), "alpha": 0.0}, "alpha"), ({"radii": (0.0,), "max_n": 5}, "max_n")]:
        args = {"alpha": 0.001, "max_n": 100, **kwargs}
        with pytest.raises(InputError, match=message):  # raised by the call itself, before any image is read
            smooth.certify_sequential_many((read.append(i) or i for i in images), args.pop("alpha"),
                                           args.pop("max_n"), 50, n0=10, **args)
    assert read == []


class MeanAbove(nn.Module):
    """Class 1 iff the image's mean exceeds 1/2."""

    def forward(self, x):
        z = x.flatten(1).mean(1) - 0.5
        return torch.stack([-z, z], dim=1)


def test_pooled_keys_may_repeat_and_radii_may_be_an_iterator():
    # image 1 (all ones) stops long before image 0 (mean 0.58), both sharing each pass (batch 1000): it leaves
    # the pool first, found by identity although both keys are None (an equality search would compare the image
    # tensors and raise); radii given as an iterator are read once, not used up by the argument check
    smooth = Smooth(MeanAbove(), 2, sigma=0.25)
    xs = [torch.full((1, 4, 4), 0.58), torch.ones(1, 4, 4)]
    alone = [smooth.certify_sequential(x, 0.001, 2000, 1000, radii=iter([0.25, 0.5]), n0=10,
                                       generator=torch.Generator().manual_seed(i)) for i, x in enumerate(xs)]
    assert alone == [smooth.certify_sequential(x, 0.001, 2000, 1000, radii=[0.25, 0.5], n0=10,
                                               generator=torch.Generator().manual_seed(i)) for i, x in enumerate(xs)]
    assert alone[1].radius == 0.5 and alone[1].num_samples < alone[0].num_samples
    pooled = list(smooth.certify_sequential_many(((None, x, torch.Generator().manual_seed(i))
                                                  for i, x in enumerate(xs)), 0.001, 2000, 1000,
                                                 radii=iter([0.25, 0.5]), n0=10))
    assert [key for key, _ in pooled] == [None, None]
    assert [c for _, c in pooled] == [alone[1], alone[0]]  # in the order they finished
