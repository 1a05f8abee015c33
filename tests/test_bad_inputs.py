"""The bad-input battery: every CLI command and the public Python entry points driven with wrong inputs.

For the CLI each case asserts exit status 2, exactly one line on stderr that names the offending value, no
traceback, and that nothing was written to the output path. For Python each case asserts ``InputError``
(a ``ValueError``) with a message naming the value.
"""

import json
import math

import pytest
import torch

import diffaug
from diffaug import InputError
from diffaug.classifier import create_classifier, save_classifier
from diffaug.cli import main


@pytest.fixture(scope="module")
def ws(tmp_path_factory, den_dir):
    """A workspace of good and broken files the cases point at."""
    from diffaug.guidance import build_guidance
    from diffaug.guidance import save_guidance

    root = tmp_path_factory.mktemp("ws")
    save_classifier(create_classifier("small_cnn", 10, 1, seed=0), root / "clf")
    save_classifier(create_classifier("small_cnn", 4, 1, seed=0), root / "clf4")
    save_classifier(create_classifier("small_cnn", 10, 3, seed=0), root / "clf_rgb")
    den = diffaug.load_denoiser(den_dir)
    save_guidance(build_guidance("da", den, 10, width=8), root / "guid", classes=[str(i) for i in range(10)], extra={})
    truncated = root / "truncated"
    save_classifier(create_classifier("small_cnn", 10, 1, seed=0), truncated)
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[: len(blob) // 3])
    (root / "empty_dir").mkdir()
    (root / "cfg_types.json").write_text(json.dumps({"epochs": "ten"}))
    (root / "cfg_keys.json").write_text(json.dumps({"epochz": 3}))
    (root / "not_json.json").write_text("{")
    return root


def _cases(ws, den_dir):
    d, D = str(den_dir), "digits"
    clf, missing = str(ws / "clf"), str(ws / "nope")
    return [
        # (argv, text the one-line message must contain)
        (["train-diffusion", "--steps", "0"], "steps"),
        (["train-diffusion", "--data", missing], missing),
        (["train-diffusion", "--schedule", "quadratic"], "quadratic"),
        (["train-diffusion", "--batch-size", "-4"], "-4"),
        (["train-diffusion", "--precision", "half"], "half"),
        (["train", "--recipe", "mixup"], "mixup"),
        (["train", "--recipe", "diffaug", "--denoiser", missing], missing),
        (["train", "--recipe", "plain", "--model", "no_such_net"], "no_such_net"),
        (["train", "--recipe", "plain", "--lr", "-1"], "-1"),
        (["train", "--recipe", "plain", "--precision", "half"], "half"),
        (["train", "--recipe", "plain", "--classes", "3", "99"], "99"),
        (["train", "--recipe", "plain", "--pretrained", missing], missing),
        (["train", "--recipe", "plain", "--pretrained", str(ws / "truncated" / "model.safetensors")], "damaged"),
        (["train", "--recipe", "diffaug", "--denoiser", d, "--t-min", "5", "--t-max", "2000"], "2000"),
        (["train", "--recipe", "plain", "--steps", "0"], "got 0"),
        (["train", "--recipe", "plain", "--epochs", "0"], "got None, 0"),
        (["train", "--recipe", "plain", "--checkpoint-every", "0"], "--checkpoint-every"),
        (["train-diffusion", "--checkpoint-every", "0"], "--checkpoint-every"),
        (["train-diffusion", "--width", "40"], "width 40"),
        (["train-diffusion", "--layers-per-block", "0"], "layers_per_block"),
        (["train-guidance", "--kind", "da", "--denoiser", d, "--checkpoint-every", "0"], "--checkpoint-every"),
        (["sample", "--denoiser", d, "--guidance", str(ws / "guid"), "--class", "1", "--steps", "0"], "steps"),
        (["eval-guidance", "--guidance", str(ws / "guid"), "--denoiser", d, "--steps", "0"], "steps"),
        (["eval-guidance", "--guidance", str(ws / "guid"), "--denoiser", d, "--scale", "nan"], "nan"),
        (["certify", "--classifier", clf, "--sigma", "-0.5"], "-0.5"),
        (["certify", "--classifier", clf, "--sigma", "0.5", "--alpha", "2"], "alpha"),
        (["certify", "--classifier", clf, "--sigma", "0.5", "--n", "0"], "n"),
        (["certify", "--classifier", clf, "--sigma", "0.5", "--sequential", "--max-n", "0"], "max_n must be >= 1"),
        (["certify", "--classifier", clf, "--sigma", "0.5", "--sequential", "--max-n", "50"], "max_n must be >= n0"),
        (["certify", "--classifier", clf, "--sigma", "0.5", "--sequential", "--alpha", "1"], "alpha"),
        (["certify", "--classifier", clf, "--sigma", "0.5", "--max-n", "500"], "--sequential"),
        (["certify", "--classifier", missing, "--sigma", "0.5"], missing),
        (["certify", "--classifier", str(ws / "truncated"), "--sigma", "0.5"], "damaged"),
        (["certify", "--classifier", str(ws / "clf4"), "--sigma", "0.5"], "4 classes"),
        (["certify", "--classifier", clf, "--sigma", "0.5", "--denoiser", str(ws / "empty_dir")], "unet"),
        (["eval-ood", "--classifier", clf, "--ood", "imagenet-o"], "imagenet-o"),
        (["eval-ood", "--classifier", clf, "--ood", "holdout"], "holdout"),
        (["eval-ood", "--classifier", str(ws / "clf_rgb")], "channels"),
        (["eval-ood", "--classifier", str(ws / "clf4")], "has 4 classes, the ID data digits has 10; give --data"),
        (["eval-shift", "--classifier", clf, "--corruptions", "rain"], "rain"),
        (["eval-shift", "--classifier", clf, "--precision", "int8"], "int8"),
        (["certify", "--classifier", clf, "--sigma", "0.5", "--precision", "fp64"], "fp64"),
        (["eval-shift", "--classifier", clf, "--severities", "7"], "7"),
        (["eval-shift", "--classifier", clf, "--modes", "tta"], "tta"),
        (["eval-shift", "--classifier", clf, "--limit", "0"], "limit"),
        (["eval-shift", "--classifier", str(ws / "clf4")], "classes"),
        (["train-guidance", "--kind", "da", "--denoiser", d, "--steps", "0"], "steps"),
        (["train-guidance", "--kind", "da", "--denoiser", d, "--labelled-fraction", "1.5"], "1.5"),
        (["train-guidance", "--kind", "da", "--denoiser", d, "--consistency-weight", "1"], "labelled_fraction"),
        (["train-guidance", "--kind", "da", "--denoiser", d, "--precision", "bf8"], "bf8"),
        (["sample", "--denoiser", d, "--guidance", str(ws / "guid"), "--class", "1", "--precision", "tf32"], "tf32"),
        (["eval-guidance", "--guidance", str(ws / "guid"), "--denoiser", d, "--precision", "fp8"], "fp8"),
        (["pag", "--classifier", clf, "--denoiser", d, "--precision", "double"], "double"),
        (["sample", "--denoiser", d, "--guidance", str(ws / "guid"), "--class", "12"], "12"),
        (["sample", "--denoiser", d, "--guidance", str(ws / "guid"), "--class", "1", "--n", "0"], "--n"),
        (["sample", "--denoiser", d, "--guidance", str(ws / "guid"), "--class", "1", "--scale", "nan"], "nan"),
        (["sample", "--denoiser", d, "--guidance", missing, "--class", "1"], missing),
        (["eval-guidance", "--guidance", str(ws / "guid"), "--denoiser", d, "--per-class", "1"], "per-class"),
        (["pag", "--classifier", clf, "--denoiser", d, "--t", "5000"], "5000"),
        (["pag", "--classifier", clf, "--denoiser", missing], missing),
        (["eval-guidance", "--guidance", str(ws / "guid"), "--denoiser", d, "--workers", "-1"], "workers must be"),
        (["pag", "--classifier", clf, "--denoiser", d, "--workers", "-2"], "workers must be"),
        (["toy", "--t", "-3"], "-3"),
        (["toy", "--steps", "0"], "steps"),
        (["study", "--config", str(ws / "cfg_types.json")], "epochs"),
        (["study", "--config", str(ws / "cfg_keys.json")], "epochz"),
        (["study", "--config", str(ws / "not_json.json")], "not valid JSON"),
        (["study", "--config", missing], missing),
        (["study", "--only", "everything"], "everything"),
        (["show-augmentations", "--denoiser", missing], missing),
        (["show-augmentations", "--denoiser", D, "--data", missing], missing),
        (["denoiser-quality", "--denoiser", missing], missing),
        (["train", "--recipe", "plain", "--device", "tpu9"], "tpu9"),
        *([(["train", "--recipe", "plain", "--device", "cuda"], "no CUDA GPU")] if not torch.cuda.is_available()
          else []),
        (["denoiser-quality", "--denoiser", D, "--data", missing], missing),
        (["denoiser-quality", "--denoiser", D, "--seeds"], None),  # argparse: exit 2 with usage (not our line)
        # a folder where a file is expected (an unreadable "file")
        (["train", "--recipe", "plain", "--pretrained", str(ws / "empty_dir")], "empty_dir"),
        (["study", "--config", str(ws / "empty_dir")], "empty_dir"),
    ]


OUTPUT = {"sample": "s.png", "pag": "p.png", "toy": "t.png", "show-augmentations": "a.png",
          "denoiser-quality": "q.json"}


def test_every_cli_command_rejects_bad_input_in_one_line(ws, den_dir, tmp_path, capsys):
    failures = []
    for argv, expected in _cases(ws, den_dir):
        out = tmp_path / f"out-{len(failures)}-{argv[0]}" / OUTPUT.get(argv[0], "dir")
        full = argv + ["--out", str(out)] + (["--quiet"] if argv[0] in ("train", "train-diffusion", "certify",
                                                                         "eval-shift", "train-guidance", "study",
                                                                         "eval-guidance") else [])
        try:
            code = main(full)
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
        except Exception as e:  # an error that escaped as a traceback
            code = f"{type(e).__name__}: {e}"
        err = capsys.readouterr().err.strip()
        problems = []
        if code != 2:
            problems.append(f"exit {code}")
        if expected is not None:
            if len(err.splitlines()) != 1:
                problems.append(f"{len(err.splitlines())} lines")
            if expected not in err:
                problems.append(f"message lacks {expected!r}")
        if "Traceback" in err:
            problems.append("traceback")
        if out.parent.exists() and any(out.parent.rglob("*")) or out.exists():
            problems.append("wrote output")
        if problems:
            failures.append(f"{' '.join(argv)}: {', '.join(problems)} | {err[-300:]}")
    assert not failures, "\n".join(failures)


def test_an_out_that_cannot_be_written_is_refused_before_any_work(ws, tmp_path, capsys):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("keep me")
    clf = str(ws / "clf")
    cases = [(["train", "--recipe", "plain", "--steps", "1"], a_file, "is a file"),
             (["certify", "--classifier", clf, "--sigma", "0.5"], a_file, "is a file"),
             (["eval-shift", "--classifier", clf], a_file / "deeper", "is a file"),
             (["study", "--quick"], a_file, "is a file"),
             (["toy"], a_file / "t.png", "is a file"),
             (["denoiser-quality"], a_file / "q.json", "is a file"),
             (["show-augmentations"], tmp_path, "is a folder")]
    for argv, out, said in cases:
        assert main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0] and "Traceback" not in err[0], (argv, err)
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file.txt"]


