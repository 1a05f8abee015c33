"""``diffaug eval-shift``: classifiers under covariate shift with Default / DE / DDA / DDA-SE (the paper's Table 1).

Data: the test split of ``digits`` or of a dataset folder, corrupted on the fly (:mod:`diffaug.corruptions`), or
a pre-corrupted benchmark on disk (ImageNet-C or CIFAR-10-C layout; no clean column then). Every random draw is
keyed by ``(seed, corruption, severity, purpose)``, so a condition's numbers do not depend on which other
conditions, modes or ranks ran (they do depend on ``batch_size``, which sets how draws split into calls).

The diffusion work is classifier-independent: per condition the DE views and the DDA images are computed once and
every classifier is scored on the same ones (a paired comparison). Seconds per image charge each classifier the
whole diffusion cost of its mode, as if it ran alone.

Analyses (rank 0): DE accuracy against the largest member time for member steps 25/50/75 on the highest severity
(the paper's Figure 12) and the mean prediction entropy on DiffAug views against t on clean images (Figure 2).
"""

from __future__ import annotations

import json
import os
import statistics
import time
import zlib
from pathlib import Path

import torch

from . import accel
from .checkpoint import write_csv, write_text
from .corruptions import ALL_CORRUPTIONS, parse_corruptions, parse_severities
from .errors import InputError
from .report import mean_std, save_figure

MODES = ("default", "de", "dda", "dda-se")
TABLE_COLUMNS = (("dda", "DDA"), ("dda-se", "DDA-SE"), ("de", "DE"), ("default", "Default"))
DE_STEPS = (25, 50, 75)
CLEAN = "clean"


def parse_modes(spec: str | list[str]) -> tuple[str, ...]:
    names = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    bad = [m for m in names if m not in MODES]
    if bad or not names:
        raise InputError(f"unknown mode {', '.join(bad) or '(none given)'}; use a comma list of {', '.join(MODES)}")
    return tuple(m for m in MODES if m in names)


