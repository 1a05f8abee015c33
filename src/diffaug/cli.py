"""The ``diffaug`` command line: a thin layer of argparse over the library functions.

Each command (:data:`COMMANDS`) is a handler ``cmd_*``, a function adding its own flags, and a parent parser of
the flags it shares with others (:func:`_common`: ``--out``, ``--seed``, ``--device``, ``--quiet``, ``--resume``,
the speed and evaluation-data flags). Where a command maps onto a config dataclass (``train-diffusion``,
``train``, ``train-guidance``, ``study``), its flags are derived from the fields (:func:`_field_flags`: ``field_name``
-> ``--field-name``, the type from the annotation, help texts from a table here) and the config is built from them
(:func:`_config`). ``tests/test_cli_flags.py`` pins every flag, the Namespace of representative command lines and
the configs they build.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple, NoReturn

from .errors import InputError, StorageError
from .utils.checkpoint import write_text


def _device(name: str | None) -> str:
    import torch

    if not name:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} requested but this machine has no CUDA GPU (or this PyTorch build has no "
                         "CUDA); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def _speed(args):
    """The --precision / --channels-last / --compile settings (checked before any work)."""
    from .utils.accel import Speed

    return Speed(args.precision, args.channels_last, args.compile)


def _png_path(value: str) -> Path:
    out = Path(value)
    if out.suffix.lower() != ".png":
        raise InputError(f"--out must name a .png file, got {out}")
    return out


def cmd_train_diffusion(args) -> None:
    from .train.diffusion import DiffusionTrainConfig, train_diffusion

    cfg = _config(DiffusionTrainConfig, args, DIFFUSION_FLAGS, sample_grid=not args.no_sample_grid)
    if args.unconditional:
        cfg.conditional = False
    if args.schedule:
        cfg.beta_schedule = {"linear": "linear", "cosine": "squaredcos_cap_v2"}.get(args.schedule, args.schedule)
    train_diffusion(cfg, args.out, resume=args.resume, force=args.force, device=_device(args.device), progress=not args.quiet)


def cmd_train(args) -> None:
    from .train.classifier import TrainConfig, train_classifier

    cfg = _config(TrainConfig, args, {**STEPS_FLAGS, **CLASSIFIER_FLAGS})
    if cfg.steps is None and cfg.epochs is None:
        cfg.epochs = 30
    train_classifier(cfg, args.out, resume=args.resume, force=args.force, device=_device(args.device),
                     progress=not args.quiet)


def cmd_certify(args) -> None:
    from .evaluate.certify import run_certify

    table = run_certify(data=args.data, classifiers=args.classifier, denoiser=args.denoiser, sigmas=args.sigma,
                        n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch, skip=args.skip,
                        limit=args.limit, seed=args.seed, out=args.out, device=_device(args.device),
                        progress=not args.quiet, speed=_speed(args), sequential=args.sequential,
                        max_n=args.max_n, image_size=args.image_size, workers=args.workers,
                        on_bad_file=args.on_bad_file).text
    if table:
        print(table)


def cmd_eval_ood(args) -> None:
    from .evaluate.ood import run_eval_ood

    print(run_eval_ood(data=args.data, classifiers=args.classifier, ood=args.ood, seed=args.seed, out=args.out,
                       device=_device(args.device), search_percentile=args.search_percentile, speed=_speed(args),
                       image_size=args.image_size, workers=args.workers, image_root=args.image_root,
                       on_bad_file=args.on_bad_file).text)


def cmd_eval_shift(args) -> None:
    from .evaluate.shift import run_eval_shift

    table = run_eval_shift(data=args.data, classifiers=args.classifier, denoiser=args.denoiser, modes=args.modes,
                           corruptions=args.corruptions, severities=args.severities, limit=args.limit,
                           seed=args.seed, out=args.out, device=_device(args.device), batch_size=args.batch,
                           de_step=args.de_step, dda_t=args.dda_t, dda_steps=args.dda_steps,
                           dda_scale=args.dda_scale, dda_downsample=args.dda_downsample, dda_norm=args.dda_norm,
                           analyses=not args.no_analyses, progress=not args.quiet, speed=_speed(args),
                           frost_images=args.frost_images, image_size=args.image_size, workers=args.workers,
                           on_bad_file=args.on_bad_file).text
    if table:
        print(table)


def cmd_train_guidance(args) -> None:
    from .train.guidance import GuidanceTrainConfig, train_guidance

    train_guidance(_config(GuidanceTrainConfig, args, GUIDANCE_FLAGS), args.out, resume=args.resume,
                   device=_device(args.device), progress=not args.quiet)


def cmd_sample(args) -> None:
    import math

    import torch
    from .denoiser import load_denoiser
    from .guidance import GuidanceClassifier, guided_sample, recorded_setting
    from .utils.figures import save_grid

    out = _png_path(args.out)
    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    if not math.isfinite(args.scale):
        raise InputError(f"--scale must be a finite number, got {args.scale}")
    device, speed = _device(args.device), _speed(args)
    den = load_denoiser(args.denoiser or recorded_setting([args.guidance], "denoiser"), device=device, speed=speed)
    guidance = GuidanceClassifier.from_pretrained(args.guidance, den, speed=speed)
    k, names = guidance.spec["num_classes"], [str(c) for c in guidance.spec.get("classes") or []]
    cls = names.index(args.cls) if args.cls in names else int(args.cls) if args.cls.lstrip("-").isdigit() else None
    if cls is None or not 0 <= cls < k:
        listed = f" ({', '.join(names[:20])}{' ...' if len(names) > 20 else ''})" if names else ""
        raise InputError(f"--class {args.cls} does not exist; the guidance classifier has classes 0..{k - 1}{listed}")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    y = torch.full((args.n,), cls, dtype=torch.long)
    samples = guided_sample(den, guidance, y, steps=args.steps, scale=args.scale, sampler=args.sampler,
                            variance=args.variance, generator=gen)
    save_grid(samples, out, nrow=min(args.n, 10))
    if not args.quiet:
        print(f"wrote {out}")


def cmd_eval_guidance(args) -> None:
    from .evaluate.guidance import run_eval_guidance
    from .guidance import recorded_setting

    print(run_eval_guidance(guidance=args.guidance,
                            denoiser=args.denoiser or recorded_setting(args.guidance, "denoiser"),
                            data=args.data or recorded_setting(args.guidance, "data"),
                            clean_classifier=args.clean_classifier, per_class=args.per_class, steps=args.steps,
                            scale=args.scale, sampler=args.sampler, variance=args.variance, seed=args.seed,
                            out=args.out, device=_device(args.device), generation=not args.no_generation,
                            progress=not args.quiet, speed=_speed(args), workers=args.workers).text)


def cmd_pag(args) -> None:
    from .classifier import MODEL_CONFIG
    from .evaluate.pag import run_pag
    from .guidance import recorded_setting

    out = _png_path(args.out)

    def recorded(key):  # what the guidance classifiers record, else what the classifiers record, else digits
        value = recorded_setting(args.guidance, key, default=None) if args.guidance else None
        if value is None and args.classifier:
            value = recorded_setting(args.classifier, key, default=None, record=MODEL_CONFIG, some=key == "denoiser")
        return value or "digits"

    denoiser, data = args.denoiser or recorded("denoiser"), args.data or recorded("data")
    run_pag(classifiers=args.classifier or [], guidance=args.guidance or [], denoiser=denoiser, data=data,
            t=args.t, n=args.n, seed=args.seed, out=out, device=_device(args.device), speed=_speed(args),
            workers=args.workers)
    if not args.quiet:
        print(f"wrote {out}")


def cmd_toy(args) -> None:
    import json

    from .study.toy import toy_demo

    out = _png_path(args.out)
    if any(not 0 <= t < 1000 for t in args.t):
        raise InputError(f"--t values must lie in [0, 1000), got {args.t}")
    if args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    result = toy_demo(out, times=tuple(args.t), steps=args.steps, seed=args.seed)
    write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    for row in result["per_t"]:
        print(f"t={row['t']}: mean distance to the data, noised {row['noisy']:.3f} -> one-step {row['one_step']:.3f}")


def cmd_study(args) -> None:
    from .study.stages import StudyConfig, run_study

    cfg = StudyConfig.from_file(args.config, quick=args.quick)
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if args.data is not None:
        cfg.data = args.data
    cfg.device = _device(args.device or (cfg.device if args.config else None))  # --device, the config's, or auto
    results = run_study(cfg, args.out, only=args.only, progress=not args.quiet)
    held = sum(1 for c in results["claims"] if c["holds"])
    print(f"study: {held} of {len(results['claims'])} claims hold here; report: {Path(args.out) / 'report.html'}")


def cmd_show_augmentations(args) -> None:
    from .study.report import show_augmentations

    out = _png_path(args.out)
    show_augmentations(args.denoiser, out, data=args.data, seed=args.seed, device=_device(args.device))
    print(f"wrote {out}")


def cmd_denoiser_quality(args) -> None:
    from .evaluate.quality import denoiser_quality

    denoiser_quality(args.denoiser, args.out, data=args.data, seeds=args.seeds, device=_device(args.device))


# ------------------------------------------------------------------ the parser
# Flags that most commands share; _common builds each command's parent parser from them.
SHARED_FLAGS = {"seed": {"type": int, "default": 0}, "device": {}, "quiet": {"action": "store_true"},
                "resume": {"action": "store_true"},
                "force": {"action": "store_true", "help": "overwrite a finished or unfinished run in --out"}}
SPEED_FIELDS = ("precision", "channels_last", "compile")  # the speed flags, also fields of every training config
WORKERS_HELP = "DataLoader worker processes for a streamed folder (default min(8, CPUs); 0 loads in the main process)"


def _add_speed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="fp32",
                   help="autocast precision of the networks: fp32 (default), bf16 (GPUs: fastest) or fp16")
    p.add_argument("--channels-last", dest="channels_last", action="store_true",
                   help="NHWC memory layout (faster convolutions on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (slow first batches)")


def _add_eval_data(p: argparse.ArgumentParser) -> None:
    """The options every evaluation that streams image folders at the classifier's size takes."""
    p.add_argument("--image-size", dest="image_size", type=int,
                   help="evaluate at this input size (default: the size in the classifier's model.json; image "
                        "folders are brought to it by Resize(size / 0.875) + CenterCrop(size))")
    _add_workers(p)
    p.add_argument("--on-bad-file", dest="on_bad_file", choices=("error", "skip"), default="error",
                   help="an unreadable or truncated image in a streamed folder: stop naming it (error, default) or "
                        "score the next image in its place, each one named on stderr (skip)")


