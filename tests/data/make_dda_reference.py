"""Write ``tests/data/dda_reference.safetensors`` for tests/test_dda_reference.py: outputs of DDA's own sampling loop.

Runs ``p_sample_loop_progressive`` of the authors' code (github.com/shiyegao/DDA, image_adapt/guided_diffusion/
gaussian_diffusion.py) on the tiny ADM, images and settings of test_dda_reference.py, in float64. Needs a checkout
of DDA (the tests do not); nothing of its code goes into the file, only numbers:

    python tests/data/make_dda_reference.py --dda /path/to/DDA --commit <DDA commit> [--out path]

Shims, applied from here (no file of the checkout is edited):
* noise: gaussian_diffusion's ``th`` is a proxy whose ``randn_like`` draws float32 normals from one
  torch.Generator, in the order dda_adapt draws them (the first draw noises the image);
* float64: ``model.dtype`` set to float64 (UNetModel casts its input to it), GroupNorm32 computed in float64 (the
  original computes it in float32), the float32 timestep embedding cast to float64;
* ``out_library_filter`` only: ``gaussian_diffusion.resize`` (resize_right) replaced by the torch calls of
  diffaug.dda.low_pass (bicubic anti-aliased down and up: resize_right's kernel, constants kept at the borders);
* timesteps: a SpacedDiffusion over dda_timesteps(t_start, steps) with the image noised to t_start by the
  original ``q_sample`` and passed as ``noise`` with ``N=None`` (DDA's script instead uses timestep_respacing=100
  and N, which noises one respaced step above its first model call).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from test_dda_reference import CASE, FIXTURE, FLAGS, MIN_CLIP_MARGIN, reference_images, reference_state  # noqa: E402


def library_filter_resize(x, scale_factors=None, out_shape=None, **_):
    return F.interpolate(x, size=tuple(out_shape[-2:]), mode="bicubic", antialias=True, align_corners=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dda", required=True, help="DDA checkout (the folder holding image_adapt/)")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", default=str(FIXTURE))
    args = ap.parse_args()
    sys.path.insert(0, args.dda)
    from image_adapt.guided_diffusion import gaussian_diffusion as gd
    from image_adapt.guided_diffusion import nn as gnn
    from image_adapt.guided_diffusion import respace, script_util
    from image_adapt.guided_diffusion import unet as gunet
    from image_adapt.resize_right import resize

    torch.set_num_threads(1)
    dtype = torch.float64
    gnn.GroupNorm32.forward = lambda self, x: torch.nn.GroupNorm.forward(self, x)
    embedding = gunet.timestep_embedding
    gunet.timestep_embedding = lambda t, dim, max_period=10000: embedding(t, dim, max_period).to(dtype)

    model = script_util.create_model(
        FLAGS["image_size"], FLAGS["num_channels"], 2, channel_mult=",".join(map(str, FLAGS["channel_mult"])),
        learn_sigma=True, class_cond=False, attention_resolutions=",".join(map(str, FLAGS["attention_resolutions"])),
        num_heads=4, num_head_channels=FLAGS["num_head_channels"], num_heads_upsample=-1,
        use_scale_shift_norm=True, dropout=0.0, resblock_updown=True, use_fp16=False, use_new_attention_order=False)
    model.load_state_dict(reference_state(CASE["weight_seed"]), strict=True)
    model.eval().to(dtype)
    model.dtype = dtype

    stride, rest = divmod(CASE["t_start"], CASE["steps"])
    assert rest == 0
    times = [CASE["t_start"] - k * stride for k in range(CASE["steps"])]  # the model's times, as dda_adapt's
    diffusion = respace.SpacedDiffusion(
        use_timesteps=set(times), betas=gd.get_named_beta_schedule("linear", 1000),
        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.MSE, rescale_timesteps=False)
    assert [diffusion.timestep_map[i] for i in range(len(times))][::-1] == times

    x = reference_images(CASE["n"], FLAGS["image_size"]).to(dtype)
    ref = x * 2 - 1
    margins, recording = [], False

    def record_margin(x0):  # denoised_fn: sees x0 before clipping; only the guided runs differentiate the clip
        if recording:
            margins.append(float((x0.detach().abs() - 1).abs().min()))
        return x0

    def run(scale, resize_fn=resize):
        gen = torch.Generator().manual_seed(CASE["seed"])
        proxy = types.ModuleType("th")
        proxy.__getattr__ = lambda name: getattr(torch, name)
        proxy.randn_like = lambda t: torch.randn(t.shape, generator=gen).to(t.dtype)
        saved_th, saved_resize = gd.th, gd.resize
        gd.th, gd.resize = proxy, resize_fn
        nonlocal recording
        recording = scale > 0
        try:
            top = torch.full((ref.shape[0],), diffusion.num_timesteps - 1, dtype=torch.long)
            x_t = diffusion.q_sample(ref, top, noise=torch.randn(ref.shape, generator=gen).to(dtype))
            sample = diffusion.p_sample_loop(model, tuple(ref.shape), noise=x_t, N=None, clip_denoised=True,
                                             denoised_fn=record_margin, model_kwargs={"ref_img": ref},
                                             D=CASE["D"], scale=scale)
        finally:
            gd.th, gd.resize = saved_th, saved_resize
        return ((sample + 1) / 2).clamp(0, 1).detach()  # save_image(normalize=True, range=(-1, 1)), unquantised

    out = {
        "out_free": run(0.0),
        "out_library_filter": run(CASE["dda_scale"], library_filter_resize),
        "out_resize_right": run(CASE["dda_scale"]),
        "noise_head": torch.randn(tuple(ref.shape), generator=torch.Generator().manual_seed(CASE["seed"]))
                      .flatten()[:8].double(),
    }
    phi_in = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(7), dtype=dtype) * 2 - 1
    out["phi_in"] = phi_in
    for d in (2, 4):
        n, c, h, w = phi_in.shape
        out[f"phi_resize_right_{d}"] = resize(resize(phi_in, scale_factors=1.0 / d, out_shape=(n, c, h // d, w // d)),
                                              scale_factors=d, out_shape=(n, c, h, w))
    margin = min(margins)
    effect = float((out["out_library_filter"] - out["out_free"]).abs().max())
    print(f"min clip margin {margin:.3e}, guidance effect {effect:.3f}")
    if margin < MIN_CLIP_MARGIN:
        raise SystemExit(f"an x0 value comes within {margin:.1e} of +-1: pick another CASE seed")
    settings = {**CASE, "flags": FLAGS, "min_clip_margin": margin, "times": times, "dda_commit": args.commit,
                "torch": torch.__version__, "dtype": "float64"}
    out = {k: v.float() if k.startswith("out_") else v for k, v in out.items()}  # float32 is ample at ATOL
    save_file({k: v.contiguous() for k, v in out.items()}, args.out, metadata={"settings": json.dumps(settings)})
    print("wrote", args.out)


if __name__ == "__main__":
    main()
