"""DiffAug at ImageNet scale: ADM-256 throughput per precision path, and ResNet-50 training plain vs DiffAug.

    python benchmarks/bench_gpu.py [--device cuda] [--batch 64] [--repeats 10] [--no-compile]
                                   [--train-batch 64] [--peak-tflops X] [--json FILE]

Random weights (no checkpoint is read): the architecture of guided-diffusion's ``256x256_diffusion_uncond``
(the paper's model) built by ``diffaug.nets.adm``. All paths run in one process and are timed interleaved, so
machine noise hits them alike; the ratios are the result, absolute times only describe this machine.

DiffAug paths (the whole call: draw t and noise, diffuse, one network evaluation, x0, clip):

* ``fp32``: float32 weights and compute, NCHW, fused SDPA: the no-flags baseline.
* ``fp16-reference``: the original code's way: the network converted to float16 (``.half()``), NCHW,
  attention materialised (PyTorch's math SDPA, as the original einsum), under float16 autocast, not compiled.
* ``bf16``: float32 weights under bfloat16 autocast, channels_last, fused SDPA (flash / memory-efficient).
* ``bf16+compile``: the same, ``torch.compile``d.
* ``bf16-weights+compile``: the frozen denoiser held in bfloat16, channels_last, compiled.

Achieved FLOP/s = (forward FLOPs per image, counted by ``torch.utils.flop_counter``) x images/s; the fraction is
of the GPU's dense bf16 tensor-core peak (a table of known GPUs, or ``--peak-tflops``).
Targets (issue 9): best bf16 path >= 40 % of peak, and >= 1.5x the fp16 reference.

Training: ResNet-50 at 224 px (torchvision's, random weights, in diffaug's classifier wrapper), SGD, bf16
autocast + channels_last (+ compile on GPUs): a plain step
(B clean images) vs a DiffAug step (B clean + B DiffAug views made from 256 px images by the ADM-256, centre
cropped to 224), reported as clean images per second and the DiffAug / plain time ratio.

On CPU it runs the architecture at width 64 (1/16 of the FLOPs), batch 1 / 2, one repeat, no compile by
default: a smoke run with numbers for that machine only (CPUs have no fast float16); the targets are judged on a
GPU with the full width 256.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from diffaug import DiffAug, Denoiser
from diffaug.utils import accel
from diffaug.nets.adm import ADMUNet, adm_config
from diffaug.schedule import linear_alpha_bar

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; the first match wins
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0)]


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def forward_flops(config, size: int) -> float:
    """FLOPs of one forward of one image (2 per multiply-add), counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        meta = ADMUNet(config)
        x, t = torch.randn(1, 3, size, size), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            meta(x, t)
    return float(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def make_paths(base: ADMUNet, compile: bool, device: torch.device) -> dict:
    """name -> (DiffAug module, context factory) for each precision path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def denoiser(net):
        return Denoiser(net, linear_alpha_bar(1000), "epsilon", image_size=(256, 256), channels=3)

    paths = {}
    plain = denoiser(copy.deepcopy(base).to(device))
    paths["fp32"] = (DiffAug(plain, validate=False), torch.no_grad)
    ref = denoiser(copy.deepcopy(base).half().to(device))
    accel.accelerate(ref, precision="fp16")
    paths["fp16-reference"] = (DiffAug(ref, validate=False), lambda: sdpa_kernel(SDPBackend.MATH))
    fast = denoiser(copy.deepcopy(base).to(device))
    accel.accelerate(fast, precision="bf16", channels_last=True)
    paths["bf16"] = (DiffAug(fast, validate=False), torch.no_grad)
    if compile:
        comp = denoiser(copy.deepcopy(base).to(device))
        accel.accelerate(comp, precision="bf16", channels_last=True, compile=True)
        paths["bf16+compile"] = (DiffAug(comp, validate=False), torch.no_grad)
        half = denoiser(copy.deepcopy(base).to(device, torch.bfloat16))
        accel.accelerate(half, precision="bf16", channels_last=True, compile=True)
        paths["bf16-weights+compile"] = (DiffAug(half, validate=False), torch.no_grad)
    return paths


def bench_diffaug(args, device: torch.device) -> dict:
    torch.manual_seed(0)
    config = adm_config("256x256_diffusion_uncond", num_channels=args.num_channels)[0]
    base = ADMUNet(config).eval()
    flops = forward_flops(config, 256)
    paths = make_paths(base, args.compile, device)
    del base
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(args.batch, 3, 256, 256, generator=gen, device=device)
    times = {name: [] for name in paths}
    with torch.no_grad():
        for name, (aug, ctx) in paths.items():  # warm-up (compilation, cuDNN autotuning)
            for _ in range(args.warmup):
                with ctx():
                    aug(x, generator=gen)
        for _ in range(args.repeats):
            for name, (aug, ctx) in paths.items():
                with ctx():
                    times[name].append(timed(lambda: aug(x, generator=gen), device))
    peak = peak_tflops(device, args.peak_tflops)
    ref = statistics.median(times["fp16-reference"])
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        ips = args.batch / med
        tflops = flops * ips / 1e12
        rows[name] = {"seconds_per_batch": med, "images_per_s": ips, "tflops": tflops,
                      "fraction_of_peak": tflops / peak if peak else None, "speedup_vs_fp16_reference": ref / med}
    return {"forward_gflops_per_image": flops / 1e9, "peak_bf16_tflops": peak, "paths": rows}


def bench_training(args, device: torch.device) -> dict:
    import torch.nn.functional as F

    from diffaug import create_classifier

    model = create_classifier("torchvision:resnet50", 1000, 3, seed=0).to(device)
    accel.accelerate(model, precision="bf16", channels_last=True, compile=args.compile)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(0)
    config = adm_config("256x256_diffusion_uncond", num_channels=args.num_channels)[0]
    den = Denoiser(ADMUNet(config).eval().to(device, torch.bfloat16),
                   linear_alpha_bar(1000), "epsilon", image_size=(256, 256), channels=3)
    accel.accelerate(den, precision="bf16", channels_last=True, compile=args.compile)
    aug = DiffAug(den, validate=False)
    gen = torch.Generator(device=device).manual_seed(0)
    b = args.train_batch
    x256 = torch.rand(b, 3, 256, 256, generator=gen, device=device)
    y = torch.randint(0, 1000, (b,), generator=gen, device=device)

    def crop(v):
        return v[..., 16:240, 16:240].contiguous(memory_format=torch.channels_last)

    def step(with_diffaug: bool):
        views = [crop(x256)]
        labels = [y]
        if with_diffaug:
            with torch.no_grad():
                views.append(crop(aug(x256, generator=gen)))
            labels.append(y)
        loss = F.cross_entropy(model(torch.cat(views)), torch.cat(labels))  # the wrapper autocasts, returns fp32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step(False)
        step(True)
    times = {"plain": [], "diffaug": []}
    for _ in range(args.repeats):
        times["plain"].append(timed(lambda: step(False), device))
        times["diffaug"].append(timed(lambda: step(True), device))
    plain, da = statistics.median(times["plain"]), statistics.median(times["diffaug"])
    return {"batch": b, "plain_images_per_s": b / plain, "diffaug_images_per_s": b / da,
            "diffaug_over_plain_time": da / plain}


def judge_targets(best_name: str, best: dict) -> None:
    if best["fraction_of_peak"] is not None:
        print(f"target >= 40 % of peak: {100 * best['fraction_of_peak']:.1f} % ({best_name}) -> "
              f"{'met' if best['fraction_of_peak'] >= 0.40 else 'NOT met'}")
    else:
        print("target >= 40 % of peak: not judged (unknown GPU; pass --peak-tflops)")
    print(f"target >= 1.5x fp16 reference: {best['speedup_vs_fp16_reference']:.2f}x ({best_name}) -> "
          f"{'met' if best['speedup_vs_fp16_reference'] >= 1.5 else 'NOT met'}")


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--batch", type=int, default=64 if cuda else 1)
    p.add_argument("--train-batch", dest="train_batch", type=int, default=64 if cuda else 2)
    p.add_argument("--repeats", type=int, default=10 if cuda else 1)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--num-channels", dest="num_channels", type=int, default=256 if cuda else 64,
                   help="ADM base width: 256 is the paper's model; CPU runs default to 64 (1/16 of the FLOPs)")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=cuda)
    p.add_argument("--skip-train", dest="train", action="store_false")
    p.add_argument("--peak-tflops", dest="peak_tflops", type=float, help="dense bf16 peak if the GPU is not known")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    device = torch.device(args.device)
    if cuda:
        torch.backends.cudnn.benchmark = True
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if cuda else None, "threads": torch.get_num_threads(),
           "batch": args.batch, "repeats": args.repeats, "compile": args.compile, "num_channels": args.num_channels}
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    result = {"env": env, "diffaug": bench_diffaug(args, device)}
    d = result["diffaug"]
    print(f"\nDiffAug, ADM-256 unconditional (width {args.num_channels}), batch {args.batch}: {d['forward_gflops_per_image']:.0f} GFLOP per image "
          f"forward; dense bf16 peak {d['peak_bf16_tflops'] or 'unknown'} TFLOP/s")
    print(f"{'path':24} {'images/s':>9} {'TFLOP/s':>9} {'% peak':>7} {'x fp16-ref':>10}")
    for name, r in d["paths"].items():
        frac = f"{100 * r['fraction_of_peak']:.1f}" if r["fraction_of_peak"] is not None else "-"
        print(f"{name:24} {r['images_per_s']:9.3g} {r['tflops']:9.3g} {frac:>7} {r['speedup_vs_fp16_reference']:10.3g}")
    best_name = max((n for n in d["paths"] if n.startswith("bf16")), key=lambda n: d["paths"][n]["images_per_s"])
    best = d["paths"][best_name]
    if device.type != "cuda" or args.num_channels != 256 or args.batch != 64:
        print(f"targets not judged: they are for a CUDA GPU, width 256, batch 64 (this run: {device.type}, width "
              f"{args.num_channels}, batch {args.batch}); best bf16 path {best_name}: "
              f"{best['speedup_vs_fp16_reference']:.3g}x the fp16 reference")
    else:
        judge_targets(best_name, best)
    if args.train:
        t = result["training"] = bench_training(args, device)
        print(f"\nResNet-50 training, 224 px, batch {t['batch']} (bf16 autocast, channels_last): plain "
              f"{t['plain_images_per_s']:.1f} img/s, with DiffAug {t['diffaug_images_per_s']:.1f} img/s "
              f"(DiffAug step / plain step time {t['diffaug_over_plain_time']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
