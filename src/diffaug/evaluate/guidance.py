"""``diffaug eval-guidance``: the paper's Table 4 (guidance-classifier accuracy over random t), Figure 19
(accuracy against t for a clean classifier, noisy and DA classifiers) and the guided-generation comparison
(FID, IS-style score, precision, recall, target-class accuracy) for noisy vs DA guidance.

Guidance classifiers of the same kind are reported as mean +- std over them (their seeds). The judge for the
generation metrics is a small CNN trained on the real train split with ``seed`` (the feature network).

Data: ``digits`` / CIFAR-10 are held in memory (as before). An image folder (``train/`` + ``val/``, or one folder
split as ``diffaug train`` splits it) is streamed: the test images go through a DataLoader batch by batch at the
guidance classifiers' size (``Resize`` + ``CenterCrop``, the view they were trained on), and the generation metrics
take seeded, class-stratified samples of at most ``REFERENCE_IMAGES`` test images (the real set) and
``JUDGE_IMAGES`` train images (the judge's training set) through the loader, so memory is bounded by those
numbers, not by the folder.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import InputError
from ..tables import JobResult, lookup, markdown_table, mean_std, summarize
from ..utils.checkpoint import write_json, write_text
from ..utils.figures import save_figure

# a streamed folder's bounded samples for the generation metrics (class-stratified, seeded)
REFERENCE_IMAGES = 2000  # real test images the generated ones are compared with
JUDGE_IMAGES = 2000  # train images the judge (feature network) is fitted on
PR_NEIGHBOURS = 3  # k of improved precision / recall (Kynkaanniemi et al.)


def _load_guidance(guidance, denoiser, data, clean_classifier, device, speed, workers) -> SimpleNamespace:
    """The denoiser, the guidance classifiers (keyed by folder), the clean classifier and the test data (in memory,
    or a streamed folder's batches), before any work."""
    from ..classifier import load_classifier
    from ..data import check_workers, is_in_memory, load_dataset
    from ..denoiser import load_denoiser
    from ..guidance import GuidanceClassifier

    check_workers(workers)
    den = load_denoiser(denoiser, device=device, speed=speed)
    models = {str(folder): GuidanceClassifier.from_pretrained(folder, den, speed=speed) for folder in guidance}
    clean = load_classifier(clean_classifier, device=device, speed=speed) if clean_classifier else None
    if is_in_memory(data):  # as before: the whole (small) test split in memory
        from .sets import check_denoiser_on

        train, test = load_dataset(data, "train"), load_dataset(data, "test")
        for name, g in models.items():  # trained on other data: say so before the denoiser's view of it
            if g.spec["num_classes"] != train.num_classes or g.spec["channels"] != test.images.shape[1]:
                raise InputError(f"guidance classifier {name} was trained on {g.spec['num_classes']} classes of "
                                 f"{g.spec['channels']}-channel images, {data} has {train.num_classes} of "
                                 f"{test.images.shape[1]}; evaluate it on the data it was trained on (--data "
                                 f"{g.spec.get('data', '...')})")
        check_denoiser_on(den, test.images[:1], str(data))
        images, labels = test.images.to(device), test.labels.to(device)
        return SimpleNamespace(den=den, models=models, clean=clean, clean_size=None, images=images, labels=labels,
                               test_batches=None, num_classes=train.num_classes, channels=train.images.shape[1],
                               train=train, real_images=images, splits=None, view=None)
    den, splits, clean, clean_size = _streamed_setup(data, den, models, clean, clean_classifier)
    view = _test_view(splits["test"], den)
    return SimpleNamespace(den=den, models=models, clean=clean, clean_size=clean_size, images=None, labels=None,
                           test_batches=_batches(view, device, workers), num_classes=splits["train"].num_classes,
                           channels=den.channels, train=None, real_images=None, splits=splits, view=view)


class _CleanOnNoisy(torch.nn.Module):
    """A clean classifier seeing the noisy image mapped back to [0, 1] (resized to its square input size)."""

    def __init__(self, den, clean, clean_size):
        super().__init__()
        self.denoiser, self.clean, self.clean_size = den, clean, clean_size

    def forward(self, x_t, t):
        from ..denoiser import Denoiser

        x = Denoiser.decode(x_t).clamp(0, 1)
        if self.clean_size is not None and tuple(x.shape[-2:]) != (self.clean_size, self.clean_size):
            from torchvision.transforms.v2.functional import resize

            x = resize(x, [self.clean_size, self.clean_size], antialias=True)  # the square view at its input size
        return self.clean(x)


def _accuracy_rows(s: SimpleNamespace, clean_classifier, seed: int, device) -> dict:
    """``{name: {kind, accuracy, bins}}``: accuracy over random t of every guidance classifier and the clean one."""
    from ..guidance import accuracy_over_t

    def over_t(model):
        return accuracy_over_t(model, s.images, s.labels, batches=s.test_batches,
                               generator=torch.Generator(device=device).manual_seed(seed))

    rows = {name: {"kind": _label(g), **over_t(g)} for name, g in s.models.items()}
    if s.clean is not None:
        rows[str(clean_classifier)] = {"kind": "clean", **over_t(_CleanOnNoisy(s.den, s.clean, s.clean_size))}
    return rows


def _generation_rows(s: SimpleNamespace, data, per_class, steps, scale, sampler, variance, seed, out, device,
                     progress, workers) -> tuple[dict, str]:
    """``({name: {kind, fid, is, precision, recall, accuracy}}, the real set's description)``: guided samples of
    every guidance classifier (grids written to ``out``), judged by a small CNN trained on the real train split."""
    from tqdm.auto import tqdm

    from ..classifier import create_classifier, fit_classifier
    from ..data import is_in_memory
    from ..genmetrics import generation_metrics
    from ..guidance import guided_sample

    train, real_images, real_set = s.train, s.real_images, "Real set: the test split."
    if not is_in_memory(data):  # bounded, seeded, class-stratified samples read through the loader
        from ..data import read_sample

        train = read_sample(s.splits["train"], s.view.transforms[0], JUDGE_IMAGES, seed=seed, workers=workers)
        real_images = read_sample(s.splits["test"], s.view.transforms[0], REFERENCE_IMAGES, seed=seed,
                                  workers=workers).images.to(device)
        real_set = (f"Real set: a class-stratified sample of {len(real_images)} test images (seed {seed}); the "
                    f"judge was trained on a class-stratified sample of {len(train)} train images.")
    judge = fit_classifier(create_classifier("small_cnn", s.num_classes, s.channels, seed=seed),
                           train, generator=torch.Generator().manual_seed(seed), device=device)
    y = torch.arange(s.num_classes, device=device).repeat_interleave(per_class)
    gen_rows = {}
    for name, g in tqdm(s.models.items(), disable=not progress, desc="guided sampling"):
        samples = guided_sample(s.den, g, y, steps=steps, scale=scale, sampler=sampler, variance=variance,
                                generator=torch.Generator(device=device).manual_seed(seed))
        gen_rows[name] = {"kind": _label(g), **generation_metrics(judge, real_images, samples, y, PR_NEIGHBOURS)}
        _save_grid(samples, y, out / f"samples_{g.kind}_{Path(name).name}.png")
    return gen_rows, real_set


def guidance_tables(rows: list[dict], gen_rows: list[dict], *, seed: int, sampler: str, steps: int, scale: float,
                    per_class: int, real_set: str, variance: str = "posterior") -> str:
    """The Markdown of ``table.md``: ``rows`` (accuracy over t, one per classifier) and ``gen_rows`` (generation
    metrics, one per guidance classifier; the second table only when there are any), by kind."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    acc = summarize(rows, "kind", "classifier", "accuracy")
    lines = ["# Guidance classifiers", "",
             f"## Test accuracy over random t (the paper's Table 4; 3 draws per test image, seed {seed})", ""]
    lines += markdown_table(["classifier (n)", "accuracy %"], [[f"{s['kind']} ({s['n']})", mean_std(s["values"])]
                                                               for s in acc])
    if not gen_rows:
        return "\n".join(lines) + "\n"
    metrics = {m: summarize(gen_rows, "kind", "classifier", m) for m in ("fid", "is", "precision", "recall",
                                                                          "accuracy")}
    formats = {"fid": (1, 2), "is": (1, 2), "precision": (1, 3), "recall": (1, 3), "accuracy": (100.0, 1)}
    cells = []
    for kind in [k for k in kinds if k != "clean"]:
        per = {m: lookup(summary, kind=kind) for m, summary in metrics.items()}
        cells.append([f"{kind} ({per['fid']['n']})", *(mean_std(per[m]["values"], *formats[m]) for m in formats)])
    how = f"{sampler}{', learned variance' if variance == 'learned' and sampler == 'ddpm' else ''}"
    lines += ["", f"## Guided generation ({how}, {steps} steps, scale {scale}, {per_class} per class)", "",
              "Feature network and judge: a small CNN trained on the real train split (Inception weights cannot be "
              "fetched here), so FID / IS are in its feature space. " + real_set, ""]
    lines += markdown_table(["guidance (n)", "FID (lower better)", "IS-style", "precision", "recall", "accuracy %"],
                            cells)
    return "\n".join(lines) + "\n"


def run_eval_guidance(*, guidance: list[str], denoiser: str, data: str = "digits", clean_classifier: str | None = None,
                      per_class: int = 50, steps: int = 100, scale: float = 1.0, sampler: str = "ddpm",
                      variance: str = "posterior", seed: int = 0, out: str | Path, device: str = "cpu",
                      generation: bool = True,
                      progress: bool = True, speed=None, workers: int | None = None) -> JobResult:
    """The CLI's job: accuracy over t of every guidance classifier (and of ``clean_classifier``), guided
    generation metrics, table, plot and sample grids in ``out``. ``workers``: DataLoader processes of a streamed
    folder (None: min(8, CPUs)).

    Returns a :class:`~diffaug.tables.JobResult`: ``rows`` one per classifier (``classifier``, ``kind``,
    ``accuracy``, ``bins``), ``extra["generation"]`` one per guidance classifier (``classifier``, ``kind`` and the
    generation metrics; empty without ``generation``), and the table text."""
    device = torch.device(device)
    if per_class < 2:
        raise InputError(f"--per-class must be >= 2 (covariances need two samples), got {per_class}")
    s = _load_guidance(guidance, denoiser, data, clean_classifier, device, speed, workers)
    if generation:
        from ..guidance import guided_timesteps

        guided_timesteps(s.den, steps=steps, scale=scale, sampler=sampler, variance=variance)  # refused before work
        real = len(s.real_images) if s.real_images is not None else min(len(s.splits["test"]), REFERENCE_IMAGES)
        if real <= PR_NEIGHBOURS:
            raise InputError(f"{data} has {real} test images; the generation metrics need more than {PR_NEIGHBOURS} "
                             "(precision / recall neighbours): add test images or pass --no-generation")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    acc = _accuracy_rows(s, clean_classifier, seed, device)
    gen, real_set = {}, "Real set: the test split."
    if generation and s.models:
        gen, real_set = _generation_rows(s, data, per_class, steps, scale, sampler, variance, seed, out, device,
                                         progress, workers)
    write_json(out / "results.json", {"accuracy_over_t": acc, "generation": gen,
                                      "settings": {"per_class": per_class, "steps": steps, "scale": scale,
                                                   "sampler": sampler, "variance": variance, "seed": seed}})
    _plot_bins(acc, out / "accuracy_vs_t.png")
    rows = [{"classifier": name, **r} for name, r in acc.items()]
    gen_rows = [{"classifier": name, **r} for name, r in gen.items()]
    text = guidance_tables(rows, gen_rows, seed=seed, sampler=sampler, steps=steps, scale=scale, per_class=per_class,
                           real_set=real_set, variance=variance)
    write_text(out / "table.md", text)
    return JobResult(text, rows, {"generation": gen_rows})


def _streamed_setup(data, den, models: dict, clean, clean_name):
    """A folder's splits and the denoiser at the guidance classifiers' size (they must agree); the clean
    classifier matched to the folder's classes by name, and its input size."""
    from ..classifier import input_size
    from ..data import open_splits
    from ..data.files import check_colour_kept
    from .sets import match_classes

    sizes = {name: tuple(g.spec["image_size"]) for name, g in models.items()}
    if len(set(sizes.values())) > 1:
        raise InputError("the guidance classifiers were trained at different image sizes ("
                         + ", ".join(f"{n}: {s[0]}x{s[1]}" for n, s in sizes.items()) + "); evaluate them separately")
    size = next(iter(sizes.values()))
    if size[0] != size[1]:
        raise InputError(f"guidance classifiers trained on {size[0]}x{size[1]} images cannot be fed a folder's "
                         "square views; train them on square images")
    den = den.at_size(size[0])
    splits = open_splits(data, channels=den.channels)
    check_colour_kept(splits["train"], den.channels, data)
    for name, g in models.items():
        if g.spec.get("classes") and list(g.spec["classes"]) != list(splits["test"].classes):
            raise InputError(f"guidance classifier {name} was trained on classes other than those of {data}; "
                             "evaluate it on the folder it was trained on")
    if clean is not None:
        clean = match_classes(clean, splits["test"].classes, splits["test"].num_classes, str(clean_name), str(data))
    return den, splits, clean, (input_size(clean) if clean is not None else None)


def _test_view(test, den):
    """A folder's test images as the guidance classifiers were trained on them (whole image, no flip)."""
    from ..data import SeededView, generative_transform

    return SeededView(test, generative_transform(den.image_size[0], flip=False))


def _batches(view, device, workers):
    """A function giving the view's ``(images, labels)`` batches on ``device`` (one pass per call)."""
    from ..data import make_loader

    loader = make_loader(view, 512, workers=workers)

    def batches():
        return ((x.to(device), y.to(device)) for x, y in loader)
    return batches


def _label(g) -> str:
    """``noisy``, ``da``, or e.g. ``da 10% labels + consistency`` for semi-supervised runs."""
    frac = g.spec.get("labelled_fraction", 1.0)
    if frac >= 1:
        return g.kind
    return f"{g.kind} {100 * frac:g}% labels" + (" + consistency" if g.spec.get("consistency_weight") else "")


def _save_grid(samples, y, path):
    from ..utils.figures import save_grid

    per = int((y == y[0]).sum())
    order = torch.argsort(y, stable=True)
    grid = samples[order].reshape(-1, per, *samples.shape[1:])[:, : min(per, 10)].flatten(0, 1)
    save_grid(grid, path, nrow=min(per, 10))


def _plot_bins(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["kind"] for r in rows.values()):
        mine = [r for r in rows.values() if r["kind"] == kind]
        xs = [(b["t_from"] + b["t_to"]) / 2 for b in mine[0]["bins"]]
        ys = [statistics.fmean(r["bins"][i]["accuracy"] for r in mine) for i in range(len(xs))]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{kind} ({len(mine)})")
    ax.set_xlabel("t")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs noise level (Fig. 19)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
