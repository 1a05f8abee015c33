import math

import pytest
import torch
from torch import nn

import diffaug
from diffaug import DiffAug, InputError, schedule
from diffaug.augment import one_step_dpm_solver_2
from diffaug.denoiser import Denoiser
from conftest import tiny_denoiser


def test_shapes_range_and_dtype(den, images):
    out, t = DiffAug(den)(images, generator=torch.Generator().manual_seed(0), return_t=True)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert t.dtype == torch.long and t.shape == (6,) and (t >= 0).all() and (t < 1000).all()


def test_generator_reproducibility_and_replay(den, images):
    aug = DiffAug(den)
    a = aug(images, generator=torch.Generator().manual_seed(7))
    b = aug(images, generator=torch.Generator().manual_seed(7))
    c = aug(images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    t, noise = aug.draw(images, torch.Generator().manual_seed(7))
    assert torch.equal(aug.apply(images, t, noise), a)


def test_tweedie_equals_manual_x0_estimate(den, images):
    aug = DiffAug(den, t_range=(300, 300))
    t, noise = aug.draw(images, torch.Generator().manual_seed(1))
    with torch.no_grad():
        x_t = schedule.q_sample(images * 2 - 1, t, noise, den.alpha_bar)
        manual = (den.predict_x0(x_t, t).clamp(-1, 1) + 1) / 2
        torch.testing.assert_close(aug.apply(images, t, noise), manual)
    assert (t == 300).all()


def test_diffuse_denoise_is_the_view_diffaug_and_ensemble_use(den, images):
    from diffaug.ensemble import ensemble_views

    g = torch.Generator().manual_seed(3)
    noise = torch.randn(images.shape, generator=g)
    with torch.no_grad():
        # at an int t the same as the manual estimate; DiffAug.apply with the same settings
        x_t = schedule.q_sample(images * 2 - 1, torch.full((6,), 250), noise, den.alpha_bar)
        torch.testing.assert_close(diffaug.diffuse_denoise(den, images, 250, noise),
                                   (den.predict_x0(x_t, torch.full((6,), 250)).clamp(-1, 1) + 1) / 2)
        aug = DiffAug(den, sampler="dpm-solver-2")
        t = torch.tensor([5, 100, 250, 400, 700, 999])
        assert torch.equal(aug.apply(images, t, noise),
                           diffaug.diffuse_denoise(den, images, t, noise, sampler="dpm-solver-2"))
        # DE's member views: one noise draw per member, in member-major order
        views = ensemble_views(den, images, (0, 50, 200), generator=torch.Generator().manual_seed(4))
        member_noise = torch.randn((2, *images.shape), generator=torch.Generator().manual_seed(4))
        assert torch.equal(views[0], images)
        for k, t in enumerate((50, 200)):
            torch.testing.assert_close(views[k + 1], diffaug.diffuse_denoise(den, images, t, member_noise[k]))
    with pytest.raises(InputError, match="unknown sampler"):
        diffaug.diffuse_denoise(den, images, 250, noise, sampler="euler")
    with pytest.raises(InputError, match="t must lie in"):
        diffaug.diffuse_denoise(den, images, 1000, noise)


def test_t_range_in_three_spellings(den, images):
    x = images.repeat(50, 1, 1, 1)
    _, t = DiffAug(den, t_range=(100, 120))(x, generator=torch.Generator().manual_seed(0), return_t=True)
    assert t.min() >= 100 and t.max() <= 120 and len(t.unique()) > 10
    aug = DiffAug(den, fraction_range=(0.0, 0.5))
    assert (aug.t_min, aug.t_max) == (0, 500)
    s_lo, s_hi = den.sigma(50).item(), den.sigma(450).item()
    aug = DiffAug(den, sigma_range=(s_lo, s_hi))
    assert (aug.t_min, aug.t_max) == (50, 450)
    # the same fraction names the same relative point of a 4000-step cosine schedule
    long = tiny_denoiser(num_timesteps=4000, beta_schedule="squaredcos_cap_v2")
    assert DiffAug(long, fraction_range=(0.0, 0.5)).t_max == 2000


def test_empty_batch_returns_empty(den):
    x = torch.rand(0, 1, 8, 8)
    out, t = DiffAug(den)(x, return_t=True)
    assert out.shape == (0, 1, 8, 8) and t.shape == (0,)


def test_no_grad_keeps_no_graph_and_gradients_flow_to_input(den, images):
    aug = DiffAug(den)
    with torch.no_grad():
        out = aug(images.clone().requires_grad_(True))
    assert out.grad_fn is None and not out.requires_grad
    x = images.clone().requires_grad_(True)
    aug = DiffAug(den, t_range=(200, 200), clip=False)
    aug(x, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in den.parameters())


def test_gradcheck_through_diffaug():
    den = tiny_denoiser().double()

    class Float64Aug(nn.Module):  # apply the deterministic step in float64 end to end
        def forward(self, x, t, noise):
            x_t = den.q_sample(den.encode(x), t, noise)
            out = den.net(x_t, t, None)
            a = den.alpha_bar.double()[t].reshape(-1, 1, 1, 1)
            return den.decode(schedule.x0_from_model_output(out, x_t, a, "epsilon"))

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.tensor([100, 600])
    noise = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: Float64Aug()(x, t, noise), (x,), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(den, images, dtype):
    out = DiffAug(den)(images.to(dtype), generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    half = tiny_denoiser().to(torch.bfloat16)
    out = DiffAug(half)(images.to(dtype), generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype and out.float().min() >= 0 and out.float().max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(images):
    den = tiny_denoiser()
    aug = DiffAug(den)
    t, noise = aug.draw(images, torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = aug.apply(images, t, noise)
        aug.cuda()
        gpu = aug.apply(images.cuda(), t.cuda(), noise.cuda())
        out = aug(images.cuda(), generator=torch.Generator(device="cuda").manual_seed(0))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
    assert out.is_cuda


def test_dpm_solver_2_uses_two_evaluations_and_beats_first_order_on_gaussian_data():
    """Gaussian data x0 ~ N(0, s^2 I) has an exact eps(x, t) and an exact probability-flow ODE solution.

    From x_t the ODE reaches x_e = x_t * sqrt((a_e s^2 + 1 - a_e) / (a_t s^2 + 1 - a_t)) (a = alpha_bar).
    """
    s2 = 0.3**2
    calls = []

    class ExactEps(nn.Module):
        def __init__(self, alpha_bar):
            super().__init__()
            self.register_buffer("ab", alpha_bar)

        def forward(self, x, t, y):
            calls.append(1)
            a = self.ab[t].reshape(-1, 1, 1, 1)
            return (1 - a).sqrt() * x / (a * s2 + 1 - a)

    ab = schedule.linear_alpha_bar(1000)
    den = Denoiser(ExactEps(ab), ab, channels=1)
    x_t = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float32)

    def exact(t, e):
        a_t, a_e = ab[t].reshape(-1, 1, 1, 1).double(), ab[e].double()
        return x_t.double() * ((a_e * s2 + 1 - a_e) / (a_t * s2 + 1 - a_t)).sqrt()

    def ddim(t, e):  # first-order: the deterministic DDIM jump
        a_e = ab[e]
        return a_e.sqrt() * den.predict_x0(x_t, t) + (1 - a_e).sqrt() * den.predict_eps(x_t, t)

    def err(x, ref):
        return (x.double() - ref).abs().flatten(1).max(1).values

    t = torch.tensor([50, 150, 300, 600, 999])
    calls.clear()
    dpm = one_step_dpm_solver_2(den, x_t, t)
    assert len(calls) == 2
    ratio = err(dpm, exact(t, 0)) / err(ddim(t, 0), exact(t, 0))
    assert (ratio < 0.9).all() and ratio.mean() < 0.7, ratio  # measured 0.57 0.64 0.61 0.49 0.77
    # a short step shows the higher order: far below the first-order error
    t = torch.full((5,), 300)
    short = one_step_dpm_solver_2(den, x_t, t, t_end=250)
    assert (err(short, exact(t, 250)) < 0.15 * err(ddim(t, 250), exact(t, 250))).all()  # measured ~0.07
    # t at the end point is returned unchanged
    torch.testing.assert_close(one_step_dpm_solver_2(den, x_t, torch.zeros(5, dtype=torch.long)), x_t)


def test_dpm_solver_2_module(den, images):
    out = DiffAug(den, sampler="dpm-solver-2")(images, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1


def test_conditional_diffaug(cond_den, images):
    y = torch.arange(6)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    uncond = DiffAug(cond_den, t_range=(400, 400), clip=False)(images, generator=g())
    cond = DiffAug(cond_den, t_range=(400, 400), cond_weight=1.0, clip=False)(images, y, generator=g())
    mix = DiffAug(cond_den, t_range=(400, 400), cond_weight=0.25, clip=False)(images, y, generator=g())
    torch.testing.assert_close(mix, 0.75 * uncond + 0.25 * cond, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="needs class labels"):
        DiffAug(cond_den, cond_weight=0.5)(images)


def test_module_freezes_denoiser_and_stays_in_eval(den):
    den.train()
    aug = DiffAug(den).train()
    assert not den.training and all(not p.requires_grad for p in den.parameters())
    assert "t_range=(0, 999)" in repr(aug)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler": "euler"}, "unknown sampler 'euler'"),
        ({"t_range": (0, 1000)}, r"0 <= low <= high < T = 1000"),
        ({"t_range": (500, 100)}, "low <= high"),
        ({"t_range": (0.1, 0.5)}, "fraction_range"),
        ({"t_range": (1, 2), "fraction_range": (0, 1)}, "at most one"),
        ({"fraction_range": (0, 2)}, r"\[0, 1\]"),
        ({"cond_weight": 0.5}, "class-conditional denoiser"),
        ({"cond_weight": -1}, "cond_weight"),
    ],
)
def test_constructor_errors(den, kwargs, match):
    with pytest.raises((InputError, ValueError), match=match):
        DiffAug(den, **kwargs)


def test_call_errors(den, images):
    aug = DiffAug(den)
    with pytest.raises(InputError, match="unconditional"):
        aug(images, torch.zeros(6, dtype=torch.long))
    with pytest.raises(InputError, match=r"must lie in \[0, 1\]"):
        aug(images * 3)
    with pytest.raises(InputError, match="diffaug.Denoiser"):
        DiffAug(nn.Identity())


def test_public_api_names():
    for name in ("DiffAug", "Denoiser", "load_denoiser", "InputError"):
        assert hasattr(diffaug, name)
    assert math.isclose(float(diffaug.Denoiser.encode(torch.tensor(0.5))), 0.0)


@pytest.mark.parametrize("convert", [lambda m: m.to(torch.bfloat16), lambda m: m.half()])
def test_module_dtype_conversion_keeps_the_schedule_in_float32(den, images, convert):
    """``aug.to(bf16)`` / ``.half()`` convert the network, not alpha_bar (a bf16 alpha_bar[0] is 1.0 and an fp16
    alpha_bar[-1] is 0.0, which moves every small-t view)."""
    reference = den.alpha_bar.clone()
    aug = DiffAug(tiny_denoiser(), t_range=(20, 20))
    low = convert(aug)
    assert low.denoiser.alpha_bar.dtype == torch.float32 and torch.equal(low.denoiser.alpha_bar, reference)
    assert low.denoiser.dtype in (torch.bfloat16, torch.float16)
    t, noise = aug.draw(images, torch.Generator().manual_seed(0))
    net_only = DiffAug(tiny_denoiser(), t_range=(20, 20))
    net_only.denoiser.net.to(low.denoiser.dtype)  # the README's way: only the network in low precision
    torch.testing.assert_close(low.apply(images, t, noise), net_only.apply(images, t, noise), atol=0, rtol=0)


def test_the_denoiser_is_held_not_a_submodule(den, images):
    """A model holding a DiffAug saves none of the denoiser's weights, gives none to its optimizer, and cannot
    unfreeze them with requires_grad_(True); .to() still moves the denoiser."""

    class Model(nn.Module):
        def __init__(self, aug):
            super().__init__()
            self.aug, self.head = aug, nn.Conv2d(1, 1, 1)

    model = Model(DiffAug(den))
    assert list(model.state_dict()) == ["head.weight", "head.bias"]
    assert len(list(model.parameters())) == 2
    model.requires_grad_(True)
    assert not any(p.requires_grad for p in den.parameters())
    model.double()
    assert den.dtype == torch.float64 and den.alpha_bar.dtype == torch.float32
    model.train()
    assert not den.training
    model.aug.denoiser = tiny_denoiser()  # replaced later: still held, not a submodule
    assert list(model.state_dict()) == ["head.weight", "head.bias"]


def test_validate_false_still_checks_type_shape_size_and_labels(den, cond_den, images):
    aug = DiffAug(den, validate=False)
    with pytest.raises(InputError, match="float tensor"):
        aug((images * 255).to(torch.uint8))
    with pytest.raises(InputError, match="16x16 but the denoiser was built for 8x8"):
        aug(torch.full((2, 1, 16, 16), 0.5))  # error paths: values do not matter, no global RNG drawn
    with pytest.raises(InputError, match="3 channels"):
        aug(torch.full((2, 3, 8, 8), 0.5))
    with pytest.raises(InputError, match="is on meta but the denoiser is on cpu"):
        aug(torch.empty(2, 1, 8, 8, device="meta"))
    far = tiny_denoiser().to("meta")  # a denoiser on an accelerator, say
    far.check_images(images)  # a probe batch may be checked on the host ...
    with pytest.raises(InputError, match="is on cpu but the denoiser is on meta"):
        DiffAug(far)(images)  # ... but the network runs where it is
    aug(images * 3)  # only the values go unchecked (the check that waits for a GPU)
    with pytest.raises(InputError, match=r"class labels must lie in \[0, 10\)"):
        DiffAug(cond_den, cond_weight=1.0)(images, torch.full((6,), 11))  # validate=True checks labels too


def test_a_generator_passed_where_labels_go_is_named(den, cond_den, images):
    for d in (den, cond_den):
        with pytest.raises(InputError, match="generator=g"):
            DiffAug(d)(images, torch.Generator().manual_seed(0))


def test_sigma_range_beyond_the_schedule_is_refused(den):
    top = float(den.sigma(den.num_timesteps - 1))
    assert DiffAug(den, sigma_range=(0.1, top)).t_max == den.num_timesteps - 1
    with pytest.raises(InputError, match="sigma_range must lie within"):
        DiffAug(den, sigma_range=(0.1, 10 * top))
    with pytest.raises(InputError, match="sigma_range must lie within"):
        DiffAug(den, sigma_range=(-1.0, 1.0))
