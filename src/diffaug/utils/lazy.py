"""Names a package exposes but imports on first use (PEP 562), as SciPy does: ``import diffaug`` stays fast."""

from __future__ import annotations

import importlib
import warnings


def lazy_attributes(package: str, modules=(), names=None, moved=None):
    """``(__getattr__, __dir__)`` for ``package``: its submodules ``modules``, ``names`` (name -> the submodule
    defining it) and ``moved`` (an old submodule name -> its new dotted path, with a DeprecationWarning)."""
    modules, names, moved = tuple(modules), dict(names or {}), dict(moved or {})

    def __getattr__(name: str):
        if name in modules:
            return importlib.import_module(f".{name}", package)
        if name in names:
            return getattr(importlib.import_module(f".{names[name]}", package), name)
        if name in moved:
            warnings.warn(f"{package}.{name} moved to {package}.{moved[name]}; import it from there",
                          DeprecationWarning, stacklevel=2)
            return importlib.import_module(f".{moved[name]}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        import sys

        return sorted(set(vars(sys.modules[package])) | set(modules) | set(names))

    return __getattr__, __dir__
