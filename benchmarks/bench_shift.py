"""DiffAug-Ensemble (DE) vs DDA: wall-clock per image on the same classifier and denoiser, side by side.

    python benchmarks/bench_shift.py [--batch 64] [--repeats 5] [--device cpu] [--classifier DIR]

Both predict the same batch of test digits (severity-5 Gaussian noise): DE = 9 one-step DiffAug views
(t = 50..450) + 10 classifier calls; DDA = 50 guided reverse steps (forward and backward through the denoiser)
+ 1 classifier call. Calls are interleaved so machine noise hits both alike; the medians and their ratio are
printed, with the cost model ``DDA / DE ~ steps * (1 + backward/forward) / members``, whose terms are measured
in the same run (issue 4's target: DE >= 15x faster). Without ``--classifier`` a seeded untrained small CNN is
used (the timing does not depend on its weights).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import diffaug
from diffaug.corruptions import corrupt
from diffaug.data import load_dataset
from diffaug.dda import dda_adapt
from diffaug.ensemble import diffaug_ensemble


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--denoiser", default="digits")
    p.add_argument("--data", default="digits")
    p.add_argument("--classifier")
    args = p.parse_args()
    device = torch.device(args.device)
    den = diffaug.load_denoiser(args.denoiser, device=device)
    test = load_dataset(args.data, "test")
    x = test.images[: args.batch].to(device)
    x = corrupt(x, "gaussian_noise", 5, torch.Generator(device=device).manual_seed(0))
    clf = (diffaug.load_classifier(args.classifier, device=device) if args.classifier else
           diffaug.create_classifier("small_cnn", test.num_classes, den.channels, seed=0).to(device)).eval()
    g = torch.Generator(device=device).manual_seed(0)
    t_fixed = torch.full((x.shape[0],), 250, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_de():
        with torch.no_grad():
            diffaug_ensemble(clf, den, x, generator=g)

    def run_dda():
        with torch.no_grad():
            clf(dda_adapt(den, x, generator=g))

    def run_forward():
        with torch.no_grad():
            den.predict_x0(den.encode(x), t_fixed)

    def run_forward_backward():
        xi = den.encode(x).requires_grad_(True)
        torch.autograd.grad(den.predict_x0(xi, t_fixed).sum(), xi)

    runs = {"de": run_de, "dda": run_dda, "forward": run_forward, "forward+backward": run_forward_backward}
    times = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = x.shape[0]
    print(f"device={device} batch={n} repeats={args.repeats} threads={torch.get_num_threads()}")
    for k in ("de", "dda"):
        print(f"{k:4s} median {med[k] * 1e3:9.1f} ms per batch  {med[k] / n * 1e3:8.3f} ms per image")
    b_over_f = med["forward+backward"] / med["forward"] - 1
    print(f"denoiser forward {med['forward'] * 1e3:.1f} ms, forward+backward {med['forward+backward'] * 1e3:.1f} ms "
          f"(backward/forward = {b_over_f:.2f})")
    print(f"cost model: 50 * (1 + {b_over_f:.2f}) / 9 = {50 * (1 + b_over_f) / 9:.1f}")
    print(f"ratio DDA / DE = {med['dda'] / med['de']:.1f}  (target >= 15)")


if __name__ == "__main__":
    main()
