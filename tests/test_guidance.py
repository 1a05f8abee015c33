import numpy as np
import pytest
import torch
from conftest import tiny_denoiser
from scipy import linalg

from diffaug import InputError
from diffaug.cli import main
from diffaug.genmetrics import frechet_distance, inception_style_score, precision_recall
from diffaug.guidance import build_guidance, guided_sample, load_guidance, save_guidance
from diffaug.sampling import ddim_sample
from diffaug.train.guidance import GuidanceTrainConfig, train_guidance


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_da_gradient_flows_through_the_denoiser():
    den = tiny_denoiser()
    noisy, da = build_guidance("noisy", den, 10), build_guidance("da", den, 10)
    x = torch.randn(4, 1, 8, 8, generator=gen())
    t, y = torch.full((4,), 200), torch.arange(4)
    assert da.inputs(x, t).shape == (4, 2, 8, 8) and noisy.inputs(x, t).shape == (4, 1, 8, 8)
    g = da.grad_log_prob(x, t, y)
    # the same gradient with the denoiser's estimate held fixed differs: the path through x0_hat counts
    x_in = x.clone().requires_grad_(True)
    x0 = den.predict_x0(x, t, clip=True).detach()
    logp = torch.log_softmax(da.net(torch.cat([x_in, x0], 1), t), 1)[torch.arange(4), y].sum()
    g_fixed = torch.autograd.grad(logp, x_in)[0]
    assert g.shape == x.shape and not torch.allclose(g, g_fixed)
    assert not any(p.requires_grad for p in den.parameters())


def test_zero_scale_ddim_guidance_is_plain_ddim():
    den = tiny_denoiser()
    g = build_guidance("noisy", den, 10)
    y = torch.arange(3)
    guided = guided_sample(den, g, y, steps=5, scale=0.0, sampler="ddim", generator=gen(1))
    plain = ddim_sample(den, 3, None, steps=5, eta=0.0, generator=gen(1))
    torch.testing.assert_close(guided, plain, atol=1e-5, rtol=1e-4)


def test_guidance_moves_samples_towards_the_class():
    """A large DDPM guidance scale raises the guidance classifier's own p(y | x) of the final samples."""
    den = tiny_denoiser()
    g = build_guidance("noisy", den, 10, seed=1)
    y = torch.full((8,), 3)
    t0 = torch.zeros(8, dtype=torch.long)

    def logp(x):
        with torch.no_grad():
            return torch.log_softmax(g(den.encode(x), t0), 1)[:, 3].mean()

    free = guided_sample(den, g, y, steps=8, scale=0.0, generator=gen(2))
    pushed = guided_sample(den, g, y, steps=8, scale=50.0, generator=gen(2))
    assert logp(pushed) > logp(free)


def test_bad_guidance_inputs():
    den = tiny_denoiser()
    g = build_guidance("noisy", den, 10)
    with pytest.raises(InputError, match="finite"):
        guided_sample(den, g, torch.arange(2), scale=float("nan"))
    with pytest.raises(InputError, match="class index"):
        guided_sample(den, g, torch.tensor([10]))
    with pytest.raises(InputError, match="sampler"):
        guided_sample(den, g, torch.arange(2), sampler="euler")
    with pytest.raises(InputError, match="kind"):
        build_guidance("clean", den, 10)


def test_save_load_refuses_another_schedule_or_size(tmp_path):
    den = tiny_denoiser()
    g = build_guidance("da", den, 10, seed=3)
    save_guidance(g, tmp_path / "g", classes=[str(i) for i in range(10)], extra={})
    back = load_guidance(tmp_path / "g", den)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 500])
    torch.testing.assert_close(back(x, t), g(x, t))
    with pytest.raises(InputError, match="noise schedule"):
        load_guidance(tmp_path / "g", tiny_denoiser(beta_schedule="squaredcos_cap_v2"))
    with pytest.raises(InputError, match="3x"):
        load_guidance(tmp_path / "g", tiny_denoiser(channels=3))
    with pytest.raises(InputError, match="no guidance.safetensors"):
        load_guidance(tmp_path / "nothing", den)


