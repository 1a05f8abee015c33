"""A 2-D demonstration of one-step denoising (the paper's Figure 5).

Data: scikit-learn's two moons (scaled to about [-1, 1]). A small MLP epsilon-model with a sinusoidal time
embedding is trained on the linear DDPM schedule (T = 1000) wrapped in a :class:`~diffaug.Denoiser` (points are
``[N, 2, 1, 1]`` "images"), then points are diffused to t and denoised in one step. The figure shows data, noised
points and their one-step estimates; ``distances`` gives each set's mean distance to the nearest data point.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..denoiser import Denoiser
from ..nets.toy import PointEpsModel
from ..utils.figures import save_figure
from .. import schedule


def moons(n: int, seed: int) -> torch.Tensor:
    from sklearn.datasets import make_moons

    pts, _ = make_moons(n, noise=0.05, random_state=seed)
    pts = (pts - pts.mean(0)) / pts.std(0) * 0.5
    return torch.tensor(pts, dtype=torch.float32)


def train_toy(*, steps: int = 3000, batch_size: int = 256, seed: int = 0) -> tuple[Denoiser, torch.Tensor]:
    """Train the 2-D model on 2000 moon points; returns the denoiser and the data."""
    from ..utils.seeding import private_seed

    data = moons(2000, seed)
    with private_seed(seed):
        net = PointEpsModel()
    den = Denoiser(net, schedule.linear_alpha_bar(1000), "epsilon", image_size=(1, 1), channels=2)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0 = data[torch.randint(0, len(data), (batch_size,), generator=gen)].view(-1, 2, 1, 1)
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = F.mse_loss(den.model_output(den.q_sample(x0, t, noise), t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return den.eval(), data


def nearest_distance(points: torch.Tensor, data: torch.Tensor) -> float:
    """Mean Euclidean distance from each point to its nearest data point."""
    return float(torch.cdist(points, data).min(1).values.mean())


@torch.no_grad()
def toy_demo(out: str | Path, *, times=(50, 150, 300), n: int = 300, steps: int = 3000, seed: int = 0) -> dict:
    """Train, diffuse ``n`` data points to each t, denoise in one step, plot; returns the distances per t.

    Per t: ``noisy`` = mean distance of ``x_t / sqrt(alpha_bar_t)`` (the noised point on the data's scale) to
    the nearest data point, ``one_step`` = the same for the one-step estimate ``x0_hat``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.enable_grad():
        den, data = train_toy(steps=steps, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = data[torch.randperm(len(data), generator=gen)[:n]].view(-1, 2, 1, 1)
    result = {"seed": seed, "steps": steps, "n": n, "per_t": []}
    fig, axes = plt.subplots(2, len(times), figsize=(3.3 * len(times), 6.4), sharex=True, sharey=True, squeeze=False)
    for j, t in enumerate(times):
        tt = torch.full((n,), t)
        x_t = den.q_sample(x0, tt, torch.randn(x0.shape, generator=gen))
        noisy = (x_t / den.alpha_bar[t].sqrt()).flatten(1)
        x0_hat = den.predict_x0(x_t, tt).flatten(1)
        result["per_t"].append({"t": t, "noisy": nearest_distance(noisy, data),
                                "one_step": nearest_distance(x0_hat, data)})
        for i, (pts, title) in enumerate(((noisy, f"noised, t={t}"), (x0_hat, f"one-step x0_hat, t={t}"))):
            ax = axes[i, j]
            ax.scatter(data[:, 0], data[:, 1], s=2, c="0.8")
            ax.scatter(pts[:, 0], pts[:, 1], s=3)
            ax.set_title(title, fontsize=9)
            ax.set_xlim(-2, 2)
            ax.set_ylim(-2, 2)
    save_figure(fig, out)
    return result
