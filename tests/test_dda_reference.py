"""DDA (diffaug.dda.dda_adapt) against numbers computed by the authors' code (shiyegao/DDA, image_adapt/).

``data/dda_reference.safetensors`` holds outputs of DDA's ``p_sample_loop_progressive`` (guided ancestral
sampling, gaussian_diffusion.py) run in float64 on a tiny ADM network with the weights and images below; it was
written by ``data/make_dda_reference.py`` (needs a DDA checkout; the tests do not). The settings are those in which
dda_adapt is meant to equal DDA's code (module docstring of diffaug.dda):

* ``norm="batch"`` (DDA's one norm over the batch) and ``guidance_scale = s / sqrt(C H W / (3 * 256 * 256))`` for
  DDA's ``--scale s``;
* DDA's SpacedDiffusion keeps the times dda_adapt calls the model at (t_start, ..., t_start / steps), and the
  image handed to its loop is noised to t_start (DDA's own script noises to one respaced step above its first
  model call: the deliberate timestep difference);
* the variance half of the network's output is pinned to v = -1, so DDA's learned-range variance equals the
  posterior ("fixed small") variance dda_adapt uses.

``out_library_filter`` was computed with DDA's low-pass phi_D (resize_right down and up) replaced by the torch
calls of diffaug.dda.low_pass, so it checks everything but the filter; ``out_resize_right`` is DDA's code
unchanged, compared with dda_adapt using a test-side reimplementation of resize_right's phi_D (checked against
``phi_resize_right``). The library is float32 throughout; the reference is float64. Every x0 estimate of the
reference runs stays at least ``min_clip_margin`` (metadata) away from the clipping bounds +-1, so rounding cannot
switch a pixel between clipped and unclipped (which changes the guidance gradient by a finite amount).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import diffaug
import diffaug.dda as dda
from diffaug.nets.adm import ADMUNet, adm_config

FIXTURE = Path(__file__).parent / "data" / "dda_reference.safetensors"

PRESET = "256x256_diffusion_uncond"  # DDA's network: learn_sigma, resblock_updown, scale-shift norm
FLAGS = {"image_size": 16, "num_channels": 32, "channel_mult": (1, 1, 2), "attention_resolutions": (16, 8),
         "num_head_channels": 16, "dropout": 0.0}
CASE = {"n": 2, "t_start": 200, "steps": 5, "D": 4, "dda_scale": 0.75, "seed": 8, "weight_seed": 0}
ATOL = 1e-4  # outputs in [0, 1]; float32 vs float64 differ by ~1e-6 here (see the module docstring)
MIN_CLIP_MARGIN = 1e-4  # x0 rounding errors are ~1e-6: no pixel can change sides of +-1


def reference_state(seed: int) -> dict[str, torch.Tensor]:
    """Weights drawn in sorted-name order (independent of how either implementation initialises); norm scales
    around 1; the variance half of the output convolution gives v = -1 exactly."""
    cfg, _ = adm_config(PRESET, **FLAGS)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ADMUNet(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {k: 0.05 * torch.randn(s, generator=g) + (1.0 if len(s) == 1 and k.endswith(("norm.weight", "0.weight"))
                                                      else 0.0)
             for k, s in sorted(shapes.items())}
    state["out.2.weight"][3:] = 0
    state["out.2.bias"][3:] = -1
    return state


def reference_images(n: int, size: int) -> torch.Tensor:
    """Smooth colour patterns in [0.1, 0.9], from a formula (no RNG)."""
    u = torch.linspace(0, 1, size).view(1, 1, -1, 1)
    v = torch.linspace(0, 1, size).view(1, 1, 1, -1)
    i = torch.arange(n).view(-1, 1, 1, 1).float()
    c = torch.arange(3).view(1, -1, 1, 1).float()
    return 0.5 + 0.4 * torch.sin(6.0 * (1 + c) * u * (1 + 0.3 * i) + 4.0 * v * (2 - c) + 1.3 * i + c)


def guidance_scale(case: dict) -> float:
    return case["dda_scale"] / ((3 * FLAGS["image_size"] ** 2) / dda.REFERENCE_DIM) ** 0.5


def resize_right_phi(x: torch.Tensor, factor: int) -> torch.Tensor:
    """DDA's phi_D: resize_right (Shocher et al.) down by ``factor`` and back up, written as two separable
    matrices: Keys cubic kernel a = -0.5, stretched by the scale when down-sampling (anti-aliasing), weights
    normalised over the whole window, zero padding outside the image (resize_right's defaults)."""
    h, w = x.shape[-2:]
    mh = _resize_matrix(h // factor, h, x.dtype) @ _resize_matrix(h, h // factor, x.dtype)
    mw = _resize_matrix(w // factor, w, x.dtype) @ _resize_matrix(w, w // factor, x.dtype)
    return torch.einsum("ij,ncjk,lk->ncil", mh, x, mw)


def _resize_matrix(n_in: int, n_out: int, dtype) -> torch.Tensor:
    """``[n_out, n_in]``: resize_right along one axis (see :func:`resize_right_phi`)."""
    scale = n_out / n_in

    def cubic(d):
        a = d.abs()
        return (1.5 * a**3 - 2.5 * a**2 + 1) * (a <= 1) + (-0.5 * a**3 + 2.5 * a**2 - 4 * a + 2) * ((a > 1) & (a <= 2))
    kernel, support = (cubic, 4.0) if scale >= 1 else ((lambda d: scale * cubic(scale * d)), 4.0 / scale)
    grid = torch.arange(n_out, dtype=torch.float64) / scale + (n_in - 1) / 2 - (n_out - 1) / (2 * scale)
    eps = torch.finfo(torch.float32).eps
    taps = torch.ceil(grid - support / 2 - eps)[:, None] + torch.arange(int(torch.tensor(support - eps).ceil()))
    weights = kernel(grid[:, None] - taps)
    weights = weights / weights.sum(1, keepdim=True)
    inside = (taps >= 0) & (taps < n_in)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)[:, None].expand_as(taps)
    m.index_put_((rows[inside], taps[inside].long()), weights[inside], accumulate=True)
    return m.to(dtype)


@pytest.fixture(scope="module")
def ref():
    with safe_open(FIXTURE, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["settings"])


@pytest.fixture(scope="module")
def den(tmp_path_factory):
    path = tmp_path_factory.mktemp("dda") / "model.pt"
    torch.save(reference_state(CASE["weight_seed"]), path)
    return diffaug.Denoiser.from_guided_diffusion(path, PRESET, **FLAGS)


def _adapt(den, scale: float, **kw) -> torch.Tensor:
    x = reference_images(CASE["n"], FLAGS["image_size"])
    return dda.dda_adapt(den, x, t_start=CASE["t_start"], steps=CASE["steps"], guidance_scale=scale,
                         downsample=CASE["D"], norm="batch", generator=torch.Generator().manual_seed(CASE["seed"]),
                         **kw).double()


def test_fixture_matches_this_file(ref):
    tensors, settings = ref
    assert {k: settings[k] for k in CASE} == CASE and settings["flags"] == json.loads(json.dumps(FLAGS))
    assert settings["min_clip_margin"] >= MIN_CLIP_MARGIN and settings["times"] == dda.dda_timesteps(
        CASE["t_start"], CASE["steps"])
    # torch's CPU normal stream is what both runs share; a change there is not a DDA bug
    shape = (CASE["n"], 3, FLAGS["image_size"], FLAGS["image_size"])
    head = torch.randn(shape, generator=torch.Generator().manual_seed(CASE["seed"])).flatten()[:8].double()
    assert torch.equal(head, tensors["noise_head"]), "torch.randn's stream changed: rerun make_dda_reference.py"
    # the guidance moves the reference output far more than the tolerance: the comparisons below can see it
    assert (tensors["out_library_filter"].double() - tensors["out_free"].double()).abs().max() > 100 * ATOL


def test_without_guidance_dda_adapt_equals_ddas_loop(den, ref):
    torch.testing.assert_close(_adapt(den, 0.0), ref[0]["out_free"].double(), atol=ATOL, rtol=0)


def test_guided_dda_adapt_equals_ddas_loop_with_the_same_filter(den, ref):
    """Sign and size of the guidance step, the clipped x0 it differentiates, the gradient w.r.t. x_t through
    the network, the batch norm, the ancestral variance and the timesteps, all at once."""
    torch.testing.assert_close(_adapt(den, guidance_scale(CASE)), ref[0]["out_library_filter"].double(), atol=ATOL,
                               rtol=0)


def test_resize_right_phi_helper_equals_resize_right(ref):
    tensors, _ = ref
    for d in (2, 4):
        torch.testing.assert_close(resize_right_phi(tensors["phi_in"], d), tensors[f"phi_resize_right_{d}"],
                                   atol=1e-12, rtol=0)


def test_guided_dda_adapt_with_ddas_filter_equals_ddas_code_unchanged(den, ref, monkeypatch):
    monkeypatch.setattr(dda, "low_pass", resize_right_phi)
    torch.testing.assert_close(_adapt(den, guidance_scale(CASE)), ref[0]["out_resize_right"].double(), atol=ATOL,
                               rtol=0)


def test_low_pass_is_resize_right_away_from_the_borders_and_keeps_constants_at_them():
    """The one deliberate difference from DDA's filter: resize_right pads with zeros, so phi_D darkens the border
    pixels (a constant 0.5 drops to 0.18 at a 16-px corner, and at 16 px with D = 4 no pixel is out of the
    borders' reach); low_pass renormalises there and keeps constants. Away from the borders the two are equal
    (checked on a 64-px image against resize_right_phi, itself checked against resize_right above)."""
    x = torch.rand(1, 2, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for d in (2, 4):
        inner = slice(4 * d, -4 * d)  # beyond the reach of the down-sampling kernel (2 D) plus the up-sampling one
        ours, theirs = dda.low_pass(x, d), resize_right_phi(x, d)
        torch.testing.assert_close(ours[..., inner, inner], theirs[..., inner, inner], atol=1e-9, rtol=0)
        assert (ours - theirs).abs().max() > 1e-2  # the borders differ
    flat = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    torch.testing.assert_close(dda.low_pass(flat, 4), flat)
    assert resize_right_phi(flat, 4).min() < 0.2
