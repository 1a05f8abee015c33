"""A tiny synthetic ImageNet-style tree for the data-layer tests: ``train/`` + ``val/`` of WordNet-id class
folders, JPEGs of varying sizes, and odd files inside (a gray JPEG, a CMYK JPEG, a palette PNG with
transparency, an RGBA PNG, and a hidden ``._`` file that must be ignored). Each class has its own dominant colour, so a classifier can learn it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ("n01440764", "n01443537", "n01484850")
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def class_image(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    """An RGB uint8 image of class ``label``: its colour plus noise."""
    base = np.array(COLOURS[label], np.float32)
    noise = rng.normal(0, 30, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def make_tree(root: Path, per_class: dict[str, int] | None = None, seed: int = 0, odd_files: bool = True,
              classes=WNIDS) -> Path:
    """Write the tree under ``root`` and return ``root``."""
    per_class = per_class or {"train": 8, "val": 3}
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for label, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(24, 72, 2))
                Image.fromarray(class_image(rng, label % len(COLOURS), h, w)).save(
                    folder / f"{wnid}_{i:04d}.JPEG", quality=90)
    if odd_files:
        t = root / "train"
        rgb = class_image(rng, 0, 40, 52)
        Image.fromarray(rgb).convert("L").save(t / classes[0] / "gray.jpg")
        Image.fromarray(rgb).convert("CMYK").save(t / classes[0] / "cmyk.jpg")
        pal = Image.fromarray(class_image(rng, 1, 30, 44)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        pal.info["transparency"] = 0
        pal.save(t / classes[1] / "palette.png", transparency=0)
        rgba = np.dstack([class_image(rng, 2, 36, 36), np.full((36, 36), 128, np.uint8)])
        Image.fromarray(rgba, "RGBA").save(t / classes[2] / "alpha.png")
        (t / classes[2] / "._alpha.png").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork: not an image
    return root
