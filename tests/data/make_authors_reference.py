"""Write authors_reference.safetensors for test_authors_reference.py: outputs of the DiffAug authors' own code.

    PYTHONPATH=/path/to/diffaug/src python make_authors_reference.py /path/to/oore-lab-diffaug /path/to/guided-diffusion
    (tested at oore-lab/diffaug e7df646, openai/guided-diffusion 22e0df8)

Needs the library importable only for the test module's constants (weights, images, seeds). Nothing in either
checkout is modified. What runs of the original, on CPU in float32:
  * diffaug.py's DiffAug.augment and DiffAug.test_time_augment (guided-diffusion's create_model_and_diffusion,
    q_sample, p_sample with clip_denoised=True). DiffAug.__init__ is replaced (it hard-codes CUDA, fp16, the
    256x256 flags and the checkpoint path): the same argparse-over-defaults construction with the test's shrunk
    flags and the test's seeded weights. torch.autocast("cuda") in them is a no-op without CUDA.
  * eval_scripts/eval_imagenetc.py's test() loop (TIMES, t = 0 = the image, preprocess / preprocess_augmented), with
    the globals main() sets assigned to main()'s own expressions, Tensor.cuda made the identity, and a tiny CNN in a
    wrapper with nets_inference.Nets' interface.
  * the loss lines of training_scripts/diffbase.py (186-187) and diffaugmix.py (257-268), copied below.
The random draws are injected: during each call torch.randint / torch.randn_like draw from the test's seeded
generator (augment: randint then randn, as the original calls them; test_time_augment: the test's noise for that
t; DE: diffaug_ensemble's member-major draw split per member). p_sample's own randn_like (the discarded DDPM
sample noise) gets zeros.
"""

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import test_authors_reference as T  # noqa: E402


def gd_flags() -> str:
    f = T.MODEL_FLAGS
    return (f"--attention_resolutions {f['attention_resolutions']} --class_cond {f['class_cond']} "
            f"--diffusion_steps {f['diffusion_steps']} --image_size {f['image_size']} --learn_sigma {f['learn_sigma']} "
            f"--noise_schedule {f['noise_schedule']} --num_channels {f['num_channels']} "
            f"--num_head_channels {f['num_head_channels']} --num_res_blocks {f['num_res_blocks']} "
            f"--resblock_updown {f['resblock_updown']} --use_fp16 False "
            f"--use_scale_shift_norm {f['use_scale_shift_norm']} --channel_mult {f['channel_mult']}")


@contextlib.contextmanager
def injected(noises=(), generator=None):
    """torch.randint draws from ``generator``; torch.randn_like returns ``noises`` in order (or draws from
    ``generator``), and zeros when p_sample asks for its discarded sample noise right after."""
    real_randint, real_randn_like = torch.randint, torch.randn_like
    queue, state = list(noises), {"next_is_sample_noise": False}

    def randint(low=0, high=None, size=None, **kw):
        return real_randint(low, high, size, generator=generator)

    def randn_like(x, **kw):
        if state["next_is_sample_noise"]:
            state["next_is_sample_noise"] = False
            return torch.zeros_like(x)
        state["next_is_sample_noise"] = True
        return queue.pop(0).to(x.dtype) if queue else torch.randn(x.shape, generator=generator, dtype=x.dtype)

    torch.randint, torch.randn_like = randint, randn_like
    try:
        yield
    finally:
        torch.randint, torch.randn_like = real_randint, real_randn_like
    assert not queue, "unused noise"


