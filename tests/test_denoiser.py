import json
import shutil

import pytest
import torch
from diffusers import DDPMScheduler

import diffaug
from diffaug import InputError
from diffaug.denoiser import Denoiser, load_denoiser
from conftest import assert_x0_close, tiny_denoiser, tiny_unet


def _reference_x0(den: Denoiser, sched: DDPMScheduler, x_t, t: int, y=None):
    """diffusers' own x0: DDPMScheduler.step(...).pred_original_sample on the raw network output."""
    with torch.no_grad():
        out = den.net.unet(x_t, torch.full((x_t.shape[0],), t), class_labels=y).sample
        g = torch.Generator().manual_seed(0)
        return sched.step(out, t, x_t, generator=g).pred_original_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("learned_variance", [False, True])
def test_predict_x0_matches_diffusers_step(prediction_type, learned_variance):
    den = tiny_denoiser(prediction_type, learned_variance=learned_variance)
    sched = DDPMScheduler(prediction_type=prediction_type, clip_sample=False,
                          variance_type="learned_range" if learned_variance else "fixed_small")
    x_t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for t in (0, 1, 37, 500, 999):
        with torch.no_grad():
            ours = den.predict_x0(x_t, torch.full((4,), t))
        assert_x0_close(ours, _reference_x0(den, sched, x_t, t), den, t)


def test_predict_x0_per_sample_timesteps_and_clip(den):
    x_t = torch.randn(3, 1, 8, 8)
    t = torch.tensor([5, 400, 990])
    with torch.no_grad():
        joint = den.predict_x0(x_t, t)
        single = torch.cat([den.predict_x0(x_t[i : i + 1], t[i : i + 1]) for i in range(3)])
        clipped = den.predict_x0(x_t, t, clip=True)
    assert_x0_close(joint, single, den, t)  # batch vs one by one: other kernel orders
    assert clipped.min() >= -1 and clipped.max() <= 1
    torch.testing.assert_close(clipped, joint.clamp(-1, 1))


def test_conditional_labels_and_null_label(cond_den):
    x_t = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 300)
    y = torch.tensor([0, 3, 7, 9])
    sched = DDPMScheduler(clip_sample=False)
    with torch.no_grad():
        assert_x0_close(cond_den.predict_x0(x_t, t, y), _reference_x0(cond_den, sched, x_t, 300, y), cond_den, t)
        uncond = cond_den.predict_x0(x_t, t)  # None -> the null label
        assert_x0_close(uncond, _reference_x0(cond_den, sched, x_t, 300, torch.full((4,), 10)), cond_den, t)


def test_cond_weight_mixes_linearly(cond_den):
    x_t = torch.randn(4, 1, 8, 8)
    y = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        a = cond_den.predict_x0(x_t, 200, y, cond_weight=0.0)
        b = cond_den.predict_x0(x_t, 200, y, cond_weight=1.0)
        mid = cond_den.predict_x0(x_t, 200, y, cond_weight=0.3)
    assert_x0_close(mid, 0.7 * a + 0.3 * b, cond_den, 200)
    assert not torch.allclose(a, b)


def test_gradcheck_through_predict_x0():
    den = tiny_denoiser("v_prediction").double()
    x_t = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([10, 700])
    # predict_x0 returns float32 by contract; check the float64 math underneath via model_output + conversion
    assert torch.autograd.gradcheck(lambda x: den.net(x, t, None), (x_t,), eps=1e-6, atol=1e-4)
    out = den.predict_x0(x_t.float(), t)
    out.sum().backward()
    assert x_t.grad is not None and torch.isfinite(x_t.grad).all()


def test_schedule_helpers(den):
    assert den.num_timesteps == 1000 and den.alpha_bar.shape == (1000,)
    assert int(den.t_from_sigma(den.sigma(321))) == 321
    assert int(den.t_from_fraction(1.0)) == 999
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(den.decode(den.encode(x)), x)


def test_save_and_load_round_trip(tmp_path, cond_den):
    cond_den.save_pretrained(tmp_path / "d", extra={"note": "test"})
    again = load_denoiser(tmp_path / "d")
    assert (again.num_classes, again.null_class, again.image_size) == (10, 10, (8, 8))
    x_t = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert_x0_close(again.predict_x0(x_t, 50, 3), cond_den.predict_x0(x_t, 50, 3), cond_den, 50)
    assert json.loads((tmp_path / "d" / "diffaug.json").read_text())["note"] == "test"
    torch.testing.assert_close(again.alpha_bar, cond_den.alpha_bar)


def test_loads_a_folder_written_by_diffusers_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet = tiny_unet(learned_variance=True)
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    sched.save_pretrained(tmp_path / "scheduler")
    den = Denoiser.from_pretrained(tmp_path)
    assert den.prediction_type == "v_prediction" and not den.is_conditional
    torch.testing.assert_close(den.alpha_bar, sched.alphas_cumprod)
    x_t = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = Denoiser.from_diffusers(unet, sched).predict_x0(x_t, 10)
        assert_x0_close(den.predict_x0(x_t, 10), ref, den, 10)


