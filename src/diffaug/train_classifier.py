"""Training classifiers with DiffAug: the recipes, one loop, DDP under torchrun, exact resume.

Data: ``digits`` and CIFAR-10 are read into memory and indexed exactly as before; any other ``--data`` folder is
streamed from disk through :mod:`diffaug.data` (``ROOT/train`` + ``ROOT/val`` or one class folder split without
overlap; ``RandomResizedCrop(image_size)`` + flip for training, ``Resize`` + ``CenterCrop`` for evaluation and,
with ``diffaug_view="center"``, for the view DiffAug is applied to), with DataLoader workers.

Recipes (loss per step; ``B`` = the batch, ``DA(x)`` = a fresh DiffAug view from the frozen denoiser):

* ``plain``: ``CE(f(x), y)``.
* ``diffaug`` (the paper): one forward over ``[x; DA(x)]``, loss ``CE(clean) + w * CE(DiffAug)``.
* ``augmix``: AugMix (torchvision, AugMix paper's op set) with the Jensen-Shannon consistency loss
  (timm's ``JsdCrossEntropy``, weight 12) over ``(x, AugMix_1(x), AugMix_2(x))``.
* ``augmix+diffaug``: the AugMix loss plus ``w * CE(DiffAug)`` in the same forward pass.

All randomness (data order, DiffAug noise and t, AugMix draws) comes from seeded generators whose states are
checkpointed with the data position, so ``--resume`` (even after SIGKILL) ends bitwise equal to an
uninterrupted run on the same machine. Under ``torchrun`` the same code runs DistributedDataParallel with a
``DistributedSampler`` and a per-rank generator; rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import accel
from . import checkpoint as ckpt
from .classifier import Classifier, create_classifier, save_classifier
from .data import is_in_memory, load_dataset, subset_classes
from .data import BAD_FILE_POLICIES, check_library, check_size, check_workers
from .errors import InputError
from .recipes import RECIPES, from_name

DEFAULT_MODELS = {"digits": "small_cnn"}
DEFAULT_IMAGE_SIZE = 224
DIFFAUG_VIEWS = ("center", "same")
CKPT_DIR, CONFIG_FILE, METRICS_FILE = "checkpoints", "config.json", "metrics.jsonl"


@dataclass
class TrainConfig:
    """Settings of ``diffaug train`` (written to ``DIR/config.json``)."""

    data: str = "digits"
    recipe: str = "diffaug"
    model: str | None = None  # None: small_cnn for digits, resnet_small otherwise
    denoiser: str | None = None  # None: "digits" for digits; required for DiffAug recipes elsewhere
    pretrained: str | None = None  # local weights to fine-tune from
    steps: int | None = None  # optimiser steps (or give epochs)
    epochs: int | None = None
    batch_size: int = 128  # global batch (split across ranks)
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 2e-3
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # cosine | constant | step (x0.1 at 50% and 75%)
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    t_min: int = 0  # DiffAug t range (inclusive; default the whole schedule)
    t_max: int | None = None
    diffaug_weight: float = 1.0  # w in CE(clean) + w * CE(DiffAug)
    diffaug_fraction: float = 1.0  # fraction of each batch that gets a DiffAug view (1.0 = the paper)
    jsd_weight: float = 12.0
    seed: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    eval_every: int = 0  # 0: evaluate on val only at the end
    classes: list[int] | None = None  # train on these classes only (relabelled 0..k-1), e.g. for near-OOD
    precision: str = "fp32"  # autocast of the classifier and denoiser: fp32 | bf16 | fp16 (fp16 adds loss scaling)
    channels_last: bool = False
    compile: bool = False  # torch.compile the classifier's and denoiser's networks
    # streamed folders only (digits and CIFAR-10 keep their in-memory path):
    image_size: int | None = None  # crop size (None: 224)
    workers: int | None = None  # DataLoader workers (None: min(8, CPUs))
    diffaug_view: str = "center"  # DiffAug of the center view (the paper's code) or of the random crop ("same")
    on_bad_file: str = "error"  # error | skip (substitute the next image, counted in metrics.jsonl)
    transforms: str = "torchvision"  # train / eval transforms: torchvision (v2) | timm (create_transform)
    aligned: list[str] | None = None  # DeepAugment-style copies of the training set: one CE term per copy's view
    extra_data: str | None = None  # labelled images added to the training set (+Synth), classes by folder name
    # any data:
    denoiser_size: int | None = None  # run the denoiser at this size (resized there and back); None: the crop size
    sync_bn: bool = False  # SyncBatchNorm under DDP (a no-op on one process)

    def resolved(self) -> "TrainConfig":
        cfg = dataclasses.replace(self)
        if cfg.model is None:
            cfg.model = DEFAULT_MODELS.get(cfg.data, "resnet_small")
        if cfg.denoiser is None and "diffaug" in cfg.recipe and cfg.data == "digits":
            cfg.denoiser = "digits"
        if cfg.image_size is None and not is_in_memory(cfg.data):
            cfg.image_size = DEFAULT_IMAGE_SIZE
        return cfg

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise InputError(f"unknown recipe {self.recipe!r}; use one of {', '.join(RECIPES)}")
        if "diffaug" in self.recipe and not self.denoiser:
            raise InputError(f"recipe {self.recipe} needs --denoiser (a folder from `diffaug train-diffusion`)")
        if (self.steps is None) == (self.epochs is None):
            raise InputError("give exactly one of --steps or --epochs")
        if (self.steps or 1) < 1 or (self.epochs or 1) < 1 or self.batch_size < 1:
            raise InputError("steps, epochs and batch size must be >= 1")
        if self.optimizer not in ("adamw", "sgd"):
            raise InputError(f"unknown optimizer {self.optimizer!r}; use adamw or sgd")
        if self.lr_schedule not in ("cosine", "constant", "step"):
            raise InputError(f"unknown lr schedule {self.lr_schedule!r}; use cosine, constant or step")
        if not 0 < self.diffaug_fraction <= 1:
            raise InputError(f"diffaug_fraction must lie in (0, 1], got {self.diffaug_fraction}")
        accel.autocast_dtype(self.precision)
        if not 0 <= self.label_smoothing < 1:
            raise InputError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if not self.lr > 0 or not self.weight_decay >= 0 or not self.diffaug_weight >= 0 or self.warmup_steps < 0:
            raise InputError(f"lr must be > 0 and weight_decay, diffaug_weight, warmup_steps >= 0; got lr {self.lr}, "
                             f"weight_decay {self.weight_decay}, diffaug_weight {self.diffaug_weight}, "
                             f"warmup_steps {self.warmup_steps}")
        if self.image_size is not None:
            check_size(self.image_size)
        check_workers(self.workers)
        if self.diffaug_view not in DIFFAUG_VIEWS:
            raise InputError(f"unknown DiffAug view {self.diffaug_view!r}; use one of {', '.join(DIFFAUG_VIEWS)}")
        if self.on_bad_file not in BAD_FILE_POLICIES:
            raise InputError(f"unknown bad-file policy {self.on_bad_file!r}; use one of {', '.join(BAD_FILE_POLICIES)}")
        check_library(self.transforms)
        if (self.aligned or self.extra_data) and is_in_memory(self.data):
            raise InputError(f"--aligned and --extra-data need an image folder as --data, not {self.data}")
        if self.aligned and self.extra_data:
            raise InputError("--aligned copies cover the training set only; use --aligned or --extra-data, not both")
        if self.denoiser_size is not None:
            check_size(self.denoiser_size)


# ---------------------------------------------------------------------- distributed helpers
@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op when run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` whose gradients are views of its all-reduce buckets, laid out as the buckets.

    Each parameter gets a zero gradient before wrapping and ``gradient_as_bucket_view=True``, so DDP makes every
    ``.grad`` a view of its bucket and each backward accumulates into it in place; zero the gradients in place
    (``zero_grad(set_to_none=False)``), never to None. Otherwise autograd may hand DDP a gradient of another
    layout (the layout contract ignores the strides of size-1 dims, which a ``[C, 1, k, k]`` convolution weight
    has and oneDNN's backward sets its own way), which DDP then copies into the bucket on every step with the
    warning "Grad strides do not match bucket view strides". It also saves one gradient-sized copy per step.
    """
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)  # same strides as p, hence as its bucket view
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               gradient_as_bucket_view=True)


