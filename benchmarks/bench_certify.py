"""Certification cost: sequential certification (``Smooth.certify_sequential``) vs fixed-n CERTIFY.

    python benchmarks/bench_certify.py [--images 100] [--n 10000] [--classifiers PLAIN_DIR DIFFAUG_DIR]
    python benchmarks/bench_certify.py --only digits --record votes.npz ...   # also save every case's votes
    python benchmarks/bench_certify.py --replay votes.npz [more.npz ...]    # both rules again on saved votes, no model
    python benchmarks/bench_certify.py --replay votes.npz --simulate 100 [--futility 0.05]   # how one run's figures spread
    python benchmarks/bench_certify.py --replay votes.npz --simulate 100 --oracle   # what any futility rule could save
    python benchmarks/bench_certify.py --stage --images 30 --classifiers ...   # the study's certify stage, timed
    python benchmarks/bench_certify.py --sampling [--n 20000] [--batch 1000]   # the sampling-loop section

Both certifiers run in one process on the same cases with the same alpha (0.001), the same n0 (100) and the same
budget (fixed-n CERTIFY draws n; the sequential one at most max_n = n), and the sequential one on the grid radii
0, 0.25, ..., 1.0. Both read the same draws of each case (paired; see ``run_case``). For each setting the script
prints the total model evaluations (base-classifier passes, n0 included; with a denoiser each is a denoiser pass
too) of CERTIFY / sequential (targets: >= 5x on digits DDS, >= 3x on the linear classifier) and the certified
accuracy at every grid radius of both, with the mean and the largest gap per (classifier, sigma) (targets: within 1
point on average, 2 points at every radius). It also prints a *clairvoyant floor*: each case stopped at the first draw
where one Clopper-Pearson look with all of alpha passes the grid radius CERTIFY certified (``clairvoyant_draws``),
with no draw spent ruling out the next radius. It is what a rule told each answer in advance would use; CERTIFY /
floor bounds the ratio any rule that matches CERTIFY case by case can reach with such looks.

Settings:

* **linear**: a linear base classifier in pixel space on 1x2x2 images, whose smoothed ``pA = Phi(margin / sigma)``;
  200 margins spread evenly over [0, 2 sigma], sigma = 0.5 (the grid thresholds are dense there);
* **digits DDS**: the shipped denoiser ``diffaug.load_denoiser("digits")``, plain and diffaug small_cnn classifiers
  trained with the project's recipe (8 epochs, seed 0; or reused from a study run with ``--classifiers``), the first
  ``--images`` test digits, sigma 0.25 and 0.5.

``--simulate R --oracle`` gives the rule a futility test that knows each simulated case's true rate (``oracle_futile``):
no real rule knows it, so its figures bound what any futility rule could buy with the same critical values.

``--sampling`` instead runs the older comparison of ``Smooth.sample_counts`` with a straightforward reference loop
(same counts, speed ratio target >= 1.0).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binom, norm
from torch import nn

import diffaug
from diffaug.evaluate.certify import certified_accuracy
from diffaug.data import load_digits
from diffaug.sequential import FUTILITY, futile, grid_test, look_schedule, lower_confidence_bound, recorded
from diffaug.smoothing import ABSTAIN, cohen_radius

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------------- sampling-loop section (--sampling)
def reference_counts(model, x, sigma, num, batch, gen, num_classes):
    """Repeat the image, add noise, argmax, count per batch."""
    counts = torch.zeros(num_classes, dtype=torch.long)
    with torch.no_grad():
        left = num
        while left:
            b = min(batch, left)
            rep = x.repeat(b, 1, 1, 1)
            pred = model(rep + torch.randn(rep.shape, generator=gen) * sigma).argmax(1)
            counts += torch.bincount(pred, minlength=num_classes)
            left -= b
    return counts


def bench_sampling(args) -> None:
    model = diffaug.create_classifier("small_cnn", 10, 1, seed=0).eval()
    smooth = diffaug.Smooth(model, 10, args.sigma)
    x = load_digits("test").images[0]
    times = {"certify": [], "reference": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a = smooth.sample_counts(x, args.n, args.batch, torch.Generator().manual_seed(0))
        times["certify"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = reference_counts(model, x, args.sigma, args.n, args.batch, torch.Generator().manual_seed(0), 10)
        times["reference"].append(time.perf_counter() - t0)
        assert torch.equal(a, b), (a, b)
    rate = {k: args.n / statistics.median(v) for k, v in times.items()}
    print(f"n={args.n} batch={args.batch} repeats={args.repeats} threads={torch.get_num_threads()} same counts: yes")
    for k, v in rate.items():
        print(f"{k:10s} {v:10.0f} evaluations/s")
    print(f"ratio certify / reference = {rate['certify'] / rate['reference']:.3f}  (target >= 1.0)")


# ---------------------------------------------------------------------- sequential vs fixed-n CERTIFY
class Linear(nn.Module):
    """Class 1 iff ``w . x > 0`` with ``w = (1, 1, 1, 1) / 2`` (unit norm): the margin of ``x`` is ``w . x``."""

    def forward(self, x):
        z = x.flatten(1).sum(1) / 2
        return torch.stack([-z, z], dim=1)


def run_case(smooth, x, label, case_seed, args) -> dict:
    """Both certifiers on one (image, sigma, classifier) case; one row of results (see ``certify_both``)."""
    gen = torch.Generator().manual_seed(case_seed)
    t0 = time.perf_counter()
    selection = smooth.sample_labels(x, 100, args.batch, gen)
    labels = smooth.sample_labels(x, args.n, args.batch, gen)
    return certify_both(selection, labels, label, smooth.sigma, time.perf_counter() - t0, args)


def certify_both(selection, labels, label, sigma, seconds, args) -> dict:
    """CERTIFY and the sequential rule on the same recorded draws of one case.

    The draws are made once (``n0`` = 100 selection draws, then ``n`` estimation draws, ``Smooth.sample_labels``)
    and both rules read them: CERTIFY all ``n`` (``smoothing.cohen_radius``, what ``Smooth.certify`` computes), the
    sequential rule (``sequential.grid_test``, what ``Smooth.certify_sequential`` runs) the prefix up to where it
    stops. The comparison is paired (no Monte Carlo noise between the two) and costs one CERTIFY per case.
    """
    c_hat = int(torch.bincount(selection).argmax())
    return certify_votes(c_hat, (labels == c_hat).numpy(), label, sigma, seconds, args)


def clairvoyant_draws(votes: np.ndarray, p0: float, alpha: float) -> int:
    """The fewest leading draws of ``votes`` whose one-look Clopper-Pearson bound at ``alpha`` passes ``p0``: where a
    rule told the answer in advance could stop, spending all of alpha on that one look (``len(votes)`` when none)."""
    successes = np.cumsum(votes)
    trials = np.arange(1, len(votes) + 1)
    passing = np.flatnonzero(lower_confidence_bound(successes, trials, alpha) > p0)
    return int(passing[0]) + 1 if len(passing) else len(votes)


def oracle_futile(rate: float):
    """A futility rule for ``grid_test(is_futile=)`` that knows the case's true vote rate: it gives the next radius up
    when the chance that the remaining votes, Binomial(max_n - trials, rate), reach its last critical value is below
    the futility level (the shipped rule must use the posterior of a rate it does not know)."""
    return functools.partial(futile, chance=oracle_chance(rate))


@functools.lru_cache(maxsize=None)
def oracle_chance(rate: float):
    """``chance(successes, trials, final_critical, max_n)`` for :func:`diffaug.sequential.futile`: the probability that
    Binomial(max_n - trials, rate) more votes bring the successes to ``final_critical`` (one function per rate, so
    the cached thresholds of ``least_hopeful_successes`` are shared by the cases of a rate)."""
    def chance(successes: int, trials: int, final_critical: int, max_n: int) -> float:
        return float(binom.sf(final_critical - successes - 1, max_n - trials, rate))
    return chance


def certify_votes(c_hat: int, votes: np.ndarray, label: int, sigma: float, seconds: float, args,
                  floor: bool = True, rate: float | None = None) -> dict:
    """Both rules on one case's votes (1 = the draw's label is the selected class ``c_hat``), in draw order, and the
    clairvoyant floor: n0 + :func:`clairvoyant_draws` for CERTIFY's grid radius when CERTIFY certifies the true
    class, n0 alone otherwise (nothing that counts to certify); ``floor=False`` skips it (0). With the case's true
    vote ``rate`` the sequential rule uses :func:`oracle_futile` instead of its own futility test."""
    pred, radius = cohen_radius(c_hat, int(votes.sum()), args.n, args.alpha, sigma)
    thresholds = [float(norm.cdf(r / sigma)) for r in GRID]
    passed, trials = grid_test(recorded(votes), thresholds, args.alpha, look_schedule(args.n, args.batch),
                               getattr(args, "futility", FUTILITY), futile if rate is None else oracle_futile(rate))
    seq_pred, seq_radius = (c_hat, GRID[passed]) if passed >= 0 else (ABSTAIN, 0.0)
    floor = 100 if floor else 0
    if pred == label and floor:
        grid_index = max(k for k, r in enumerate(GRID) if r <= radius)
        floor += clairvoyant_draws(votes, thresholds[grid_index], args.alpha)
    return {"fixed": [str(pred), f"{radius}", str(int(pred == label)), str(100 + args.n)],
            "seq": [str(seq_pred), f"{seq_radius}", str(int(seq_pred == label)), str(100 + trials)],
            "floor": floor, "seconds": (seconds, seconds * (100 + trials) / (100 + args.n)),
            "record": (c_hat, label, sigma, votes)}


def accuracies(rows: list[dict]) -> dict[str, np.ndarray]:
    """Certified accuracy in % at each grid radius of both rules over one group's rows."""
    # certified_accuracy reads rows as [idx, label, predict, radius, correct]
    return {k: 100 * certified_accuracy([["", "", r[k][0], r[k][1], r[k][2]] for r in rows], GRID)
            for k in ("fixed", "seq")}


