"""Base-classifier evaluations per second: ``Smooth.sample_counts`` vs a straightforward reference loop.

    python benchmarks/bench_certify.py [--n 20000] [--batch 1000] [--denoiser]

Both run on the same classifier, image, batch size and generator seed, interleaved; the script checks that they
produce the same counts and prints the speed ratio (target >= 1.0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import diffaug
from diffaug.data import load_digits


def reference_counts(model, x, sigma, num, batch, gen, num_classes):
    """Repeat the image, add noise, argmax, count per batch."""
    counts = torch.zeros(num_classes, dtype=torch.long)
    with torch.no_grad():
        left = num
        while left:
            b = min(batch, left)
            rep = x.repeat(b, 1, 1, 1)
            pred = model(rep + torch.randn(rep.shape, generator=gen) * sigma).argmax(1)
            counts += torch.bincount(pred, minlength=num_classes)
            left -= b
    return counts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sigma", type=float, default=0.5)
    args = p.parse_args()
    model = diffaug.create_classifier("small_cnn", 10, 1, seed=0).eval()
    smooth = diffaug.Smooth(model, 10, args.sigma)
    x = load_digits("test").images[0]
    times = {"certify": [], "reference": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a = smooth.sample_counts(x, args.n, args.batch, torch.Generator().manual_seed(0))
        times["certify"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = reference_counts(model, x, args.sigma, args.n, args.batch, torch.Generator().manual_seed(0), 10)
        times["reference"].append(time.perf_counter() - t0)
        assert torch.equal(a, b), (a, b)
    rate = {k: args.n / statistics.median(v) for k, v in times.items()}
    print(f"n={args.n} batch={args.batch} repeats={args.repeats} threads={torch.get_num_threads()} same counts: yes")
    for k, v in rate.items():
        print(f"{k:10s} {v:10.0f} evaluations/s")
    print(f"ratio certify / reference = {rate['certify'] / rate['reference']:.3f}  (target >= 1.0)")


if __name__ == "__main__":
    main()