def _lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        if cfg.lr_schedule == "step":
            return 0.1 ** ((step >= total // 2) + (step >= 3 * total // 4))
        return 1.0

    return f


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on images in [0, 1] (model put in eval mode and restored)."""
    was = model.training
    model.eval()
    correct = sum((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    model.train(was)
    return correct / max(1, len(images))


@torch.no_grad()
def loader_accuracy(model: nn.Module, loader, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` over a loader of ``(images, labels)`` (model put in eval mode and restored)."""
    was = model.training
    model.eval()
    correct, n = torch.zeros((), dtype=torch.long, device=device), 0
    for x, y in loader:
        y = y.to(device, non_blocking=True)
        correct += (model(x.to(device, non_blocking=True)).argmax(1) == y).sum()
        n += y.numel()
    model.train(was)
    return correct.item() / max(1, n)


class _Streamed:
    """The training batches of a streamed folder: ``get(epoch, pos)`` is batch ``pos`` of ``epoch`` on this rank,
    a function of (seed, epoch, rank, pos); reading starts mid-epoch without decoding the images before ``pos``."""

    def __init__(self, cfg: TrainConfig, splits: dict, dist_info: "Dist", per_rank: int, centre_view: bool):
        from .data import ResumableSampler, SeededView, eval_transform, make_loader, train_transform

        from .data import aligned_copy

        self.splits, self.per_rank, self.workers = splits, per_rank, cfg.workers
        lib = cfg.transforms
        transforms = [train_transform(cfg.image_size, lib)] + ([eval_transform(cfg.image_size, lib)] if centre_view
                                                                 else [])
        self.eval_transform = eval_transform(cfg.image_size, lib)
        aligned = [aligned_copy(splits["train"], root) for root in cfg.aligned or []]
        self.sampler = ResumableSampler(len(splits["train"]), seed=cfg.seed, rank=dist_info.rank,
                                        world_size=dist_info.world, drop_last=True)
        if self.sampler.num_samples < per_rank:
            raise InputError(f"the batch of {per_rank} per process is larger than the {self.sampler.num_samples} "
                             "training images per process; lower --batch-size")
        self.loader = make_loader(SeededView(splits["train"], *transforms, seed=cfg.seed, count_skips=True,
                                             aligned=aligned),
                                  per_rank, sampler=self.sampler, workers=cfg.workers, drop_last=True)
        self.steps_per_epoch = self.sampler.num_samples // per_rank
        self.views = len(transforms)  # then one view per aligned copy
        self._it, self._at = None, None

    def get(self, epoch: int, pos: int):
        if self._at != (epoch, pos):
            self.sampler.set_position(epoch, pos * self.per_rank)
            self._it = iter(self.loader)
        self._at = (epoch, pos + 1)
        return next(self._it)

    def accuracy(self, model: nn.Module, split: str, device: torch.device) -> float:
        from .data import SeededView, make_loader

        loader = make_loader(SeededView(self.splits[split], self.eval_transform), 256, workers=self.workers)
        return loader_accuracy(model, loader, device)


# ---------------------------------------------------------------------- checkpoints
def _checkpoint_paths(out: Path) -> list[Path]:
    return sorted((out / CKPT_DIR).glob("step-*.safetensors"))


def _save_checkpoint(out: Path, cfg_json: dict, step: int, model, opt, sched, gens: list[torch.Tensor], keep: int,
                     scaler: torch.amp.GradScaler, bad_files_skipped: list[int] | None = None):
    opt_tensors, opt_plain = ckpt.flatten_optimizer_state(opt.state_dict())
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(opt_tensors)
    for r, state in enumerate(gens):
        tensors[f"rng.rank{r}"] = state
    meta = {"step": step, "config": cfg_json, "optimizer": opt_plain, "lr_scheduler": sched.state_dict(),
            "world": len(gens), "grad_scaler": scaler.state_dict(),
            "bad_files_skipped": bad_files_skipped or [0] * len(gens)}
    ckpt.save_safetensors(tensors, out / CKPT_DIR / f"step-{step:08d}.safetensors", metadata=meta)
    for old in _checkpoint_paths(out)[:-keep]:
        old.unlink(missing_ok=True)


def _gather_generator_states(gen: torch.Generator, dist_info: Dist) -> list[torch.Tensor]:
    state = gen.get_state()
    if dist_info.world == 1:
        return [state]
    import torch.distributed as dist

    states = [None] * dist_info.world
    dist.all_gather_object(states, state)
    return states


# ---------------------------------------------------------------------- the loop
def train_classifier(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, force: bool = False,
                     device: str | torch.device = "cpu", progress: bool = True) -> Classifier:
    """Train a classifier with ``cfg.recipe``; see the module docstring. Returns the trained model (eval mode).

    Writes ``config.json``, ``metrics.jsonl``, ``checkpoints/step-*.safetensors`` (the last
    ``keep_checkpoints``), and the final ``model.safetensors`` + ``model.json`` (with clean test accuracy).
    """
    from tqdm.auto import tqdm

    from .augment import DiffAug
    from .denoiser import load_denoiser

    cfg = cfg.resolved()
    cfg.validate()
    out = Path(out_dir)
    device = torch.device(device)
    # --- every check before any work or output
    streamed = not is_in_memory(cfg.data)
    den = load_denoiser(cfg.denoiser) if "diffaug" in cfg.recipe else None
    if streamed:  # a folder, read lazily; a 1-channel denoiser gets 1-channel images
        from .data import SeededView, eval_transform, open_splits

        splits = open_splits(cfg.data, channels=den.channels if den is not None else 3, on_bad_file=cfg.on_bad_file,
                             verbose=progress and int(os.environ.get("RANK", "0")) == 0)
        if cfg.extra_data:
            from .data import with_extra

            splits["train"] = with_extra(splits["train"], cfg.extra_data)
            if progress and int(os.environ.get("RANK", "0")) == 0:
                print(f"data: {cfg.extra_data} added: {len(splits['train'])} training images")
        if cfg.classes is not None:
            splits = {k: d.with_classes(list(cfg.classes)) for k, d in splits.items()}
        train, val, test = splits["train"], splits["val"], splits["test"]
        first = SeededView(val, eval_transform(cfg.image_size))[0][0][None]  # what the networks will see
    else:
        train, val, test = (load_dataset(cfg.data, s) for s in ("train", "val", "test"))
        if cfg.classes is not None:
            train, val, test = (subset_classes(d, list(cfg.classes)) for d in (train, val, test))
        first = train.images
    finished = (out / "model.safetensors").exists()
    started = bool(_checkpoint_paths(out)) if out.exists() else False
    if resume and not started:
        raise InputError(f"--resume given but {out / CKPT_DIR} holds no checkpoint; drop --resume")
    if finished and not (force or resume):
        raise InputError(f"{out} holds a finished run; pass --force to overwrite it or choose another --out")
    if started and not (resume or force):
        raise InputError(f"{out} holds an unfinished run; pass --resume to continue it or --force to start over")
    diffaug = None
    if den is not None:  # the denoiser at the crop size if its network allows, else around --denoiser-size
        from .augment import ResizedDiffAug, denoiser_at

        den, resize_to = denoiser_at(den, first.shape[-1], cfg.denoiser_size)
        seen = first if resize_to is None else torch.nn.functional.interpolate(first, size=(resize_to, resize_to))
        den.check_images(seen, name=f"images of {cfg.data} (for denoiser {cfg.denoiser})")  # once, here
        t_max = den.num_timesteps - 1 if cfg.t_max is None else cfg.t_max
        diffaug = DiffAug(den.to(device), t_range=(cfg.t_min, t_max), validate=False)  # the loop makes no syncs
        accel.accelerate(den, precision=cfg.precision, channels_last=cfg.channels_last, compile=cfg.compile)
        if resize_to is not None:
            diffaug = ResizedDiffAug(diffaug, resize_to)
    C = first.shape[1]
    size = cfg.image_size if streamed else (first.shape[-1] if first.shape[-1] == first.shape[-2] else None)
    model = create_classifier(cfg.model, train.num_classes, C, checkpoint_path=cfg.pretrained, seed=cfg.seed,
                              image_size=size).to(device)  # model.json records the input size
    accel.accelerate(model, precision=cfg.precision, channels_last=cfg.channels_last, compile=cfg.compile)
    scaler = accel.grad_scaler(device, cfg.precision)
    cfg_json = dataclasses.asdict(cfg)
    start, skipped = 0, 0  # skipped: unreadable files replaced so far (on_bad_file="skip")
    saved_meta = None
    if resume:
        tensors, saved_meta = ckpt.load_safetensors(_checkpoint_paths(out)[-1])
        changed = ckpt.changed_settings(saved_meta["config"], cfg_json,
                                        ("steps", "epochs", "checkpoint_every", "keep_checkpoints", "workers"),
                                        dataclasses.asdict(TrainConfig()))
        if changed:
            raise InputError(f"--resume with settings that differ from the run in {out} ({', '.join(changed)}); "
                             "resume with the original settings or start over with --force")

    dist_info = init_distributed(device)
    if dist_info.world > 1 and cfg.batch_size % dist_info.world:
        raise InputError(f"batch size {cfg.batch_size} is not divisible by {dist_info.world} ranks")
    if cfg.sync_bn and dist_info.world > 1 and device.type != "cuda":
        raise InputError("--sync-bn needs CUDA devices under torchrun (PyTorch's SyncBatchNorm has no CPU "
                         "implementation); drop --sync-bn")
    per_rank = cfg.batch_size // dist_info.world
    if streamed:
        stream = _Streamed(cfg, splits, dist_info, per_rank, "diffaug" in cfg.recipe and cfg.diffaug_view == "center")
        steps_per_epoch = stream.steps_per_epoch
    else:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(len(train)), num_replicas=dist_info.world, rank=dist_info.rank,
                                     shuffle=True, seed=cfg.seed, drop_last=True)
        steps_per_epoch = max(1, len(sampler) // per_rank)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch

    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + dist_info.rank)
    if resume:
        if saved_meta.get("world", 1) != dist_info.world:
            raise InputError(f"the run in {out} used {saved_meta['world']} processes; resume with the same number")
        ckpt.load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, _checkpoint_paths(out)[-1])
        opt.load_state_dict(ckpt.unflatten_optimizer_state(tensors, saved_meta["optimizer"]))
        sched.load_state_dict(saved_meta["lr_scheduler"])
        if saved_meta.get("grad_scaler"):
            scaler.load_state_dict(saved_meta["grad_scaler"])
        gen.set_state(tensors[f"rng.rank{dist_info.rank}"])
        start = int(saved_meta["step"])
        skipped = int(saved_meta.get("bad_files_skipped", [0] * dist_info.world)[dist_info.rank])
        if dist_info.main:
            ckpt.rewind_jsonl(out / METRICS_FILE, start, final_key="test_acc")
    elif dist_info.main:
        if force and out.exists():
            for p in _checkpoint_paths(out) + [out / METRICS_FILE, out / "model.safetensors", out / "model.json"]:
                p.unlink(missing_ok=True)
        ckpt.write_json(out / CONFIG_FILE, cfg_json)
        ckpt.write_text(out / METRICS_FILE, "")  # a new run starts a new log

    net: nn.Module = model
    if cfg.sync_bn and dist_info.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters and buffers, same state_dict keys
        net = model
    elif cfg.sync_bn and dist_info.main and progress:
        print("train: --sync-bn has no effect on one process (BatchNorm kept as it is)")
    if dist_info.world > 1:
        net = data_parallel(model, device)
    recipe = from_name(cfg.recipe, net, diffaug=diffaug, label_smoothing=cfg.label_smoothing,
                       jsd_weight=cfg.jsd_weight, diffaug_fraction=cfg.diffaug_fraction,
                       diffaug_weight=cfg.diffaug_weight)
    if not streamed:
        images, labels = accel.to_device(train.images, device), accel.to_device(train.labels, device)

    def evaluate(split: str) -> float:
        if streamed:
            return stream.accuracy(model, split, device)
        data = {"val": val, "test": test}[split]
        return accuracy(model, data.images.to(device), data.labels.to(device))

    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda signum, frame: stop.__setitem__("signal", signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    rows: list[dict] = []
    bar = tqdm(range(start, total), initial=start, total=total, disable=not (progress and dist_info.main),
               desc=f"train {cfg.recipe}")
    t0 = time.perf_counter()
    model.train()
    order, order_epoch = None, None
    try:
        for step in bar:
            epoch, pos = divmod(step, steps_per_epoch)
            if streamed:  # the batch is a function of (seed, epoch, rank, pos), whatever the workers
                x, *extra, y, skips = stream.get(epoch, pos)
                centre, aligned = extra[: stream.views - 1], extra[stream.views - 1:]
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                x_da = centre[0].to(device, non_blocking=True) if centre else None
                skipped += int(skips.sum())
                more = {"x_aligned": [v.to(device, non_blocking=True) for v in aligned]} if aligned else {}
                loss, _ = recipe(x, y, gen, x_diffaug=x_da, **more)
            else:
                if epoch != order_epoch:  # the sampler's order is a pure function of (seed, epoch, rank)
                    sampler.set_epoch(epoch)
                    order, order_epoch = torch.tensor(list(sampler), device=device), epoch
                idx = order[pos * per_rank : (pos + 1) * per_rank]
                loss, _ = recipe(images[idx], labels[idx], gen)
            accel.optimizer_step(loss, opt, scaler, set_to_none=dist_info.world == 1)  # DDP: grads are bucket views
            sched.step()
            # the loss stays on the device until the log is written: no host-device sync per step
            row = {"step": step + 1, "epoch": epoch, "loss": loss.detach(), "lr": sched.get_last_lr()[0]}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                row["val_acc"] = evaluate("val")
            rows.append(row)
            interrupted = _any_rank(stop["signal"] is not None, dist_info)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total or interrupted:
                accel.losses_to_host(rows)
                bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}")
                states = _gather_generator_states(gen, dist_info)
                skips_all = _gather_ints(skipped, dist_info)
                if cfg.on_bad_file == "skip":
                    rows[-1]["bad_files_skipped"] = sum(skips_all)  # so far, all ranks
                if dist_info.main:
                    ckpt.append_jsonl(out / METRICS_FILE, rows)
                    _save_checkpoint(out, cfg_json, step + 1, model, opt, sched, states, cfg.keep_checkpoints, scaler,
                                     bad_files_skipped=skips_all)
                rows = []
            if interrupted:
                if dist_info.main:
                    print(f"train: stopped by signal at step {step + 1}; checkpoint saved, continue with --resume")
                raise SystemExit(128 + (stop["signal"] or signal.SIGTERM))
    finally:
        bar.close()
        for s, h in previous.items():
            signal.signal(s, h)
    model.eval()
    result = {"test_acc": evaluate("test"), "val_acc": evaluate("val"), "steps": total,
              "seconds": time.perf_counter() - t0}
    if cfg.on_bad_file == "skip":
        result["bad_files_skipped"] = sum(_gather_ints(skipped, dist_info))
    data_info = {}
    if streamed:
        data_info = {"diffaug_view": cfg.diffaug_view,
                     "split_sizes": {k: len(d) for k, d in splits.items()}}
    if dist_info.main:  # model.json is written last: its presence means the run is complete
        ckpt.append_jsonl(out / METRICS_FILE, [{"step": total, **result}])
        save_classifier(model, out, extra={"classes": train.classes, "class_indices": cfg.classes,
                                           "recipe": cfg.recipe, "data": cfg.data,
                                           "seed": cfg.seed, **data_info, **result})
        if progress:
            print(f"train {cfg.recipe}: test acc {result['test_acc']:.4f} val acc {result['val_acc']:.4f} -> {out}")
    return model


def _gather_ints(value: int, dist_info: Dist) -> list[int]:
    """``value`` of every rank, in rank order."""
    if dist_info.world == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * dist_info.world
    dist.all_gather_object(values, value)
    return values


def _any_rank(flag: bool, dist_info: Dist) -> bool:
    if dist_info.world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())

