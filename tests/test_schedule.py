import pytest
import torch
from diffusers import DDPMScheduler

from diffaug import schedule


@pytest.mark.parametrize("T", [1000, 250, 4000])
def test_linear_matches_diffusers(T):
    s = 1000 / T
    ref = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4 * s, beta_end=0.02 * s).alphas_cumprod
    torch.testing.assert_close(schedule.linear_alpha_bar(T), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("T", [1000, 4000])
def test_cosine_matches_diffusers(T):
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    torch.testing.assert_close(schedule.cosine_alpha_bar(T), ref, atol=2e-6, rtol=1e-5)


def test_alpha_bar_from_scheduler_is_a_copy():
    sched = DDPMScheduler()
    ab = schedule.alpha_bar_from_scheduler(sched)
    ab[0] = 0.5
    assert sched.alphas_cumprod[0] != 0.5
    with pytest.raises(TypeError, match="alphas_cumprod"):
        schedule.alpha_bar_from_scheduler(object())


def test_q_sample_matches_add_noise():
    g = torch.Generator().manual_seed(0)
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x0, noise = torch.randn(7, 3, 4, 4, generator=g), torch.randn(7, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 200, 500, 998, 999])
    ours = schedule.q_sample(x0, t, noise, schedule.alpha_bar_from_scheduler(sched))
    torch.testing.assert_close(ours, sched.add_noise(x0, noise, t), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("make", [schedule.linear_alpha_bar, schedule.cosine_alpha_bar])
def test_sigma_t_round_trip(make):
    ab = make(1000)
    t = torch.arange(1000)
    sigma = schedule.sigma_from_alpha_bar(ab)
    assert (sigma[1:] > sigma[:-1]).all()
    assert torch.equal(schedule.sigma_to_t(sigma, ab), t)


def test_fraction_round_trip_and_independence_of_schedule_length():
    assert schedule.fraction_to_t(0.5, 1000).item() == 500  # round(0.5 * 999) = 499.5 -> 500 (half to even)
    assert schedule.fraction_to_t(0.25, 4000).item() == 1000
    t = torch.arange(0, 1000)
    assert torch.equal(schedule.fraction_to_t(schedule.t_to_fraction(t, 1000), 1000), t)


def test_x0_and_eps_conversions_are_consistent():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    a = torch.rand(5, 1, 1, 1, generator=g) * 0.98 + 0.01
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    for out, kind in ((eps, "epsilon"), (v, "v_prediction"), (x0, "sample")):
        torch.testing.assert_close(schedule.x0_from_model_output(out, x_t, a, kind), x0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(schedule.eps_from_model_output(out, x_t, a, kind), eps, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: schedule.linear_alpha_bar(1), "num_timesteps"),
        (lambda: schedule.cosine_alpha_bar(10.5), "num_timesteps"),
        (lambda: schedule.sigma_to_t(0.0, schedule.linear_alpha_bar()), "positive"),
        (lambda: schedule.sigma_to_t(float("nan"), schedule.linear_alpha_bar()), "finite"),
        (lambda: schedule.fraction_to_t(1.5, 1000), r"\[0, 1\]"),
        (lambda: schedule.x0_from_model_output(torch.zeros(1), torch.zeros(1), torch.ones(1), "score"), "prediction_type"),
        (lambda: schedule.eps_from_model_output(torch.zeros(1), torch.zeros(1), torch.ones(1), "x"), "prediction_type"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
