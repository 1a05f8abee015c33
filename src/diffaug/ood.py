"""Out-of-distribution detection: post-hoc scores on a classifier's penultimate features, and metrics.

Every score is "higher = more in-distribution". Scores (OpenOOD defaults):

* ``msp``: max softmax probability; ``energy``: ``logsumexp(logits)``.
* ``react``: clip features at the p-th percentile (p = 90) of ID-validation activations, then energy.
* ``ash_p`` / ``ash_b`` / ``ash_s``: keep the top (100 - p) % entries of each feature vector (p = 90); ASH-P
  leaves them as they are, ASH-B sets them to ``s1 / k`` (``s1`` the sum before pruning, k kept entries), ASH-S
  scales them by ``exp(s1 / s2)`` (``s2`` the sum after pruning); then energy.
* ``scale``: scale the *unpruned* features by ``exp(s1 / s2)`` with the top (100 - p) % (p = 85), then energy.

A model is split into ``features`` (``[N, D]`` penultimate activations) and a final linear ``head``:
``diffaug.Classifier`` (every model diffaug trains), timm models (``forward_features`` + ``forward_head``) and
torchvision-style models with an ``fc`` Linear are recognised; anything else can be registered with
:func:`register_splitter` or wrapped in ``diffaug.Classifier``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .utils.modes import evaluating

SCORES = ("msp", "energy", "react", "ash_p", "ash_b", "ash_s", "scale")
DEFAULT_PERCENTILE = {"react": 90.0, "ash_p": 90.0, "ash_b": 90.0, "ash_s": 90.0, "scale": 85.0}
# the paper's Table 3 columns, as OpenOOD v1.5 computes them (the paper used OpenOOD): its "ASH" is ASH-B
# (ASHNet.forward_threshold calls ash_b; checked against OpenOOD's own postprocessors on the same features)
PAPER_SCORES = ("ash_b", "msp", "react", "scale")

_SPLITTERS: list[tuple[type, Callable]] = []


def register_splitter(model_type: type, split: Callable[[nn.Module], tuple[Callable, nn.Linear]]) -> None:
    """Teach :func:`split_model` a model type: ``split(model) -> (features_fn, head_linear)`` where
    ``features_fn(x)`` returns ``[N, D]`` penultimate features and ``head_linear(features)`` the logits."""
    _SPLITTERS.insert(0, (model_type, split))


def split_model(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Linear]:
    """``(features_fn, head)`` for a classifier; raises an error that says how to register unknown models."""
    from .classifier import Classifier

    for model_type, split in _SPLITTERS:
        if isinstance(model, model_type):
            return split(model)
    if isinstance(model, Classifier) and isinstance(model.head, nn.Linear):
        return model.forward_features, model.head
    head = getattr(model, "get_classifier", lambda: None)()
    if isinstance(head, nn.Linear) and hasattr(model, "forward_head"):  # timm
        return (lambda x: model.forward_head(model.forward_features(x), pre_logits=True)), head
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):  # torchvision ResNet-style: everything but fc
        def features(x):
            saved = model.fc
            model.fc = nn.Identity()
            try:
                return model(x)
            finally:
                model.fc = saved
        return features, fc
    raise InputError(f"cannot find the penultimate layer of {type(model).__name__}; wrap it in diffaug.Classifier "
                     "or call diffaug.ood.register_splitter(ModelType, split)")


def _energy(head: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(head(features), dim=1)


def _top_k(features: torch.Tensor, percentile: float) -> torch.Tensor:
    """Mask ``[N, D]`` of each row's top ``D - round(D * p / 100)`` entries."""
    d = features.shape[1]
    k = max(1, d - int(round(d * percentile / 100.0)))
    idx = features.topk(k, dim=1).indices
    return torch.zeros_like(features, dtype=torch.bool).scatter_(1, idx, True)


def score_features(features: torch.Tensor, head: nn.Linear, method: str, *, percentile: float | None = None,
                   react_threshold: float | None = None) -> torch.Tensor:
    """Scores ``[N]`` (higher = more ID) from penultimate features ``[N, D]`` and the final linear layer."""
    if method not in SCORES:
        raise InputError(f"unknown OOD score {method!r}; use one of {', '.join(SCORES)}")
    p = DEFAULT_PERCENTILE.get(method) if percentile is None else percentile
    if p is not None and not 0 < p < 100:
        raise InputError(f"percentile must lie in (0, 100), got {p}")
    if method == "msp":
        return head(features).softmax(dim=1).amax(dim=1)
    if method == "energy":
        return _energy(head, features)
    if method == "react":
        if react_threshold is None:
            raise InputError("react needs a threshold fitted on ID-validation features; use OODScorer.fit")
        return _energy(head, features.clamp(max=react_threshold))
    keep = _top_k(features, p)
    s1 = features.sum(dim=1, keepdim=True)
    pruned = features * keep
    if method == "ash_p":
        return _energy(head, pruned)
    if method == "ash_b":
        return _energy(head, keep * (s1 / keep.sum(dim=1, keepdim=True)))
    s2 = pruned.sum(dim=1, keepdim=True)
    if method == "ash_s":
        return _energy(head, pruned * torch.exp(s1 / s2))
    return _energy(head, features * torch.exp(s1 / s2))  # scale


