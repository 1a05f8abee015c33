"""Time-conditioned guidance classifiers and classifier-guided sampling (the paper's Section 5).

Two kinds, both trained on forward-diffused images with t uniform over the schedule:

* ``noisy``: ``f(x_t, t)`` (Dhariwal & Nichol's noisy classifier);
* ``da`` (denoise-augmented): ``f([x_t, x0_hat(x_t)], t)`` where ``x0_hat`` is the frozen denoiser's one-step
  estimate. The two images are **stacked as channels** (2C input channels) of one network; at sampling time the
  gradient of ``log p(y | x_t)`` flows through the denoiser's estimate as well.

Inputs ``x_t`` are in the denoiser's model space ([-1, 1] data plus noise), like the denoiser's own inputs.
The network is a small CNN whose blocks are shifted and scaled by an MLP of a sinusoidal embedding of t
(FiLM, as in the UNet's ResNet blocks).

A saved guidance classifier is a folder with ``guidance.safetensors`` (weights + the schedule it was trained for)
and ``guidance.json`` (kind, sizes, classes, extras): :meth:`GuidanceClassifier.save_pretrained` writes it,
:meth:`GuidanceClassifier.from_pretrained` reads it back for a denoiser.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import schedule
from .denoiser import Denoiser
from .errors import InputError
from .nets.time_conditioned import TimeConditionedCNN
from .utils import accel, checkpoint as ckpt
from .utils.seeding import private_seed

KINDS = ("noisy", "da")
WEIGHTS, SPEC = "guidance.safetensors", "guidance.json"


class GuidanceClassifier(nn.Module):
    """A guidance classifier ``p(y | x_t)``: logits from ``(x_t, t)`` in model space.

    Args:
        kind: ``"noisy"`` or ``"da"``.
        net: a ``net(x, t) -> logits`` module taking C (noisy) or 2C (da) channels.
        denoiser: the frozen diffusion model (needed for ``da``; its schedule and image size define the
            classifier's).
    """

    def __init__(self, kind: str, net: nn.Module, denoiser: Denoiser):
        super().__init__()
        if kind not in KINDS:
            raise InputError(f"unknown guidance kind {kind!r}; use noisy or da")
        self.kind = kind
        self.net = net
        self.precision = "fp32"  # autocast dtype of the network call; see diffaug.utils.accel.accelerate
        self.channels_last = False
        self.denoiser = denoiser  # a submodule, so .to() moves it; its weights are not saved with the classifier
        for p in denoiser.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_guided_diffusion(cls, path, denoiser: Denoiser, preset: str | None = None,
                              **flags) -> "GuidanceClassifier":
        """A guided-diffusion noisy classifier checkpoint (e.g. ``256x256_classifier.pt``) as a ``noisy``
        guidance classifier for ``denoiser``.

        Args:
            path: the ``.pt`` state dict (``torch.load(..., weights_only=True)``) or ``.safetensors``.
            denoiser: the diffusion model it guides; with a preset, its schedule must be the preset's.
            preset: a name in ``diffaug.nets.adm.CLASSIFIER_PRESETS`` (``64x64_classifier``, ``128x128_classifier``,
                ``256x256_classifier``, ``512x512_classifier``).
            **flags: the scripts' ``classifier_*`` flags and ``image_size`` (override the preset's), in the forms
                the original accepts; a ``classifier_and_diffusion_defaults()`` dict passes through whole (its
                ``noise_schedule`` / ``diffusion_steps`` are checked against the denoiser's schedule, runtime-only
                flags such as ``classifier_use_fp16`` are ignored).
        """
        from .nets.adm import ADMClassifier, adm_classifier_config, check_adm_state, read_adm_state

        trained_on = {k: flags.pop(k) for k in ("noise_schedule", "diffusion_steps") if k in flags}
        config, pool, base = adm_classifier_config(preset, **flags)
        if denoiser.image_size is not None and denoiser.image_size != (config.image_size, config.image_size):
            raise InputError(f"the classifier takes {config.image_size}x{config.image_size} images but the denoiser "
                             f"makes {denoiser.image_size[0]}x{denoiser.image_size[1]}; pair models of one size")
        noise_schedule = trained_on.get("noise_schedule", base.noise_schedule if base else None)
        steps = int(trained_on.get("diffusion_steps", base.diffusion_steps if base else 1000))
        if noise_schedule is not None:
            expected = schedule.named_alpha_bar(noise_schedule, steps)
            if expected.shape != denoiser.alpha_bar.shape or not torch.allclose(
                    expected, denoiser.alpha_bar.cpu().float(), atol=1e-5):
                raise InputError(f"{preset or 'the classifier'} was trained on a {noise_schedule} schedule of {steps} "
                                 "steps but the denoiser's schedule differs; guide the model it was trained with")
        state = read_adm_state(path)
        with private_seed(0):  # the initial weights are overwritten; the caller's global RNG is untouched
            net = ADMClassifier(config, pool)
        check_adm_state(state, net, path)
        net.load_state_dict(state)
        return cls("noisy", net.eval(), denoiser)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, denoiser: Denoiser, *,
                        speed: "accel.Speed | None" = None) -> "GuidanceClassifier":
        """Load a guidance classifier saved by ``diffaug train-guidance`` (or :meth:`save_pretrained`) for
        ``denoiser``, in eval mode on the denoiser's device; ``spec`` holds its ``guidance.json``.

        Args:
            folder: the folder holding ``guidance.safetensors`` (and ``guidance.json``).
            denoiser: the diffusion model it guides; a convolutional denoiser is run at the classifier's image size.
            speed: a :class:`~diffaug.utils.accel.Speed` to set the classifier up with (the denoiser is set up
                separately).

        Raises:
            InputError: no saved classifier in ``folder``, or one trained for another schedule, image size or
                number of channels than ``denoiser``'s.
        """
        folder = Path(folder)
        if not (folder / WEIGHTS).is_file():
            raise InputError(f"{folder} holds no {WEIGHTS}; train one with diffaug train-guidance --out {folder}")
        spec = json.loads((folder / SPEC).read_text()) if (folder / SPEC).is_file() else None
        tensors, meta = ckpt.load_safetensors(folder / WEIGHTS)
        spec = spec or meta
        lacking = [k for k in ("kind", "num_classes", "width", "channels", "image_size") if k not in spec]
        if lacking or "schedule.alpha_bar" not in tensors:
            raise InputError(f"{folder} is not a guidance classifier saved by diffaug (no "
                             f"{(lacking or ['schedule'])[0]}); train one with diffaug train-guidance")
        denoiser = _denoiser_for(denoiser, spec, tensors["schedule.alpha_bar"], folder)
        model = build_guidance(spec["kind"], denoiser, spec["num_classes"], width=spec["width"])
        ckpt.load_state(model.net, {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, folder / WEIGHTS)
        model.spec = spec
        model = model.to(denoiser.alpha_bar.device).eval()
        return speed.apply(model) if speed is not None else model

    def save_pretrained(self, folder: str | os.PathLike, *, classes: list[str] | None = None,
                        extra: dict | None = None) -> None:
        """Write ``guidance.safetensors`` (the network's weights and the denoiser's ``alpha_bar``) and
        ``guidance.json`` (kind, sizes, ``classes``, ``extra``) into ``folder``, each file atomically; the
        denoiser's weights are not saved. ``classes`` defaults to the loaded spec's, else ``"0"``, ``"1"``, ..."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        den, net = self.denoiser, self.net
        if classes is None:
            classes = getattr(self, "spec", {}).get("classes") or [str(k) for k in range(net.head.out_features)]
        tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
        tensors["schedule.alpha_bar"] = den.alpha_bar
        spec = {"kind": self.kind, "num_classes": net.head.out_features, "width": net.block1.conv1.out_channels,
                "channels": den.channels, "image_size": list(den.image_size), "num_timesteps": den.num_timesteps,
                "classes": list(classes), **(extra or {})}
        ckpt.save_safetensors(tensors, folder / WEIGHTS, metadata=spec)
        ckpt.write_json(folder / SPEC, spec)

    def with_net(self, net: nn.Module) -> "GuidanceClassifier":
        """This classifier (kind, denoiser, speed settings) around ``net``, a network with the same calling convention
        as :attr:`net`, e.g. ``DistributedDataParallel(model.net)`` so that training computes its loss through the
        wrapper whose backward all-reduces the gradients (the frozen denoiser stays outside the wrapper)."""
        model = GuidanceClassifier(self.kind, net, self.denoiser)
        model.precision, model.channels_last = self.precision, self.channels_last
        return model

    def inputs(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network sees: ``x_t`` or ``[x_t, x0_hat(x_t)]`` (differentiable w.r.t. ``x_t``)."""
        if self.kind == "noisy":
            return x_t
        return torch.cat([x_t, self.denoiser.predict_x0(x_t, t, cond_weight=0 if self.denoiser.is_conditional
                                                          else None, clip=True)], dim=1)

    def logits(self, inputs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network on prepared :meth:`inputs` -> float32 logits ``[N, K]`` (under this model's autocast)."""
        inputs = accel.memory_format(inputs, self.channels_last)
        with accel.autocast(inputs.device, self.precision):
            out = self.net(inputs, t)
        return out.float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.logits(self.inputs(x_t, t), t)

    def grad_log_prob(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``grad_{x_t} log p(y | x_t)`` ``[N, C, H, W]`` (through the denoiser for ``da``)."""
        from .sampling import input_gradient

        def log_prob(x_in):
            logp = F.log_softmax(self(x_in, t).float(), dim=1)
            return logp[torch.arange(len(y), device=y.device), y].sum()
        return input_gradient(log_prob, x_t)[0]


def build_guidance(kind: str, denoiser: Denoiser, num_classes: int, width: int = 32, seed: int = 0):
    with private_seed(seed):
        net = TimeConditionedCNN(denoiser.channels * (2 if kind == "da" else 1), num_classes, width=width)
    return GuidanceClassifier(kind, net, denoiser)


def _denoiser_for(denoiser: Denoiser, spec: dict, saved_alpha_bar: torch.Tensor, folder: Path) -> Denoiser:
    """``denoiser`` (a convolutional one run at the saved image size) if it matches the saved size, channels
    and schedule; else an InputError naming the mismatch."""
    size = spec["image_size"]
    if (denoiser.image_size is not None and list(denoiser.image_size) != list(size)
            and denoiser.accepts_size(size[0]) and size[0] == size[1]):
        denoiser = denoiser.at_size(size[0])  # a convolutional denoiser run at the trained size
    fix = (f"pass --denoiser {spec['denoiser']} (the one it was trained with)" if spec.get("denoiser")
           else "pass --denoiser the one it was trained with")
    if list(denoiser.image_size) != list(size) or denoiser.channels != spec["channels"]:
        raise InputError(f"guidance classifier {folder} was trained for {spec['channels']}x{size} "
                         f"images, the denoiser makes {denoiser.channels}x{list(denoiser.image_size)}; {fix}")
    if saved_alpha_bar.shape != denoiser.alpha_bar.shape:
        raise InputError(f"guidance classifier {folder} was trained for a noise schedule of "
                         f"T={saved_alpha_bar.numel()} steps, this denoiser's has T={denoiser.num_timesteps}; {fix}")
    mine = denoiser.alpha_bar.detach().float().cpu()
    if not torch.allclose(saved_alpha_bar, mine, atol=1e-6):
        t = int((saved_alpha_bar - mine).abs().argmax())
        raise InputError(f"guidance classifier {folder} was trained for another noise schedule than this denoiser's "
                         f"(both T={mine.numel()}; alpha_bar at t={t}: {float(saved_alpha_bar[t]):.4g} vs "
                         f"{float(mine[t]):.4g}: cosine vs linear, say); {fix}")
    return denoiser


def recorded_setting(folders, key: str, default: str | None = "digits", record: str = SPEC,
                     some: bool = False) -> str | None:
    """The ``--denoiser`` / ``--data`` that the models in ``folders`` were trained with (their ``record``:
    ``guidance.json`` for guidance classifiers, ``model.json`` for classifiers), for commands run on them without
    the flag: the value they all record (``some``: all of those that record one, as a plain classifier beside a
    DiffAug-trained one records no denoiser), if it can be found from here (a path that exists, or the shipped
    ``digits``); ``default`` where they record none or differ. A recorded path not found from here (the training
    ran in another folder) is a one-line error asking for the flag."""
    values = set()
    for folder in folders:
        path = Path(folder) / record
        try:
            values.add(json.loads(path.read_text()).get(key))
        except (OSError, ValueError, AttributeError):
            return default  # not a model folder: loading it names the problem
    if some:
        values.discard(None)
    if len(values) != 1 or None in values:
        return default
    value = str(values.pop())
    if value != "digits" and not Path(value).exists():
        many = len(folders) > 1
        raise InputError(f"the {'guidance classifier' if record == SPEC else 'classifier'}{'s' if many else ''} "
                         f"{', '.join(map(str, folders))} record{'' if many else 's'} --{key} {value} ({record}), "
                         f"which is not found from here; pass --{key}")
    return value


def save_guidance(model: GuidanceClassifier, folder: str | os.PathLike, *, classes: list[str],
                  extra: dict) -> None:
    """``model.save_pretrained(folder, classes=classes, extra=extra)`` (:meth:`GuidanceClassifier.save_pretrained`)."""
    model.save_pretrained(folder, classes=classes, extra=extra)


def load_guidance(folder: str | os.PathLike, denoiser: Denoiser, *,
                  speed: "accel.Speed | None" = None) -> GuidanceClassifier:
    """``GuidanceClassifier.from_pretrained(folder, denoiser, speed=speed)``
    (:meth:`GuidanceClassifier.from_pretrained`)."""
    return GuidanceClassifier.from_pretrained(folder, denoiser, speed=speed)


def guided_timesteps(denoiser: Denoiser, *, steps: int, scale: float, sampler: str,
                     variance: str = "posterior") -> list[int]:
    """The timesteps :func:`guided_sample` visits, after a one-line :class:`InputError` for an unknown sampler or
    variance, a scale that is not finite, ``steps`` outside ``[1, T]`` or ``variance="learned"`` for a network
    that does not learn it (one probe of the network), so callers can check before any work."""
    from .sampling import sampling_timesteps

    if sampler not in ("ddpm", "ddim"):
        raise InputError(f"unknown sampler {sampler!r}; use ddpm or ddim")
    if variance not in ("posterior", "learned"):
        raise InputError(f"unknown variance {variance!r}; use posterior or learned")
    if not math.isfinite(scale):
        raise InputError(f"guidance scale must be a finite number, got {scale}")
    timesteps = sampling_timesteps(denoiser.num_timesteps, steps)
    if variance == "learned":
        probe = torch.zeros(1, denoiser.channels, *denoiser.image_size, device=denoiser.alpha_bar.device)
        uncond = 0 if denoiser.is_conditional else None
        with torch.no_grad():
            if denoiser.predict_eps_and_variance(probe, 0, cond_weight=uncond)[1] is None:
                raise InputError("--variance learned needs a network that learns its variance (learn_sigma, as "
                                 "OpenAI's checkpoints); this denoiser predicts only the noise: use posterior")
    return timesteps


def guided_sample(denoiser: Denoiser, guidance: GuidanceClassifier, y: torch.Tensor, *, steps: int = 100,
                  scale: float = 1.0, sampler: str = "ddpm", variance: str = "posterior",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-guided samples of classes ``y`` ``[N]`` from the denoiser used unconditionally.

    * ``ddpm`` (Dhariwal & Nichol, Alg. 1): ancestral steps with the posterior mean (from the clipped x0
      estimate) shifted by ``scale * variance * grad log p(y | x_t)``;
    * ``ddim`` (Alg. 2): ``eps_hat = eps - sqrt(1 - alpha_bar_t) * scale * grad``, with ``eps`` the noise of the
      clipped x0 estimate and the guided x0 left unclipped, then a deterministic DDIM step.

    Both equal guided-diffusion's samplers with ``cond_fn`` (``condition_mean`` / ``condition_score``) on the same
    timesteps (``tests/test_guided_reference.py``, tiny ADMs: DDPM to ~1e-5, DDIM to ~2e-4). ``variance``
    (DDPM): ``"posterior"`` (the default: the "fixed small" variance, for any network) or ``"learned"`` (the
    network's own, for one that learns it, e.g. every OpenAI checkpoint: guided-diffusion's sampler, which then
    also shifts the mean at the last step, where the posterior variance is 0). ``steps`` evenly spaced timesteps
    from ``T - 1`` to 0 (guided-diffusion's ``"N"`` respacing except for rounding ties; its ``"ddimN"`` stride
    starts lower). Returns images ``[N, C, H, W]`` in [0, 1].
    """
    from .sampling import ddim_step, learned_variance, noise_sampler, posterior_variance, timestep_pairs

    timesteps = guided_timesteps(denoiser, steps=steps, scale=scale, sampler=sampler, variance=variance)
    num_classes = getattr(guidance.net, "num_classes", None) or (
        guidance.net.head.out_features if hasattr(guidance.net, "head") else None)
    if num_classes is not None and ((y < 0) | (y >= num_classes)).any():
        raise InputError(f"class index out of range: the guidance classifier has classes 0..{num_classes - 1}")
    device = denoiser.alpha_bar.device
    y = y.to(device)
    n = y.shape[0]
    H, W = denoiser.image_size
    randn = noise_sampler((n, denoiser.channels, H, W), generator, device)
    uncond = 0 if denoiser.is_conditional else None
    x = randn()
    floor = None  # the previous step's posterior variance: the learned variance's floor at the last step
    for t, a_t, a_prev in timestep_pairs(denoiser.alpha_bar.to(device), timesteps):
        tt = torch.full((n,), t, device=device)
        grad = guidance.grad_log_prob(x, tt, y) if scale else torch.zeros_like(x)
        with torch.no_grad():
            eps, v = denoiser.predict_eps_and_variance(x, tt, cond_weight=uncond)
            x0 = schedule.x0_from_model_output(eps, x, a_t, "epsilon").clamp(-1, 1)
            if sampler == "ddim":  # guidance on the clipped estimate's noise; the guided x0 is not clipped again
                eps = schedule.eps_from_x0(x0, x, a_t) - (1 - a_t).sqrt() * scale * grad
                x0 = schedule.x0_from_model_output(eps, x, a_t, "epsilon")
                x = ddim_step(x, x0, a_t, a_prev, 0.0, torch.zeros_like(x))
            else:
                var = post = posterior_variance(a_t, a_prev)
                if variance == "learned":  # at the last step (post 0) the floor is the step before's
                    var = learned_variance(v, a_t, a_prev, floor=1 - a_t / a_prev if floor is None else floor)
                floor = post
                mean = ddim_step(x, x0, a_t, a_prev, 1.0, torch.zeros_like(x)) + scale * var * grad
                x = mean + (var.clamp(min=0).sqrt() * randn() if a_prev < 1 else 0)
    return denoiser.decode(x).clamp(0, 1)


def noisy_batch(den: Denoiser, images: torch.Tensor, generator: torch.Generator | None):
    """``(x_t, t)``: images in [0, 1] diffused to uniform random integer times (model space)."""
    n = images.shape[0]
    t = torch.randint(0, den.num_timesteps, (n,), generator=generator, device=images.device)
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    return den.q_sample(den.encode(images), t, noise), t


@torch.no_grad()
def accuracy_over_t(model, images: torch.Tensor | None, labels: torch.Tensor | None, *, generator: torch.Generator,
                    bins: int = 10, repeats: int = 3, batch_size: int = 512, batches=None) -> dict:
    """The paper's Table 4 number (accuracy with t uniform, ``repeats`` draws per image) and accuracy per t-bin.

    ``model(x_t, t)`` is a guidance classifier; for a clean classifier wrap it as ``lambda x, t: clf(decode(x))``.
    ``batches`` (instead of ``images`` and ``labels``): a function returning an iterable of ``(images, labels)``
    batches on the model's device, called once per repeat (e.g. over a streamed folder's loader).
    """
    if bins < 1 or repeats < 1 or batch_size < 1:
        raise InputError(f"bins, repeats and batch_size must be >= 1, got {bins}, {repeats} and {batch_size}")
    den = model.denoiser
    T = den.num_timesteps
    hits = torch.zeros(bins)
    counts = torch.zeros(bins)
    if batches is None:
        def batches():
            return ((images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(images), batch_size))
    for _ in range(repeats):
        for x, y in batches():
            x_t, t = noisy_batch(den, x, generator)
            correct = (model(x_t, t).argmax(1) == y).float().cpu()
            b = (t.cpu() * bins // T).clamp(max=bins - 1)
            hits.index_add_(0, b, correct)
            counts.index_add_(0, b, torch.ones_like(correct))
    return {"accuracy": float(hits.sum() / counts.sum()),
            "bins": [{"t_from": k * T // bins, "t_to": (k + 1) * T // bins - 1,
                      "accuracy": float(hits[k] / counts[k]) if counts[k] else None} for k in range(bins)]}