def evaluations(rows: list[dict]) -> tuple[int, int]:
    """Total model evaluations of CERTIFY and of the sequential rule over some rows."""
    return sum(int(r["fixed"][3]) for r in rows), sum(int(r["seq"][3]) for r in rows)


def figures(groups: dict[str, list[dict]]) -> dict:
    """The setting's figures: evaluations CERTIFY / sequential, and the worst (over groups) absolute mean gap and
    largest single-radius gap in certified accuracy, in points."""
    fixed_evals, seq_evals = evaluations([r for rows in groups.values() for r in rows])
    gaps = [acc["fixed"] - acc["seq"] for acc in map(accuracies, groups.values())]
    return {"ratio": fixed_evals / seq_evals, "worst_mean_gap": max(abs(d.mean()) for d in gaps),
            "worst_gap": max(np.abs(d).max() for d in gaps)}


def accuracy_met(fig: dict) -> bool:
    return fig["worst_mean_gap"] <= 1.0 and fig["worst_gap"] <= 2.0


def summarize(name: str, groups: dict[str, list[dict]], target: float) -> dict:
    """Print the evaluation ratio and the certified-accuracy comparison of one setting; return its figures."""
    fixed_evals, seq_evals = evaluations([r for rows in groups.values() for r in rows])
    ratio = fixed_evals / seq_evals
    secs = [sum(r["seconds"][k] for rows in groups.values() for r in rows) for k in (0, 1)]
    print(f"\n== {name}: {sum(map(len, groups.values()))} cases")
    print(f"model evaluations: CERTIFY {fixed_evals}, sequential {seq_evals}, ratio {ratio:.2f}x (target >= "
          f"{target:g}x) {'MET' if ratio >= target else 'MISSED'}; sampling time CERTIFY {secs[0]:.0f} s, "
          f"sequential ~{secs[1]:.0f} s (its share of the same draws)")
    floor = sum(r["floor"] for rows in groups.values() for r in rows)
    print(f"clairvoyant floor {floor} evaluations: CERTIFY / floor {fixed_evals / floor:.2f}x, sequential / floor "
          f"{seq_evals / floor:.2f}x (each case stopped at the first draw where one full-alpha Clopper-Pearson look "
          f"passes CERTIFY's grid radius; no draw spent ruling out the next radius)")
    for group, rows in groups.items():
        acc = accuracies(rows)
        diff = acc["fixed"] - acc["seq"]
        group_fixed, group_seq = evaluations(rows)
        group_ratio, group_floor = group_fixed / group_seq, group_fixed / sum(r["floor"] for r in rows)
        print(f"  {group}: evaluations CERTIFY / sequential {group_ratio:.2f}x (CERTIFY / floor {group_floor:.2f}x); "
              f"certified accuracy % at r = "
              f"{', '.join(f'{r:g}' for r in GRID)}")
        print("    CERTIFY    " + " ".join(f"{a:6.1f}" for a in acc["fixed"]))
        print("    sequential " + " ".join(f"{a:6.1f}" for a in acc["seq"]))
        print(f"    gap: mean {diff.mean():+.2f} points, largest {np.abs(diff).max():.2f} points")
    fig = figures(groups)
    print(f"accuracy: worst mean gap {fig['worst_mean_gap']:.2f} points (target <= 1), worst gap at a radius "
          f"{fig['worst_gap']:.2f} points (target <= 2) {'MET' if accuracy_met(fig) else 'MISSED'}")
    return fig


