"""Networks: the diffusion UNet factory (:mod:`.unet`), OpenAI's ADM UNet and classifier (:mod:`.adm`), the
small classifier backbones (:mod:`.small`), the guidance classifiers' time-conditioned CNN
(:mod:`.time_conditioned`), the 2-D toy's epsilon-model (:mod:`.toy`) and the sinusoidal timestep embedding
they share (:mod:`.embedding`)."""

from .unet import unet_config_for

__all__ = ["unet_config_for"]
