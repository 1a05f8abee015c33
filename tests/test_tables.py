"""summarize and the Markdown renderer against hand-computed numbers (NumPy as the independent reference)."""

import numpy as np
import pytest

from diffaug.report import mean_std
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