def _add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, help="DataLoader worker processes for streamed image folders "
                   "(default min(8, CPUs); 0 reads in the main process)")


def _common(out_help: str | None, *names: str, **helps: str) -> argparse.ArgumentParser:
    """The parent parser of one command's shared flags: ``--out`` (required; ``out_help``) and those in ``names``:
    ``seed``, ``device``, ``quiet``, ``resume``, ``force`` (:data:`SHARED_FLAGS`; ``helps[name]`` replaces a flag's
    help text for this command), ``speed`` (--precision, --channels-last, --compile), ``eval-data``
    (--image-size, --workers of the streaming evaluations) and ``workers`` (--workers alone)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--out", required=True, help=out_help)
    for name in names:
        if name == "speed":
            _add_speed(parent)
        elif name == "eval-data":
            _add_eval_data(parent)
        elif name == "workers":
            _add_workers(parent)
        else:
            kwargs = {**SHARED_FLAGS[name], **({"help": helps[name]} if name in helps else {})}
            parent.add_argument(f"--{name}", **kwargs)
    return parent


def _flag_type(hint) -> dict:
    """``add_argument`` keywords for a dataclass field's annotation: ``int`` / ``float`` -> ``type``, ``str`` ->
    argparse's own, ``bool`` -> ``store_true``, ``list[X]`` -> ``nargs="+"`` of X; ``X | None`` as X."""
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return {"nargs": "+", **_flag_type(typing.get_args(hint)[0])}
    if hint is bool:
        return {"action": "store_true"}
    return {"type": hint} if hint in (int, float) else {}


