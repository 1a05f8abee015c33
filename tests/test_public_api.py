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


def test_every_submodule_of_a_subpackage_is_reachable_after_a_plain_import():
    # `import diffaug; diffaug.nets.adm.PRESETS` (the README's spelling) raised AttributeError unless the module
    # had been imported by name first
    code = ("import json, pkgutil, diffaug\n"
            "found = {p: sorted(m.name for m in pkgutil.iter_modules(getattr(diffaug, p).__path__))\n"
            "         for p in ('data', 'nets', 'train', 'evaluate', 'study', 'utils')}\n"
            "print(json.dumps({p: [getattr(getattr(diffaug, p), m).__name__ for m in ms] for p, ms in found.items()}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert all(names == [f"diffaug.{p}.{n.rsplit('.', 1)[1]}" for n in names] for p, names in out.items())
    assert "diffaug.nets.adm" in out["nets"] and "diffaug.utils.locking" in out["utils"]


def test_unknown_attribute_still_raises():
    import pytest

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        diffaug.nope  # noqa: B018
    assert "ood" in dir(diffaug) and set(diffaug.__all__) <= set(dir(diffaug))


SNAPSHOT = __import__("pathlib").Path(__file__).parent / "data" / "public_api.txt"
SUBPACKAGES = ("data", "nets", "train", "evaluate", "study")


def public_names() -> list[str]:
    """Every public name: the package's ``__all__``, its submodules, each subpackage's ``__all__``, and the public
    methods and properties the exported classes define themselves (``diffaug.Classifier.from_pretrained``)."""
    import inspect

    import importlib

    names = [f"diffaug.{n}" for n in diffaug.__all__] + [f"diffaug.{m}" for m in diffaug.SUBMODULES]
    for package in SUBPACKAGES:
        names += [f"diffaug.{package}.{n}" for n in importlib.import_module(f"diffaug.{package}").__all__]
    for n in diffaug.__all__:
        obj = getattr(diffaug, n)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            names += [f"diffaug.{n}.{a}" for a, v in vars(obj).items()
                      if not a.startswith("_") and (callable(v) or isinstance(v, (property, classmethod, staticmethod)))]
    return sorted(set(names))


def test_public_api_matches_the_checked_in_snapshot():
    """An export cannot go missing (or appear) unnoticed: compare with tests/data/public_api.txt (kornia-style).
    After a deliberate change, rewrite it with ``python tests/test_public_api.py``."""
    listed = SNAPSHOT.read_text().split()
    names = public_names()
    assert names == listed, (f"missing: {sorted(set(listed) - set(names))}, new: {sorted(set(names) - set(listed))}; "
                             "update tests/data/public_api.txt if the change is deliberate")
    for name in names:  # and every listed name resolves (modules through the package's lazy attributes)
        obj = diffaug
        for part in name.split(".")[1:]:
            obj = getattr(obj, part)
        assert obj is not None, name



def test_moved_modules_still_resolve_with_a_deprecation_warning():
    """The 0.1 flat module names (``diffaug.eval_shift``, ``diffaug.accel``, ...) reach their new homes."""
    import importlib

    import pytest

    assert diffaug.MOVED and not set(diffaug.MOVED) & set(diffaug.SUBMODULES)
    for old, new in diffaug.MOVED.items():
        with pytest.warns(DeprecationWarning, match=f"diffaug.{old} moved to diffaug.{new}"):
            assert getattr(diffaug, old) is importlib.import_module(f"diffaug.{new}")


def imported_modules(path) -> set[str]:
    """The diffaug modules a source file imports (absolute names), at any depth in the file."""
    import ast

    src = __import__("pathlib").Path(diffaug.__file__).parent
    here = ["diffaug", *path.relative_to(src).with_suffix("").parts]
    package = here if here[-1] == "__init__" else here[:-1]
    package = [p for p in package if p != "__init__"]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = base + (node.module.split(".") if node.module else [])
            if mod and mod[0] == "diffaug":
                found.add(".".join(mod))
                found.update(".".join(mod + [a.name]) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("diffaug"))
    return found


def test_the_library_never_imports_a_job():
    """Layers: the library (core, methods, data, nets, utils) imports no job package (train, evaluate, study, cli);
    evaluations import no training code; training imports no evaluation."""
    src = __import__("pathlib").Path(diffaug.__file__).parent
    jobs = ("diffaug.train", "diffaug.evaluate", "diffaug.study", "diffaug.cli")
    rules = {"": jobs, "train": ("diffaug.evaluate", "diffaug.study", "diffaug.cli"),
             "evaluate": ("diffaug.train", "diffaug.study", "diffaug.cli")}
    bad = []
    for path in src.rglob("*.py"):
        top = path.relative_to(src).parts[0]
        layer = top if top in ("train", "evaluate") else "" if top not in ("study", "cli.py") else None
        if layer is None:
            continue
        own = f"diffaug.{top}" if layer else None
        for mod in imported_modules(path):
            if any(mod == j or mod.startswith(j + ".") for j in rules[layer]) and not (own and mod.startswith(own)):
                bad.append(f"{path.relative_to(src)} imports {mod}")
    assert bad == []


if __name__ == "__main__":
    SNAPSHOT.write_text("\n".join(public_names()) + "\n")
    print(f"wrote {len(public_names())} names to {SNAPSHOT}")
