import json

import pytest

from diffaug import InputError
from diffaug.cli import main
from diffaug.study.stages import STAGES, StudyConfig, build_claims


@pytest.mark.slow
def test_quick_study_writes_the_report_and_reuses_stages(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["study", "--quick", "--out", str(out), "--quiet"]) == 0
    for name in ("report.html", "report.md", "results.json"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["stages"]) == set(STAGES) and all(results["stages"][s]["seconds"] for s in STAGES)
    claims = results["claims"]
    assert len(claims) >= 10
    for c in claims:
        assert {"claim", "paper", "measured", "holds"} <= set(c)
        assert {"mean", "std", "n_seeds"} <= set(c["measured"]) and isinstance(c["holds"], bool)
        assert c["verdict"] in ("holds", "not settled", "contradicted", "does not hold") and "ci95" in c
        assert ("holm_p" in c) and (c["holm_p"] is None) == (c["p_one_sided"] is None)
    speed = next(c for c in claims if c["rule"] == "ratio")  # one ratio per condition: 3 corruptions, severity 5
    assert speed["measured"]["per_condition"]["n"] == 3 and speed["measured"]["per_condition"]["min"] > 0
    assert {c["stage"] for c in claims} == {"shift", "ood", "certify", "guidance", "semi", "toy"}
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    report = (out / "report.md").read_text()
    assert "**A reduced run** (budgets below the study's defaults: epochs 1 (default 8)," in report
    for heading in ("Covariate shift", "Near-OOD: classifiers trained on classes [0, 1, 2, 3, 4]", "near-OOD (holdout)",
                    "Certified accuracy", "Guided generation", "Semi-supervised DA guidance classifier",
                    "Toy 2-D", "DE accuracy vs largest member t", "Mean prediction entropy"):
        assert heading in report, heading
    keys = {s: results["stages"][s]["key"] for s in STAGES}

    # a settings change reruns only the stages that depend on it
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**{k: v for k, v in json.loads(json.dumps(StudyConfig.quick().__dict__)).items()
                                  if k != "device"}, "toy_steps": 50}))
    capsys.readouterr()
    assert main(["study", "--config", str(cfg), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[study] classifiers: cached" in printed and "[study] toy: done" in printed
    again = json.loads((out / "results.json").read_text())
    changed = [s for s in STAGES if again["stages"][s]["key"] != keys[s]]
    assert changed == ["toy"]


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    for text, message in (("{", "not valid JSON"), ('{"epochz": 3}', "unknown setting(s) epochz"),
                          ('{"epochs": "ten"}', "must be a int"), ("[1]", "JSON object")):
        bad.write_text(text)
        assert main(["study", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert main(["study", "--quick", "--only", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown stage" in capsys.readouterr().err
    with pytest.raises(InputError, match="keep both"):
        StudyConfig(recipes=["plain"]).validate()
    with pytest.raises(InputError, match="ood_holdout_recipes compares plain with diffaug"):
        StudyConfig(ood_holdout_recipes=["diffaug"]).validate()
    with pytest.raises(InputError, match="guidance_per_class must be >= 2, got 1"):
        StudyConfig(guidance_per_class=1).validate()
    with pytest.raises(InputError, match="semi_fraction must lie in"):
        StudyConfig(semi_fraction=1.0).validate()
    with pytest.raises(InputError, match="distinct class indices"):
        StudyConfig(ood_id_classes=[1, 1]).validate()
    for classes in ([0, 10], list(range(10))):
        bad.write_text(json.dumps({"ood_id_classes": classes}))
        assert main(["study", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
        assert "must leave out at least one of the 10 classes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_claims_hold_only_when_the_95_interval_excludes_zero():
    numbers = {"ood": {"auroc": {"plain": [0.80, 0.82, 0.81], "diffaug": [0.90, 0.91, 0.92]},
                       "near_auroc": {"plain": [0.70, 0.72, 0.71], "diffaug": [0.69, 0.73, 0.70]}},
               "semi": {"fraction": 0.05, "accuracy": {"supervised": [0.5, 0.6, 0.4], "consistency": [0.52, 0.5, 0.5]}},
               "toy": {"distances": {"150": {"noisy": [2.0, 1.2, 3.0], "one_step": [1.0, 1.0, 1.0]}}}}
    far, near, semi, toy = build_claims(numbers)
    assert far["holds"] is True and far["verdict"] == "holds" and far["measured"]["n_seeds"] == 3
    assert abs(far["measured"]["mean"] - 10.0) < 1e-9 and far["ci95"][0] > 0
    assert near["verdict"] == "not settled" and not near["holds"]  # mean -0.33 points
    assert semi["verdict"] == "not settled"  # mean +0.67 points, std 11 points
    # mean 1.07 > std 0.90 (the old one-sigma rule said "holds"), but the interval [-1.17, 3.30] straddles zero
    assert toy["verdict"] == "not settled" and toy["ci95"][0] < 0 < toy["ci95"][1]
    assert toy["seeds_to_settle"] > 3
    flipped = build_claims({"semi": {"fraction": 0.05, "accuracy": {"supervised": [0.6, 0.61, 0.62],
                                                                    "consistency": [0.5, 0.5, 0.51]}}})[0]
    assert flipped["verdict"] == "contradicted" and not flipped["holds"]
    one_seed = build_claims({"semi": {"fraction": 0.05, "accuracy": {"supervised": [0.5], "consistency": [0.6]}}})[0]
    assert one_seed["verdict"] == "not settled" and one_seed["ci95"] is None


def test_interval_and_seeds_to_settle_match_scipy():
    import numpy as np
    from scipy import stats as sps

    from diffaug.stats import paired_t_interval, seeds_to_settle

    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        diffs = rng.normal(0.5, 1.0, n)
        ref = sps.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
        lo, hi = paired_t_interval(diffs)
        assert abs(lo - ref.low) < 1e-9 and abs(hi - ref.high) < 1e-9
    assert paired_t_interval([1.0]) is None
    for mean, sd in ((1.0, 0.9), (0.3, 1.0), (2.0, 0.1)):
        n = seeds_to_settle(mean, sd)
        half = lambda k: sps.t.ppf(0.975, k - 1) * sd / np.sqrt(k)  # noqa: E731
        assert half(n) < mean and (n == 2 or half(n - 1) >= mean)  # the smallest such n
    assert seeds_to_settle(0.0, 1.0) is None and seeds_to_settle(1.0, 0.0) is None  # no spread: no t-interval


def test_claims_without_spread_unequal_arms_and_non_numbers_are_not_settled_or_refused():
    """Equal differences on every seed (a count metric one image apart) gave a zero-width interval and "holds";
    arms of unequal length were paired by zip, silently dropping a seed; a NaN stopped the study with an
    AttributeError from the statistics module."""
    from diffaug.stats import one_sided_p, paired_t_interval, seeds_to_settle
    from diffaug.study.stages import _claim

    same = _claim("c", "p", [0.1, 0.1, 0.1], "points", 100)
    assert same["verdict"] == "not settled" and same["ci95"] is None and same["seeds_to_settle"] is None
    # the same +4 images of 40 on every seed, from counts 0, 1 and 7: equal up to rounding (std ~1e-15), not 0
    rounded = _claim("c", "p", [(b + 4) / 40 - b / 40 for b in (0, 1, 7)], "points", 100)
    assert rounded["verdict"] == "not settled" and rounded["ci95"] is None and rounded["p_one_sided"] is None
    assert paired_t_interval([0.1, 0.1]) is None and one_sided_p([0.1, 0.1]) is None
    with pytest.raises(ValueError, match="one value per seed each, got 3 and 2"):
        build_claims({"semi": {"fraction": 0.05, "accuracy": {"consistency": [0.6, 0.7, 0.8],
                                                             "supervised": [0.5, 0.6]}}})
    nan = _claim("c", "p", [0.1, float("nan"), 0.2])
    assert nan["verdict"] == "not computable" and nan["measured"] is None and not nan["holds"]
    with pytest.raises(ValueError, match="must be finite numbers"):
        paired_t_interval([0.1, float("inf")])
    with pytest.raises(ValueError, match="level must lie in"):
        paired_t_interval([0.1, 0.2], level=1.5)
    with pytest.raises(ValueError, match="std must be >= 0"):
        seeds_to_settle(1.0, -0.1)
    with pytest.raises(ValueError, match="unknown claim rule"):
        _claim("c", "p", [0.1, 0.2], rule="negative")


def test_one_sided_p_and_holm_match_scipy_and_the_definition():
    import numpy as np
    from scipy import stats as sps

    from diffaug.stats import holm, one_sided_p
    from diffaug.study.stages import adjust_for_multiplicity

    rng = np.random.default_rng(1)
    for n in (2, 3, 7):
        diffs = rng.normal(0.3, 1.0, n)
        t = diffs.mean() / (diffs.std(ddof=1) / np.sqrt(n))
        assert abs(one_sided_p(diffs) - sps.t.sf(t, n - 1)) < 1e-12
    # Holm 1979 by its definition: reject H_(k) when p_(j) <= a / (m - j + 1) for every j <= k; the adjusted
    # p-value is the smallest a that rejects it
    p = [0.01, 0.04, 0.03, 0.005]
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    for m in (1, 2, 5):
        for _ in range(20):
            ps = rng.uniform(0, 0.2, m)
            order = np.argsort(ps)
            for a in (0.01, 0.025, 0.05, 0.1):
                rejected = set()
                for j in range(m):
                    if ps[order[j]] > a / (m - j):
                        break
                    rejected.add(int(order[j]))
                assert {i for i, v in enumerate(holm(ps)) if v <= a} == rejected
    assert all(h >= r for h, r in zip(holm([0.2, 0.01, 0.5]), [0.2, 0.01, 0.5]))
    claims = adjust_for_multiplicity([{"p_one_sided": 0.001}, {"p_one_sided": None}, {"p_one_sided": 0.02}])
    assert [c["holm_p"] for c in claims] == pytest.approx([0.002, None, 0.02]) and \
        [c["holds_holm"] for c in claims] == [True, None, True]


def test_report_puts_the_forest_plot_first_and_scrolls_wide_tables(tmp_path):
    from diffaug.study.stages import write_report

    numbers = {"ood": {"auroc": {"plain": [0.80, 0.82, 0.81], "diffaug": [0.90, 0.91, 0.92]},
                       "near_auroc": {"plain": [0.70, 0.72, 0.71], "diffaug": [0.69, 0.73, 0.70]}}}
    results = {"config": {"data": "digits", "denoiser": "digits", "seeds": [0, 1, 2], "recipes": ["plain", "diffaug"]},
               "seconds_all_stages": 1.0, "seconds_this_run": 1.0, "peak_memory_mib": 1.0,
               "stages": {s: {"seconds": None} for s in STAGES},
               "claims": [{**c, "stage": "ood"} for c in build_claims(numbers)]}
    write_report(tmp_path, results)
    md = (tmp_path / "report.md").read_text()
    assert md.index("![claims") < md.index("| claim |")  # the plot comes before the table
    assert "| 95 % interval |" in md and "seeds would settle it" in md
    assert (tmp_path / "claims.png").stat().st_size > 1000
    html = (tmp_path / "report.html").read_text()
    assert "<div class='scroll'><table>" in html and ".scroll{overflow-x:auto" in html
