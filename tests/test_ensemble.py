import pytest
import torch

import diffaug
from diffaug import DiffAug, InputError
from diffaug.classifier import create_classifier
from diffaug.ensemble import DEFAULT_MEMBERS, ensemble_members
from conftest import tiny_denoiser


@pytest.fixture
def setup():
    den = tiny_denoiser()
    clf = create_classifier("small_cnn", 10, 1, seed=0).eval()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return den, clf, x


def test_member_zero_is_the_image_itself(setup):
    den, clf, x = setup
    with torch.no_grad():
        torch.testing.assert_close(diffaug.diffaug_ensemble(clf, den, x, members=(0,)), clf(x).softmax(1))


def test_equals_the_mean_over_manual_views(setup):
    den, clf, x = setup
    with torch.no_grad():
        de = diffaug.diffaug_ensemble(clf, den, x, members=(0, 100, 300), generator=torch.Generator().manual_seed(4))
        noise = torch.randn((10, 1, 8, 8), generator=torch.Generator().manual_seed(4))
        aug = DiffAug(den)
        views = [x] + [aug.apply(x, torch.full((5,), t), noise[5 * k : 5 * k + 5]) for k, t in enumerate((100, 300))]
        ref = torch.stack([clf(v).softmax(1) for v in views]).mean(0)
    torch.testing.assert_close(de, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(de.sum(1), torch.ones(5))


def test_members_fold_into_one_call_and_chunking_is_exact(setup):
    den, clf, x = setup
    calls = []
    hook = clf.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        whole = diffaug.diffaug_ensemble(clf, den, x, generator=torch.Generator().manual_seed(1))
        assert calls == [5 * len(DEFAULT_MEMBERS)]
        calls.clear()
        chunked = diffaug.diffaug_ensemble(clf, den, x, generator=torch.Generator().manual_seed(1), batch_size=7)
        assert max(calls) <= 7
    hook.remove()
    torch.testing.assert_close(whole, chunked, atol=1e-5, rtol=1e-5)


def test_members_and_errors(setup):
    den, clf, x = setup
    assert DEFAULT_MEMBERS == (0, 50, 100, 150, 200, 250, 300, 350, 400, 450)
    assert ensemble_members(75) == (0, 75, 150, 225, 300, 375, 450)
    with pytest.raises(InputError, match=r"outside \[0, 1000\)"):
        diffaug.diffaug_ensemble(clf, den, x, members=(0, 1000))
    with pytest.raises(InputError, match="at least one"):
        diffaug.diffaug_ensemble(clf, den, x, members=())
    with pytest.raises(InputError, match=r"must lie in \[0, 1\]"):
        diffaug.diffaug_ensemble(clf, den, x + 1)
    with pytest.raises(InputError, match="step must be >= 1"):
        ensemble_members(0)


def test_builds_a_graph_only_when_the_images_require_grad(setup):
    den, clf, x = setup
    assert any(p.requires_grad for p in clf.parameters())
    probs = diffaug.diffaug_ensemble(clf, den, x, members=(0, 100), generator=torch.Generator().manual_seed(0))
    assert probs.grad_fn is None and not probs.requires_grad
    x_req = x.clone().requires_grad_(True)
    probs = diffaug.diffaug_ensemble(clf, den, x_req, members=(0, 100), generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(probs[:, 3].sum(), x_req)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    with torch.no_grad():
        assert not diffaug.diffaug_ensemble(clf, den, x_req, members=(0, 100)).requires_grad


def test_an_empty_batch_gives_empty_probabilities(setup):
    den, clf, x = setup
    probs = diffaug.diffaug_ensemble(clf, den, x[:0], generator=torch.Generator().manual_seed(0))
    assert probs.shape == (0, 10)
