"""The ADM UNet and guided-/improved-diffusion checkpoints (random weights: no checkpoint is fetched)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import diffaug
from diffaug import InputError
from diffaug.nets.adm import (CLASSIFIER_PRESETS, PRESETS, ADMClassifier, ADMConfig, ADMUNet, AttentionBlock, adm_classifier_config,
                             adm_config)

REFERENCE_FILE = Path(__file__).parent / "data" / "adm_reference.json"


def _small(name: str) -> dict:
    """Flags that shrink a preset for a CPU test but keep its structure (attention orders, updown, sigma)."""
    full = PRESETS[name].config
    small = {"num_channels": 32, "dropout": 0.0, "num_classes": 10}
    if full.num_head_channels > 0:
        small["num_head_channels"] = 16
    if full.image_size > 32:
        small.update(image_size=16, channel_mult=full.resolved_channel_mult()[:3], attention_resolutions=(16, 8))
    return small


def _randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the zero-initialised output convs would hide every mismatch
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_round_trips_through_a_pt_state_dict(tmp_path, name):
    flags = _small(name)
    cfg, preset = adm_config(name, **flags)
    net = _randomised(ADMUNet(cfg))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    rng = torch.get_rng_state()
    den = diffaug.Denoiser.from_guided_diffusion(tmp_path / "model.pt", name, **flags)
    assert torch.equal(torch.get_rng_state(), rng)  # loading leaves the caller's global RNG alone
    assert den.num_timesteps == preset.diffusion_steps and den.channels == 3
    assert den.is_conditional == cfg.class_cond
    s = cfg.image_size
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([5, preset.diffusion_steps - 1])
    y = torch.tensor([1, 7]) if cfg.class_cond else None
    with torch.no_grad():
        out = net(x, t.float() * den.net.time_scale, y)
        assert out.shape == (2, 6 if cfg.learn_sigma else 3, s, s)
        torch.testing.assert_close(den.model_output(x, t, y), out[:, :3], rtol=0, atol=0)
        x0 = den.predict_x0(x, t, y)
    assert torch.isfinite(x0).all()
    expected_scale = 1000 / preset.diffusion_steps if preset.rescale_timesteps else 1.0
    assert den.net.time_scale == expected_scale


def _resblock(cin, cout, emb, scale_shift):
    return (2 * cin + cin * cout * 9 + cout + emb * cout * (2 if scale_shift else 1) + cout * (2 if scale_shift else 1)
            + 2 * cout + cout * cout * 9 + cout + (cin * cout + cout if cin != cout else 0))


def _attention(c):
    return 2 * c + c * 3 * c + 3 * c + c * c + c


def _expected_params(cfg) -> int:
    """An independent count from the flags (the published architecture, block by block)."""
    mc, emb = cfg.num_channels, 4 * cfg.num_channels
    mult = cfg.resolved_channel_mult()
    att = {cfg.image_size // r for r in cfg.attention_resolutions}
    n = mc * emb + emb + emb * emb + emb + (cfg.num_classes * emb if cfg.class_cond else 0)
    ch = int(mult[0] * mc)
    n += cfg.in_channels * ch * 9 + ch
    skips, ds = [ch], 1
    for level, m in enumerate(mult):
        for _ in range(cfg.num_res_blocks):
            n += _resblock(ch, int(m * mc), emb, cfg.use_scale_shift_norm)
            ch = int(m * mc)
            n += _attention(ch) if ds in att else 0
            skips.append(ch)
        if level < len(mult) - 1:
            n += _resblock(ch, ch, emb, cfg.use_scale_shift_norm) if cfg.resblock_updown else ch * ch * 9 + ch
            skips.append(ch)
            ds *= 2
    n += 2 * _resblock(ch, ch, emb, cfg.use_scale_shift_norm) + _attention(ch)
    for level, m in reversed(list(enumerate(mult))):
        for i in range(cfg.num_res_blocks + 1):
            n += _resblock(ch + skips.pop(), int(m * mc), emb, cfg.use_scale_shift_norm)
            ch = int(m * mc)
            n += _attention(ch) if ds in att else 0
            if level and i == cfg.num_res_blocks:
                n += _resblock(ch, ch, emb, cfg.use_scale_shift_norm) if cfg.resblock_updown else ch * ch * 9 + ch
                ds //= 2
    return n + 2 * ch + ch * cfg.out_channels * 9 + cfg.out_channels


@pytest.mark.parametrize("name", list(PRESETS))
def test_full_size_parameter_counts_match_the_architecture(name):
    cfg = PRESETS[name].config
    with torch.device("meta"):  # no memory: shapes only
        net = ADMUNet(cfg)
    assert sum(p.numel() for p in net.parameters()) == _expected_params(cfg)


def test_the_papers_model_is_the_published_size():
    with torch.device("meta"):
        net = ADMUNet(PRESETS["256x256_diffusion_uncond"].config)
    n = sum(p.numel() for p in net.parameters())
    assert 550e6 < n < 556e6  # guided-diffusion's ImageNet 256 unconditional model: ~554 M parameters
    assert net.out[-1].out_channels == 6  # eps and the variance interpolation


def test_attention_equals_softmax_reference_in_both_head_orders():
    torch.manual_seed(0)
    c, heads, length = 64, 4, 20
    x = torch.randn(2, c, 4, 5)
    for new_order in (False, True):
        block = _randomised(AttentionBlock(c, heads, -1, new_order))
        qkv = block.qkv(block.norm(x.reshape(2, c, -1)))
        if new_order:
            q, k, v = (z.reshape(2 * heads, c // heads, length) for z in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(2 * heads, 3 * c // heads, length).split(c // heads, dim=1)
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / (c // heads) ** 0.5, dim=-1)
        ref = x.reshape(2, c, -1) + block.proj_out(torch.einsum("bts,bcs->bct", w, v).reshape(2, c, length))
        torch.testing.assert_close(block(x), ref.reshape(x.shape), atol=1e-5, rtol=1e-5)
    one_a, one_b = AttentionBlock(c, 1, -1, False), AttentionBlock(c, 1, -1, True)
    one_b.load_state_dict(_randomised(one_a).state_dict())
    torch.testing.assert_close(one_a(x), one_b.eval()(x))  # with one head the orders coincide


def test_schedules_match_diffusers():
    from diffusers import DDPMScheduler

    from diffaug.schedule import linear_alpha_bar

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod
    torch.testing.assert_close(linear_alpha_bar(1000), ref.float(), atol=1e-6, rtol=1e-5)


def test_diffaug_runs_on_an_adm_denoiser(tmp_path):
    flags = _small("256x256_diffusion_uncond")
    net = _randomised(ADMUNet(adm_config("256x256_diffusion_uncond", **flags)[0]))
    torch.save(net.state_dict(), tmp_path / "m.pt")
    den = diffaug.Denoiser.from_guided_diffusion(tmp_path / "m.pt", "256x256_diffusion_uncond", **flags)
    x = torch.rand(3, 3, 16, 16)
    out = diffaug.DiffAug(den)(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1


def test_wrong_flags_and_bad_files_name_the_problem(tmp_path):
    flags = _small("cifar10_uncond_50M_500K")
    cfg, _ = adm_config("cifar10_uncond_50M_500K", **flags)
    torch.save(ADMUNet(cfg).state_dict(), tmp_path / "m.pt")
    load = diffaug.Denoiser.from_guided_diffusion
    with pytest.raises(InputError, match="set learn_sigma=True"):
        load(tmp_path / "m.pt", "cifar10_uncond_50M_500K", **{**flags, "learn_sigma": False})
    with pytest.raises(InputError, match="set class_cond=False"):
        load(tmp_path / "m.pt", "cifar10_uncond_50M_500K", **{**flags, "class_cond": True})
    with pytest.raises(InputError, match=r"has shape .* the flags give"):
        load(tmp_path / "m.pt", "cifar10_uncond_50M_500K", **{**flags, "num_channels": 64})
    with pytest.raises(InputError, match="unknown ADM preset"):
        load(tmp_path / "m.pt", "imagenet_512")
    with pytest.raises(InputError, match="unknown ADM flag"):
        load(tmp_path / "m.pt", num_chanels=3)
    with pytest.raises(InputError, match="does not exist"):
        load(tmp_path / "none.pt", "cifar10_uncond_50M_500K")
    blob = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="not a plain state dict: not a readable PyTorch file"):
        load(tmp_path / "cut.pt", "cifar10_uncond_50M_500K", **flags)
    marker = tmp_path / "RAN"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"input_blocks.0.0.weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="not unpickled"):
        load(tmp_path / "evil.pt", "cifar10_uncond_50M_500K", **flags)
    assert not marker.exists()


def test_comma_string_flags_as_in_the_original_scripts():
    cfg, _ = adm_config(None, image_size=32, attention_resolutions="16,8", channel_mult="1,2,2")
    assert cfg.attention_resolutions == (16, 8) and cfg.channel_mult == (1.0, 2.0, 2.0)
    assert dataclasses.asdict(cfg)["num_res_blocks"] == 2


# ---------------------------------------------------------------------- against OpenAI's own code
def seeded_state(net: torch.nn.Module, seed: int) -> dict:
    """Weights drawn from a generator in sorted-name order: the same tensors for any implementation with these
    parameter names (no dependence on how either one initialises)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(v.shape, generator=g) + (1.0 if k.endswith("norm.weight") or ".0.weight" in k
                                                             and v.ndim == 1 else 0.0)
            for k, v in sorted(net.state_dict().items())}


