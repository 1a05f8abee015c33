"""Property-based tests (hypothesis) of the pure math: schedules, the one-step estimate, OOD metrics,
certification bounds, the corruption severities and the Fréchet distance."""

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from diffaug.ood import metrics
from diffaug.schedule import (cosine_alpha_bar, eps_from_model_output, eps_from_x0, fraction_to_t, linear_alpha_bar,
                              log_snr, q_sample, sigma_from_alpha_bar, sigma_to_t, t_to_fraction,
                              x0_from_model_output)
from diffaug.smoothing import lower_confidence_bound

FAST = settings(max_examples=60, deadline=None)
T = st.integers(min_value=2, max_value=2000)


@FAST
@given(T, st.sampled_from(["linear", "cosine"]))
def test_schedules_decrease_strictly_inside_0_1(num_timesteps, kind):
    ab = (linear_alpha_bar if kind == "linear" else cosine_alpha_bar)(num_timesteps).double()
    assert ab.shape == (num_timesteps,)
    assert (ab > 0).all() and (ab < 1).all()
    assert (ab[1:] < ab[:-1]).all()
    assert (log_snr(ab)[1:] < log_snr(ab)[:-1]).all()  # log-SNR falls with t


@FAST
@given(st.integers(0, 999), st.integers(0, 2**31 - 1), st.sampled_from(["epsilon", "v_prediction", "sample"]))
def test_q_sample_then_the_exact_network_output_returns_x0(t, seed, prediction_type):
    """With the true noise (or v, or x0) as the network output, the one-step estimate is x0 itself."""
    g = torch.Generator().manual_seed(seed)
    ab = cosine_alpha_bar(1000).double()
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    tt = torch.full((3,), t)
    x_t = q_sample(x0, tt, noise, ab)
    a = ab[tt].reshape(-1, 1, 1, 1)
    output = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
    x0_hat = x0_from_model_output(output, x_t, a, prediction_type)
    scale = 1 / a.sqrt().min().item()  # 1/sqrt(alpha_bar) amplifies rounding at large t
    torch.testing.assert_close(x0_hat, x0, atol=1e-9 * scale, rtol=0)
    torch.testing.assert_close(eps_from_model_output(output, x_t, a, prediction_type), noise,
                               atol=1e-7 * scale, rtol=0)
    torch.testing.assert_close(eps_from_x0(x0, x_t, a), noise, atol=1e-9 * scale, rtol=0)


@FAST
@given(st.integers(1, 999))
def test_sigma_to_t_inverts_the_schedule(t):
    ab = cosine_alpha_bar(1000).double()
    assert int(sigma_to_t(float(sigma_from_alpha_bar(ab[t])), ab)) == t


@FAST
@given(T, st.floats(0, 1))
def test_fraction_round_trip(num_timesteps, fraction):
    t = int(fraction_to_t(fraction, num_timesteps))
    assert 0 <= t < num_timesteps
    assert abs(float(t_to_fraction(t, num_timesteps)) - fraction) <= 0.5 / (num_timesteps - 1) + 1e-12


@FAST
@given(st.integers(1, 5000), st.floats(1e-6, 0.5), st.data())
def test_lower_confidence_bound_is_a_valid_monotone_bound(trials, alpha, data):
    k = data.draw(st.integers(0, trials))
    lo = lower_confidence_bound(k, trials, alpha)
    assert 0 <= lo <= k / trials + 1e-12
    if k < trials:  # one more success never lowers the bound
        assert lower_confidence_bound(k + 1, trials, alpha) >= lo
    assert lower_confidence_bound(k, trials, alpha / 2) <= lo + 1e-12  # more confidence, lower bound
    if k == trials:  # the closed form of Clopper-Pearson at k = n
        assert math.isclose(lo, alpha ** (1 / trials), rel_tol=1e-9)


@FAST
@given(st.integers(10, 10000), st.floats(0.05, 2.0))
def test_certified_radius_is_capped_by_the_sample_count(n, sigma):
    """The largest radius n draws can certify is sigma * Phi^-1(alpha^(1/n)), and it grows with n."""
    alpha = 0.001
    cap = sigma * norm.ppf(lower_confidence_bound(n, n, alpha))
    assert cap == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)
    assert sigma * norm.ppf(lower_confidence_bound(n + 10, n + 10, alpha)) > cap


# on a grid of exactly representable values, so affine maps cannot create or break ties by rounding
scores = st.lists(st.integers(-8000, 8000).map(lambda k: k / 8), min_size=1, max_size=40)


@FAST
@given(scores, scores)
@example([0.0, 1 / 8, -1 / 8, 0.25, -0.25, 3 / 8, -3 / 8, 0.5, -0.5], [-5 / 8, -0.75])  # AUPR-In 1.0000000000000002
def test_ood_metrics_are_in_range_and_symmetric(id_scores, ood_scores):
    m = metrics(id_scores, ood_scores)
    assert all(0 <= v <= 1 for v in m.values())
    swapped = metrics(ood_scores, id_scores)
    assert m["auroc"] + swapped["auroc"] == pytest.approx(1.0, abs=1e-9)
    shifted = metrics(np.asarray(id_scores) * 3 + 7, np.asarray(ood_scores) * 3 + 7)  # monotone maps keep ranks
    assert shifted["auroc"] == pytest.approx(m["auroc"], abs=1e-9)


@FAST
@given(scores)
def test_separated_scores_give_perfect_auroc(values):
    ood = np.asarray(values)
    m = metrics(ood + 2e3 + 1, ood)
    assert m["auroc"] == pytest.approx(1.0, abs=1e-12) and m["fpr95"] == 0.0


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["gaussian_noise", "contrast", "defocus_blur", "pixelate",
                                                   "jpeg_compression", "brightness"]))
def test_corruptions_stay_in_range_and_grow_with_severity(seed, name):
    from diffaug.corruptions import corrupt

    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    dists = []
    for severity in range(1, 6):
        y = corrupt(x, name, severity, generator=torch.Generator().manual_seed(seed))
        assert y.shape == x.shape and y.dtype == x.dtype and 0 <= y.min() and y.max() <= 1
        dists.append((y - x).norm().item())
    assert dists[-1] >= dists[0] - 1e-6  # severity 5 moves the images at least as far as severity 1


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_frechet_distance_is_zero_on_itself_and_symmetric(seed):
    from diffaug.genmetrics import frechet_distance

    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(60, 4, generator=g, dtype=torch.float64) + 1
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, b) > 0