def _field_flags(p, config, fields: dict[str, dict], *, defaults: tuple[str, ...] = ()) -> None:
    """``--field-name`` for each field of the dataclass ``config`` named in ``fields``, typed by its annotation
    (:func:`_flag_type`) and given the keywords in ``fields[name]`` (help, metavar, required, choices). A flag's
    default is None, so an absent flag leaves the config's default (:func:`_config`), except for the fields in
    ``defaults``, whose flags show the config's default."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config)
    config_defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, extra in fields.items():
        kwargs = {**_flag_type(hints[name]), **extra}
        if name in defaults:
            kwargs["default"] = config_defaults[name]
        p.add_argument("--" + name.replace("_", "-"), dest=name, **kwargs)


def _config(config, args, fields, **fixed):
    """The dataclass ``config`` from the flags of its ``fields``, ``--seed`` and the speed flags that were given (not
    None; an absent flag leaves the config's default), then ``fixed``."""
    given = {name: getattr(args, name) for name in (*fields, "seed", *SPEED_FIELDS) if getattr(args, name) is not None}
    return config(**{**given, **fixed})


# command -> {config field: its flag's keywords}: the flags derived from the config dataclasses
DIFFUSION_FLAGS = {
    "data": {"help": "'digits', a CIFAR-10 folder, or an image folder streamed from disk (its train split: "
                     "DIR/train, or 70%% of DIR/<class>/<image>)"},
    "steps": {"help": "optimiser steps (default 12000)"},
    "batch_size": {"help": "(default: 128 up to 32 px, fewer for larger images: 32 at 64 px)"},
    "image_size": {"help": "a streamed folder's images are resized and center-cropped to this power of two "
                           "(default 64)"},
    "workers": {"help": WORKERS_HELP},
    "lr": {}, "width": {"help": "UNet base width (default: sized for the image)"}, "layers_per_block": {},
    "checkpoint_every": {},
}
CLASSIFIER_FLAGS = {
    "data": {"help": "'digits', a CIFAR-10 folder, or an image folder streamed from disk: DIR/train + DIR/val "
                     "(+ DIR/test), or DIR/<class>/<image> split 70/10/20 without overlap"},
    "recipe": {"help": "plain | diffaug | augmix | augmix+diffaug"},
    "model": {"help": "small_cnn | resnet_small | timm name | torchvision:<name> (default per data)"},
    "denoiser": {"help": "'digits' or a denoiser folder (DiffAug recipes)"},
    "pretrained": {"help": "local weights to fine-tune from (.safetensors or state-dict .pt)"},
    "batch_size": {}, "lr": {}, "optimizer": {"help": "adamw | sgd"},
    "lr_schedule": {"help": "cosine | constant | step"}, "warmup_steps": {}, "weight_decay": {},
    "label_smoothing": {}, "t_min": {"help": "DiffAug t range, low end (inclusive)"},
    "t_max": {"help": "DiffAug t range, high end (inclusive)"}, "diffaug_weight": {}, "diffaug_fraction": {},
    "checkpoint_every": {}, "eval_every": {},
    "classes": {"help": "train on these class indices only (near-OOD protocol)"},
    "image_size": {"help": "crop size for a streamed image folder (default 224; digits and CIFAR-10 keep their size)"},
    "workers": {"help": WORKERS_HELP},
    "diffaug_view": {"help": "DiffAug of the Resize + CenterCrop view of each image (center, the paper's code; "
                             "default) or of its random crop (same)"},
    "on_bad_file": {"help": "an unreadable image: stop naming it (error, default) or use the next image, counted in "
                            "metrics.jsonl (skip)"},
    "transforms": {"help": "library of a streamed folder's train / eval transforms: torchvision (v2 API, default) "
                           "or timm (create_transform)"},
    "denoiser_size": {"help": "run the denoiser at N x N: images are resized (antialiased) to N and back around it "
                              "(default: the crop size, if the denoiser's network can take it)"},
    "aligned": {"metavar": "DIR", "help": "copies of the training set with the same relative paths (DeepAugment's "
                "EDSR / CAE): each adds a cross-entropy term on its view (same crop)"},
    "extra_data": {"metavar": "DIR", "help": "labelled images DIR/<class>/<image> added to the training set "
                   "(+Synth); classes matched by folder name"},
    "sync_bn": {"help": "SyncBatchNorm under torchrun (CUDA); no effect on one process"},
}
STEPS_FLAGS = {"steps": {}, "epochs": {"help": "(default 30 when neither is given)"}}  # one or the other
GUIDANCE_FLAGS = {
    "kind": {"required": True, "choices": ["noisy", "da"]},
    "data": {"help": "'digits', a CIFAR-10 folder, or an image folder streamed from disk"},
    "denoiser": {}, "steps": {}, "batch_size": {}, "lr": {}, "width": {}, "checkpoint_every": {},
    "labelled_fraction": {"help": "keep labels for this share of the train split (stratified)"},
    "consistency_weight": {"help": "> 0: semi-supervised temporal consistency on the unlabelled rest"},
    "consistency_delta": {"help": "t vs t + delta (default 50)"},
    "image_size": {"help": "a streamed folder's images are resized and center-cropped to this (default: the "
                           "denoiser's size; another size only if the denoiser's network can run at it)"},
    "workers": {"help": WORKERS_HELP},
}


def _train_diffusion_flags(p: argparse.ArgumentParser) -> None:
    from .train.diffusion import DiffusionTrainConfig

    _field_flags(p, DiffusionTrainConfig, DIFFUSION_FLAGS, defaults=("data",))
    p.add_argument("--no-sample-grid", dest="no_sample_grid", action="store_true",
                   help="skip the closing grid of samples (samples.png)")
    p.add_argument("--unconditional", action="store_true", help="train without class labels")
    p.add_argument("--schedule", help="noise schedule: cosine (improved DDPM, the default) or linear (DDPM)")


def _train_flags(p: argparse.ArgumentParser) -> None:
    from .train.classifier import TrainConfig

    _field_flags(p.add_mutually_exclusive_group(), TrainConfig, STEPS_FLAGS)
    _field_flags(p, TrainConfig, CLASSIFIER_FLAGS, defaults=("data", "recipe"))


def _train_guidance_flags(p: argparse.ArgumentParser) -> None:
    from .train.guidance import GuidanceTrainConfig

    _field_flags(p, GuidanceTrainConfig, GUIDANCE_FLAGS, defaults=("data", "denoiser"))


def _certify_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits")
    p.add_argument("--classifier", nargs="+", required=True, help="trained classifier folder(s)")
    p.add_argument("--denoiser", help="'digits' or a denoiser folder: denoised smoothing (DDS)")
    p.add_argument("--sigma", type=float, nargs="+", required=True, help="noise level(s) in [0, 1] pixel space")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=100_000,
                   help="estimation draws per image (spell it --num-samples under torchrun, whose own parser "
                   "takes --n for one of its options)")
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--sequential", action="store_true",
                   help="adaptive sampling with exact group-sequential tests on the table's radius grid: the same "
                   "guarantee as CERTIFY, stops as soon as the certified radius is decided")
    p.add_argument("--max-n", type=int, help="most estimation draws per image with --sequential (default: --n)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--skip", type=int, default=1, help="certify every K-th test image")
    p.add_argument("--limit", type=int, help="at most N images (digits / CIFAR-10: the first N; an image folder: a "
                   "seeded sample stratified by class)")


