"""Compare diffaug's on-the-fly corruptions with Hendrycks' ``make_cifar_c.py`` (the code that made CIFAR-10-C).

The reference needs an environment of its own (NumPy < 2, scikit-image 0.20, SciPy < 1.12, OpenCV, Pillow, Wand
with ImageMagick's MagickWand) and a checkout of github.com/hendrycks/robustness; nothing of it is committed here.
Its corruption functions are imported from the checkout at run time (the file's data-loading tail is cut off).

One command runs both sides and prints the table (project / reference ratio of the mean absolute change from the
clean image, per corruption and severity, over natural 32x32 crops) and the per-pixel differences of the
deterministic corruptions::

    .venv/bin/python benchmarks/compare_corruptions.py --reference ~/robustness --ref-python ~/refenv/bin/python

(``--frost-images DIR`` makes the project side blend the photographs in ``DIR``, e.g. a folder with the
checkout's ``ImageNet-C/create_c/frost1.png ... frost5.jpg``; without it the project uses its procedural
texture. The reference always uses its photographs.) The crops are cut from scikit-image's bundled photographs (astronaut, coffee, chelsea, rocket,
immunohistochemistry, hubble deep field), each first shrunk 4x with area averaging so a 32 px crop holds a
scene part as a CIFAR image does.

``--write-test-data`` writes ``tests/data/corruption_reference.npz`` (the inputs and reference outputs that
``tests/test_corruption_reference.py`` checks against).

Run under the reference's interpreter with ``--reference-side OUT.npz`` it only computes the reference side.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

STANDARD = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
            "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
            "jpeg_compression")
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
DETERMINISTIC = ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression",
                 "gaussian_blur", "saturate")
SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data" / "corruption_reference.npz"


# --- reference side (runs in the reference's environment: no torch) -------------------------------------------

def natural_crops(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """``n`` uint8 crops ``[n, size, size, 3]`` from scikit-image's bundled photographs, each shrunk 4x first."""
    import skimage.data
    from skimage.transform import downscale_local_mean

    rng = np.random.RandomState(seed)
    pictures = []
    for name in SOURCES:
        img = getattr(skimage.data, name)()
        img = img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, 2)
        pictures.append(np.clip(downscale_local_mean(img.astype(np.float64), (4, 4, 1)), 0, 255).round()
                        .astype(np.uint8))
    crops = []
    for i in range(n):
        pic = pictures[i % len(pictures)]
        top, left = rng.randint(0, pic.shape[0] - size + 1), rng.randint(0, pic.shape[1] - size + 1)
        crops.append(pic[top:top + size, left:left + size])
    return np.stack(crops)


def load_reference(checkout: Path) -> types.SimpleNamespace:
    """The corruption functions of ``make_cifar_c.py`` from ``checkout``, without its CIFAR-loading tail."""
    path = Path(checkout) / "ImageNet-C" / "create_c" / "make_cifar_c.py"
    source = path.read_text()
    source = source[:source.index("# /////////////// End Distortions ///////////////")]
    for mod in ("torch", "torch.utils", "torch.utils.data", "torchvision", "torchvision.datasets",
                "torchvision.transforms"):  # imported at its top, unused by the functions
        sys.modules.setdefault(mod, types.ModuleType(mod))
    namespace: dict = {"__name__": "make_cifar_c", "__file__": str(path)}
    exec(compile(source, str(path), "exec"), namespace)
    import inspect

    gaussian = namespace["gaussian"]
    if "multichannel" not in inspect.signature(gaussian).parameters:  # scikit-image >= 0.20 renamed it

        def gaussian_multichannel(image, *args, multichannel=False, **kwargs):
            return gaussian(image, *args, channel_axis=-1 if multichannel else None, **kwargs)

        namespace["gaussian"] = gaussian_multichannel
    return types.SimpleNamespace(**namespace)


def reference_side(checkout: Path, out: Path, n: int, repeats: int, seed: int) -> None:
    from PIL import Image

    ref = load_reference(checkout)
    crops = natural_crops(n, seed)
    names = STANDARD + EXTRA
    result = {"crops": crops}
    cwd = os.getcwd()
    os.chdir(Path(checkout) / "ImageNet-C" / "create_c")  # frost reads ./frostN.*
    try:
        np.random.seed(seed)
        for name in names:
            fn = getattr(ref, name)
            for severity in range(1, 6):
                outs = [[np.uint8(fn(Image.fromarray(c), severity)) for c in crops]
                        for _ in range(1 if name in DETERMINISTIC else repeats)]
                outs = np.stack([np.stack(o) for o in outs])  # [repeats, n, 32, 32, 3]
                change = np.abs(outs.astype(np.float64) - crops.astype(np.float64)).mean((2, 3, 4)) / 255
                result[f"change/{name}/{severity}"] = change  # [repeats, n]
                if name in DETERMINISTIC:
                    result[f"out/{name}/{severity}"] = outs[0]
    finally:
        os.chdir(cwd)
    np.savez_compressed(out, **result)


# --- project side ------------------------------------------------------------------------------------------------

def project_outputs(crops: np.ndarray, name: str, severity: int, seed: int, repeats: int = 1,
                    frost_images: str | None = None) -> np.ndarray:
    """diffaug's uint8 outputs ``[repeats, n, H, W, 3]`` on uint8 crops ``[n, H, W, 3]`` (as the reference
    stores its images)."""
    import torch

    from diffaug.corruptions import corrupt

    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(repeats):
        y = corrupt(x, name, severity, g, frost_images=frost_images) if name == "frost" else \
            corrupt(x, name, severity, g)
        # np.uint8 truncates, as the reference's np.uint8(...); 1e-3 of a level keeps exact levels exact
        outs.append((y * 255 + 1e-3).permute(0, 2, 3, 1).numpy().astype(np.uint8))
    return np.stack(outs)


