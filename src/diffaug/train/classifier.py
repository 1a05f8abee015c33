"""Training classifiers with DiffAug: the recipes, one loop, DDP under torchrun, exact resume.

Data: ``digits`` and CIFAR-10 are read into memory and indexed exactly as before; any other ``--data`` folder is
streamed from disk through :mod:`diffaug.data` (``ROOT/train`` + ``ROOT/val`` or one class folder split without
overlap; ``RandomResizedCrop(image_size)`` + flip for training, ``Resize`` + ``CenterCrop`` for evaluation and,
with ``diffaug_view="center"``, for the view DiffAug is applied to), with DataLoader workers.

Recipes (the modules of :mod:`diffaug.recipes`; loss per step; ``B`` = the batch, ``DA(x)`` = a fresh DiffAug
view from the frozen denoiser):

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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..classifier import Classifier, create_classifier, save_classifier
from ..data import (BAD_FILE_POLICIES, check_library, check_size, check_workers, is_in_memory, load_dataset, subset_classes)
from ..errors import InputError
from ..recipes import RECIPES, check_settings, from_name
from ..utils import accel, checkpoint as ckpt
from ..utils.modes import evaluating
from ..utils.distributed import (Dist, check_batch_split, data_parallel, gather_objects, init_distributed,
                                 local_device, world_size)
from . import harness

DEFAULT_MODELS = {"digits": "small_cnn"}
DEFAULT_IMAGE_SIZE = 224
DIFFAUG_VIEWS = ("center", "same")
CONFIG_FILE, METRICS_FILE = "config.json", "metrics.jsonl"


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
        if any(v is not None and v < 1 for v in (self.steps, self.epochs, self.batch_size)):
            raise InputError(f"steps, epochs and batch size must be >= 1, got {self.steps}, {self.epochs} and "
                             f"{self.batch_size}")
        harness.check_checkpointing(self.checkpoint_every, self.keep_checkpoints)
        if self.optimizer not in ("adamw", "sgd"):
            raise InputError(f"unknown optimizer {self.optimizer!r}; use adamw or sgd")
        if self.lr_schedule not in ("cosine", "constant", "step"):
            raise InputError(f"unknown lr schedule {self.lr_schedule!r}; use cosine, constant or step")
        check_settings(label_smoothing=self.label_smoothing, diffaug_fraction=self.diffaug_fraction,
                       diffaug_weight=self.diffaug_weight, jsd_weight=self.jsd_weight)
        accel.autocast_dtype(self.precision)
        if not self.lr > 0 or not self.weight_decay >= 0 or self.warmup_steps < 0:
            raise InputError(f"lr must be > 0 and weight_decay, warmup_steps >= 0; got lr {self.lr}, "
                             f"weight_decay {self.weight_decay}, warmup_steps {self.warmup_steps}")
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
    with evaluating(model):
        correct = sum((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
                      for i in range(0, len(images), batch_size))
    return correct / max(1, len(images))


@torch.no_grad()
def loader_accuracy(model: nn.Module, loader, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` over a loader of ``(images, labels)`` (model put in eval mode and restored)."""
    correct, n = torch.zeros((), dtype=torch.long, device=device), 0
    with evaluating(model):
        for x, y in loader:
            y = y.to(device, non_blocking=True)
            correct += (model(x.to(device, non_blocking=True)).argmax(1) == y).sum()
            n += y.numel()
    return correct.item() / max(1, n)


class _Streamed:
    """The training batches of a streamed folder: ``get(epoch, pos)`` is batch ``pos`` of ``epoch`` on this rank,
    a function of (seed, epoch, rank, pos); reading starts mid-epoch without decoding the images before ``pos``."""

    def __init__(self, cfg: TrainConfig, splits: dict, dist_info: "Dist", per_rank: int, centre_view: bool):
        from ..data import ResumableSampler, SeededView, eval_transform, make_loader, train_transform

        from ..data import aligned_copy

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
        from ..data import SeededView, make_loader

        loader = make_loader(SeededView(self.splits[split], self.eval_transform), 256, workers=self.workers)
        return loader_accuracy(model, loader, device)