def test_ctrl_c_ends_a_command_in_one_line(ws, tmp_path, capsys, monkeypatch):
    import diffaug.evaluate.certify

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffaug.evaluate.certify, "run_certify", interrupted)
    assert main(["certify", "--classifier", str(ws / "clf"), "--sigma", "0.5", "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffaug certify: interrupted; finished work is kept: run the same command again to continue"]


# ---------------------------------------------------------------------- Python entry points
@pytest.mark.parametrize("bad, message", [
    (torch.ones(2, 1, 8, 8, dtype=torch.int64), "float"),
    (torch.full((2, 1, 8, 8), 1.5), "1.5"),
    (torch.full((2, 1, 8, 8), -0.25), "-0.25"),
    (torch.full((2, 1, 8, 8), math.nan), "NaN"),
    (torch.full((2, 1, 8, 8), math.inf), "Inf"),
    (torch.rand(1, 8, 8), r"\(1, 8, 8\)"),
    (torch.rand(2, 3, 8, 8), "channels"),
    (torch.rand(2, 8, 8, 1, generator=torch.Generator().manual_seed(0)), r"looks channels-last .*x.permute\(0, 3, 1, 2\)"),
    (torch.rand(2, 1, 16, 16), "16"),
])
def test_diffaug_rejects_bad_images(den, bad, message):
    aug = diffaug.DiffAug(den)
    with pytest.raises(InputError, match=message):
        aug(bad, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match=message):
        diffaug.diffaug_ensemble(create_classifier("small_cnn", 10, 1), den, bad,
                                 generator=torch.Generator().manual_seed(0))


def test_classifier_names_a_channels_last_batch():
    clf = create_classifier("small_cnn", 10, 3)
    with pytest.raises(InputError, match=r"looks channels-last \[N, H, W, C\] = \(2, 8, 8, 3\)"):
        clf(torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(InputError, match="convert the images"):
        clf(torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)))


