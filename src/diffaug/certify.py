"""``diffaug certify``: certify a test set with (denoised) randomized smoothing, resumably and sharded.

Per image the generator is seeded with ``(seed, index)``, so results do not depend on the order, the number of
ranks or on resuming. Each rank appends finished rows to its own TSV; rank 0 merges them into
``certify.tsv`` (columns ``idx label predict radius correct time num_samples``) and writes the table and the plot.
``num_samples`` counts the base-classifier evaluations spent on the image (``n0 + n`` for fixed-n CERTIFY, fewer
with ``sequential``); rows of TSVs written before that column existed are read with ``num_samples`` = ``-``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from . import accel
from .checkpoint import append_text, write_text
from .errors import InputError
from .smoothing import Smooth, check_sampling_args, check_sequential_args

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


def certify_images(smooth: Smooth, images: torch.Tensor, labels: torch.Tensor, out_tsv: Path, *, n0: int, n: int,
                   alpha: float, batch_size: int, seed: int, indices, progress: bool = False,
                   sequential_radii=None) -> None:
    """Certify ``images[i]`` for ``i`` in ``indices``, appending rows to ``out_tsv``; already-done rows are kept.

    With ``sequential_radii`` (a grid) each image is certified by ``Smooth.certify_sequential`` with ``max_n = n``;
    otherwise by fixed-n ``Smooth.certify``."""
    from tqdm.auto import tqdm

    rows = _read_rows(out_tsv)
    done = {int(r[0]) for r in rows}
    # start from the complete rows only, so a line torn by a crash is not glued to the next one
    write_text(out_tsv, HEADER + "".join("\t".join(r) + "\n" for r in rows))
    todo = [i for i in indices if i not in done]
    device = images.device
    for i in tqdm(todo, disable=not progress, desc=f"certify sigma={smooth.sigma}"):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
        t0 = time.perf_counter()
        if sequential_radii is None:
            (pred, radius), used = smooth.certify(images[i], n0, n, alpha, batch_size, generator=gen), n0 + n
        else:
            pred, radius, used = dataclasses.astuple(smooth.certify_sequential(
                images[i], alpha, n, batch_size, radii=sequential_radii, n0=n0, generator=gen))
        label = int(labels[i])
        append_text(out_tsv, f"{i}\t{label}\t{pred}\t{radius:.4f}\t{int(pred == label)}\t"
                    f"{time.perf_counter() - t0:.4f}\t{used}\n")


def merge_shards(folder: Path) -> list[list[str]]:
    """Merge ``certify.rank*.tsv`` into ``certify.tsv`` sorted by index; returns the rows."""
    rows = {}
    for part in sorted(folder.glob("certify.rank*.tsv")):
        for r in _read_rows(part):
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

    from .report import save_figure

    sigmas = sorted({s for per in results.values() for s in per})
    radii = table_radii(sigmas)
    lines = ["# Certified accuracy (L2, pixel space [0, 1])", "",
             "Certified accuracy at radius r = fraction of test images classified correctly with a certified "
             "radius >= r (Cohen et al. CERTIFY). 'best' takes the best sigma at each radius, as the paper does.", ""]
    if sequential:
        lines += ["Sequential certification (exact group-sequential tests, the same guarantee): radii are "
                        "the largest certified radius on the table's grid.", ""]
    head = "| classifier | sigma | n images | " + " | ".join(f"r={r:g}" for r in radii) + " |"
    lines += [head, "|" + "---|" * (3 + len(radii))]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, per_sigma in results.items():
        curves = {}
        for s in sorted(per_sigma):
            acc = certified_accuracy(per_sigma[s], radii)
            curves[s] = acc
            lines.append(f"| {name} | {s:g} | {len(per_sigma[s])} | " + " | ".join(f"{a:.3f}" for a in acc) + " |")
            fine = np.linspace(0, radii[-1], 200)
            ax.plot(fine, certified_accuracy(per_sigma[s], fine), label=f"{name} sigma={s:g}")
        best = np.max(np.stack(list(curves.values())), axis=0)
        lines.append(f"| {name} | best | - | " + " | ".join(f"{a:.3f}" for a in best) + " |")
    lines += ["", "Base-classifier evaluations (denoiser + classifier passes) per image, the n0 selection draws "
              "included:", "", "| classifier | sigma | n images | total samples | mean samples per image |",
              "|---|---|---|---|---|"]
    for name, per_sigma in results.items():
        for s in sorted(per_sigma):
            total, mean, unknown = sample_totals(per_sigma[s])
            note = f" ({unknown} rows from an older version without counts)" if unknown else ""
            lines.append(f"| {name} | {s:g} | {len(per_sigma[s])} | {total} | {mean:.0f}{note} |")
    ax.set_xlabel("L2 radius (pixel space)")
    ax.set_ylabel("certified accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, out / "certified_accuracy.png")
    text = "\n".join(lines) + "\n"
    write_text(out / "table.md", text)
    return text


def run_certify(*, data: str, classifiers: list[str], denoiser: str | None, sigmas: list[float], n0: int, n: int,
                alpha: float, batch_size: int, skip: int, limit: int | None, seed: int, out: str | Path,
                device: str = "cpu", progress: bool = True, speed=None, sequential: bool = False,
                max_n: int | None = None) -> str:
    """The CLI's job: every classifier x sigma, sharded over torchrun ranks, resumable; returns the table.

    ``sequential``: ``Smooth.certify_sequential`` with at most ``max_n`` draws (default ``n``) on the table's
    radius grid, instead of fixed-n CERTIFY."""
    from .classifier import load_classifier
    from .data import load_dataset
    from .denoiser import load_denoiser
    from .train_classifier import init_distributed

    out = Path(out)
    device = torch.device(device)
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
    test = load_dataset(data, "test")
    models = {Path(c).name or str(c): load_classifier(c, device=device, speed=speed) for c in classifiers}
    den = load_denoiser(denoiser, device=device, speed=speed) if denoiser else None
    if den is not None:
        den.check_images(test.images[:1], name=f"images of {data}")
    smooths = {(name, s): Smooth(m, m.spec["num_classes"], s, denoiser=den) for name, m in models.items()
               for s in sigmas}  # every check (sigma, schedule reach) before any work
    for name, m in models.items():
        if m.spec["num_classes"] != test.num_classes:
            raise InputError(f"classifier {name} has {m.spec['num_classes']} classes but {data} has "
                             f"{test.num_classes}; certify it on the data it was trained for")
    dist_info = init_distributed(device)
    indices = list(range(0, len(test), skip))[:limit]
    mine = indices[dist_info.rank :: dist_info.world]
    images, labels = accel.to_device(test.images, device), test.labels
    for (name, s), smooth in smooths.items():
        folder = out / name / f"sigma_{s:g}"
        certify_images(smooth, images, labels, folder / f"certify.rank{dist_info.rank}.tsv", n0=n0, n=n,
                       alpha=alpha, batch_size=batch_size, seed=seed, indices=mine,
                       progress=progress and dist_info.main, sequential_radii=radii if sequential else None)
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
    if not dist_info.main:
        return ""
    results = {name: {s: merge_shards(out / name / f"sigma_{s:g}") for s in sigmas} for name in models}
    table = write_report(out, results, sequential)
    if den is not None:
        first = next(iter(models))
        notes = [f"- sigma={s:g}: t*={sm.t_star}, model-space noise at t* / 2 sigma = {sm.dds_mismatch:.4f}"
                 for (name, s), sm in smooths.items() if name == first]
        text = (table + "\nDenoised smoothing with " + str(denoiser) + ":\n" + "\n".join(notes) + "\n")
        write_text(out / "table.md", text)
        table = text
    return table
