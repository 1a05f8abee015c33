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

import dataclasses
import json
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

from ..corruptions import ALL_CORRUPTIONS, CORRUPTIONS, parse_corruptions, parse_severities
from ..errors import InputError
from ..tables import JobResult, lookup, markdown_table, mean_std, summarize
from ..utils import accel
from ..utils.checkpoint import write_csv, write_text
from ..utils.figures import save_figure

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
    from ..classifier import load_classifier
    from ..data import check_workers, corrupted_layout, corrupted_names, is_in_memory, load_dataset, subset_classes
    from ..denoiser import load_denoiser
    from .sets import folder_keys, trained_subset

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
        if corruptions == "none":
            raise InputError(f"{data} holds corrupted images only ({layout}): --corruptions none leaves nothing to "
                             "score; name the corruptions (or all)")
        if corruptions in ("all", "all+extra", "extra"):
            wanted = parse_corruptions(corruptions)
            names = tuple(n for n in wanted if n in available) or available
            missing = [n for n in wanted if n not in available]
            if missing and len(missing) < len(wanted):  # some of the set present: a partial download?
                print(f"warning: {data} holds {len(names)} of the {len(wanted)} corruptions of --corruptions "
                      f"{corruptions}; missing {', '.join(missing)} (a partial download?): the means are over the "
                      f"{len(names)} present", file=sys.stderr)
            elif missing:  # none of them: a folder of the user's own corruptions, scored as found
                print(f"warning: {data} holds none of the {len(wanted)} corruptions of --corruptions {corruptions}; "
                      f"scoring the {len(names)} it holds ({', '.join(names)}): its means are not ImageNet-C's",
                      file=sys.stderr)
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
    subset = trained_subset(models, data)  # classifiers trained with --classes: the classes of data they know
    if subset and test is not None:
        test = subset_classes(test, subset)
    if analyses and not names:
        raise InputError("the analyses (DE accuracy vs t under corruption) need corruptions; pass --no-analyses "
                         "with --corruptions none")
    needs = [m for m in modes if m != "default"] + (["the analyses (or pass --no-analyses)"] if analyses else [])
    if needs and not denoiser:
        raise InputError(f"{', '.join(needs)} need --denoiser")
    den = load_denoiser(denoiser, device=device, speed=speed) if needs else None
    return modes, severities, layout, names, test, models, den, subset


def _check_shapes(models, den, images: torch.Tensor, classes, num_classes: int, source: str) -> dict:
    """Check channels, classes and the denoiser on a probe batch at the evaluation size; returns the models, each
    scored on the set's classes (:func:`diffaug.evaluate.sets.match_classes`)."""
    from .sets import check_denoiser_on, match_classes

    for name, model in models.items():
        if model.spec.get("channels", images.shape[1]) != images.shape[1]:
            raise InputError(f"classifier {name} takes {model.spec['channels']}-channel images, {source} has "
                             f"{images.shape[1]}")
    matched = {name: match_classes(model, classes, num_classes, name, source) for name, model in models.items()}
    if den is not None:
        check_denoiser_on(den, images[:1], source, "or evaluate --modes default with --no-analyses")
    return matched


