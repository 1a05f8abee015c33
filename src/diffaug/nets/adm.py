"""The ADM UNet (Dhariwal & Nichol 2021; Nichol & Dhariwal 2021), written here to load OpenAI's guided-diffusion
and improved-diffusion checkpoints key for key.

The network is configured by the same flags as their scripts (``ADMConfig``); ``PRESETS`` holds the published
checkpoints' flags and schedules. Parameter names follow the original modules (``input_blocks.N.M...``,
``middle_block``, ``output_blocks``, ``out``; ResBlocks with ``in_layers`` / ``emb_layers`` / ``out_layers`` /
``skip_connection``; attention with ``norm`` / ``qkv`` / ``proj_out``), so a state dict loads with
``strict=True``. Attention uses PyTorch's ``scaled_dot_product_attention`` (both head orders of the originals);
GroupNorm is computed in float32 as in the originals, so the network runs under bf16/fp16 autocast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .embedding import timestep_embedding


@dataclass(frozen=True)
class ADMConfig:
    """The flags of guided-diffusion's ``create_model`` (improved-diffusion's are a subset)."""

    image_size: int = 64
    in_channels: int = 3
    num_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: tuple[float, ...] | None = None  # None: guided-diffusion's default for the image size
    attention_resolutions: tuple[int, ...] = (16, 8)  # image resolutions (pixels) that get attention
    num_heads: int = 4
    num_head_channels: int = -1  # > 0 overrides num_heads with channels // num_head_channels
    num_heads_upsample: int = -1  # -1: num_heads
    learn_sigma: bool = False
    class_cond: bool = False
    num_classes: int = 1000
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dropout: float = 0.0

    def resolved_channel_mult(self) -> tuple[float, ...]:
        if self.channel_mult is not None:
            return tuple(self.channel_mult)
        defaults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
                    32: (1, 2, 2, 2)}
        if self.image_size not in defaults:
            raise InputError(f"no default channel_mult for image_size {self.image_size}; pass channel_mult")
        return defaults[self.image_size]

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)


@dataclass(frozen=True)
class ADMPreset:
    """A published checkpoint: its network flags and its diffusion (schedule, steps, time input scaling)."""

    config: ADMConfig
    noise_schedule: str  # "linear" or "cosine"
    diffusion_steps: int = 1000
    rescale_timesteps: bool = False  # improved-diffusion feeds t * 1000 / T to the network
    note: str = ""
    extra: dict = field(default_factory=dict)


_ATT = (32, 16, 8)
PRESETS: dict[str, ADMPreset] = {
    # the paper's DiffAug / DDA model (guided-diffusion, ImageNet 256, unconditional)
    "256x256_diffusion_uncond": ADMPreset(ADMConfig(
        image_size=256, num_channels=256, num_res_blocks=2, attention_resolutions=_ATT, num_head_channels=64,
        learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True), "linear"),
    "256x256_diffusion": ADMPreset(ADMConfig(
        image_size=256, num_channels=256, num_res_blocks=2, attention_resolutions=_ATT, num_head_channels=64,
        learn_sigma=True, class_cond=True, use_scale_shift_norm=True, resblock_updown=True), "linear"),
    "128x128_diffusion": ADMPreset(ADMConfig(
        image_size=128, num_channels=256, num_res_blocks=2, attention_resolutions=_ATT, num_heads=4,
        learn_sigma=True, class_cond=True, use_scale_shift_norm=True, resblock_updown=True), "linear"),
    "64x64_diffusion": ADMPreset(ADMConfig(
        image_size=64, num_channels=192, num_res_blocks=3, attention_resolutions=_ATT, num_head_channels=64,
        learn_sigma=True, class_cond=True, use_scale_shift_norm=True, resblock_updown=True,
        use_new_attention_order=True, dropout=0.1), "cosine"),
    # improved-diffusion's CIFAR-10 model (cosine schedule, 4000 steps, rescaled timesteps)
    "cifar10_uncond_50M_500K": ADMPreset(ADMConfig(
        image_size=32, num_channels=128, num_res_blocks=3, attention_resolutions=(16, 8), num_heads=4,
        learn_sigma=True, use_scale_shift_norm=True, dropout=0.3), "cosine", 4000, rescale_timesteps=True),
}


# ---------------------------------------------------------------------- building blocks
class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 (as the originals do), cast back to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x) if self.use_conv else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, time embedding (added, or FiLM scale-shift after the second norm), dropout, conv;
    optional resampling inside (``up`` / ``down``: BigGAN-style ResBlocks)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int, scale_shift: bool,
                 up: bool = False, down: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.resample = (Upsample(channels, False) if up else Downsample(channels, False)) if up or down else None
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is not None:  # resample between the first norm/activation and the first conv
            h = self.in_layers[:-1](x)
            h, x = self.in_layers[-1](self.resample(h)), self.resample(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the pixels. ``new_order``: qkv is split into q, k, v first, then heads (guided-
    diffusion's QKVAttention); otherwise heads first (QKVAttentionLegacy, also improved-diffusion's)."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, new_order: bool):
        super().__init__()
        if num_head_channels > 0:
            if channels % num_head_channels:
                raise InputError(f"{channels} channels are not divisible by num_head_channels={num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.new_order = new_order
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # [b, 3c, L]
        return (x + self.proj_out(qkv_attention(qkv, self.num_heads, self.new_order))).reshape(b, c, *spatial)


def qkv_attention(qkv: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """Multi-head self-attention of ``qkv`` ``[B, 3C, L]`` -> ``[B, C, L]`` with PyTorch's fused SDPA kernels.
    ``new_order``: split q, k, v first, then heads (QKVAttention); else heads first (QKVAttentionLegacy)."""
    b, c3, length = qkv.shape
    c = c3 // 3
    if new_order:
        q, k, v = (z.reshape(b, heads, c // heads, length) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b, heads, 3 * c // heads, length).chunk(3, dim=2)
    h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    return h.transpose(-1, -2).reshape(b, c, length)


class _Sequential(nn.Sequential):
    """Passes the time embedding to the ResBlocks it holds."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _down_path(config: ADMConfig, res, attn) -> tuple[nn.ModuleList, list[int], int, int]:
    """The input blocks shared by the UNet and the classifier encoder: ``(blocks, skip channels, channels,
    downsampling factor)``; ``res(cin, cout, **kw)`` and ``attn(ch, heads)`` build the layers."""
    mult, mc = config.resolved_channel_mult(), config.num_channels
    attention_ds = {config.image_size // r for r in config.attention_resolutions}
    ch = int(mult[0] * mc)
    blocks = nn.ModuleList([_Sequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
    skips, ds = [ch], 1
    for level, m in enumerate(mult):
        for _ in range(config.num_res_blocks):
            layers = [res(ch, int(m * mc))]
            ch = int(m * mc)
            if ds in attention_ds:
                layers.append(attn(ch, config.num_heads))
            blocks.append(_Sequential(*layers))
            skips.append(ch)
        if level != len(mult) - 1:
            down = res(ch, ch, down=True) if config.resblock_updown else Downsample(ch, True, ch)
            blocks.append(_Sequential(down))
            skips.append(ch)
            ds *= 2
    return blocks, skips, ch, ds


def _block_makers(config: ADMConfig):
    """``res(cin, cout, **kw)`` and ``attn(ch, heads)``: the ResBlock and AttentionBlock of ``config``."""
    emb_dim = 4 * config.num_channels

    def res(cin, cout, **kw):
        return ResBlock(cin, emb_dim, config.dropout, cout, config.use_scale_shift_norm, **kw)

    def attn(ch, heads):
        return AttentionBlock(ch, heads, config.num_head_channels, config.use_new_attention_order)

    return res, attn


def _encoder(config: ADMConfig, res, attn):
    """What the UNet and the classifier share: ``(time_embed, input_blocks, middle_block, skip channels,
    channels, downsampling factor)``."""
    mc, emb_dim = config.num_channels, 4 * config.num_channels
    time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    input_blocks, skips, ch, ds = _down_path(config, res, attn)
    middle_block = _Sequential(res(ch, ch), attn(ch, config.num_heads), res(ch, ch))
    return time_embed, input_blocks, middle_block, skips, ch, ds


# ---------------------------------------------------------------------- the network
class ADMUNet(nn.Module):
    """``net(x, t, y=None) -> output``: eps (and the variance interpolation v when ``learn_sigma``), for
    ``x`` ``[N, C, S, S]`` in [-1, 1], ``t`` ``[N]`` timesteps (scaled by ``time_scale`` before embedding)."""

    def __init__(self, config: ADMConfig, time_scale: float = 1.0):
        super().__init__()
        self.config = config
        self.time_scale = time_scale
        mc = config.num_channels
        mult = config.resolved_channel_mult()
        attention_ds = {config.image_size // r for r in config.attention_resolutions}
        heads_up = config.num_heads if config.num_heads_upsample == -1 else config.num_heads_upsample
        res, attn = _block_makers(config)
        self.time_embed, self.input_blocks, self.middle_block, skips, ch, ds = _encoder(config, res, attn)
        if config.class_cond:
            self.label_emb = nn.Embedding(config.num_classes, 4 * mc)
        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(mult))[::-1]:
            for i in range(config.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), int(mc * m))]
                ch = int(mc * m)
                if ds in attention_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == config.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if config.resblock_updown else Upsample(ch, True, ch))
                    ds //= 2
                self.output_blocks.append(_Sequential(*layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, config.out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = timestep_embedding(t.float() * self.time_scale, self.config.num_channels)
        emb = self.time_embed(emb.to(self.time_embed[0].weight.dtype))  # a float64 / bf16 network takes its own
        if self.config.class_cond:
            if y is None:
                raise InputError("this ADM model is class-conditional; pass class labels y")
            emb = emb + self.label_emb(y)
        h, hs = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


# ---------------------------------------------------------------------- the noisy classifier (half UNet)
@dataclass(frozen=True)
class ADMClassifierPreset:
    """A published noisy classifier: its flags (the ``classifier_*`` flags of guided-diffusion's scripts) and
    the schedule of the diffusion model it guides (its t means that model's t)."""

    image_size: int
    classifier_depth: int = 2
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000


CLASSIFIER_PRESETS: dict[str, ADMClassifierPreset] = {
    "64x64_classifier": ADMClassifierPreset(64, classifier_depth=4, noise_schedule="cosine"),
    "128x128_classifier": ADMClassifierPreset(128),
    "256x256_classifier": ADMClassifierPreset(256),  # guides 256x256_diffusion and the paper's unconditional model
    "512x512_classifier": ADMClassifierPreset(512),
}
_CLASSIFIER_DEFAULTS = {"classifier_width": 128, "classifier_depth": 2, "classifier_attention_resolutions": (32, 16, 8),
                        "classifier_use_scale_shift_norm": True, "classifier_resblock_updown": True,
                        "classifier_pool": "attention", "num_classes": 1000, "in_channels": 3,
                        "num_head_channels": 64}
POOLS = ("attention", "adaptive")


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean pixel, with a learned position embedding, attends to all pixels."""

    def __init__(self, spatial: int, channels: int, num_head_channels: int, out_channels: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial**2 + 1) / channels**0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)
        self.num_heads = channels // num_head_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)
        return self.c_proj(qkv_attention(self.qkv_proj(x), self.num_heads, new_order=True))[:, :, 0]


class ADMClassifier(nn.Module):
    """guided-diffusion's noisy classifier (``EncoderUNetModel``): ``net(x_t, t) -> logits [N, num_classes]``.

    The UNet's input blocks and middle block, then GroupNorm-SiLU and attention pooling (or average pooling
    and a 1x1 conv for ``pool="adaptive"``). ``x_t`` ``[N, C, S, S]`` in the diffusion model's space, ``t`` ``[N]``.
    """

    def __init__(self, config: ADMConfig, pool: str = "attention"):
        super().__init__()
        if pool not in POOLS:
            raise InputError(f"classifier_pool {pool!r} is not supported; use one of {', '.join(POOLS)}")
        if pool == "attention" and config.num_head_channels <= 0:
            raise InputError("attention pooling needs num_head_channels > 0")
        self.config, self.pool = config, pool
        self.num_classes = config.num_classes
        self.time_embed, self.input_blocks, self.middle_block, _, ch, ds = _encoder(config, *_block_makers(config))
        if pool == "attention":
            head = AttentionPool2d(config.image_size // ds, ch, config.num_head_channels, config.num_classes)
            self.out = nn.Sequential(_norm(ch), nn.SiLU(), head)
        else:
            self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                     _zero(nn.Conv2d(ch, config.num_classes, 1)), nn.Flatten())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.num_channels).to(self.time_embed[0].weight.dtype))
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        return self.out(self.middle_block(h, emb))


def adm_classifier_config(preset: str | None = None, **flags) -> tuple[ADMConfig, str, ADMClassifierPreset | None]:
    """``(network config, pool, preset)`` from a classifier preset and/or the scripts' ``classifier_*`` flags
    (``image_size``, ``classifier_width``, ``classifier_depth``, ``classifier_attention_resolutions``,
    ``classifier_use_scale_shift_norm``, ``classifier_resblock_updown``, ``classifier_pool``, plus
    ``num_classes``, ``in_channels``, ``num_head_channels``, ``channel_mult``)."""
    base = None
    if preset is not None:
        if preset not in CLASSIFIER_PRESETS:
            raise InputError(f"unknown ADM classifier preset {preset!r}; use one of {', '.join(CLASSIFIER_PRESETS)}")
        base = CLASSIFIER_PRESETS[preset]
    known = set(_CLASSIFIER_DEFAULTS) | {"image_size", "channel_mult", "learn_sigma"}
    net_flags, _ = split_flags(flags, known)
    net_flags.pop("learn_sigma", None)  # a diffusion flag in classifier_and_diffusion_defaults(); not the classifier's
    merged = {**_CLASSIFIER_DEFAULTS, "image_size": 64, "channel_mult": None}
    if base is not None:
        merged.update(image_size=base.image_size, classifier_depth=base.classifier_depth)
    merged.update(net_flags)
    att, mult = merged["classifier_attention_resolutions"], merged["channel_mult"]
    config = ADMConfig(image_size=merged["image_size"], in_channels=merged["in_channels"],
                       num_channels=merged["classifier_width"], num_res_blocks=merged["classifier_depth"],
                       channel_mult=mult, attention_resolutions=tuple(att), num_heads=1,
                       num_head_channels=merged["num_head_channels"],
                       use_scale_shift_norm=merged["classifier_use_scale_shift_norm"],
                       resblock_updown=merged["classifier_resblock_updown"], num_classes=merged["num_classes"])
    return config, merged["classifier_pool"], base


# Flags of the original scripts that change how a model is trained or run, not what it computes: gradient
# checkpointing, fp16 weights (precision is ``diffaug.utils.accel``'s job), training losses, and the sampler's timestep
# respacing (a respaced model is called at the original timesteps with the original alpha_bar, which is what the
# one-step estimate uses). They are accepted, so ``model_and_diffusion_defaults()`` dicts pass through, and ignored.
RUNTIME_ONLY_FLAGS = frozenset({"use_checkpoint", "use_fp16", "use_kl", "rescale_learned_sigmas",
                                "timestep_respacing", "classifier_use_fp16"})
# The diffusion flags of ``diffusion_defaults()``; the loaders read them (schedule, steps, time scaling, target).
DIFFUSION_FLAGS = frozenset({"diffusion_steps", "noise_schedule", "rescale_timesteps", "predict_xstart"})
_TUPLE_FLAGS = {"channel_mult": float, "attention_resolutions": int, "classifier_attention_resolutions": int}
_BOOL_FLAGS = {"learn_sigma", "class_cond", "use_scale_shift_norm", "resblock_updown", "use_new_attention_order",
               "classifier_use_scale_shift_norm", "classifier_resblock_updown", "rescale_timesteps", "predict_xstart"}


def parse_flag(name: str, value):
    """One flag as the original ``create_model`` / ``str2bool`` read it: ``channel_mult=""`` means the default for
    the image size (None here), comma strings and sequences give tuples, ``"true"``/``"0"``... give bools."""
    if name in _TUPLE_FLAGS and not isinstance(value, (tuple, type(None))):
        cast = _TUPLE_FLAGS[name]
        if name == "channel_mult" and value == "":
            return None
        try:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(cast(v) for v in items if not (isinstance(v, str) and not v.strip()))
        except (TypeError, ValueError):
            raise InputError(f"{name}={value!r} is not a list of numbers; pass e.g. '16,8' or (16, 8)") from None
    if name in _BOOL_FLAGS and isinstance(value, str):
        word = value.strip().lower()
        if word in ("yes", "true", "t", "y", "1"):
            return True
        if word in ("no", "false", "f", "n", "0"):
            return False
        raise InputError(f"{name}={value!r} is not a boolean; pass True or False")
    return value


def split_flags(flags: dict, known: set) -> tuple[dict, dict]:
    """``(network flags, diffusion flags)`` parsed as the originals do; runtime-only flags are dropped and an
    unknown flag is an error naming the known ones."""
    unknown = sorted(set(flags) - known - DIFFUSION_FLAGS - RUNTIME_ONLY_FLAGS)
    if unknown:
        raise InputError(f"unknown ADM flag(s) {', '.join(unknown)}; known: {', '.join(sorted(known | DIFFUSION_FLAGS))}")
    net = {k: parse_flag(k, v) for k, v in flags.items() if k in known}
    diffusion = {k: parse_flag(k, v) for k, v in flags.items() if k in DIFFUSION_FLAGS}
    return net, diffusion


def adm_config(preset: str | None = None, **flags) -> tuple[ADMConfig, ADMPreset | None]:
    """An ``ADMConfig`` from a preset name and/or network flags (flags override the preset's), each flag taken in
    the forms the original scripts accept (see :func:`parse_flag`)."""
    base = None
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"unknown ADM preset {preset!r}; use one of {', '.join(PRESETS)}")
        base = PRESETS[preset]
    net_flags, _ = split_flags(flags, set(asdict(ADMConfig())))
    return replace(base.config if base else ADMConfig(), **net_flags), base


def state_shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def matching_presets(state: dict[str, torch.Tensor]) -> list[str]:
    """The :data:`PRESETS` whose network has exactly the keys and shapes of ``state`` (built on the meta device:
    no memory, no time), to load a published checkpoint without naming its flags."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    found = []
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            net = ADMUNet(preset.config)
        if state_shapes(net) == shapes:
            found.append(name)
    return found


def read_adm_state(path) -> dict[str, torch.Tensor]:
    """The state dict of an OpenAI checkpoint: a ``.pt`` read with ``torch.load(..., weights_only=True)`` (pickled
    objects are refused, never run) or a ``.safetensors`` file with the same keys."""
    from ..utils.checkpoint import read_state_dict

    return read_state_dict(path, "checkpoint")


def check_adm_state(state: dict, net: nn.Module, source) -> None:
    """One-line errors for a state dict that does not fit ``net``, with the flag that is likely wrong."""
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    cfg = net.config
    hint = ""
    if "out.2.weight" in state and "out.2.weight" in own and state["out.2.weight"].shape != own["out.2.weight"].shape:
        got = state["out.2.weight"].shape[0]
        if got == 2 * cfg.in_channels and not cfg.learn_sigma:
            hint = "; the output has 2x the image channels: set learn_sigma=True"
        elif got == cfg.in_channels and cfg.learn_sigma:
            hint = "; the output has the image channels only: set learn_sigma=False"
    elif any(k.startswith("label_emb") for k in missing):
        hint = "; the checkpoint has no label embedding: set class_cond=False"
    elif any(k.startswith("label_emb") for k in unexpected):
        hint = "; the checkpoint has a label embedding: set class_cond=True"
    if missing or unexpected:
        raise InputError(f"{source} does not fit the ADM flags: missing {missing[:3]}, unexpected {unexpected[:3]}"
                         f"{hint}")
    for name, value in state.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise InputError(f"{source}: {name} has shape {tuple(value.shape)}, the flags give "
                             f"{tuple(own[name].shape)}{hint or '; check num_channels, channel_mult and num_heads'}")