def keyed_generator(seed: int, *keys, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from ``seed`` and a key path (stable across runs, processes and orders)."""
    key = zlib.crc32("/".join(str(k) for k in (seed, *keys)).encode())
    return torch.Generator(device=device).manual_seed(key)


class _Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _check_inputs(data, classifiers, denoiser, modes, corruptions, severities, limit, batch_size, device,
                  analyses, speed=None, workers=None):
    """Load and check everything before any work; returns what the run needs."""
    from .classifier import load_classifier
    from .data import check_workers, corrupted_layout, corrupted_names, is_in_memory, load_dataset
    from .denoiser import load_denoiser
    from .evaldata import folder_keys

    modes = parse_modes(modes)
    check_workers(workers)
    severities = parse_severities(severities)
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise InputError(f"--batch must be >= 1, got {batch_size}")
    layout = corrupted_layout(data) if str(data) != "digits" else None
    if layout is None and Path(data).is_dir() and any(p.suffix == ".npy" or p.name in ALL_CORRUPTIONS
                                                      for p in Path(data).iterdir()):
        corrupted_names(data)  # looks like a broken ImageNet-C / CIFAR-10-C folder: raises what was expected
    if layout:
        available = corrupted_names(data)
        if corruptions in ("all", "all+extra", "extra"):
            names = tuple(n for n in parse_corruptions(corruptions) if n in available) or available
        else:
            names = parse_corruptions(corruptions)
            missing = [n for n in names if n not in available]
            if missing:
                raise InputError(f"{data} has no {', '.join(missing)}; it holds {', '.join(available)}")
        test = None
    else:
        names = parse_corruptions(corruptions)
        test = load_dataset(data, "test") if is_in_memory(data) else None  # a folder is streamed
    if not classifiers:
        raise InputError("give at least one --classifier folder")
    models = {key: load_classifier(folder, device=device, speed=speed).eval()  # runs/a/s0, runs/b/s0 -> a/s0, b/s0
              for key, folder in zip(folder_keys(classifiers), classifiers)}
    needs = [m for m in modes if m != "default"] + (["the analyses (or pass --no-analyses)"] if analyses else [])
    if needs and not denoiser:
        raise InputError(f"{', '.join(needs)} need --denoiser")
    den = load_denoiser(denoiser, device=device, speed=speed) if needs else None
    return modes, severities, layout, names, test, models, den


def _check_shapes(models, den, images: torch.Tensor, classes, num_classes: int, source: str) -> dict:
    """Check channels, classes and the denoiser on a probe batch at the evaluation size; returns the models, each
    scored on the set's classes (:func:`diffaug.evaldata.match_classes`)."""
    from .evaldata import match_classes

    for name, model in models.items():
        if model.spec.get("channels", images.shape[1]) != images.shape[1]:
            raise InputError(f"classifier {name} takes {model.spec['channels']}-channel images, {source} has "
                             f"{images.shape[1]}")
    matched = {name: match_classes(model, classes, num_classes, name, source) for name, model in models.items()}
    if den is not None:
        den.check_images(images[:1], name=f"images of {source}")
    return matched


def _subset(n: int, limit: int | None) -> torch.Tensor:
    """A fixed (seed 0) random subset of ``limit`` indices, the same for every --seed and run (in-memory sets)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return order[:limit].sort().values if limit else torch.arange(n)


def _stratified_subset(labels: torch.Tensor, limit: int | None) -> torch.Tensor:
    """A streamed set's ``limit`` images: a fixed (seed 0, the same for every --seed and run) class-stratified
    sample (:func:`diffaug.data.stratified_sample`, as ``certify --limit``), sorted; all images without a limit."""
    from .data import stratified_sample

    if not limit:
        return torch.arange(len(labels))
    return torch.as_tensor(stratified_sample(labels.numpy(), limit, seed=0), dtype=torch.long)


@torch.no_grad()
def evaluate_condition(models: dict, den, batches, modes, *, members, dda_kwargs: dict, seed: int, key: tuple,
                       batch_size: int, device: str | torch.device = "cpu") -> list[dict]:
    """Accuracy and seconds per image of every classifier x mode on one condition, given as ``(images, labels)``
    batches of (already corrupted) images on ``device`` (:func:`diffaug.evaldata.chunks` of a tensor): the DE /
    DDA draws continue from batch to batch. Batches given as ``(images, labels, b)`` (a stream, perhaps a shard of
    it) draw from generators keyed by the batch index ``b`` instead, so a batch's numbers do not depend on which
    rank evaluates it."""
    from .dda import dda_adapt
    from .ensemble import ensemble_probs, ensemble_views

    device = torch.device(device)
    n = 0
    correct = {(c, m): 0 for c in models for m in modes}
    seconds = {(c, m): 0.0 for c in models for m in modes}
    gen_de = keyed_generator(seed, *key, "de", device=device)
    gen_dda = keyed_generator(seed, *key, "dda", device=device)
    for x, y, *batch_key in batches:
        if batch_key:
            gen_de = keyed_generator(seed, *key, "de", *batch_key, device=device)
            gen_dda = keyed_generator(seed, *key, "dda", *batch_key, device=device)
        y = y.to(device)
        n += x.shape[0]
        diffusion = {}
        if "de" in modes:
            with _Clock(device) as clock:
                views = ensemble_views(den, x, members, generator=gen_de, batch_size=batch_size)
            diffusion["de"] = clock.seconds
        if "dda" in modes or "dda-se" in modes:
            with _Clock(device) as clock:
                adapted = dda_adapt(den, x, generator=gen_dda, **dda_kwargs)
            diffusion["dda"] = clock.seconds
        for c, model in models.items():
            probs, spent = {}, {}
            with _Clock(device) as clock:
                probs["default"] = model(x).float().softmax(1)
            spent["default"] = clock.seconds
            if "de" in modes:
                with _Clock(device) as clock:
                    probs["de"] = ensemble_probs(model, views, batch_size).mean(0)
                spent["de"] = clock.seconds + diffusion["de"]
            if "dda" in modes or "dda-se" in modes:
                with _Clock(device) as clock:
                    probs["dda"] = model(adapted).float().softmax(1)
                spent["dda"] = clock.seconds + diffusion["dda"]
                probs["dda-se"] = (probs["default"] + probs["dda"]) / 2
                spent["dda-se"] = spent["dda"] + spent["default"]
            for m in modes:
                correct[(c, m)] += int((probs[m].argmax(1) == y).sum())
                seconds[(c, m)] += spent[m]
    corruption, severity = key
    return [{"classifier": c, "recipe": models[c].spec.get("recipe", "?"), "mode": m, "corruption": corruption,
             "severity": severity, "accuracy": correct[(c, m)] / max(n, 1), "n": n,
             "seconds_per_image": seconds[(c, m)] / max(n, 1)}
            for c in models for m in modes]


@torch.no_grad()
def de_accuracy_vs_t(models: dict, den, conditions, *, seed: int, t_max: int = 450, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> list[dict]:
    """Figure 12: DE accuracy with members ``{0, s, 2 s, ..., t}`` for s in 25/50/75, against t.

    ``conditions``: ``(key, batches)`` pairs, ``batches`` an iterable of ``(images, labels)`` on ``device``; one
    noise draw per member on a 25-step grid, shared by the steps.
    """
    from .ensemble import ensemble_probs, ensemble_views

    grid = list(range(0, t_max + 1, 25))
    hits = {}  # (classifier, step, t) -> correct count
    total = 0
    device = torch.device(device)
    for key, batches in conditions:
        gen = keyed_generator(seed, *key, "de-vs-t", device=device)
        for x, y, *_ in batches:
            y = y.to(device)
            views = ensemble_views(den, x, grid, generator=gen, batch_size=batch_size)
            for c, model in models.items():
                probs = ensemble_probs(model, views, batch_size)  # [M, n, K]
                for step in DE_STEPS:
                    idx = [i for i, t in enumerate(grid) if t % step == 0]
                    running = torch.cumsum(probs[idx], 0) / torch.arange(1, len(idx) + 1, device=x.device).view(-1, 1, 1)
                    for j, i in enumerate(idx):
                        k = (c, step, grid[i])
                        hits[k] = hits.get(k, 0) + int((running[j].argmax(1) == y).sum())
            total += x.shape[0]
    return [{"classifier": c, "recipe": models[c].spec.get("recipe", "?"), "step": s, "t_max": t,
             "accuracy": v / total} for (c, s, t), v in hits.items()]


@torch.no_grad()
def entropy_vs_t(models: dict, den, batches, *, seed: int, num_points: int = 21, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> list[dict]:
    """Figure 2: mean entropy (nats) of each classifier's softmax on DiffAug views at t from 0 to T - 1.

    ``batches``: an iterable of ``(images, labels)`` on ``device`` (labels unused)."""
    from .ensemble import ensemble_probs, ensemble_views

    T = den.num_timesteps
    times = sorted(set(range(0, T, max(1, T // (num_points - 1)))) | {T - 1})  # 0, 50, ..., 950, 999 for T = 1000
    gen = keyed_generator(seed, "entropy", device=torch.device(device))
    sums = {(c, t): 0.0 for c in models for t in times}
    n = 0
    for x, *_ in batches:
        n += x.shape[0]
        views = ensemble_views(den, x, times, generator=gen, batch_size=batch_size)
        for c, model in models.items():
            p = ensemble_probs(model, views, batch_size)
            ent = -(p * p.clamp(min=1e-12).log()).sum(-1)  # [M, n]
            for i, t in enumerate(times):
                sums[(c, t)] += float(ent[i].sum())
    n = max(n, 1)
    return [{"classifier": c, "recipe": models[c].spec.get("recipe", "?"), "t": t, "entropy": v / n}
            for (c, t), v in sums.items()]


def merge_shards(rows: list[dict]) -> list[dict]:
    """One row per (classifier, mode, corruption, severity): the parts that ranks computed on disjoint image
    shards, pooled (accuracy and seconds per image weighted by their image counts). Rows already whole pass
    through unchanged."""
    merged: dict[tuple, dict] = {}
    for r in rows:
        k = (r["classifier"], r["mode"], r["corruption"], r["severity"])
        if k not in merged:
            merged[k] = dict(r)
            continue
        m, n = merged[k], merged[k]["n"] + r["n"]
        correct = round(m["accuracy"] * m["n"]) + round(r["accuracy"] * r["n"])
        m["seconds_per_image"] = (m["seconds_per_image"] * m["n"] + r["seconds_per_image"] * r["n"]) / n
        m["accuracy"], m["n"] = correct / n, n
    return list(merged.values())


# ---------------------------------------------------------------------- tables and plots
def _by_recipe(rows):
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    return [(recipe, list(dict.fromkeys(r["classifier"] for r in rows if r["recipe"] == recipe))) for recipe in recipes]


def _mode_table(rows, modes, select, title) -> list[str]:
    """Rows = recipes (mean +- std over their classifiers), columns = modes + Avg; each classifier's value is the
    mean accuracy over the selected conditions."""
    mine = [r for r in rows if select(r)]
    if not mine:
        return []
    cols = [(m, label) for m, label in TABLE_COLUMNS if m in modes]
    lines = [f"## {title}", "", "| recipe (n classifiers) | " + " | ".join(lbl for _, lbl in cols) + " | Avg |",
             "|" + "---|" * (len(cols) + 2)]
    for recipe, clfs in _by_recipe(mine):
        per = {m: [statistics.fmean(r["accuracy"] for r in mine if r["classifier"] == c and r["mode"] == m)
                   for c in clfs] for m, _ in cols}
        avg = [statistics.fmean(per[m][i] for m, _ in cols) for i in range(len(clfs))]
        lines.append(f"| {recipe} ({len(clfs)}) | " + " | ".join(mean_std(per[m]) for m, _ in cols)
                     + f" | {mean_std(avg)} |")
    return lines + [""]



def write_tables(out: Path, rows: list[dict], modes, severities, frost: str | None = None) -> str:
    corrupted = [r for r in rows if r["corruption"] != CLEAN]
    top = max(severities)
    lines = ["# Covariate shift (the paper's Table 1 layout)", "",
             "Top-1 accuracy in %. Cells: mean +- std over the classifiers of a recipe (their seeds); each "
             "classifier's value is the mean over the corruptions (and severities). DE = DiffAug-Ensemble, "
             "DDA-SE = mean softmax of the image and its DDA adaptation.", ""]
    if frost:
        lines += [f"Frost (corrupted on the fly) blends {frost}.", ""]
    lines += _mode_table(rows, modes, lambda r: r["corruption"] != CLEAN and r["severity"] == top,
                         f"Corrupted, severity {top}")
    if len(severities) > 1:
        lines += _mode_table(rows, modes, lambda r: r["corruption"] != CLEAN,
                             f"Corrupted, mean over severities {', '.join(map(str, severities))}")
    lines += _mode_table(rows, modes, lambda r: r["corruption"] == CLEAN, "Clean")
    names = list(dict.fromkeys(r["corruption"] for r in corrupted))
    if names:
        lines += ["## Per corruption (mean over severities)", "",
                  "| recipe | mode | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
        for recipe, clfs in _by_recipe(corrupted):
            for m, label in TABLE_COLUMNS:
                if m not in modes:
                    continue
                cells = [100 * statistics.fmean(r["accuracy"] for r in corrupted if r["recipe"] == recipe
                                                and r["mode"] == m and r["corruption"] == name) for name in names]
                lines.append(f"| {recipe} | {label} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
        lines += [""]
    lines += ["## Wall-clock per image (seconds, mean over all conditions)", "",
              "| recipe | " + " | ".join(lbl for m, lbl in TABLE_COLUMNS if m in modes) + " |",
              "|" + "---|" * (1 + sum(m in modes for m, _ in TABLE_COLUMNS))]
    for recipe, _ in _by_recipe(rows):
        cells = [statistics.fmean(r["seconds_per_image"] for r in rows if r["recipe"] == recipe and r["mode"] == m)
                 for m, _ in TABLE_COLUMNS if m in modes]
        lines.append(f"| {recipe} | " + " | ".join(f"{v:.2e}" for v in cells) + " |")
    text = "\n".join(lines) + "\n"
    write_text(out / "table.md", text)
    return text


def _plot(path: Path, series: dict, xlabel: str, ylabel: str, title: str) -> None:
    """``series[label] = (xs, means, stds)`` as lines with std bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, means, stds) in series.items():
        ax.plot(xs, means, marker="o", ms=3, label=label)
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _series(rows, x_key, y_key, group_keys):
    """Mean and std over classifiers of a recipe, per group and x."""
    out = {}
    for group in dict.fromkeys(tuple(r[k] for k in group_keys) for r in rows):
        mine = [r for r in rows if tuple(r[k] for k in group_keys) == group]
        xs = sorted({r[x_key] for r in mine})
        vals = [[r[y_key] for r in mine if r[x_key] == x] for x in xs]
        out[" ".join(str(g) for g in group)] = (xs, [statistics.fmean(v) for v in vals],
                                                 [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals])
    return out


