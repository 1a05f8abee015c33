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

import torch

from .checkpoint import write_json, write_text
from .errors import InputError
from .report import mean_std, save_figure

# a streamed folder's bounded samples for the generation metrics (class-stratified, seeded)
REFERENCE_IMAGES = 2000  # real test images the generated ones are compared with
JUDGE_IMAGES = 2000  # train images the judge (feature network) is fitted on


def run_eval_guidance(*, guidance: list[str], denoiser: str, data: str = "digits", clean_classifier: str | None = None,
                      per_class: int = 50, steps: int = 100, scale: float = 1.0, sampler: str = "ddpm",
                      seed: int = 0, out: str | Path, device: str = "cpu", generation: bool = True,
                      progress: bool = True, speed=None, workers: int | None = None) -> str:
    """The CLI's job: accuracy over t of every guidance classifier (and of ``clean_classifier``), guided
    generation metrics, table, plot and sample grids in ``out``; returns the table. ``workers``: DataLoader
    processes of a streamed folder (None: min(8, CPUs))."""
    from tqdm.auto import tqdm

    from .classifier import create_classifier, load_classifier
    from .data import check_workers, is_in_memory, load_dataset
    from .denoiser import Denoiser, load_denoiser
    from .genmetrics import generation_metrics
    from .guidance import GuidanceClassifier, guided_sample
    from .train import fit_classifier
    from .train_guidance import accuracy_over_t

    device = torch.device(device)
    if per_class < 2:
        raise InputError(f"--per-class must be >= 2 (covariances need two samples), got {per_class}")
    den = load_denoiser(denoiser, device=device, speed=speed)
    models = {}
    for folder in guidance:
        g = GuidanceClassifier.from_pretrained(folder, den, speed=speed)
        models[str(folder)] = g
    clean = load_classifier(clean_classifier, device=device, speed=speed) if clean_classifier else None
    if is_in_memory(data):  # as before: the whole (small) test split in memory
        train, test = load_dataset(data, "train"), load_dataset(data, "test")
        images, labels = test.images.to(device), test.labels.to(device)
        test_batches, clean_size = None, None
        num_classes, channels = train.num_classes, train.images.shape[1]
        real_images = images
    else:
        check_workers(workers)
        den, splits, clean, clean_size = _streamed_setup(data, den, models, clean, clean_classifier)
        images = labels = None
        view = _test_view(splits["test"], den)
        test_batches = _batches(view, device, workers)
        num_classes, channels = splits["train"].num_classes, den.channels
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    rows = {}
    for name, g in models.items():
        rows[name] = {"kind": _label(g), **accuracy_over_t(g, images, labels, batches=test_batches,
                                                        generator=torch.Generator(device=device).manual_seed(seed))}
    if clean is not None:
        class _Clean(torch.nn.Module):  # a clean classifier sees the noisy image mapped back to [0, 1]
            def __init__(self):
                super().__init__()
                self.denoiser = den

            def forward(self, x_t, t):
                x = Denoiser.decode(x_t).clamp(0, 1)
                if clean_size is not None and tuple(x.shape[-2:]) != (clean_size, clean_size):
                    from torchvision.transforms.v2.functional import resize

                    x = resize(x, [clean_size, clean_size], antialias=True)  # the square view at its input size
                return clean(x)

        rows[str(clean_classifier)] = {"kind": "clean", **accuracy_over_t(
            _Clean(), images, labels, batches=test_batches, generator=torch.Generator(device=device).manual_seed(seed))}

    models_for_generation = models if generation else {}
    judge, real_set = None, "Real set: the test split."
    if models_for_generation:
        if not is_in_memory(data):  # bounded, seeded, class-stratified samples read through the loader
            from .data import read_sample

            train = read_sample(splits["train"], view.transforms[0], JUDGE_IMAGES, seed=seed, workers=workers)
            real_images = read_sample(splits["test"], view.transforms[0], REFERENCE_IMAGES, seed=seed,
                                      workers=workers).images.to(device)
            real_set = (f"Real set: a class-stratified sample of {len(real_images)} test images (seed {seed}); the "
                        f"judge was trained on one of {len(train)} train images.")
        judge = fit_classifier(create_classifier("small_cnn", num_classes, channels, seed=seed),
                               train, generator=torch.Generator().manual_seed(seed), device=device)
    y = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    gen_rows = {}
    for name, g in tqdm(models_for_generation.items(), disable=not progress, desc="guided sampling"):
        samples = guided_sample(den, g, y, steps=steps, scale=scale, sampler=sampler,
                                generator=torch.Generator(device=device).manual_seed(seed))
        gen_rows[name] = {"kind": _label(g), **generation_metrics(judge, real_images, samples, y)}
        _save_grid(samples, y, out / f"samples_{g.kind}_{Path(name).name}.png")
    write_json(out / "results.json", {"accuracy_over_t": rows, "generation": gen_rows,
                                      "settings": {"per_class": per_class, "steps": steps, "scale": scale,
                                                   "sampler": sampler, "seed": seed}})
    _plot_bins(rows, out / "accuracy_vs_t.png")
    kinds = list(dict.fromkeys(r["kind"] for r in rows.values()))
    lines = ["# Guidance classifiers", "",
             f"## Test accuracy over random t (the paper's Table 4; 3 draws per test image, seed {seed})", "",
             "| classifier (n) | accuracy % |", "|---|---|"]
    for kind in kinds:
        vals = [r["accuracy"] for r in rows.values() if r["kind"] == kind]
        lines.append(f"| {kind} ({len(vals)}) | {mean_std(vals)} |")
    if not gen_rows:
        text = "\n".join(lines) + "\n"
        write_text(out / "table.md", text)
        return text
    lines += ["", f"## Guided generation ({sampler}, {steps} steps, scale {scale}, {per_class} per class)", "",
              "Feature network and judge: a small CNN trained on the real train split (Inception weights cannot be "
              "fetched here), so FID / IS are in its feature space. " + real_set, "",
              "| guidance (n) | FID (lower better) | IS-style | precision | recall | accuracy % |", "|---|---|---|---|---|---|"]
    for kind in [k for k in kinds if k != "clean"]:
        mine = [r for r in gen_rows.values() if r["kind"] == kind]
        cell = {m: [r[m] for r in mine] for m in ("fid", "is", "precision", "recall", "accuracy")}
        lines.append(f"| {kind} ({len(mine)}) | {mean_std(cell['fid'], 1, 2)} | {mean_std(cell['is'], 1, 2)} | "
                     f"{mean_std(cell['precision'], 1, 3)} | {mean_std(cell['recall'], 1, 3)} | "
                     f"{mean_std(cell['accuracy'])} |")
    text = "\n".join(lines) + "\n"
    write_text(out / "table.md", text)
    return text


def _streamed_setup(data, den, models: dict, clean, clean_name):
    """A folder's splits and the denoiser at the guidance classifiers' size (they must agree); the clean
    classifier matched to the folder's classes by name, and its input size."""
    from .classifier import input_size
    from .data import open_splits
    from .evaldata import match_classes

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
    for name, g in models.items():
        if g.spec.get("classes") and list(g.spec["classes"]) != list(splits["test"].classes):
            raise InputError(f"guidance classifier {name} was trained on classes other than those of {data}; "
                             "evaluate it on the folder it was trained on")
    if clean is not None:
        clean = match_classes(clean, splits["test"].classes, splits["test"].num_classes, str(clean_name), str(data))
    return den, splits, clean, (input_size(clean) if clean is not None else None)


def _test_view(test, den):
    """A folder's test images as the guidance classifiers were trained on them (whole image, no flip)."""
    from .data import SeededView, generative_transform

    return SeededView(test, generative_transform(den.image_size[0], flip=False))


def _batches(view, device, workers):
    """A function giving the view's ``(images, labels)`` batches on ``device`` (one pass per call)."""
    from .data import make_loader

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
    from .report import save_grid

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
