"""The evaluation jobs; each returns a :class:`diffaug.tables.JobResult` (rows, Markdown text).

* :mod:`.shift`: ``run_eval_shift`` (``diffaug eval-shift``), Default / DE / DDA under corruptions;
* :mod:`.ood`: ``run_eval_ood`` (``diffaug eval-ood``), MSP / ReAct / ASH / SCALE with and without DiffAug;
* :mod:`.certify`: ``run_certify`` (``diffaug certify``), diffusion denoised smoothing, CERTIFY or sequential;
* :mod:`.guidance`: ``run_eval_guidance`` (``diffaug eval-guidance``), classifier-guided generation;
* :mod:`.pag`: ``run_pag`` (``diffaug pag``), perceptually aligned gradients;
* :mod:`.quality`: ``denoiser_quality`` (``diffaug quality``), a denoiser's one-step and sampled images;
* :mod:`.sets`: what they share to read evaluation images (sizes, class matching, batches, result keys).
"""

from ..utils.lazy import lazy_attributes

_NAMES = {"run_eval_shift": "shift", "run_eval_ood": "ood", "run_certify": "certify",
          "run_eval_guidance": "guidance", "run_pag": "pag", "denoiser_quality": "quality"}
__all__ = list(_NAMES)
_MODULES = ("shift", "ood", "certify", "guidance", "pag", "quality", "sets")  # submodules, loaded on first use
__getattr__, __dir__ = lazy_attributes(__name__, modules=_MODULES, names=_NAMES)
