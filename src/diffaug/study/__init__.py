"""The one-command study (``diffaug study``): every stage of the paper, its claims and the report.

* :mod:`.stages`: ``StudyConfig``, ``run_study`` and each stage;
* :mod:`.report`: the study's figures (augmentation grid, claims forest plot);
* :mod:`.toy`: the 2-D one-step-denoising demo (``diffaug toy``).
"""

from ..utils.lazy import lazy_attributes

_NAMES = {"StudyConfig": "stages", "run_study": "stages", "toy_demo": "toy", "show_augmentations": "report"}
__all__ = list(_NAMES)
_MODULES = ("stages", "report", "toy")  # submodules, loaded on first use
__getattr__, __dir__ = lazy_attributes(__name__, modules=_MODULES, names=_NAMES)