def _eval_ood_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="the ID data: 'digits' or a folder")
    p.add_argument("--classifier", nargs="+", required=True, help="trained classifier folder(s)")
    p.add_argument("--ood", nargs="+", help="holdout | photo-patches | noise | PATH | near=PATH: PATH an image "
                   "folder (flat, images/<class>/ or class folders) or an OpenOOD image list file (default: all "
                   "that apply; noise and holdout for a streamed folder)")
    p.add_argument("--image-root", dest="image_root",
                   help="the folder OpenOOD image lists' paths are relative to (default: each list's folder)")
    p.add_argument("--search-percentile", dest="search_percentile", action="store_true",
                   help="pick ReAct/ASH/SCALE percentiles on ID-val vs a synthetic OOD-val set (default: OpenOOD's)")


def _eval_shift_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits",
                   help="'digits', a dataset folder (corrupted on the fly) or an ImageNet-C / CIFAR-10-C folder")
    p.add_argument("--classifier", nargs="+", required=True, help="trained classifier folder(s)")
    p.add_argument("--denoiser", default="digits", help="'digits' or a denoiser folder (for de, dda, dda-se)")
    p.add_argument("--modes", default="default,de,dda,dda-se", help="comma list of default,de,dda,dda-se")
    p.add_argument("--corruptions", default="all",
                   help="all (15 standard) | extra | all+extra | NAME,NAME | none (clean only: ImageNet-R / -A / -V2)")
    p.add_argument("--severities", default="1-5", help="e.g. 1-5, 5 or 1,3,5")
    p.add_argument("--frost-images", dest="frost_images",
                   help="folder of frost photographs (ImageNet-C's frost1.png ... frost5.jpg; not shipped) for "
                        "on-the-fly frost; default: a procedural texture")
    p.add_argument("--limit", type=int, help="at most N test images (a fixed random subset)")
    p.add_argument("--batch", type=int, default=256, help="images per network call")
    p.add_argument("--de-step", dest="de_step", type=int, default=50, help="DE member spacing (25, 50, 75)")
    p.add_argument("--dda-t", dest="dda_t", type=int, help="DDA's start time (default T / 2)")
    p.add_argument("--dda-steps", dest="dda_steps", type=int, default=50)
    p.add_argument("--dda-scale", dest="dda_scale", type=float, default=6.0,
                   help="DDA guidance weight for 256x256x3 images (scaled to the image size)")
    p.add_argument("--dda-downsample", dest="dda_downsample", type=int, help="DDA's low-pass factor D")
    p.add_argument("--dda-norm", dest="dda_norm", default="image", choices=["image", "batch"])
    p.add_argument("--no-analyses", dest="no_analyses", action="store_true",
                   help="skip DE-vs-t and entropy-vs-t")


