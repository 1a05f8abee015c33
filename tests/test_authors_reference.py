"""DiffAug, DiffAug-Ensemble and the recipes' losses against the paper authors' own code.

``data/authors_reference.safetensors`` holds outputs (numbers only) of oore-lab/diffaug @ e7df646 (``diffaug.py``'s
``DiffAug.augment`` / ``test_time_augment``, ``eval_scripts/eval_imagenetc.py``'s ``test`` loop, the loss lines of
``training_scripts/diffbase.py`` and ``diffaugmix.py``) running openai/guided-diffusion @ 22e0df8 on CPU in
float32; ``data/make_authors_reference.py`` regenerates it from checkouts. The weights are not stored:
:func:`seeded_state` draws them by parameter name for the 256x256_diffusion_uncond structure shrunk to 16 px
(learned sigma, scale-shift norm, resblock_updown, head channels, linear schedule, T = 1000); the images, t and
noise are drawn here from seeded generators, and the script fed the same draws into the original.

The network is built for 16 px and run on 14-px images (ADM-256 on 224-px crops, as the authors' code does).

Tolerance: x0 multiplies a rounding difference of the network output by sigma_t = sqrt((1 - a) / a) (157 at
t = 999), so each image gets ``EPS_ATOL * (1 + sigma_t)`` on [0, 1]. Measured on an Intel Xeon (AVX-512) with
the original (fixture) and the library each under AVX-512, AVX2 and no-SIMD kernels (ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA) and 1 / 2 threads, every pairing: at most 1.6e-6 at t <= 1, 8.4e-6 at t = 450, 2.8e-4 at
t = 998, i.e. <= 0.16 of the tolerance (>= 6x margin); the network's eps <= 9.3e-6 (atol 1e-4); DE's
probabilities <= 2e-7 (atol 2e-6). A timestep off by one, a missing clip, a missing square root, the variance
half taken as eps, [0, 1] fed to the network, logits averaged instead of softmaxes, other loss weights or a t
range one short each fail it (report.md).
"""

from pathlib import Path

import pytest
import torch

import diffaug
from diffaug.nets.adm import ADMUNet, adm_config
from diffaug.recipes import Recipe

REFERENCE = Path(__file__).parent / "data" / "authors_reference.safetensors"
# model_and_diffusion_defaults() keys: 256x256_diffusion_uncond's structure (orig/diffaug.py MODEL_FLAGS), shrunk
MODEL_FLAGS = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                   num_heads=4, num_head_channels=16, num_heads_upsample=-1, use_scale_shift_norm=True,
                   resblock_updown=True, use_new_attention_order=False, class_cond=False, dropout=0.0,
                   learn_sigma=True, diffusion_steps=1000, noise_schedule="linear")
WEIGHT_SEED, IMAGE_SEED, AUG_SEED, TTA_SEED, DE_SEED, LOSS_SEED = 5, 3, 1000, 2000, 2024, 11
SIZE, N, DE_N = 14, 4, 6
TTA_T = (0, 1, 50, 250, 450, 998, 999)
TIMES = tuple(range(0, 451, 50))  # eval_imagenetc.py's TIMES
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EPS_ATOL = 2e-5


def seeded_state(template: dict, seed: int = WEIGHT_SEED) -> dict:
    """Weights drawn in sorted-name order (GroupNorm gains around 1): the same tensors for any implementation
    with guided-diffusion's parameter names."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(v.shape, generator=g)
            + (1.0 if k.endswith("norm.weight") or ".0.weight" in k and v.ndim == 1 else 0.0)
            for k, v in sorted(template.items())}


def unet_state() -> dict:
    cfg, _ = adm_config(**{k: v for k, v in MODEL_FLAGS.items() if k not in ("diffusion_steps", "noise_schedule")})
    with torch.device("meta"):
        template = ADMUNet(cfg).state_dict()  # names and shapes only
    return seeded_state(template)


def images(n: int, seed: int = IMAGE_SEED) -> torch.Tensor:
    """Smooth images in [0, 1] with some texture."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (0.8 * x + 0.2 * torch.rand(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)


def tiny_cnn() -> torch.nn.Module:
    """A fixed CNN on ImageNet-normalised images (the authors' classifiers take normalised inputs)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10))
    g = torch.Generator().manual_seed(77)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net.eval()


def de_noise() -> torch.Tensor:
    """DE's noise as diffaug_ensemble draws it: one randn over the noisy members, member-major."""
    return torch.randn((len(TIMES) - 1) * DE_N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(DE_SEED))


def loss_logits():
    g = torch.Generator().manual_seed(LOSS_SEED)
    return torch.tensor([1, 4, 9, 0]), torch.randn(8, 10, generator=g), torch.randn(16, 10, generator=g)


