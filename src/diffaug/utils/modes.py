"""Train / eval mode of a user's module, borrowed and given back."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Put ``model`` in eval mode for the block and give every submodule its own mode back afterwards (a model
    training with a frozen, eval-mode BatchNorm keeps it so), as evaluation helpers in a training loop must."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
