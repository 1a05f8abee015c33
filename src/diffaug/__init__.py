"""diffaug: the DiffAug diffuse-and-denoise augmentation and the robustness studies built on it.

Public images are float tensors in [0, 1], shape ``[N, C, H, W]``.

The core names below are imported with the package; every other public module (``diffaug.ood``,
``diffaug.corruptions``, ``diffaug.dda``, ``diffaug.guidance``, ...) is imported on first use (PEP 562, as SciPy
does), so ``import diffaug`` stays as fast as the core and ``diffaug.ood.metrics(...)`` works without importing
``diffaug.ood`` by hand.
"""

from .augment import DiffAug, diffuse_denoise
from .classifier import Classifier, create_classifier, load_classifier
from .denoiser import Denoiser, load_denoiser
from .ensemble import diffaug_ensemble
from .errors import InputError, StorageError
from .smoothing import ABSTAIN, Smooth
from .utils.lazy import lazy_attributes

# modules and subpackages reachable as attributes of the package, imported when first touched
SUBMODULES = (
    # the core and the paper's methods
    "schedule", "denoiser", "augment", "ensemble", "sampling", "dda", "smoothing", "sequential", "ood",
    "corruptions", "guidance", "genmetrics", "classifier", "recipes", "stats", "tables", "errors", "data", "nets",
    # jobs, the study, plumbing
    "train", "evaluate", "study", "cli", "utils",
)
# public classes that live in modules imported on first use
_LAZY_NAMES = {"GuidanceClassifier": "guidance", "Recipe": "recipes", "Plain": "recipes",
               "DiffAugRecipe": "recipes", "AugMix": "recipes"}
# modules that moved into subpackages (0.1 layout): still reachable as attributes, with a DeprecationWarning
MOVED = {
    "accel": "utils.accel", "checkpoint": "utils.checkpoint", "seeding": "utils.seeding", "adm": "nets.adm",
    "harness": "train.harness", "train_classifier": "train.classifier", "train_guidance": "train.guidance",
    "eval_shift": "evaluate.shift", "eval_ood": "evaluate.ood", "certify": "evaluate.certify",
    "eval_guidance": "evaluate.guidance", "evaldata": "evaluate.sets", "pag": "evaluate.pag",
    "quality": "evaluate.quality", "report": "study.report", "toy": "study.toy",
}

__all__ = ["ABSTAIN", "DiffAug", "Smooth", "Denoiser", "InputError", "StorageError", "create_classifier",
           "diffaug_ensemble", "diffuse_denoise", "load_classifier", "load_denoiser", "Classifier",
           "GuidanceClassifier", "Recipe", "Plain", "DiffAugRecipe", "AugMix"]
__version__ = "0.1.0"

__getattr__, __dir__ = lazy_attributes(__name__, SUBMODULES, _LAZY_NAMES, MOVED)
