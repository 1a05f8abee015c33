"""The one-step denoiser: a diffusion network plus its schedule, behind one narrow contract.

``Denoiser.predict_x0(x_t, t, y)`` is the centre of the library (k-diffusion style): every augmentation,
ensemble, smoothing and guidance routine calls it and nothing else of the network. Adapters at the edge turn
a diffusers ``UNet2DModel`` (or a folder saved by diffaug or by diffusers) into that contract.

Data ranges: the public API takes images in [0, 1]; networks work in [-1, 1]. :meth:`Denoiser.encode` and
:meth:`Denoiser.decode` are the only places that convert.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import InputError, channels_hint, check_image_batch, check_image_values
from .utils import accel
from .utils.seeding import private_seed
from . import schedule

SHIPPED = {"digits": Path(__file__).resolve().parent / "weights" / "digits"}
ADM_FILE = "adm.json"  # a folder of an OpenAI (ADM) checkpoint: from_guided_diffusion's arguments
ADM_WEIGHTS = "model.safetensors"  # its weights, unless adm.json names a checkpoint elsewhere
OPENAI_SUFFIXES = (".pt", ".pth", ".safetensors")  # a file given as a denoiser: an OpenAI checkpoint

UNET_DIR, SCHEDULER_DIR, META_FILE = "unet", "scheduler", "diffaug.json"
UNET_CONFIG, UNET_WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler_config.json"


class _DiffusersUNet(nn.Module):
    """Calls a diffusers ``UNet2DModel`` as ``net(x, t, y) -> output``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.unet(x, t, class_labels=y, return_dict=False)[0]


