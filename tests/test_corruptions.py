import colorsys
import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from diffaug import InputError
from diffaug.corruptions import (ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES, SEVERITY_PARAMS,
                                 SMALL_IMAGE_PARAMS, corrupt, parse_corruptions, parse_severities, severity_params)

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur", "snow",
          "frost", "fog", "elastic_transform", "spatter"}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_the_imagenet_c_set():
    assert len(CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4 and len(set(ALL_CORRUPTIONS)) == 19
    assert set(SEVERITY_PARAMS) == set(ALL_CORRUPTIONS) and all(len(v) == 5 for v in SEVERITY_PARAMS.values())
    assert all(len(v) == 5 for v in SMALL_IMAGE_PARAMS.values())


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
@pytest.mark.parametrize("shape", [(6, 1, 8, 8), (3, 3, 40, 40)])
def test_every_corruption_keeps_shape_range_and_is_seeded(name, shape):
    x = torch.rand(shape, generator=gen(1))
    for severity in (1, 5):
        a = corrupt(x, name, severity, gen(0))
        assert a.shape == x.shape and a.dtype == x.dtype and a.min() >= 0 and a.max() <= 1
        assert torch.equal(a, corrupt(x, name, severity, gen(0)))
        if name in RANDOM:
            assert not torch.equal(a, corrupt(x, name, severity, gen(1)))
    assert corrupt(x[:0], name, 3, gen(0)).shape == (0, *shape[1:])
    if name != "saturate" or shape[1] == 3:
        assert not torch.equal(corrupt(x, name, 5, gen(0)), x)


def test_small_images_use_the_stronger_size_free_values():
    assert severity_params("gaussian_noise", 5, 8) == SMALL_IMAGE_PARAMS["gaussian_noise"][4]
    assert severity_params("gaussian_noise", 5, 32) == SEVERITY_PARAMS["gaussian_noise"][4]
    assert severity_params("defocus_blur", 5, 8) == SEVERITY_PARAMS["defocus_blur"][4]


def test_noise_statistics():
    x = torch.full((64, 1, 16, 16), 0.5)
    c = SMALL_IMAGE_PARAMS["gaussian_noise"][1]
    assert abs(float((corrupt(x, "gaussian_noise", 2, gen()) - x).std()) - c) < 0.01
    photons = SMALL_IMAGE_PARAMS["shot_noise"][0]
    shot = corrupt(x, "shot_noise", 1, gen())
    assert abs(float(shot.mean()) - 0.5) < 0.01 and abs(float(shot.var()) - 0.5 / photons) < 0.1 * 0.5 / photons
    amount = SMALL_IMAGE_PARAMS["impulse_noise"][4]
    imp = corrupt(x, "impulse_noise", 5, gen())
    assert abs(float((imp != x).float().mean()) - amount) < 0.01
    assert set(imp[imp != x].unique().tolist()) == {0.0, 1.0}


def test_contrast_and_gray_brightness_match_their_formulas():
    x = torch.rand(4, 1, 8, 8, generator=gen())
    c = SEVERITY_PARAMS["contrast"][2]
    m = x.mean((2, 3), keepdim=True)
    torch.testing.assert_close(corrupt(x, "contrast", 3, gen()), ((x - m) * c + m).clamp(0, 1))
    torch.testing.assert_close(corrupt(x, "brightness", 4, gen()), (x + SEVERITY_PARAMS["brightness"][3]).clamp(0, 1))
    assert torch.equal(corrupt(x, "saturate", 5, gen()), x)  # no saturation in a gray image


def test_rgb_hsv_corruptions_match_colorsys():
    x = torch.rand(2, 3, 5, 5, generator=gen(3))
    b = SEVERITY_PARAMS["brightness"][2]
    a, off = SEVERITY_PARAMS["saturate"][3]
    got_b, got_s = corrupt(x, "brightness", 3, gen()), corrupt(x, "saturate", 4, gen())
    for n in range(2):
        for i in range(5):
            for j in range(5):
                h, s, v = colorsys.rgb_to_hsv(*x[n, :, i, j].tolist())
                want_b = colorsys.hsv_to_rgb(h, s, min(1.0, v + b))
                want_s = colorsys.hsv_to_rgb(h, min(1.0, max(0.0, s * a + off)), v)
                np.testing.assert_allclose(got_b[n, :, i, j].numpy(), want_b, atol=1e-4)
                np.testing.assert_allclose(got_s[n, :, i, j].numpy(), want_s, atol=1e-4)


def test_gaussian_blur_matches_scipy():
    x = torch.rand(2, 3, 40, 40, generator=gen())
    sigma = SEVERITY_PARAMS["gaussian_blur"][4] * 40 / 32  # the size rule
    # scikit-image's gaussian, as make_cifar_c.py calls it: SciPy's gaussian_filter, mode nearest, truncate 4
    want = np.stack([[ndimage.gaussian_filter(ch, sigma, mode="nearest", truncate=4.0) for ch in img]
                     for img in x.numpy()])
    np.testing.assert_allclose(corrupt(x, "gaussian_blur", 5, gen()).numpy(), want.clip(0, 1), atol=1e-5)


def test_jpeg_matches_pillow():
    x = torch.rand(3, 1, 16, 16, generator=gen())
    q = SMALL_IMAGE_PARAMS["jpeg_compression"][2]
    got = corrupt(x, "jpeg_compression", 3, gen())
    for img, out in zip(x, got):
        buf = io.BytesIO()
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=q)
        want = np.asarray(Image.open(buf), dtype=np.float32) / 255
        assert np.abs(out[0].numpy() - want).mean() < 2 / 255


