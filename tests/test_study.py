import json

import pytest

from diffaug import InputError
from diffaug.cli import main
from diffaug.study import STAGES, StudyConfig, build_claims


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
        assert set(c["measured"]) == {"mean", "std", "n_seeds"} and isinstance(c["holds"], bool)
    assert {c["stage"] for c in claims} == {"shift", "ood", "certify", "guidance", "semi", "toy"}
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    report = (out / "report.md").read_text()
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


def test_claims_hold_only_when_the_difference_beats_its_spread():
    numbers = {"ood": {"auroc": {"plain": [0.80, 0.82, 0.81], "diffaug": [0.90, 0.91, 0.92]},
                       "near_auroc": {"plain": [0.70, 0.72, 0.71], "diffaug": [0.69, 0.73, 0.70]}},
               "semi": {"fraction": 0.05, "accuracy": {"supervised": [0.5, 0.6, 0.4], "consistency": [0.52, 0.5, 0.5]}}}
    far, near, semi = build_claims(numbers)
    assert far["holds"] is True and far["measured"]["n_seeds"] == 3
    assert abs(far["measured"]["mean"] - 10.0) < 1e-9
    assert near["holds"] is False and "near-OOD" in near["claim"]  # mean -0.33 points
    assert semi["holds"] is False  # mean +0.67 points, std 11 points
