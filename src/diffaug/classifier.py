"""Classifiers: one wrapper so every model takes images in [0, 1] and exposes features + head.

``create_classifier(name, ...)`` builds the project's small nets, any ``timm`` model by name
(``timm:resnet18`` or a plain timm name) or a torchvision model (``torchvision:resnet18``), always from local
weights only. The wrapper normalises inputs inside the model, so DiffAug and the evaluations always pass
[0, 1] images. ``Classifier.save_pretrained`` / ``Classifier.from_pretrained`` (also spelt ``save_classifier``
/ ``load_classifier``) use safetensors + JSON.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, channels_hint
from .nets.small import small_backbone
from .utils import accel
from .utils.checkpoint import load_state, read_state_dict, save_safetensors, write_json
from .utils.seeding import private_seed

if TYPE_CHECKING:
    from .data import ImageDataset

MODEL_FILE, MODEL_CONFIG = "model.safetensors", "model.json"
OWN_MODELS = ("small_cnn", "resnet_small")


class Classifier(nn.Module):
    """``backbone`` behind input normalisation. Input ``[N, C, H, W]`` in [0, 1]; output logits ``[N, K]``.

    ``forward_features(x)`` returns the penultimate features ``[N, D]`` and ``head`` is the final linear layer,
    so ``head(forward_features(x)) == forward(x)`` (used by the OOD postprocessors).
    """

    def __init__(self, features: nn.Module, head: nn.Linear, mean, std, spec: dict):
        super().__init__()
        self.features = features
        self.head = head
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.spec = dict(spec)
        self.precision = "fp32"  # autocast dtype of the backbone; see diffaug.utils.accel.accelerate
        self.channels_last = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.mean.shape[1]:  # the normalisation would broadcast 1 channel to 3
            fix = (channels_hint(tuple(x.shape), self.mean.shape[1]) if x.ndim == 4
                   else "give [N, C, H, W] images with the channels it was trained on")
            raise InputError(f"images of shape {tuple(x.shape)} for a classifier of {self.mean.shape[1]} channels; {fix}")
        x = accel.memory_format((x - self.mean.to(x.dtype)) / self.std.to(x.dtype), self.channels_last)
        with accel.autocast(x.device, self.precision):
            features = self.features(x)
        return features if self.precision == "fp32" else features.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device: str | torch.device | None = None,
                        speed: "accel.Speed | None" = None) -> "Classifier":
        """Load a classifier saved by ``diffaug train`` or :meth:`save_pretrained` (``model.json`` +
        ``model.safetensors``), in eval mode.

        Args:
            folder: the run folder.
            device: where to put it (default: the CPU).
            speed: a :class:`~diffaug.utils.accel.Speed` (precision, channels_last, compile) to set it up with.

        Raises:
            InputError: the folder lacks one of the two files, or the weights do not fit the recorded architecture.
        """
        import json

        folder = Path(folder)
        cfg_path, weights = folder / MODEL_CONFIG, folder / MODEL_FILE
        for p in (cfg_path, weights):
            if not p.is_file():
                raise InputError(f"{folder} is not a trained classifier: missing {p.name}; train one with `diffaug train`")
        spec = json.loads(cfg_path.read_text())
        clf = create_classifier(spec["name"], spec["num_classes"], spec["channels"], mean=spec["mean"],
                                std=spec["std"], width=spec.get("width", 32), image_size=spec.get("image_size"),
                                seed=0)  # the initial weights are overwritten; the caller's global RNG is untouched
        load_weights(clf, weights)
        clf.spec.update({k: v for k, v in spec.items() if k not in clf.spec})
        clf.eval()
        clf = clf.to(device) if device is not None else clf
        return speed.apply(clf) if speed is not None else clf

    def save_pretrained(self, folder: str | os.PathLike, *, extra: dict | None = None) -> None:
        """Write ``model.safetensors`` (weights and normalisation) and ``model.json`` (the architecture spec,
        normalisation and ``extra``, e.g. ``classes``) into ``folder``, each file atomically;
        :meth:`from_pretrained` reads them back."""
        folder = Path(folder)
        save_safetensors(dict(self.state_dict()), folder / MODEL_FILE)
        write_json(folder / MODEL_CONFIG, {**self.spec, "mean": self.mean.flatten().tolist(),
                                           "std": self.std.flatten().tolist(), **(extra or {})})


def _split_timm(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise InputError(f"{type(model).__name__}'s classifier is {type(head).__name__}, not a Linear layer; "
                         "pick a timm model with a linear head")
    model.reset_classifier(0)  # the model now returns pooled features

    return model, head


def native_normalisation(name: str, channels: int) -> tuple[list[float], list[float]] | None:
    """The mean and std a timm / torchvision architecture's published weights were trained with (timm's
    ``pretrained_cfg``, torchvision's default weights' preset), or None for the project's own models, for an
    architecture that records none, or when ``channels`` differs from the recorded statistics'. Nothing is
    downloaded."""
    if name in OWN_MODELS:
        return None
    if name.startswith("torchvision:"):
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(name.split(":", 1)[1]).DEFAULT
            preset = weights.transforms()
            mean, std = list(preset.mean), list(preset.std)
        except (ValueError, AttributeError, TypeError, KeyError):
            return None
    else:
        import timm

        timm_name = name.split(":", 1)[1] if name.startswith("timm:") else name
        try:
            cfg = timm.models.get_pretrained_cfg(timm_name.split(".")[0])
        except (RuntimeError, ValueError, KeyError):
            cfg = None
        if cfg is None:
            return None
        mean, std = list(cfg.mean), list(cfg.std)
    return (mean, std) if len(mean) == len(std) == channels else None


def _timm_model(timm_name: str, num_classes: int, channels: int, image_size: int | None) -> nn.Module:
    """A timm model; architectures whose layers depend on the input size (ViTs' position embeddings) are built
    for ``image_size``; the others (which take no ``img_size``) are built as usual."""
    import timm

    if image_size is not None:
        try:
            return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=channels,
                                     img_size=image_size)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=channels)


def _torchvision_model(name: str, num_classes: int, channels: int = 3) -> tuple[nn.Module, nn.Linear]:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except ValueError as e:
        raise InputError(f"unknown torchvision model {name!r} ({e}); see torchvision.models.list_models()") from None
    if channels != 3:  # torchvision builds RGB stems only; give the first convolution the data's channels
        _set_input_channels(model, channels, name)
    for attr in ("fc", "head", "classifier"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return model, head
        if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear):
            last = head[-1]
            head[-1] = nn.Identity()
            return model, last
    raise InputError(f"cannot find the final Linear layer of torchvision {name}; wrap it in diffaug.Classifier yourself")


def _set_input_channels(model: nn.Module, channels: int, name: str) -> None:
    """Replace the first convolution (3 input channels) by a freshly initialised one taking ``channels``."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != 3 or child.groups != 1:
                    raise InputError(f"cannot give torchvision {name} {channels} input channels; convert the images "
                                     "to RGB")
                setattr(parent, child_name, nn.Conv2d(
                    channels, child.out_channels, child.kernel_size, child.stride, child.padding, child.dilation,
                    bias=child.bias is not None, padding_mode=child.padding_mode))
                return
    raise InputError(f"cannot give torchvision {name} {channels} input channels; convert the images to RGB")


def create_classifier(name: str, num_classes: int, channels: int = 3, *, mean=None, std=None,
                      checkpoint_path: str | os.PathLike | None = None, pretrained: bool | str | os.PathLike = False,
                      width: int = 32, seed: int | None = None, image_size: int | None = None) -> Classifier:
    """Build a classifier by name, optionally with local weights from ``checkpoint_path`` (as timm's
    ``create_model(..., checkpoint_path=...)``).

    Names: ``small_cnn``, ``resnet_small`` (the project's own, for small images), ``timm:<name>`` or a timm
    model name, ``torchvision:<name>``. Nothing is downloaded. ``seed`` makes the initial weights reproducible
    (without touching the global RNG).

    Args:
        checkpoint_path: a local safetensors (or state-dict ``.pt``) file of the wrapper's or the bare backbone's
            weights (:func:`load_weights`).
        pretrained: timm's flag; only ``False`` is accepted (``True`` would download weights). A path here is
            the old spelling of ``checkpoint_path``: it still works for this release, with a DeprecationWarning.
        mean, std: the input normalisation (default: a timm / torchvision model fine-tuned from
            ``checkpoint_path`` gets its architecture's own statistics, :func:`native_normalisation`, unless the
            file is a wrapper's state dict that carries its own ``mean`` / ``std``; otherwise 0.5).
        image_size: the input size the network is built for and trained at, recorded in ``spec["image_size"]``
            (the evaluations resize their data to it); timm architectures that need it get ``img_size``.

    Raises:
        InputError: an unknown name, ``pretrained=True``, both ``pretrained=PATH`` and ``checkpoint_path``, or
            weights that do not fit.
    """
    checkpoint_path = _checkpoint_argument(checkpoint_path, pretrained)
    with private_seed(seed):
        return _create(name, num_classes, channels, mean, std, checkpoint_path, width, image_size)


def _checkpoint_argument(checkpoint_path, pretrained):
    """``checkpoint_path``, or the deprecated ``pretrained=PATH`` (warned); refuses ``pretrained=True``."""
    if isinstance(pretrained, bool):
        if pretrained:
            raise InputError("pretrained=True would download weights, which diffaug never does; pass "
                             "checkpoint_path=LOCAL_FILE instead")
        return checkpoint_path
    if pretrained is None:
        return checkpoint_path
    if checkpoint_path is not None:
        raise InputError("both pretrained=PATH and checkpoint_path given; pass the file as checkpoint_path only")
    import warnings

    warnings.warn("create_classifier(pretrained=PATH) is deprecated and will be removed in the next release; "
                  "pass checkpoint_path=PATH (pretrained is timm's bool)", DeprecationWarning, stacklevel=3)
    return pretrained


def _create(name, num_classes, channels, mean, std, checkpoint_path, width, image_size=None) -> Classifier:
    native = (native_normalisation(name, channels) if checkpoint_path is not None and mean is None and std is None
              else None)
    if native is not None:
        mean, std = native
    mean = [0.5] * channels if mean is None else list(mean)
    std = [0.5] * channels if std is None else list(std)
    spec = {"name": name, "num_classes": num_classes, "channels": channels, "width": width}
    if image_size is not None:
        spec["image_size"] = int(image_size)
    if name in OWN_MODELS:
        features, dim = small_backbone(name, channels, width)
        head = nn.Linear(dim, num_classes)
    elif name.startswith("torchvision:"):
        features, head = _torchvision_model(name.split(":", 1)[1], num_classes, channels)
    else:
        import timm

        timm_name = name.split(":", 1)[1] if name.startswith("timm:") else name
        if not timm.list_models(timm_name):
            raise InputError(f"unknown model {name!r}; use one of {', '.join(OWN_MODELS)}, a timm model name "
                             "(timm.list_models()) or torchvision:<name>")
        features, head = _split_timm(_timm_model(timm_name, num_classes, channels, image_size))
    clf = Classifier(features, head, mean, std, spec)
    if checkpoint_path is not None:
        load_weights(clf, checkpoint_path)
    return clf


def load_weights(clf: Classifier, path: str | os.PathLike) -> None:
    """Load local weights into ``clf``: safetensors, or a plain state dict via ``torch.load(weights_only=True)``.

    Keys may be the wrapper's own or the bare backbone's (e.g. a timm / torchvision state dict).
    """
    path = Path(path)
    state = read_state_dict(path)
    own = set(clf.state_dict())
    if not own & set(state):  # a bare backbone: map its keys onto features / head
        state = _map_backbone_keys(clf, state)
    missing = [k for k in clf.state_dict() if k not in state and k not in ("mean", "std")]
    unexpected = [k for k in state if k not in clf.state_dict()]
    if missing or unexpected:
        raise InputError(f"{path} does not fit model {clf.spec['name']}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}; use weights saved from the same architecture")
    load_state(clf, state, path, strict=False)


def _map_backbone_keys(clf: Classifier, state: dict) -> dict:
    head_keys = {"weight", "bias"}
    mapped = {}
    feature_keys = set(clf.features.state_dict())
    for k, v in state.items():
        if k in feature_keys:
            mapped[f"features.{k}"] = v
        elif k.rsplit(".", 1)[-1] in head_keys and v.shape in {p.shape for p in clf.head.parameters()}:
            mapped[f"head.{k.rsplit('.', 1)[-1]}"] = v
        else:
            mapped[k] = v
    return mapped


def save_classifier(clf: Classifier, folder: str | os.PathLike, extra: dict | None = None) -> None:
    """``clf.save_pretrained(folder, extra=extra)`` (:meth:`Classifier.save_pretrained`)."""
    clf.save_pretrained(folder, extra=extra)


def input_size(model: nn.Module) -> int | None:
    """The square input size a classifier was trained at (``model.json``'s ``image_size``), or None for a
    model saved before it was recorded (the evaluations then take the data at its own size, as before)."""
    size = getattr(model, "spec", {}).get("image_size")
    return None if size is None else int(size)


def load_classifier(folder: str | os.PathLike, *, device: str | torch.device | None = None,
                    speed: "accel.Speed | None" = None) -> Classifier:
    """``Classifier.from_pretrained(folder, device=device, speed=speed)`` (:meth:`Classifier.from_pretrained`):
    a classifier saved by ``diffaug train``, in eval mode."""
    return Classifier.from_pretrained(folder, device=device, speed=speed)


# ---------------------------------------------------------------------- small classifiers fitted in memory
def fit_classifier(model: nn.Module, data: ImageDataset, *, epochs: int = 30, batch_size: int = 64,
                   lr: float = 1e-3, weight_decay: float = 5e-4, generator: torch.Generator | None = None,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Plain cross-entropy training (AdamW, cosine LR); used for reference classifiers that judge quality."""
    if epochs < 1 or batch_size < 1 or len(data) == 0:
        raise InputError(f"fit_classifier needs epochs and batch_size >= 1 and some images, got {epochs}, "
                         f"{batch_size} and {len(data)} images")
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(data) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    images, labels = data.images.to(device), data.labels.to(device)
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=generator).to(device)
        for i in range(0, len(data), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Class predictions ``[N]`` of an eval-mode classifier on images in [0, 1]."""
    return torch.cat([model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
