"""``diffaug train-guidance``: train a noisy or denoise-augmented (DA) guidance classifier (saved and loaded by
:meth:`diffaug.guidance.GuidanceClassifier.save_pretrained` / ``from_pretrained``).

Training images are forward-diffused with ``t ~ U{0, ..., T-1}`` by the frozen denoiser's schedule; the DA
classifier also sees the denoiser's one-step estimate (computed without gradients during training). Batches and
noise come from seeded generators whose state is checkpointed, so ``--resume`` continues bit for bit. Under
``torchrun`` the guidance network (only it: the frozen denoiser has nothing to train) runs DistributedDataParallel;
``batch_size`` is the global batch, each rank takes its share of the same global batch indices and draws its own
noise; rank 0 writes the log, checkpoints and final outputs.

A folder holds ``guidance.safetensors`` (weights + the schedule it was trained for), ``guidance.json`` (kind,
sizes, classes, the denoiser it used), ``checkpoint.safetensors``, ``train_config.json``, ``log.jsonl`` and
``metrics.json`` (test accuracy over random t and per t-bin).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import check_size, check_workers, is_in_memory, load_dataset
from ..denoiser import Denoiser, load_denoiser
from ..errors import InputError
from ..guidance import (KINDS, SPEC, WEIGHTS, GuidanceClassifier, accuracy_over_t, build_guidance, noisy_batch, save_guidance)
from ..utils import accel, checkpoint as ckpt
from ..utils.distributed import (Dist, check_batch_split, data_parallel, init_distributed, local_device,
                                 main_process, rank_share, world_size)
from . import harness

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class GuidanceTrainConfig:
    kind: str = "da"
    data: str = "digits"
    denoiser: str = "digits"
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    width: int = 32
    seed: int = 0
    checkpoint_every: int = 500
    labelled_fraction: float = 1.0  # < 1: keep labels for this stratified share of the train split only
    consistency_weight: float = 0.0  # > 0: semi-supervised, temporal consistency on the unlabelled rest
    consistency_delta: int = 50  # the nearby time is t + delta (clamped to T - 1)
    precision: str = "fp32"  # autocast of the classifier and (for da) the denoiser: fp32 | bf16 | fp16
    channels_last: bool = False
    compile: bool = False  # torch.compile the classifier's and denoiser's networks
    # streamed folders only (digits and CIFAR-10 keep their in-memory path):
    image_size: int | None = None  # Resize + CenterCrop to this (None: the denoiser's size)
    workers: int | None = None  # DataLoader workers (None: min(8, CPUs))

    def validate(self) -> None:
        accel.autocast_dtype(self.precision)
        if self.image_size is not None:
            check_size(self.image_size)
        check_workers(self.workers)
        if not 0 < self.labelled_fraction <= 1:
            raise InputError(f"labelled_fraction must lie in (0, 1], got {self.labelled_fraction}")
        if self.consistency_weight < 0 or self.consistency_delta < 1:
            raise InputError(f"consistency_weight must be >= 0 and consistency_delta >= 1, got "
                             f"{self.consistency_weight} and {self.consistency_delta}")
        if self.consistency_weight > 0 and self.labelled_fraction == 1:
            raise InputError("consistency_weight > 0 needs unlabelled images: set labelled_fraction below 1")
        if self.kind not in KINDS:
            raise InputError(f"unknown --kind {self.kind!r}; use noisy or da")
        if self.steps < 1 or self.batch_size < 1 or self.width < 1:
            raise InputError(f"steps, batch_size and width must be >= 1, got {self.steps}, {self.batch_size}, "
                             f"{self.width}")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        harness.check_checkpointing(self.checkpoint_every)


def labelled_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified ``(labelled, unlabelled)`` indices: ``max(1, round(fraction * n_c))`` of each class labelled."""
    gen = torch.Generator().manual_seed(seed)
    keep, rest = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c)[:, 0]
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = max(1, round(fraction * len(idx)))
        keep.append(idx[:k])
        rest.append(idx[k:])
    return torch.cat(keep).sort().values, torch.cat(rest).sort().values


