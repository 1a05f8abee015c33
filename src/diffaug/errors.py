"""The one exception type for bad input, so callers and the CLI can tell it from bugs, and the checks of an image
batch at the public API (float ``[N, C, H, W]`` in [0, 1]) that every entry point shares."""

import math

import torch


class InputError(ValueError):
    """Bad input to diffaug: the message names the problem and the fix, in one line."""


class StorageError(OSError):
    """A write failed for lack of space (or quota): the message names the file and says the old one is intact."""


def channels_hint(shape: tuple, channels: int) -> str:
    """The fix for an image batch whose dim 1 is not ``channels``: a channels-last ``[N, H, W, C]`` tensor (its
    last dim is ``channels``) needs a permute, anything else a conversion."""
    if len(shape) == 4 and shape[-1] == channels and shape[1] != channels:
        return (f"it looks channels-last [N, H, W, C] = {tuple(shape)}: permute it to [N, C, H, W] with "
                "x.permute(0, 3, 1, 2)")
    return "convert the images (e.g. grayscale <-> RGB) first"


def check_image_batch(x, name: str = "x") -> None:
    """One-line :class:`InputError` unless ``x`` is a float tensor ``[N, C, H, W]`` (a model checks its own channels
    and size on top). Host metadata only: no host-device synchronisation."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a float tensor in [0, 1], got dtype {x.dtype}; use x.float() / 255")
    if x.ndim != 4:
        raise InputError(f"{name} must have shape [N, C, H, W], got {tuple(x.shape)}; add a batch dim with x[None]")


def check_image_values(x: torch.Tensor, name: str = "x") -> None:
    """One-line :class:`InputError` unless the values of ``x`` are finite and in [0, 1] (one host-device sync)."""
    if x.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()  # NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"{name} contains NaN or Inf values; clean the input first")
    if lo < 0 or hi > 1:
        raise InputError(f"{name} must lie in [0, 1], got min {lo:.4g} max {hi:.4g}; rescale it (e.g. x / 255)")