class Denoiser(nn.Module):
    """A diffusion network with its discrete schedule, exposing the one-step (Tweedie) ``x0`` estimate.

    Args:
        net: callable ``net(x_t, t, y) -> output`` with ``x_t`` ``[N, C, H, W]`` in model space, ``t`` a
            LongTensor ``[N]`` and ``y`` a LongTensor ``[N]`` or None. An output with ``2C`` channels is a
            learned-variance output (improved-DDPM); the variance half is dropped.
        alpha_bar: the schedule, float tensor ``[T]``.
        prediction_type: what the network predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        image_size: ``(H, W)`` the network was built for (checked on every call), or None to accept any size.
        channels: ``C``, the number of image channels.
        num_classes: number of classes of a class-conditional network, None if unconditional.
        null_class: the label that means "no class" for a network trained with label dropout (classifier-free
            style), so one network serves both uses; None if the network has no unconditional mode.
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        alpha_bar: torch.Tensor,
        prediction_type: str = "epsilon",
        *,
        image_size: tuple[int, int] | None = None,
        channels: int = 3,
        num_classes: int | None = None,
        null_class: int | None = None,
    ):
        super().__init__()
        if prediction_type not in schedule.PREDICTION_TYPES:
            raise InputError(
                f"unknown prediction_type {prediction_type!r}; use one of {', '.join(schedule.PREDICTION_TYPES)}"
            )
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float32)
        if alpha_bar.ndim != 1 or alpha_bar.numel() < 2 or not ((alpha_bar > 0) & (alpha_bar < 1)).all():
            raise InputError("alpha_bar must be a 1-D tensor of length T >= 2 with values in (0, 1)")
        if null_class is not None and (num_classes is None or not 0 <= null_class <= num_classes):
            raise InputError(f"null_class={null_class} needs num_classes set and 0 <= null_class <= num_classes")
        self.net = net
        self.register_buffer("alpha_bar", alpha_bar.clone(), persistent=False)
        self.prediction_type = prediction_type
        self.image_size = None if image_size is None else tuple(int(s) for s in image_size)
        self.channels = int(channels)
        self.num_classes = num_classes
        self.null_class = null_class
        self.scheduler_config: dict | None = None  # kept from from_diffusers, written back by save_pretrained
        self.precision = "fp32"  # autocast dtype of the network call; see diffaug.utils.accel.accelerate
        self.channels_last = False

    # ------------------------------------------------------------------ properties and conversions
    @property
    def num_timesteps(self) -> int:
        """T, the number of discrete timesteps."""
        return int(self.alpha_bar.numel())

    @property
    def is_conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def dtype(self) -> torch.dtype:
        p = next(iter(self.parameters()), None)
        return p.dtype if p is not None else torch.float32

    @property
    def device(self) -> torch.device | None:
        """The network's device (of its first parameter); None for a network without parameters."""
        p = next(iter(self.parameters()), None)
        return p.device if p is not None else None

    def _apply(self, fn, recurse: bool = True):
        # .to(dtype) / .half() convert the weights, not the schedule: a bf16 alpha_bar rounds alpha_bar[0] to 1
        # (and fp16 the last one to 0), which moves every small-t view; the schedule keeps its float32 values and
        # follows the device only
        schedule_values = self.alpha_bar
        super()._apply(fn, recurse)
        self.alpha_bar = schedule_values.to(self.alpha_bar.device)
        return self

    @staticmethod
    def encode(x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> model space [-1, 1]."""
        return x * 2 - 1

    @staticmethod
    def decode(x: torch.Tensor) -> torch.Tensor:
        """Model space [-1, 1] -> images in [0, 1]."""
        return (x + 1) / 2

    def sigma(self, t: torch.Tensor | int) -> torch.Tensor:
        """Noise level ``sqrt((1 - alpha_bar[t]) / alpha_bar[t])`` of integer timesteps."""
        return schedule.sigma_from_alpha_bar(self.alpha_bar[torch.as_tensor(t, device=self.alpha_bar.device)])

    def t_from_sigma(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """The integer timestep whose noise level is nearest to ``sigma``."""
        return schedule.sigma_to_t(sigma, self.alpha_bar.cpu())

    def t_from_fraction(self, fraction: float | torch.Tensor) -> torch.Tensor:
        """``round(fraction * (T - 1))``: a schedule-independent way to name a timestep."""
        return schedule.fraction_to_t(fraction, self.num_timesteps)

    # ------------------------------------------------------------------ other resolutions
    @property
    def size_multiple(self) -> int | None:
        """The square sizes the network takes besides :attr:`image_size`: any multiple of this number (a
        convolutional UNet, diffusers' or ADM: 2 ** its downsamplings), or None when only :attr:`image_size`
        is known to work (any other network)."""
        from .nets.adm import ADMUNet

        if isinstance(self.net, _DiffusersUNet):
            return 2 ** sum(1 for b in self.net.unet.down_blocks if getattr(b, "downsamplers", None))
        if isinstance(self.net, ADMUNet):
            return 2 ** (len(self.net.config.resolved_channel_mult()) - 1)
        return None

    def accepts_size(self, size: int) -> bool:
        """Whether the network can run on ``size`` x ``size`` images."""
        if self.image_size is None or self.image_size == (size, size):
            return True
        return self.size_multiple is not None and size >= self.size_multiple and size % self.size_multiple == 0

    def at_size(self, size: int) -> "Denoiser":
        """This denoiser (the same network, weights and schedule) for ``size`` x ``size`` images, e.g. ADM-256
        on 224-px crops as the paper's code runs it. Raises :class:`InputError` if the network cannot take it."""
        if self.image_size == (size, size):
            return self
        if not self.accepts_size(size):
            built = f"{self.image_size[0]}x{self.image_size[1]}"
            takes = (f"multiples of {self.size_multiple} px" if self.size_multiple else f"only {built}")
            raise InputError(f"the denoiser was built for {built} images and cannot run at {size}x{size} (its network "
                             f"takes {takes}); resize the images to a size it takes (diffaug train: --denoiser-size "
                             f"{self.image_size[0]})")
        return self._copy(self.net, (size, size))

    def with_net(self, net: Callable[..., torch.Tensor]) -> "Denoiser":
        """This denoiser (schedule, sizes, classes, speed settings) around ``net``, a network with the same calling
        convention as :attr:`net`, e.g. ``DistributedDataParallel(den.net)`` so that training computes its loss
        through the wrapper whose backward all-reduces the gradients. The math stays this class's."""
        return self._copy(net, self.image_size)

    def _copy(self, net, image_size) -> "Denoiser":
        den = Denoiser(net, self.alpha_bar, self.prediction_type, image_size=image_size,
                       channels=self.channels, num_classes=self.num_classes, null_class=self.null_class)
        den.scheduler_config, den.precision, den.channels_last = self.scheduler_config, self.precision, self.channels_last
        return den

    # ------------------------------------------------------------------ checks
    def check_images(self, x: torch.Tensor, name: str = "x", *, values: bool = True) -> None:
        """Raise :class:`InputError` unless ``x`` is a float ``[N, C, H, W]`` batch in [0, 1] this model accepts.
        ``values=False`` skips the check of the values (range, NaN), the only one that makes a GPU wait for the
        host; type, shape, channels and size are always checked. (The device is checked where the network runs,
        :meth:`check_device`: a probe batch may be checked on the host.)"""
        check_image_batch(x, name)
        if x.shape[1] != self.channels:
            raise InputError(
                f"{name} has {x.shape[1]} channels but the denoiser was built for {self.channels}; "
                f"{channels_hint(tuple(x.shape), self.channels)}"
            )
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            h, w = x.shape[-2:]
            fix = (f"run the same network at that size with den.at_size({h}), or resize the images"
                   if h == w and self.accepts_size(int(h)) else "resize the images first")
            raise InputError(f"{name} is {h}x{w} but the denoiser was built for "
                             f"{self.image_size[0]}x{self.image_size[1]}; {fix}")
        if values:
            check_image_values(x, name)

    def check_device(self, x: torch.Tensor, name: str = "x") -> None:
        """One-line :class:`InputError` when ``x`` is not on the network's device (host metadata: no sync)."""
        device = self.device
        if device is not None and x.device != device:
            raise InputError(f"{name} is on {x.device} but the denoiser is on {device}; move one of them, e.g. "
                             f"den.to({str(x.device)!r}) (a DiffAug: aug.to(...), which moves its denoiser)")

    def _labels(self, y: torch.Tensor | int | None, n: int, device: torch.device,
                validate: bool = True) -> torch.Tensor | None:
        """Validate class labels and fill in the null label for unconditional use of a conditional net.

        ``validate=False`` skips the range check of tensor labels (the only part that syncs with a GPU)."""
        if isinstance(y, torch.Generator):
            raise InputError("a torch.Generator was passed where class labels y go; pass it by keyword: "
                             "generator=g")
        if y is None:
            if not self.is_conditional:
                return None
            if self.null_class is None:
                raise InputError(
                    "this denoiser is class-conditional with no unconditional mode; pass class labels y"
                )
            return torch.full((n,), self.null_class, dtype=torch.long, device=device)
        if not self.is_conditional:
            raise InputError("class labels y were given but the denoiser is unconditional; pass y=None")
        y = torch.as_tensor(y, device=device)
        if y.is_floating_point() or y.ndim > 1:
            raise InputError(f"y must be integer class labels of shape [N], got dtype {y.dtype} shape {tuple(y.shape)}")
        y = y.long().expand(n) if y.ndim == 0 else y.long()
        if y.shape[0] != n:
            raise InputError(f"y has {y.shape[0]} labels for a batch of {n} images; pass one label per image")
        top = self.num_classes if self.null_class is None else max(self.num_classes, self.null_class + 1)
        if validate and n and (y.min() < 0 or y.max() >= top):
            raise InputError(f"class labels must lie in [0, {self.num_classes}), got {y.min().item()}..{y.max().item()}")
        return y

    def _timesteps(self, t: torch.Tensor | int, n: int, device: torch.device, validate: bool = True) -> torch.Tensor:
        """``t`` as LongTensor ``[n]``; ``validate=False`` skips the range check of a tensor ``t`` (a GPU sync)."""
        if isinstance(t, int) and not isinstance(t, bool):  # checked on the host: no sync
            if not 0 <= t < self.num_timesteps:
                raise InputError(f"t must lie in [0, {self.num_timesteps}), got {t}")
            return torch.full((n,), t, dtype=torch.long, device=device)
        t = torch.as_tensor(t, device=device)
        if t.is_floating_point():
            raise InputError(f"t must be integer timesteps (LongTensor), got {t.dtype}; see Denoiser.t_from_sigma")
        t = t.long().expand(n) if t.ndim == 0 else t.long()
        if t.shape != (n,):
            raise InputError(f"t must have shape [{n}] (one timestep per image), got {tuple(t.shape)}")
        if validate and n and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise InputError(f"t must lie in [0, {self.num_timesteps}), got {t.min().item()}..{t.max().item()}")
        return t

    # ------------------------------------------------------------------ the contract
    def _net_output(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                    keep_variance: bool = False) -> torch.Tensor:
        """The network on already-validated ``t`` and ``y``, float32; a learned-variance half (improved-DDPM) is
        dropped unless ``keep_variance``."""
        x_in = accel.memory_format(x_t.to(self.dtype), self.channels_last)
        with accel.autocast(x_t.device, self.precision):
            out = self.net(x_in, t, y)
        if out.shape[1] == 2 * x_t.shape[1] and not keep_variance:
            out = out[:, : x_t.shape[1]]
        return out.float()

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | int | None = None) -> torch.Tensor:
        """The network's raw prediction (variance channels dropped), in float32, shape of ``x_t``."""
        n = x_t.shape[0]
        return self._net_output(x_t, self._timesteps(t, n, x_t.device), self._labels(y, n, x_t.device))

    def _mixed_output(self, x_t, t, y, cond_weight: float | None, validate: bool = True,
                      keep_variance: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated ``t`` and ``(1 - w) * out(x_t, t, null) + w * out(x_t, t, y)`` (halves batched in one call)."""
        n, device = x_t.shape[0], x_t.device
        t = self._timesteps(t, n, device, validate)
        if cond_weight is not None and not 0 <= cond_weight <= 1:
            raise InputError(f"cond_weight must lie in [0, 1], got {cond_weight}")
        if cond_weight not in (None, 0) and y is None:
            raise InputError("cond_weight > 0 needs class labels y; pass y or set cond_weight=0")
        if cond_weight in (None, 0, 1):
            return t, self._net_output(x_t, t, self._labels(None if cond_weight == 0 else y, n, device, validate),
                                       keep_variance)
        labels = torch.cat([self._labels(None, n, device), self._labels(y, n, device, validate)])
        out = self._net_output(torch.cat([x_t, x_t]), torch.cat([t, t]), labels, keep_variance)
        return t, torch.lerp(out[:n], out[n:], cond_weight)

    def predict_x0(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        y: torch.Tensor | int | None = None,
        *,
        cond_weight: float | None = None,
        clip: bool = False,
        validate: bool = True,
    ) -> torch.Tensor:
        """One-step (Tweedie) estimate of the clean image from ``x_t``.

        Args:
            x_t: noisy images in model space, ``[N, C, H, W]``.
            t: integer timesteps, LongTensor ``[N]`` (or a scalar for all).
            y: class labels ``[N]`` for a conditional network, or None (the null label if it has one).
            cond_weight: lambda of conditional DiffAug; the prediction is ``(1 - lambda) * uncond + lambda *
                cond`` (0 = unconditional, 1 = conditional; in between costs two network evaluations). None
                means "conditional if y is given".
            clip: clamp the estimate to the data range [-1, 1].
            validate: check the values of tensor ``t`` and ``y`` (shapes and dtypes are always checked).
                False skips the two checks that make a GPU wait for the host; pass it for trusted inputs.

        Returns:
            ``x0_hat`` in model space, float32, shape of ``x_t``. Differentiable w.r.t. ``x_t``.
        """
        t, out = self._mixed_output(x_t, t, y, cond_weight, validate)
        a = schedule._gather(self.alpha_bar, t, out)
        x0_hat = schedule.x0_from_model_output(out, x_t.float(), a, self.prediction_type)
        return x0_hat.clamp(-1, 1) if clip else x0_hat

    def predict_eps(self, x_t, t, y=None, *, cond_weight: float | None = None, validate: bool = True) -> torch.Tensor:
        """The noise estimate at ``(x_t, t)``, float32 (same arguments as :meth:`predict_x0`)."""
        return self.predict_eps_and_variance(x_t, t, y, cond_weight=cond_weight, validate=validate)[0]

    def predict_eps_and_variance(self, x_t, t, y=None, *, cond_weight: float | None = None,
                                 validate: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(eps, v)``: the noise estimate (as :meth:`predict_eps`) and, for a network that learns its variance
        (improved-DDPM's "learned range": every OpenAI checkpoint), the variance half of its output ``v`` in
        model units (interpolating log beta_t and the log posterior variance by ``(v + 1) / 2``; see
        :func:`diffaug.sampling.learned_variance`), from the same network call; ``None`` for other networks."""
        t, out = self._mixed_output(x_t, t, y, cond_weight, validate, keep_variance=True)
        c = x_t.shape[1]
        v = out[:, c:] if out.shape[1] == 2 * c else None
        out = out[:, :c]
        a = schedule._gather(self.alpha_bar, t, out)
        return schedule.eps_from_model_output(out, x_t.float(), a, self.prediction_type), v

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor, *,
                 validate: bool = True) -> torch.Tensor:
        """Forward-diffuse model-space images ``x0`` to integer times ``t`` with the given noise."""
        t = self._timesteps(t, x0.shape[0], x0.device, validate)
        return schedule.q_sample(x0, t, noise, self.alpha_bar)

    # ------------------------------------------------------------------ adapters
    @classmethod
    def from_diffusers(
        cls, unet: nn.Module, scheduler, *, num_classes: int | None = None, null_class: int | None = None
    ) -> "Denoiser":
        """Wrap a diffusers ``UNet2DModel`` and a DDPM-family scheduler (any with ``alphas_cumprod``).

        For a class-conditional UNet (``num_class_embeds`` set), ``num_classes`` defaults to
        ``num_class_embeds``; pass ``num_classes`` and ``null_class`` if one embedding is the "no class" label.
        The scheduler is only read (its ``alphas_cumprod`` and ``prediction_type``), never stepped.
        """
        cfg = unet.config
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        embeds = cfg.get("num_class_embeds")
        if num_classes is None and embeds is not None:
            num_classes = embeds if null_class is None else null_class
        size = cfg.get("sample_size")
        image_size = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
        den = cls(
            _DiffusersUNet(unet),
            schedule.alpha_bar_from_scheduler(scheduler),
            prediction_type,
            image_size=image_size,
            channels=cfg["in_channels"],
            num_classes=num_classes,
            null_class=null_class,
        )
        den.scheduler_config = dict(scheduler.config, _class_name=type(scheduler).__name__)
        return den

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: torch.device | str | None = None,
                        speed: "accel.Speed | None" = None) -> "Denoiser":
        """Load a diffusers folder in either layout ``save_pretrained`` writes, on ``device``, set up with ``speed``
        (:class:`~diffaug.utils.accel.Speed`) if given (:func:`load_denoiser` also takes the shipped names).

        * pipeline layout (as diffaug writes it): ``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors``
          and ``scheduler/scheduler_config.json``;
        * single-model layout: ``config.json``, ``diffusion_pytorch_model.safetensors`` and ``scheduler_config.json``
          side by side (``UNet2DModel.save_pretrained(d)`` and ``DDPMScheduler.save_pretrained(d)`` into one ``d``).

        Only safetensors weights are read (never pickles); nothing is fetched from a hub. A folder holding
        ``adm.json`` is an OpenAI (ADM) checkpoint's (:meth:`_from_adm_folder`).
        """
        folder = Path(path)
        if folder.is_file():
            raise InputError(f"denoiser {folder} is a file: give a denoiser folder (diffusers layout, "
                             f"train-diffusion's output, or one with {ADM_FILE}) or an OpenAI checkpoint file "
                             f"({', '.join(OPENAI_SUFFIXES)}; diffaug.load_denoiser reads those)")
        if not folder.is_dir():
            raise InputError(f"denoiser folder {folder} does not exist; train one with `diffaug train-diffusion`")
        den = cls._from_adm_folder(folder) if (folder / ADM_FILE).is_file() else cls._from_diffusers_folder(folder)
        den = den.to(device) if device is not None else den
        return speed.apply(den) if speed is not None else den

    @classmethod
    def _from_diffusers_folder(cls, folder: Path) -> "Denoiser":
        """A diffusers folder in either layout (see :meth:`from_pretrained`)."""
        from diffusers import UNet2DModel

        from .utils.checkpoint import load_state, read_safetensors

        unet_dir, sched_dir = _diffusers_layout(folder)
        unet_cfg_path = unet_dir / UNET_CONFIG
        weights_path = unet_dir / UNET_WEIGHTS
        sched_path = sched_dir / SCHEDULER_CONFIG
        if not weights_path.is_file():
            hint = (
                "; only safetensors are loaded: re-save the UNet with save_pretrained(..., safe_serialization=True)"
                if (unet_dir / "diffusion_pytorch_model.bin").exists()
                else "; write the UNet's weights with UNet2DModel.save_pretrained (or copy the folder again whole)"
            )
            raise InputError(f"incomplete denoiser folder {folder}: missing {weights_path.relative_to(folder)}{hint}")
        unet_cfg = _read_json(unet_cfg_path)
        if unet_cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
            raise InputError(f"{unet_cfg_path} describes a {unet_cfg['_class_name']}; diffaug loads UNet2DModel folders")
        with private_seed(0):  # the initial weights are overwritten; the caller's global RNG is left as it was
            unet = UNet2DModel.from_config(unet_cfg)
        load_state(unet, read_safetensors(weights_path), weights_path)
        unet.eval()
        scheduler = _scheduler_from_config(_read_json(sched_path), sched_path)
        meta = _read_json(folder / META_FILE) if (folder / META_FILE).is_file() else {}
        return cls.from_diffusers(unet, scheduler, num_classes=meta.get("num_classes"),
                                  null_class=meta.get("null_class"))

    @classmethod
    def from_guided_diffusion(cls, path: str | os.PathLike, preset: str | None = None, *,
                              noise_schedule: str | None = None, diffusion_steps: int | None = None,
                              rescale_timesteps: bool | None = None, predict_xstart: bool | None = None,
                              **flags) -> "Denoiser":
        """Load an OpenAI guided-diffusion / improved-diffusion checkpoint into the project's ADM UNet.

        Args:
            path: the ``.pt`` state dict (read with ``torch.load(..., weights_only=True)``: pickled objects are
                refused, never run) or a ``.safetensors`` file with the same keys.
            preset: a name in ``diffaug.nets.adm.PRESETS`` (e.g. ``"256x256_diffusion_uncond"``, the paper's model),
                giving the network flags and the schedule; flags and the schedule arguments override it. With
                neither a preset nor network flags, the preset whose network has the checkpoint's keys and shapes
                (:func:`diffaug.nets.adm.matching_presets`; an error unless exactly one does).
            noise_schedule, diffusion_steps, rescale_timesteps, predict_xstart: the diffusion flags of the
                original scripts (``predict_xstart=True``: the network predicts x0).
            **flags: network flags of ``diffaug.nets.adm.ADMConfig`` (image_size, num_channels, num_res_blocks,
                channel_mult, attention_resolutions, num_heads, num_head_channels, num_heads_upsample,
                learn_sigma, class_cond, use_scale_shift_norm, resblock_updown, use_new_attention_order,
                dropout), in every form the original ``create_model`` accepts (``channel_mult=""`` for the image
                size's default, comma strings or tuples, ``"True"``); the runtime-only flags of
                ``model_and_diffusion_defaults()`` (``use_fp16``, ``use_checkpoint``, ``timestep_respacing``,
                ``use_kl``, ``rescale_learned_sigmas``) are accepted and ignored, so its dict passes through whole.
        """
        from .nets.adm import (DIFFUSION_FLAGS, PRESETS, RUNTIME_ONLY_FLAGS, ADMUNet, adm_config, check_adm_state,
                               matching_presets, parse_flag, read_adm_state)

        state = read_adm_state(path)
        if preset is None and not set(flags) - DIFFUSION_FLAGS - RUNTIME_ONLY_FLAGS:  # no network flags: published?
            found = matching_presets(state)
            if len(found) != 1:
                raise InputError(
                    f"{path} fits {' and '.join(found) if found else 'none'} of the ADM presets "
                    f"({', '.join(PRESETS)}); "
                    f"name its preset or flags: Denoiser.from_guided_diffusion(path, preset, **flags), or for the "
                    f"command line a folder holding {ADM_FILE} such as "
                    '{"checkpoint": "/path/model.pt", "preset": "..."} or {"checkpoint": ..., "flags": {...}, '
                    '"noise_schedule": "cosine"} (see the README)')
            preset = found[0]
        config, base = adm_config(preset, **flags)
        noise_schedule = noise_schedule or (base.noise_schedule if base else "linear")
        steps = int(diffusion_steps or (base.diffusion_steps if base else 1000))
        rescale = (parse_flag("rescale_timesteps", rescale_timesteps) if rescale_timesteps is not None
                   else (base.rescale_timesteps if base else False))
        prediction_type = "sample" if parse_flag("predict_xstart", predict_xstart) else "epsilon"
        alpha_bar = schedule.named_alpha_bar(noise_schedule, steps)
        with private_seed(0):  # as in load_denoiser: the caller's global RNG is untouched
            net = ADMUNet(config, time_scale=1000.0 / steps if rescale else 1.0)
        check_adm_state(state, net, path)
        net.load_state_dict(state)
        return cls(net.eval(), alpha_bar, prediction_type, image_size=(config.image_size, config.image_size),
                   channels=config.in_channels, num_classes=config.num_classes if config.class_cond else None)

    @classmethod
    def _from_adm_folder(cls, folder: Path) -> "Denoiser":
        """An OpenAI checkpoint described by ``folder/adm.json``: the arguments of :meth:`from_guided_diffusion`
        (``preset``, ``flags`` and the diffusion flags) and ``checkpoint``, the weights file (absolute, or relative
        to the folder; default ``model.safetensors``, what :meth:`save_pretrained` writes)."""
        args = _read_json(folder / ADM_FILE)
        if not isinstance(args, dict) or not isinstance(args.get("flags", {}), dict):
            raise InputError(f"{folder / ADM_FILE} must hold a JSON object with an object under \"flags\"")
        args = dict(args)
        checkpoint = folder / args.pop("checkpoint", ADM_WEIGHTS)  # an absolute path stays as it is
        if not checkpoint.is_file():
            raise InputError(f"{folder / ADM_FILE} names the checkpoint {checkpoint}, which does not exist; fix its "
                             "\"checkpoint\" entry")
        flags = args.pop("flags", {})
        meta = _read_json(folder / META_FILE) if (folder / META_FILE).is_file() else {}
        den = cls.from_guided_diffusion(checkpoint, args.pop("preset", None), **args, **flags)
        if meta.get("null_class") is not None:
            den.null_class = meta["null_class"]
        return den

    def _adm_arguments(self) -> dict:
        """What :meth:`_from_adm_folder` needs to rebuild this ADM denoiser (the schedule found by name)."""
        import dataclasses

        names = [n for n in ("linear", "cosine")
                 if torch.allclose(schedule.named_alpha_bar(n, self.num_timesteps).float().cpu(),
                                   self.alpha_bar.float().cpu(), rtol=1e-5, atol=0)]
        if not names:
            raise InputError("save_pretrained: this ADM denoiser's schedule is neither OpenAI's linear nor cosine one; "
                             "keep its checkpoint and load it with from_guided_diffusion")
        return {"checkpoint": ADM_WEIGHTS, "flags": dataclasses.asdict(self.net.config), "noise_schedule": names[0],
                "diffusion_steps": self.num_timesteps, "rescale_timesteps": self.net.time_scale != 1.0,
                "predict_xstart": self.prediction_type == "sample"}

    def save_pretrained(self, path: str | os.PathLike, *, extra: dict | None = None) -> None:
        """Write this denoiser as a folder :func:`load_denoiser` reads: ``unet/``, ``scheduler/`` and
        ``diffaug.json`` for a diffusers UNet; ``model.safetensors``, ``adm.json`` (its flags and schedule) and
        ``diffaug.json`` for an ADM network (an OpenAI checkpoint, so the command line can use it as a folder).

        ``unet/`` and ``scheduler/`` are each built in a temporary folder and swapped into place, so a crash
        never leaves a torn sub-folder; other files in ``path`` (e.g. a training checkpoint) are kept.
        """
        from diffusers import DDPMScheduler

        from .nets.adm import ADMUNet
        from .utils.checkpoint import atomic_folder, save_safetensors, write_json

        if isinstance(self.net, ADMUNet):
            arguments = self._adm_arguments()
            path = Path(path)
            save_safetensors({k: v.detach().float().contiguous() for k, v in self.net.state_dict().items()},
                             path / ADM_WEIGHTS)
            write_json(path / ADM_FILE, arguments)  # after the weights: its presence makes the folder an ADM one
            write_json(path / META_FILE, {"num_classes": self.num_classes, "null_class": self.null_class,
                                          **(extra or {})})
            return
        if not isinstance(self.net, _DiffusersUNet):
            raise InputError("save_pretrained supports denoisers built from a diffusers UNet2DModel or an ADM "
                             "network (from_guided_diffusion)")
        unet = self.net.unet
        scheduler_config = self.scheduler_config or dict(
            DDPMScheduler(num_train_timesteps=self.num_timesteps, prediction_type=self.prediction_type,
                          trained_betas=_betas_from_alpha_bar(self.alpha_bar).tolist()).config,
            _class_name="DDPMScheduler",
        )
        path = Path(path)
        with atomic_folder(path / UNET_DIR) as tmp:
            write_json(tmp / UNET_CONFIG, dict(unet.config, _class_name="UNet2DModel"))
            save_safetensors({k: v.detach().float().contiguous() for k, v in unet.state_dict().items()},
                             tmp / UNET_WEIGHTS)
        with atomic_folder(path / SCHEDULER_DIR) as tmp:
            write_json(tmp / SCHEDULER_CONFIG, scheduler_config)
        write_json(path / META_FILE, {"num_classes": self.num_classes, "null_class": self.null_class,
                                      **(extra or {})})


