"""One model-I/O idiom: ``from_pretrained`` / ``save_pretrained`` on classifiers and guidance classifiers (the old
function names still work), ``create_classifier(checkpoint_path=...)`` for local weights."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import tiny_denoiser

import diffaug
from diffaug import InputError
from diffaug.classifier import load_weights, save_classifier


def _probe(channels=1, size=8):
    return torch.rand(3, channels, size, size, generator=torch.Generator().manual_seed(0))


def test_classifier_round_trip_and_the_old_names(tmp_path):
    clf = diffaug.create_classifier("small_cnn", 4, 1, seed=1, width=8, mean=[0.3], std=[0.2]).eval()
    clf.save_pretrained(tmp_path / "new", extra={"classes": ["a", "b", "c", "d"], "recipe": "plain"})
    back = diffaug.Classifier.from_pretrained(tmp_path / "new")
    assert not back.training and back.spec["classes"] == ["a", "b", "c", "d"] and back.spec["recipe"] == "plain"
    torch.testing.assert_close(back(_probe()), clf(_probe()), rtol=0, atol=0)
    torch.testing.assert_close((back.mean, back.std), (clf.mean, clf.std), rtol=0, atol=0)
    save_classifier(clf, tmp_path / "old", extra={"classes": ["a", "b", "c", "d"], "recipe": "plain"})
    for name in ("model.json", "model.safetensors"):  # the old function writes the very same files
        assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "new" / name).read_bytes()
    torch.testing.assert_close(diffaug.load_classifier(tmp_path / "new")(_probe()), clf(_probe()), rtol=0, atol=0)
    assert diffaug.Classifier.from_pretrained(tmp_path / "new", device="meta").mean.device.type == "meta"
    with pytest.raises(InputError, match="missing model.json"):
        diffaug.Classifier.from_pretrained(tmp_path / "nothing")


def test_checkpoint_path_and_the_deprecated_pretrained_path(tmp_path):
    source = diffaug.create_classifier("small_cnn", 3, 1, seed=5, width=8)
    file = tmp_path / "w.safetensors"
    source.save_pretrained(tmp_path)  # model.safetensors: the wrapper's own state dict
    file.write_bytes((tmp_path / "model.safetensors").read_bytes())
    scratch = diffaug.create_classifier("small_cnn", 3, 1, seed=0, width=8)
    assert not torch.equal(scratch.head.weight, source.head.weight)  # so the loads below are seen
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        new = diffaug.create_classifier("small_cnn", 3, 1, seed=0, width=8, checkpoint_path=file)
    with pytest.warns(DeprecationWarning, match="checkpoint_path"):
        old = diffaug.create_classifier("small_cnn", 3, 1, seed=0, width=8, pretrained=file)
    for model in (new, old):
        for k, v in source.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(InputError, match="never"):
        diffaug.create_classifier("small_cnn", 3, 1, pretrained=True)
    with pytest.raises(InputError, match="checkpoint_path only"):
        diffaug.create_classifier("small_cnn", 3, 1, pretrained=file, checkpoint_path=file)
    with pytest.raises(InputError, match="does not exist"):
        diffaug.create_classifier("small_cnn", 3, 1, checkpoint_path=tmp_path / "missing.pt")
    unchanged = diffaug.create_classifier("small_cnn", 3, 1, seed=0, width=8, pretrained=False)
    torch.testing.assert_close(unchanged.head.weight, scratch.head.weight, rtol=0, atol=0)
    load_weights(scratch, file)  # what checkpoint_path does after building the model
    torch.testing.assert_close(scratch.head.weight, new.head.weight, rtol=0, atol=0)


def test_guidance_round_trip_without_training_code(tmp_path):
    den = tiny_denoiser()
    g = diffaug.guidance.build_guidance("da", den, 4, width=8, seed=2)
    g.save_pretrained(tmp_path / "g", extra={"note": 1})
    spec = json.loads((tmp_path / "g" / "guidance.json").read_text())
    assert spec["classes"] == ["0", "1", "2", "3"] and spec["note"] == 1 and spec["kind"] == "da"
    back = diffaug.GuidanceClassifier.from_pretrained(tmp_path / "g", den)
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 700])
    torch.testing.assert_close(back(x, t), g(x, t), rtol=0, atol=0)
    back.save_pretrained(tmp_path / "again")  # the loaded spec's classes are kept
    assert json.loads((tmp_path / "again" / "guidance.json").read_text())["classes"] == ["0", "1", "2", "3"]
    with pytest.raises(InputError, match="no guidance.safetensors"):
        diffaug.GuidanceClassifier.from_pretrained(tmp_path, den)
    # loading one (as eval-guidance, pag and sample do) imports no training module
    den.save_pretrained(tmp_path / "den")
    moved = diffaug.Denoiser.from_pretrained(tmp_path / "den", device="meta")  # the same keywords as Classifier's
    assert moved.alpha_bar.device.type == "meta" and next(moved.parameters()).device.type == "meta"
    code = ("import sys, diffaug\n"
            f"den = diffaug.load_denoiser({str(tmp_path / 'den')!r})\n"
            f"diffaug.GuidanceClassifier.from_pretrained({str(tmp_path / 'g')!r}, den)\n"
            "print(sorted(m for m in sys.modules if m.startswith('diffaug.train')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _flip_a_tensor_byte(path):
    """Flip one byte inside the tensor data (past the header), as a bad disk or a torn copy would."""
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[(header_end + len(data)) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_changed_tensor_bytes_are_named_not_loaded(tmp_path, capsys):
    """Every safetensors file diffaug writes records its tensors' SHA-256: a classifier, a denoiser folder and a
    training checkpoint whose data bytes changed are refused in one line (a resume names the previous
    checkpoint); a file written elsewhere, without the digest, still loads."""
    from safetensors.torch import save_file

    from diffaug.cli import main
    from diffaug.utils.checkpoint import load_safetensors, read_safetensors

    clf = diffaug.create_classifier("small_cnn", 4, 1, seed=1, width=8)
    clf.save_pretrained(tmp_path / "clf")
    diffaug.Classifier.from_pretrained(tmp_path / "clf")
    _flip_a_tensor_byte(tmp_path / "clf" / "model.safetensors")
    with pytest.raises(InputError, match="is damaged: its tensors or metadata do not match the SHA-256"):
        diffaug.Classifier.from_pretrained(tmp_path / "clf")

    tiny_denoiser().save_pretrained(tmp_path / "den")
    weights = next((tmp_path / "den").rglob("*.safetensors"))
    _flip_a_tensor_byte(weights)
    with pytest.raises(InputError, match="SHA-256"):
        diffaug.load_denoiser(tmp_path / "den")

    run = tmp_path / "run"
    args = ["train", "--data", "digits", "--recipe", "plain", "--batch-size", "8", "--checkpoint-every", "2",
            "--quiet", "--out", str(run)]
    assert main([*args, "--steps", "4"]) == 0
    capsys.readouterr()
    checkpoints = sorted((run / "checkpoints").glob("step-*.safetensors"))
    load_safetensors(checkpoints[-1])
    _flip_a_tensor_byte(checkpoints[-1])
    assert main([*args, "--steps", "6", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "SHA-256" in err and len(err.splitlines()) == 1
    assert f"resume from the previous checkpoint, {checkpoints[-2].name}" in err  # train keeps 3 by default

    # the JSON metadata is covered too: a checkpoint whose step was edited (12 -> 19) is refused
    from diffaug.utils.checkpoint import save_safetensors
    save_safetensors({"w": torch.ones(3)}, tmp_path / "meta.safetensors", metadata={"step": 12})
    data = (tmp_path / "meta.safetensors").read_bytes()
    (tmp_path / "meta.safetensors").write_bytes(data.replace(b'\\"step\\": 12', b'\\"step\\": 19'))
    assert (tmp_path / "meta.safetensors").read_bytes() != data
    with pytest.raises(InputError, match="metadata do not match the SHA-256"):
        load_safetensors(tmp_path / "meta.safetensors")

    foreign = {"w": torch.arange(6.0).view(2, 3)}
    save_file(foreign, tmp_path / "foreign.safetensors")
    assert torch.equal(read_safetensors(tmp_path / "foreign.safetensors")["w"], foreign["w"])
