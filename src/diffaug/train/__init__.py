"""The training jobs (library functions; :mod:`diffaug.cli` is a thin layer over them).

* :mod:`.diffusion`: ``train_diffusion`` (``diffaug train-diffusion``), the denoiser on the user's data;
* :mod:`.classifier`: ``train_classifier`` (``diffaug train``), classifiers with the paper's recipes, DDP;
* :mod:`.guidance`: ``train_guidance`` (``diffaug train-guidance``), noisy / denoise-augmented guidance classifiers;
* :mod:`.harness`: what the three loops share (run folder, checkpoint, signals, loss log).
"""

from ..utils.lazy import lazy_attributes

_NAMES = {"train_diffusion": "diffusion", "DiffusionTrainConfig": "diffusion", "train_classifier": "classifier",
          "TrainConfig": "classifier", "train_guidance": "guidance", "GuidanceTrainConfig": "guidance"}
__all__ = list(_NAMES)
_MODULES = ("diffusion", "classifier", "guidance", "harness")  # submodules, loaded on first use
__getattr__, __dir__ = lazy_attributes(__name__, modules=_MODULES, names=_NAMES)