def consistency_loss(model: GuidanceClassifier, x0: torch.Tensor, delta: int, generator) -> torch.Tensor:
    """Temporal consistency on unlabelled model-space images: the prediction at ``t + delta`` is pulled towards
    the (stop-gradient) prediction at ``t``, both from the same noise draw."""
    den = model.denoiser
    n = x0.shape[0]
    t = torch.randint(0, den.num_timesteps, (n,), generator=generator, device=x0.device)
    t2 = (t + delta).clamp(max=den.num_timesteps - 1)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    with torch.no_grad():
        target = model(den.q_sample(x0, t, noise), t).softmax(1)
        inputs2 = model.inputs(den.q_sample(x0, t2, noise), t2)
    return F.cross_entropy(model.logits(inputs2, t2), target)


@harness.holds_run_folder
def train_guidance(cfg: GuidanceTrainConfig, out_dir: str | Path, *, resume: bool = False, force: bool = False,
                   device: str | torch.device = "cpu", progress: bool = True) -> GuidanceClassifier:
    """Train a guidance classifier of ``cfg.kind`` on images diffused by ``cfg.denoiser``; see the module
    docstring for what ``out_dir`` receives. ``resume`` continues the run (bitwise; also after SIGTERM, which
    saves at the next step), ``force`` starts it over. Returns the trained classifier (eval mode)."""
    cfg.validate()
    out_dir = Path(out_dir)
    folder = harness.RunFolder(out_dir, finished="metrics.json", outputs=("log.jsonl", WEIGHTS, SPEC),
                               checkpoint_file=CHECKPOINT)
    resume = folder.check(resume, force)
    check_batch_split(cfg.batch_size, world_size())
    device = local_device(device)  # under torchrun: cuda:LOCAL_RANK
    den, train, test, streamed = _guidance_data(cfg, device, progress and main_process())
    labelled, unlabelled = labelled_split(train.labels, cfg.labelled_fraction, cfg.seed)
    _check_split_batches(cfg, len(labelled), len(unlabelled), world_size())
    dist_info = init_distributed(device)
    model = build_guidance(cfg.kind, den, train.num_classes, width=cfg.width, seed=cfg.seed).to(device)
    speed = accel.Speed(cfg.precision, cfg.channels_last, cfg.compile)
    speed.apply(den)
    speed.apply(model)
    opt = torch.optim.AdamW(model.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    gen = harness.rank_generator(cfg.seed, dist_info, device)
    state = harness.TrainState({"net": model.net}, opt, sched, accel.grad_scaler(device, cfg.precision), gen)
    run = harness.Run(folder, state, harness.LossLog(out_dir / "log.jsonl", dist_info.main), dataclasses.asdict(cfg),
                      f"train-guidance ({cfg.kind})", dist_info)
    start = run.start(resume, force, "train_config.json", ("checkpoint_every", "workers"),
                      dataclasses.asdict(GuidanceTrainConfig()))
    batch, extra_batch = _guidance_batches(cfg, den, train, labelled, unlabelled, streamed, start, device, dist_info)
    # the losses go through DDP's wrapper of the network, whose backward all-reduces the gradients
    trained = model.with_net(data_parallel(model.net, device)) if dist_info.world > 1 else model

    def step_fn(step: int) -> dict:
        x, y = batch(step)
        x_t, t = noisy_batch(den, x, gen)
        with torch.no_grad():
            inputs = model.inputs(x_t, t)
        loss = F.cross_entropy(trained.logits(inputs, t), y)
        if cfg.consistency_weight > 0:
            x_u = extra_batch(step)
            loss = loss + cfg.consistency_weight * consistency_loss(trained, den.encode(x_u), cfg.consistency_delta,
                                                                    gen)
        accel.optimizer_step(loss, opt, state.scaler, set_to_none=dist_info.world == 1)  # DDP: grads are bucket views
        sched.step()
        return {"step": step + 1, "loss": loss.detach()}  # on the device until the log is written

    model.net.train()
    harness.run_steps(run, start, cfg.steps, step_fn, checkpoint_every=cfg.checkpoint_every, progress=progress)
    model.net.eval()
    if not dist_info.main:
        return model
    save_guidance(model, out_dir, classes=train.classes, extra={
        "data": cfg.data, "denoiser": cfg.denoiser, "seed": cfg.seed, "steps": cfg.steps,
        "labelled_fraction": cfg.labelled_fraction, "consistency_weight": cfg.consistency_weight,
        "labelled_images": len(labelled)})
    metrics = _test_accuracy(model, den, test, streamed, cfg, device)
    metrics["seconds"] = run.seconds()  # every segment of a resumed run
    ckpt.write_json(out_dir / "metrics.json", metrics)
    if progress:
        print(f"train-guidance ({cfg.kind}): test accuracy over random t {100 * metrics['accuracy']:.1f} % -> {out_dir}")
    return model


def _guidance_data(cfg: GuidanceTrainConfig, device: torch.device, progress: bool):
    """``(denoiser, train, test, streamed)``: a folder is read lazily, resized to the size the denoiser runs at."""
    den = load_denoiser(cfg.denoiser, device=device)
    streamed = not is_in_memory(cfg.data)
    if streamed:
        from ..data import open_splits
        from ..data.files import check_colour_kept

        size = cfg.image_size or (den.image_size[0] if den.image_size else None)
        if size is None:
            raise InputError(f"denoiser {cfg.denoiser} has no fixed image size; pass --image-size")
        den = den.at_size(size)
        splits = open_splits(cfg.data, channels=den.channels, verbose=progress)
        check_colour_kept(splits["train"], den.channels, cfg.data)
        train, test = splits["train"], splits["test"]
    else:
        train, test = load_dataset(cfg.data, "train"), load_dataset(cfg.data, "test")
        den.check_images(train.images[:1], name=f"images of {cfg.data}")
    return den, train, test, streamed


def _check_split_batches(cfg: GuidanceTrainConfig, n_lab: int, n_unlab: int, world: int) -> None:
    """Under torchrun, the labelled batch (at most the labelled images) and the unlabelled one (consistency loss)
    must split evenly over the ranks too (a part smaller than ``batch_size`` is one whole batch)."""
    for n, part, used in ((n_lab, "labelled", True), (n_unlab, "unlabelled", cfg.consistency_weight > 0)):
        if used and n < cfg.batch_size and n % world:
            raise InputError(f"the {n} {part} images (one batch: fewer than --batch-size) do not split evenly over "
                             f"{world} ranks; change --labelled-fraction or the number of processes")


def _guidance_batches(cfg: GuidanceTrainConfig, den: Denoiser, train, labelled, unlabelled, streamed: bool,
                      start: int, device, dist_info: Dist):
    """``(batch(step) -> (x, y), extra_batch(step) -> x_u)``: labelled images in [0, 1] with their labels, and
    unlabelled ones (for the consistency loss), this rank's share of each global batch, in memory or streamed."""

    n_lab, n_unlab = len(labelled), len(unlabelled)

    def lab_batch(step):  # indices into the labelled / unlabelled parts
        return rank_share(harness.batch_indices(n_lab, min(cfg.batch_size, n_lab), step, cfg.seed), dist_info)

    def unlab_batch(step):
        return rank_share(harness.batch_indices(n_unlab, cfg.batch_size, step, cfg.seed + 1), dist_info)

    if streamed:
        from ..data import SeededView, generative_transform, make_step_loader

        view = SeededView(train, generative_transform(den.image_size[0]), seed=cfg.seed)
        batches = iter(make_step_loader(view, lambda s: labelled[lab_batch(s)], start, cfg.steps, workers=cfg.workers))
        if cfg.consistency_weight > 0:
            extra_batches = iter(make_step_loader(view, lambda s: unlabelled[unlab_batch(s)], start, cfg.steps,
                                                  workers=cfg.workers))

        def batch(step):
            x, y = (v.to(device, non_blocking=True) for v in next(batches))
            return x, y

        def extra_batch(step):
            return next(extra_batches)[0].to(device, non_blocking=True)
    else:
        images, labels = train.images[labelled].to(device), train.labels[labelled].to(device)
        extra_images = train.images[unlabelled].to(device)

        def batch(step):
            idx = lab_batch(step).to(device)
            return images[idx], labels[idx]

        def extra_batch(step):
            return extra_images[unlab_batch(step).to(device)]
    return batch, extra_batch


def _test_accuracy(model: GuidanceClassifier, den: Denoiser, test, streamed: bool, cfg: GuidanceTrainConfig,
                   device) -> dict:
    test_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    if streamed:
        from ..data import SeededView, generative_transform, make_loader

        loader = make_loader(SeededView(test, generative_transform(den.image_size[0], flip=False)), 512,
                             workers=cfg.workers)
        return accuracy_over_t(model, None, None, generator=test_gen,
                               batches=lambda: ((x.to(device), y.to(device)) for x, y in loader))
    return accuracy_over_t(model, test.images.to(device), test.labels.to(device), generator=test_gen)


