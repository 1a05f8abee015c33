"""How good is a denoiser? Judged by an independent classifier trained on the real training images.

* sample accuracy: class-conditional samples (DDIM) labelled as their target class by the classifier;
* DiffAug label preservation: the classifier's accuracy on DiffAug views of test images at fixed t, next to its
  accuracy on the clean test images.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..augment import DiffAug
from ..classifier import create_classifier, fit_classifier, predict
from ..data import is_in_memory, load_dataset
from ..denoiser import Denoiser, load_denoiser
from ..errors import InputError
from ..sampling import ddim_sample
from ..utils.checkpoint import write_json


FOLDER_IMAGES = 2000  # a folder's train / test images read (class-stratified, seed 0) for the judge and the views


def quality_sets(data: str, den: Denoiser):
    """``(train, test)`` in memory: digits / CIFAR-10 as they are, an image folder's splits as a class-stratified
    sample of at most :data:`FOLDER_IMAGES` each (seed 0), images of any size brought whole to the denoiser's
    ``size`` x ``size`` (as ``train-diffusion`` saw them, no flip) and its ``channels``."""
    if is_in_memory(data):
        return load_dataset(data, "train"), load_dataset(data, "test")
    from ..data import generative_transform, open_splits, read_sample
    from ..data.files import check_colour_kept

    size = den.image_size[0] if den.image_size else None
    if size is None:
        raise InputError(f"the denoiser has no fixed image size; {data} cannot be brought to one")
    splits = open_splits(data, channels=den.channels)
    check_colour_kept(splits["train"], den.channels, data)
    view = generative_transform(size, flip=False)
    return tuple(read_sample(splits[s], view, FOLDER_IMAGES, seed=0, workers=0) for s in ("train", "test"))


def measure_once(den: Denoiser, seed: int, *, data: str = "digits", per_class: int = 50, sample_steps: int = 100,
                 times=(100, 300, 500, 700), device: str = "cpu", sets=None) -> dict:
    """One seed: train the reference classifier, then score samples and DiffAug views (``sets``: the
    ``(train, test)`` of :func:`quality_sets`, read once for several seeds)."""
    train, test = sets if sets is not None else quality_sets(data, den)
    gen = torch.Generator().manual_seed(seed)
    model = create_classifier("small_cnn", train.num_classes, train.images.shape[1], seed=seed)
    clf = fit_classifier(model, train, generator=gen, device=device)
    images, labels = test.images.to(device), test.labels.to(device)
    row = {"seed": seed, "classifier_test_acc": (predict(clf, images) == labels).float().mean().item()}
    dgen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for t in times:
            views = DiffAug(den, t_range=(t, t))(images, generator=dgen)
            row[f"diffaug_t{t}_label_kept"] = (predict(clf, views) == labels).float().mean().item()
        if den.is_conditional:
            y = torch.arange(train.num_classes, device=device).repeat_interleave(per_class)
            samples = ddim_sample(den, len(y), y, steps=sample_steps, cond_weight=1.0, generator=dgen, device=device)
            row["sample_acc"] = (predict(clf, samples) == y).float().mean().item()
            row["sample_acc_per_class"] = [
                (predict(clf, samples[y == c]) == c).float().mean().item() for c in range(train.num_classes)
            ]
    return row


def denoiser_quality(denoiser, out: str | Path, *, data: str = "digits", seeds=(0, 1, 2), device: str = "cpu") -> dict:
    """Measure over seeds; write per-seed rows and mean/std to ``out`` (JSON) and print a summary."""
    if not seeds:
        raise InputError("give at least one seed")
    den = denoiser if isinstance(denoiser, Denoiser) else load_denoiser(denoiser, device=device)
    t0 = time.perf_counter()
    sets = quality_sets(data, den)  # before any work: a bad folder fails here
    rows = [measure_once(den, s, data=data, device=device, sets=sets) for s in seeds]
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    summary = {
        k: {"mean": statistics.fmean(r[k] for r in rows),
            "std": statistics.stdev([r[k] for r in rows]) if len(rows) > 1 else 0.0}
        for k in keys
    }
    result = {"denoiser": str(denoiser) if not isinstance(denoiser, Denoiser) else "<object>", "data": data,
              "seeds": list(seeds), "summary": summary, "per_seed": rows, "seconds": time.perf_counter() - t0}
    write_json(out, result)
    for k, v in summary.items():
        print(f"{k:28s} {v['mean']:.4f} +- {v['std']:.4f}  (n={len(rows)} seeds)")
    return result
