"""Running the networks fast: reduced-precision autocast, channels_last, ``torch.compile``, pinned host memory.

One switch for every network the project runs. :func:`accelerate` sets a :class:`~diffaug.denoiser.Denoiser`'s
or :class:`~diffaug.classifier.Classifier`'s ``precision`` (their forward passes then run under
``torch.autocast`` and return float32) and ``channels_last`` flag (weights and inputs in NHWC), and can compile
the inner network with ``nn.Module.compile`` (in place: parameter names, state dicts and checkpoints stay the
same). Attention in the project's ADM UNet and in diffusers' UNets already uses PyTorch's
scaled-dot-product attention (flash / memory-efficient kernels on GPUs).

bfloat16 is the default reduced precision: it keeps float32's range, so training needs no loss scaling;
float16 is available (training then uses ``torch.amp.GradScaler``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError

PRECISIONS = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (``fp32`` / ``bf16`` / ``fp16`` or the long names); None for fp32."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
    return PRECISIONS[precision]


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device``'s type (a no-op context for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in NHWC memory order when ``channels_last`` and it is a 4-D tensor; otherwise ``x`` unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


@dataclass(frozen=True)
class Speed:
    """Settings for :func:`accelerate`, validated when made (so a bad name fails before any work)."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self):
        autocast_dtype(self.precision)

    def apply(self, model: nn.Module) -> nn.Module:
        """``accelerate(model, ...)`` with these settings."""
        return accelerate(model, precision=self.precision, channels_last=self.channels_last, compile=self.compile)


def accelerate(model: nn.Module, *, precision: str = "fp32", channels_last: bool = False,
               compile: bool = False, compile_mode: str | None = None) -> nn.Module:
    """Set up a Denoiser or Classifier for fast inference/training, in place; returns ``model``.

    Args:
        model: a :class:`~diffaug.denoiser.Denoiser` or :class:`~diffaug.classifier.Classifier` (any other
            module is only converted to channels_last / compiled; wrap its calls in :func:`autocast` yourself).
        precision: ``fp32`` (default), ``bf16`` or ``fp16``: the autocast dtype of the forward pass. Weights stay
            float32; outputs are float32.
        channels_last: store weights and feed inputs in NHWC order (faster convolutions on tensor cores).
        compile: compile the inner network with ``torch.compile`` (first calls are slow while it compiles).
        compile_mode: ``torch.compile``'s ``mode`` (e.g. ``"max-autotune"``).
    """
    autocast_dtype(precision)  # validate the name first
    inner = next((getattr(model, a) for a in ("net", "features") if isinstance(getattr(model, a, None), nn.Module)),
                 model)
    if hasattr(model, "precision"):
        model.precision = precision
    if hasattr(model, "channels_last"):
        model.channels_last = channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        if not isinstance(inner, nn.Module):
            raise InputError(f"cannot compile a {type(inner).__name__}; compile needs an nn.Module network")
        inner.compile(mode=compile_mode)
    return model


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for float16 training; a disabled scaler (a pass-through) for fp32 and bf16, whose range
    needs none. Its ``state_dict()`` belongs in the checkpoint, so a resumed run scales as the original did."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=autocast_dtype(precision) is torch.float16)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                   clip_params=None, max_norm: float = 0.0, set_to_none: bool = True) -> None:
    """``zero_grad``, backward of the (scaled) loss, optional gradient-norm clipping of the true (unscaled)
    gradients, and the optimiser step (skipped by the scaler when float16 gradients overflowed). No host sync.
    ``set_to_none=False`` zeroes gradients in place (DDP with gradients as bucket views needs it)."""
    opt.zero_grad(set_to_none=set_to_none)
    scaler.scale(loss).backward()
    if max_norm:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(clip_params, max_norm)
    scaler.step(opt)
    scaler.update()


def losses_to_host(rows: list[dict], key: str = "loss") -> list[dict]:
    """Replace the device scalars ``row[key]`` of a log by floats, with one host-device copy for all of them
    (training loops keep losses on the device between log writes so a step never waits for the GPU)."""
    if rows:
        for row, value in zip(rows, torch.stack([r[key].detach().float() for r in rows]).tolist()):
            row[key] = value
    return rows


def pinned(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` in page-locked host memory when it is bound for a CUDA device (so copies can overlap compute)."""
    if torch.device(device).type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
        return x.pin_memory()
    return x


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy host data to ``device``: from pinned memory and without blocking the host when it is a GPU."""
    return pinned(x, device).to(device, non_blocking=True)