RECORDED_HELP = "default: the one the guidance classifiers were trained with (guidance.json), else digits"
PAG_RECORDED_HELP = ("default: the one the guidance classifiers were trained with (guidance.json), else the one the "
                     "classifiers were trained with (model.json), else digits")


def _sample_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--denoiser", help=RECORDED_HELP)
    p.add_argument("--guidance", required=True, help="a train-guidance folder")
    p.add_argument("--class", dest="cls", required=True, help="a class index or name (guidance.json's classes)")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--variance", default="posterior", choices=["posterior", "learned"],
                   help="DDPM step variance: posterior (fixed small) or the network's learned one (OpenAI checkpoints)")
    p.add_argument("--steps", type=int, default=100)


def _eval_guidance_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance", nargs="+", required=True, help="train-guidance folder(s)")
    p.add_argument("--denoiser", help=RECORDED_HELP)
    p.add_argument("--data", help=RECORDED_HELP)
    p.add_argument("--clean-classifier", dest="clean_classifier", help="a classifier folder for the clean line")
    p.add_argument("--no-generation", dest="no_generation", action="store_true",
                   help="only the accuracy table and plot (no guided sampling)")
    p.add_argument("--per-class", dest="per_class", type=int, default=50)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--variance", default="posterior", choices=["posterior", "learned"],
                   help="DDPM step variance: posterior (fixed small) or the network's learned one (OpenAI checkpoints)")


