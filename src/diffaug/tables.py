"""Result rows and their tables: what the evaluation jobs return, one ``summarize`` and one Markdown renderer.

An evaluation computes *rows* (a list of dicts, one per measured number); :func:`summarize` groups them and
aggregates one value over a key (e.g. the accuracy of a recipe's classifiers: mean, std, n, the values), and
:func:`markdown_table` renders headers and cells. Cells of the form ``mean +- std`` are
:func:`diffaug.tables.mean_std`, the one formatter.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence


@dataclasses.dataclass
class JobResult:
    """What an evaluation job returns: its ``rows`` (the numbers its ``results`` file holds), further named row
    sets in ``extra`` (e.g. an analysis' rows) and the Markdown ``text`` it wrote (empty on ranks other than 0).
    ``str()`` is the text."""

    text: str
    rows: list[dict]
    extra: dict = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


def _key(row: dict, keys: Sequence[str]) -> tuple:
    return tuple(row[k] for k in keys)


def _keys(keys) -> tuple[str, ...]:
    return (keys,) if isinstance(keys, str) else tuple(keys)


def summarize(rows: list[dict], by, over, value: str) -> list[dict]:
    """Group ``rows`` by the keys ``by``; in each group average ``value`` per distinct ``over`` (one key or a
    tuple of keys: e.g. per classifier, over the conditions it was scored on), then aggregate those averages.

    Groups and, within a group, the ``over`` items keep the order they first appear in ``rows``.

    Args:
        rows: dicts holding every key of ``by`` and ``over`` and ``value``.
        by: the grouping key or keys (may be empty: one group).
        over: the key or keys whose items are aggregated (their per-item means are the ``values``).
        value: the key of the number.

    Returns:
        One dict per group: the ``by`` keys and their values, ``"over"`` (the items, as tuples), ``"values"``
        (their means, in that order), ``"mean"`` (:func:`statistics.fmean`), ``"std"`` (sample std; 0 for one
        value) and ``"n"`` (number of items).
    """
    by, over = _keys(by), _keys(over)
    groups: dict[tuple, dict[tuple, list[float]]] = {}
    for r in rows:
        groups.setdefault(_key(r, by), {}).setdefault(_key(r, over), []).append(r[value])
    out = []
    for group, items in groups.items():
        values = [statistics.fmean(v) for v in items.values()]
        out.append({**dict(zip(by, group)), "over": list(items), "values": values, "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)})
    return out


def lookup(summary: list[dict], **keys) -> dict | None:
    """The group of ``summary`` whose keys equal ``keys`` (None when there is none)."""
    return next((s for s in summary if all(s[k] == v for k, v in keys.items())), None)


def markdown_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table: ``| h1 | h2 |``, ``|---|---|`` and one ``| c1 | c2 |`` line per row."""
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + \
        ["| " + " | ".join(row) + " |" for row in cells]


def mean_std(values, scale: float = 100.0, digits: int = 1) -> str:
    """``"mean +- std"`` of ``values`` times ``scale`` (sample std; 0 for a single value)."""
    import statistics

    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} +- {scale * sd:.{digits}f}"
