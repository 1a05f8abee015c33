"""Write ``small_corruption_golden.npz``: the outputs of :func:`diffaug.corruptions.corrupt` on images under
32 px (the embedded 8x8 digits, and an 8x8 RGB image) for every corruption and severity at a fixed seed.

It was run once, on the code *before* the corruptions were brought in line with ``make_cifar_c.py`` for images
of 32 px and larger (issue 20, item 5), so ``tests/test_corruption_golden.py`` pins that the small-image
calibration (and with it the study's digits numbers) does not move. Re-run it only when a change to small
images is intended:

    .venv/bin/python tests/data/make_small_corruption_golden.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).with_name("small_corruption_golden.npz")
SEED = 1234


def inputs() -> dict[str, torch.Tensor]:
    """Two real digits (gray, 8x8) and one smooth-ish RGB 8x8 image, fixed."""
    from diffaug.data import load_digits

    digits = load_digits("test").images[:2].float()
    g = torch.Generator().manual_seed(7)
    rgb = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 10, 10, generator=g), 3, stride=1)  # 8x8, in (0, 1)
    # stored as uint16 levels, so the test rebuilds exactly these inputs from the file
    return {k: (v * 65535).round() / 65535 for k, v in {"digits": digits, "rgb8": rgb}.items()}


def outputs(images: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    from diffaug.corruptions import ALL_CORRUPTIONS, SEVERITIES, corrupt

    out = {}
    for key, x in images.items():
        for name in ALL_CORRUPTIONS:
            for severity in SEVERITIES:
                y = corrupt(x, name, severity, torch.Generator().manual_seed(SEED))
                out[f"{key}/{name}/{severity}"] = y.numpy()
    return out


def main() -> None:
    images = inputs()
    arrays = {f"input/{k}": (v.numpy() * 65535).round().astype(np.uint16) for k, v in images.items()}
    arrays.update({k: (v * 65535).round().astype(np.uint16) for k, v in outputs(images).items()})
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(arrays)} arrays)")


if __name__ == "__main__":
    main()
