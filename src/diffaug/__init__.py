"""diffaug: the DiffAug diffuse-and-denoise augmentation and the robustness studies built on it.

Public images are float tensors in [0, 1], shape ``[N, C, H, W]``.

The core names below are imported with the package; every other public module (``diffaug.ood``,
``diffaug.corruptions``, ``diffaug.dda``, ``diffaug.guidance``, ...) is imported on first use (PEP 562, as SciPy
does), so ``import diffaug`` stays as fast as the core and ``diffaug.ood.metrics(...)`` works without importing
``diffaug.ood`` by hand.
"""

import importlib

from .augment import DiffAug, diffuse_denoise
from .classifier import Classifier, create_classifier, load_classifier
from .denoiser import Denoiser, load_denoiser
from .ensemble import diffaug_ensemble
from .errors import InputError, StorageError
from .smoothing import ABSTAIN, Smooth

# modules reachable as attributes of the package, imported when first touched
SUBMODULES = (
    "accel", "adm", "augment", "certify", "checkpoint", "classifier", "cli", "corruptions", "data", "dda",
    "denoiser", "ensemble", "errors", "eval_guidance", "eval_ood", "eval_shift", "evaldata", "genmetrics",
    "guidance", "harness", "nets", "ood", "pag", "quality", "recipes", "report", "sampling", "schedule", "seeding",
    "sequential",
    "smoothing", "stats",
    "study", "tables", "toy", "train", "train_classifier", "train_guidance",
)
# public classes that live in modules imported on first use
_LAZY_NAMES = {"GuidanceClassifier": "guidance", "Recipe": "recipes", "Plain": "recipes",
               "DiffAugRecipe": "recipes", "AugMix": "recipes"}

__all__ = ["ABSTAIN", "DiffAug", "Smooth", "Denoiser", "InputError", "StorageError", "create_classifier",
           "diffaug_ensemble", "diffuse_denoise", "load_classifier", "load_denoiser", "Classifier",
           "GuidanceClassifier", "Recipe", "Plain", "DiffAugRecipe", "AugMix"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SUBMODULES) | set(_LAZY_NAMES))
