"""The guidance classifiers' network: a small CNN whose blocks are FiLM-conditioned on a sinusoidal embedding of t."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import timestep_embedding


class _FiLMBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = F.silu(self.norm1(self.conv1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(self.conv2(h)) * (1 + scale) + shift)
        return h + self.skip(x)


class TimeConditionedCNN(nn.Module):
    """``net(x, t) -> logits``: FiLM-conditioned CNN, two stages (full and half resolution), global pooling."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, emb_dim: int = 64):
        super().__init__()
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        groups = 8 if width % 8 == 0 else 1
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.block1 = _FiLMBlock(width, width, emb_dim, groups)
        self.block2 = _FiLMBlock(width, 2 * width, emb_dim, groups)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim))
        h = self.block1(self.stem(x), emb)
        h = self.block2(F.avg_pool2d(h, 2) if min(h.shape[-2:]) >= 4 else h, emb)
        return self.head(h.mean((2, 3)))