def bench_linear(args) -> dict:
    sigma = 0.5
    smooth = diffaug.Smooth(Linear(), 2, sigma)
    rows = []
    for i, m in enumerate(np.linspace(0, 2 * sigma, args.linear_cases)):
        rows.append(run_case(smooth, torch.full((1, 2, 2), m / 2), 1, args.seed * 1_000_003 + 2 * i, args))
    return summarize(f"linear classifier, margins evenly over [0, 2 sigma], sigma = {sigma:g}",
                     {f"linear sigma={sigma:g}": rows}, 3.0)


def digits_classifiers(args) -> dict[str, Path]:
    if args.classifiers:
        return dict(zip(("plain", "diffaug"), map(Path, args.classifiers)))
    from diffaug.train.classifier import TrainConfig, train_classifier

    root = Path(tempfile.mkdtemp(prefix="bench_certify_"))
    for recipe in ("plain", "diffaug"):
        print(f"training {recipe} (8 epochs, seed {args.seed}) -> {root / recipe}", flush=True)
        train_classifier(TrainConfig(data="digits", recipe=recipe, epochs=8, seed=args.seed,
                                     denoiser="digits" if recipe == "diffaug" else None),
                         root / recipe, progress=False)
    return {"plain": root / "plain", "diffaug": root / "diffaug"}


