import os
import subprocess
import sys

import pytest
import torch
from scipy.stats import binomtest, norm
from torch import nn

from diffaug import ABSTAIN, InputError, Smooth
from diffaug.classifier import create_classifier, save_classifier
from diffaug.cli import main
from diffaug.smoothing import lower_confidence_bound
from conftest import tiny_denoiser


class Threshold(nn.Module):
    """Class 1 iff pixel (0, 0) exceeds 0.5: a linear classifier with a known distance to its boundary."""

    def forward(self, x):
        z = (x[:, 0, 0, 0] - 0.5) * 100
        return torch.stack([-z, z], dim=1)


class Constant(nn.Module):
    def __init__(self, k, num_classes=10):
        super().__init__()
        self.k, self.num_classes = k, num_classes

    def forward(self, x):
        return nn.functional.one_hot(torch.full((x.shape[0],), self.k), self.num_classes).float()


@pytest.mark.parametrize("k, n, alpha", [(0, 100, 0.001), (37, 100, 0.001), (990, 1000, 0.01), (100, 100, 0.05)])
def test_clopper_pearson_matches_scipy_binomtest(k, n, alpha):
    ref = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert lower_confidence_bound(k, n, alpha) == pytest.approx(ref, abs=1e-12)


def test_constant_classifier_radius_is_exact():
    smooth = Smooth(Constant(3), 10, sigma=0.5)
    label, radius = smooth.certify(torch.rand(1, 4, 4), n0=10, n=500, alpha=0.001, batch_size=64,
                                   generator=torch.Generator().manual_seed(0))
    assert label == 3
    assert radius == pytest.approx(0.5 * norm.ppf(0.001 ** (1 / 500)), rel=1e-9)
    assert smooth.predict(torch.rand(1, 4, 4), n=50, alpha=0.001, batch_size=7) == 3


def test_radius_never_exceeds_the_true_distance_of_a_linear_boundary():
    x = torch.full((1, 2, 2), 0.2)
    x[0, 0, 0] = 0.8  # distance 0.3 to the boundary x00 = 0.5
    smooth = Smooth(Threshold(), 2, sigma=0.25)
    radii = []
    for seed in range(5):
        label, radius = smooth.certify(x, 100, 20_000, 0.001, 5000, generator=torch.Generator().manual_seed(seed))
        assert label == 1
        radii.append(radius)
    assert max(radii) <= 0.3 and min(radii) > 0.27  # valid, and tight for a linear classifier


def test_predict_abstains_on_a_coin_flip():
    x = torch.full((1, 2, 2), 0.5)  # on the boundary: each class half the time
    smooth = Smooth(Threshold(), 2, sigma=0.25)
    assert smooth.predict(x, 1000, 0.001, 500, generator=torch.Generator().manual_seed(0)) == ABSTAIN
    assert smooth.certify(x, 100, 1000, 0.001, 500, generator=torch.Generator().manual_seed(0)) == (ABSTAIN, 0.0)


def test_counts_are_reproducible_and_equal_the_reference_loop():
    model = create_classifier("small_cnn", 10, 1, seed=0).eval()
    smooth = Smooth(model, 10, 0.5)
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1))
    a = smooth.sample_counts(x, 300, 128, torch.Generator().manual_seed(5))
    gen, ref, left = torch.Generator().manual_seed(5), torch.zeros(10, dtype=torch.long), 300
    with torch.no_grad():
        while left:
            b = min(128, left)
            batch = x.repeat(b, 1, 1, 1)
            pred = model(batch + torch.randn(batch.shape, generator=gen) * 0.5).argmax(1)
            ref += torch.bincount(pred, minlength=10)
            left -= b
    assert torch.equal(a, ref) and a.sum() == 300


def test_dds_feeds_the_denoiser_an_exact_x_t():
    den = tiny_denoiser()
    t = 321
    sigma = float(den.sigma(t)) / 2  # pixel noise whose model-space level is exactly sigma(t)
    seen = {}

    class Spy(nn.Module):
        def forward(self, x_t, tt, y):
            seen["x_t"], seen["t"] = x_t.clone(), tt.clone()
            return torch.zeros_like(x_t)

    den.net = Spy()
    smooth = Smooth(Constant(0), 10, sigma, denoiser=den)
    assert smooth.t_star == t and smooth.dds_mismatch == pytest.approx(1.0, abs=1e-5)
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    smooth.sample_counts(x, 4, 4, torch.Generator().manual_seed(9))
    eps = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(9))
    expected = den.q_sample(den.encode(x).expand(4, 1, 8, 8), torch.full((4,), t), eps)
    torch.testing.assert_close(seen["x_t"], expected, atol=1e-5, rtol=1e-5)
    assert (seen["t"] == t).all()