# ---------------------------------------------------------------------- the loop
MAY_CHANGE = ("steps", "epochs", "checkpoint_every", "keep_checkpoints", "workers")  # on --resume


@harness.holds_run_folder
def train_classifier(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, force: bool = False,
                     device: str | torch.device = "cpu", progress: bool = True) -> Classifier:
    """Train a classifier with ``cfg.recipe``; see the module docstring. Returns the trained model (eval mode).

    Writes ``config.json``, ``metrics.jsonl``, ``checkpoints/step-*.safetensors`` (the last
    ``keep_checkpoints``), and the final ``model.safetensors`` + ``model.json`` (with clean test accuracy).
    """
    from ..denoiser import load_denoiser

    cfg = cfg.resolved()
    cfg.validate()
    out = Path(out_dir)
    device = local_device(device)  # under torchrun: cuda:LOCAL_RANK
    # --- every check before any work or output
    den = load_denoiser(cfg.denoiser) if "diffaug" in cfg.recipe else None
    data = _ClassifierData(cfg, den, progress)
    folder = harness.RunFolder(out, finished="model.safetensors", outputs=(METRICS_FILE, "model.json"),
                               keep=cfg.keep_checkpoints)
    resume = folder.check(resume, force)
    diffaug = _diffaug(cfg, den, data.first, device)
    model = create_classifier(cfg.model, data.train.num_classes, data.first.shape[1], checkpoint_path=cfg.pretrained,
                              seed=cfg.seed, image_size=data.input_size).to(device)  # model.json records the size
    accel.accelerate(model, precision=cfg.precision, channels_last=cfg.channels_last, compile=cfg.compile)
    cfg_json, defaults = dataclasses.asdict(cfg), dataclasses.asdict(TrainConfig())
    saved = folder.read_latest() if resume else None
    if saved is not None:
        saved.check_config(cfg_json, MAY_CHANGE, defaults, out)

    _check_ranks(cfg, world_size(), device)  # before the ranks meet: rank 0 alone says what every rank finds
    dist_info = init_distributed(device)
    batches = data.batches(dist_info, device)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * batches.steps_per_epoch
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + dist_info.rank)
    state = harness.TrainState({"model": model}, opt, sched, accel.grad_scaler(device, cfg.precision), gen)
    run = harness.Run(folder, state, harness.LossLog(out / METRICS_FILE, dist_info.main), cfg_json, "train",
                      dist_info, extra_meta=lambda rows: batches.skip_meta(rows, dist_info))
    start = run.start(resume, force, CONFIG_FILE, MAY_CHANGE, defaults, final_key="test_acc", saved=saved,
                      total=total)
    if saved is not None:
        batches.skipped = int(saved.meta.get("bad_files_skipped", [0] * dist_info.world)[dist_info.rank])

    net = _wrap(model, cfg, dist_info, device, progress)
    recipe = from_name(cfg.recipe, net, diffaug=diffaug, label_smoothing=cfg.label_smoothing,
                       jsd_weight=cfg.jsd_weight, diffaug_fraction=cfg.diffaug_fraction,
                       diffaug_weight=cfg.diffaug_weight)

    def step_fn(step: int) -> dict:
        epoch, pos = divmod(step, batches.steps_per_epoch)
        x, y, more = batches.get(epoch, pos)
        loss, _ = recipe(x, y, gen, **more)
        accel.optimizer_step(loss, opt, state.scaler, set_to_none=dist_info.world == 1)  # DDP: grads are bucket views
        sched.step()
        # the loss stays on the device until the log is written: no host-device sync per step
        row = {"step": step + 1, "epoch": epoch, "loss": loss.detach(), "lr": sched.get_last_lr()[0]}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            row["val_acc"] = data.accuracy(model, "val", device)
        return row

    model.train()
    harness.run_steps(run, start, total, step_fn, checkpoint_every=cfg.checkpoint_every, progress=progress,
                      desc=f"train {cfg.recipe}")
    model.eval()
    _finish(cfg, model, data, batches, run, total, run.seconds(), device, progress)
    return model


