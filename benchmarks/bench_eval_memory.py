"""eval-shift's memory is bounded by the batch, not by the number of images, measured side by side in one run.

    python benchmarks/bench_eval_memory.py [--images 1000] [--big 8000] [--size 64] [--image-size 32]
                                           [--batch 64] [--workers 0] [--root DIR]

Writes an ImageNet-C-shaped folder (``fog/1/<class>/<image>.JPEG``, ``--size`` px JPEGs, 10 classes) of ``--big``
images and a hard-linked copy of its first ``--images``, saves an untrained ``small_cnn`` classifier recorded at
``--image-size`` px with the folder's classes, then, each in a fresh process, runs
``diffaug eval-shift --modes default --no-analyses`` over both folders and reports the peak RSS (the main
process's; with ``--workers N`` also the largest worker's) and the ratio big / small (target: <= 1.2).

For contrast (to show the measurement can see growth) it also reports the peak RSS of reading the same two
folders whole with the in-memory reader (``diffaug.data.load_corrupted``, what eval-shift did before it
streamed ImageNet-C), whose ratio grows with the number of images.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import subset_folder, write_folder  # noqa: E402


def child(mode: str, root: str, clf: str, batch: int, workers: int) -> None:
    """Run one measurement in this (fresh) process and print its peak RSS as JSON."""
    import contextlib
    import io

    if mode == "stream":
        from diffaug.cli import main

        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
            rc = main(["eval-shift", "--data", root, "--classifier", clf, "--modes", "default", "--no-analyses",
                       "--corruptions", "fog", "--severities", "1", "--batch", str(batch), "--workers", str(workers),
                       "--device", "cpu", "--quiet", "--out", out])
        if rc:
            raise SystemExit(rc)
    else:
        from diffaug.data import load_corrupted

        load_corrupted(root, "fog", 1)
    print(json.dumps({"main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def peak(mode: str, root: Path, clf: Path, batch: int, workers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(root), str(clf), "--batch", str(batch),
                          "--workers", str(workers)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--big", type=int, default=8000)
    p.add_argument("--size", type=int, default=64, help="side of the JPEGs written")
    p.add_argument("--image-size", dest="image_size", type=int, default=32, help="the classifier's input size")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--root", help="folder for the images (default: a temporary one)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child, args.batch, args.workers)
        return
    import torch

    from diffaug.classifier import create_classifier, save_classifier

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.root or tmp)
        big = write_folder(base / "big" / "fog" / "1", args.big, size=args.size)
        small = subset_folder(big, base / "small" / "fog" / "1", args.images)
        clf = base / "clf"
        save_classifier(create_classifier("small_cnn", 10, 3, seed=0, image_size=args.image_size), clf,
                        extra={"classes": sorted(d.name for d in big.iterdir())})
        print(f"torch {torch.__version__}; {args.size}-px JPEGs scored at {args.image_size} px, batch {args.batch}, "
              f"workers {args.workers}")
        for mode, label in (("stream", "eval-shift (streamed)"), ("memory", "in-memory reader (contrast)")):
            m = {n: peak(mode, folder.parent.parent, clf, args.batch, args.workers)
                 for n, folder in ((args.images, small), (args.big, big))}
            a, b = m[args.images], m[args.big]
            line = (f"{label:28s} peak RSS main {a['main_mb']:7.1f} MB ({args.images} images) vs "
                    f"{b['main_mb']:7.1f} MB ({args.big}): ratio {b['main_mb'] / a['main_mb']:.3f}")
            if mode == "stream" and args.workers:
                line += (f"; largest worker {a['worker_mb']:.1f} vs {b['worker_mb']:.1f} MB: ratio "
                         f"{b['worker_mb'] / a['worker_mb']:.3f}")
            print(line)


if __name__ == "__main__":
    main()