def main(authors: str, guided: str) -> None:
    sys.path.insert(0, guided)
    from guided_diffusion.resample import create_named_schedule_sampler
    from guided_diffusion.script_util import (add_dict_to_argparser, args_to_dict, classifier_and_diffusion_defaults,
                                              create_model_and_diffusion, model_and_diffusion_defaults)
    from torchvision import transforms

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("authors_diffaug", Path(authors) / "diffaug.py")
    A = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(A)

    class CPUDiffAug(A.DiffAug):
        def __init__(self, state, low=0, high=1000):  # the original's construction, shrunk, on CPU, float32
            import argparse
            defaults = dict()
            defaults.update(classifier_and_diffusion_defaults())
            defaults.update(model_and_diffusion_defaults())
            parser = argparse.ArgumentParser()
            add_dict_to_argparser(parser, defaults)
            args = parser.parse_args(gd_flags().split())
            score_model, self.diffusion = create_model_and_diffusion(
                **args_to_dict(args, model_and_diffusion_defaults().keys()))
            self.schedule_sampler = create_named_schedule_sampler("uniform", self.diffusion)
            score_model.load_state_dict(state)
            self.score_model = score_model.eval()
            self.low, self.high = low, high

    aug = CPUDiffAug(T.unet_state())
    out = {}
    x = torch.linspace(-1, 1, 2 * 3 * T.SIZE * T.SIZE).reshape(2, 3, T.SIZE, T.SIZE)
    with torch.no_grad():
        out["check.eps"] = aug.score_model(x, torch.tensor([10, 900]))[:, :3].contiguous()

    x = T.images(T.N)
    g = torch.Generator().manual_seed(T.AUG_SEED)
    with torch.no_grad(), injected(generator=g):
        out["augment.out"] = ((aug.augment(2 * x - 1) + 1) / 2).contiguous()  # normalize_augmented's first step
    g = torch.Generator().manual_seed(T.AUG_SEED)
    out["augment.t"] = torch.randint(0, 1000, (T.N,), generator=g)  # what augment drew (same generator, same call)

    for t in T.TTA_T:
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(T.TTA_SEED + t))
        with torch.no_grad(), injected([noise]):
            out[f"tta.t{t}"] = ((aug.test_time_augment(2 * x - 1, t) + 1) / 2).contiguous()

    argv, sys.argv = sys.argv, ["eval_imagenetc.py", "--worker_id", "0", "--num_workers", "1"]
    spec = importlib.util.spec_from_file_location("eval_imagenetc", Path(authors) / "eval_scripts" / "eval_imagenetc.py")
    E = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("diffaug")
    sys.modules["diffaug"] = A  # its `import diffaug` is the authors' module
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            spec.loader.exec_module(E)
    finally:
        sys.argv = argv
        if saved is not None:
            sys.modules["diffaug"] = saved
    assert tuple(E.TIMES) == T.TIMES
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    E.preprocess = transforms.Normalize(mean, std)
    E.preprocess_augmented = transforms.Compose([transforms.Normalize([-1, -1, -1], [2, 2, 2]),
                                                 transforms.Normalize(mean, std)])
    E.diffaugmenter = aug

    class Nets(torch.nn.Module):  # nets_inference.Nets' interface
        def __init__(self, net):
            super().__init__()
            self.nets = torch.nn.ModuleDict({"TINY": net})

        def forward(self, images):
            return {k: n(images).cpu() for k, n in self.nets.items()}

    net = Nets(T.tiny_cnn()).eval()
    E.orig_net = net
    real_cuda, torch.Tensor.cuda = torch.Tensor.cuda, lambda self, *a, **k: self
    xd, yd = T.images(T.DE_N, seed=T.IMAGE_SEED + 100), torch.arange(T.DE_N) % 10
    noise = list(T.de_noise().reshape(len(T.TIMES) - 1, T.DE_N, 3, T.SIZE, T.SIZE))
    try:
        with injected(noise), contextlib.redirect_stdout(io.StringIO()):
            _, _, res = E.test(net, [(xd, yd)])
    finally:
        torch.Tensor.cuda = real_cuda
    per_t = torch.stack(res["all_logits"]["TINY"])
    out["de.logits_per_t"] = per_t.contiguous()
    out["de.probs"] = torch.softmax(per_t, dim=-1).mean(dim=0).contiguous()  # its 'MN' line

    targets, logits_all_plain, logits_all_augmix = T.loss_logits()
    # training_scripts/diffbase.py:183-187 (copied)
    logits_clean, logits_da = torch.split(logits_all_plain, targets.size(0))
    loss = F.cross_entropy(logits_clean, targets) \
      + F.cross_entropy(logits_da, targets)
    out["loss.diffbase"] = loss.reshape(1)
    # training_scripts/diffaugmix.py:253-268 (copied)
    logits_clean, logits_aug1, logits_aug2, logits_da = torch.split(logits_all_augmix, targets.size(0))
    loss = F.cross_entropy(logits_clean, targets)+F.cross_entropy(logits_da, targets)
    p_clean, p_aug1, p_aug2 = F.softmax(logits_clean, dim=1), F.softmax(logits_aug1, dim=1), F.softmax(logits_aug2, dim=1)
    p_mixture = torch.clamp((p_clean + p_aug1 + p_aug2) / 3., 1e-7, 1).log()
    loss += 12 * (F.kl_div(p_mixture, p_clean, reduction='batchmean') +
                    F.kl_div(p_mixture, p_aug1, reduction='batchmean') +
                    F.kl_div(p_mixture, p_aug2, reduction='batchmean')) / 3.
    out["loss.diffaugmix"] = loss.reshape(1)

    def commit(path):
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    meta = {"authors_commit": commit(authors) or "e7df646 (archive)", "guided_diffusion_commit": commit(guided) or
            "22e0df8 (archive)", "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": gd_flags()}
    save_file({k: v.contiguous() for k, v in out.items()}, str(HERE / "authors_reference.safetensors"),
              metadata={"settings": json.dumps(meta)})
    print("wrote", HERE / "authors_reference.safetensors", {k: tuple(v.shape) for k, v in out.items()})


if __name__ == "__main__":
    main(*sys.argv[1:3])
