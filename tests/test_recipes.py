"""The training recipes as modules (``diffaug.recipes``): losses against hand-written formulas, sums, errors."""

import pytest
import torch
import torch.nn.functional as F

import diffaug
from diffaug.recipes import AugMix, DiffAugRecipe, Plain, Recipe, from_name


def _model():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


class Shift(torch.nn.Module):
    """A stand-in DiffAug: a random shift drawn from the generator, so the test sees that the draws are used."""

    def forward(self, x, generator=None):
        return (x + 0.1 * torch.rand(x.shape, generator=generator)).clamp(0, 1)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])


def test_plain_is_cross_entropy_and_returns_the_logits():
    model, (x, y) = _model(), _batch()
    loss, logits = Plain(model, label_smoothing=0.1)(x, y, torch.Generator())
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y, label_smoothing=0.1))


def test_diffaug_recipe_adds_the_weighted_ce_of_a_fraction_of_the_batch():
    model, (x, y) = _model(), _batch()
    loss, logits = DiffAugRecipe(model, Shift(), fraction=0.5, weight=0.3)(x, y, torch.Generator().manual_seed(2))
    x_da = Shift()(x[:3], generator=torch.Generator().manual_seed(2))
    want = F.cross_entropy(model(x), y) + 0.3 * F.cross_entropy(model(x_da), y[:3])
    torch.testing.assert_close(loss, want)
    assert logits.shape == (9, 4)


def _jsd_reference(logits3, y, weight):
    """CE on the clean third + weight * the Jensen-Shannon divergence of the three softmaxes (AugMix paper, eq. 1)."""
    clean, v1, v2 = logits3.chunk(3)
    ps = [F.softmax(v, dim=1) for v in (clean, v1, v2)]
    m = (sum(ps) / 3).clamp(1e-7, 1)
    js = sum((p * (p.clamp_min(1e-30).log() - m.log())).sum(1).mean() for p in ps) / 3
    return F.cross_entropy(clean, y) + weight * js


def test_augmix_plus_diffaug_is_the_jsd_loss_plus_the_diffaug_term_in_one_forward():
    model, (x, y) = _model(), _batch()
    summed = AugMix(model, jsd_weight=12.0) + DiffAugRecipe(model, Shift(), weight=0.5)
    assert isinstance(summed, Recipe) and summed.name == "augmix+diffaug"
    named = from_name("augmix+diffaug", model, diffaug=Shift(), diffaug_weight=0.5)
    loss, logits = summed(x, y, torch.Generator().manual_seed(3))
    again, _ = named(x, y, torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss, again)  # the sum and the named recipe are the same computation
    n = x.shape[0]
    assert logits.shape == (4 * n, 4)
    want = _jsd_reference(logits[: 3 * n], y, 12.0) + 0.5 * F.cross_entropy(logits[3 * n:], y)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)  # float32 sums in another order
    assert not torch.equal(logits[n : 2 * n], logits[:n])  # AugMix views differ from the clean images


def test_recipe_keeps_only_the_model_in_its_state_and_the_package_exports_it():
    model = _model()
    rec = DiffAugRecipe(model, torch.nn.Linear(2, 2))  # any module: it must stay outside the recipe's tree
    assert set(rec.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    assert diffaug.DiffAugRecipe is DiffAugRecipe and diffaug.AugMix is AugMix and diffaug.Plain is Plain


@pytest.mark.parametrize("make, message", [
    (lambda m: Plain(m, label_smoothing=1.0), "label_smoothing must lie in"),
    (lambda m: DiffAugRecipe(m, Shift(), fraction=0.0), "diffaug_fraction must lie in"),
    (lambda m: DiffAugRecipe(m, Shift(), weight=-1.0), "must be >= 0"),
    (lambda m: DiffAugRecipe(m, Shift()) + DiffAugRecipe(m, Shift()), "add a DiffAugRecipe once"),
    (lambda m: Plain(m) + AugMix(_model()), "same model object"),
    (lambda m: Plain(m, label_smoothing=0.1) + AugMix(m), "different label_smoothing"),
    (lambda m: from_name("mixup", m), "unknown recipe 'mixup'"),
    (lambda m: from_name("diffaug", m), "needs a DiffAug module"),
])
def test_bad_recipes_are_refused_in_one_line(make, message):
    with pytest.raises(diffaug.InputError, match=message) as err:
        make(_model())
    assert "\n" not in str(err.value)


def test_augmix_without_a_generator_draws_from_the_global_rng():
    model, (x, y) = _model(), _batch()
    loss, logits = AugMix(model)(x, y)  # generator=None: the global RNG, as documented
    assert torch.isfinite(loss) and logits.shape == (3 * len(x), 4)


def test_a_conditional_diffaug_gets_the_batch_labels():
    from conftest import tiny_denoiser

    den = tiny_denoiser(conditional=True, channels=3)
    model, (x, y) = _model(), _batch()
    aug = diffaug.DiffAug(den, t_range=(300, 300), cond_weight=1.0)
    assert aug.needs_labels and not diffaug.DiffAug(den).needs_labels
    _, logits = DiffAugRecipe(model, aug)(x, y, torch.Generator().manual_seed(3))
    want = aug(x, y, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits[6:], model(want))


def test_a_copy_of_the_recipe_shares_its_frozen_diffaug_and_copies_the_model():
    import copy

    model = _model()
    aug = Shift()
    recipe = AugMix(model) + DiffAugRecipe(model, aug)
    twin = copy.deepcopy(recipe)
    assert twin.diffaug is aug and twin.model is not model
    assert type(twin) is type(recipe) and twin.name == recipe.name
    aug_copy, recipe_copy = copy.deepcopy((aug, recipe))  # copied together: the recipe uses the copy it made
    assert aug_copy is not aug and recipe_copy.diffaug is aug_copy
    x, y = _batch()
    torch.testing.assert_close(twin(x, y, torch.Generator().manual_seed(4)),
                               recipe(x, y, torch.Generator().manual_seed(4)))


def test_augmix_refuses_images_outside_the_unit_range_and_passes_an_empty_batch():
    model, (x, y) = _model(), _batch()
    with pytest.raises(diffaug.InputError, match=r"must lie in \[0, 1\]"):
        AugMix(model)(x * 255, y, torch.Generator())
    with pytest.raises(diffaug.InputError, match="float tensor"):
        AugMix(model)((x * 255).to(torch.uint8), y, torch.Generator())
    a, b = AugMix(model).augmix_views(x[:0], torch.Generator())
    assert a.shape == b.shape == (0, 3, 8, 8)
