"""The report's verdict in words: one sentence per split, generated from the tidy rows.

Each sentence states the proxy's agreement with the model on the split (with its 95% interval), its
gap to the reference split (``iid``) after length matching (or raw, where no matched gap exists), and
the model's own accuracy there. Whether the proxy *under-states* or *over-states* the model's
generalization is said only when both hold:

* the proxy is faithful in distribution: agreement on the reference split >= :data:`FAITHFUL`, and
* the gap of ``accuracy_change`` (proxy minus original accuracy) to the reference has an interval
  that excludes 0: negative, the proxy loses more accuracy out of distribution than the model does
  (it under-states the model's generalization); positive, it over-states it.

A proxy that is not faithful in distribution is said to be so, and nothing is concluded from its
gaps. Numbers are read from the rows exactly as the tables show them (3 decimals).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

# Agreement on the reference split from which a proxy counts as faithful in distribution.
FAITHFUL = 0.95


def metric_words(key: str) -> str:
    """How a sentence names a metric: its label in the one metric table."""
    from illusions.metric_table import BY_KEY

    row = BY_KEY.get(key)
    return row.label if row is not None else key


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ci(row: dict[str, Any] | None) -> str:
    if row is None or not _finite(row.get("value")):
        return "n/a"
    text = f"{row['value']:.3f}"
    if _finite(row.get("ci_low")) and _finite(row.get("ci_high")):
        text += f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    return text


def _gap(row: dict[str, Any] | None) -> tuple[str, float, float, float] | None:
    """``(kind, value, low, high)`` of the matched gap, else the raw gap; None when neither exists."""
    if row is None:
        return None
    for key, kind in (("gap_vs_matched", "length-matched"), ("gap_vs_ref", "")):
        v, lo, hi = row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high")
        if _finite(v):
            return kind, float(v), float(lo) if _finite(lo) else math.nan, float(hi) if _finite(hi) else math.nan
    return None


def _excludes_zero(lo: float, hi: float) -> bool:
    return math.isfinite(lo) and math.isfinite(hi) and not lo <= 0 <= hi


def sentences(rows: Sequence[dict[str, Any]], proxy: str, splits: Sequence[str], *,
              reference: str = "iid") -> list[tuple[str, str]]:
    """``(split, sentence)`` for each split (and each position group after its split) of ``proxy``.

    Args:
        rows: tidy rows (``metrics.csv`` form).
        proxy: the proxy label the sentences are about.
        splits: evaluated splits, in order.
        reference: the in-distribution split gaps are taken to.
    """
    from illusions.analyses.summary import POSITION_GROUP, group_label

    cell: dict[tuple[str, str], dict[str, Any]] = {}
    names: list[str] = []
    for split in splits:
        names.append(split)
        for r in rows:
            if r["proxy"] != proxy:
                continue
            if r["group_by"] == "all" and r["split"] == split:
                cell[(split, r["metric"])] = r
            elif r["group_by"] == POSITION_GROUP and r["split"] == split:
                name = group_label(split, r["group"])
                cell[(name, r["metric"])] = r
                if name not in names:
                    names.append(name)
    ref = cell.get((reference, "agreement"))
    ref_agree = ref["value"] if ref is not None and _finite(ref.get("value")) else math.nan
    faithful = math.isfinite(ref_agree) and ref_agree >= FAITHFUL
    short = html.escape(proxy.split("@")[0])
    out = []
    for name in names:
        agree = cell.get((name, "agreement"))
        if agree is None:
            continue
        model = cell.get((name, "original_accuracy"))
        text = f"On <b>{html.escape(name)}</b>, {short} agrees with the model at {_ci(agree)} of scored positions"
        if name == reference:
            text += f" (in distribution); the model's own accuracy is {_ci(model)}"
            if faithful:
                text += f": a faithful proxy in distribution (agreement at least {FAITHFUL})."
            else:
                text += (f". It is <b>not a faithful proxy in distribution</b> (agreement below {FAITHFUL}), so "
                         "its gaps out of distribution say nothing about whether it under- or over-states the "
                         "model's generalization.")
            out.append((name, text))
            continue
        gap = _gap(agree)
        if gap is not None:
            kind, v, lo, hi = gap
            where = "above" if v > 0 else "below"
            interval = f"gap interval [{lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo) and math.isfinite(hi) else ""
            noise = "" if _excludes_zero(lo, hi) else ", within noise"
            text += (f", {abs(v):.3f} {where} {kind + ' ' if kind else ''}{html.escape(reference)}"
                     f"{' (' + interval + noise + ')' if interval else noise}")
        text += f"; the model's own accuracy there is {_ci(model)}"
        change = _gap(cell.get((name, "accuracy_change")))
        if not faithful:
            text += ". Not faithful in distribution, so no verdict on the model's generalization."
        elif change is not None and _excludes_zero(change[2], change[3]):
            verb = "under-states" if change[1] < 0 else "over-states"
            text += (f": the proxy <b>{verb}</b> the model's generalization (its accuracy change is "
                     f"{change[1]:+.3f} [{change[2]:+.3f}, {change[3]:+.3f}] against {html.escape(reference)}).")
        else:
            text += (f": its accuracy change against {html.escape(reference)} is within noise, so no evidence "
                     "that the proxy misstates the model's generalization here.")
        out.append((name, text))
    return out


def _raw_gap(row: dict[str, Any] | None) -> tuple[float, float, float] | None:
    """``(value, low, high)`` of a row's raw gap to the reference (``gap_vs_ref``), None without an interval."""
    if row is None:
        return None
    v, lo, hi = (row.get(k) for k in ("gap_vs_ref", "gap_vs_ref_low", "gap_vs_ref_high"))
    return (float(v), float(lo), float(hi)) if _finite(v) and _finite(lo) and _finite(hi) else None


