"""Plumbing shared by the library and its jobs: atomic safetensors / JSON I/O (:mod:`.checkpoint`), speed and
precision settings (:mod:`.accel`), private seeding (:mod:`.seeding`), DDP helpers (:mod:`.distributed`),
figure files (:mod:`.figures`), borrowing a model's eval mode (:mod:`.modes`) and lazy package attributes (:mod:`.lazy`)."""

from .lazy import lazy_attributes

__getattr__, __dir__ = lazy_attributes(__name__, modules=("accel", "checkpoint", "distributed", "figures", "lazy",
                                                          "locking", "modes", "seeding"))