def _diffusers_layout(folder: Path) -> tuple[Path, Path]:
    """``(unet_dir, scheduler_dir)`` of a diffusers folder: sub-folders ``unet/`` and ``scheduler/``, or the folder
    itself for a single-model folder (each part looked up on its own, so mixed layouts load too)."""
    unet_dir = folder / UNET_DIR if (folder / UNET_DIR / UNET_CONFIG).is_file() else folder
    sched_dir = folder / SCHEDULER_DIR if (folder / SCHEDULER_DIR / SCHEDULER_CONFIG).is_file() else folder
    missing = [name for name, p in (("unet/" + UNET_CONFIG, unet_dir / UNET_CONFIG),
                                    ("scheduler/" + SCHEDULER_CONFIG, sched_dir / SCHEDULER_CONFIG)) if not p.is_file()]
    if missing:
        raise InputError(f"incomplete denoiser folder {folder}: missing {' and '.join(missing)} (or, for a single-model "
                         f"folder, {' and '.join(m.split('/')[1] for m in missing)} beside the weights); write it with "
                         "UNet2DModel.save_pretrained and DDPMScheduler.save_pretrained")
    return unet_dir, sched_dir


def _betas_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    a = alpha_bar.double().cpu()
    return 1 - a / torch.cat([a.new_ones(1), a[:-1]])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}; the file is damaged") from None