def _pag_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classifier", nargs="*", help="classifier folder(s), e.g. a plain and a DiffAug-trained one")
    p.add_argument("--guidance", nargs="*", help="guidance classifier folder(s) (noisy, da)")
    p.add_argument("--denoiser", help=PAG_RECORDED_HELP)
    p.add_argument("--data", help=PAG_RECORDED_HELP)
    p.add_argument("--t", type=int, default=300)
    p.add_argument("--n", type=int, default=6, help="test images, one per class")


def _toy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--t", type=int, nargs="+", default=[50, 150, 300])
    p.add_argument("--steps", type=int, default=3000, help="training steps of the 2-D model")


def _study_flags(p: argparse.ArgumentParser) -> None:
    from .study.stages import StudyConfig

    p.add_argument("--config", help="JSON file of settings (see diffaug.study.StudyConfig)")
    p.add_argument("--data", help="'digits' (default), a CIFAR-10 folder or an image folder, streamed (overrides "
                   "the config's data; give image_size and the denoiser in --config)")
    _field_flags(p, StudyConfig, {"seeds": {}})
    p.add_argument("--quick", action="store_true", help="a small, fast configuration (smoke tests, CI)")
    p.add_argument("--only", help="run this stage (and any stage it needs that is missing)")


def _show_augmentations_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--denoiser", default="digits", help="'digits' or a denoiser folder")
    p.add_argument("--data", default="digits", help="'digits' or an image folder (default digits)")