def _small_classifier(name: str) -> dict:
    mult = (1, 1, 2) if CLASSIFIER_PRESETS[name].image_size >= 128 else (1, 2, 3)
    return {"image_size": 16, "classifier_width": 32, "num_head_channels": 16, "channel_mult": mult,
            "classifier_attention_resolutions": "16,8", "num_classes": 10}


def reference_cases() -> list[dict]:
    """Every UNet preset and classifier preset at reduced width, with seeded weights and fixed inputs."""
    cases = []
    for i, name in enumerate(PRESETS):
        cfg, preset = adm_config(name, **_small(name))
        scale = 1000 / preset.diffusion_steps if preset.rescale_timesteps else 1.0
        cases.append({"name": name, "kind": "improved" if preset.rescale_timesteps else "guided", "config": cfg,
                      "net": ADMUNet(cfg, time_scale=scale), "time_scale": scale,
                      "t": torch.tensor([5, preset.diffusion_steps - 1]),
                      "y": torch.tensor([1, 7]) if cfg.class_cond else None, "seed": 100 + i})
    for i, name in enumerate(CLASSIFIER_PRESETS):
        cfg, pool, _ = adm_classifier_config(name, **_small_classifier(name))
        cases.append({"name": name, "kind": "classifier", "config": cfg, "pool": pool, "net": ADMClassifier(cfg, pool),
                      "time_scale": 1.0, "t": torch.tensor([5, 999]), "y": None, "seed": 200 + i})
    cfg, pool, _ = adm_classifier_config("256x256_classifier", **_small_classifier("256x256_classifier"),
                                         classifier_pool="adaptive")
    cases.append({"name": "256x256_classifier/adaptive", "kind": "classifier", "config": cfg, "pool": pool,
                  "net": ADMClassifier(cfg, pool), "time_scale": 1.0, "t": torch.tensor([5, 999]), "y": None,
                  "seed": 300})
    for case in cases:
        case["state"] = seeded_state(case["net"], case["seed"])
        s = case["config"].image_size
        case["x"] = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(case["seed"] + 1))
    return cases