def test_diffuse_denoise_names_noise_of_another_shape(den):
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match=r"noise \(1, 1, 8, 8\) must have the shape of x \(2, 1, 8, 8\)"):
        diffaug.diffuse_denoise(den, x, 100, torch.zeros(1, 1, 8, 8))


def test_look_schedule_refuses_an_empty_batch_instead_of_looping():
    from diffaug.sequential import look_schedule

    with pytest.raises(InputError, match="batch_size"):
        look_schedule(1000, 0)


def test_empty_batches_pass_through(den):
    empty = torch.rand(0, 1, 8, 8)
    assert diffaug.DiffAug(den)(empty).shape == (0, 1, 8, 8)


@pytest.mark.parametrize("kwargs, message", [
    ({"t_range": (5, 1000)}, "1000"),
    ({"t_range": (-1, 10)}, "-1"),
    ({"t_range": (10, 5)}, "10"),
    ({"sampler": "ddim-50"}, "ddim-50"),
    ({"sigma_range": (0.0, 1.0)}, "sigma"),
    ({"fraction_range": (0.2, 1.5)}, "1.5"),
])
def test_diffaug_rejects_bad_settings(den, kwargs, message):
    with pytest.raises(InputError, match=message):
        diffaug.DiffAug(den, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"sigma": 0.0}, "sigma"),
    ({"sigma": -1.0}, "-1"),
    ({"sigma": math.nan}, "nan"),
    ({"num_classes": 1}, "num_classes"),
])
def test_smooth_rejects_bad_settings(kwargs, message):
    args = {"num_classes": 10, "sigma": 0.5, **kwargs}
    with pytest.raises(InputError, match=message):
        diffaug.Smooth(create_classifier("small_cnn", 10, 1), **args)


