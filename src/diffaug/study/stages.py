"""``diffaug study``: the paper's whole evaluation in one command, cached per stage, with a report people read.

Stages (in order; each writes ``DIR/stages/<name>/`` and its own tables and figures):

==============  ==========================================================================================
classifiers     one classifier per recipe x seed (``diffaug train``)
augmentations   the DiffAug grid (Figure 1)
shift           corruptions x severities with Default / DE / DDA / DDA-SE, DE vs t, entropy vs t (Tables 1, Fig. 2, 12)
ood             far-OOD detection (every classifier) and near-OOD detection (classifiers trained on half of the
                classes, the other half held out) with MSP / ReAct / ASH / SCALE (Table 3)
certify         certified L2 accuracy by denoised smoothing (Table 13)
guidance        noisy vs DA guidance classifiers, guided generation metrics (Table 4, Fig. 19)
semi            semi-supervised DA classifier vs supervised-only at a low label fraction
pag             gradient panels through the denoiser (Figure 3)
toy             the 2-D demonstration (Figure 5)
==============  ==========================================================================================

Data: the embedded digits (default) or CIFAR-10 in memory, or an image folder (``data`` / ``--data DIR``) that
every stage streams through :mod:`diffaug.data` at one image size (``image_size``, default the denoiser's),
checked with the folder's classes before any stage runs.

Caching: a stage's key is a hash of its settings, the keys of the stages it reads and the package version; a
stage whose ``stage.json`` holds the same key is not rerun, so a rerun after an interruption or a settings change
redoes only what changed (classifiers are cached one by one and resume from their checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..tables import mean_std, summarize
from ..utils.checkpoint import write_json, write_text
from ..utils.locking import exclusive

STAGES = ("classifiers", "augmentations", "shift", "ood", "certify", "guidance", "semi", "pag", "toy")
READS = {"shift": ("classifiers",), "ood": ("classifiers",), "certify": ("classifiers",), "pag": ("classifiers",
                                                                                                   "guidance")}


@dataclass
class StudyConfig:
    """Every setting of the study (``--config FILE`` is a JSON object with any of these keys)."""

    data: str = "digits"
    denoiser: str = "digits"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    recipes: list[str] = field(default_factory=lambda: ["plain", "diffaug", "augmix", "augmix+diffaug"])
    epochs: int = 8
    shift_limit: int = 40
    shift_corruptions: str = "all"
    shift_severities: str = "1-5"
    ood_sets: list[str] = field(default_factory=lambda: ["photo-patches", "noise"])
    ood_holdout_recipes: list[str] = field(default_factory=lambda: ["plain", "diffaug"])
    ood_id_classes: list[int] = field(default_factory=list)  # empty: the first half of the classes
    certify_recipes: list[str] = field(default_factory=lambda: ["plain", "diffaug"])
    # the paper also uses sigma = 1.0; on 8x8 digits that noise leaves the base classifier at chance (3-10 %)
    certify_sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5])
    certify_n0: int = 50
    certify_n: int = 500  # the most draws per image: sequential certification stops earlier when it can
    certify_limit: int = 50  # was 30 with fixed-n CERTIFY: the sequential certifier's saved time goes to images
    guidance_steps: int = 600
    guidance_per_class: int = 20
    guidance_sample_steps: int = 50
    semi_fraction: float = 0.05
    semi_steps: int = 250
    toy_steps: int = 2000
    device: str = "cpu"
    # an image folder as data (streamed by every stage):
    image_size: int | None = None  # the one size of every stage's images and models (None: the denoiser's size)
    batch_size: int | None = None  # classifiers' batch (None: 128, or all training images when fewer)
    workers: int | None = None  # DataLoader processes of every stage on a folder (None: min(8, CPUs)); no number
    # depends on it, so it is not part of any stage's cache key

    @classmethod
    def quick(cls) -> "StudyConfig":
        """A small configuration for smoke tests and CI: one seed, two recipes, tiny budgets."""
        return cls(seeds=[0], recipes=["plain", "diffaug"], epochs=1, shift_limit=12,
                   shift_corruptions="gaussian_noise,contrast,defocus_blur", shift_severities="5",
                   certify_sigmas=[0.5], certify_n0=10, certify_n=40, certify_limit=4, guidance_steps=40,
                   guidance_per_class=3, guidance_sample_steps=5, semi_steps=40, toy_steps=100)

    @classmethod
    def from_file(cls, path: str | Path | None, quick: bool = False) -> "StudyConfig":
        base = cls.quick() if quick else cls()
        if path is None:
            return base
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"config file {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
        if not isinstance(data, dict):
            raise InputError(f"config file {path} must hold a JSON object of settings")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(unknown)} in {path}; known: {', '.join(names)}")
        for key, value in data.items():
            want = type(getattr(base, key)) if getattr(base, key) is not None else int  # image_size, batch_size
            if value is None and getattr(base, key) is None:
                continue
            if not isinstance(value, want) and not (want is float and isinstance(value, int)):
                raise InputError(f"setting {key} in {path} must be a {want.__name__}, got {value!r}")
        return dataclasses.replace(base, **data)

    def validate(self) -> None:
        from ..recipes import RECIPES

        bad = [r for r in self.recipes if r not in RECIPES]
        if bad or not self.recipes:
            raise InputError(f"unknown recipe(s) {bad}; use {', '.join(RECIPES)}")
        if not self.seeds:
            raise InputError("give at least one seed")
        if "plain" not in self.recipes or "diffaug" not in self.recipes:
            raise InputError("the study compares recipes with plain and diffaug; keep both in recipes")
        for r in self.certify_recipes:
            if r not in self.recipes:
                raise InputError(f"certify recipe {r} is not among the trained recipes {self.recipes}")
        at_least = {"epochs": 1, "shift_limit": 1, "certify_n0": 1, "certify_n": 1, "certify_limit": 1,
                    "guidance_steps": 1, "guidance_per_class": 2, "guidance_sample_steps": 1, "semi_steps": 1,
                    "toy_steps": 1}
        for name, least in at_least.items():
            if getattr(self, name) < least:
                raise InputError(f"setting {name} must be >= {least}, got {getattr(self, name)}")
        if self.certify_n < self.certify_n0:
            raise InputError(f"setting certify_n (the most draws per image) must be >= certify_n0 "
                             f"({self.certify_n0}), got {self.certify_n}")
        if not 0 < self.semi_fraction < 1:
            raise InputError(f"setting semi_fraction must lie in (0, 1), got {self.semi_fraction}")
        if not self.certify_sigmas or any(not s > 0 for s in self.certify_sigmas):
            raise InputError(f"setting certify_sigmas must hold noise levels > 0, got {self.certify_sigmas}")
        if "plain" not in self.ood_holdout_recipes or "diffaug" not in self.ood_holdout_recipes:
            raise InputError("ood_holdout_recipes compares plain with diffaug; keep both")
        bad = [r for r in self.ood_holdout_recipes if r not in RECIPES]
        if bad:
            raise InputError(f"unknown ood_holdout_recipes {bad}; use {', '.join(RECIPES)}")
        if len(set(self.ood_id_classes)) != len(self.ood_id_classes) or any(c < 0 for c in self.ood_id_classes):
            raise InputError(f"ood_id_classes must be distinct class indices >= 0, got {self.ood_id_classes}")
        from ..data import check_workers

        check_workers(self.workers)


SETTINGS = {  # the settings each stage depends on (besides data and denoiser, and the stages it reads)
    "classifiers": ("seeds", "recipes", "epochs"),
    "augmentations": (),
    "shift": ("shift_limit", "shift_corruptions", "shift_severities"),
    "ood": ("seeds", "epochs", "ood_sets", "ood_holdout_recipes", "ood_id_classes"),
    "certify": ("certify_recipes", "certify_sigmas", "certify_n0", "certify_n", "certify_limit"),
    "guidance": ("seeds", "guidance_steps", "guidance_per_class", "guidance_sample_steps"),
    "semi": ("seeds", "semi_steps", "semi_fraction"),
    "pag": (),
    "toy": ("seeds", "toy_steps"),
}


# a stage whose numbers changed without a setting changing: its old cache entries are not reused
# a stage whose numbers changed for the same settings: ood 2, the ASH column is ASH-B (OpenOOD's) and OOD folders get
# the ID images' pre-processing; shift 1, DDA's low-pass up-samples with resize_right's kernel; classifiers 1, AugMix
# at the AugMix paper's ImageNet strength (torchvision severity 2, was 3)
REVISIONS = {"ood": 2, "shift": 1, "classifiers": 1}


def _key(stage: str, cfg: StudyConfig, upstream: dict[str, str]) -> str:
    from .. import __version__

    settings = {k: getattr(cfg, k) for k in ("data", "denoiser", *SETTINGS[stage])}
    settings.update({k: getattr(cfg, k) for k in ("image_size", "batch_size") if getattr(cfg, k) is not None})
    blob = json.dumps({"stage": stage, "settings": settings, "upstream": [upstream.get(s) for s in READS.get(stage, ())],
                       "version": __version__, **({"revision": REVISIONS[stage]} if stage in REVISIONS else {})},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _classifier_dirs(root: Path, cfg: StudyConfig, recipes=None) -> dict[tuple[str, int], Path]:
    folder = root / "stages" / "classifiers"
    return {(r, s): folder / f"{r.replace('+', '_')}-s{s}" for r in (recipes or cfg.recipes) for s in cfg.seeds}


# ---------------------------------------------------------------------- stages: each returns its numbers
def _trained_classifier(cfg: StudyConfig, recipe: str, seed: int, folder: Path, progress: bool,
                        classes: list[int] | None = None) -> dict:
    """Train one classifier into ``folder`` unless it is there (resuming from its checkpoints); its spec."""
    from ..data import is_in_memory
    from ..train.classifier import TrainConfig, train_classifier

    if not (folder / "model.json").is_file():  # written last
        resume = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
        if folder.exists() and not resume:
            shutil.rmtree(folder)
        extra = {}
        if not is_in_memory(cfg.data):  # a folder, streamed: the study's crop size and a batch the folder can fill
            extra = {"image_size": cfg.image_size, "batch_size": cfg.batch_size or _folder_batch(cfg.data, classes),
                     "workers": cfg.workers}
        train_classifier(TrainConfig(data=cfg.data, recipe=recipe, epochs=cfg.epochs, seed=seed, classes=classes,
                                     denoiser=cfg.denoiser if "diffaug" in recipe else None, **extra),
                         folder, resume=resume, device=cfg.device, progress=progress)
    return json.loads((folder / "model.json").read_text())


def _folder_batch(data: str, classes: list[int] | None, batch: int = 128) -> int:
    """``batch`` (TrainConfig's default), or the number of training images of a smaller folder."""
    from ..data import open_splits

    train = open_splits(data)["train"]
    return min(batch, len(train.with_classes(list(classes)) if classes is not None else train))


def stage_classifiers(cfg: StudyConfig, root: Path, out: Path, progress: bool) -> dict:
    accs = {}
    for (recipe, seed), folder in _classifier_dirs(root, cfg).items():
        accs.setdefault(recipe, []).append(_trained_classifier(cfg, recipe, seed, folder, progress)["test_acc"])
    write_text(out / "table.md", "\n".join(
        ["# Classifiers", "", f"{cfg.epochs} epochs each; clean test accuracy %, mean +- std over seeds {cfg.seeds}.",
         "", "| recipe | test accuracy % |", "|---|---|"] +
        [f"| {r} | {mean_std(v)} |" for r, v in accs.items()]) + "\n")
    return {"test_acc": accs}


def stage_augmentations(cfg: StudyConfig, root: Path, out: Path, progress: bool) -> dict:
    from .report import show_augmentations

    show_augmentations(cfg.denoiser, out / "augmentations.png", data=cfg.data, device=cfg.device,
                       image_size=cfg.image_size, workers=cfg.workers)
    return {}


def stage_shift(cfg: StudyConfig, root: Path, out: Path, progress: bool) -> dict:
    from ..evaluate.shift import run_eval_shift

    folders = [str(p) for p in _classifier_dirs(root, cfg).values()]
    res = run_eval_shift(data=cfg.data, classifiers=folders, denoiser=cfg.denoiser,
                         corruptions=cfg.shift_corruptions, severities=cfg.shift_severities, limit=cfg.shift_limit,
                         seed=0, out=out, device=cfg.device, progress=progress, workers=cfg.workers)
    rows = res.rows
    top = max(r["severity"] for r in rows)
    corrupted = [r for r in rows if r["corruption"] != "clean"]
    per = {}  # recipe -> mode -> [per-classifier mean accuracy at the top severity]
    for s in summarize([r for r in corrupted if r["severity"] == top], ("recipe", "mode"), "classifier", "accuracy"):
        per.setdefault(s["recipe"], {})[s["mode"]] = s["values"]
    secs = summarize(corrupted, "mode", ("classifier", "corruption", "severity"), "seconds_per_image")
    # DE views and DDA images are made once per condition for every classifier: one ratio per condition
    per_condition = {s["mode"]: dict(zip(map(tuple, s["over"]), s["values"]))
                     for s in summarize(corrupted, "mode", ("corruption", "severity"), "seconds_per_image")}
    ent = res.extra["entropy_vs_t"]
    t_late = sorted({r["t"] for r in ent})[-2]  # the last regular point (t = T - 1 is degenerate)
    entropy = _values_by(summarize([r for r in ent if r["t"] == t_late], "recipe", "classifier", "entropy"), "recipe")
    de, dda = per_condition.get("de", {}), per_condition.get("dda", {})
    return {"severity": top, "accuracy": per, "seconds_per_image": {s["mode"]: s["mean"] for s in secs},
            "dda_over_de": [dda[k] / de[k] for k in de if k in dda and de[k] > 0],
            "entropy_t": t_late, "entropy": entropy}


def _values_by(summary: list[dict], key: str) -> dict[str, list[float]]:
    """``{group: the per-item values}`` of a :func:`~diffaug.tables.summarize` grouped by the one ``key``."""
    return {s[key]: s["values"] for s in summary}


def _mean_auroc(rows: list[dict], group: str) -> dict[str, list[float]]:
    """recipe -> per classifier, the AUROC averaged over the paper's four scores and the group's sets."""
    from ..ood import PAPER_SCORES

    return _values_by(summarize([r for r in rows if r["score"] in PAPER_SCORES and r["group"] == group], "recipe",
                                "classifier", "auroc"), "recipe")


def _ood_classes(cfg: StudyConfig) -> tuple[int, list[int]]:
    """``(number of classes, in-distribution classes of the near-OOD classifiers)``; checked before any work."""
    from ..data import is_in_memory, load_dataset, open_splits

    if is_in_memory(cfg.data):
        num_classes = load_dataset(cfg.data, "test").num_classes
    else:  # a folder: its class folders (no image is read)
        num_classes = open_splits(cfg.data)["train"].num_classes
        if num_classes < 3:
            raise InputError(f"{cfg.data} has {num_classes} class{'es' if num_classes != 1 else ''}; the study's "
                             "near-OOD stage trains classifiers on two or more classes and holds at least one out, "
                             "so it needs a folder with at least 3 class folders")
    id_classes = cfg.ood_id_classes or list(range((num_classes + 1) // 2))
    if max(id_classes) >= num_classes or len(id_classes) >= num_classes:
        raise InputError(f"ood_id_classes {id_classes} must leave out at least one of the {num_classes} classes of "
                         f"{cfg.data} (indices 0..{num_classes - 1}); set ood_id_classes in the config")
    if len(id_classes) < 2:
        raise InputError(f"ood_id_classes {id_classes} must name at least two in-distribution classes (a classifier "
                         "of one class cannot rank anything); set ood_id_classes in the config")
    return num_classes, id_classes


def _resolved(cfg: StudyConfig) -> StudyConfig:
    """``cfg`` with the one image size of a study on an image folder (``image_size``, else the denoiser's),
    checked against the denoiser before any work; in-memory data (digits, CIFAR-10) unchanged."""
    from ..data import check_size, is_in_memory
    from ..denoiser import load_denoiser

    if is_in_memory(cfg.data):
        return cfg
    if not Path(cfg.data).is_dir():
        state = "is a file, not a folder" if Path(cfg.data).exists() else "does not exist"
        raise InputError(f"data folder {cfg.data} {state}; give `digits`, a CIFAR-10 folder or an image folder "
                         "(ROOT/train/<class>/ + ROOT/val/<class>/, or ROOT/<class>/)")
    den = load_denoiser(cfg.denoiser)
    if den.channels != 3:  # plain classifiers read a folder as RGB, DiffAug ones at the denoiser's channels
        raise InputError(f"a study on the image folder {cfg.data} needs an RGB denoiser trained on it; "
                         f"{cfg.denoiser} takes {den.channels}-channel images: set \"denoiser\" in --config to a "
                         f"folder from `diffaug train-diffusion --data {cfg.data}`")
    size = check_size(cfg.image_size) if cfg.image_size is not None else (den.image_size or (None,))[0]
    if size is None:
        raise InputError(f"denoiser {cfg.denoiser} has no fixed image size; set image_size in the study config")
    try:
        den.at_size(size)
    except InputError as e:
        raise InputError(f"setting image_size {size}: {e}") from None
    return dataclasses.replace(cfg, image_size=size)


def stage_ood(cfg: StudyConfig, root: Path, out: Path, progress: bool) -> dict:
    from ..evaluate.ood import run_eval_ood

    num_classes, id_classes = _ood_classes(cfg)
    folders = [str(p) for p in _classifier_dirs(root, cfg).values()]
    far = run_eval_ood(data=cfg.data, classifiers=folders, ood=cfg.ood_sets, seed=0, out=out / "all-classes",
                       device=cfg.device, workers=cfg.workers)
    held = []
    for recipe in cfg.ood_holdout_recipes:
        for seed in cfg.seeds:
            folder = out / "holdout" / f"{recipe.replace('+', '_')}-s{seed}"
            _trained_classifier(cfg, recipe, seed, folder, progress, classes=id_classes)
            held.append(str(folder))
    near = run_eval_ood(data=cfg.data, classifiers=held, ood=["holdout", *cfg.ood_sets], seed=0,
                        out=out / "holdout" / "eval", device=cfg.device, workers=cfg.workers)
    held_out = [c for c in range(num_classes) if c not in id_classes]

    def body(table: str) -> list[str]:  # under a heading of its own: one level deeper, without the title
        return ["#" + ln if ln.startswith("#") else ln for ln in table.splitlines()[1:]]

    write_text(out / "table.md", "\n".join([
        "# OOD detection", "", "## Far-OOD: the classifiers of the classifiers stage (all classes in-distribution)",
        *body(far.text), "", f"## Near-OOD: classifiers trained on classes {id_classes} only ({cfg.epochs} epochs, "
        f"seeds {cfg.seeds}); near-OOD = test images of classes {held_out}", *body(near.text)]) + "\n")
    return {"auroc": _mean_auroc(far.rows, "far"), "near_auroc": _mean_auroc(near.rows, "near"),
            "id_classes": id_classes}


def stage_certify(cfg: StudyConfig, root: Path, out: Path, progress: bool) -> dict:
    from ..evaluate.certify import best_sigma_curves, run_certify, table_radii
    from ..evaluate.sets import folder_keys

    dirs = _classifier_dirs(root, cfg, cfg.certify_recipes)
    # Sequential certification: at most certify_n draws per image, the same guarantee as fixed-n CERTIFY. At n = 500
    # it uses 1.85x fewer evaluations and, with images pooled into shared forward passes, 1.82x less wall time
    # (benchmarks/bench_certify.py --stage), spent on 50 images instead of 30 (README).
    res = run_certify(data=cfg.data, classifiers=[str(p) for p in dirs.values()], denoiser=cfg.denoiser,
                      sigmas=cfg.certify_sigmas, n0=cfg.certify_n0, n=cfg.certify_n, alpha=0.001, batch_size=500,
                      skip=1, limit=cfg.certify_limit, seed=0, out=out, device=cfg.device, progress=progress,
                      sequential=True, workers=cfg.workers)
    # One number per classifier without picking a radius: the best-sigma curve averaged over the table's radii
    # (a single radius can saturate: n samples cap the radius at sigma * Phi^-1(alpha ** (1 / n))).
    radii = table_radii(cfg.certify_sigmas)
    best = best_sigma_curves(res.rows)  # keyed as run_certify keys its classifiers
    acc = {}
    for (recipe, _), key in zip(dirs, folder_keys(dirs.values())):
        acc.setdefault(recipe, []).append(float(best[key].mean()))
    return {"radii": radii, "certified_accuracy": acc}


def stage_guidance(cfg: StudyConfig, root: Path, out: Path, progress: bool) -> dict:
    from ..evaluate.guidance import run_eval_guidance
    from ..train.guidance import GuidanceTrainConfig, train_guidance

    folders = []
    for seed in cfg.seeds:
        for kind in ("noisy", "da"):
            folder = out / f"{kind}-s{seed}"
            if not (folder / "metrics.json").is_file():  # written last
                shutil.rmtree(folder, ignore_errors=True)
                train_guidance(GuidanceTrainConfig(kind=kind, data=cfg.data, denoiser=cfg.denoiser,
                                                   steps=cfg.guidance_steps, seed=seed, checkpoint_every=10**9,
                                                   image_size=cfg.image_size, workers=cfg.workers),
                               folder, device=cfg.device, progress=progress)
            folders.append(str(folder))
    clean = _classifier_dirs(root, cfg, ["plain"])[("plain", cfg.seeds[0])] if (root / "stages" / "classifiers").is_dir() else None
    res = run_eval_guidance(guidance=folders, denoiser=cfg.denoiser, data=cfg.data,
                            clean_classifier=str(clean) if clean and (clean / "model.safetensors").is_file() else None,
                            per_class=cfg.guidance_per_class, steps=cfg.guidance_sample_steps, seed=0,
                            out=out / "eval", device=cfg.device, progress=progress, workers=cfg.workers)
    gen = {}
    for m in ("fid", "is", "precision", "recall", "accuracy"):
        for kind, values in _values_by(summarize(res.extra["generation"], "kind", "classifier", m), "kind").items():
            gen.setdefault(kind, {})[m] = values
    return {"accuracy_over_t": _values_by(summarize(res.rows, "kind", "classifier", "accuracy"), "kind"),
            "generation": gen}


def stage_semi(cfg: StudyConfig, root: Path, out: Path, progress: bool) -> dict:
    from ..train.guidance import GuidanceTrainConfig, train_guidance

    acc, bins = {}, {}
    for seed in cfg.seeds:
        for name, weight in (("supervised", 0.0), ("consistency", 1.0)):
            folder = out / f"{name}-s{seed}"
            if not (folder / "metrics.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                train_guidance(GuidanceTrainConfig(kind="da", data=cfg.data, denoiser=cfg.denoiser,
                                                   steps=cfg.semi_steps, seed=seed, checkpoint_every=10**9,
                                                   labelled_fraction=cfg.semi_fraction, consistency_weight=weight,
                                                   image_size=cfg.image_size, workers=cfg.workers),
                               folder, device=cfg.device, progress=progress)
            metrics = json.loads((folder / "metrics.json").read_text())
            acc.setdefault(name, []).append(metrics["accuracy"])
            bins.setdefault(name, []).append([b["accuracy"] for b in metrics["bins"]])
            labelled = json.loads((folder / "guidance.json").read_text())["labelled_images"]
    edges = [b["t_from"] for b in metrics["bins"]]
    lines = ["# Semi-supervised DA guidance classifier", "",
             f"{labelled} labelled train images ({100 * cfg.semi_fraction:g} %, stratified), the rest unlabelled; "
             f"{cfg.semi_steps} steps; test accuracy % over random t (3 draws per image), mean +- std over seeds "
             f"{cfg.seeds}, and per t-bin (from t).", "",
             "| classifier | accuracy % | " + " | ".join(f"t>={e}" for e in edges) + " |",
             "|" + "---|" * (2 + len(edges))]
    for name, label in (("supervised", "labelled only"), ("consistency", "+ temporal consistency")):
        per_bin = [_bin_cell([b[k] for b in bins[name]]) for k in range(len(edges))]
        lines.append(f"| {label} | {mean_std(acc[name])} | " + " | ".join(per_bin) + " |")
    write_text(out / "table.md", "\n".join(lines) + "\n")
    return {"fraction": cfg.semi_fraction, "accuracy": acc}


def _bin_cell(values: list[float | None]) -> str:
    """A t-bin's accuracy over seeds as ``mean +- std`` (%); a seed whose bin drew no test image (None, on a small
    test split) is left out, and a bin no seed drew is ``-``."""
    drawn = [v for v in values if v is not None]
    return mean_std(drawn, digits=0) if drawn else "-"


def stage_pag(cfg: StudyConfig, root: Path, out: Path, progress: bool) -> dict:
    from ..evaluate.pag import run_pag

    dirs = _classifier_dirs(root, cfg, ["plain", "diffaug"])
    seed = cfg.seeds[0]
    guid = root / "stages" / "guidance"
    guidance = [str(guid / f"{k}-s{seed}") for k in ("noisy", "da")] if (guid / f"noisy-s{seed}").is_dir() else []
    run_pag(classifiers=[str(dirs[("plain", seed)]), str(dirs[("diffaug", seed)])], guidance=guidance,
            denoiser=cfg.denoiser, data=cfg.data, out=out / "pag.png", device=cfg.device, workers=cfg.workers)
    return {}


def stage_toy(cfg: StudyConfig, root: Path, out: Path, progress: bool) -> dict:
    from .toy import toy_demo

    per_seed = [toy_demo(out / f"toy-s{s}.png", steps=cfg.toy_steps, seed=s) for s in cfg.seeds]
    rows = {}
    for res in per_seed:
        for r in res["per_t"]:
            rows.setdefault(str(r["t"]), {"noisy": [], "one_step": []})
            rows[str(r["t"])]["noisy"].append(r["noisy"])
            rows[str(r["t"])]["one_step"].append(r["one_step"])
    write_text(out / "table.md", "\n".join(
        ["# Toy 2-D (two moons)", "", f"Mean distance to the data of noised points and of their one-step denoised "
         f"estimates ({cfg.toy_steps} training steps; mean +- std over seeds {cfg.seeds}).", "",
         "| t | noised x_t | one-step x0_hat |", "|---|---|---|"] +
        [f"| {t} | {mean_std(d['noisy'], scale=1, digits=3)} | {mean_std(d['one_step'], scale=1, digits=3)} |"
         for t, d in rows.items()]) + "\n")
    return {"distances": rows}


STAGE_FUNCTIONS = {name: globals()[f"stage_{name}"] for name in STAGES}


# ---------------------------------------------------------------------- claims
SPEED_CLAIM_MIN = 5.0  # the speed claim holds at DDA / DE >= 5x: within 2x of the paper's ~10x
FAMILY_LEVEL = 0.025  # Holm's family-wise level, one-sided: the per-claim rule's (a 95 % two-sided interval)


def _diff(a: list[float], b: list[float]) -> list[float]:
    """Paired differences ``a - b``: every stage lists an arm's values seed by seed, in the study's seed order."""
    if len(a) != len(b):
        raise ValueError(f"paired arms must hold one value per seed each, got {len(a)} and {len(b)} values")
    return [x - y for x, y in zip(a, b)]


def _claim(claim: str, paper: str, values: list[float] | None, unit: str = "", scale: float = 1.0,
           rule: str = "positive", spread: list[float] | None = None) -> dict:
    """One claim from its per-seed paired differences, oriented so that positive is the paper's direction.

    ``rule="positive"``: the claim holds when the 95 % paired-t interval over seeds lies above zero, is
    contradicted when it lies below, and is not settled otherwise (also with one seed, or when every seed gives
    the same difference: no interval); ``seeds_to_settle`` is the number of seeds that would settle it if mean
    and spread stayed as measured; ``p_one_sided`` the paired t-test's p-value for the paper's direction.
    ``rule="ratio"`` (the speed claim, one pooled measurement; ``spread``: the ratio per condition): holds at
    >= :data:`SPEED_CLAIM_MIN`. A value that is not a finite number (a NaN from a failed stage) leaves the claim
    "not computable".
    """
    from ..stats import one_sided_p, paired_t_interval, seeds_to_settle

    if rule not in ("positive", "ratio"):
        raise ValueError(f"unknown claim rule {rule!r}; use positive or ratio")
    base = {"claim": claim, "paper": paper, "unit": unit, "rule": rule, "ci95": None, "seeds_to_settle": None,
            "p_one_sided": None}
    if not values:
        return {**base, "measured": None, "holds": None, "verdict": "not run"}
    vals = [scale * v for v in values]
    if not all(math.isfinite(v) for v in vals):
        return {**base, "measured": None, "holds": False, "verdict": "not computable",
                "values": [str(v) for v in vals]}
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    measured = {"mean": mean, "std": std, "n_seeds": len(vals)}
    if rule == "ratio":
        verdict = "holds" if mean >= SPEED_CLAIM_MIN else "does not hold"
        if spread:
            measured["per_condition"] = {"n": len(spread), "min": min(spread), "median": statistics.median(spread),
                                         "max": max(spread)}
        return {**base, "measured": measured, "holds": verdict == "holds", "verdict": verdict}
    ci95 = paired_t_interval(vals)
    verdict = ("holds" if ci95 and ci95[0] > 0 else "contradicted" if ci95 and ci95[1] < 0 else "not settled")
    return {**base, "measured": measured, "holds": verdict == "holds", "ci95": list(ci95) if ci95 else None,
            "verdict": verdict, "seeds_to_settle": seeds_to_settle(mean, std) if verdict == "not settled" else None,
            "p_one_sided": one_sided_p(vals)}


def adjust_for_multiplicity(claims: list[dict]) -> list[dict]:
    """The claims with Holm's adjustment over every claim tested by an interval (``holm_p``, and ``holds_holm``:
    the adjusted p-value below :data:`FAMILY_LEVEL`, so that the chance of any false "holds" among them stays at
    most 2.5 %, the level each claim's own rule keeps alone)."""
    from ..stats import holm

    tested = [i for i, c in enumerate(claims) if c.get("p_one_sided") is not None]
    adjusted = dict(zip(tested, holm([claims[i]["p_one_sided"] for i in tested])))
    return [{**c, "holm_p": adjusted.get(i), "holds_holm": (adjusted[i] < FAMILY_LEVEL) if i in adjusted else None}
            for i, c in enumerate(claims)]


def build_claims(numbers: dict) -> list[dict]:
    """The paper's claims with this run's numbers (paired by seed). A difference claim holds when its 95 %
    paired-t interval over seeds excludes zero in the paper's direction; the speed claim holds at >= 5x (within 2x
    of the paper's ~10x)."""
    claims = []
    sh = numbers.get("shift")
    if sh:
        acc = sh["accuracy"]
        claims.append(_claim("DiffAug training raises accuracy under corruption (Default, severity "
                             f"{sh['severity']}, diffaug - plain)", "Table 1: higher ImageNet-C accuracy with "
                             "DiffAug for every recipe (tested here on plain)",
                             _diff(acc["diffaug"]["default"], acc["plain"]["default"]), "points", 100))
        for recipe in ("plain", "diffaug"):
            if "de" in acc.get(recipe, {}):
                claims.append(_claim(f"DE beats Default under corruption ({recipe} classifiers, DE - Default)",
                                     "Table 1: DE > Default for every classifier",
                                     _diff(acc[recipe]["de"], acc[recipe]["default"]), "points", 100))
            if "dda" in acc.get(recipe, {}):
                claims.append(_claim(f"DE beats DDA under corruption ({recipe} classifiers, DE - DDA)",
                                     "Table 1: DE > DDA", _diff(acc[recipe]["de"], acc[recipe]["dda"]), "points", 100))
        secs = sh["seconds_per_image"]
        if "de" in secs and "dda" in secs:
            claims.append(_claim("DE is about an order of magnitude faster than DDA (seconds per image, DDA / DE, "
                                 "pooled over every classifier and condition)", "Table 10: ~10x on an A40 GPU",
                                 [secs["dda"] / secs["de"]], "x", rule="ratio", spread=sh.get("dda_over_de")))
        ent = sh["entropy"]
        claims.append(_claim(f"DiffAug-trained classifiers are less confident on heavily diffused images (entropy "
                             f"at t = {sh['entropy_t']}, diffaug - plain)", "Fig. 2: higher entropy at large t",
                             _diff(ent["diffaug"], ent["plain"]), "nats"))
    if numbers.get("ood"):
        a = numbers["ood"]["auroc"]
        claims.append(_claim("DiffAug training improves far-OOD detection (AUROC, mean of MSP/ReAct/ASH/SCALE, "
                             "diffaug - plain)", "Table 3: higher AUROC with DiffAug", _diff(a["diffaug"], a["plain"]),
                             "points", 100))
        a = numbers["ood"]["near_auroc"]
        claims.append(_claim("DiffAug training improves near-OOD detection (held-out classes, AUROC, mean of "
                             "MSP/ReAct/ASH/SCALE, diffaug - plain)", "Table 3: higher AUROC with DiffAug",
                             _diff(a["diffaug"], a["plain"]), "points", 100))
    if numbers.get("certify"):
        c = numbers["certify"]["certified_accuracy"]
        radii = numbers["certify"]["radii"]
        claims.append(_claim(f"DiffAug training improves certified accuracy under denoised smoothing (best sigma, "
                             f"mean over r = {radii[0]:g}, {radii[1]:g}, ..., {radii[-1]:g}; diffaug - plain)",
                             "Table 13: higher certified accuracy with DiffAug", _diff(c["diffaug"], c["plain"]),
                             "points", 100))
    if numbers.get("guidance"):
        g = numbers["guidance"]
        claims.append(_claim("DA guidance classifiers are more accurate than noisy ones over random t (da - noisy)",
                             "Table 4: DA > noisy", _diff(g["accuracy_over_t"]["da"], g["accuracy_over_t"]["noisy"]),
                             "points", 100))
        gen = g["generation"]
        if "da" in gen and "noisy" in gen:
            claims.append(_claim("DA guidance improves generation quality (FID, noisy - da; feature space of a "
                                 "digits CNN)", "Section 5: lower FID with DA guidance",
                                 _diff(gen["noisy"]["fid"], gen["da"]["fid"])))
            claims.append(_claim("DA guidance makes samples of the target class more often (accuracy, da - noisy)",
                                 "Section 5: higher accuracy with DA guidance",
                                 _diff(gen["da"]["accuracy"], gen["noisy"]["accuracy"]), "points", 100))
    if numbers.get("semi"):
        a = numbers["semi"]["accuracy"]
        claims.append(_claim(f"Temporal consistency helps a DA classifier with {100 * numbers['semi']['fraction']:g} "
                             "% labels (consistency - supervised only, accuracy over random t)",
                             "Section 5: semi-supervised DA classifier improves", _diff(a["consistency"],
                                                                                       a["supervised"]), "points", 100))
    if numbers.get("toy"):
        d = numbers["toy"]["distances"]
        t = sorted(d, key=int)[len(d) // 2]
        claims.append(_claim(f"One-step denoising moves noised points towards the data (toy, t = {t}, distance "
                             "noised - one-step)", "Fig. 5", _diff(d[t]["noisy"], d[t]["one_step"])))
    return claims


# ---------------------------------------------------------------------- orchestration and report
def run_study(cfg: StudyConfig, out: str | Path, *, only: str | None = None, progress: bool = True) -> dict:
    """Run (or reuse) every stage, then write ``report.md``, ``report.html`` and ``results.json``."""
    cfg.validate()
    if only is not None and only not in STAGES:
        raise InputError(f"unknown stage {only!r}; use one of {', '.join(STAGES)}")
    cfg = _resolved(cfg)
    _ood_classes(cfg)
    out = Path(out)
    with exclusive(out):  # one study per folder: a second one would delete the stage folders this one writes
        return _run_stages(cfg, out, only, progress)


def _run_stages(cfg: StudyConfig, out: Path, only: str | None, progress: bool) -> dict:
    import resource

    (out / "stages").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    keys, numbers, timing = {}, {}, {}
    wanted = set(STAGES) if only is None else {only, *READS.get(only, ())}
    for stage in STAGES:
        key = _key(stage, cfg, keys)
        keys[stage] = key
        folder = out / "stages" / stage
        record = folder / "stage.json"
        done = json.loads(record.read_text()) if record.is_file() else None
        if done and done["key"] == key:
            numbers[stage], timing[stage] = done["numbers"], done["seconds"]
            if progress:
                print(f"[study] {stage}: cached ({done['seconds']:.0f} s when run)")
            continue
        if stage not in wanted:
            continue
        pending = folder / "pending.json"
        if done or (pending.is_file() and json.loads(pending.read_text())["key"] != key):
            shutil.rmtree(folder)  # settings changed: nothing of the old stage is reused
        folder.mkdir(parents=True, exist_ok=True)
        write_json(pending, {"key": key})
        t0 = time.perf_counter()
        result = STAGE_FUNCTIONS[stage](cfg, out, folder, progress)
        seconds = time.perf_counter() - t0
        write_json(record, {"key": key, "seconds": seconds, "numbers": result})
        pending.unlink()
        numbers[stage], timing[stage] = result, seconds
        if progress:
            claims = build_claims({stage: result})
            found = f"; {sum(bool(c['holds']) for c in claims)} of {len(claims)} claims hold" if claims else ""
            print(f"[study] {stage}: done in {seconds:.0f} s{found}")
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    results = {"config": dataclasses.asdict(cfg), "stages": {s: {"key": keys[s], "seconds": timing.get(s),
                                                                  "numbers": numbers.get(s)} for s in STAGES},
               "claims": adjust_for_multiplicity([{**c, "stage": s} for s in STAGES if numbers.get(s)
                                                  for c in build_claims({s: numbers[s]})]),
               "seconds_this_run": time.perf_counter() - t_start,
               "seconds_all_stages": sum(v for v in timing.values() if v), "peak_memory_mib": peak / 1024}
    write_json(out / "results.json", results)
    write_report(out, results)
    return results


def _fmt_measured(c: dict) -> str:
    m, unit = c["measured"], f" {c['unit']}" if c["unit"] else ""
    if m is None:
        return "not computable (" + ", ".join(c["values"]) + ")" if c.get("values") else "not run"
    if c.get("rule") == "ratio":
        return f"{m['mean']:.2f}{unit} (one pooled measurement)"
    if m["n_seeds"] == 1:
        return f"{m['mean']:.2f}{unit} (n = 1: no spread)"
    return f"{m['mean']:.2f} +- {m['std']:.2f}{unit} (n = {m['n_seeds']})"


def _fmt_interval(c: dict) -> str:
    if c.get("ci95") is not None:
        return f"[{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"
    m = c.get("measured")
    if m is None:
        return "-"
    if c.get("rule") == "ratio":
        spread = m.get("per_condition")
        return (f"per condition {spread['min']:.1f}-{spread['max']:.1f}{c['unit']} (median {spread['median']:.1f}, "
                f"{spread['n']} conditions)" if spread else "-")
    if m["n_seeds"] > 1:
        return "- (no spread: every seed gave the same difference)"
    return "- (needs >= 2 seeds)"


def _fmt_verdict(c: dict) -> str:
    verdict = c.get("verdict", "n/a")
    if verdict == "holds":
        return "yes"
    if verdict != "not settled":
        return f"**{verdict}**"
    m, settle = c["measured"], c.get("seeds_to_settle")
    if m["n_seeds"] == 1:
        return "**not settled** (1 seed)"
    if c.get("ci95") is None:
        return "**not settled** (no spread to test: more seeds)"
    if settle and m["mean"] < 0:
        return f"**not settled**, leaning against (~{settle} seeds would settle it as contradicted)"
    if settle:
        return f"**not settled** (~{settle} seeds would settle it)"
    return "**not settled** (mean difference 0)" if m["mean"] == 0 else "**not settled** (over 10,000 seeds)"


def _fmt_holm(c: dict) -> str:
    if c.get("holm_p") is None:
        return "-"
    return f"{'yes' if c['holds_holm'] else 'no'} (p {c['holm_p']:.3f})"


_BUDGETS = ("epochs", "shift_limit", "certify_n", "certify_limit", "guidance_steps", "guidance_per_class",
            "guidance_sample_steps", "semi_steps", "toy_steps")


def _smaller_budgets(config: dict) -> list[str]:
    """The study's budgets that this run set below their defaults, as "name a (default b)"."""
    default = StudyConfig()
    return [f"{k} {config[k]} (default {getattr(default, k)})" for k in _BUDGETS
            if k in config and config[k] < getattr(default, k)]


def write_report(out: Path, results: dict) -> None:
    from .report import claims_forest_plot

    n_seeds = len(results["config"]["seeds"])
    lines = ["# DiffAug study", "",
             f"Data: {results['config']['data']}, denoiser: {results['config']['denoiser']}, seeds "
             f"{results['config']['seeds']}, recipes {', '.join(results['config']['recipes'])}. Total stage time "
             f"{results['seconds_all_stages']:.0f} s (this run {results['seconds_this_run']:.0f} s), peak memory "
             f"{results['peak_memory_mib']:.0f} MiB.", "",
             "## The paper's claims on this run", ""]
    if results["claims"]:
        claims_forest_plot(results["claims"], out / "claims.png")
        lines += ["![claims: paired difference (diffaug - baseline, oriented so that right of zero is the paper's "
                  "direction), dot = mean over seeds, bar = 95 % paired-t interval](claims.png)", ""]
    cfg = results["config"]
    tested = [c for c in results["claims"] if c.get("holm_p") is not None]
    smaller = _smaller_budgets(cfg)
    if smaller:
        lines += [f"**A reduced run** (budgets below the study's defaults: {', '.join(smaller)}): a smoke test of "
                  "the pipeline, not evidence for or against the paper's claims.", ""]
    lines += [f"Each difference is paired by training seed ({n_seeds} seed{'s' if n_seeds != 1 else ''}: "
              f"{cfg['seeds']}). A claim **holds** when the 95 % interval of its mean difference (Student's t over "
              "seeds, n - 1 degrees of freedom) excludes zero in the paper's direction, is **contradicted** when it "
              "excludes zero the other way, and is **not settled** otherwise (also when every seed gives the same "
              "difference, which a count metric can by chance). For those, the number of seeds that would settle "
              "it if mean and spread stayed as measured is given (a plug-in figure, not a power calculation: even "
              "then that many seeds may settle it in only about half of reruns; and adding seeds until a claim "
              "settles raises the chance of a false \"holds\"). The 95 % level is per claim" + (
                  f": with {len(tested)} claims tested together, the column \"after Holm\" keeps the chance of any "
                  f"false \"holds\" among them at most 2.5 % (Holm's step-down on the one-sided paired t-tests; "
                  f"{sum(bool(c['holds_holm']) for c in tested)} of them hold by that rule)" if tested else "") +
              ". The speed claim is one "
              f"pooled measurement (DE and DDA timed side by side on the same batches) and holds at >= "
              f"{SPEED_CLAIM_MIN:g}x. Intervals cover the spread over training seeds only: the evaluation images "
              f"are fixed (corruptions: {cfg.get('shift_limit')} test images per corruption and severity; "
              f"certification: {cfg.get('certify_limit')} test images), so they leave out the test-set sampling "
              "error. Nothing was tuned on the test split, except as in the paper: certified accuracy at each radius "
              "takes the best sigma on the test images, for both arms alike.", "",
              "| claim | paper | measured (mean +- std over seeds) | 95 % interval | holds here | after Holm |",
              "|---|---|---|---|---|---|"]
    for c in results["claims"]:
        lines.append(f"| {c['claim']} | {c['paper']} | {_fmt_measured(c)} | {_fmt_interval(c)} | {_fmt_verdict(c)} | "
                     f"{_fmt_holm(c)} |")
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    for s, info in results["stages"].items():
        seconds = "-" if info["seconds"] is None else f"{info['seconds']:.0f}"
        lines.append(f"| {s} | {seconds} |")
    for stage in STAGES:
        folder = out / "stages" / stage
        if not (folder / "stage.json").is_file():
            continue
        lines += ["", f"## Stage: {stage}", ""]
        tables = [folder / "table.md"] if (folder / "table.md").is_file() else sorted(folder.rglob("table.md"))
        for table in tables:
            body = table.read_text().splitlines()
            lines += [ln if not ln.startswith("#") else "#" * 2 + ln for ln in body] + [""]
        for img in sorted(folder.rglob("*.png")):
            if "samples_" in img.name and not img.name.endswith("s0.png"):
                continue
            lines.append(f"![{img.stem}]({img.relative_to(out)})")
    text = "\n".join(lines) + "\n"
    write_text(out / "report.md", text)
    write_text(out / "report.html", markdown_to_html(text, out))


def markdown_to_html(text: str, base: Path) -> str:
    """The report's small Markdown subset (headings, tables, images, paragraphs) as one self-contained HTML page;
    images are embedded as base64."""
    import base64
    import html
    import re

    body, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|(-+\|)+", r.replace(" ", ""))]
            cells = [[html.escape(c.strip()).replace("**", "") for c in r.strip("|").split("|")] for r in rows]
            # wide tables scroll inside the page instead of running off its right edge
            body.append("<div class='scroll'><table><tr>" + "".join(f"<th>{c}</th>" for c in cells[0]) + "</tr>" +
                        "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:]) +
                        "</table></div>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if m := re.match(r"(#+) (.*)", line):
            level = min(len(m.group(1)), 6)
            body.append(f"<h{level}>{html.escape(m.group(2))}</h{level}>")
        elif m := re.match(r"!\[(.*)\]\((.*)\)", line):
            data = base64.b64encode((base / m.group(2)).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(m.group(1))}</figcaption></figure>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}.scroll{overflow-x:auto;max-width:100%}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
             "white-space:nowrap}td:first-child{white-space:normal;min-width:18em}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>DiffAug study</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"