@pytest.mark.parametrize("case", reference_cases(), ids=lambda c: c["name"])
def test_outputs_equal_openai_code_on_fixed_weights_and_inputs(case):
    """The numbers in adm_reference.json come from guided-/improved-diffusion's own modules (make_adm_reference.py)."""
    ref = json.loads(REFERENCE_FILE.read_text())[case["name"]]
    net = case["net"]
    net.load_state_dict(case["state"])
    with torch.no_grad():
        args = (case["x"], case["t"]) if case["y"] is None else (case["x"], case["t"], case["y"])
        y = net.eval()(*args).double()
    assert list(y.shape) == ref["shape"]
    torch.testing.assert_close(y.flatten()[:16], torch.tensor(ref["head"], dtype=torch.float64), atol=1e-4, rtol=1e-4)
    assert y.abs().sum().item() == pytest.approx(ref["abs_sum"], rel=1e-5)
    assert y.sum().item() == pytest.approx(ref["sum"], rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("name", list(CLASSIFIER_PRESETS))
def test_classifier_presets_have_the_published_structure(name):
    cfg, pool, preset = adm_classifier_config(name)
    with torch.device("meta"):
        net = ADMClassifier(cfg, pool)
    assert cfg.num_channels == 128 and cfg.num_res_blocks == (4 if name.startswith("64") else 2)
    assert net.out[-1].positional_embedding.shape == (cfg.num_channels * cfg.resolved_channel_mult()[-1],
                                                      (cfg.image_size // 2 ** (len(cfg.resolved_channel_mult()) - 1))
                                                      ** 2 + 1)
    assert net.out[-1].c_proj.out_channels == 1000
    assert preset.noise_schedule == ("cosine" if name.startswith("64") else "linear")


def test_noisy_classifier_checkpoint_guides_sampling(tmp_path):
    from diffaug.guidance import GuidanceClassifier, guided_sample

    flags = _small("256x256_diffusion_uncond")
    den_net = _randomised(ADMUNet(adm_config("256x256_diffusion_uncond", **flags)[0]))
    torch.save(den_net.state_dict(), tmp_path / "d.pt")
    den = diffaug.Denoiser.from_guided_diffusion(tmp_path / "d.pt", "256x256_diffusion_uncond", **flags)
    cflags = _small_classifier("256x256_classifier")
    net = ADMClassifier(*adm_classifier_config("256x256_classifier", **cflags)[:2])
    torch.save(seeded_state(net, 0), tmp_path / "c.pt")
    guide = GuidanceClassifier.from_guided_diffusion(tmp_path / "c.pt", den, "256x256_classifier", **cflags)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    grad = guide.grad_log_prob(x, torch.tensor([10, 900]), torch.tensor([3, 4]))
    assert grad.shape == x.shape and grad.abs().sum() > 0
    samples = guided_sample(den, guide, torch.tensor([3, 4]), steps=3, scale=1.0,
                            generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, 16, 16) and 0 <= samples.min() and samples.max() <= 1
    with pytest.raises(InputError, match="cosine schedule of 1000 steps but the denoiser's schedule differs"):
        GuidanceClassifier.from_guided_diffusion(tmp_path / "c.pt", den, "64x64_classifier", **cflags)
    with pytest.raises(InputError, match="missing .*positional_embedding"):
        GuidanceClassifier.from_guided_diffusion(tmp_path / "c.pt", den, "256x256_classifier",
                                                 **{**cflags, "classifier_pool": "adaptive"})
    with pytest.raises(InputError, match="classifier_pool 'spatial' is not supported"):
        GuidanceClassifier.from_guided_diffusion(tmp_path / "c.pt", den, "256x256_classifier",
                                                 **{**cflags, "classifier_pool": "spatial"})
    with pytest.raises(InputError, match="takes 32x32 images but the denoiser makes 16x16"):
        GuidanceClassifier.from_guided_diffusion(tmp_path / "c.pt", den, "256x256_classifier",
                                                 **{**cflags, "image_size": 32})


# guided-diffusion's script_util.model_and_diffusion_defaults() and classifier_defaults(), as data: what users
# pass through (`**args_to_dict(args, model_and_diffusion_defaults().keys())`).
GD_DIFFUSION_DEFAULTS = dict(learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
                             use_kl=False, predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False)
GD_MODEL_DEFAULTS = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                         num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
                         class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
                         use_fp16=False, use_new_attention_order=False, **GD_DIFFUSION_DEFAULTS)
GD_CLASSIFIER_DEFAULTS = dict(image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
                              classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
                              classifier_resblock_updown=True, classifier_pool="attention", **GD_DIFFUSION_DEFAULTS)


def test_the_scripts_default_dicts_pass_through_whole(tmp_path):
    """``channel_mult=""`` means the image size's default, as in the original ``create_model``; comma strings,
    tuples and str2bool words are all accepted; runtime-only flags are ignored."""
    cfg = ADMConfig(image_size=64, num_channels=32, channel_mult=(1, 2, 3, 4), attention_resolutions=(16, 8),
                    num_heads=4, learn_sigma=True)
    torch.save(_randomised(ADMUNet(cfg)).state_dict(), tmp_path / "m.pt")
    load = diffaug.Denoiser.from_guided_diffusion
    forms = [
        {**GD_MODEL_DEFAULTS, "num_channels": 32, "learn_sigma": True},
        {**GD_MODEL_DEFAULTS, "num_channels": 32, "learn_sigma": "True", "use_fp16": True, "use_checkpoint": True,
         "timestep_respacing": "250", "channel_mult": "1,2,3,4"},
        {"image_size": 64, "num_channels": 32, "learn_sigma": True, "channel_mult": (1, 2, 3, 4),
         "attention_resolutions": [16, 8], "num_heads": 4},
    ]
    x_t = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    outs = []
    for flags in forms:
        den = load(tmp_path / "m.pt", **flags)
        assert den.net.config.resolved_channel_mult() == (1, 2, 3, 4) and den.net.config.attention_resolutions == (16, 8)
        assert den.prediction_type == "epsilon" and den.num_timesteps == 1000
        with torch.no_grad():
            outs.append(den.predict_x0(x_t, torch.tensor([10, 700])))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert load(tmp_path / "m.pt", **{**forms[0], "predict_xstart": True}).prediction_type == "sample"
    with pytest.raises(InputError, match="channel_mult='1,x' is not a list of numbers"):
        load(tmp_path / "m.pt", **{**forms[0], "channel_mult": "1,x"})
    with pytest.raises(InputError, match="learn_sigma='maybe' is not a boolean"):
        load(tmp_path / "m.pt", **{**forms[0], "learn_sigma": "maybe"})
    with pytest.raises(InputError, match="unknown ADM flag.*use_fp32"):
        load(tmp_path / "m.pt", **{**forms[0], "use_fp32": True})

    from diffaug.guidance import GuidanceClassifier

    den = load(tmp_path / "m.pt", **forms[0])
    cflags = {**GD_CLASSIFIER_DEFAULTS, "classifier_width": 32, "num_head_channels": 32, "num_classes": 10}
    net = ADMClassifier(*adm_classifier_config(None, **cflags)[:2])
    assert net.config.resolved_channel_mult() == (1, 2, 3, 4) and net.config.attention_resolutions == (32, 16, 8)
    torch.save(seeded_state(net, 0), tmp_path / "c.pt")
    guide = GuidanceClassifier.from_guided_diffusion(tmp_path / "c.pt", den, **cflags)
    assert guide.grad_log_prob(x_t, torch.tensor([10, 900]), torch.tensor([3, 4])).shape == x_t.shape
    with pytest.raises(InputError, match="cosine schedule of 4000 steps but the denoiser's schedule differs"):
        GuidanceClassifier.from_guided_diffusion(tmp_path / "c.pt", den, **{**cflags, "noise_schedule": "cosine",
                                                                            "diffusion_steps": 4000})


def test_a_published_checkpoint_is_recognised_by_its_keys_and_shapes(tmp_path, monkeypatch):
    """load_denoiser / from_guided_diffusion without a preset or flags: the one preset whose network has the
    checkpoint's keys and shapes (so `--denoiser 256x256_diffusion_uncond.pt` works on the command line); none or
    several is one line naming the ways to say it."""
    from diffaug.nets import adm

    for name, preset in PRESETS.items():  # the full-size networks, on the meta device: shapes only
        with torch.device("meta"):
            assert adm.matching_presets(ADMUNet(preset.config).state_dict()) == [name]
    flags = {**_small("cifar10_uncond_50M_500K"), "num_classes": 1000}
    cfg, base = adm_config("cifar10_uncond_50M_500K", **flags)
    net = _randomised(ADMUNet(cfg))
    torch.save(net.state_dict(), tmp_path / "small.pt")
    with pytest.raises(InputError, match=r"small.pt fits none of the ADM presets .* a folder holding adm.json"):
        diffaug.load_denoiser(tmp_path / "small.pt")
    monkeypatch.setitem(adm.PRESETS, "small_cifar", dataclasses.replace(base, config=cfg))  # as if published
    den = diffaug.load_denoiser(tmp_path / "small.pt")
    expected = diffaug.Denoiser.from_guided_diffusion(tmp_path / "small.pt", "cifar10_uncond_50M_500K", **flags)
    assert den.num_timesteps == 4000 and den.net.time_scale == 1000 / 4000
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 3000])
    with torch.no_grad():
        assert torch.equal(den.predict_x0(x, t), expected.predict_x0(x, t))
    monkeypatch.setitem(adm.PRESETS, "twin", dataclasses.replace(base, config=cfg))
    with pytest.raises(InputError, match="fits small_cifar and twin of the ADM presets"):
        diffaug.load_denoiser(tmp_path / "small.pt")