# What a gap whose interval excludes 0 says a metric does out of distribution.
_MOVES = {-1: "falls", 1: "rises"}


def downstream_sentences(rows: Sequence[dict[str, Any]], proxy: str, splits: Sequence[str], *,
                         reference: str = "iid") -> list[tuple[str, str]]:
    """``(split, sentence)`` for each split but ``reference`` where ``proxy`` (a sparse dictionary) has a
    loss recovered: its value, its gap to ``reference`` and whether it falls (or rises) out of distribution
    alongside agreement. Both gaps are the raw ones (``gap_vs_ref``; a score is a ratio of means over the
    split and has no length-matched gap); a metric moves only when its gap's interval excludes 0."""
    from illusions.metric_table import metric

    key = "loss_recovered"
    cell = {(r["split"], r["metric"]): r for r in rows
            if r["proxy"] == proxy and r["group_by"] == "all" and r["metric"] in (key, "agreement")}
    name, short = metric_words(key), metric(key).short
    ref = cell.get((reference, key))
    where = html.escape(reference)
    out = []
    for split in splits:
        lr = cell.get((split, key))
        if split == reference or lr is None:
            continue
        text = f"On <b>{html.escape(split)}</b>, the {name} of {html.escape(proxy.split('@')[0])} is {_ci(lr)}"
        if ref is not None and _finite(ref.get("value")):
            text += f" against {ref['value']:.3f} on {where}"
        gaps = _raw_gap(lr), _raw_gap(cell.get((split, "agreement")))
        if None in gaps:
            out.append((split, text + f"; without both gaps to {where} and their intervals, no comparison with "
                               "agreement."))
            continue
        (g, lo, hi), (a, a_lo, a_hi) = gaps
        text += f" (gap {g:+.3f} [{lo:+.3f}, {hi:+.3f}]), agreement's gap {a:+.3f} [{a_lo:+.3f}, {a_hi:+.3f}]"
        moves = [(-1 if v < 0 else 1) if _excludes_zero(low, high) else 0 for v, low, high in gaps]
        if moves[0] and moves[0] == moves[1]:
            text += f": the {short} <b>{_MOVES[moves[0]]}</b> out of distribution alongside agreement."
        elif moves[0] == moves[1]:
            text += ": neither changes beyond noise."
        elif not moves[0]:
            text += (f": agreement {_MOVES[moves[1]]} but the {short}'s gap is within noise, so no evidence that "
                     f"it {_MOVES[moves[1]]} with agreement.")
        elif not moves[1]:
            text += f": the {short} <b>{_MOVES[moves[0]]}</b> while agreement's gap is within noise."
        else:
            text += f": the {short} <b>{_MOVES[moves[0]]}</b> while agreement {_MOVES[moves[1]]}."
        out.append((split, text))
    return out