def run_eval_shift(*, data: str, classifiers: list[str], denoiser: str | None, modes="default,de,dda,dda-se",
                   corruptions="all", severities="1-5", limit: int | None = None, seed: int = 0,
                   out: str | Path, device: str = "cpu", batch_size: int = 256, de_step: int = 50,
                   dda_t: int | None = None, dda_steps: int = 50, dda_scale: float = 6.0,
                   dda_downsample: int | None = None, dda_norm: str = "image", analyses: bool = True,
                   progress: bool = True, speed=None, frost_images: str | Path | None = None,
                   image_size: int | None = None, workers: int | None = None) -> str:
    """The CLI's job: every classifier x mode x corruption x severity (+ clean), sharded over torchrun ranks.

    Writes ``out/results.csv``, ``out/table.md`` and, with ``analyses``, ``de_vs_t.{csv,png}`` and
    ``entropy_vs_t.{csv,png}``. Returns the table text (empty on ranks other than 0). ``frost_images``: a folder
    of frost photographs for on-the-fly ``frost`` (the reference's); without it a procedural texture stands in,
    and the table says which was used.

    Data: ``digits`` / CIFAR-10 and CIFAR-10-C are held in memory (as before; ``limit``: a fixed random subset); an
    ImageNet-C folder is streamed condition by condition and an image folder's test images are streamed and
    corrupted batch by batch, through a DataLoader with ``workers`` processes, so memory is bounded by the batch
    (``limit``: a fixed, seed 0, class-stratified sample, as ``certify --limit``). Images are brought to the
    classifiers' input size (``image_size``, default the size their ``model.json`` records) by the evaluation
    transform; classes are matched by name (:mod:`diffaug.evaldata`).
    """
    from tqdm.auto import tqdm

    from .corruptions import check_frost_images, corrupt
    from .data import load_corrupted
    from .ensemble import ensemble_members
    from .evaldata import at_size, batches, chunks, eval_size, eval_view, open_eval_folder, probe
    from .harness import init_distributed

    out = Path(out)
    device = torch.device(device)
    frost_images = check_frost_images(frost_images)
    modes, severities, layout, names, test, models, den = _check_inputs(
        data, classifiers, denoiser, modes, corruptions, severities, limit, batch_size, device, analyses, speed,
        workers)
    size = eval_size(models, image_size)
    if den is not None and size is not None:  # a convolutional denoiser runs at the classifiers' size (ADM-256 at 224)
        den = den.at_size(size)
    members = ensemble_members(de_step)
    dda_kwargs = {"t_start": dda_t or (den.num_timesteps // 2 if den else 500), "steps": dda_steps,
                  "guidance_scale": dda_scale, "downsample": dda_downsample, "norm": dda_norm}
    if den is not None:
        from .dda import dda_timesteps

        if not 0 < dda_kwargs["t_start"] < den.num_timesteps:
            raise InputError(f"--dda-t must lie in (0, {den.num_timesteps}), got {dda_kwargs['t_start']}")
        dda_timesteps(dda_kwargs["t_start"], dda_steps)
        if dda_norm not in ("image", "batch"):
            raise InputError(f"--dda-norm must be image or batch, got {dda_norm!r}")
        bad = [t for t in members if t >= den.num_timesteps]
        if bad:
            raise InputError(f"DE members {bad} exceed the denoiser's T = {den.num_timesteps}; use a smaller step")
    channels = next(iter(models.values())).spec.get("channels", 3)
    streamed = test is None and layout != "cifar10-c"
    clean = None  # a streamed folder's clean test images (lazy)
    if test is not None:  # in memory, as before (resized only when the classifiers were trained at another size)
        keep = _subset(len(test), limit)
        clean_images, clean_labels = at_size(test.images[keep], size).to(device), test.labels[keep]
        models = _check_shapes(models, den, clean_images, None, test.num_classes, str(data))  # by count
    elif layout == "cifar10-c":
        probe_set = load_corrupted(data, names[0], severities[0])
        models = _check_shapes(models, den, at_size(probe_set.images[:1], size), None, probe_set.num_classes,
                               f"{data} ({names[0]})")  # by count, as before
    elif layout == "imagenet-c":
        from .data import class_folders, open_corrupted

        first = open_corrupted(data, names[0], severities[0], channels=channels)
        reference_classes = first.classes  # every condition is labelled in this order
        models = _check_shapes(models, den, probe(eval_view(first, size)).to(device), first.classes,
                               first.num_classes, f"{data} ({names[0]})")
        for c in names:  # every condition's folder exists, before any work
            for sev in severities:
                folder = Path(data) / c / str(sev)
                if not folder.is_dir():
                    present = sorted(int(d.name) for d in folder.parent.iterdir() if d.is_dir() and d.name.isdigit())
                    raise InputError(f"{folder} is missing (ImageNet-C layout is corruption/severity/class/image); "
                                     f"pass --severities with those present ({','.join(map(str, present)) or 'none'})")
                extra = [k for k in class_folders(folder) if k not in set(reference_classes)]
                if extra:
                    raise InputError(f"{folder} has classes {', '.join(extra[:5])} that {data}/{names[0]}/"
                                     f"{severities[0]} lacks; every condition needs the same class folders")
    else:
        clean = eval_view(open_eval_folder(data, models, channels=channels,
                                           verbose=progress and int(os.environ.get("RANK", "0")) == 0),
                          size)
        keep = _stratified_subset(clean.labels, limit)
        models = _check_shapes(models, den, probe(clean).to(device), clean.classes, clean.num_classes, str(data))
    conditions = ([(CLEAN, 0)] if not layout else []) + [(c, s) for c in names for s in severities]

    def shard_batches(ds, keep_c, shard, what: str):
        """``(x, y, b)`` for the batches ``b`` of ``ds[keep_c]`` that ``shard(b)`` selects (all when None)."""
        nb = -(-len(keep_c) // batch_size)
        picked = [b for b in range(nb) if shard is None or shard(b)]
        if not picked:
            return
        idx = torch.cat([keep_c[b * batch_size : (b + 1) * batch_size] for b in picked])
        for (x, y), b in zip(batches(ds, batch_size, workers=workers, indices=idx, what=what), picked):
            yield accel.to_device(x, device), y, b

    def condition_batches(corruption: str, severity: int, shard=None):
        """The condition's ``(images on device, labels)`` batches; a streamed set's are ``(images, labels, b)``
        with ``b`` the batch index, only those ``shard(b)`` selects."""
        if layout == "cifar10-c":
            ds = load_corrupted(data, corruption, severity)
            keep_c = _subset(len(ds), limit)
            images = at_size(accel.to_device(ds.images[keep_c], device), size)
            yield from chunks(images, ds.labels[keep_c], batch_size)
            return
        if layout == "imagenet-c":
            ds = eval_view(open_corrupted(data, corruption, severity, channels=channels, classes=reference_classes),
                           size)
            yield from shard_batches(ds, _stratified_subset(ds.labels, limit), shard, f"{data}/{corruption}/{severity}")
            return
        if streamed:  # a folder's clean test images, corrupted batch by batch (a generator per batch)
            for x, y, b in shard_batches(clean, keep, shard, str(data)):
                if corruption != CLEAN:
                    gen = keyed_generator(seed, corruption, severity, "corrupt", b, device=device)
                    x = corrupt(x, corruption, severity, generator=gen, frost_images=frost_images)
                yield x, y, b
            return
        if corruption == CLEAN:
            yield from chunks(clean_images, clean_labels, batch_size)
            return
        gen = keyed_generator(seed, corruption, severity, "corrupt", device=device)
        yield from chunks(corrupt(clean_images, corruption, severity, generator=gen, frost_images=frost_images),
                          clean_labels, batch_size)

    dist_info = init_distributed(device)
    rows = []
    if streamed:  # ranks shard conditions and images: batch b of condition k goes to rank (k + b) % world
        work = [(cond, lambda b, k=k: (k + b) % dist_info.world == dist_info.rank) for k, cond in enumerate(conditions)]
    else:  # in memory: whole conditions per rank
        work = [(cond, None) for cond in conditions[dist_info.rank :: dist_info.world]]
    for (corruption, severity), shard in tqdm(work, disable=not (progress and dist_info.main), desc="eval-shift"):
        part = evaluate_condition(models, den, condition_batches(corruption, severity, shard), modes,
                                  members=members, dda_kwargs=dda_kwargs, seed=seed, key=(corruption, severity),
                                  batch_size=batch_size, device=device)
        rows += [r for r in part if r["n"]]  # a rank may hold no batch of a small condition
    out.mkdir(parents=True, exist_ok=True)
    if dist_info.world > 1:
        import torch.distributed as dist

        shard = out / f"rows.rank{dist_info.rank}.json"
        write_text(shard, json.dumps(rows))
        dist.barrier()
        if not dist_info.main:
            return ""
        rows = [r for k in range(dist_info.world) for r in json.loads((out / f"rows.rank{k}.json").read_text())]
        for k in range(dist_info.world):
            (out / f"rows.rank{k}.json").unlink()
    rows = merge_shards(rows)
    order = {cond: i for i, cond in enumerate(conditions)}
    rows.sort(key=lambda r: (order[(r["corruption"], r["severity"])], list(models).index(r["classifier"]),
                             MODES.index(r["mode"])))
    write_csv(out / "results.csv", rows)
    frost = None
    if not layout and "frost" in names:
        frost = f"the photographs in {frost_images}" if frost_images else "the procedural texture (no --frost-images)"
    text = write_tables(out, rows, modes, severities, frost=frost)
    if analyses:
        top = max(severities)
        de_rows = de_accuracy_vs_t(models, den, (((c, top), condition_batches(c, top)) for c in names), seed=seed,
                                   batch_size=batch_size, device=device)
        write_csv(out / "de_vs_t.csv", de_rows)
        _plot(out / "de_vs_t.png", _series(de_rows, "t_max", "accuracy", ("recipe", "step")), "largest member t",
              "DE accuracy", f"DE accuracy vs t, severity {top}, mean over {len(names)} corruptions (Fig. 12)")
        entropy_batches = condition_batches(CLEAN, 0) if not layout else condition_batches(names[0], top)
        ent_rows = entropy_vs_t(models, den, entropy_batches, seed=seed, batch_size=batch_size, device=device)
        write_csv(out / "entropy_vs_t.csv", ent_rows)
        _plot(out / "entropy_vs_t.png", _series(ent_rows, "t", "entropy", ("recipe",)), "t",
              "mean entropy (nats)", "prediction entropy on DiffAug views vs t (Fig. 2)")
        text += _analyses_text(de_rows, ent_rows)
        write_text(out / "table.md", text)
    return text


def _analyses_text(de_rows, ent_rows) -> str:
    common = sorted({r["t_max"] for r in de_rows if r["t_max"] % 150 == 0})  # on every step's grid
    lines = ["", "## DE accuracy vs largest member t (de_vs_t.png; % mean over classifiers)", "",
             "| recipe | step | " + " | ".join(f"t<={t}" for t in common) + " |", "|" + "---|" * (2 + len(common))]
    for label, (xs, means, stds) in _series([r for r in de_rows if r["t_max"] in common], "t_max", "accuracy",
                                            ("recipe", "step")).items():
        recipe, step = label.rsplit(" ", 1)
        lines.append(f"| {recipe} | {step} | " + " | ".join(f"{100 * m:.1f}" for m in means) + " |")
    lines += ["", "## Mean prediction entropy on DiffAug views vs t (entropy_vs_t.png)", ""]
    series = _series(ent_rows, "t", "entropy", ("recipe",))
    xs = next(iter(series.values()))[0]
    lines += ["| recipe | " + " | ".join(f"t={t}" for t in xs) + " |", "|" + "---|" * (len(xs) + 1)]
    for label, (_, means, stds) in series.items():
        lines.append(f"| {label} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    return "\n".join(lines) + "\n"
