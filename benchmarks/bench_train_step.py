"""Classifier step time: plain vs diffaug vs (plain + one bare denoiser forward), side by side in one run.

    python benchmarks/bench_train_step.py [--batch 128] [--repeats 30] [--model small_cnn]

Target (issue 3): diffaug step <= 1.05 x (plain step + denoiser forward): no overhead beyond the one network
evaluation the method needs. The diffaug step also runs the classifier on 2B images (clean + DiffAug), so a
second ratio compares it with a plain step on 2B images plus the denoiser forward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import diffaug
from diffaug.augment import DiffAug
from diffaug.data import load_digits
from diffaug.recipes import DiffAugRecipe, Plain


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    den = diffaug.load_denoiser("digits", device=device)
    aug = DiffAug(den)
    data = load_digits("train")
    x, y = data.images[: args.batch].to(device), data.labels[: args.batch].to(device)
    model = diffaug.create_classifier(args.model, 10, 1, seed=0).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    recipes = {"plain": Plain(model), "diffaug": DiffAugRecipe(model, aug)}
    t = torch.randint(0, den.num_timesteps, (args.batch,), generator=g, device=device)
    null = torch.full((args.batch,), den.null_class, device=device)

    x2, y2 = torch.cat([x, x]), torch.cat([y, y])

    def step(recipe, xb=x, yb=y):
        loss, _ = recipes[recipe](xb, yb, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def denoiser_forward():
        with torch.no_grad():
            den.net.unet(x * 2 - 1, t, class_labels=null)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fns = {"plain": lambda: step("plain"), "diffaug": lambda: step("diffaug"), "denoiser": denoiser_forward,
           "plain_2B": lambda: step("plain", x2, y2)}
    times = {k: [] for k in fns}
    for _ in range(3):
        for fn in fns.values():
            fn()
    for _ in range(args.repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"device={device} model={args.model} batch={args.batch} repeats={args.repeats} threads={torch.get_num_threads()}")
    for k in fns:
        print(f"{k:10s} median {med[k]:8.2f} ms")
    ratio = med["diffaug"] / (med["plain"] + med["denoiser"])
    print(f"ratio diffaug / (plain + denoiser forward) = {ratio:.3f}  (target <= 1.05)")
    fair = med["diffaug"] / (med["plain_2B"] + med["denoiser"])
    print(f"ratio diffaug / (plain on the 2B images it sees + denoiser forward) = {fair:.3f}")


if __name__ == "__main__":
    main()
