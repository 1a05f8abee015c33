"""The streaming data layer: loader throughput vs torchvision, and memory bounded by the batch, in one run.

    python benchmarks/bench_data.py [--images 1000] [--big 8000] [--size 224] [--batch 64] [--workers N]
                                    [--repeats 3] [--root DIR]

1. Throughput (target: ratio >= 0.95): images/s of our training loader (``open_folder`` + ``SeededView`` with
   ``train_transform(size)`` + ``ResumableSampler`` + ``make_loader``) vs torchvision's ``ImageFolder`` with the
   same v2 transforms and a plain ``DataLoader`` (shuffled, same workers, pin_memory, persistent workers), on a
   folder of 256x256 JPEGs the benchmark writes. Whole epochs, the two loaders interleaved ``--repeats`` times
   (ABBA order) after one warm-up epoch each; the ratio of the medians is printed.
2. Memory (target: ratio <= 1.2): peak RSS of iterating our loader over ``--images`` and over ``--big`` images
   (same batch, same transforms), each in a fresh process: the main process's peak and the largest worker's
   peak (``RUSAGE_CHILDREN``), and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_folder(root: Path, n: int, classes: int = 10, size: int = 256, seed: int = 0) -> Path:
    """``n`` JPEGs (``size`` x ``size``, smooth colour fields plus noise, quality 90) in ``classes`` folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    done = sum(1 for _ in root.rglob("*.JPEG")) if root.is_dir() else 0
    for i in range(done, n):
        c = i % classes
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
        a, b, col = rng.uniform(-1, 1, 2), rng.uniform(0, 2 * np.pi), rng.uniform(40, 215, 3)
        field = np.sin(6 * (a[0] * xx + a[1] * yy) + b)[..., None] * 40 + col
        img = np.clip(field + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"class{c:03d}" / f"{i:06d}.JPEG", quality=90)
    return root


def subset_folder(src: Path, dst: Path, n: int) -> Path:
    """Hard links to the first ``n`` images of ``src`` (no second copy on disk)."""
    files = sorted(src.rglob("*.JPEG"), key=lambda p: p.name)[:n]
    for f in files:
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        if not (dst / f.parent.name / f.name).exists():
            os.link(f, dst / f.parent.name / f.name)
    return dst


def our_loader(root: Path, size: int, batch: int, workers: int):
    from diffaug.data import ResumableSampler, SeededView, make_loader, open_folder, train_transform

    ds = open_folder(root)
    sampler = ResumableSampler(len(ds), seed=0)
    loader = make_loader(SeededView(ds, train_transform(size), seed=0), batch, sampler=sampler, workers=workers)
    epoch = [0]

    def run():
        sampler.set_position(epoch[0])
        epoch[0] += 1
        return sum(b[0].shape[0] for b in loader)

    return run


def torchvision_loader(root: Path, size: int, batch: int, workers: int):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from diffaug.data import train_transform

    ds = ImageFolder(str(root), transform=train_transform(size))
    loader = DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0),
                        num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    return lambda: sum(b[0].shape[0] for b in loader)


def throughput(root: Path, size: int, batch: int, workers: int, repeats: int) -> dict:
    loaders = {"ours": our_loader(root, size, batch, workers), "torchvision": torchvision_loader(root, size, batch,
                                                                                                 workers)}
    for run in loaders.values():  # warm-up: start the persistent workers, fill the page cache
        run()
    rates = {k: [] for k in loaders}
    for r in range(repeats):
        for name in (("ours", "torchvision") if r % 2 == 0 else ("torchvision", "ours")):
            t0 = time.perf_counter()
            n = loaders[name]()
            rates[name].append(n / (time.perf_counter() - t0))
    return rates


def rss_child(root: str, size: int, batch: int, workers: int) -> None:
    run = our_loader(Path(root), size, batch, workers)
    n = run()
    main_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del run  # shut the workers down so that RUSAGE_CHILDREN sees them
    import gc

    gc.collect()
    time.sleep(0.5)
    print(json.dumps({"images": n, "main_mb": main_kb / 1024,
                      "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def peak_rss(root: Path, size: int, batch: int, workers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(root), "--size", str(size), "--batch",
                          str(batch), "--workers", str(workers)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--big", type=int, default=8000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="default: min(8, CPUs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--root", default=None, help="where to write the JPEGs (default: a temporary folder)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    from diffaug.data import default_workers

    workers = default_workers() if args.workers is None else args.workers
    if args.rss_child:
        rss_child(args.rss_child, args.size, args.batch, workers)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.root or tmp)
        t0 = time.perf_counter()
        big = write_folder(base / f"jpeg-{args.big}", max(args.big, args.images))
        small = subset_folder(big, base / f"jpeg-{args.images}", args.images)
        print(f"data: {args.big} 256x256 JPEGs in {big} ({time.perf_counter() - t0:.0f} s to write); "
              f"{torch.get_num_threads()} threads, {workers} workers, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}")
        rates = throughput(small, args.size, args.batch, workers, args.repeats)
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k, v in rates.items():
            print(f"throughput {k:12s}: median {med[k]:7.1f} images/s  (runs: {', '.join(f'{x:.1f}' for x in v)})")
        ratio = med["ours"] / med["torchvision"]
        print(f"throughput ratio ours / torchvision ImageFolder: {ratio:.3f}  (target >= 0.95: "
              f"{'met' if ratio >= 0.95 else 'NOT met'})")
        if args.skip_memory:
            return
        m = {n: peak_rss(folder, args.size, args.batch, workers) for n, folder in ((args.images, small),
                                                                                  (args.big, big))}
        for n, r in m.items():
            print(f"peak RSS over {r['images']:5d} images: main {r['main_mb']:7.1f} MB, largest worker "
                  f"{r['worker_mb']:7.1f} MB")
        print_rss_ratios(m, args.images, args.big)


def print_rss_ratios(peaks: dict, small: int, big: int) -> None:
    """Print the peak-RSS ratio big / small images of the main process and the largest worker (target <= 1.2);
    ``peaks[n]`` holds ``main_mb`` and ``worker_mb``."""
    for key in ("main_mb", "worker_mb"):
        ratio = peaks[big][key] / peaks[small][key]
        print(f"peak RSS ratio {big} / {small} images ({key.split('_')[0]}): {ratio:.3f}  "
              f"(target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")


if __name__ == "__main__":
    main()
