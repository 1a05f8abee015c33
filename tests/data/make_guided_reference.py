"""Write tests/data/guided_reference.safetensors for tests/test_guided_reference.py: samples of
openai/guided-diffusion's own guided samplers (outputs only; none of its code is kept).

    python tests/data/make_guided_reference.py /path/to/guided-diffusion      # a checkout (tested at 22e0df8)

Needs diffaug importable (the weights are drawn by the test module's seeded_state, the same tensors the test
loads). What runs of the original: ``script_util.create_model_and_diffusion`` (the denoiser and the respaced
diffusion), ``script_util.create_gaussian_diffusion(sigma_small=True)`` for the posterior-variance DDPM (its scripts
expose no sigma_small flag), ``unet.EncoderUNetModel`` with ``create_classifier``'s arguments (which fixes
channel_mult for 64..512 px only, so image_size 16 / channel_mult (1, 2) are passed directly),
``SpacedDiffusion.p_sample_loop`` / ``ddim_sample_loop`` with ``scripts/classifier_sample.py``'s ``cond_fn`` and
``model_fn``, ``clip_denoised=True``, eta 0. Nothing in the checkout is modified: the per-step noise is injected
by replacing ``torch.randn_like`` during the call with draws from the seeded generator that made x_T (diffaug's
order: x_T, then one draw per step).
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import test_guided_reference as T  # noqa: E402


def main(checkout: str) -> None:
    sys.path.insert(0, checkout)
    from guided_diffusion import script_util as su
    from guided_diffusion.unet import EncoderUNetModel

    torch.set_num_threads(1)
    commit = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    y = torch.tensor(T.Y)
    out, settings = {}, {"guided_diffusion_commit": commit or "unknown", "torch": torch.__version__}
    check_x = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    check_t = torch.tensor([0, 999])
    for name, (sampler, steps, learn_sigma, scale) in T.CASES.items():
        args = su.model_and_diffusion_defaults()
        args.update(T.MODEL_FLAGS, learn_sigma=learn_sigma, timestep_respacing=str(steps))
        model, diffusion = su.create_model_and_diffusion(**args)
        if sampler == "ddpm" and not learn_sigma:  # the posterior ("fixed small") variance, diffaug's default
            diffusion = su.create_gaussian_diffusion(steps=1000, learn_sigma=False, sigma_small=True,
                                                     noise_schedule="linear", timestep_respacing=str(steps))
        f = T.CLASSIFIER_FLAGS
        clf = EncoderUNetModel(
            image_size=f["image_size"], in_channels=3, model_channels=f["classifier_width"], out_channels=1000,
            num_res_blocks=f["classifier_depth"],
            attention_resolutions=tuple(f["image_size"] // int(r) for r in f["classifier_attention_resolutions"].split(",")),
            channel_mult=tuple(int(m) for m in f["channel_mult"].split(",")), use_fp16=False, num_head_channels=64,
            use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
            resblock_updown=f["classifier_resblock_updown"], pool=f["classifier_pool"])
        mstate, cstate = T.states(learn_sigma)
        model.load_state_dict(mstate)
        clf.load_state_dict(cstate)
        model.eval(), clf.eval()
        with torch.no_grad():
            out[f"check.eps_sigma{int(learn_sigma)}"] = model(check_x, check_t)[:, :3].contiguous()
            out["check.logits"] = clf(check_x, check_t).contiguous()

        def run(s):
            def cond_fn(x, t, y=None):  # scripts/classifier_sample.py
                with torch.enable_grad():
                    x_in = x.detach().requires_grad_(True)
                    logits = clf(x_in, t)
                    log_probs = F.log_softmax(logits, dim=-1)
                    selected = log_probs[range(len(logits)), y.view(-1)]
                    return torch.autograd.grad(selected.sum(), x_in)[0] * s

            def model_fn(x, t, y=None):  # scripts/classifier_sample.py, class_cond=False
                return model(x, t, None)

            g = torch.Generator().manual_seed(T.SEED)
            shape = (len(T.Y), 3, 16, 16)
            noise = torch.randn(shape, generator=g)
            real = torch.randn_like
            torch.randn_like = lambda x, **kw: torch.randn(x.shape, generator=g)
            try:
                loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
                sample = loop(model_fn, shape, noise=noise, clip_denoised=True, model_kwargs={"y": y},
                              cond_fn=cond_fn, device="cpu", **({"eta": 0.0} if sampler == "ddim" else {}))
            finally:
                torch.randn_like = real
            return ((sample + 1) / 2).clamp(0, 1).contiguous()  # diffaug's [0, 1] output

        out[name] = run(scale)
        if scale:
            out[f"{name}.unguided"] = run(0.0)
        settings[name] = {"sampler": sampler, "timestep_respacing": str(steps), "learn_sigma": learn_sigma,
                          "model_var_type": diffusion.model_var_type.name, "scale": scale, "y": T.Y,
                          "seed": T.SEED, "timesteps": sorted(diffusion.timestep_map, reverse=True)}
        print(name, settings[name]["model_var_type"], f"guidance effect "
              f"{float((out[name] - out.get(name + '.unguided', out[name])).abs().max()):.3g}")
    save_file(out, str(HERE / "guided_reference.safetensors"), metadata={"settings": json.dumps(settings)})


if __name__ == "__main__":
    main(sys.argv[1])