def _denoiser_quality_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--denoiser", default="digits")
    p.add_argument("--data", default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])


class Command(NamedTuple):
    """One sub-command: its help line, handler, own flags, and the shared flags its parent parser takes
    (:func:`_common`: the help of ``--out``, the names, and this command's help texts for them)."""

    help: str
    run: Callable
    flags: Callable[[argparse.ArgumentParser], None]
    out_help: str | None
    shared: tuple[str, ...]
    shared_help: dict | None = None

    @property
    def writes_a_file(self) -> bool:
        """Whether ``--out`` names a file (a PNG or JSON) rather than a folder."""
        return self.out_help is not None and " file " in f" {self.out_help} "


def check_out(out: str | Path, is_file: bool, example: str = "out.png") -> None:
    """One-line :class:`InputError`, before any work, when ``--out`` cannot be written: a folder output that is an
    existing file, a file output that is an existing folder, or a path below an existing file."""
    path = Path(out)
    if is_file and path.is_dir():
        raise InputError(f"--out {out} is a folder; name the file to write in it, e.g. {path / example}")
    for place in (path.parents if is_file else (path, *path.parents)):
        if place.exists():
            if not place.is_dir():
                raise InputError(f"--out {out}: {place} is a file, not a folder; give another --out")
            if not os.access(place, os.W_OK | os.X_OK):
                raise InputError(f"--out {out}: {place} is not writable (permission denied); give another --out "
                                 "or make it writable")
            return


