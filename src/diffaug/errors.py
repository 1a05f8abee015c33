"""The one exception type for bad input, so callers and the CLI can tell it from bugs."""


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