def mean_change(outs: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """Mean absolute change from the clean image per repeat and image, in [0, 1]: ``[repeats, n]``."""
    return np.abs(outs.astype(np.float64) - crops.astype(np.float64)[None]).mean((2, 3, 4)) / 255


def compare(ref: dict, repeats: int, seed: int, frost_images: str | None) -> tuple[list[str], int, int]:
    crops = ref["crops"]
    lines = ["| corruption | s1 | s2 | s3 | s4 | s5 | reference change s1..s5 (/255) |",
             "|---|---|---|---|---|---|---|"]
    inside = total = 0
    pixel_lines = ["| corruption | severity | max abs diff (/255) | mean abs diff (/255) |", "|---|---|---|---|"]
    for name in STANDARD + EXTRA:
        cells, refs = [], []
        for severity in range(1, 6):
            r = ref[f"change/{name}/{severity}"].mean()
            outs = project_outputs(crops, name, severity, seed, 1 if name in DETERMINISTIC else repeats,
                                   frost_images)
            p = mean_change(outs, crops).mean()
            ratio = p / r
            ok = abs(ratio - 1) <= 0.15
            if name in STANDARD:
                total += 1
                inside += ok
            cells.append(f"{ratio:.2f}" + ("" if ok else " **x**"))
            refs.append(f"{255 * r:.1f}")
            if name in DETERMINISTIC:
                d = np.abs(outs[0].astype(np.int32) - ref[f"out/{name}/{severity}"].astype(np.int32))
                pixel_lines.append(f"| {name} | {severity} | {d.max()} | {d.mean():.3f} |")
        extra = " (extra)" if name in EXTRA else ""
        lines.append(f"| {name}{extra} | " + " | ".join(cells) + " | " + ", ".join(refs) + " |")
    return lines + [""] + pixel_lines, inside, total


def write_test_data(ref: dict, path: Path) -> None:
    """The committed golden file: 12 crops, the reference's mean change on them per condition (over 24 draws),
    and the reference outputs of the deterministic corruptions but saturate on the first crop (as ``delta/...``: output
    minus crop, int16)."""
    keep = 12
    data = {"crops": ref["crops"][:keep], "seed": np.int64(0)}
    for key, value in ref.items():
        if key.startswith("change/"):
            data[key] = value[:, :keep].mean(0).astype(np.float32)  # per crop, mean over the repeats
        elif key.startswith("out/") and "saturate" not in key:  # as the change from the clean crop: a small file
            data[key.replace("out/", "delta/")] = (value[:1].astype(np.int16) - data["crops"][:1]).astype(np.int16)
    np.savez_compressed(path, **data)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, help="checkout of github.com/hendrycks/robustness")
    p.add_argument("--ref-python", default=sys.executable,
                   help="interpreter of the reference's environment (NumPy < 2, scikit-image 0.20, Wand, ...)")
    p.add_argument("--reference-side", type=Path, help="only compute the reference side into this .npz")
    p.add_argument("--reference-npz", type=Path, help="reuse a reference side computed with --reference-side")
    p.add_argument("--crops", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3, help="draws per crop for the random corruptions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frost-images", help="folder with the frost photographs for the project side")
    p.add_argument("--write-test-data", action="store_true", help=f"also write {TEST_DATA.relative_to(REPO)}")
    args = p.parse_args(argv)
    needs_checkout = args.reference_side or args.write_test_data or not args.reference_npz
    if needs_checkout and not (args.reference and (args.reference / "ImageNet-C").is_dir()):
        p.error("--reference CHECKOUT (a clone of github.com/hendrycks/robustness, holding ImageNet-C/) is required"
                + ("" if args.reference_side or args.write_test_data else ", or --reference-npz FILE.npz from an "
                   "earlier --reference-side run"))
    if args.reference_npz and not args.reference_npz.is_file():
        p.error(f"--reference-npz {args.reference_npz} does not exist")
    if args.reference_side:
        reference_side(args.reference, args.reference_side, args.crops, args.repeats, args.seed)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = args.reference_npz or Path(tmp) / "reference.npz"
        if not args.reference_npz:
            subprocess.run([args.ref_python, __file__, "--reference", str(args.reference), "--reference-side",
                            str(out), "--crops", str(args.crops), "--repeats", str(args.repeats),
                            "--seed", str(args.seed)], check=True)
        ref = dict(np.load(out))
    if args.write_test_data:  # the 12 test crops again, with more draws so the stored means are steady
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "test_reference.npz"
            subprocess.run([args.ref_python, __file__, "--reference", str(args.reference), "--reference-side",
                            str(out), "--crops", "12", "--repeats", "24", "--seed", str(args.seed)], check=True)
            test_ref = dict(np.load(out))
        assert np.array_equal(test_ref["crops"], ref["crops"][:12])
        write_test_data(test_ref, TEST_DATA)
    lines, inside, total = compare(ref, args.repeats, args.seed + 1, args.frost_images)
    texture = f"photographs from {args.frost_images}" if args.frost_images else "procedural texture"
    print(f"project / reference, mean absolute change from the clean image; {args.crops} natural 32x32 crops, "
          f"{args.repeats} draws each for the random ones; frost: {texture}")
    print(f"{inside} of {total} standard conditions within 15 %\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
