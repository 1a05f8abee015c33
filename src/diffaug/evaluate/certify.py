"""``diffaug certify``: certify a test set with (denoised) randomized smoothing, resumably and sharded.

Per image the generator is seeded with ``(seed, index)``, so results do not depend on the order, the number of
ranks or on resuming. Each rank appends finished rows to its own TSV; rank 0 merges them into
``certify.tsv`` (columns ``idx label predict radius correct time num_samples``) and writes the table and the plot.
``num_samples`` counts the base-classifier evaluations spent on the image (``n0 + n`` for fixed-n CERTIFY, fewer
with ``sequential``); rows of TSVs written before that column existed are read with ``num_samples`` = ``-``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..smoothing import Smooth, check_sampling_args, check_sequential_args, check_sigma
from ..tables import JobResult, markdown_table
from ..utils import accel
from ..utils.checkpoint import append_text, write_json, write_text
from ..utils.distributed import main_process
from ..utils.locking import holds_folder

COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "num_samples")
HEADER = "\t".join(COLUMNS) + "\n"
OLD_COLUMNS = COLUMNS[:-1]  # before num_samples: such rows read with num_samples "-" (unknown)
PAPER_SIGMAS = (0.25, 0.5, 1.0)


def _read_rows(path: Path) -> list[list[str]]:
    """The complete rows of a ``certify.tsv`` (a torn last line, left by a crash, is skipped)."""
    if not path.exists():
        return []
    text = path.read_text()
    head, lines = text.split("\n", 1)[0], text.split("\n")[1:-1]  # the piece after the last newline is torn
    columns = tuple(head.split("\t"))
    if "\n" in text and columns not in (COLUMNS, OLD_COLUMNS):
        raise InputError(f"{path} is not a certify TSV (header {head!r}); move it away or certify into another --out")
    pad = ["-"] * (len(COLUMNS) - len(columns))
    return [ln.split("\t") + pad for ln in lines if ln.count("\t") == len(columns) - 1]


class StreamedImages:
    """The images of a lazy dataset (e.g. :func:`diffaug.evaluate.sets.eval_view` of a folder) for
    :func:`certify_images`, instead of an in-memory tensor: ``items(indices)`` decodes them in that order, one at a
    time, ``workers`` DataLoader processes reading ahead; each is moved to ``device``."""

    def __init__(self, dataset, device: torch.device, workers: int | None = 0):
        self.dataset, self.device, self.workers = dataset, torch.device(device), workers

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset[int(i)][0].to(self.device)

    def items(self, indices):
        """``(image, label)`` of each index, in that order (the label of the image read: with
        ``on_bad_file="skip"`` a bad file's substitute brings its own)."""
        from .sets import batches

        for x, y in batches(self.dataset, 1, workers=self.workers, indices=indices):
            yield x[0].to(self.device), int(y[0])


def certify_images(smooth: Smooth, images, labels: torch.Tensor, out_tsv: Path, *, n0: int, n: int,
                   alpha: float, batch_size: int, seed: int, indices, progress: bool = False,
                   sequential_radii=None) -> None:
    """Certify ``images[i]`` for ``i`` in ``indices``, appending rows to ``out_tsv``; already-done rows are kept, and
    images in the folder's other ``certify.rank*.tsv`` files are not certified again.

    ``images``: a tensor ``[N, C, H, W]`` or a :class:`StreamedImages` (read one image at a time).
    With ``sequential_radii`` (a grid) the images are certified by ``Smooth.certify_sequential_many`` with
    ``max_n = n`` (several at a time, sharing forward passes; a row's ``time`` then runs from the image's first
    draw to its certificate, and rows are appended as images finish); otherwise one by one by fixed-n
    ``Smooth.certify``."""
    from tqdm.auto import tqdm

    rows = _read_rows(out_tsv)
    # images any rank finished (a rerun with another number of processes shares the images out differently)
    done = {int(r[0]) for part in out_tsv.parent.glob("certify.rank*.tsv") if part != out_tsv
            for r in _read_rows(part)} | {int(r[0]) for r in rows}
    # start from the complete rows only, so a line torn by a crash is not glued to the next one
    write_text(out_tsv, HEADER + "".join("\t".join(r) + "\n" for r in rows))
    todo = [i for i in indices if i not in done]
    device = images.device
    items = (images.items(todo) if isinstance(images, StreamedImages) else
             ((images[i], int(labels[i])) for i in todo))
    started, label_of = {}, {}

    def seeded():  # (index, image, its generator), noting when each image's certification starts
        for i, (x, y) in zip(todo, items):
            started[i], label_of[i] = time.perf_counter(), y
            yield i, x, torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)

    if sequential_radii is None:
        results = ((i, (*smooth.certify(x, n0, n, alpha, batch_size, generator=gen), n0 + n))
                   for i, x, gen in seeded())
    else:
        results = ((i, dataclasses.astuple(cert)) for i, cert in smooth.certify_sequential_many(
            seeded(), alpha, n, batch_size, radii=sequential_radii, n0=n0))
    for i, (pred, radius, used) in tqdm(results, total=len(todo), disable=not progress,
                                        desc=f"certify sigma={smooth.sigma}"):
        label = label_of.pop(i)
        append_text(out_tsv, f"{i}\t{label}\t{pred}\t{radius:.4f}\t{int(pred == label)}\t"
                    f"{time.perf_counter() - started.pop(i):.4f}\t{used}\n")


