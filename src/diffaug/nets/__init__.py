"""Networks: the diffusion UNet factory (:mod:`.unet`), OpenAI's ADM UNet and classifier (:mod:`.adm`), the
small classifier backbones (:mod:`.small`), the guidance classifiers' time-conditioned CNN
(:mod:`.time_conditioned`), the 2-D toy's epsilon-model (:mod:`.toy`) and the sinusoidal timestep embedding
they share (:mod:`.embedding`). The submodules load on first use (``diffaug.nets.adm.PRESETS`` after a plain
``import diffaug``)."""

from ..utils.lazy import lazy_attributes
from .unet import unet_config_for

__all__ = ["unet_config_for"]
__getattr__, __dir__ = lazy_attributes(__name__, modules=("adm", "small", "time_conditioned", "toy", "embedding"))
