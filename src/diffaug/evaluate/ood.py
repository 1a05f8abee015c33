"""``diffaug eval-ood``: score classifiers for OOD detection and write the paper's Table 3.

ID data is the test split of the classes a classifier was trained on (its ``model.json`` records them); ReAct is
fitted on the val split of the same classes (on a folder whose val split is its test split, ImageNet's ``train/`` +
``val/``, on a stratified sample of ``FIT_IMAGES`` train images instead). OOD sets:

* ``holdout`` (near-OOD): test images of the data's classes the classifier did not see (train with
  ``diffaug train --classes 0 1 2 3 4`` to hold classes out); on digits, unseen digits;
* ``photo-patches`` (far): scikit-learn's bundled photographs cut into patches at the data's size;
* ``noise`` (far): seeded uniform noise and blurred Gaussian blobs;
* ``PATH`` or ``near=PATH``: an image folder of OOD images (far unless prefixed with ``near=``).

With ``search_percentile`` the percentiles of ReAct/ASH/SCALE are chosen per classifier on ID-val vs a separate
synthetic OOD-val set (noise with seed + 1), never on the test sets; otherwise OpenOOD's defaults are used.
Group scores (near, far) are unweighted means over their sets. Classifiers with the same recipe are reported
as mean +- std over them (their seeds).
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path

import numpy as np
import torch

from ..classifier import load_classifier
from ..data import FAR_OOD_SETS, load_dataset, noise_images, photo_patches, subset_classes
from ..errors import InputError
from ..ood import PAPER_SCORES, SCORES, OODScorer, metrics, search_percentile
from ..tables import JobResult, lookup, markdown_table, mean_std, summarize
from ..utils.checkpoint import write_csv, write_text

COLUMN_NAMES = {"ash_b": "ASH", "msp": "MSP", "react": "ReAct", "scale": "SCALE"}


# images of the train split the scores are fitted on when a folder has no val split apart from its test split
FIT_IMAGES = 10_000


def fit_split(splits: dict, seed: int = 0):
    """The images the OOD scores are fitted on: the val split, or, when the val split is the test split (a folder
    with ``train/`` + ``val/`` only, ImageNet's layout), a seeded stratified sample of ``FIT_IMAGES`` train
    images, so that no score is fitted on the images it is tested on."""
    from ..data import stratified_sample

    if splits["val"] is not splits["test"]:
        return splits["val"]
    train = splits["train"]
    return train.subset(stratified_sample(train.labels.numpy(), min(len(train), FIT_IMAGES), seed))


def _ood_sets(names: list[str], data: str, classes: list[int] | None, size: int, channels: int, seed: int,
              *, lazy_test=None, image_root: str | None = None, on_bad_file: str = "error"):
    """``{name: (group, images)}``: an in-memory tensor, or a lazy source (a streamed folder or image list);
    every set is checked for emptiness and shape before any scoring. ``lazy_test``: the streamed ID test split
    (for ``holdout`` on a folder)."""
    from ..data import ImageList, open_unlabelled
    from .sets import folder_keys

    paths = [n[5:] if n.startswith("near=") else n for n in names if n not in ("holdout", *FAR_OOD_SETS)]
    keys = dict(zip(paths, folder_keys([Path(p).with_suffix("") if Path(p).is_file() else p for p in paths],
                                       what="OOD set")))  # two folders named images stay apart: a/images, b/images
    sets = {}
    for name in names:
        if name == "holdout":
            if classes is None:
                raise InputError("holdout needs a classifier trained on a subset of classes (diffaug train --classes)")
            if lazy_test is not None:
                held = np.flatnonzero(~np.isin(lazy_test.labels.numpy(), classes))
                if not len(held):
                    raise InputError(f"holdout: {data} has no test images outside the classifier's classes")
                sets[name] = ("near", lazy_test.subset(held))
                continue
            test = load_dataset(data, "test")
            held = [c for c in range(test.num_classes) if c not in classes]
            sets[name] = ("near", subset_classes(test, held).images if len(held) > 1
                          else test.images[test.labels == held[0]])
        elif name == "photo-patches":
            sets[name] = ("far", photo_patches(size, channels))
        elif name == "noise":
            sets[name] = ("far", noise_images(200, size, channels, seed))
        else:
            group, path = ("near", name[5:]) if name.startswith("near=") else ("far", name)
            key, path = keys[path], Path(path)
            if path.is_file():  # an OpenOOD image list: relative/path [label] per line
                root = Path(image_root) if image_root else path.parent
                sets[key] = (group, ImageList(path, root, channels=channels, on_bad_file=on_bad_file))
            elif not path.exists():
                what = (f"OOD folder {path} does not exist" if len(path.parts) > 1 or name.startswith("near=")
                        else f"unknown OOD set {name!r}")  # a path-like name is a missing folder, not a set name
                raise InputError(f"{what}: use holdout, {', '.join(FAR_OOD_SETS)}, a folder or an image list file")
            else:  # streamed, whatever the ID data: a flat folder, images/<class>/, or class folders
                sets[key] = (group, open_unlabelled(path, channels=channels, on_bad_file=on_bad_file))
    for name, (_, images) in sets.items():
        if not isinstance(images, torch.Tensor):
            continue  # lazy: brought to the ID size by the evaluation transform
        if images.shape[0] == 0:
            raise InputError(f"OOD set {name} is empty")
        if tuple(images.shape[1:]) != (channels, size, size):
            raise InputError(f"OOD set {name} has images {tuple(images.shape[1:])}, the ID data "
                             f"{(channels, size, size)}; resize them first")
    return sets


def _set_features(scorer: OODScorer, images, view, batch_size: int, workers, device, what: str):
    """Penultimate features ``[N, D]`` of an in-memory tensor, or of a lazy source streamed batch by batch through
    a DataLoader, seen through ``view`` (:func:`~diffaug.evaluate.sets.eval_view` at the ID images' pre-processing;
    only the features are kept)."""
    if isinstance(images, torch.Tensor):
        return scorer.features_of(images.to(device))
    from .sets import batches

    feats = [scorer.features_of(x.to(device), batch_size) for x, _ in
             batches(view(images), batch_size, workers=workers, what=what)]
    return torch.cat(feats)


def evaluate_classifier(folder: str, data: str, ood: list[str] | None, seed: int, device,
                        search: bool = False, speed=None, *, image_size: int | None = None,
                        workers: int | None = None, image_root: str | None = None, batch_size: int = 256,
                        on_bad_file: str = "error") -> list[dict]:
    """Rows ``{classifier, recipe, score, set, group, auroc, fpr95, aupr_in, aupr_out}`` for one classifier.

    ``digits`` / CIFAR-10 are held in memory (as before); any other ``data`` folder is streamed (its val and test
    splits, :func:`diffaug.data.open_splits`), and so are OOD folders and image lists, at the classifier's input
    size (``image_size``, default its ``model.json``'s). Features are computed once per set, batch by batch, and
    shared by every score."""
    from ..data import check_workers, is_in_memory, open_splits
    from .sets import at_size, eval_size, eval_view

    check_workers(workers)
    model = load_classifier(folder, device=device, speed=speed)
    classes = model.spec.get("class_indices")
    size = eval_size({folder: model}, image_size)
    lazy_test = None
    if is_in_memory(data):
        val, test = load_dataset(data, "val"), load_dataset(data, "test")
        if classes is not None:
            val, test = subset_classes(val, classes), subset_classes(test, classes)
        native = size is None or tuple(test.images.shape[-2:]) == (size, size)
        num_classes, val_set, test_set = test.num_classes, at_size(val.images, size), at_size(test.images, size)
        _, C, H, _ = test_set.shape
        # OOD folders and lists as the ID images are seen: whole at their own size (OpenOOD's CIFAR pre-processing),
        # or, when --image-size resizes them, through the same evaluation transform
        view = functools.partial(eval_view, size=H, whole=native)
    else:
        C = model.spec.get("channels", 3)
        splits = open_splits(data, channels=C, on_bad_file=on_bad_file)
        lazy_test = splits["test"]
        val_set, test_set = fit_split(splits, seed), splits["test"]
        if classes is not None:
            val_set, test_set = val_set.with_classes(list(classes)), test_set.with_classes(list(classes))
        num_classes = test_set.num_classes
        if size is None:
            raise InputError(f"classifier {folder} records no input size (a model.json from before it was "
                             "recorded); pass --image-size N to evaluate it on an image folder")
        H = size
        view = functools.partial(eval_view, size=size)  # ID and OOD through one transform
    if model.spec["num_classes"] != num_classes:
        raise InputError(f"classifier {folder} has {model.spec['num_classes']} classes, the ID data {data} has "
                         f"{num_classes}; give --data the data it was trained on (its model.json records them)")
    if model.spec.get("channels", C) != C:
        raise InputError(f"classifier {folder} takes {model.spec['channels']}-channel images, the ID data has {C} "
                         "channels")
    names = ood if ood else (["holdout"] if classes else []) + (list(FAR_OOD_SETS) if lazy_test is None else ["noise"])
    sets = _ood_sets(names, data, classes, H, C, seed, lazy_test=lazy_test, image_root=image_root,
                     on_bad_file=on_bad_file)
    rows = []
    probe = OODScorer(model, "msp")
    feats = {key: _set_features(probe, images, view, batch_size, workers, device, key) for key, images in
             (("id-val", val_set), ("id-test", test_set)) + tuple((n, s) for n, (_, s) in sets.items())}
    ood_val = probe.features_of(noise_images(200, H, C, seed + 1).to(device))  # apart from every test set
    for method in SCORES:
        p = search_percentile(model, method, feats["id-val"], ood_val, features=True) if search else None
        p = None if p is not None and p != p else p  # NaN: the score has no percentile
        scorer = OODScorer(model, method, percentile=p).fit_features(feats["id-val"])
        id_scores = scorer.score(feats["id-test"])
        for name, (group, _) in sets.items():
            m = metrics(id_scores.numpy(), scorer.score(feats[name]).numpy())
            rows.append({"classifier": str(folder), "recipe": model.spec.get("recipe", "?"), "score": method,
                         "set": name, "group": group, "percentile": scorer.percentile, **m})
    return rows


def _group_table(rows: list[dict], metric: str, group: str) -> list[str]:
    """Recipes x the paper's scores (+ Avg): per classifier the unweighted mean of ``metric`` over the group's sets,
    then mean +- std over the classifiers of a recipe."""
    cols = list(PAPER_SCORES)
    summary = summarize([r for r in rows if r["group"] == group and r["score"] in cols], ("recipe", "score"),
                        "classifier", metric)
    cells = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        per = [lookup(summary, recipe=recipe, score=c) for c in cols]
        if per[0] is None:
            continue
        avgs = [statistics.fmean(p["values"][i] for p in per) for i in range(per[0]["n"])]
        cells.append([f"{recipe} ({per[0]['n']})", *(mean_std(p["values"]) for p in per), mean_std(avgs)])
    return markdown_table(["recipe (n classifiers)", *(COLUMN_NAMES[c] for c in cols), "Avg"], cells)


def ood_tables(rows: list[dict]) -> str:
    """The Markdown of ``table.md`` from the rows of ``results.csv``."""
    lines = ["# OOD detection (the paper's Table 3 layout)", "",
             "Scores: higher = more ID. AUROC and FPR@95 in %, OpenOOD v1.5 conventions (FPR@95 = share of ID "
             "flagged OOD when 95 % of OOD are flagged). ASH = ASH-B, as OpenOOD's `ash`. Cells: mean +- std over the classifiers of "
             "a recipe (their seeds); each classifier's value is the unweighted mean over the group's sets.", ""]
    for group in ("near", "far"):
        sets = sorted({r["set"] for r in rows if r["group"] == group})
        if not sets:
            continue
        for metric, label in (("auroc", "AUROC (higher is better)"), ("fpr95", "FPR@95 (lower is better)")):
            lines += [f"## {group}-OOD ({', '.join(sets)}): {label}", ""] + _group_table(rows, metric, group) + [""]
    return "\n".join(lines)


def run_eval_ood(*, data: str, classifiers: list[str], ood: list[str] | None, seed: int, out: str | Path,
                 device: str = "cpu", search_percentile: bool = False, speed=None, image_size: int | None = None,
                 workers: int | None = None, image_root: str | None = None, batch_size: int = 256,
                 on_bad_file: str = "error") -> JobResult:
    """Evaluate every classifier; write ``out/results.csv`` (every number) and ``out/table.md``; returns a
    :class:`~diffaug.tables.JobResult` (those rows and the table's text).

    See :func:`evaluate_classifier` for the data (in memory or streamed), ``image_size``, ``workers`` and
    ``image_root`` (the folder an OpenOOD image list's paths are relative to; default the list's folder)."""
    from .sets import folder_keys

    out = Path(out)
    keys = folder_keys(classifiers)  # short names, as eval-shift's and certify's; refuses a folder given twice
    rows = [{**r, "classifier": key} for key, c in zip(keys, classifiers)
            for r in evaluate_classifier(c, data, ood, seed, torch.device(device), search_percentile, speed,
                                         image_size=image_size, workers=workers, image_root=image_root,
                                         batch_size=batch_size, on_bad_file=on_bad_file)]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    text = ood_tables(rows)
    write_text(out / "table.md", text)
    return JobResult(text, rows)
