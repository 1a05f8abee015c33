"""The 2-D toy's epsilon-model: an MLP on a point and a time embedding."""

from __future__ import annotations

import torch
from torch import nn

from .embedding import timestep_embedding


class PointEpsModel(nn.Module):
    """``net(x [N, 2, 1, 1], t, y) -> eps [N, 2, 1, 1]``: an MLP on the point and a time embedding."""

    def __init__(self, hidden: int = 128, emb_dim: int = 32):
        super().__init__()
        self.emb_dim = emb_dim
        self.mlp = nn.Sequential(nn.Linear(2 + emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, t, y=None):
        h = torch.cat([x.flatten(1), timestep_embedding(t, self.emb_dim)], dim=1)
        return self.mlp(h).view_as(x)