def _subset(n: int, limit: int | None) -> torch.Tensor:
    """A fixed (seed 0) random subset of ``limit`` indices, the same for every --seed and run (in-memory sets)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return order[:limit].sort().values if limit else torch.arange(n)


def _stratified_subset(labels: torch.Tensor, limit: int | None) -> torch.Tensor:
    """A streamed set's ``limit`` images: a fixed (seed 0, the same for every --seed and run) class-stratified
    sample (:func:`diffaug.data.stratified_sample`, as ``certify --limit``), sorted; all images without a limit."""
    from ..data import stratified_sample

    if not limit:
        return torch.arange(len(labels))
    return torch.as_tensor(stratified_sample(labels.numpy(), limit, seed=0), dtype=torch.long)


@torch.no_grad()
def evaluate_condition(models: dict, den, batches, modes, *, members, dda_kwargs: dict, seed: int, key: tuple,
                       batch_size: int, device: str | torch.device = "cpu") -> list[dict]:
    """Accuracy and seconds per image of every classifier x mode on one condition, given as ``(images, labels)``
    batches of (already corrupted) images on ``device`` (:func:`diffaug.evaluate.sets.chunks` of a tensor): the DE /
    DDA draws continue from batch to batch. Batches given as ``(images, labels, b)`` (a stream, perhaps a shard of
    it) draw from generators keyed by the batch index ``b`` instead, so a batch's numbers do not depend on which
    rank evaluates it."""
    from ..dda import dda_adapt
    from ..ensemble import ensemble_probs, ensemble_views

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
    from ..ensemble import ensemble_probs, ensemble_views

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
    from ..ensemble import ensemble_probs, ensemble_views

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
def _recipes(rows) -> list[str]:
    return list(dict.fromkeys(r["recipe"] for r in rows))


def _mode_table(rows, modes, select, title) -> list[str]:
    """Rows = recipes (mean +- std over their classifiers), columns = modes + Avg; each classifier's value is the
    mean accuracy over the selected conditions."""
    mine = [r for r in rows if select(r)]
    if not mine:
        return []
    cols = [(m, label) for m, label in TABLE_COLUMNS if m in modes]
    summary = summarize(mine, ("recipe", "mode"), "classifier", "accuracy")
    cells = []
    for recipe in _recipes(mine):
        per = {m: lookup(summary, recipe=recipe, mode=m)["values"] for m, _ in cols}
        n = len(per[cols[0][0]])
        avg = [statistics.fmean(per[m][i] for m, _ in cols) for i in range(n)]
        cells.append([f"{recipe} ({n})", *(mean_std(per[m]) for m, _ in cols), mean_std(avg)])
    return [f"## {title}", ""] + markdown_table(["recipe (n classifiers)", *(lbl for _, lbl in cols), "Avg"],
                                                cells) + [""]


def shift_tables(rows: list[dict], modes, severities, frost: str | None = None) -> str:
    """The Markdown of ``table.md`` (without the analyses) from the rows of ``results.csv``."""
    corrupted = [r for r in rows if r["corruption"] != CLEAN]
    top = max(severities)
    cols = [(m, label) for m, label in TABLE_COLUMNS if m in modes]
    lines = ["# Covariate shift (the paper's Table 1 layout)", "",
             "Top-1 accuracy in %. Cells: mean +- std over the classifiers of a recipe (their seeds); each "
             "classifier's value is the mean over the corruptions (and severities). DE = DiffAug-Ensemble, "
             "DDA-SE = mean softmax of the image and its DDA adaptation.", ""]
    names = list(dict.fromkeys(r["corruption"] for r in corrupted))
    if names and set(names) != set(CORRUPTIONS):  # say what the means are over when not ImageNet-C's 15
        lines += [f"Corrupted means are over {len(names)} corruptions: {', '.join(names)} "
                  f"({len(set(names) & set(CORRUPTIONS))} of the 15 standard).", ""]
    if frost:
        lines += [f"Frost (corrupted on the fly) blends {frost}.", ""]
    lines += _mode_table(rows, modes, lambda r: r["corruption"] != CLEAN and r["severity"] == top,
                         f"Corrupted, severity {top}")
    if len(severities) > 1:
        lines += _mode_table(rows, modes, lambda r: r["corruption"] != CLEAN,
                             f"Corrupted, mean over severities {', '.join(map(str, severities))}")
    lines += _mode_table(rows, modes, lambda r: r["corruption"] == CLEAN, "Clean")
    if names:  # every row of a recipe x mode x corruption (its classifiers and severities) counts once
        summary = summarize(corrupted, ("recipe", "mode", "corruption"), ("classifier", "severity"), "accuracy")
        cells = [[recipe, label, *(f"{100 * lookup(summary, recipe=recipe, mode=m, corruption=c)['mean']:.1f}"
                                   for c in names)] for recipe in _recipes(corrupted) for m, label in cols]
        lines += ["## Per corruption (mean over severities)", ""] + markdown_table(["recipe", "mode", *names],
                                                                                  cells) + [""]
    summary = summarize(rows, ("recipe", "mode"), ("classifier", "corruption", "severity"), "seconds_per_image")
    cells = [[recipe, *(f"{lookup(summary, recipe=recipe, mode=m)['mean']:.2e}" for m, _ in cols)]
             for recipe in _recipes(rows)]
    lines += ["## Wall-clock per image (seconds, mean over all conditions)", ""] + \
        markdown_table(["recipe", *(lbl for _, lbl in cols)], cells)
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows: list[dict], modes, severities, frost: str | None = None) -> str:
    """Write :func:`shift_tables` to ``out/table.md``; returns the text."""
    text = shift_tables(rows, modes, severities, frost)
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


def _series(rows, x_key, y_key, group_keys) -> dict:
    """``{label: (xs, means, stds)}``: mean and std over the classifiers, per group (label: its keys joined by
    spaces) and x (sorted)."""
    points = {}
    for s in summarize(rows, (*group_keys, x_key), "classifier", y_key):
        points.setdefault(" ".join(str(s[k]) for k in group_keys), []).append((s[x_key], s["mean"], s["std"]))
    return {label: tuple(list(v) for v in zip(*sorted(p))) for label, p in points.items()}


def _dda_settings(den, members, dda_t, dda_steps, dda_scale, dda_downsample, dda_norm) -> dict:
    """DDA's keyword arguments, checked (with the DE members) against the denoiser before any work."""
    dda_kwargs = {"t_start": dda_t or (den.num_timesteps // 2 if den else 500), "steps": dda_steps,
                  "guidance_scale": dda_scale, "downsample": dda_downsample, "norm": dda_norm}
    if den is not None:
        from ..dda import dda_timesteps

        if not 0 < dda_kwargs["t_start"] < den.num_timesteps:
            raise InputError(f"--dda-t must lie in (0, {den.num_timesteps}), got {dda_kwargs['t_start']}")
        dda_timesteps(dda_kwargs["t_start"], dda_steps)
        if dda_norm not in ("image", "batch"):
            raise InputError(f"--dda-norm must be image or batch, got {dda_norm!r}")
        bad = [t for t in members if t >= den.num_timesteps]
        if bad:
            raise InputError(f"DE members {bad} exceed the denoiser's T = {den.num_timesteps}; use a smaller step")
    return dda_kwargs


def _check_imagenet_c(data, names, severities, reference_classes) -> None:
    """Every condition's folder of an ImageNet-C layout exists with no class the first lacks, before any work."""
    from ..data import class_folders

    for c in names:
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


@dataclasses.dataclass
class _Source:
    """Where a run's conditions come from, and their batches (:meth:`condition_batches`)."""

    data: str
    layout: str | None
    names: tuple
    severities: tuple
    limit: int | None
    size: int | None
    channels: int
    seed: int
    batch_size: int
    device: torch.device
    workers: int | None
    frost_images: object
    clean: object = None  # a streamed folder's clean test images (lazy)
    keep: torch.Tensor | None = None
    clean_images: torch.Tensor | None = None
    clean_labels: torch.Tensor | None = None
    reference_classes: list | None = None
    on_bad_file: str = "error"
    subset: list | None = None  # the classes of data its classifiers were trained on (train --classes), if a subset

    @property
    def streamed(self) -> bool:
        return self.clean_images is None and self.layout != "cifar10-c"

    @property
    def conditions(self) -> list[tuple]:
        return ([(CLEAN, 0)] if not self.layout else []) + [(c, s) for c in self.names for s in self.severities]

    def open(self, test, models, den, progress: bool) -> dict:
        """Read or open the data and check the models on a probe batch; returns the models matched to its classes."""
        from ..data import load_corrupted, open_corrupted
        from .sets import at_size, eval_view, open_eval_folder, probe

        data, names, severities, size = self.data, self.names, self.severities, self.size
        if test is not None:  # in memory, as before (resized only when the classifiers were trained at another size)
            self.keep = _subset(len(test), self.limit)
            self.clean_images = at_size(test.images[self.keep], size).to(self.device)
            self.clean_labels = test.labels[self.keep]
            return _check_shapes(models, den, self.clean_images, None, test.num_classes, str(data))  # by count
        if self.layout == "cifar10-c":
            probe_set = load_corrupted(data, names[0], severities[0])
            return _check_shapes(models, den, at_size(probe_set.images[:1], size), None, probe_set.num_classes,
                                 f"{data} ({names[0]})")  # by count, as before
        if self.layout == "imagenet-c":
            first = open_corrupted(data, names[0], severities[0], channels=self.channels,
                                   on_bad_file=self.on_bad_file)
            self.reference_classes = first.classes  # every condition is labelled in this order
            models = _check_shapes(models, den, probe(eval_view(first, size)).to(self.device), first.classes,
                                   first.num_classes, f"{data} ({names[0]})")
            _check_imagenet_c(data, names, severities, self.reference_classes)
            return models
        folder = open_eval_folder(data, models, channels=self.channels, on_bad_file=self.on_bad_file,
                                  verbose=progress and int(os.environ.get("RANK", "0")) == 0)
        self.clean = eval_view(folder.with_classes(self.subset) if self.subset else folder, size)
        self.keep = _stratified_subset(self.clean.labels, self.limit)
        return _check_shapes(models, den, probe(self.clean).to(self.device), self.clean.classes,
                             self.clean.num_classes, str(data))

    def shard_batches(self, ds, keep_c, shard, what: str):
        """``(x, y, b)`` for the batches ``b`` of ``ds[keep_c]`` that ``shard(b)`` selects (all when None)."""
        from .sets import batches

        bs = self.batch_size
        picked = [b for b in range(-(-len(keep_c) // bs)) if shard is None or shard(b)]
        if not picked:
            return
        idx = torch.cat([keep_c[b * bs : (b + 1) * bs] for b in picked])
        for (x, y), b in zip(batches(ds, bs, workers=self.workers, indices=idx, what=what), picked):
            yield accel.to_device(x, self.device), y, b

    def condition_batches(self, corruption: str, severity: int, shard=None):
        """The condition's ``(images on device, labels)`` batches; a streamed set's are ``(images, labels, b)``
        with ``b`` the batch index, only those ``shard(b)`` selects."""
        from ..corruptions import corrupt
        from ..data import load_corrupted, open_corrupted
        from .sets import at_size, chunks, eval_view

        if self.layout == "cifar10-c":
            ds = load_corrupted(self.data, corruption, severity)
            keep_c = _subset(len(ds), self.limit)
            images = at_size(accel.to_device(ds.images[keep_c], self.device), self.size)
            yield from chunks(images, ds.labels[keep_c], self.batch_size)
            return
        if self.layout == "imagenet-c":
            ds = eval_view(open_corrupted(self.data, corruption, severity, channels=self.channels,
                                          on_bad_file=self.on_bad_file,
                                          classes=self.reference_classes), self.size)
            yield from self.shard_batches(ds, _stratified_subset(ds.labels, self.limit), shard,
                                          f"{self.data}/{corruption}/{severity}")
            return
        if self.streamed:  # a folder's clean test images, corrupted batch by batch (a generator per batch)
            for x, y, b in self.shard_batches(self.clean, self.keep, shard, str(self.data)):
                if corruption != CLEAN:
                    gen = keyed_generator(self.seed, corruption, severity, "corrupt", b, device=self.device)
                    x = corrupt(x, corruption, severity, generator=gen, frost_images=self.frost_images)
                yield x, y, b
            return
        if corruption == CLEAN:
            yield from chunks(self.clean_images, self.clean_labels, self.batch_size)
            return
        gen = keyed_generator(self.seed, corruption, severity, "corrupt", device=self.device)
        yield from chunks(corrupt(self.clean_images, corruption, severity, generator=gen,
                                  frost_images=self.frost_images), self.clean_labels, self.batch_size)


def _evaluate_conditions(src: _Source, models, den, modes, members, dda_kwargs, out: Path, progress: bool):
    """Every condition on this rank's share, gathered on rank 0 and merged, in the order conditions x classifiers
    x modes; None on the other ranks."""
    from tqdm.auto import tqdm

    from ..utils.distributed import SHARED_OUT_TIMEOUT, init_distributed

    dist_info = init_distributed(src.device, SHARED_OUT_TIMEOUT)  # shares meet only at the end
    rows = []
    conditions = src.conditions
    if src.streamed:  # ranks shard conditions and images: batch b of condition k goes to rank (k + b) % world
        work = [(cond, lambda b, k=k: (k + b) % dist_info.world == dist_info.rank) for k, cond in enumerate(conditions)]
    else:  # in memory: whole conditions per rank
        work = [(cond, None) for cond in conditions[dist_info.rank :: dist_info.world]]
    for (corruption, severity), shard in tqdm(work, disable=not (progress and dist_info.main), desc="eval-shift"):
        part = evaluate_condition(models, den, src.condition_batches(corruption, severity, shard), modes,
                                  members=members, dda_kwargs=dda_kwargs, seed=src.seed, key=(corruption, severity),
                                  batch_size=src.batch_size, device=src.device)
        rows += [r for r in part if r["n"]]  # a rank may hold no batch of a small condition
    out.mkdir(parents=True, exist_ok=True)
    if dist_info.world > 1:
        import torch.distributed as dist

        write_text(out / f"rows.rank{dist_info.rank}.json", json.dumps(rows))
        dist.barrier()
        if not dist_info.main:
            return None
        rows = [r for k in range(dist_info.world) for r in json.loads((out / f"rows.rank{k}.json").read_text())]
        for k in range(dist_info.world):
            (out / f"rows.rank{k}.json").unlink()
    rows = merge_shards(rows)
    order = {cond: i for i, cond in enumerate(conditions)}
    rows.sort(key=lambda r: (order[(r["corruption"], r["severity"])], list(models).index(r["classifier"]),
                             MODES.index(r["mode"])))
    return rows


def _run_analyses(src: _Source, models, den, out: Path) -> dict:
    """Figures 12 and 2: their rows (``de_vs_t``, ``entropy_vs_t``), CSVs and plots."""
    top, names = max(src.severities), src.names
    de_rows = de_accuracy_vs_t(models, den, (((c, top), src.condition_batches(c, top)) for c in names),
                               seed=src.seed, batch_size=src.batch_size, device=src.device)
    write_csv(out / "de_vs_t.csv", de_rows)
    _plot(out / "de_vs_t.png", _series(de_rows, "t_max", "accuracy", ("recipe", "step")), "largest member t",
          "DE accuracy", f"DE accuracy vs t, severity {top}, mean over {len(names)} corruptions (Fig. 12)")
    entropy_batches = src.condition_batches(CLEAN, 0) if not src.layout else src.condition_batches(names[0], top)
    ent_rows = entropy_vs_t(models, den, entropy_batches, seed=src.seed, batch_size=src.batch_size,
                            device=src.device)
    write_csv(out / "entropy_vs_t.csv", ent_rows)
    _plot(out / "entropy_vs_t.png", _series(ent_rows, "t", "entropy", ("recipe",)), "t",
          "mean entropy (nats)", "prediction entropy on DiffAug views vs t (Fig. 2)")
    return {"de_vs_t": de_rows, "entropy_vs_t": ent_rows}


def run_eval_shift(*, data: str, classifiers: list[str], denoiser: str | None, modes="default,de,dda,dda-se",
                   corruptions="all", severities="1-5", limit: int | None = None, seed: int = 0,
                   out: str | Path, device: str = "cpu", batch_size: int = 256, de_step: int = 50,
                   dda_t: int | None = None, dda_steps: int = 50, dda_scale: float = 6.0,
                   dda_downsample: int | None = None, dda_norm: str = "image", analyses: bool = True,
                   progress: bool = True, speed=None, frost_images: str | Path | None = None,
                   image_size: int | None = None, workers: int | None = None, on_bad_file: str = "error"
                   ) -> JobResult:
    """The CLI's job: every classifier x mode x corruption x severity (+ clean), sharded over torchrun ranks.

    Writes ``out/results.csv``, ``out/table.md`` and, with ``analyses``, ``de_vs_t.{csv,png}`` and
    ``entropy_vs_t.{csv,png}``. Returns a :class:`~diffaug.tables.JobResult`: the rows of ``results.csv``, the
    analyses' rows in ``extra`` (``de_vs_t``, ``entropy_vs_t``) and the table text (empty, with no rows, on ranks
    other than 0). ``frost_images``: a folder of frost photographs for on-the-fly ``frost`` (the reference's);
    without it a procedural texture stands in, and the table says which was used.

    Data: ``digits`` / CIFAR-10 and CIFAR-10-C are held in memory (as before; ``limit``: a fixed random subset); an
    ImageNet-C folder is streamed condition by condition and an image folder's test images are streamed and
    corrupted batch by batch, through a DataLoader with ``workers`` processes, so memory is bounded by the batch
    (``limit``: a fixed, seed 0, class-stratified sample, as ``certify --limit``). Images are brought to the
    classifiers' input size (``image_size``, default the size their ``model.json`` records) by the evaluation
    transform; classes are matched by name (:mod:`diffaug.evaluate.sets`).
    """
    from ..corruptions import check_frost_images
    from ..ensemble import ensemble_members
    from ..utils.distributed import local_device
    from .sets import eval_size

    out = Path(out)
    device = local_device(device)  # under torchrun: cuda:LOCAL_RANK
    frost_images = check_frost_images(frost_images)
    modes, severities, layout, names, test, models, den, subset = _check_inputs(
        data, classifiers, denoiser, modes, corruptions, severities, limit, batch_size, device, analyses, speed,
        workers)
    size = eval_size(models, image_size)
    if den is not None and size is not None:  # a convolutional denoiser runs at the classifiers' size (ADM-256 at 224)
        den = den.at_size(size)
    members = ensemble_members(de_step)
    dda_kwargs = _dda_settings(den, members, dda_t, dda_steps, dda_scale, dda_downsample, dda_norm)
    src = _Source(data, layout, names, severities, limit, size, next(iter(models.values())).spec.get("channels", 3),
                  seed, batch_size, device, workers, frost_images, on_bad_file=on_bad_file, subset=subset)
    models = src.open(test, models, den, progress)
    rows = _evaluate_conditions(src, models, den, modes, members, dda_kwargs, out, progress)
    if rows is None:
        return JobResult("", [])
    write_csv(out / "results.csv", rows)
    frost = None
    if not layout and "frost" in names:
        frost = f"the photographs in {frost_images}" if frost_images else "the procedural texture (no --frost-images)"
    text = write_tables(out, rows, modes, severities, frost=frost)
    extra = {}
    if analyses:
        extra = _run_analyses(src, models, den, out)
        text += _analyses_text(extra["de_vs_t"], extra["entropy_vs_t"])
        write_text(out / "table.md", text)
    return JobResult(text, rows, extra)


def _analyses_text(de_rows, ent_rows) -> str:
    common = sorted({r["t_max"] for r in de_rows if r["t_max"] % 150 == 0})  # on every step's grid
    cells = []
    for label, (xs, means, stds) in _series([r for r in de_rows if r["t_max"] in common], "t_max", "accuracy",
                                            ("recipe", "step")).items():
        recipe, step = label.rsplit(" ", 1)
        cells.append([recipe, step, *(f"{100 * m:.1f}" for m in means)])
    lines = ["", "## DE accuracy vs largest member t (de_vs_t.png; % mean over classifiers)", ""] + \
        markdown_table(["recipe", "step", *(f"t<={t}" for t in common)], cells)
    lines += ["", "## Mean prediction entropy on DiffAug views vs t (entropy_vs_t.png)", ""]
    series = _series(ent_rows, "t", "entropy", ("recipe",))
    xs = next(iter(series.values()))[0]
    lines += markdown_table(["recipe", *(f"t={t}" for t in xs)],
                            [[label, *(f"{m:.2f}" for m in means)] for label, (_, means, _) in series.items()])
    return "\n".join(lines) + "\n"