def _scheduler_from_config(cfg: dict, path: Path):
    import diffusers

    name = cfg.get("_class_name", "DDPMScheduler")
    scheduler_cls = getattr(diffusers, name, None)
    if scheduler_cls is None or not name.endswith("Scheduler"):
        raise InputError(f"{path} names an unknown scheduler {name!r}; use a diffusers DDPM-family scheduler")
    scheduler = scheduler_cls.from_config(cfg)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise InputError(f"{path}: {name} has no alphas_cumprod; use a DDPM-family scheduler (DDPM, DDIM, ...)")
    return scheduler


def load_denoiser(name_or_path: str | os.PathLike = "digits", *, device: torch.device | str | None = None,
                  speed: "accel.Speed | None" = None) -> Denoiser:
    """Load a shipped denoiser by name (``"digits"``), a saved folder (diffusers layout, or an ADM folder with
    ``adm.json``: :meth:`Denoiser.save_pretrained`) or a published OpenAI guided- / improved-diffusion checkpoint
    file (``.pt`` / ``.safetensors`` of one of ``diffaug.nets.adm.PRESETS``, recognised by its keys and shapes), in
    eval mode, on ``device``, set up with ``speed`` (:class:`~diffaug.utils.accel.Speed`: precision,
    channels_last, compile) if given.

    Nothing is downloaded; a missing or incomplete folder is an :class:`InputError` (never a fallback).
    """
    key = str(name_or_path)
    path = SHIPPED.get(key, Path(key))
    if key not in SHIPPED and not Path(key).exists() and os.sep not in key and "." not in key:
        raise InputError(f"unknown denoiser {key!r}: name one of {sorted(SHIPPED)} or a folder path")
    if path.is_file() and path.suffix.lower() in OPENAI_SUFFIXES:  # a published OpenAI checkpoint: its preset
        den = Denoiser.from_guided_diffusion(path).eval()            # is found from its keys and shapes
    else:
        den = Denoiser.from_pretrained(path).eval()
    den = den.to(device) if device is not None else den
    return speed.apply(den) if speed is not None else den
