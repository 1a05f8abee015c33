"""benchmarks/bench_certify.py's record / replay / simulate path on a small synthetic record (no model)."""

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_certify.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_certify", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_record(bench, path: Path, n: int = 600) -> dict:
    """Two groups of cases with known vote rates (0, 90 %, 99.5 %, 100 % right), saved as ``--record`` would."""
    rng = np.random.default_rng(0)
    args = argparse.Namespace(n=n, alpha=0.001, batch=100)
    groups = {}
    for g, sigma in enumerate((0.25, 0.5)):
        groups[f"toy sigma={sigma}"] = [
            bench.certify_votes(3, rng.random(n) < rate, 3 if k else 1, sigma, 0.0, args)
            for k, rate in enumerate((0.0, 0.9, 0.995, 1.0, 1.0, 0.9))]
    bench.save_votes(path, groups, args)
    return groups


def test_replay_gives_the_recorded_runs_figures(bench, tmp_path, capsys):
    groups = synthetic_record(bench, tmp_path / "votes.npz")
    recorded = bench.figures(groups)
    replayed = bench.bench_replay(argparse.Namespace(replay=tmp_path / "votes.npz"))
    assert replayed == pytest.approx(recorded)
    assert recorded["ratio"] > 1.3  # the clear cases stop early (1.64 here)
    assert "sequential" in capsys.readouterr().out


def test_recordings_replay_together_as_one(bench, tmp_path, capsys):
    groups = synthetic_record(bench, tmp_path / "votes.npz")
    args = argparse.Namespace(n=600, alpha=0.001, batch=100)
    halves = [{name: rows[:2] for name, rows in groups.items()}, {name: rows[2:] for name, rows in groups.items()}]
    for k, half in enumerate(halves):
        bench.save_votes(tmp_path / f"half{k}.npz", half, args)
    together = bench.bench_replay(argparse.Namespace(replay=[tmp_path / "half0.npz", tmp_path / "half1.npz"]))
    assert together == pytest.approx(bench.figures(groups))
    assert "half0.npz + " in capsys.readouterr().out
    bench.save_votes(tmp_path / "other_n.npz", halves[0], argparse.Namespace(n=600, alpha=0.01, batch=100))
    with pytest.raises(SystemExit, match="replay together only recordings made with the same settings"):
        bench.load_votes(argparse.Namespace(replay=[tmp_path / "half0.npz", tmp_path / "other_n.npz"]))


def test_simulated_reruns_are_seeded_and_vary(bench, tmp_path, capsys):
    synthetic_record(bench, tmp_path / "votes.npz")

    def runs(seed):
        return bench.bench_simulate(argparse.Namespace(replay=tmp_path / "votes.npz", simulate=4, seed=seed,
                                                    futility=0.01))

    a, b, c = runs(0), runs(0), runs(1)
    assert len(a) == 4 and a == b
    assert [r["ratio"] for r in a] != [r["ratio"] for r in c]
    assert all(r["ratio"] > 1.0 for r in a)
    assert "met in" in capsys.readouterr().out


def test_simulate_needs_a_record(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--simulate", "3"])
    assert "--simulate R needs R >= 1 and --replay" in capsys.readouterr().err


def test_a_bolder_futility_level_stops_sooner(bench, tmp_path):
    groups = synthetic_record(bench, tmp_path / "votes.npz")
    cases = [r["record"] for rows in groups.values() for r in rows]
    args = argparse.Namespace(n=600, alpha=0.001, batch=100)

    def draws(futility):
        args.futility = futility
        return sum(int(bench.certify_votes(c, v, lab, s, 0.0, args, floor=False)["seq"][3]) for c, lab, s, v in cases)

    assert draws(0.0) > draws(0.01) >= draws(0.3)


def test_oracle_futility_matches_a_direct_binomial_scan(bench):
    from scipy.stats import binom

    for trials, critical, max_n, level, rate in [(100, 590, 600, 0.01, 0.98), (300, 560, 600, 0.05, 0.9),
                                                 (50, 20, 600, 0.2, 0.01), (500, 599, 600, 0.01, 0.999)]:
        chances = [binom.sf(critical - s - 1, max_n - trials, rate) for s in range(trials + 1)]
        futile = bench.oracle_futile(rate)
        assert [futile(s, trials, critical, max_n, level) for s in range(trials + 1)] == [c < level for c in chances]


def test_oracle_reruns_give_up_hopeless_radii_sooner(bench, tmp_path, capsys):
    # rates 0.8 and 0.96 at sigma 0.25 pass Phi(1) = 0.84 resp. Phi(0) but not the next threshold; the shipped rule
    # must learn that from the votes, the oracle knows it from the start
    rng = np.random.default_rng(0)
    args = argparse.Namespace(n=2000, alpha=0.001, batch=100)
    rows = [bench.certify_votes(3, rng.random(2000) < rate, 3, 0.25, 0.0, args) for rate in (0.8, 0.96) * 6]
    bench.save_votes(tmp_path / "votes.npz", {"toy": rows}, args)

    def runs(oracle):
        return bench.bench_simulate(argparse.Namespace(replay=tmp_path / "votes.npz", simulate=3, seed=0,
                                                    futility=0.01, oracle=oracle))

    shipped, oracle = runs(False), runs(True)
    assert all(o["ratio"] > 1.2 * s["ratio"] for o, s in zip(oracle, shipped))
    assert "oracle: the futility test knows each case's true rate" in capsys.readouterr().out


def test_oracle_needs_simulate(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--oracle", "--only", "linear"])
    assert "--oracle needs --simulate R" in capsys.readouterr().err


def test_bad_futility_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--futility", "1.5", "--only", "linear"])
    assert "--futility must lie in [0, 1)" in capsys.readouterr().err
