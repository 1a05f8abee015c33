import os
import pickle

import numpy as np
import pytest
import torch

from diffaug import InputError
from diffaug.data import load_cifar10, load_dataset


def _fake_batches(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)


def _write_bin(folder, split_files):
    folder.mkdir(parents=True)
    expected = {}
    for name in split_files:
        data, labels = _fake_batches(seed=len(expected))
        rec = np.concatenate([labels[:, None].astype(np.uint8), data], axis=1)
        rec.tofile(folder / f"{name}.bin")
        expected[name] = (data, labels)
    return expected


def _write_py(folder, split_files):
    folder.mkdir(parents=True)
    expected = {}
    for name in split_files:
        data, labels = _fake_batches(seed=len(expected))
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist(), b"batch_label": b"x"}, f, protocol=2)
        expected[name] = (data, labels)
    return expected


TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_both_layouts_read_the_same_pixels(tmp_path, layout):
    writer = _write_bin if layout == "bin" else _write_py
    expected = writer(tmp_path / f"cifar-10-batches-{layout}", TRAIN + ["test_batch"])
    train = load_cifar10(tmp_path, "train")
    assert train.images.shape == (20, 3, 32, 32) and train.num_classes == 10
    data, labels = expected["data_batch_1"]
    ref = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    torch.testing.assert_close(train.images[:4], ref)
    assert torch.equal(train.labels[:4], torch.from_numpy(labels.astype(np.int64)))
    test = load_dataset(tmp_path, "test")
    assert len(test) == 4


def test_malicious_pickle_is_refused_without_running(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_py(folder, TRAIN)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(InputError, match="refused"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def test_cifar_errors(tmp_path):
    with pytest.raises(InputError, match="no CIFAR-10 train files"):
        load_cifar10(tmp_path)
    _write_bin(tmp_path / "cifar-10-batches-bin", TRAIN)
    with open(tmp_path / "cifar-10-batches-bin" / "data_batch_2.bin", "ab") as f:
        f.write(b"\x00\x01")
    with pytest.raises(InputError, match="truncated"):
        load_cifar10(tmp_path)
    with pytest.raises(InputError, match="splits"):
        load_cifar10(tmp_path, "val")
