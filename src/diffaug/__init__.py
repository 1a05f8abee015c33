"""diffaug: the DiffAug diffuse-and-denoise augmentation and the robustness studies built on it.

Public images are float tensors in [0, 1], shape ``[N, C, H, W]``.
"""

from .augment import DiffAug
from .classifier import create_classifier, load_classifier
from .denoiser import Denoiser, load_denoiser
from .ensemble import diffaug_ensemble
from .errors import InputError, StorageError
from .smoothing import ABSTAIN, Smooth

__all__ = ["ABSTAIN", "DiffAug", "Smooth", "Denoiser", "InputError", "StorageError", "create_classifier", "diffaug_ensemble", "load_classifier", "load_denoiser"]
__version__ = "0.1.0"