def merge_shards(folder: Path, indices=None) -> list[list[str]]:
    """Merge ``certify.rank*.tsv`` into ``certify.tsv`` sorted by index (only the rows of ``indices`` when given:
    the run's selection, not every image an earlier run of other ``--limit`` / ``--skip`` left); returns the rows."""
    keep = None if indices is None else {int(i) for i in indices}
    rows = {}
    for part in sorted(folder.glob("certify.rank*.tsv")):
        for r in _read_rows(part):
            if keep is None or int(r[0]) in keep:
                rows[int(r[0])] = r
    merged = [rows[k] for k in sorted(rows)]
    write_text(folder / "certify.tsv", HEADER + "".join("\t".join(r) + "\n" for r in merged))
    return merged


def certified_accuracy(rows: list[list[str]], radii) -> np.ndarray:
    """Fraction of images certified correct with radius >= r, for each r (abstains count as wrong)."""
    if not rows:
        return np.zeros(len(radii))
    correct = np.array([int(r[4]) for r in rows], dtype=bool)
    radius = np.array([float(r[3]) for r in rows])
    return np.array([(correct & (radius >= r)).mean() for r in radii])


def sample_totals(rows: list[list[str]]) -> tuple[int, float, int]:
    """``(total, mean per image, images without a count)`` of the ``num_samples`` column (``-``: unknown, rows
    from before the column existed)."""
    known = [int(r[6]) for r in rows if r[6] != "-"]
    return sum(known), (sum(known) / len(known) if known else float("nan")), len(rows) - len(known)


def default_radii(max_radius: float) -> list[float]:
    return [round(0.25 * k, 2) for k in range(int(max_radius / 0.25) + 1)]


def table_radii(sigmas) -> list[float]:
    """The radii of the table (and of the sequential certifier's grid): 0, 0.25, ..., max(2, 2 max sigma)."""
    return default_radii(max(2.0, 2 * max(sigmas)))


