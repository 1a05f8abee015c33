"""summarize and the Markdown renderer against hand-computed numbers (NumPy as the independent reference)."""

import numpy as np
import pytest

from diffaug.tables import mean_std
from diffaug.tables import JobResult, lookup, markdown_table, summarize

# two recipes; classifier a1 is scored twice (two conditions), the others once
ROWS = [
    {"recipe": "plain", "classifier": "a1", "cond": "x", "acc": 0.50},
    {"recipe": "plain", "classifier": "a1", "cond": "y", "acc": 0.70},
    {"recipe": "plain", "classifier": "a2", "cond": "x", "acc": 0.80},
    {"recipe": "diffaug", "classifier": "b1", "cond": "x", "acc": 0.90},
]


def test_summarize_averages_per_item_then_over_items():
    out = summarize(ROWS, by="recipe", over="classifier", value="acc")
    assert [s["recipe"] for s in out] == ["plain", "diffaug"]  # first-seen order
    plain = lookup(out, recipe="plain")
    assert plain["over"] == [("a1",), ("a2",)] and plain["n"] == 2
    assert plain["values"] == pytest.approx([0.6, 0.8])  # a1: mean of its two conditions
    assert plain["mean"] == pytest.approx(np.mean([0.6, 0.8]))
    assert plain["std"] == pytest.approx(np.std([0.6, 0.8], ddof=1))  # sample std
    single = lookup(out, recipe="diffaug")
    assert (single["n"], single["mean"], single["std"]) == (1, 0.9, 0.0)  # one value: std 0
    assert lookup(out, recipe="nope") is None


def test_summarize_over_several_keys_and_no_grouping():
    every_row = summarize(ROWS, by=(), over=("classifier", "cond"), value="acc")
    assert len(every_row) == 1 and every_row[0]["n"] == 4
    assert every_row[0]["mean"] == pytest.approx(np.mean([r["acc"] for r in ROWS]))
    per_cond = summarize(ROWS, by=("recipe", "cond"), over="classifier", value="acc")
    assert [(s["recipe"], s["cond"], s["n"]) for s in per_cond] == [("plain", "x", 2), ("plain", "y", 1),
                                                                   ("diffaug", "x", 1)]


def test_markdown_table_and_mean_std_cells():
    s = lookup(summarize(ROWS, "recipe", "classifier", "acc"), recipe="plain")
    lines = markdown_table(["recipe (n)", "accuracy %"], [[f"plain ({s['n']})", mean_std(s["values"])]])
    # 60 and 80 %: mean 70.0, sample std sqrt(200) = 14.14
    assert lines == ["| recipe (n) | accuracy % |", "|---|---|", "| plain (2) | 70.0 +- 14.1 |"]
    assert markdown_table(["a"], []) == ["| a |", "|---|"]


def test_job_result_prints_its_text():
    res = JobResult("# table\n", [{"a": 1}])
    assert str(res) == "# table\n" and res.rows == [{"a": 1}] and res.extra == {}


def test_certify_returns_rows_that_make_its_table(tmp_path):
    """run_certify's rows: one per classifier x sigma x radius of the table, the table's numbers; the best-sigma
    curve (the study's number) is the table's ``best`` line."""
    from diffaug.evaluate.certify import best_sigma_curves, run_certify, table_radii
    from diffaug.classifier import create_classifier

    folders = []
    for seed in (0, 1):
        folders.append(tmp_path / f"c{seed}")
        create_classifier("small_cnn", 10, 1, seed=seed, width=8).save_pretrained(folders[-1], extra={"recipe": "plain"})
    res = run_certify(data="digits", classifiers=[str(f) for f in folders], denoiser=None, sigmas=[0.25, 0.5], n0=5,
                      n=20, alpha=0.01, batch_size=20, skip=1, limit=2, seed=0, out=tmp_path / "o", progress=False)
    radii = table_radii([0.25, 0.5])
    assert len(res.rows) == 2 * 2 * len(radii) and res.text == (tmp_path / "o" / "table.md").read_text()
    assert set(res.extra["certify"]) == {"c0", "c1"}
    for name, best in best_sigma_curves(res.rows).items():
        curves = [[r["certified_accuracy"] for r in res.rows if r["classifier"] == name and r["sigma"] == s]
                  for s in (0.25, 0.5)]
        np.testing.assert_array_equal(best, np.max(curves, axis=0))
        assert f"| {name} | best | - | " + " | ".join(f"{a:.3f}" for a in best) + " |" in res.text
