"""The command line is public: every command's flags (names, defaults, types, choices, nargs, help) and the
Namespace of representative command lines are pinned in ``tests/data/cli_flags.json``, so a flag cannot disappear
or change unnoticed. After a deliberate change, rewrite the file with ``python tests/test_cli_flags.py``."""

import argparse
import ast
import json
from pathlib import Path

import pytest

from diffaug import cli

SNAPSHOT = Path(__file__).parent / "data" / "cli_flags.json"

# representative command lines (one or more per command, including ones argparse must refuse: exit code 2)
COMMAND_LINES = [
    "train-diffusion --out d",
    "train-diffusion --data imgs --out d --steps 5 --batch-size 4 --image-size 32 --workers 0 --no-sample-grid "
    "--lr 0.001 --width 8 --layers-per-block 1 --checkpoint-every 2 --unconditional --schedule linear --seed 3 "
    "--resume --device cpu --quiet --precision bf16 --channels-last --compile",
    "train --out r",
    "train --out r --recipe augmix+diffaug --model resnet18 --denoiser digits --pretrained w.pt --steps 10 "
    "--batch-size 8 --lr 0.1 --optimizer sgd --lr-schedule step --warmup-steps 2 --weight-decay 0 "
    "--label-smoothing 0.1 --t-min 1 --t-max 9 --diffaug-weight 0.5 --diffaug-fraction 0.25 --checkpoint-every 3 "
    "--eval-every 4 --classes 0 1 2 --image-size 64 --workers 2 --diffaug-view same --on-bad-file skip "
    "--transforms timm --denoiser-size 32 --aligned a b --extra-data x --sync-bn --seed 1 --force --quiet",
    "train --out r --epochs 3",
    "train --out r --steps 3 --epochs 3",
    "train --recipe plain",
    "certify --classifier a b --sigma 0.25 0.5 --out o",
    "certify --classifier a --sigma 0.5 --num-samples 40 --n0 5 --sequential --max-n 80 --batch 7 --skip 2 "
    "--limit 3 --image-size 16 --workers 1 --denoiser digits --alpha 0.01 --out o",
    "certify --classifier a --sigma 0.5 --n 40 --out o",
    "certify --classifier a --out o",
    "eval-ood --classifier a --out o",
    "eval-ood --data d --classifier a b --ood holdout near=x noise --image-root r --seed 2 --search-percentile "
    "--image-size 32 --workers 0 --out o --device cpu --precision fp16",
    "eval-shift --classifier a --out o",
    "eval-shift --classifier a --out o --modes de --corruptions fog,snow --severities 5 --frost-images f --limit 3 "
    "--batch 8 --de-step 25 --dda-t 100 --dda-steps 5 --dda-scale 3 --dda-downsample 2 --dda-norm batch "
    "--no-analyses --quiet",
    "eval-shift --classifier a --out o --dda-norm pixel",
    "train-guidance --kind da --out g",
    "train-guidance --kind noisy --out g --steps 4 --batch-size 2 --lr 0.01 --width 8 --checkpoint-every 2 "
    "--labelled-fraction 0.1 --consistency-weight 1 --consistency-delta 5 --image-size 16 --workers 0 --resume",
    "train-guidance --kind other --out g",
    "sample --guidance g --class 3 --out s.png",
    "sample --guidance g --class 3 --out s.png --n 4 --scale 2 --sampler ddim --steps 10 --seed 1 --denoiser d",
    "eval-guidance --guidance a b --out o",
    "eval-guidance --guidance a --out o --clean-classifier c --no-generation --per-class 5 --steps 3 --scale 0.5 "
    "--sampler ddim --data d --denoiser e",
    "pag --out p.png",
    "pag --out p.png --classifier a b --guidance g --t 100 --n 3 --seed 1",
    "toy --out t.png",
    "toy --out t.png --t 10 20 --steps 5 --seed 2",
    "study --out s",
    "study --out s --config c.json --seeds 0 1 2 3 --quick --only shift --device cpu --quiet",
    "show-augmentations --out a.png",
    "show-augmentations --out a.png --denoiser d --data x --seed 1",
    "denoiser-quality --out q.json",
    "denoiser-quality --out q.json --seeds 4 5",
    "no-such-command --out x",
    "train --out r --no-such-flag",
]


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _flag(action: argparse.Action) -> dict:
    kind = type(action).__name__
    return {"flags": list(action.option_strings), "dest": action.dest, "action": kind,
            "default": action.default, "type": getattr(action.type, "__name__", action.type),
            "choices": None if action.choices is None else list(action.choices), "nargs": action.nargs,
            "required": action.required, "metavar": action.metavar, "help": action.help}


