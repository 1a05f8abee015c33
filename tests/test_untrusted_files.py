"""Untrusted files: every loader refuses a file carrying a pickled payload, and the payload never runs.

The payload's ``__reduce__`` opens a marker file for writing, so unpickling it would create the marker.
Each case puts the payload where a loader reads weights, a checkpoint or data, and checks that the loader
raises ``InputError`` (the CLI: exit status 2, one line) and that the marker does not exist afterwards.
"""

import json
import pickle

import numpy as np
import pytest
import torch

from diffaug import InputError, load_classifier, load_denoiser
from diffaug.utils.checkpoint import check_safetensors_header, load_safetensors, save_safetensors
from diffaug.classifier import create_classifier, load_weights, save_classifier
from diffaug.cli import main
from diffaug.data import load_corrupted


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_file(path, marker, how="torch"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "torch":
        torch.save({"weight": Payload(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"weight": Payload(marker)}, f)
    assert path.stat().st_size > 0


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "a pickled payload was executed"


def test_the_payload_would_run_if_unpickled(tmp_path):
    """The test's own premise: plain unpickling of these files does run the payload."""
    marker = tmp_path / "ran"
    _pickle_file(tmp_path / "x.pkl", marker, how="pickle")
    with open(tmp_path / "x.pkl", "rb") as f:
        pickle.load(f).get("weight").close()
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_pretrained_pt_is_read_without_unpickling_objects(tmp_path, marker, how):
    _pickle_file(tmp_path / "evil.pt", marker, how)
    with pytest.raises(InputError, match="not a plain state dict.*not unpickled"):
        load_weights(create_classifier("small_cnn", 10, 1), tmp_path / "evil.pt")


def test_pickle_renamed_to_safetensors_is_refused_everywhere(tmp_path, marker, den_dir):
    # a classifier folder
    clf = tmp_path / "clf"
    save_classifier(create_classifier("small_cnn", 10, 1), clf)
    _pickle_file(clf / "model.safetensors", marker)
    with pytest.raises(InputError, match="damaged"):
        load_classifier(clf)
    # a denoiser folder
    den = tmp_path / "den"
    load_denoiser(den_dir).save_pretrained(den)
    _pickle_file(den / "unet" / "diffusion_pytorch_model.safetensors", marker)
    with pytest.raises(InputError, match="damaged"):
        load_denoiser(den)
    # any checkpoint (training resume, guidance classifiers)
    _pickle_file(tmp_path / "checkpoint.safetensors", marker)
    with pytest.raises(InputError, match="damaged"):
        load_safetensors(tmp_path / "checkpoint.safetensors")


def test_pickled_diffusers_bin_is_never_loaded(tmp_path, marker, den_dir):
    den = tmp_path / "den"
    load_denoiser(den_dir).save_pretrained(den)
    (den / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _pickle_file(den / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(InputError, match="only safetensors are loaded"):
        load_denoiser(den)


def test_cli_refuses_payloads_in_resume_checkpoints_and_guidance(tmp_path, marker, den_dir, capsys):
    # train --resume from a checkpoint that is a pickle
    run = tmp_path / "run"
    base = ["train", "--recipe", "plain", "--batch-size", "8", "--checkpoint-every", "1", "--quiet",
            "--device", "cpu", "--out", str(run)]
    assert main(base + ["--steps", "4"]) == 0
    _pickle_file(sorted((run / "checkpoints").glob("step-*.safetensors"))[-1], marker)
    assert main(base + ["--steps", "6", "--resume"]) == 2
    assert "damaged" in capsys.readouterr().err
    # a guidance folder whose weights are a pickle
    guid = tmp_path / "guid"
    _pickle_file(guid / "guidance.safetensors", marker)
    (guid / "guidance.json").write_text(json.dumps({"kind": "da"}))
    assert main(["sample", "--denoiser", str(den_dir), "--guidance", str(guid), "--class", "1",
                 "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "damaged" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.png").exists()


def test_npy_with_pickled_objects_is_refused(tmp_path, marker):
    root = tmp_path / "cifar-c"
    root.mkdir()
    np.save(root / "labels.npy", np.zeros(5, dtype=np.int64))
    objects = np.empty(5, dtype=object)
    objects[:] = [Payload(marker)] * 5
    np.save(root / "fog.npy", objects, allow_pickle=True)
    with pytest.raises(InputError, match="cannot read"):
        load_corrupted(root, "fog", 1)


# ---------------------------------------------------------------------- safetensors headers
def _valid(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_safetensors({"a": torch.ones(2, 4), "b": torch.zeros(4, dtype=torch.int64)}, path, metadata={"k": 1})
    return path, path.read_bytes()


def _with_header(tmp_path, header: dict, data: bytes) -> object:
    blob = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


def test_safetensors_headers_are_validated_before_use(tmp_path):
    path, raw = _valid(tmp_path)
    header = check_safetensors_header(path)
    assert header["a"]["dtype"] == "F32" and header["b"]["shape"] == [4]
    n = int.from_bytes(raw[:8], "little")
    data = raw[8 + n :]
    good = json.loads(raw[8 : 8 + n])
    cases = {
        "too short for a header": raw[:5],
        "header length": (10**12).to_bytes(8, "little") + raw[8:],
        "not JSON": (4).to_bytes(8, "little") + b"\xff\xfe{[" + data,
    }
    for message, blob in cases.items():
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(InputError, match=message):
            check_safetensors_header(bad)
    bad_headers = {
        "unknown dtype 'F128'": {**good, "a": {**good["a"], "dtype": "F128"}},
        "byte range": {**good, "a": {**good["a"], "shape": [200, 4]}},  # size does not fit the buffer
        "has shape": {**good, "a": {**good["a"], "shape": [-2, -3]}},
        "lacks dtype": {**good, "a": {"shape": [2, 4]}},
        "overlap": {**good, "a": {**good["a"], "data_offsets": good["b"]["data_offsets"]}},  # same 32 bytes
    }
    for message, header in bad_headers.items():
        with pytest.raises(InputError, match=message):
            check_safetensors_header(_with_header(tmp_path, header, data))
        with pytest.raises(InputError, match=message):
            load_safetensors(tmp_path / "bad.safetensors")


def test_wrong_architecture_weights_name_the_tensor(tmp_path):
    clf = tmp_path / "clf"
    save_classifier(create_classifier("small_cnn", 10, 1, width=16), clf)
    spec = json.loads((clf / "model.json").read_text())
    (clf / "model.json").write_text(json.dumps({**spec, "width": 32}))
    with pytest.raises(InputError, match=r"does not match the model: .* has shape .* the model needs"):
        load_classifier(clf)
    tensors = load_safetensors(clf / "model.safetensors")[0]
    save_safetensors({k: v.to(torch.int32) for k, v in tensors.items()}, clf / "model.safetensors")
    (clf / "model.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="is torch.int32, the model needs torch.float32"):
        load_classifier(clf)
