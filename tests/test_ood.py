import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu
from torch import nn

from diffaug import InputError
from diffaug.classifier import create_classifier
from diffaug.ood import OODScorer, metrics, register_splitter, score_features, split_model


def _reference_fpr95(id_s, ood_s):
    """Sweep every threshold: flag 'OOD' when score <= thr; the smallest ID false-alarm rate catching 95% of OOD."""
    best = 1.0
    for thr in np.unique(np.concatenate([id_s, ood_s])):
        if (ood_s <= thr).mean() >= 0.95:
            best = min(best, (id_s <= thr).mean())
    return best


def _reference_aupr(pos, neg):
    """Trapezoid area under precision-recall, thresholds swept from high to low (positives have high scores)."""
    pts = [(0.0, 1.0)]
    for thr in sorted(np.unique(np.concatenate([pos, neg])), reverse=True):
        tp, fp = (pos >= thr).sum(), (neg >= thr).sum()
        pts.append((tp / len(pos), tp / (tp + fp)))
    r, p = np.array(pts).T
    return float(np.trapezoid(p, r))


def test_metrics_against_independent_references():
    rng = np.random.default_rng(0)
    id_s = rng.normal(1.0, 1.0, 300)
    ood_s = rng.normal(0.0, 1.0, 200)
    m = metrics(id_s, ood_s)
    u = mannwhitneyu(id_s, ood_s).statistic
    assert m["auroc"] == pytest.approx(u / (300 * 200), abs=1e-12)
    assert m["fpr95"] == pytest.approx(_reference_fpr95(id_s, ood_s), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(_reference_aupr(id_s, ood_s), abs=1e-3)
    assert m["aupr_out"] == pytest.approx(_reference_aupr(-ood_s, -id_s), abs=1e-3)
    perfect = metrics([2, 3, 4], [0, 1])
    assert perfect == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}


def test_metric_errors():
    with pytest.raises(InputError, match="need ID and OOD"):
        metrics([], [1.0])
    with pytest.raises(InputError, match="NaN or Inf"):
        metrics([1.0, float("nan")], [0.0])


def test_scores_match_their_formulas():
    torch.manual_seed(0)
    head = nn.Linear(20, 5)
    f = torch.rand(4, 20)
    energy = lambda z: torch.logsumexp(head(z), 1)  # noqa: E731
    torch.testing.assert_close(score_features(f, head, "msp"), head(f).softmax(1).max(1).values)
    torch.testing.assert_close(score_features(f, head, "react", react_threshold=0.5), energy(f.clamp(max=0.5)))
    k = 2  # top 10 % of 20
    top = f.topk(k, 1)
    mask = torch.zeros_like(f).scatter_(1, top.indices, 1.0)
    s1, s2 = f.sum(1, keepdim=True), top.values.sum(1, keepdim=True)
    torch.testing.assert_close(score_features(f, head, "ash_p"), energy(f * mask))
    torch.testing.assert_close(score_features(f, head, "ash_b"), energy(mask * s1 / k))
    torch.testing.assert_close(score_features(f, head, "ash_s"), energy(f * mask * torch.exp(s1 / s2)))
    top15 = f.topk(3, 1).values.sum(1, keepdim=True)  # SCALE: top 15 % = 3 of 20, all features scaled
    torch.testing.assert_close(score_features(f, head, "scale"), energy(f * torch.exp(s1 / top15)))
    with pytest.raises(InputError, match=r"percentile must lie in \(0, 100\)"):
        score_features(f, head, "ash_s", percentile=100)
    with pytest.raises(InputError, match="unknown OOD score 'odin'"):
        score_features(f, head, "odin")


@pytest.mark.parametrize("name", ["small_cnn", "timm:resnet18", "torchvision:resnet18"])
def test_split_model_for_diffaug_timm_and_torchvision(name):
    clf = create_classifier(name, 10, 3, seed=0).eval()
    x = torch.rand(2, 3, 32, 32)
    feats, head = split_model(clf)
    with torch.no_grad():
        torch.testing.assert_close(head(feats(x)), clf(x), atol=1e-5, rtol=1e-5)
    import timm
    import torchvision

    for bare in (timm.create_model("resnet18", num_classes=10), torchvision.models.resnet18(num_classes=10)):
        bare.eval()
        feats, head = split_model(bare)
        with torch.no_grad():
            torch.testing.assert_close(head(feats(x)), bare(x), atol=1e-4, rtol=1e-4)


def test_register_splitter_and_unknown_model():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.last = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.last(self.body(x))

    with pytest.raises(InputError, match="register_splitter"):
        split_model(Odd())
    register_splitter(Odd, lambda m: (m.body, m.last))
    feats, head = split_model(Odd())
    assert head.out_features == 3


def test_react_fits_threshold_on_id_val():
    clf = create_classifier("small_cnn", 10, 1, seed=0)
    val = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    scorer = OODScorer(clf, "react").fit(val)
    assert clf.training  # scoring borrows eval mode and gives the model's modes back (a check mid-training)
    feats, _ = split_model(clf.eval())  # the reference in eval mode, as the scorer reads features
    with torch.no_grad():
        ref = np.percentile(feats(val).flatten().numpy(), 90)
    assert scorer.react_threshold == pytest.approx(float(ref), rel=1e-5)
    assert scorer(val[:7]).shape == (7,)
    with pytest.raises(InputError, match="empty image set"):
        scorer(val[:0])


def test_scoring_gives_each_submodule_its_mode_back():
    clf = create_classifier("small_cnn", 10, 1, seed=0).train()
    frozen = next(m for m in clf.modules() if isinstance(m, torch.nn.BatchNorm2d)).eval()  # a frozen BN
    val = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = frozen.register_forward_hook(lambda m, *_: seen.append(m.training))
    OODScorer(clf, "msp")(val)
    hook.remove()
    assert seen == [False]  # in eval mode while scoring
    assert clf.training and not frozen.training  # and each module's own mode afterwards


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small"])
def test_torchvision_models_take_one_channel_images(name):
    """torchvision builds RGB stems only; a 1-channel classifier gets a 1-channel first convolution."""
    clf = create_classifier(name, 10, 1, seed=0).eval()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert clf(x).shape == (2, 10)
    first = next(m for m in clf.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1
