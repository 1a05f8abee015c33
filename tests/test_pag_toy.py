import pytest
import torch
from conftest import tiny_denoiser

from diffaug.classifier import create_classifier
from diffaug.cli import main
from diffaug.guidance import build_guidance
from diffaug.evaluate.pag import classifier_gradient, minmax, pag_panel
from diffaug.study.toy import nearest_distance, toy_demo


def test_minmax_per_image():
    x = torch.stack([torch.linspace(-3, 5, 16).view(1, 4, 4), torch.full((1, 4, 4), 2.0)])
    out = minmax(x)
    assert out[0].min() == 0 and out[0].max() == 1 and torch.equal(out[1], torch.full((1, 4, 4), 0.5))


def test_pag_gradient_goes_through_the_denoiser():
    den = tiny_denoiser()
    clf = create_classifier("small_cnn", 10, 1, seed=0).eval()
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.full((3,), 300), torch.tensor([1, 2, 3])
    g = classifier_gradient(clf, den, x_t, t, y)
    # finite-difference check of one coordinate
    e = torch.zeros_like(x_t)
    e[0, 0, 3, 4] = 1e-3

    def f(x):
        x0 = den.predict_x0(x, t, clip=True)
        return torch.log_softmax(clf(den.decode(x0)), 1)[torch.arange(3), y].sum()

    with torch.no_grad():
        fd = (f(x_t + e) - f(x_t - e)) / 2e-3
    assert abs(float(fd) - float(g[0, 0, 3, 4])) < 5e-2 * max(1.0, abs(float(fd)))
    panel = pag_panel(den, torch.rand(3, 1, 8, 8), y, {"clf": clf, "da": build_guidance("da", den, 10)},
                      generator=torch.Generator().manual_seed(0))
    assert panel.shape == (3, 4, 1, 8, 8) and panel.min() >= 0 and panel.max() <= 1


def test_pag_cli(tmp_path, capsys):
    from diffaug.classifier import save_classifier

    clf = create_classifier("small_cnn", 10, 1, seed=0)
    save_classifier(clf, tmp_path / "c")
    assert main(["pag", "--classifier", str(tmp_path / "c"), "--n", "3", "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0
    assert main(["pag", "--classifier", str(tmp_path / "c"), "--t", "1000", "--out", str(tmp_path / "q.png")]) == 2
    assert "--t must lie in [0, 1000)" in capsys.readouterr().err
    assert main(["pag", "--out", str(tmp_path / "q.png")]) == 2
    assert not (tmp_path / "q.png").exists()


@pytest.mark.slow
def test_toy_one_step_estimates_land_nearer_the_data(tmp_path):
    result = toy_demo(tmp_path / "toy.png", times=(50, 300), steps=600, seed=0)
    assert (tmp_path / "toy.png").stat().st_size > 0
    for row in result["per_t"]:
        assert row["one_step"] < row["noisy"]
    data = torch.zeros(1, 2)
    assert nearest_distance(torch.tensor([[3.0, 4.0]]), data) == pytest.approx(5.0)
