"""DiffAug overhead vs the bare network forward, side by side in one run.

    python benchmarks/bench_diffaug.py [--batch 256] [--repeats 30] [--device cpu]

Prints the median time of ``DiffAug(x)`` and of ``unet(x_t, t, y)`` on the same batch (default digits
denoiser), their ratio (target <= 1.10), and on CUDA the peak memory of each under ``torch.no_grad()``.
Timings interleave the two calls so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import diffaug


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--denoiser", default="digits")
    p.add_argument("--sampler", default="tweedie")
    args = p.parse_args()
    device = torch.device(args.device)
    den = diffaug.load_denoiser(args.denoiser, device=device)
    aug = diffaug.DiffAug(den, sampler=args.sampler)
    g = torch.Generator(device=device).manual_seed(0)
    H, W = den.image_size
    x = torch.rand(args.batch, den.channels, H, W, generator=g, device=device)
    t = torch.randint(0, den.num_timesteps, (args.batch,), generator=g, device=device)
    y = None if not den.is_conditional else torch.full((args.batch,), den.null_class, device=device)
    unet = den.net.unet

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_aug():
        aug(x, generator=g)

    def run_net():
        unet(x * 2 - 1, t, class_labels=y)

    times = {"diffaug": [], "network": []}
    with torch.no_grad():
        for _ in range(3):
            run_aug(), run_net()
        for _ in range(args.repeats):
            for name, fn in (("diffaug", run_aug), ("network", run_net)):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t0)
        peak = {}
        if device.type == "cuda":
            for name, fn in (("diffaug", run_aug), ("network", run_net)):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                sync()
                peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"device={device} batch={args.batch} repeats={args.repeats} sampler={args.sampler} "
          f"threads={torch.get_num_threads()}")
    print(f"network forward   median {med['network']:8.2f} ms")
    print(f"DiffAug(x)        median {med['diffaug']:8.2f} ms")
    print(f"ratio DiffAug / network = {med['diffaug'] / med['network']:.3f}  (target <= 1.10 for tweedie)")
    if peak:
        print(f"peak extra CUDA memory: DiffAug {peak['diffaug']:.1f} MiB, network {peak['network']:.1f} MiB")


if __name__ == "__main__":
    main()