def _check_ranks(cfg: TrainConfig, world: int, device: torch.device) -> None:
    check_batch_split(cfg.batch_size, world)
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise InputError("--sync-bn needs CUDA devices under torchrun (PyTorch's SyncBatchNorm has no CPU "
                         "implementation); drop --sync-bn")


def _diffaug(cfg: TrainConfig, den, first: torch.Tensor, device: torch.device):
    """The DiffAug of the recipe (None without one): the denoiser at the crop size if its network allows, else
    run around ``--denoiser-size``."""
    if den is None:
        return None
    from ..augment import DiffAug, ResizedDiffAug, denoiser_at

    den, resize_to = denoiser_at(den, first.shape[-1], cfg.denoiser_size)
    seen = first if resize_to is None else torch.nn.functional.interpolate(first, size=(resize_to, resize_to))
    den.check_images(seen, name=f"images of {cfg.data} (for denoiser {cfg.denoiser})")  # once, here
    t_max = den.num_timesteps - 1 if cfg.t_max is None else cfg.t_max
    diffaug = DiffAug(den.to(device), t_range=(cfg.t_min, t_max), validate=False)  # the loop makes no syncs
    accel.accelerate(den, precision=cfg.precision, channels_last=cfg.channels_last, compile=cfg.compile)
    return diffaug if resize_to is None else ResizedDiffAug(diffaug, resize_to)


def _wrap(model: nn.Module, cfg: TrainConfig, dist_info: Dist, device: torch.device, progress: bool) -> nn.Module:
    """The network the steps run: the model itself, or (under torchrun) DDP over it, SyncBatchNorm if asked."""
    net: nn.Module = model
    if cfg.sync_bn and dist_info.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters and buffers, same state_dict keys
        net = model
    elif cfg.sync_bn and dist_info.main and progress:
        print("train: --sync-bn has no effect on one process (BatchNorm kept as it is)")
    return data_parallel(model, device) if dist_info.world > 1 else net


class _ClassifierData:
    """The train / val / test splits (in memory, or a streamed folder's) and what the networks will see."""

    def __init__(self, cfg: TrainConfig, den, progress: bool):
        self.cfg, self.streamed = cfg, not is_in_memory(cfg.data)
        if self.streamed:  # a folder, read lazily; a 1-channel denoiser gets 1-channel images
            from ..data import SeededView, eval_transform, open_splits
            from ..data.files import check_colour_kept

            main = progress and int(os.environ.get("RANK", "0")) == 0
            splits = open_splits(cfg.data, channels=den.channels if den is not None else 3,
                                 on_bad_file=cfg.on_bad_file, verbose=main)
            if den is not None:
                check_colour_kept(splits["train"], den.channels, cfg.data)
            if cfg.extra_data:
                from ..data import with_extra

                splits["train"] = with_extra(splits["train"], cfg.extra_data)
                if main:
                    print(f"data: {cfg.extra_data} added: {len(splits['train'])} training images")
            if cfg.classes is not None:
                splits = {k: d.with_classes(list(cfg.classes)) for k, d in splits.items()}
                if main:  # the sizes printed above were of every class
                    print(f"data: classes {list(cfg.classes)} kept: "
                          + ", ".join(f"{k} {len(d)}" for k, d in splits.items()) + " images")
            self.first = SeededView(splits["val"], eval_transform(cfg.image_size))[0][0][None]
        else:
            splits = {s: load_dataset(cfg.data, s) for s in ("train", "val", "test")}
            if cfg.classes is not None:
                splits = {k: subset_classes(d, list(cfg.classes)) for k, d in splits.items()}
            self.first = splits["train"].images
        self.splits, self.train = splits, splits["train"]
        side = self.first.shape[-1]
        self.input_size = cfg.image_size if self.streamed else (side if side == self.first.shape[-2] else None)
        self.stream = None

    def batches(self, dist_info: Dist, device: torch.device) -> "_Batches":
        per_rank = self.cfg.batch_size // dist_info.world
        if self.streamed:
            self.stream = _Streamed(self.cfg, self.splits, dist_info, per_rank,
                                    "diffaug" in self.cfg.recipe and self.cfg.diffaug_view == "center")
        return _Batches(self, dist_info, per_rank, device)

    def accuracy(self, model: nn.Module, split: str, device: torch.device) -> float:
        if self.stream is not None:
            return self.stream.accuracy(model, split, device)
        data = self.splits[split]
        return accuracy(model, data.images.to(device), data.labels.to(device))

    def info(self) -> dict:
        if not self.streamed:
            return {}
        return {"diffaug_view": self.cfg.diffaug_view, "split_sizes": {k: len(d) for k, d in self.splits.items()}}