def write_report(out: Path, results: dict[str, dict[float, list[list[str]]]], sequential: bool = False) -> str:
    """``results[classifier][sigma] = rows``: write ``table.md`` and ``certified_accuracy.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.figures import save_figure

    sigmas = sorted({s for per in results.values() for s in per})
    radii = table_radii(sigmas)
    lines = ["# Certified accuracy (L2, pixel space [0, 1])", "",
             "Certified accuracy at radius r = fraction of test images classified correctly with a certified "
             "radius >= r (Cohen et al. CERTIFY). 'best' takes the best sigma at each radius, as the paper does.", ""]
    if sequential:
        lines += ["Sequential certification (exact group-sequential tests, the same guarantee): radii are "
                        "the largest certified radius on the table's grid.", ""]
    rows = certify_rows(results, radii)
    best = best_sigma_curves(rows)
    cells = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, per_sigma in results.items():
        for s in sorted(per_sigma):
            cells.append([name, f"{s:g}", str(len(per_sigma[s])), *(f"{r['certified_accuracy']:.3f}" for r in rows
                                                                     if r["classifier"] == name and r["sigma"] == s)])
            fine = np.linspace(0, radii[-1], 200)
            ax.plot(fine, certified_accuracy(per_sigma[s], fine), label=f"{name} sigma={s:g}")
        cells.append([name, "best", "-", *(f"{a:.3f}" for a in best[name])])
    lines += markdown_table(["classifier", "sigma", "n images", *(f"r={r:g}" for r in radii)], cells)
    lines += ["", "Base-classifier evaluations (denoiser + classifier passes) per image, the n0 selection draws "
              "included:", ""]
    cells = []
    for name, per_sigma in results.items():
        for s in sorted(per_sigma):
            total, mean, unknown = sample_totals(per_sigma[s])
            note = f" ({unknown} rows from an older version without counts)" if unknown else ""
            cells.append([name, f"{s:g}", str(len(per_sigma[s])), str(total), f"{mean:.0f}{note}"])
    lines += markdown_table(["classifier", "sigma", "n images", "total samples", "mean samples per image"], cells)
    ax.set_xlabel("L2 radius (pixel space)")
    ax.set_ylabel("certified accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, out / "certified_accuracy.png")
    text = "\n".join(lines) + "\n"
    write_text(out / "table.md", text)
    return text


def certify_indices(labels, skip: int, limit: int | None, seed: int, stratified: bool) -> list[int]:
    """The test images to certify: every ``skip``-th, then at most ``limit`` of them: the first ``limit``
    (``stratified=False``, the in-memory sets, as before) or a seeded sample stratified by class
    (:func:`diffaug.data.stratified_sample`)."""
    from ..data import stratified_sample

    candidates = np.arange(0, len(labels), skip)
    if limit is None:
        return candidates.tolist()
    if not stratified:
        return candidates[:limit].tolist()
    return candidates[stratified_sample(np.asarray(labels)[candidates], limit, seed)].tolist()


def certify_rows(results: dict[str, dict[float, list[list[str]]]], radii) -> list[dict]:
    """``results[classifier][sigma] = TSV rows`` as rows ``{classifier, sigma, n_images, radius,
    certified_accuracy}``, one per classifier x sigma x radius of ``radii``."""
    return [{"classifier": name, "sigma": s, "n_images": len(per_sigma[s]), "radius": r, "certified_accuracy": float(a)}
            for name, per_sigma in results.items() for s in sorted(per_sigma)
            for r, a in zip(radii, certified_accuracy(per_sigma[s], radii))]


def best_sigma_curves(rows: list[dict]) -> dict[str, np.ndarray]:
    """Per classifier (in order), the certified accuracy of the best sigma at each radius of :func:`certify_rows`."""
    curves = {}
    for r in rows:
        curves.setdefault(r["classifier"], {}).setdefault(r["sigma"], []).append(r["certified_accuracy"])
    return {name: np.max(np.stack([np.array(v) for v in per.values()]), axis=0) for name, per in curves.items()}


SETTINGS_FILE = "certify.json"  # beside each classifier x sigma's TSVs: the settings its rows were made with


def _path_setting(value):
    """A data / model argument as recorded: an existing path resolved (so ./a and a agree), a name as given."""
    return None if value is None else str(Path(value).resolve()) if Path(value).exists() else str(value)


def check_resumable(folder: Path, settings: dict) -> None:
    """One-line :class:`InputError` when ``folder`` holds rows made with other ``settings`` (a rerun into the same
    ``--out`` would otherwise report them as its own); nothing is written here."""
    path = folder / SETTINGS_FILE
    if not path.is_file():
        if any(folder.glob("certify.rank*.tsv")) and main_process():
            print(f"certify: {folder} predates {SETTINGS_FILE}; its rows are taken as made with this run's settings")
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{path} is unreadable; certify into another --out or remove {folder}") from None
    changed = [f"{k} {before.get(k)!r} there, {settings.get(k)!r} now" for k in sorted(set(before) | set(settings))
               if before.get(k) != settings.get(k)]
    if changed:
        raise InputError(f"{folder} holds certify results made with other settings ({'; '.join(changed)}); certify "
                         f"into another --out, or remove {folder} to start over")


def _check_certify_args(sigmas, n0, n, alpha, batch_size, skip, limit, sequential, max_n, workers):
    """Check the sampling settings before any work; returns ``(n, radii)`` (``n``: ``max_n`` when sequential)."""
    from ..data import check_workers

    for sigma in sigmas:
        check_sigma(sigma)
    if max_n is not None and not sequential:
        raise InputError("--max-n applies to --sequential only; use --n for fixed-n CERTIFY or add --sequential")
    radii = table_radii(sigmas)
    if sequential:
        n = n if max_n is None else max_n
        check_sampling_args(batch_size, alpha, n0=n0, max_n=n)
        check_sequential_args(n0, n, radii)
    else:
        check_sampling_args(batch_size, alpha, n0=n0, n=n)
    if skip < 1:
        raise InputError(f"--skip must be >= 1, got {skip}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    check_workers(workers)
    return n, radii


def _load_certify(data, classifiers, denoiser, sigmas, device, speed, image_size, workers, progress,
                  on_bad_file="error"):
    """Load the data (in memory or streamed), the classifiers (keyed by :func:`diffaug.evaluate.sets.folder_keys`) and
    the denoiser, and build every :class:`Smooth`, before any work; returns ``(images, labels, in_memory, models,
    den, smooths)``."""
    from ..classifier import load_classifier
    from ..data import corrupted_layout, is_in_memory, load_dataset
    from ..denoiser import load_denoiser
    from ..data import subset_classes
    from .sets import (at_size, check_denoiser_on, eval_size, eval_view, folder_keys, match_classes,
                       open_eval_folder, trained_subset)

    in_memory = is_in_memory(data)
    layout = None if in_memory else corrupted_layout(data)
    if layout == "imagenet-c":
        raise InputError(f"{data} is an ImageNet-C root (corruption/severity/class/image); certify takes one "
                         f"condition as a class folder: --data {Path(data) / '<corruption>' / '<severity>'}")
    if layout == "cifar10-c":
        raise InputError(f"{data} holds CIFAR-10-C .npy files, which certify does not read; certify clean CIFAR-10 "
                         "(its cifar-10-batches-py folder) or an image folder")
    test = load_dataset(data, "test") if in_memory else None
    keys = folder_keys(classifiers)  # a unique short name each (runs/a/s0, runs/b/s0 -> a/s0, b/s0), before any work
    models = {key: load_classifier(c, device=device, speed=speed) for key, c in zip(keys, classifiers)}
    size = eval_size(models, image_size)
    subset = trained_subset(models, data)  # classifiers trained with --classes: the classes of data they know
    if in_memory:
        test = subset_classes(test, subset) if subset else test
        images, labels, classes = at_size(test.images, size), test.labels, test.classes
        first = images[:1]
    else:
        channels = next(iter(models.values())).spec.get("channels", 3)
        folder = open_eval_folder(data, models, channels=channels, verbose=progress and main_process(),
                                  on_bad_file=on_bad_file)
        view = eval_view(folder.with_classes(subset) if subset else folder, size)
        images, labels, classes = StreamedImages(view, device, workers), view.labels, view.classes
        first = images[0][None]
    den = load_denoiser(denoiser, device=device, speed=speed) if denoiser else None
    if den is not None:
        den = den.at_size(first.shape[-1]) if first.shape[-1] == first.shape[-2] else den  # conv. nets: any size
        check_denoiser_on(den, first, str(data), "or drop --denoiser (plain randomized smoothing)")
    models = {name: match_classes(m, None if in_memory else classes, len(classes), name, str(data))
              for name, m in models.items()}  # in memory: matched by count, as before
    smooths = {(name, s): Smooth(m, m.spec["num_classes"], s, denoiser=den) for name, m in models.items()
               for s in sigmas}  # every check (sigma, schedule reach) before any work
    return images, labels, in_memory, models, den, smooths


@holds_folder("out")  # resumable and appending: one job per --out
def run_certify(*, data: str, classifiers: list[str], denoiser: str | None, sigmas: list[float], n0: int, n: int,
                alpha: float, batch_size: int, skip: int, limit: int | None, seed: int, out: str | Path,
                device: str = "cpu", progress: bool = True, speed=None, sequential: bool = False,
                max_n: int | None = None, image_size: int | None = None, workers: int | None = None,
                on_bad_file: str = "error") -> JobResult:
    """The CLI's job: every classifier x sigma, sharded over torchrun ranks, resumable.

    Returns a :class:`~diffaug.tables.JobResult`: the rows of :func:`certify_rows` (certified accuracy per
    classifier x sigma x radius of the table), the merged ``certify.tsv`` rows in ``extra["certify"]``
    (``[classifier][sigma]``) and the table text; empty on ranks other than 0.

    ``sequential``: ``Smooth.certify_sequential`` with at most ``max_n`` draws (default ``n``) on the table's
    radius grid, instead of fixed-n CERTIFY.

    Data: ``digits`` / CIFAR-10 in memory (``limit``: the first images, as before); any other folder is streamed
    one image at a time (:func:`diffaug.evaluate.sets.open_eval_folder`: a classifier's own training folder gives its
    test split, any other class folder is used whole) at the classifiers' input size (``image_size``, default
    their ``model.json``'s), classes matched by name, and ``limit`` takes a seeded, class-stratified sample;
    ``workers`` DataLoader processes decode the next images while one is certified."""
    from ..utils.distributed import SHARED_OUT_TIMEOUT, init_distributed, local_device

    out = Path(out)
    device = local_device(device)  # under torchrun: cuda:LOCAL_RANK
    n, radii = _check_certify_args(sigmas, n0, n, alpha, batch_size, skip, limit, sequential, max_n, workers)
    images, labels, in_memory, models, den, smooths = _load_certify(data, classifiers, denoiser, sigmas, device,
                                                                    speed, image_size, workers, progress,
                                                                    on_bad_file)
    common = {"data": _path_setting(data), "denoiser": _path_setting(denoiser), "n0": n0, "n": n, "alpha": alpha,
              "batch_size": batch_size, "seed": seed, "sequential": sequential, "image_size": image_size,
              "radii": [float(r) for r in radii] if sequential else None,
              "device": device.type,  # CUDA generators draw other noise than CPU ones
              "precision": speed.precision if speed is not None else "fp32"}
    settings = {(key, s): {**common, "classifier": _path_setting(c), "sigma": s}
                for key, c in zip(models, classifiers) for s in sigmas}
    for (name, s), values in settings.items():  # every folder before any work
        check_resumable(out / name / f"sigma_{s:g}", values)
    dist_info = init_distributed(device, SHARED_OUT_TIMEOUT)  # shares of unequal cost meet only at the end
    indices = certify_indices(labels.numpy(), skip, limit, seed, stratified=not in_memory)
    mine = indices[dist_info.rank :: dist_info.world]
    if in_memory:
        images = accel.to_device(images, device)
    for (name, s), smooth in smooths.items():
        folder = out / name / f"sigma_{s:g}"
        if dist_info.main:
            write_json(folder / SETTINGS_FILE, settings[name, s])
        certify_images(smooth, images, labels, folder / f"certify.rank{dist_info.rank}.tsv", n0=n0, n=n,
                       alpha=alpha, batch_size=batch_size, seed=seed, indices=mine,
                       progress=progress and dist_info.main, sequential_radii=radii if sequential else None)
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
    if not dist_info.main:
        return JobResult("", [])
    results = {name: {s: merge_shards(out / name / f"sigma_{s:g}", indices) for s in sigmas} for name in models}
    table = write_report(out, results, sequential)
    if den is not None:
        first = next(iter(models))
        notes = [f"- sigma={s:g}: t*={sm.t_star}, model-space noise at t* / 2 sigma = {sm.dds_mismatch:.4f}"
                 for (name, s), sm in smooths.items() if name == first]
        table = (table + "\nDenoised smoothing with " + str(denoiser) + ":\n" + "\n".join(notes) + "\n")
        write_text(out / "table.md", table)
    return JobResult(table, certify_rows(results, radii), {"certify": results})