def describe(parser: argparse.ArgumentParser) -> dict:
    """Every command's help line, flags (sorted by name: their order on the help page is not pinned) and groups of
    mutually exclusive flags."""
    sub = _subparsers(parser)
    helps = {a.dest: a.help for a in sub._choices_actions}
    return {name: {"help": helps[name],
                   "flags": sorted((_flag(a) for a in p._actions if not isinstance(a, argparse._HelpAction)),
                                   key=lambda f: f["flags"]),
                   "exclusive": sorted(sorted(a.option_strings[0] for a in g._group_actions)
                                       for g in p._mutually_exclusive_groups)}
            for name, p in sub.choices.items()}


def parse(argv: str) -> dict:
    """The parsed Namespace (the handler by name), or the exit code argparse gives up with."""
    try:
        ns = cli.build_parser().parse_args(argv.split())
    except SystemExit as e:
        return {"exit": e.code}
    return {k: (v.__name__ if k == "func" else v) for k, v in sorted(vars(ns).items())}


TRAINING = {"train-diffusion": ("train.diffusion", "train_diffusion"),
            "train": ("train.classifier", "train_classifier"), "train-guidance": ("train.guidance", "train_guidance")}


def run_config(argv: str) -> dict:
    """What a training command line hands its training function: the config's fields that differ from the
    config's defaults, and the run options (all but the device, which depends on the machine)."""
    import dataclasses
    import importlib

    seen = {}

    def capture(cfg, out, **options):
        defaults = dataclasses.asdict(type(cfg)())
        seen.update(config={k: v for k, v in dataclasses.asdict(cfg).items() if v != defaults[k]}, out=str(out),
                    options={k: v for k, v in options.items() if k != "device"})

    module, function = TRAINING[argv.split()[0]]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.import_module(f"diffaug.{module}"), function, capture)
        assert cli.main(argv.split()) == 0
    return json.loads(json.dumps(seen))


def _training_lines() -> list[str]:
    return [a for a in COMMAND_LINES if a.split()[0] in TRAINING and "exit" not in parse(a)]


def snapshot() -> dict:
    return {"commands": describe(cli.build_parser()), "namespaces": {argv: parse(argv) for argv in COMMAND_LINES},
            "configs": {argv: run_config(argv) for argv in _training_lines()}}


@pytest.fixture(scope="module")
def pinned():
    return json.loads(SNAPSHOT.read_text())


def test_every_flag_is_pinned(pinned):
    now = describe(cli.build_parser())
    assert sorted(now) == sorted(pinned["commands"]), "a command appeared or disappeared"
    for name, spec in pinned["commands"].items():
        old = {tuple(f["flags"]): f for f in spec["flags"]}
        new = {tuple(f["flags"]): f for f in now[name]["flags"]}
        assert sorted(old) == sorted(new), (f"{name}: missing {sorted(set(old) - set(new))}, new "
                                            f"{sorted(set(new) - set(old))}; update tests/data/cli_flags.json if "
                                            "the change is deliberate")
        for flags, f in old.items():
            assert new[flags] == f, f"{name} {flags[0]} changed"
        assert now[name] == spec


def test_command_lines_parse_as_pinned(pinned, capsys):
    for argv, expected in pinned["namespaces"].items():
        assert parse(argv) == expected, argv


def test_training_commands_build_the_pinned_configs(pinned):
    assert sorted(pinned["configs"]) == sorted(_training_lines())
    for argv, expected in pinned["configs"].items():
        assert run_config(argv) == expected, argv


def test_no_function_in_cli_is_longer_than_80_lines():
    tree = ast.parse(Path(cli.__file__).read_text())
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert max(lengths.values()) <= 80, sorted(lengths.items(), key=lambda kv: -kv[1])[:3]


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(snapshot(), indent=1) + "\n")
    print(f"wrote {SNAPSHOT}")