@pytest.fixture(scope="module")
def ref():
    assert REFERENCE.is_file(), f"{REFERENCE} missing (tests/data/make_authors_reference.py writes it)"
    from safetensors import safe_open
    with safe_open(str(REFERENCE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def den(tmp_path_factory):
    path = tmp_path_factory.mktemp("adm") / "model.pt"
    torch.save(unet_state(), path)
    return diffaug.Denoiser.from_guided_diffusion(path, **MODEL_FLAGS).at_size(SIZE)


def assert_x0_close(actual, expected, den, t):
    """Per image: |diff| <= EPS_ATOL * (1 + sigma_t) on [0, 1] (see the module docstring)."""
    t = torch.as_tensor(t).reshape(-1).expand(actual.shape[0])
    tol = EPS_ATOL * (1 + den.sigma(t).double())
    err = (actual.double() - expected.double()).abs().flatten(1).amax(1)
    assert actual.shape == expected.shape
    assert bool((err <= tol).all()), f"differs by {err.tolist()} at t={t.tolist()} (tolerance {tol.tolist()})"


def test_network_output_equals_the_originals(den, ref):
    x = torch.linspace(-1, 1, 2 * 3 * SIZE * SIZE).reshape(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = den.model_output(x, torch.tensor([10, 900]))  # the eps half of the learned-sigma output
    torch.testing.assert_close(out, ref["check.eps"], atol=1e-4, rtol=0)  # measured <= 9.3e-6


def test_diffaug_draws_t_and_denoises_as_the_authors_augment(den, ref):
    """DiffAug(den)(x): t ~ U{0..999} per image, x_t, the clipped x0 estimate, back to [0, 1]. The original drew
    t and its noise from the same generator in the same order (randint, then randn), so the draws coincide."""
    x = images(N)
    with torch.no_grad():
        out, t = diffaug.DiffAug(den)(x, generator=torch.Generator().manual_seed(AUG_SEED), return_t=True)
    assert t.tolist() == ref["augment.t"].tolist()
    assert_x0_close(out, ref["augment.out"], den, t)


@pytest.mark.parametrize("t", TTA_T)
def test_diffuse_denoise_equals_the_authors_test_time_augment(den, ref, t):
    x = images(N)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(TTA_SEED + t))
    with torch.no_grad():
        out = diffaug.diffuse_denoise(den, x, t, noise)
    assert_x0_close(out, ref[f"tta.t{t}"], den, t)


def test_diffaug_ensemble_equals_the_authors_de(den, ref):
    """eval_imagenetc.py: softmax of the classifier at t = 0 (the image) and on one-step views at t = 50..450,
    one noise draw each, averaged over the 10 members."""
    net = tiny_cnn()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    clf = lambda x: net((x - mean) / std)  # noqa: E731  (the library's classifiers take [0, 1] images)
    x = images(DE_N, seed=IMAGE_SEED + 100)
    with torch.no_grad():
        probs = diffaug.diffaug_ensemble(clf, den, x, generator=torch.Generator().manual_seed(DE_SEED))
        assert diffaug.ensemble.DEFAULT_MEMBERS == TIMES
        noise = de_noise().reshape(len(TIMES) - 1, DE_N, 3, SIZE, SIZE)
        per_t = torch.stack([clf(x if t == 0 else diffaug.diffuse_denoise(den, x, t, noise[k - 1]))
                             for k, t in enumerate(TIMES)])
    torch.testing.assert_close(per_t, ref["de.logits_per_t"], atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(probs, ref["de.probs"], atol=2e-6, rtol=0)


class _FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        assert x.shape[0] == self.logits.shape[0]
        return self.logits


@pytest.mark.parametrize("augmix", [False, True], ids=["diffbase", "diffaugmix"])
def test_recipe_losses_equal_the_authors(ref, augmix):
    """diffbase.py: CE(clean) + CE(DiffAug); diffaugmix.py: CE(clean) + CE(DiffAug) + 12 JSD(clean, aug1, aug2),
    one forward over [clean; aug1; aug2; DiffAug]. The library's default weights; views stubbed."""
    y, plain, augmixed = loss_logits()
    recipe = Recipe(_FixedLogits(augmixed if augmix else plain), augmix=augmix, diffaug=lambda x, generator=None: x)
    if augmix:
        recipe.augmix_views = lambda x, generator: (x, x)
    loss, _ = recipe(torch.zeros(y.shape[0], 3, 4, 4), y)
    # float32 sums of a few dozen log-softmax terms: ~1e-6 apart across CPUs (9.5e-7 measured); a 1 % change
    # of a loss weight moves the loss by > 1e-2
    torch.testing.assert_close(loss.reshape(1), ref["loss.diffaugmix" if augmix else "loss.diffbase"],
                               atol=1e-4, rtol=1e-5)
