"""Classifier-guided sampling against guided-diffusion's own sampler (Dhariwal & Nichol 2021).

``data/guided_reference.safetensors`` holds images sampled by openai/guided-diffusion's ``p_sample_loop`` /
``ddim_sample_loop`` with ``scripts/classifier_sample.py``'s ``cond_fn`` (outputs only;
``data/make_guided_reference.py`` regenerates it from a checkout). The weights are not stored:
:func:`seeded_state` draws them by parameter name,
the script loads them into OpenAI's ``UNetModel`` / ``EncoderUNetModel`` and this test into diffaug's ADM networks
through ``from_guided_diffusion``. The noise is one seeded generator drawn in diffaug's order (x_T, then one draw
per DDPM step), which the script reproduces inside the original sampler.

Compared where both mean the same sampler: DDPM with the posterior ("fixed small") variance
(``create_gaussian_diffusion(sigma_small=True)``), DDPM with a learned variance (``learn_sigma=True``, as OpenAI's
checkpoints; ``guided_sample(variance="learned")``, measured 2.7e-5 here, so its tolerance is 5e-4: a 1 % error
in the guidance scale still moves it by 2e-2), plain respacing ``"N"`` (the same timesteps as
``sampling_timesteps(1000, N)`` for N = 10, 25), DDIM eta 0. Both run in float32. Measured on an Intel Xeon with
AVX-512, AVX2 and no-SIMD kernels (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) and 1 or 2 threads: DDPM agrees to
<= 9e-6 on [0, 1] images, DDIM to <= 1.8e-4 (deterministic DDIM carries a float32 rounding of x_T, 1e-7, to
~1e-4 in single pixels; the DDPM noise draws damp it). The tolerances leave 10x: DDPM's 1e-4 still sees a 1 %
error in the guidance scale (guidance moves these samples by ~2e-2).
"""

import json
from pathlib import Path

import pytest
import torch

import diffaug
from diffaug.guidance import guided_sample
from diffaug.nets.adm import ADMClassifier, ADMUNet, adm_classifier_config, adm_config
from diffaug.sampling import sampling_timesteps

REFERENCE = Path(__file__).parent / "data" / "guided_reference.safetensors"
ATOL = {"ddpm": 1e-4, "ddpm_learned": 5e-4, "ddim": 2e-3}  # max |diff| on [0, 1] images; see the module docstring

# guided-diffusion flags (model_and_diffusion_defaults() keys): 256x256_diffusion_uncond's structure, shrunk
MODEL_FLAGS = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                   num_heads=4, num_head_channels=32, num_heads_upsample=-1, use_scale_shift_norm=True,
                   resblock_updown=True, use_new_attention_order=False, class_cond=False, dropout=0.0,
                   diffusion_steps=1000, noise_schedule="linear")
# classifier_defaults() keys, shrunk (channel_mult: create_classifier fixes it for 64..512 px only)
CLASSIFIER_FLAGS = dict(image_size=16, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="8",
                        classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                        classifier_pool="attention", channel_mult="1,2", num_head_channels=64, num_classes=1000)
Y = [3, 871]
SEED = 123
SCALE = 10.0
# name: (sampler, steps, learn_sigma of the checkpoint, scale)
CASES = {"ddpm25": ("ddpm", 25, False, SCALE), "ddpm10": ("ddpm", 10, False, SCALE),
         "ddim10_unguided": ("ddim", 10, True, 0.0), "ddim10": ("ddim", 10, True, SCALE),
         "ddpm10_learned": ("ddpm", 10, True, SCALE)}  # learned variance: guided_sample(variance="learned")


def seeded_state(net: torch.nn.Module, seed: int) -> dict:
    """Weights drawn from a generator in sorted-name order (GroupNorm gains around 1): the same tensors for any
    implementation with these parameter names, whatever its initialisation."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(v.shape, generator=g)
            + (1.0 if k.endswith("norm.weight") or ".0.weight" in k and v.ndim == 1 else 0.0)
            for k, v in sorted(net.state_dict().items())}


def states(learn_sigma: bool) -> tuple[dict, dict]:
    """(denoiser state, classifier state) in guided-diffusion's key names."""
    cfg, _ = adm_config(**{k: v for k, v in MODEL_FLAGS.items() if k not in ("diffusion_steps", "noise_schedule")},
                        learn_sigma=learn_sigma)
    ccfg, pool, _ = adm_classifier_config(**CLASSIFIER_FLAGS)
    with torch.device("meta"):
        unet, clf = ADMUNet(cfg), ADMClassifier(ccfg, pool)
    return seeded_state(unet, 10 + learn_sigma), seeded_state(clf, 20)


def _reference():
    assert REFERENCE.is_file(), f"{REFERENCE} missing (tests/data/make_guided_reference.py writes it)"
    from safetensors import safe_open
    with safe_open(str(REFERENCE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["settings"])


def _models(tmp_path, learn_sigma):
    model, clf = states(learn_sigma)
    torch.save(model, tmp_path / "model.pt")
    torch.save(clf, tmp_path / "classifier.pt")
    den = diffaug.Denoiser.from_guided_diffusion(tmp_path / "model.pt", **MODEL_FLAGS, learn_sigma=learn_sigma)
    guide = diffaug.GuidanceClassifier.from_guided_diffusion(
        tmp_path / "classifier.pt", den, noise_schedule="linear", diffusion_steps=1000, **CLASSIFIER_FLAGS)
    return den, guide


@pytest.mark.parametrize("name", list(CASES))
def test_guided_sample_equals_guided_diffusion(tmp_path, name):
    ref, settings = _reference()
    sampler, steps, learn_sigma, scale = CASES[name]
    assert settings[name]["timesteps"] == sampling_timesteps(1000, steps)  # the original visited the same t
    den, guide = _models(tmp_path, learn_sigma)
    with torch.no_grad():  # the fixture's inputs: the networks are the ones the script ran
        x = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
        t = torch.tensor([0, 999])
        torch.testing.assert_close(den.model_output(x, t), ref[f"check.eps_sigma{int(learn_sigma)}"], atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(guide.net(x, t), ref["check.logits"], atol=1e-5, rtol=1e-5)
    variance = "learned" if learn_sigma and sampler == "ddpm" else "posterior"
    out = guided_sample(den, guide, torch.tensor(Y), steps=steps, scale=scale, sampler=sampler, variance=variance,
                        generator=torch.Generator().manual_seed(SEED))
    atol = ATOL["ddpm_learned" if variance == "learned" else sampler]
    if scale:  # the fixture only tells a wrong scale or sign apart if guidance moved the samples far beyond atol
        assert (ref[name] - ref[f"{name}.unguided"]).abs().max() > 10 * atol
    torch.testing.assert_close(out, ref[name], atol=atol, rtol=0)
