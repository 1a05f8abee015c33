"""Seeded construction without touching the caller's global RNG."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def private_seed(seed: int | None):
    """Run a block (e.g. a model's constructor, which initialises from the global RNG) under ``seed``, then
    restore the global CPU RNG as it was. ``seed=None`` runs the block unchanged."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