def test_an_adm_denoiser_is_a_folder_the_command_line_takes(tmp_path, capsys):
    """save_pretrained writes an ADM denoiser as model.safetensors + adm.json; a hand-written adm.json may point at
    the original .pt instead; both load as folders, and the CLI's --denoiser takes them (and a .pt file)."""
    from diffaug.classifier import create_classifier, save_classifier
    from diffaug.cli import main

    flags = {"image_size": 8, "in_channels": 1, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
             "attention_resolutions": "4", "num_heads": 1, "learn_sigma": True}
    torch.save(_randomised(ADMUNet(adm_config(None, **flags)[0])).state_dict(), tmp_path / "m.pt")
    den = diffaug.Denoiser.from_guided_diffusion(tmp_path / "m.pt", noise_schedule="cosine", **flags)
    den.save_pretrained(tmp_path / "saved", extra={"data": "digits"})
    (tmp_path / "pointer").mkdir()
    (tmp_path / "pointer" / "adm.json").write_text(json.dumps({"checkpoint": str(tmp_path / "m.pt"), "flags": flags,
                                                               "noise_schedule": "cosine"}))
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 400, 999])
    with torch.no_grad():
        for folder in ("saved", "pointer"):
            loaded = diffaug.load_denoiser(tmp_path / folder)
            assert torch.equal(loaded.alpha_bar, den.alpha_bar) and loaded.prediction_type == "epsilon"
            assert torch.equal(loaded.predict_x0(x, t), den.predict_x0(x, t))
    assert json.loads((tmp_path / "saved" / "adm.json").read_text())["noise_schedule"] == "cosine"
    save_classifier(create_classifier("small_cnn", 10, 1, seed=0), tmp_path / "clf")
    assert main(["certify", "--data", "digits", "--classifier", str(tmp_path / "clf"), "--denoiser",
                 str(tmp_path / "saved"), "--sigma", "0.25", "--n0", "4", "--n", "8", "--limit", "2", "--out",
                 str(tmp_path / "cert")]) == 0
    assert "Denoised smoothing with" in (tmp_path / "cert" / "table.md").read_text()
    capsys.readouterr()
    (tmp_path / "pointer" / "adm.json").write_text(json.dumps({"checkpoint": "gone.pt", "flags": flags}))
    (tmp_path / "notes.txt").write_text("not a model")
    for denoiser, message in ((tmp_path / "pointer", "names the checkpoint .*gone.pt, which does not exist"),
                              (tmp_path / "notes.txt", "is a file: give a denoiser folder"),
                              (tmp_path / "m.pt", "m.pt fits none of the ADM presets")):
        assert main(["certify", "--data", "digits", "--classifier", str(tmp_path / "clf"), "--denoiser",
                     str(denoiser), "--sigma", "0.25", "--out", str(tmp_path / "c2")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err


def test_adm_networks_run_in_float64_and_bfloat16():
    """The timestep embedding takes the network's own dtype: a ``.double()`` or ``.to(bfloat16)`` copy used to
    fail with "mat1 and mat2 must have the same dtype"; float64 agrees with float32."""
    name = "256x256_diffusion_uncond"
    cfg, _ = adm_config(name, **_small(name))
    ccfg, pool, _ = adm_classifier_config(**_small_classifier("256x256_classifier"))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([3, 700])
    for net in (_randomised(ADMUNet(cfg)), _randomised(ADMClassifier(ccfg, pool))):
        with torch.no_grad():
            ref = net(x, t)
            torch.testing.assert_close(net.double()(x.double(), t).float(), ref, atol=1e-4, rtol=1e-4)
            assert net.to(torch.bfloat16)(x.bfloat16(), t).dtype == torch.bfloat16