class OODScorer:
    """Scores images with one of :data:`SCORES` on a classifier (images ``[N, C, H, W]`` in [0, 1]).

    ``fit(id_val_images)`` sets ReAct's clipping threshold (the p-th percentile of all ID-validation feature
    activations); the other scores need no fitting. ``features(images)``, ``fit_features(features)`` and
    ``score(features)`` do the same from penultimate features computed once (e.g. batch by batch from a stream)
    and shared by every score.
    """

    def __init__(self, model: nn.Module, method: str, *, percentile: float | None = None):
        if method not in SCORES:
            raise InputError(f"unknown OOD score {method!r}; use one of {', '.join(SCORES)}")
        self.features, self.head = split_model(model)
        self.model, self.method = model, method
        self.percentile = DEFAULT_PERCENTILE.get(method) if percentile is None else percentile
        if self.percentile is not None and not 0 < self.percentile < 100:
            raise InputError(f"percentile must lie in (0, 100), got {self.percentile}")
        self.react_threshold: float | None = None

    @torch.no_grad()
    def features_of(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Penultimate features ``[N, D]`` of images ``[N, C, H, W]``, ``batch_size`` at a time."""
        if images.shape[0] == 0:
            raise InputError("an empty image set cannot be scored; check the ID/OOD folders")
        with evaluating(self.model):  # the model's own modes come back: scoring mid-training leaves it training
            return torch.cat([self.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


    def fit(self, id_val_images: torch.Tensor) -> "OODScorer":
        if self.method == "react":
            self.fit_features(self.features_of(id_val_images))
        return self

    def fit_features(self, id_val_features: torch.Tensor) -> "OODScorer":
        """:meth:`fit` from ID-validation features ``[N, D]``."""
        if self.method == "react":
            feats = id_val_features.flatten().float().cpu().numpy()
            self.react_threshold = float(np.percentile(feats, self.percentile))
        return self

    @torch.no_grad()
    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Scores ``[N]`` (CPU, float32) from penultimate features ``[N, D]``."""
        return score_features(features, self.head, self.method, percentile=self.percentile,
                              react_threshold=self.react_threshold).float().cpu()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.score(self.features_of(images))


def metrics(id_scores, ood_scores) -> dict[str, float]:
    """AUROC, FPR@95, AUPR-In and AUPR-Out of scores where higher means "more in-distribution".

    OpenOOD v1.5 conventions: OOD is the positive class for AUROC and FPR@95; FPR@95 is the fraction of ID
    samples flagged as OOD at the threshold where 95 % of OOD samples are flagged; AUPR-In takes ID as positive
    with the score, AUPR-Out OOD as positive with the negated score; PR areas are trapezoids over the curve
    (``sklearn.metrics.auc``). Values are fractions in [0, 1].
    """
    from sklearn import metrics as skm

    id_scores = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_scores = np.asarray(ood_scores, dtype=np.float64).ravel()
    if id_scores.size == 0 or ood_scores.size == 0:
        raise InputError(f"need ID and OOD scores, got {id_scores.size} ID and {ood_scores.size} OOD")
    if not (np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()):
        raise InputError("scores contain NaN or Inf; check the model and the postprocessor's percentile")
    conf = np.concatenate([id_scores, ood_scores])
    is_ood = np.concatenate([np.zeros(id_scores.size), np.ones(ood_scores.size)])
    fpr, tpr, _ = skm.roc_curve(is_ood, -conf)
    prec_in, rec_in, _ = skm.precision_recall_curve(1 - is_ood, conf)
    prec_out, rec_out, _ = skm.precision_recall_curve(is_ood, -conf)
    values = {"auroc": skm.auc(fpr, tpr), "fpr95": fpr[np.argmax(tpr >= 0.95)], "aupr_in": skm.auc(rec_in, prec_in),
              "aupr_out": skm.auc(rec_out, prec_out)}
    return {k: min(1.0, max(0.0, float(v))) for k, v in values.items()}  # a trapezoid sum can round to 1 + 2e-16


def search_percentile(model: nn.Module, method: str, id_val: torch.Tensor, ood_val: torch.Tensor,
                      grid=(50, 60, 70, 75, 80, 85, 90, 95, 99), *, features: bool = False) -> float:
    """OpenOOD's optional hyper-parameter search: the percentile in ``grid`` with the best AUROC on ID-val vs
    OOD-val images (never the test sets); ``features=True``: ``id_val`` and ``ood_val`` are their penultimate
    features, computed once. Returns the percentile; scores without one return NaN."""
    if method not in DEFAULT_PERCENTILE:
        return float("nan")
    best, best_p = -1.0, float(DEFAULT_PERCENTILE[method])
    if not features:
        probe = OODScorer(model, method)
        id_val, ood_val = probe.features_of(id_val), probe.features_of(ood_val)
    for p in grid:
        scorer = OODScorer(model, method, percentile=p).fit_features(id_val)
        auroc = metrics(scorer.score(id_val).numpy(), scorer.score(ood_val).numpy())["auroc"]
        if auroc > best:
            best, best_p = auroc, float(p)
    return best_p
