"""Generation metrics from features of a network trained on the real data (Inception weights cannot be fetched
here, so FID / IS are computed in the feature space of a classifier trained on the data's own train split; the
numbers compare samplers with each other, not with published ImageNet figures).

* FID: Frechet distance between Gaussians fitted to real and generated features (matrix square root by SciPy);
* IS-style score: ``exp(E_x KL(p(y | x) || p(y)))`` with the judge's softmax;
* precision / recall (Kynkaanniemi et al. 2019, k = 3): share of generated samples inside the real manifold (the
  union of balls reaching each real feature's k-th nearest real neighbour) and vice versa;
* accuracy: share of generated samples the judge assigns to their target class.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between feature sets ``[N, D]`` and ``[M, D]``."""
    from scipy import linalg

    a, b = real.double().numpy(), fake.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as the reference implementation does
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_style_score(probs: torch.Tensor) -> float:
    """``exp(mean KL(p(y|x) || p(y)))`` of softmax rows ``[N, K]`` (1 = no information, K = best)."""
    p = probs.double().clamp(min=1e-12)
    marginal = p.mean(0, keepdim=True)
    return float(torch.exp((p * (p.log() - marginal.log())).sum(1).mean()))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al.) of feature sets ``[N, D]``, ``[M, D]``; each set needs
    more than ``k`` points (a point's radius is the distance to its k-th neighbour)."""
    if min(len(real), len(fake)) <= k:
        raise InputError(f"precision / recall with k = {k} neighbours need more than {k} real and generated images, "
                         f"got {len(real)} and {len(fake)}; use more test images or a larger --per-class")

    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # the 0-th neighbour is the point itself

    def coverage(ref, query):
        return float((torch.cdist(query, ref) <= radii(ref)[None]).any(1).float().mean())

    real, fake = real.double(), fake.double()
    return coverage(real, fake), coverage(fake, real)


@torch.no_grad()
def generation_metrics(judge, real_images: torch.Tensor, fake_images: torch.Tensor, fake_labels: torch.Tensor,
                       k: int = 3) -> dict:
    """FID, IS-style score, precision, recall and target-class accuracy of generated images (all in [0, 1]).

    ``judge``: a :class:`~diffaug.Classifier` trained on the real data (its penultimate features and softmax).
    """
    real_f = judge.forward_features(real_images).flatten(1).cpu()
    fake_f = judge.forward_features(fake_images).flatten(1).cpu()
    logits = judge(fake_images)
    precision, recall = precision_recall(real_f, fake_f, k)
    return {"fid": frechet_distance(real_f, fake_f), "is": inception_style_score(logits.softmax(1).cpu()),
            "precision": precision, "recall": recall,
            "accuracy": float((logits.argmax(1).cpu() == fake_labels.cpu()).float().mean())}
