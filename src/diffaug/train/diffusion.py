"""``diffaug train-diffusion``: the diffusion model (denoiser) on the user's own data.

The loop is a library function (no argparse); :mod:`diffaug.cli` is a thin layer over it. All randomness
comes from explicit ``torch.Generator`` objects whose states are checkpointed, so ``resume`` continues a run
bit-for-bit as if it had never stopped (on the same device and library versions). Under ``torchrun`` it runs
DistributedDataParallel: ``batch_size`` is the global batch, each rank takes its share of the same global batch
indices and draws its own noise (one generator per rank); rank 0 writes the log, checkpoints and final outputs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import ImageDataset, check_size, check_workers, is_in_memory, load_dataset
from ..denoiser import Denoiser
from ..errors import InputError
from ..nets.unet import check_unet_size
from ..utils import accel
from ..utils.distributed import (Dist, check_batch_split, data_parallel, init_distributed, local_device,
                                 main_process, rank_share, world_size)
from ..utils.seeding import private_seed
from . import harness

CHECKPOINT_FILE = "checkpoint.safetensors"
SAMPLE_GRID = "samples.png"  # written at the end of a run (one row per class)
DEFAULT_STREAMED_SIZE = 64  # train-diffusion's image size on a streamed folder


def default_batch_size(image_size: int) -> int:
    """128 images up to 32 px; above, the same number of pixels per batch (64 px: 32, 128 px: 8), at least 8.

    The activations of the UNet grow with the pixels of a batch: 128 images of 64 px made the run's memory pass
    24 GB; with 32 of them one step of the default 64-px network peaks near 4 GB on a CPU."""
    return max(8, 128 * 32 * 32 // (image_size * image_size)) if image_size > 32 else 128


@dataclass
class DiffusionTrainConfig:
    """Settings of ``diffaug train-diffusion`` (all written to ``train_config.json`` beside the results)."""

    data: str = "digits"  # "digits", CIFAR-10, or an image folder streamed from disk (its train split)
    steps: int = 12000  # optimiser steps
    batch_size: int | None = None  # None: sized for the image (128 up to 32 px, fewer above; see default_batch_size)
    lr: float = 5e-4  # AdamW, linear warm-up then constant
    warmup_steps: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # fraction of labels replaced by the null label (one net: cond + uncond)
    conditional: bool = True
    num_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # cosine (improved DDPM; keeps small images legible longer) or "linear"
    width: int | None = None  # UNet base width (None: sized for the image)
    layers_per_block: int | None = None
    seed: int = 0
    checkpoint_every: int = 1000
    sample_steps: int = 100  # DDIM steps for the final sample grid
    unet_overrides: dict = field(default_factory=dict)
    precision: str = "fp32"  # autocast of the UNet: fp32 | bf16 | fp16 (fp16 adds loss scaling)
    channels_last: bool = False
    compile: bool = False  # torch.compile the UNet
    # streamed folders only (digits and CIFAR-10 keep their in-memory path):
    image_size: int | None = None  # Resize + CenterCrop to this (a power of two; None: 64)
    workers: int | None = None  # DataLoader workers (None: min(8, CPUs))
    sample_grid: bool = True  # write samples.png at the end (one row per class, DDIM)

    def validate(self) -> None:
        if self.steps < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise InputError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if self.image_size is not None:
            check_size(self.image_size)
        check_workers(self.workers)
        if not 0 <= self.label_dropout < 1:
            raise InputError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        accel.autocast_dtype(self.precision)
        if self.beta_schedule not in ("linear", "squaredcos_cap_v2"):
            raise InputError(f"unknown beta_schedule {self.beta_schedule!r}; use 'linear' or 'squaredcos_cap_v2'")
        if not (self.lr > 0 and self.warmup_steps >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0
                and 0 <= self.ema_decay < 1):
            raise InputError(f"need lr > 0, warmup_steps >= 0, weight_decay >= 0, grad_clip >= 0 (0: none) and ema_decay in "
                             f"[0, 1); got {self.lr}, {self.warmup_steps}, {self.weight_decay}, {self.grad_clip} and "
                             f"{self.ema_decay}")
        if self.num_timesteps < 2:
            raise InputError(f"num_timesteps must be >= 2, got {self.num_timesteps}")
        if self.sample_grid and not 1 <= self.sample_steps <= self.num_timesteps:
            raise InputError(f"sample_steps must lie in [1, num_timesteps = {self.num_timesteps}], got "
                             f"{self.sample_steps}; lower it or skip the grid (--no-sample-grid)")
        check_unet_size(self.width, self.layers_per_block)
        harness.check_checkpointing(self.checkpoint_every)


def build_diffusion_model(cfg: DiffusionTrainConfig, image_size: int, channels: int, num_classes: int | None):
    """A fresh diffusers ``UNet2DModel`` and ``DDPMScheduler`` for this config."""
    from diffusers import DDPMScheduler, UNet2DModel

    from ..nets.unet import unet_config_for

    unet_cfg = unet_config_for(image_size, channels, num_classes if cfg.conditional else None,
                               width=cfg.width, layers_per_block=cfg.layers_per_block)
    unet_cfg.update(cfg.unet_overrides)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_timesteps, beta_schedule=cfg.beta_schedule,
                              prediction_type="epsilon", clip_sample=True)
    with private_seed(cfg.seed):  # diffusers initialises from the global RNG
        unet = UNet2DModel(**unet_cfg)
    return unet, scheduler


def diffusion_loss(den: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   y: torch.Tensor | None) -> torch.Tensor:
    """DDPM's simple loss ``mean ||eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, y)||^2`` of an
    epsilon-prediction ``den`` on model-space images ``x0`` with the given times, noise and labels (None:
    unconditional; the null label where dropped)."""
    return F.mse_loss(den.model_output(den.q_sample(x0, t, noise), t, y), noise)


@harness.holds_run_folder
def train_diffusion(cfg: DiffusionTrainConfig, out_dir: str | Path, *, resume: bool = False, force: bool = False,
                    device: str | torch.device = "cpu", progress: bool = True) -> Denoiser:
    """Train an epsilon-prediction DDPM on ``cfg.data`` and save the EMA weights as a denoiser folder.

    ``out_dir`` receives ``unet/``, ``scheduler/``, ``diffaug.json`` (the denoiser, EMA weights),
    ``checkpoint.safetensors`` (everything needed to resume), ``train_config.json``, ``log.jsonl`` and
    ``samples.png`` (a grid, one row per class). ``resume`` continues the run in ``out_dir`` (bitwise; also
    after SIGTERM, which saves at the next step), ``force`` starts it over. Under ``torchrun`` (see the module
    docstring) ``cfg.batch_size`` must be a multiple of the number of processes and a run resumes on as many;
    rank 0 writes ``out_dir``. Returns the trained (EMA) :class:`Denoiser` (on every rank).
    """
    cfg.validate()
    out_dir = Path(out_dir)
    data, streamed, C, H = _diffusion_data(cfg, progress and main_process())
    if cfg.batch_size is None:
        cfg = dataclasses.replace(cfg, batch_size=default_batch_size(H))
    if streamed and cfg.batch_size > len(data):
        raise InputError(f"--batch-size {cfg.batch_size} is larger than the {len(data)} training images of {cfg.data}; "
                         "lower it")
    folder = harness.RunFolder(out_dir, finished="diffaug.json", outputs=("log.jsonl", SAMPLE_GRID),
                               checkpoint_file=CHECKPOINT_FILE)
    resume = folder.check(resume, force)
    check_batch_split(cfg.batch_size, world_size())

    device = local_device(device)  # under torchrun: cuda:LOCAL_RANK
    dist_info = init_distributed(device)
    num_classes = data.num_classes if cfg.conditional else None
    unet, scheduler = build_diffusion_model(cfg, H, C, num_classes)
    unet.to(device)
    ema = torch.optim.swa_utils.AveragedModel(
        unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
    )
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    gen = harness.rank_generator(cfg.seed, dist_info, device)
    state = harness.TrainState({"model": unet, "ema": ema}, opt, sched, accel.grad_scaler(device, cfg.precision), gen)
    run = harness.Run(folder, state, harness.LossLog(out_dir / "log.jsonl", dist_info.main), dataclasses.asdict(cfg),
                      "train-diffusion", dist_info)
    start = run.start(resume, force, "train_config.json", ("steps", "checkpoint_every", "workers", "sample_grid"),
                      dataclasses.asdict(DiffusionTrainConfig()), total=cfg.steps)

    den = Denoiser.from_diffusers(unet, scheduler, num_classes=num_classes, null_class=num_classes)
    accel.accelerate(den, precision=cfg.precision, channels_last=cfg.channels_last, compile=cfg.compile)
    if dist_info.world > 1:  # the loss goes through DDP's wrapper, whose backward all-reduces the gradients
        den = den.with_net(data_parallel(den.net, device))
    batch = _diffusion_batches(cfg, data, streamed, H, start, device, dist_info)

    def step_fn(step: int) -> dict:
        x0, y = batch(step)
        y = y if num_classes is not None else None
        t = torch.randint(0, cfg.num_timesteps, (x0.shape[0],), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        if y is not None:
            drop = torch.rand(y.shape, generator=gen, device=device) < cfg.label_dropout
            y = torch.where(drop, torch.full_like(y, num_classes), y)
        loss = diffusion_loss(den, x0, t, noise, y)
        accel.optimizer_step(loss, opt, state.scaler, clip_params=unet.parameters(), max_norm=cfg.grad_clip,
                             set_to_none=dist_info.world == 1)  # DDP: grads are bucket views
        sched.step()
        ema.update_parameters(unet)  # the same on every rank: the gradients were all-reduced
        return {"step": step + 1, "loss": loss.detach()}  # on the device until the log is written

    unet.train()
    t0 = time.perf_counter()
    harness.run_steps(run, start, cfg.steps, step_fn, checkpoint_every=cfg.checkpoint_every, progress=progress)

    ema_unet = ema.module.eval()
    result = Denoiser.from_diffusers(ema_unet, scheduler, num_classes=num_classes, null_class=num_classes)
    if not dist_info.main:
        return result
    result.save_pretrained(out_dir, extra={"data": cfg.data, "classes": data.classes, "train_steps": cfg.steps,
                                           "seed": cfg.seed})
    if cfg.sample_grid:
        _write_sample_grid(result, out_dir / SAMPLE_GRID, cfg, data)
    else:  # a grid of an earlier end of this run (resumed with more --steps) would show other weights
        (out_dir / SAMPLE_GRID).unlink(missing_ok=True)
    if progress:
        print(f"train-diffusion: {cfg.steps - start} steps in {time.perf_counter() - t0:.0f}s -> {out_dir}")
    return result


def _diffusion_data(cfg: DiffusionTrainConfig, progress: bool):
    """``(data, streamed, channels, size)`` of the training images, their size checked (square, a power of two)."""
    streamed = not is_in_memory(cfg.data)
    if streamed:  # a folder, read lazily through the data layer: any image size, resized to cfg.image_size
        from ..data import open_splits

        data = open_splits(cfg.data, verbose=progress)["train"]
        C, H = data.channels, cfg.image_size or DEFAULT_STREAMED_SIZE
        W = H
    else:
        data = load_dataset(cfg.data, "train")
        _, C, H, W = data.images.shape
    if H != W:
        raise InputError(f"train-diffusion needs square images, got {H}x{W}; crop or resize them first")
    if H < 4 or H & (H - 1):
        raise InputError(f"train-diffusion needs a power-of-two image size >= 4, got {H}; "
                         + ("pass --image-size 32, 64, 128..." if streamed else "resize the images"))
    return data, streamed, C, H


def _diffusion_batches(cfg: DiffusionTrainConfig, data, streamed: bool, size: int, start: int, device,
                       dist_info: Dist):
    """``batch(step) -> (x0, labels)`` in model space on ``device``, this rank's share of the global batch: the same
    images in memory or streamed."""
    def indices(step):
        return rank_share(harness.batch_indices(len(data), cfg.batch_size, step, cfg.seed), dist_info)

    if streamed:  # batch `step` holds the same images as in memory; each flip is a function of (seed, step, index)
        from ..data import SeededView, generative_transform, make_step_loader

        batches = iter(make_step_loader(SeededView(data, generative_transform(size), seed=cfg.seed), indices, start,
                                        cfg.steps, workers=cfg.workers))

        def batch(step):
            x, y = (v.to(device, non_blocking=True) for v in next(batches))
            return Denoiser.encode(x), y
    else:
        images, labels = accel.to_device(data.images, device), accel.to_device(data.labels, device)

        def batch(step):
            idx = indices(step).to(device)
            return Denoiser.encode(images[idx]), labels[idx]
    return batch


def _write_sample_grid(den: Denoiser, path: Path, cfg: DiffusionTrainConfig, data: ImageDataset, per_class: int = 10):
    from ..sampling import ddim_sample
    from ..utils.figures import save_grid

    gen = torch.Generator(device=den.alpha_bar.device).manual_seed(cfg.seed)
    if den.is_conditional:
        y = torch.arange(den.num_classes, device=den.alpha_bar.device).repeat_interleave(per_class)
    else:
        y = None
    with torch.no_grad():
        samples = ddim_sample(den, len(y) if y is not None else 100, y, steps=cfg.sample_steps, generator=gen)
    save_grid(samples, path, nrow=per_class)