def test_pixelate_is_blocky_and_ordered():
    x = torch.rand(1, 1, 32, 32, generator=gen())
    out = corrupt(x, "pixelate", 5, gen())  # 32 -> 20 px -> 32
    assert out.unique().numel() <= 20 * 20
    # severity order: a smaller intermediate size changes the image more (issue 20: it was lost)
    x = torch.nn.functional.avg_pool2d(torch.rand(8, 3, 34, 34, generator=gen(2)), 3, stride=1)
    change = [float((corrupt(x, "pixelate", s, gen()) - x).abs().mean()) for s in SEVERITIES]
    assert change == sorted(change)


def test_parsers_and_errors():
    assert parse_corruptions("all") == CORRUPTIONS and parse_corruptions("extra") == EXTRA_CORRUPTIONS
    assert parse_corruptions("fog, snow") == ("fog", "snow")
    assert parse_severities("1-5") == (1, 2, 3, 4, 5) and parse_severities("5,1") == (1, 5)
    with pytest.raises(InputError, match="unknown corruption nope"):
        parse_corruptions("fog,nope")
    with pytest.raises(InputError, match="1..5"):
        parse_severities("0-5")
    with pytest.raises(InputError, match="look like"):
        parse_severities("high")
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(InputError, match="unknown corruption"):
        corrupt(x, "rain", 1)
    with pytest.raises(InputError, match="1..5"):
        corrupt(x, "fog", 6)
    with pytest.raises(InputError, match="1 or 3"):
        corrupt(torch.rand(2, 2, 8, 8), "fog", 1)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 40, 48), (2, 1, 32, 32)])
def test_frost_blends_the_photographs_of_a_folder(tmp_path, shape):
    # a flat photograph (RGBA: the alpha is dropped, as cv2.imread does) makes the blend exact to check
    Image.fromarray(np.full((60, 90, 4), (200, 100, 50, 7), np.uint8)).save(tmp_path / "frost1.png")
    x = torch.rand(shape, generator=gen())
    a, b = SEVERITY_PARAMS["frost"][3]
    colour = torch.tensor([200, 100, 50]).view(1, 3, 1, 1) / 255
    if shape[1] == 1:
        colour = (colour * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    got = corrupt(x, "frost", 4, gen(), frost_images=tmp_path)
    torch.testing.assert_close(got, (a * x + b * colour).clamp(0, 1), atol=1e-5, rtol=0)


def test_frost_folder_errors(tmp_path):
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(InputError, match="not a folder"):
        corrupt(x, "frost", 1, frost_images=tmp_path / "nope")
    with pytest.raises(InputError, match="no image in it"):
        corrupt(x, "frost", 1, frost_images=tmp_path)


def test_procedural_frost_has_the_photographs_colour():
    # on 32 px+ images the texture takes the mean colour of one of the reference's photographs (bluish, bright)
    x = torch.zeros(64, 3, 32, 32)
    frost = corrupt(x, "frost", 1, gen()) / SEVERITY_PARAMS["frost"][0][1]
    means = frost.mean((2, 3))
    assert 0.5 < float(means.mean()) < 0.8
    assert float((means[:, 2] - means[:, 0]).mean()) > 0.05  # blue above red
