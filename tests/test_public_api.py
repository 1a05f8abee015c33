"""The package's attribute surface: every public module reachable from ``import diffaug``, lazily."""

import json
import pkgutil
import subprocess
import sys

import diffaug

# imported on first use only: what `import diffaug` must not pull in (each costs import time)
LAZY = ["diffaug.ood", "diffaug.corruptions", "diffaug.dda", "diffaug.guidance", "diffaug.study", "diffaug.cli",
        "diffaug.genmetrics", "kornia", "matplotlib", "timm", "diffusers", "sklearn"]


def test_every_module_is_listed():
    on_disk = {m.name for m in pkgutil.iter_modules(diffaug.__path__) if not m.name.startswith("_")}
    assert on_disk == set(diffaug.SUBMODULES)


def test_modules_are_reachable_and_import_stays_lazy():
    code = (
        "import json, sys, diffaug\n"
        f"before = [m for m in {LAZY!r} if m in sys.modules]\n"
        "auroc = diffaug.ood.metrics([0.9, 0.8, 0.7], [0.1, 0.2, 0.75])['auroc']\n"
        "mods = {m: getattr(diffaug, m).__name__ for m in diffaug.SUBMODULES}\n"
        "print(json.dumps({'before': before, 'auroc': auroc, 'mods': mods,\n"
        "                  'guidance': diffaug.GuidanceClassifier.__module__, 'clf': diffaug.Classifier.__module__}))\n"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out["before"] == []  # `import diffaug` is no slower than the core it needs
    assert abs(out["auroc"] - 8 / 9) < 1e-9
    assert out["mods"] == {m: f"diffaug.{m}" for m in diffaug.SUBMODULES}
    assert (out["guidance"], out["clf"]) == ("diffaug.guidance", "diffaug.classifier")


def test_unknown_attribute_still_raises():
    import pytest

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        diffaug.nope  # noqa: B018
    assert "ood" in dir(diffaug) and set(diffaug.__all__) <= set(dir(diffaug))
