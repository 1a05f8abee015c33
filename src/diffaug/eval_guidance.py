"""``diffaug eval-guidance``: the paper's Table 4 (guidance-classifier accuracy over random t), Figure 19
(accuracy against t for a clean classifier, noisy and DA classifiers) and the guided-generation comparison
(FID, IS-style score, precision, recall, target-class accuracy) for noisy vs DA guidance.

Guidance classifiers of the same kind are reported as mean +- std over them (their seeds). The judge for the
generation metrics is a small CNN trained on the real train split with ``seed`` (the feature network).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from .checkpoint import write_json, write_text
from .errors import InputError
from .report import mean_std, save_figure


def run_eval_guidance(*, guidance: list[str], denoiser: str, data: str = "digits", clean_classifier: str | None = None,
                      per_class: int = 50, steps: int = 100, scale: float = 1.0, sampler: str = "ddpm",
                      seed: int = 0, out: str | Path, device: str = "cpu", generation: bool = True,
                      progress: bool = True, speed=None) -> str:
    from tqdm.auto import tqdm

    from .classifier import create_classifier, load_classifier
    from .data import load_dataset
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
    train, test = load_dataset(data, "train"), load_dataset(data, "test")
    images, labels = test.images.to(device), test.labels.to(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    rows = {}
    for name, g in models.items():
        rows[name] = {"kind": _label(g), **accuracy_over_t(g, images, labels,
                                                        generator=torch.Generator(device=device).manual_seed(seed))}
    if clean is not None:
        class _Clean(torch.nn.Module):  # a clean classifier sees the noisy image mapped back to [0, 1]
            def __init__(self):
                super().__init__()
                self.denoiser = den

            def forward(self, x_t, t):
                return clean(Denoiser.decode(x_t).clamp(0, 1))

        rows[str(clean_classifier)] = {"kind": "clean", **accuracy_over_t(
            _Clean(), images, labels, generator=torch.Generator(device=device).manual_seed(seed))}

    models_for_generation = models if generation else {}
    judge = None
    if models_for_generation:
        judge = fit_classifier(create_classifier("small_cnn", train.num_classes, train.images.shape[1], seed=seed),
                               train, generator=torch.Generator().manual_seed(seed), device=device)
    y = torch.arange(train.num_classes, device=device).repeat_interleave(per_class)
    gen_rows = {}
    for name, g in tqdm(models_for_generation.items(), disable=not progress, desc="guided sampling"):
        samples = guided_sample(den, g, y, steps=steps, scale=scale, sampler=sampler,
                                generator=torch.Generator(device=device).manual_seed(seed))
        gen_rows[name] = {"kind": _label(g), **generation_metrics(judge, images, samples, y)}
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
              "fetched here), so FID / IS are in its feature space. Real set: the test split.", "",
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