def bench_digits(args) -> dict:
    """The digits DDS setting. For each (test digit, sigma) the noisy copies are drawn and denoised once and both
    classifiers label the same copies (``Smooth.sample_labels(..., classifiers=...)``), as they would with the
    same seed: the shared denoiser pass halves the cost."""
    from diffaug.classifier import load_classifier

    den = diffaug.load_denoiser("digits")
    test = load_digits("test")
    if not 0 <= args.start <= args.start + args.images <= len(test.labels):
        raise SystemExit(f"--start {args.start} --images {args.images} runs past the {len(test.labels)} test digits; "
                         "pass a smaller --start or --images")
    classifiers = {name: load_classifier(folder) for name, folder in digits_classifiers(args).items()}
    heads = list(classifiers.values())
    groups = {f"{name} sigma={s:g}": [] for name in classifiers for s in args.sigmas}
    for i in range(args.start, args.start + args.images):
        x, label = test.images[i], int(test.labels[i])
        for s in args.sigmas:
            smooth = diffaug.Smooth(heads[0], 10, s, denoiser=den)
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + 2 * i)
            t0 = time.perf_counter()
            selection = smooth.sample_labels(x, 100, args.batch, gen, classifiers=heads)
            labels = smooth.sample_labels(x, args.n, args.batch, gen, classifiers=heads)
            seconds = (time.perf_counter() - t0) / len(heads)
            for k, name in enumerate(classifiers):
                row = certify_both(selection[k], labels[k], label, s, seconds, args)
                groups[f"{name} sigma={s:g}"].append(row)
                print(f"image {i} {name} sigma={s:g}: CERTIFY {row['fixed'][:2]} sequential {row['seq'][:2]} "
                      f"({row['seq'][3]} evaluations)", flush=True)
        if args.record:
            save_votes(args.record, groups, args)
    sigmas = ", ".join(map(str, args.sigmas))
    return summarize(f"digits DDS, {args.images} test digits from #{args.start}, sigma {sigmas}", groups, 5.0)


