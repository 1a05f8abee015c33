"""The sinusoidal timestep embedding shared by every time-conditioned network here (ADM's, the guidance CNN's,
the 2-D toy's)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[N, dim]``: ``[cos(t w_i), sin(t w_i)]`` with ``w_i = max_period^(-i / half)``, ``half = dim // 2``.

    ``t`` may hold integer or float timesteps; an odd ``dim`` gets one zero column, as in guided-diffusion's
    ``timestep_embedding``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb
