"""The fast path: autocast precisions, channels_last, compile, sync-free DiffAug / DE, pinned batches.

CPU checks run everywhere; the CUDA checks (sync debug mode, pinned memory) run only where a GPU exists.
"""

import pytest
import torch
from conftest import assert_x0_close, killed_after_first_checkpoint, tiny_denoiser
from torch.overrides import TorchFunctionMode

import diffaug
from diffaug import InputError
from diffaug.utils import accel
from diffaug.nets.adm import ADMUNet, adm_config
from diffaug.classifier import create_classifier

# Tensor -> host conversions: on a GPU each one waits for the device (a host-device synchronisation)
_SYNCS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
          torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.cpu}


class _SyncSpy(TorchFunctionMode):
    """Records every call that reads a tensor's value back to the host."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNCS:
            self.calls.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


def _adm_denoiser(tmp_path):
    flags = {"num_channels": 32, "image_size": 16, "channel_mult": (1, 2), "attention_resolutions": (8,),
             "num_head_channels": 16, "num_classes": 10}
    cfg, _ = adm_config("256x256_diffusion_uncond", **flags)
    torch.manual_seed(0)
    net = ADMUNet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(net.state_dict(), tmp_path / "m.pt")
    return diffaug.Denoiser.from_guided_diffusion(tmp_path / "m.pt", "256x256_diffusion_uncond", **flags)


def test_the_spy_sees_the_syncs_it_is_meant_to_catch(den, images):
    with _SyncSpy() as spy:
        diffaug.DiffAug(den)(images, generator=torch.Generator().manual_seed(0))
    assert "tolist" in spy.calls  # the value check of the images: exactly one host read
    assert len(spy.calls) == 1


@pytest.mark.parametrize("kind", ["diffusers", "adm"])
def test_diffaug_and_de_make_no_host_device_syncs_when_validation_is_off(tmp_path, kind):
    den = tiny_denoiser() if kind == "diffusers" else _adm_denoiser(tmp_path)
    c, s = den.channels, den.image_size[0]
    x = torch.rand(4, c, s, s, generator=torch.Generator().manual_seed(0))
    clf = create_classifier("small_cnn", 10, c, seed=0).eval()
    with _SyncSpy() as spy:
        diffaug.DiffAug(den, validate=False)(x, generator=torch.Generator().manual_seed(1))
        diffaug.DiffAug(den, validate=False, sampler="dpm-solver-2")(x, generator=torch.Generator().manual_seed(1))
        diffaug.diffaug_ensemble(clf, den, x, generator=torch.Generator().manual_seed(2), validate=False)
    assert spy.calls == []


def test_validation_off_gives_the_same_views(den, images):
    on = diffaug.DiffAug(den)(images, generator=torch.Generator().manual_seed(3))
    off = diffaug.DiffAug(den, validate=False)(images, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(on, off, rtol=0, atol=0)


def test_integer_timesteps_are_checked_on_the_host(den, images):
    x_t = den.encode(images)
    with _SyncSpy() as spy:
        den.predict_x0(x_t, 500)
    assert spy.calls == []
    with pytest.raises(InputError, match=r"t must lie in \[0, 1000\), got 1000"):
        den.predict_x0(x_t, 1000)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_denoiser_is_close_to_float32_and_returns_float32(tmp_path, precision):
    den = _adm_denoiser(tmp_path)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    ref = den.model_output(den.encode(x), t)
    accel.accelerate(den, precision=precision, channels_last=True)
    out = den.model_output(den.encode(x), t)
    assert out.dtype == torch.float32 and den.precision == precision
    relative = ((out - ref).norm() / ref.norm()).item()  # measured: bf16 0.021, fp16 0.0025 (8 / 11-bit mantissas)
    assert 0 < relative < (0.05 if precision == "bf16" else 0.006)  # really ran in reduced precision, and close
    assert den.predict_x0(den.encode(x), t).dtype == torch.float32


def test_channels_last_alone_changes_nothing_but_the_layout(tmp_path):
    den = _adm_denoiser(tmp_path)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = den.predict_x0(den.encode(x), 300)
    accel.accelerate(den, channels_last=True)
    conv = den.net.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert_x0_close(den.predict_x0(den.encode(x), 300), ref, den, 300)  # NHWC kernels sum in another order


def test_classifier_precision_keeps_head_of_features_equal_to_forward(images):
    clf = create_classifier("small_cnn", 10, 1, seed=0).eval()
    ref = clf(images)
    accel.accelerate(clf, precision="bf16", channels_last=True)
    out = clf(images)
    assert out.dtype == torch.float32 and clf.forward_features(images).dtype == torch.float32
    torch.testing.assert_close(clf.head(clf.forward_features(images)), out)
    assert 0 < (out - ref).abs().max() < 0.1


def test_compile_keeps_parameter_names_and_outputs(images):
    pytest.importorskip("torch._inductor")
    den = tiny_denoiser()
    keys = list(den.state_dict())
    ref = den.predict_x0(den.encode(images), 400)
    accel.accelerate(den, compile=True, compile_mode=None)
    assert list(den.state_dict()) == keys  # checkpoints written after compiling load anywhere
    try:
        out = den.predict_x0(den.encode(images), 400)
    except Exception as e:  # no C++ toolchain for inductor on this machine
        pytest.skip(f"torch.compile cannot build here: {type(e).__name__}")
    assert_x0_close(out, ref, den, 400)  # compiled kernels sum in another order


def test_bad_precision_names_the_choices(den):
    with pytest.raises(InputError, match="unknown precision 'half'; use fp32, bf16 or fp16"):
        accel.accelerate(den, precision="half")
    assert den.precision == "fp32"  # nothing changed


def test_to_device_on_cpu_returns_the_data():
    x = torch.arange(10.0)
    assert torch.equal(accel.to_device(x, "cpu"), x) and not accel.pinned(x, "cpu").is_pinned()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_diffaug_runs_with_sync_debug_mode_error():
    den = tiny_denoiser().cuda()
    accel.accelerate(den, precision="bf16", channels_last=True)
    x = torch.rand(8, 1, 8, 8, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    aug = diffaug.DiffAug(den, validate=False)
    aug(x, generator=gen)  # warm-up (lazy init may sync)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = aug(x, generator=gen)
        views = diffaug.diffaug_ensemble(create_classifier("small_cnn", 10, 1, seed=0).cuda().eval(), den, x,
                                         generator=gen, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == x.shape and views.shape == (8, 10)


@cuda
def test_cuda_copies_come_from_pinned_memory():
    x = torch.rand(10, 3)
    assert accel.pinned(x, "cuda").is_pinned() and accel.to_device(x, "cuda").is_cuda


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_training_resumes_exactly(tmp_path, precision):
    from safetensors.torch import load_file

    from diffaug.utils.checkpoint import load_safetensors
    from diffaug.train.classifier import TrainConfig, train_classifier

    cfg = TrainConfig(recipe="diffaug", steps=6, batch_size=32, checkpoint_every=3, precision=precision,
                      channels_last=True)
    train_classifier(cfg, tmp_path / "full", progress=False)
    train_classifier(cfg, tmp_path / "cut", progress=False)
    ckpts = sorted((tmp_path / "cut" / "checkpoints").glob("step-*.safetensors"))
    _, meta = load_safetensors(ckpts[0])
    assert meta["config"]["precision"] == precision
    assert (meta["grad_scaler"].get("scale") == 65536.0) == (precision == "fp16")  # fp16 checkpoints its loss scale
    for p in [ckpts[-1], tmp_path / "cut" / "model.safetensors", tmp_path / "cut" / "model.json"]:
        p.unlink()  # as if killed after the step-3 checkpoint
    train_classifier(cfg, tmp_path / "cut", resume=True, progress=False)
    full, cut = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "cut"))
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_diffusion_training_in_reduced_precision_resumes_exactly(tmp_path, precision):
    import json

    from diffaug.utils.checkpoint import load_safetensors
    from diffaug.train.diffusion import DiffusionTrainConfig, train_diffusion

    def cfg(steps, **kw):
        return DiffusionTrainConfig(steps=steps, batch_size=16, width=8, checkpoint_every=4, sample_steps=2,
                                    warmup_steps=2, **kw)

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    fast = dict(precision=precision, channels_last=True)
    train_diffusion(cfg(8), tmp_path / "fp32", progress=False)
    train_diffusion(cfg(8, **fast), tmp_path / "full", progress=False)
    train_diffusion(cfg(4, **fast), tmp_path / "cut", progress=False)
    _, meta = load_safetensors(tmp_path / "cut" / "checkpoint.safetensors")
    assert meta["config"]["precision"] == precision
    assert (meta["grad_scaler"].get("scale") == 65536.0) == (precision == "fp16")  # fp16 checkpoints its loss scale
    train_diffusion(cfg(8, **fast), tmp_path / "cut", resume=True, progress=False)
    a, _ = load_safetensors(tmp_path / "full" / "checkpoint.safetensors")
    b, _ = load_safetensors(tmp_path / "cut" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses("full") == losses("cut")
    reference = losses("fp32")  # same seed and data: reduced precision changes the losses, but only a little
    assert losses("full") != reference
    assert max(abs(x - y) / y for x, y in zip(losses("full"), reference)) < 0.05


def test_guidance_classifier_precision_and_reduced_precision_guidance_training(tmp_path, monkeypatch):
    from diffaug.utils import checkpoint
    from diffaug.guidance import build_guidance
    from diffaug.guidance import load_guidance
    from diffaug.train.guidance import GuidanceTrainConfig, train_guidance

    den = tiny_denoiser()
    g = build_guidance("da", den, 10, width=16, seed=0)
    x_t, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 100, 500, 900])
    with torch.no_grad():
        reference = g(x_t, t)
        accel.accelerate(g, precision="bf16", channels_last=True)
        fast = g(x_t, t)
    assert fast.dtype == torch.float32 and g.precision == "bf16"
    relative = ((fast - reference).norm() / reference.norm()).item()
    assert 0 < relative < 0.05
    grad = g.grad_log_prob(x_t, t, torch.tensor([1, 2, 3, 4]))  # gradients flow under autocast
    assert grad.shape == x_t.shape and grad.dtype == torch.float32 and grad.abs().sum() > 0

    cfg = dict(kind="da", denoiser=str(tmp_path / "den"), steps=4, checkpoint_every=2, batch_size=16, width=8,
               precision="fp16", channels_last=True)
    tiny_denoiser().save_pretrained(tmp_path / "den")
    full = train_guidance(GuidanceTrainConfig(**cfg), tmp_path / "full", progress=False)
    killed_after_first_checkpoint(  # dies right after the step-2 checkpoint
        monkeypatch, lambda: train_guidance(GuidanceTrainConfig(**cfg), tmp_path / "part", progress=False))
    _, meta = checkpoint.load_safetensors(tmp_path / "part" / "checkpoint.safetensors")
    assert meta["grad_scaler"]["scale"] == 65536.0
    resumed = train_guidance(GuidanceTrainConfig(**cfg), tmp_path / "part", resume=True, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(full.net.state_dict().values(), resumed.net.state_dict().values()))
    loaded = load_guidance(tmp_path / "full", full.denoiser, speed=accel.Speed("bf16"))
    assert loaded.precision == "bf16"
