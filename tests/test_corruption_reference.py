"""The corruptions on images of 32 px and larger against the code that made CIFAR-10-C (``make_cifar_c.py``).

``tests/data/corruption_reference.npz`` was written by ``benchmarks/compare_corruptions.py --write-test-data``
from the reference itself (its own environment: NumPy < 2, scikit-image, OpenCV, Wand/ImageMagick): 12 natural
32x32 crops, the reference's outputs of its deterministic corruptions (but saturate) on one of them, and the
reference's mean absolute change from the clean image per crop for every corruption and severity (mean over
24 draws).
The step-by-step pieces are also checked against Pillow and SciPy directly.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from diffaug.corruptions import (ALL_CORRUPTIONS, SEVERITIES, _clipped_zoom_matrix, _magick_motion_kernel,
                                 _pillow_box, corrupt)

DATA = Path(__file__).parent / "data" / "corruption_reference.npz"
DETERMINISTIC = ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression",
                 "gaussian_blur")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(DATA))


def _to_uint8(y: torch.Tensor) -> np.ndarray:
    # np.uint8(...) truncates, as the reference does; 1e-3 of a level keeps exact levels exact
    return (y * 255 + 1e-3).permute(0, 2, 3, 1).numpy().astype(np.uint8)


@pytest.mark.parametrize("n_in,n_out", [(32, 30), (32, 20), (30, 32), (20, 32), (40, 26), (7, 3)])
def test_pillow_box_matches_pillow(n_in, n_out):
    x = np.random.default_rng(0).random((n_in, 5)).astype(np.float32)
    want = np.asarray(Image.fromarray(x, mode="F").resize((5, n_out), Image.BOX))
    np.testing.assert_allclose(_pillow_box(n_in, n_out).numpy() @ x, want, atol=1e-5)


@pytest.mark.parametrize("n,factor", [(32, 1.0), (32, 1.01), (32, 1.03), (32, 1.17), (32, 1.25), (40, 1.75),
                                      (33, 2.25)])
def test_clipped_zoom_matches_scipy(n, factor):
    x = np.random.default_rng(1).random((n, n)).astype(np.float64)
    window = int(np.ceil(n / factor))
    top = (n - window) // 2
    zoomed = ndimage.zoom(x[top:top + window, top:top + window], factor, order=1)
    trim = (zoomed.shape[0] - n) // 2
    want = zoomed[trim:trim + n, trim:trim + n]
    m = _clipped_zoom_matrix(n, factor).numpy()
    np.testing.assert_allclose(m @ x @ m.T, want, atol=1e-10)


def test_magick_motion_kernel_taps():
    # measured from ImageMagick 6.9 (MagickMotionBlurImage on a one-pixel image): radius 6, sigma 2, angles 0 / 30
    k = _magick_motion_kernel(6, 2, torch.tensor([0.0, 30.0]))
    c = k.shape[-1] // 2
    row0 = k[0, c, c:c + 6].numpy() * 255
    np.testing.assert_allclose(row0, [84.8, 74.8, 51.4, 27.5, 11.5, 3.7], atol=0.6)
    taps = {(int(i) - c, int(j) - c) for i, j in torch.nonzero(k[1] > 5e-3)}
    assert taps == {(0, 0), (0, 1), (1, 2), (1, 3), (2, 3), (2, 4)}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_outputs_match_the_reference(ref, name):
    crops = ref["crops"][:1]
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    for severity in SEVERITIES:
        got = _to_uint8(corrupt(x, name, severity)).astype(int)
        diff = np.abs(got - (crops.astype(int) + ref[f"delta/{name}/{severity}"]))
        # the reference works on 8-bit images with float64 kernels (Pillow with fixed-point coefficients,
        # libjpeg versions differ): one or two levels where a value sits on a rounding edge
        assert diff.max() <= 3 and diff.mean() < 0.35, (name, severity, diff.max(), diff.mean())


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_mean_change_within_15_percent_of_the_reference(ref, name):
    crops = ref["crops"]
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    draws = 1 if name in DETERMINISTIC + ("saturate",) else 6
    for severity in SEVERITIES:
        g = torch.Generator().manual_seed(severity)
        got = np.mean([np.abs(_to_uint8(corrupt(x, name, severity, g)).astype(float) - crops).mean() / 255
                       for _ in range(draws)])
        want = float(ref[f"change/{name}/{severity}"].mean())
        assert abs(got / want - 1) < 0.15, (name, severity, got / want)