@pytest.mark.slow
def test_train_guidance_resumes_exactly(tmp_path, monkeypatch):
    from conftest import killed_after_first_checkpoint

    cfg = dict(kind="da", steps=30, checkpoint_every=10, batch_size=32)
    full = train_guidance(GuidanceTrainConfig(**cfg), tmp_path / "full", progress=False)
    killed_after_first_checkpoint(  # dies right after the step-10 checkpoint
        monkeypatch, lambda: train_guidance(GuidanceTrainConfig(**cfg), tmp_path / "part", progress=False))
    resumed = train_guidance(GuidanceTrainConfig(**cfg), tmp_path / "part", resume=True, progress=False)
    for a, b in zip(full.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(InputError, match="holds a finished run"):
        train_guidance(GuidanceTrainConfig(**cfg), tmp_path / "full", progress=False)


def test_frechet_distance_against_the_closed_form():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(400, 5)))
    b = torch.from_numpy(rng.normal(size=(300, 5)) * 2 + 0.5)
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    r1 = linalg.sqrtm(s1)
    want = (((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(s1 + s2 - 2 * linalg.sqrtm(r1 @ s2 @ r1)).real)
    assert abs(frechet_distance(a, b) - want) < 1e-6
    assert frechet_distance(a, a) < 1e-6


def test_precision_recall_and_is_on_known_cases():
    real = torch.randn(300, 4, generator=gen())
    assert precision_recall(real, real) == (1.0, 1.0)
    far = real + 100
    assert precision_recall(real, far) == (0.0, 0.0)
    half = torch.cat([real[:150], far[:150]])  # half the fakes are on the manifold
    p, r = precision_recall(real, half)
    assert abs(p - 0.5) < 0.05
    assert precision_recall(real[:4], real[:4]) == (1.0, 1.0)  # k = 3 neighbours: four points are enough
    with pytest.raises(InputError, match="more than 3 real and generated images, got 3 and 300"):
        precision_recall(real[:3], real)
    assert inception_style_score(torch.eye(10)) == pytest.approx(10.0)
    assert inception_style_score(torch.full((5, 10), 0.1)) == pytest.approx(1.0)


def test_sample_cli_errors(tmp_path, capsys):
    from diffaug import load_denoiser

    tiny = build_guidance("noisy", tiny_denoiser(), 10)
    save_guidance(tiny, tmp_path / "tiny", classes=[str(i) for i in range(10)], extra={})
    digits = build_guidance("noisy", load_denoiser("digits"), 10)
    save_guidance(digits, tmp_path / "g", classes=[str(i) for i in range(10)], extra={})
    cases = [(["--guidance", str(tmp_path / "tiny"), "--class", "3"],  # says where the two schedules differ
              "another noise schedule than this denoiser's (both T=1000; alpha_bar at t="),
             (["--guidance", str(tmp_path / "g"), "--class", "12"], "--class 12 does not exist"),
             (["--guidance", str(tmp_path / "g"), "--class", "1", "--scale", "nan"], "finite"),
             (["--guidance", str(tmp_path / "g"), "--class", "1", "--n", "0"], "--n must be >= 1"),
             (["--guidance", str(tmp_path / "g"), "--class", "1", "--variance", "learned"],  # digits: eps only
              "--variance learned needs a network that learns its variance")]
    for args, message in cases:
        assert main(["sample", *args, "--out", str(tmp_path / "a.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a.png").exists()
    assert main(["sample", "--guidance", str(tmp_path / "g"), "--class", "1", "--n", "3", "--steps", "4",
                 "--out", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").stat().st_size > 0


def test_semi_supervised_split_and_consistency():
    from diffaug.train.guidance import consistency_loss, labelled_split

    labels = torch.arange(10).repeat_interleave(20)
    keep, rest = labelled_split(labels, 0.1, seed=0)
    assert len(keep) == 20 and torch.bincount(labels[keep]).tolist() == [2] * 10
    assert len(set(keep.tolist()) | set(rest.tolist())) == 200 and not set(keep.tolist()) & set(rest.tolist())
    den = tiny_denoiser()
    g = build_guidance("da", den, 10)
    x0 = torch.rand(6, 1, 8, 8, generator=gen()) * 2 - 1
    loss = consistency_loss(g, x0, 50, gen())
    loss.backward()
    assert loss.item() > 0 and all(p.grad is not None for p in g.net.parameters() if p.requires_grad)
    with pytest.raises(InputError, match="unlabelled"):
        GuidanceTrainConfig(consistency_weight=1.0).validate()
    with pytest.raises(InputError, match="labelled_fraction"):
        GuidanceTrainConfig(labelled_fraction=0).validate()


@pytest.mark.slow
def test_eval_guidance_cli_end_to_end(tmp_path):
    import json

    from diffaug.classifier import create_classifier, save_classifier

    for kind in ("noisy", "da"):
        assert main(["train-guidance", "--kind", kind, "--steps", "4", "--batch-size", "16", "--out",
                     str(tmp_path / kind), "--quiet"]) == 0
        assert 0 <= json.loads((tmp_path / kind / "metrics.json").read_text())["accuracy"] <= 1
    save_classifier(create_classifier("small_cnn", 10, 1, seed=0), tmp_path / "clean")
    out = tmp_path / "o"
    assert main(["eval-guidance", "--guidance", str(tmp_path / "noisy"), str(tmp_path / "da"), "--clean-classifier",
                 str(tmp_path / "clean"), "--per-class", "3", "--steps", "3", "--out", str(out), "--quiet"]) == 0
    table = (out / "table.md").read_text()
    assert "| noisy (1) |" in table and "| da (1) |" in table and "| clean (1) |" in table
    assert "| guidance (n) | FID (lower better) |" in table
    results = json.loads((out / "results.json").read_text())
    assert {r["kind"] for r in results["generation"].values()} == {"noisy", "da"}
    assert (out / "accuracy_vs_t.png").stat().st_size > 0 and list(out.glob("samples_da_*.png"))
    only = tmp_path / "only"
    assert main(["eval-guidance", "--guidance", str(tmp_path / "da"), "--no-generation", "--out", str(only),
                 "--quiet"]) == 0
    assert "Guided generation" not in (only / "table.md").read_text()