class _Batches:
    """This rank's training batch ``pos`` of ``epoch``: ``(x, y, the recipe's keywords)`` on the device, a
    function of (seed, epoch, rank, pos); counts the unreadable files replaced so far (``on_bad_file="skip"``)."""

    def __init__(self, data: _ClassifierData, dist_info: Dist, per_rank: int, device: torch.device):
        self.data, self.per_rank, self.device, self.skipped = data, per_rank, device, 0
        if data.stream is not None:
            self.steps_per_epoch = data.stream.steps_per_epoch
        else:
            from torch.utils.data import DistributedSampler

            self.sampler = DistributedSampler(range(len(data.train)), num_replicas=dist_info.world,
                                              rank=dist_info.rank, shuffle=True, seed=data.cfg.seed, drop_last=True)
            self.steps_per_epoch = max(1, len(self.sampler) // per_rank)
            self.images = accel.to_device(data.train.images, device)
            self.labels = accel.to_device(data.train.labels, device)
            self.order, self.order_epoch = None, None

    def get(self, epoch: int, pos: int):
        stream, device = self.data.stream, self.device
        if stream is None:
            if epoch != self.order_epoch:  # the sampler's order is a pure function of (seed, epoch, rank)
                self.sampler.set_epoch(epoch)
                self.order, self.order_epoch = torch.tensor(list(self.sampler), device=device), epoch
            idx = self.order[pos * self.per_rank : (pos + 1) * self.per_rank]
            return self.images[idx], self.labels[idx], {}
        x, *extra, y, skips = stream.get(epoch, pos)  # whatever the workers
        centre, aligned = extra[: stream.views - 1], extra[stream.views - 1:]
        self.skipped += int(skips.sum())
        more = {"x_diffaug": centre[0].to(device, non_blocking=True) if centre else None}
        if aligned:
            more["x_aligned"] = [v.to(device, non_blocking=True) for v in aligned]
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True), more

    def skip_meta(self, rows: list[dict], dist_info: Dist) -> dict:
        """At a checkpoint: every rank's count of replaced files (and the total in the last log row)."""
        skips_all = gather_objects(self.skipped, dist_info)
        if self.data.cfg.on_bad_file == "skip":
            rows[-1]["bad_files_skipped"] = sum(skips_all)  # so far, all ranks
        return {"bad_files_skipped": skips_all}


def _finish(cfg: TrainConfig, model: nn.Module, data: _ClassifierData, batches: _Batches, run: "harness.Run",
            total: int, seconds: float, device: torch.device, progress: bool) -> None:
    """Evaluate the trained model; rank 0 logs the result and writes ``model.json`` last (the run is complete)."""
    result = {"test_acc": data.accuracy(model, "test", device), "val_acc": data.accuracy(model, "val", device),
              "steps": total, "seconds": seconds}
    if cfg.on_bad_file == "skip":
        result["bad_files_skipped"] = sum(gather_objects(batches.skipped, run.dist))
    if run.dist.main:
        ckpt.append_jsonl(run.log.path, [{"step": total, **result}])
        save_classifier(model, run.folder.out, extra={"classes": data.train.classes, "class_indices": cfg.classes,
                                                      "recipe": cfg.recipe, "data": cfg.data, "denoiser": cfg.denoiser,
                                                      "seed": cfg.seed, **data.info(), **result})
        if progress:
            print(f"train {cfg.recipe}: test acc {result['test_acc']:.4f} val acc {result['val_acc']:.4f} -> "
                  f"{run.folder.out}")