@pytest.mark.parametrize("layout", ["pipeline", "single-model"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loads_folders_diffusers_writes_in_both_layouts(tmp_path, layout, prediction_type):
    """Folders written by diffusers itself: ``unet/`` + ``scheduler/`` sub-folders, or model and scheduler saved
    into one folder (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json side by side)."""
    unet = tiny_unet(seed=5)
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type, clip_sample=False)
    unet_dir, sched_dir = ((tmp_path / "unet", tmp_path / "scheduler") if layout == "pipeline"
                           else (tmp_path, tmp_path))
    unet.save_pretrained(unet_dir, safe_serialization=True)
    sched.save_pretrained(sched_dir)
    den = load_denoiser(tmp_path)
    assert den.prediction_type == prediction_type and den.num_timesteps == 1000
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for t in (3, 250, 900):
        with torch.no_grad():
            assert_x0_close(den.predict_x0(x_t, t), _reference_x0(den, sched, x_t, t), den, t)


def test_single_model_folder_errors(tmp_path):
    tiny_unet().save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(InputError, match="missing scheduler/scheduler_config.json .*scheduler_config.json beside"):
        load_denoiser(tmp_path)
    DDPMScheduler().save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InputError, match="missing diffusion_pytorch_model.safetensors"):
        load_denoiser(tmp_path)


def test_folder_errors(tmp_path, den):
    with pytest.raises(InputError, match="does not exist"):
        load_denoiser(tmp_path / "missing")
    with pytest.raises(InputError, match="unknown denoiser 'cifar'"):
        load_denoiser("cifar")
    den.save_pretrained(tmp_path / "d")
    weights = tmp_path / "d" / "unet" / "diffusion_pytorch_model.safetensors"
    # a damaged (truncated) weights file
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="damaged"):
        load_denoiser(tmp_path / "d")
    # config that does not match the tensors
    weights.write_bytes(data)
    cfg_path = tmp_path / "d" / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_out_channels"] = [8, 32]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="does not match"):
        load_denoiser(tmp_path / "d")
    # pickled weights only: refused with the fix
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(InputError, match="only safetensors"):
        load_denoiser(tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "scheduler")
    with pytest.raises(InputError, match="missing scheduler"):
        load_denoiser(tmp_path / "d")


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randint(0, 255, (2, 1, 8, 8)), "float"),
        (torch.rand(1, 8, 8), r"\[N, C, H, W\]"),
        (torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
         "3 channels.*convert the images"),
        (torch.rand(2, 8, 8, 1, generator=torch.Generator().manual_seed(0)), r"has 8 channels .* looks channels-last \[N, H, W, C\] = \(2, 8, 8, 1\): permute it "
                                 r"to \[N, C, H, W\] with x.permute\(0, 3, 1, 2\)"),
        (torch.rand(2, 1, 16, 16), "16x16"),
        (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
        (torch.tensor([0.5, float("inf")]).repeat(32).reshape(1, 1, 8, 8), "Inf"),
        (torch.rand(2, 1, 8, 8) * 255, r"got min \d.*max 2\d\d"),
        (torch.rand(2, 1, 8, 8) * 2 - 1, "min -"),
    ],
)
def test_image_errors(den, x, match):
    with pytest.raises(InputError, match=match):
        den.check_images(x)


def test_label_and_timestep_errors(den, cond_den):
    x_t = torch.randn(2, 1, 8, 8)
    with pytest.raises(InputError, match="unconditional"):
        den.predict_x0(x_t, 5, torch.tensor([1, 2]))
    with pytest.raises(InputError, match=r"lie in \[0, 10\)"):
        cond_den.predict_x0(x_t, 5, torch.tensor([1, 12]))
    with pytest.raises(InputError, match="one label per image"):
        cond_den.predict_x0(x_t, 5, torch.tensor([1, 2, 3]))
    with pytest.raises(InputError, match="integer class labels"):
        cond_den.predict_x0(x_t, 5, torch.tensor([1.0, 2.0]))
    with pytest.raises(InputError, match=r"t must lie in \[0, 1000\)"):
        den.predict_x0(x_t, torch.tensor([0, 1000]))
    with pytest.raises(InputError, match="integer timesteps"):
        den.predict_x0(x_t, torch.tensor([0.5, 1.0]))
    with pytest.raises(InputError, match="cond_weight"):
        cond_den.predict_x0(x_t, 5, torch.tensor([1, 2]), cond_weight=1.5)
    no_null = Denoiser.from_diffusers(tiny_unet(num_class_embeds=10), DDPMScheduler())
    with pytest.raises(InputError, match="no unconditional mode"):
        no_null.predict_x0(x_t, 5)
    with pytest.raises(InputError, match="prediction_type"):
        Denoiser(den.net, den.alpha_bar, "score")


def test_shipped_default_loads():
    den = diffaug.load_denoiser("digits")
    assert den.image_size == (8, 8) and den.channels == 1 and den.num_classes == 10 and den.null_class == 10
    assert not den.training
