"""Tiny seeded models shared by the tests (a few thousand parameters, milliseconds per call)."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a hub

# the property tests draw the same examples every run (seeded, as every other test): a CI run cannot fail on an
# example no earlier run saw; widen the search locally with HYPOTHESIS_PROFILE=explore
from hypothesis import settings  # noqa: E402

settings.register_profile("seeded", derandomize=True, database=None)
settings.register_profile("explore", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "seeded"))
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed_global_rng_per_test(request):
    """Tests that draw from the global RNG (``torch.randn(...)`` without a generator) get the same numbers every
    run, whichever xdist worker runs them and in whatever order (the library itself never uses the global RNG)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def assert_x0_close(actual, expected, den, t, *, eps_atol: float = 1e-5) -> None:
    """x0 estimates agree up to kernel-order rounding of the network output, at the scale x0 amplifies it.

    ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)`` multiplies a rounding error ``d`` of the network's output by
    ``sqrt((1 - a) / a)`` (157 at t = 990 of a linear schedule), so two runs whose kernels sum in another order
    (batch size, thread count, CPU's vector width, memory layout, compiled code) differ by about that factor
    times ``d``. Each sample gets ``eps_atol * (1 + sigma_t)``; ``d`` itself is ~1e-6 for the tiny test nets.
    """
    t = torch.as_tensor(t).reshape(-1).expand(actual.shape[0]).to(den.alpha_bar.device)
    a = den.alpha_bar[t].double().cpu()
    tol = eps_atol * (1 + ((1 - a) / a).sqrt())
    err = (actual.double().cpu() - expected.double().cpu()).abs().flatten(1).amax(1)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert bool((err <= tol).all()), f"x0 differs by {err.tolist()} at t={t.tolist()} (tolerance {tol.tolist()})"


def tiny_unet(*, channels=1, size=8, num_class_embeds=None, learned_variance=False, seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)  # tests only: diffusers initialises from the global RNG
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels * (2 if learned_variance else 1),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    ).eval()


def write_rgb_denoiser(folder, size: int = 16):
    """Save a tiny RGB diffusers denoiser built for ``size`` px (two levels: it takes any even size) to ``folder``;
    returns ``folder``."""
    from diffusers import DDPMScheduler

    import diffaug

    diffaug.Denoiser.from_diffusers(tiny_unet(channels=3, size=size), DDPMScheduler(num_train_timesteps=1000)
                                    ).save_pretrained(folder)
    return folder


def tiny_denoiser(prediction_type="epsilon", *, conditional=False, learned_variance=False, channels=1,
                  num_timesteps=1000, beta_schedule="linear", seed=0):
    from diffusers import DDPMScheduler

    import diffaug

    unet = tiny_unet(channels=channels, num_class_embeds=11 if conditional else None,
                     learned_variance=learned_variance, seed=seed)
    sched = DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule=beta_schedule,
                          prediction_type=prediction_type)
    kwargs = {"num_classes": 10, "null_class": 10} if conditional else {}
    return diffaug.Denoiser.from_diffusers(unet, sched, **kwargs)


@pytest.fixture
def den():
    return tiny_denoiser()


@pytest.fixture
def cond_den():
    return tiny_denoiser(conditional=True)


@pytest.fixture(scope="module")
def den_dir(tmp_path_factory):
    """A tiny class-conditional denoiser saved as a folder."""
    path = tmp_path_factory.mktemp("den") / "d"
    tiny_denoiser(conditional=True).save_pretrained(path)
    return path


@pytest.fixture
def images():
    return torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def killed_after_first_checkpoint(monkeypatch, run) -> None:
    """Call ``run()`` and kill it (KeyboardInterrupt) right after it writes its first checkpoint."""
    from diffaug.utils import checkpoint

    original = checkpoint.save_safetensors

    def save_then_crash(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_safetensors", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(checkpoint, "save_safetensors", original)


def write_imagenet_c(root, severities=(1, 5), classes=("a", "b"), per_class=2, rgb=False, class_step=0):
    """An ImageNet-C style tree ``root/fog/<severity>/<class>/<i>.png`` of flat 8x8 images whose value is
    ``30 i + severity + class_step * class_index`` (so conditions and classes can be told apart)."""
    import numpy as np
    from PIL import Image

    for sev in severities:
        for k, cls in enumerate(classes):
            d = root / "fog" / str(sev) / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                shape = (8, 8, 3) if rgb else (8, 8)
                Image.fromarray(np.full(shape, 30 * i + sev + class_step * k, np.uint8)).save(d / f"{i}.png")
    return root