# ---------------------------------------------------------------------- the study's certify stage (--stage)
def bench_stage(args) -> None:
    """Wall time of ``run_certify`` with the study's certify-stage settings (n0 50, n = max_n 500, alpha 0.001,
    batch 500, sigma 0.25 / 0.5, the shipped denoiser, plain + diffaug classifiers): fixed-n CERTIFY vs sequential,
    interleaved ``--repeats`` times on the same images, each run into a fresh folder (no resume)."""
    from diffaug.evaluate.certify import run_certify

    classifiers = [str(p) for p in digits_classifiers(args).values()]
    common = dict(data="digits", classifiers=classifiers, denoiser="digits", sigmas=[0.25, 0.5], n0=50, n=500,
                  alpha=0.001, batch_size=500, skip=1, limit=args.images, seed=0, progress=False)
    seconds, evaluations = {"fixed": [], "sequential": []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for kind in ("fixed", "sequential"):
                t0 = time.perf_counter()
                res = run_certify(**common, out=Path(tmp) / f"{kind}{r}", sequential=kind == "sequential")
                seconds[kind].append(time.perf_counter() - t0)
                evaluations[kind] = sum(int(row[6]) if kind == "sequential" else 550
                                        for by_sigma in res.extra["certify"].values()
                                        for rows in by_sigma.values() for row in rows)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(f"study certify stage settings, {args.images} digits x 2 classifiers x 2 sigmas, repeats {args.repeats}, "
          f"threads {torch.get_num_threads()}")
    for k in seconds:
        print(f"  {k:10s} median {med[k]:7.2f} s  ({', '.join(f'{t:.2f}' for t in seconds[k])})  "
              f"evaluations {evaluations[k]}")
    print(f"evaluations fixed / sequential = {evaluations['fixed'] / evaluations['sequential']:.2f}x; wall time "
          f"fixed / sequential = {med['fixed'] / med['sequential']:.2f}x (images certified in the same time)")


# ---------------------------------------------------------------------- recorded votes (--record / --replay)
def save_votes(path: Path, groups: dict[str, list[dict]], args) -> None:
    """Write every case's selected class, label, sigma and votes so far (``np.savez_compressed``, votes bit-packed;
    written to a temporary file and renamed, so an interrupted run leaves the last complete image's file)."""
    arrays = {"n": np.array(args.n), "alpha": np.array(args.alpha), "batch": np.array(args.batch),
              "groups": np.array(list(groups))}
    for g, (name, rows) in enumerate(groups.items()):
        records = [r["record"] for r in rows]
        arrays[f"g{g}_meta"] = np.array([[c, lab, sigma] for c, lab, sigma, _ in records], dtype=float).reshape(-1, 3)
        arrays[f"g{g}_votes"] = np.packbits(np.array([v for *_, v in records], dtype=bool).reshape(-1, args.n), axis=1)
    tmp = Path(f"{path}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_votes(args) -> dict[str, list[tuple]]:
    """The cases of one or more ``--record`` files (e.g. runs on other ``--start`` digits, recorded side by side),
    ``{group: [(c_hat, label, sigma, votes), ...]}``, each group's cases in file order; sets ``args.n``,
    ``args.alpha`` and ``args.batch`` from them (files that differ in these are refused)."""
    paths = replay_paths(args)
    cases, settings = {}, None
    for path in paths:
        data = np.load(path)
        found = int(data["n"]), float(data["alpha"]), int(data["batch"])
        if settings not in (None, found):
            sys.exit(f"bench_certify.py: error: {path} was recorded with n, alpha, batch = {found}, {paths[0]} with "
                     f"{settings}: replay together only recordings made with the same settings")
        settings = found
        for g, name in enumerate(data["groups"]):
            votes = np.unpackbits(data[f"g{g}_votes"], axis=1, count=found[0])
            cases.setdefault(str(name), []).extend(
                (int(c), int(lab), float(sigma), v) for (c, lab, sigma), v in zip(data[f"g{g}_meta"], votes))
    args.n, args.alpha, args.batch = settings
    return cases


def replay_paths(args) -> list[Path]:
    """The ``--replay`` files (one path or a list of them)."""
    return list(args.replay) if isinstance(args.replay, (list, tuple)) else [args.replay]


def replayed(args) -> str:
    """The ``--replay`` file names, for the printed headings."""
    return " + ".join(map(str, replay_paths(args)))


def bench_replay(args) -> dict:
    """Both rules on the votes of a ``--record`` file, with no model: re-measures a rule change on the same draws."""
    cases = load_votes(args)
    groups = {name: [certify_votes(c, v, lab, sigma, 0.0, args) for c, lab, sigma, v in rows]
              for name, rows in cases.items()}
    images = len(next(iter(groups.values()))) if groups else 0
    return summarize(f"replay of {replayed(args)}: {images} cases per group", groups, 5.0)


def bench_simulate(args) -> list[dict]:
    """How the figures of one run spread: ``--simulate R`` fresh runs of both rules on the cases of a ``--record``
    file (a parametric bootstrap). Each case keeps its selected class and label; its ``n`` votes are drawn anew,
    Bernoulli at its recorded rate ``(S + 1/2) / (n + 1)`` (the votes of one case are i.i.d., so this is the law of
    a rerun with other noise, up to the error of that rate). Prints the ratio's mean and range and how often each
    target is met. With ``args.oracle`` the futility test knows that rate (:func:`oracle_futile`)."""
    cases = load_votes(args)
    rng = np.random.default_rng(args.seed)
    oracle = getattr(args, "oracle", False)
    runs = []
    for _ in range(args.simulate):
        groups = {}
        for name, rows in cases.items():
            rates = [float((v.sum() + 0.5) / (args.n + 1)) for *_, v in rows]
            groups[name] = [certify_votes(c, rng.random(args.n) < rate, lab, sigma, 0.0, args, floor=False,
                                          rate=rate if oracle else None)
                            for (c, lab, sigma, _), rate in zip(rows, rates)]
        runs.append(figures(groups))
    ratio = np.array([f["ratio"] for f in runs])
    met = np.array([accuracy_met(f) for f in runs])
    told = " (oracle: the futility test knows each case's true rate)" if oracle else ""
    print(f"simulated reruns of {replayed(args)}: {args.simulate} (seed {args.seed}), futility {args.futility}{told}, "
          f"{sum(map(len, cases.values()))} cases each")
    print(f"evaluations CERTIFY / sequential: mean {ratio.mean():.2f}x, 5-95 % {np.percentile(ratio, 5):.2f}-"
          f"{np.percentile(ratio, 95):.2f}x, range {ratio.min():.2f}-{ratio.max():.2f}x; >= 5x in {(ratio >= 5).mean():.0%}")
    print(f"accuracy targets (mean gap <= 1, every radius <= 2 points) met in {met.mean():.0%} of runs; worst mean "
          f"gap {np.mean([f['worst_mean_gap'] for f in runs]):.2f}, worst single gap "
          f"{np.mean([f['worst_gap'] for f in runs]):.2f} points on average; both targets in "
          f"{(met & (ratio >= 5)).mean():.0%}")
    return runs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sampling", action="store_true", help="the sample_counts vs reference-loop section instead")
    p.add_argument("--stage", action="store_true", help="wall time of the study's certify stage settings, fixed-n "
                   "vs sequential, instead (--images digits, --repeats)")
    p.add_argument("--n", type=int, default=None, help="CERTIFY's n = the sequential max_n (default 10000; "
                   "20000 with --sampling)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--images", type=int, default=100, help="test digits (digits DDS setting)")
    p.add_argument("--start", type=int, default=0, help="(digits) the first test digit (e.g. 100 for a second, "
                   "held-out set of cases to choose a rule's settings on)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--linear-cases", type=int, default=200)
    p.add_argument("--classifiers", nargs=2, metavar=("PLAIN", "DIFFAUG"),
                   help="reuse trained plain and diffaug classifiers (e.g. a study run's stages/classifiers/*-s0) "
                   "instead of training them")
    p.add_argument("--only", choices=("linear", "digits"), help="run one setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", type=Path, help="(digits) save every case's votes to this .npz, image by image")
    p.add_argument("--replay", type=Path, nargs="+", help="instead of sampling, run both rules on the votes of "
                   "--record files (several: their cases together, e.g. two runs on other --start digits; alpha, n and "
                   "batch are read from them)")
    p.add_argument("--simulate", type=int, metavar="R", help="with --replay: R simulated reruns of the recorded cases "
                   "(fresh votes at each case's recorded rate); prints how the figures spread")
    p.add_argument("--futility", type=float, default=FUTILITY, help="the sequential rule's futility level (default "
                   "%(default)s; Smooth.certify_sequential's futility=): what a bolder level buys and costs")
    p.add_argument("--oracle", action="store_true", help="with --simulate: the futility test knows each case's true "
                   "rate (no real rule does): an upper bound on what any futility rule could save")
    p.add_argument("--repeats", type=int, default=5, help="(--sampling, --stage) timing repeats")
    p.add_argument("--sigma", type=float, default=0.5, help="(--sampling) noise level")
    args = p.parse_args(argv)
    if not 0 <= args.futility < 1:
        p.error(f"--futility must lie in [0, 1) (0 never gives a radius up early), got {args.futility}")
    if args.simulate is not None and (args.simulate < 1 or not args.replay):
        p.error("--simulate R needs R >= 1 and --replay votes.npz (the recorded cases it reruns)")
    if args.oracle and not args.simulate:
        p.error("--oracle needs --simulate R (only a simulated rerun knows each case's true rate)")
    if args.sampling:
        args.n = args.n or 20000
        bench_sampling(args)
        return
    if args.stage:
        bench_stage(args)
        return
    if args.replay and args.simulate:
        bench_simulate(args)
        return
    if args.replay:
        replay_figures = bench_replay(args)
        print(f"\nsummary: replay: {replay_figures['ratio']:.2f}x fewer evaluations")
        return
    args.n = args.n or 10000
    print(f"alpha={args.alpha} n0=100 n=max_n={args.n} grid radii {GRID} batch={args.batch} "
          f"threads={torch.get_num_threads()}", flush=True)
    results = {}
    if args.only in (None, "linear"):
        results["linear"] = bench_linear(args)
    if args.only in (None, "digits"):
        results["digits"] = bench_digits(args)
    print("\nsummary: " + "; ".join(f"{k}: {v['ratio']:.2f}x fewer evaluations, accuracy gap mean <= "
                                    f"{v['worst_mean_gap']:.2f} / max {v['worst_gap']:.2f} points"
                                    for k, v in results.items()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