_PNG = "PNG file to write"
_TRAINING = ("seed", "resume", "device", "quiet", "speed")
_EVALUATION = ("seed", "device", "quiet", "speed")
COMMANDS = {
    "train-diffusion": Command("train a diffusion model (the denoiser) on your training set", cmd_train_diffusion,
                               _train_diffusion_flags, "output folder (denoiser, checkpoint, samples.png)", (*_TRAINING, "force"),
                               {"device": "torch device (default: cuda if available)",
                                "resume": "continue the run in --out from its checkpoint"}),
    "train": Command("train a classifier with a recipe (plain, diffaug, augmix, augmix+diffaug)", cmd_train,
                     _train_flags, None, (*_TRAINING, "force")),
    "certify": Command("certified L2 accuracy by randomized / diffusion denoised smoothing", cmd_certify,
                       _certify_flags, None, ("eval-data", *_EVALUATION)),
    "eval-ood": Command("OOD detection (MSP, ReAct, ASH, SCALE): the paper's Table 3", cmd_eval_ood, _eval_ood_flags,
                        None, ("seed", "eval-data", "device", "speed"), {"seed": "seed of the synthetic noise set"}),
    "eval-shift": Command("accuracy under corruptions: Default / DE / DDA / DDA-SE (Table 1)", cmd_eval_shift,
                          _eval_shift_flags, None, ("eval-data", *_EVALUATION)),
    "train-guidance": Command("train a noisy or denoise-augmented (DA) guidance classifier", cmd_train_guidance,
                              _train_guidance_flags, None, (*_TRAINING, "force")),
    "sample": Command("classifier-guided samples of one class from an unconditional denoiser", cmd_sample,
                      _sample_flags, _PNG, ("seed", "device", "speed", "quiet")),
    "eval-guidance": Command("guidance classifiers: Table 4, accuracy vs t, guided-generation metrics",
                             cmd_eval_guidance, _eval_guidance_flags, None, (*_EVALUATION, "workers")),
    "pag": Command("perceptually aligned gradients through the denoiser (the paper's Figure 3)", cmd_pag, _pag_flags,
                   _PNG, ("seed", "device", "speed", "workers", "quiet")),
    "toy": Command("2-D demonstration: one-step denoising lands near the data (Figure 5)", cmd_toy, _toy_flags,
                   "PNG file to write (numbers go to the same name .json)", ("seed",)),
    "study": Command("the paper's whole evaluation, cached per stage, with a report (the main job)", cmd_study,
                     _study_flags, None, ("device", "quiet")),
    "show-augmentations": Command("grid of DiffAug views (the paper's Figure 1)", cmd_show_augmentations,
                                  _show_augmentations_flags, _PNG, ("seed", "device")),
    "denoiser-quality": Command("measure a denoiser on labelled data (sample / label accuracy)", cmd_denoiser_quality,
                                _denoiser_quality_flags, "JSON file to write", ("device",)),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``diffaug`` parser: one sub-command per entry of :data:`COMMANDS`, each its own flags plus its parent
    parser of shared flags (:func:`_common`)."""
    parser = argparse.ArgumentParser(prog="diffaug", description="DiffAug: diffuse-and-denoise augmentation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help,
                           parents=[_common(command.out_help, *command.shared, **(command.shared_help or {}))])
        command.flags(p)
        p.set_defaults(func=command.run)
    return parser


SHARDED = ("train-diffusion", "train", "train-guidance", "certify", "eval-shift")  # the commands torchrun runs


def _error_line(command: str, text: str, rank_local: bool = True) -> str | None:
    """What this process prints for a command's error: alone, or as rank 0, the line; under torchrun the other
    ranks print an error found after the ranks met (their own: a bad file in their share), with their rank, and
    keep quiet about one met in the checks before (the same settings and files give every rank the same one),
    except the first rank of each other node, whose files may differ. ``rank_local=False``: rank 0 only."""
    import os

    from .utils import distributed

    rank = os.environ.get("RANK", "0")
    if distributed.world_size() == 1 or rank == "0":
        return f"diffaug {command}: {text}"
    if rank_local and (distributed._joined or os.environ.get("LOCAL_RANK", "0") == "0"):
        return f"diffaug {command} (rank {rank}): {text}"
    return None


def _say(line: str | None) -> None:
    if line is not None:
        print(line, file=sys.stderr)


def _peer_failed(e: BaseException) -> bool:
    """A collective that failed because another rank ended (its own error is printed by that rank)."""
    from .utils import distributed

    text = str(e)
    return (distributed.world_size() > 1 and distributed._joined
            and any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                        "NCCL communicator was aborted")))


def main(argv: list[str] | None = None) -> int:
    from .utils.distributed import follow_launcher, world_size

    follow_launcher()  # under torchrun: from the start (a launcher killed before the ranks meet left them waiting)
    args = build_parser().parse_args(argv)
    try:
        if world_size() > 1 and args.command not in SHARDED:
            raise InputError(f"{args.command} does not run under torchrun (it is not sharded: every process would do "
                             f"the whole job); run it as one process (torchrun runs {', '.join(SHARDED)})")
        if getattr(args, "out", None) is not None:
            command = COMMANDS[args.command]
            check_out(args.out, command.writes_a_file, "out.json" if "JSON" in (command.out_help or "") else "out.png")
        args.func(args)
    except InputError as e:
        _say(_error_line(args.command, f"error: {e}"))
        return 2
    except RuntimeError as e:
        if not _peer_failed(e):
            raise
        _say(_error_line(args.command, "stopped: another rank failed (its error is above)"))
        return 1
    except StorageError as e:
        print(f"diffaug {args.command}: error: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:  # a part of --out made read-only after the checks (checkpoints/, say), or an input
        print(f"diffaug {args.command}: error: permission denied: {e.filename}; make it accessible (or give another "
              "--out; a training run continues from its last checkpoint with --resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the training loops save and exit on SIGINT themselves; the other commands land here
        resumes = args.command in ("certify", "study")  # finished rows / stages are on disk
        _say(_error_line(args.command, "interrupted" + ("; finished work is kept: run the same command again to "
                                                        "continue" if resumes else ""), rank_local=False))
        return 130
    return 0


def run() -> NoReturn:
    """The ``diffaug`` command: :func:`main`, ending the process through :func:`~diffaug.utils.distributed.exit_process`
    (a rank under torchrun ends without the interpreter's teardown, which can abort it after its work is done)."""
    from .utils.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
