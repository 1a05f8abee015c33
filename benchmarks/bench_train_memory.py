"""Memory of the whole ``diffaug train`` bounded by the batch, not the dataset, in one run.

    python benchmarks/bench_train_memory.py [--images 1000] [--big 8000] [--steps 20] [--size 64] [--batch 32]
                                            [--workers 2] [--model resnet_small] [--root DIR]

Writes a folder of ``--big`` 256x256 JPEGs (``bench_data.write_folder``) and hard links to the first ``--images``
of them, then runs ``diffaug train`` (recipe plain, a single class folder split 70/10/20, the same ``--steps``,
batch, crop size and workers) on each folder, each in a fresh process, and prints side by side the peak RSS of
its main process (``RUSAGE_SELF``) and of its largest DataLoader worker (``RUSAGE_CHILDREN``), and their ratios
(target: <= 1.2). The closing evaluation on val / test is included (it reads 8x more images on the big folder).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import print_rss_ratios, subset_folder, write_folder  # noqa: E402


def train_child(argv: list[str]) -> None:
    """Run ``diffaug train`` in this process, then print its peak RSS (main, largest worker) as JSON."""
    import gc

    from diffaug.cli import main

    t0 = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - t0
    gc.collect()  # the loaders' workers have exited: RUSAGE_CHILDREN sees them
    time.sleep(0.5)
    print(json.dumps({"rc": rc, "seconds": seconds,
                      "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def peak_rss(folder: Path, out: Path, args) -> dict:
    argv = ["train", "--data", str(folder), "--recipe", "plain", "--model", args.model, "--steps", str(args.steps),
            "--batch-size", str(args.batch), "--image-size", str(args.size), "--workers", str(args.workers),
            "--checkpoint-every", str(args.steps), "--out", str(out), "--quiet", "--device", "cpu"]
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"diffaug train on {folder} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--big", type=int, default=8000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64, help="crop size (--image-size)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", default="resnet_small")
    p.add_argument("--root", default=None, help="where to write the JPEGs (default: a temporary folder)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        train_child(json.loads(args.child))
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.root or tmp)
        t0 = time.perf_counter()
        big = write_folder(base / f"jpeg-{args.big}", max(args.big, args.images))
        small = subset_folder(big, base / f"jpeg-{args.images}", args.images)
        print(f"data: {args.big} 256x256 JPEGs in {big} ({time.perf_counter() - t0:.0f} s to write); "
              f"diffaug train --recipe plain --model {args.model} --steps {args.steps} --batch-size {args.batch} "
              f"--image-size {args.size} --workers {args.workers}; {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}")
        m = {}
        for n, folder in ((args.images, small), (args.big, big)):
            m[n] = peak_rss(folder, Path(tmp) / f"run-{n}", args)
        for n, r in m.items():
            print(f"diffaug train on {n:5d} images: peak RSS main {r['main_mb']:7.1f} MB, largest worker "
                  f"{r['worker_mb']:7.1f} MB ({r['seconds']:.0f} s)")
        print_rss_ratios(m, args.images, args.big)


if __name__ == "__main__":
    main()