def test_errors_and_warning():
    model = Constant(0)
    with pytest.raises(InputError, match="sigma must be a positive"):
        Smooth(model, 10, 0.0)
    with pytest.raises(InputError, match="needs 200"):
        Smooth(model, 10, 100.0, denoiser=tiny_denoiser())
    smooth = Smooth(model, 10, 0.25)
    x = torch.rand(1, 4, 4)
    with pytest.raises(InputError, match=r"alpha must lie in \(0, 1\)"):
        smooth.certify(x, 10, 10, 1.5, 10)
    with pytest.raises(InputError, match="n0 must be >= 1"):
        smooth.certify(x, 0, 10, 0.001, 10)
    with pytest.raises(InputError, match="n must be >= 1"):
        smooth.predict(x, 0, 0.001, 10)
    with pytest.raises(InputError, match="batch_size must be >= 1"):
        smooth.certify(x, 10, 10, 0.001, 0)
    with pytest.raises(InputError, match="min 0.* max 2"):
        smooth.certify(x * 2 + 0.5, 10, 10, 0.001, 10)
    # 0.001 ** (1 / 9) = 0.464 < 0.5: n = 9 can never certify at alpha = 0.001, n = 10 can (0.501)
    with pytest.warns(UserWarning, match="n=9 is too small .* at least 10"):
        assert smooth.certify(x, 10, 9, 0.001, 10) == (ABSTAIN, 0.0)
    label, radius = smooth.certify(x, 10, 10, 0.001, 10)
    assert label == 0 and 0 < radius < 0.01


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clf") / "plain"
    save_classifier(create_classifier("small_cnn", 10, 1, seed=0), folder, extra={"recipe": "plain"})
    return folder


def test_certify_cli_writes_rows_table_plot_and_resumes(tmp_path, trained):
    args = ["certify", "--classifier", str(trained), "--denoiser", "digits", "--sigma", "0.25", "0.5",
            "--n0", "10", "--n", "200", "--batch", "100", "--skip", "30", "--limit", "4", "--out", str(tmp_path),
            "--quiet"]
    assert main(args) == 0
    tsv = tmp_path / "plain" / "sigma_0.25" / "certify.tsv"
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
    assert [ln.split("\t")[0] for ln in lines[1:]] == ["0", "30", "60", "90"]
    assert (tmp_path / "certified_accuracy.png").stat().st_size > 5000
    table = (tmp_path / "table.md").read_text()
    assert "| plain | best |" in table and "t*=" in table
    # an interrupted run: drop the last two rows of the shard and run again; the same rows come back
    shard = tmp_path / "plain" / "sigma_0.25" / "certify.rank0.tsv"
    before = [ln.split("\t")[:5] for ln in shard.read_text().splitlines()]
    shard.write_text("\n".join(shard.read_text().splitlines()[:3]) + "\n")
    assert main(args) == 0
    after = [ln.split("\t")[:5] for ln in shard.read_text().splitlines()]
    assert after == before


@pytest.mark.parametrize("extra, match", [(["--sigma", "-1"], "sigma must be a positive"),
                                          (["--sigma", "0.5", "--alpha", "2"], "alpha must lie"),
                                          (["--sigma", "0.5", "--skip", "0"], "--skip must be >= 1")])
def test_certify_cli_errors(tmp_path, trained, capsys, extra, match):
    argv = ["certify", "--classifier", str(trained), "--out", str(tmp_path / "o"), "--n", "10", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


@pytest.mark.slow
def test_certify_shards_across_two_ranks(tmp_path, trained):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["certify", "--classifier", str(trained), "--sigma", "0.25", "--n0", "10", "--num-samples", "100",
              "--batch", "100", "--skip", "40", "--limit", "6", "--quiet", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           "-m", "diffaug.cli", *common, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    rows = lambda p: [r.split("\t")[:5] for r in (p / "plain" / "sigma_0.25" / "certify.tsv").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "ddp") == rows(tmp_path / "one") and len(rows(tmp_path / "one")) == 7
    assert (tmp_path / "ddp" / "plain" / "sigma_0.25" / "certify.rank1.tsv").exists()