def test_smooth_rejects_bad_sampling_arguments():
    smooth = diffaug.Smooth(create_classifier("small_cnn", 10, 1), num_classes=10, sigma=0.5)
    x = torch.rand(1, 8, 8)
    for kwargs, message in (({"batch_size": 0}, "batch_size"), ({"alpha": 1.5}, "alpha"), ({"n": 0}, "n"),
                            ({"n0": 0}, "n0")):
        args = {"n0": 5, "n": 20, "alpha": 0.001, "batch_size": 10, **kwargs}
        with pytest.raises(InputError, match=message):
            smooth.certify(x, args["n0"], args["n"], args["alpha"], args["batch_size"],
                           generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"), ({"max_n": 0}, "max_n must be >= 1"),
    ({"max_n": 4}, "max_n must be >= n0"), ({"radii": (0.0, 0.5, 0.25)}, "increasing"),
    ({"radii": (0.25, 0.25)}, "increasing"), ({"radii": (-0.25, 0.5)}, ">= 0"), ({"radii": ()}, "non-empty"),
    ({"radius_tol": 0.0}, "radius_tol"), ({"radius_tol": -1.0}, "radius_tol"), ({"batch_size": 0}, "batch_size"),
    ({"futility": 1.0}, "futility"), ({"futility": -0.1}, "futility"),
])
def test_certify_sequential_rejects_bad_arguments_before_sampling(kwargs, message):
    class Never(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("sampled before checking the arguments")

    smooth = diffaug.Smooth(Never(), num_classes=10, sigma=0.5)
    args = {"alpha": 0.001, "max_n": 20, "batch_size": 10, "n0": 5, **kwargs}
    g = torch.Generator().manual_seed(0)
    with pytest.raises(InputError, match=message) as err:
        smooth.certify_sequential(torch.rand(1, 8, 8, generator=g), args.pop("alpha"), args.pop("max_n"),
                                  args.pop("batch_size"), generator=torch.Generator().manual_seed(0), **args)
    assert "\n" not in str(err.value)


def test_loaders_name_what_is_missing(tmp_path):
    with pytest.raises(InputError, match="nope"):
        diffaug.load_denoiser(tmp_path / "nope")
    with pytest.raises(InputError, match="missing model.json"):
        diffaug.load_classifier(tmp_path)
    with pytest.raises(InputError, match="unknown denoiser 'imagenet'"):
        diffaug.load_denoiser("imagenet")
    with pytest.raises(InputError, match="no_such_model"):
        create_classifier("no_such_model", 10, 1)
