"""The report's warning-signal section: do the activations alone flag where the proxy fails?

Everything comes from what the run already holds, no forward pass: the ``warning_*`` rows
(:mod:`illusions.analyses.warning_signals`, ``group_by = "warning_signal"``, per split and pooled as
``overall``), the agreement rows, each signal's threshold fixed on the fitting data
(``proxy.info["warning_thresholds"]``) and the per-position signals in the records (``records.npz``,
``<split>/<proxy>/warn/<signal>``).

* :func:`sentences`: per split and pooled, in words, the signal that ranks the proxy's disagreements
  best, whether its AUROC interval excludes chance (0.5), and the agreement among the positions it
  flags at the fitting threshold against the agreement over all positions;
* :func:`table`: every proxy, split and signal: AUROC with its interval, the share flagged, the
  agreement among flagged positions and over all positions, and their difference;
* :func:`figure`: the focused proxy's signal on the positions where it agrees with the model and
  where it does not, per split (boxes: quartiles and median; whiskers: 5th and 95th percentiles), with
  the fitting threshold as a dashed line: a signal that flags the failures puts the red boxes above
  the grey ones and above the line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# What each signal measures, by its name's start (the maths is in each hook's docstring).
SIGNAL_WORDS = (
    ("offspace_", "the share of the activation outside the kept subspace"),
    ("centroid_distance_", "the distance to the nearest centroid over that cluster's training spread"),
    ("recon_error", "the share of the replaced activation the dictionary misses"),
    ("new_latents", "the summed activation of latents never active on the fitting data"),
    ("offargmax_mass", "the attention mass outside the argmax"),
)
CHANCE = 0.5
# Whiskers of the figure's boxes (percentiles).
WHISKERS = (5.0, 95.0)
FIGURE = "fig_warnings"


def signal_words(name: str) -> str:
    """What signal ``name`` measures, in words (empty for a signal this module does not know)."""
    return next((words for prefix, words in SIGNAL_WORDS if name.startswith(prefix)), "")


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def warning_cells(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """``(proxy, split, signal, metric) -> row`` of the warning rows."""
    from illusions.analyses.warning_signals import WARNING_GROUP

    return {(r["proxy"], r["split"], r["group"], r["metric"]): r for r in rows if r["group_by"] == WARNING_GROUP}


def _order(cells: Mapping[tuple[str, str, str, str], Any], proxy: str,
           splits: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(splits, signals)`` of one proxy's warning rows: the evaluated splits in order, then ``overall``."""
    from illusions.analyses.warning_signals import POOLED

    have = {(s, g) for p, s, g, _ in cells if p == proxy}
    order = [s for s in [*splits, POOLED] if any(hs == s for hs, _ in have)]
    return order, sorted({g for _, g in have})


def all_agreement(rows: Sequence[dict[str, Any]], proxy: str, splits: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Agreement over all scored positions per split (its row), and pooled over ``splits`` as
    ``overall``: the position-weighted mean, a point without an interval."""
    from illusions.analyses.warning_signals import POOLED

    agree = {r["split"]: r for r in rows if r["group_by"] == "all" and r["proxy"] == proxy
             and r["metric"] == "agreement" and r["split"] in splits}
    pooled = [agree[s] for s in splits if s in agree and _finite(agree[s]["value"])]
    n = sum(r["n_positions"] for r in pooled)
    if n:
        agree[POOLED] = {"value": sum(r["value"] * r["n_positions"] for r in pooled) / n, "ci_low": math.nan,
                         "ci_high": math.nan, "n_positions": n}
    return agree


def _ci(row: dict[str, Any] | None, pct: bool = False) -> str:
    if row is None or not _finite(row.get("value")):
        return "n/a"
    f = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.3f}")
    text = f(row["value"])
    if _finite(row.get("ci_low")) and _finite(row.get("ci_high")):
        text += f" [{f(row['ci_low'])}, {f(row['ci_high'])}]"
    return text


def _ranking(row: dict[str, Any]) -> str:
    """Whether an AUROC's interval puts it above, at or below chance, in words."""
    lo, hi = row.get("ci_low"), row.get("ci_high")
    if _finite(lo) and lo > CHANCE:
        return "better than chance"
    if _finite(hi) and hi < CHANCE:
        return "worse than chance: the signal is lower where the proxy fails"
    return "no better than chance (its interval holds 0.5)"


def sentences(rows: Sequence[dict[str, Any]], proxy: str, splits: Sequence[str]) -> list[tuple[str, str]]:
    """``[(split, sentence HTML)]`` for each split with warning rows and for ``overall``: the signal
    with the highest AUROC, how it ranks the disagreements, what its fitting threshold flags."""
    from illusions.analyses.warning_signals import POOLED
    from illusions.reports.html import esc

    cells = warning_cells(rows)
    order, signals = _order(cells, proxy, splits)
    agree = all_agreement(rows, proxy, splits)
    out = []
    for split in order:
        scored = [(cells[(proxy, split, g, "warning_auroc")], g) for g in signals
                  if (proxy, split, g, "warning_auroc") in cells]
        finite = [(r, g) for r, g in scored if _finite(r["value"])]
        where = "Pooled over every split" if split == POOLED else f"On <b>{esc(split)}</b>"
        if not finite:
            out.append((split, f"{where}, {esc(proxy)} never disagrees with the model (or always does), so "
                               "there is nothing for a signal to rank."))
            continue
        best, signal = max(finite, key=lambda rg: (rg[0]["value"], rg[1]))
        share = cells.get((proxy, split, signal, "warning_flagged_share"))
        flagged = cells.get((proxy, split, signal, "warning_flagged_agreement"))
        text = (f"{where}, the best signal, <code>{esc(signal)}</code>, ranks the positions where {esc(proxy)} "
                f"disagrees with the model at AUROC {_ci(best)}, {_ranking(best)}")
        if share is not None and _finite(share["value"]):
            text += f"; at its fitting threshold it flags {_ci(share, pct=True)} of the positions"
            if flagged is not None and _finite(flagged["value"]):
                text += f", where the proxy agrees {_ci(flagged)}"
                if split in agree:
                    text += f" against {agree[split]['value']:.3f} over all positions"
            elif share["value"] == 0:
                text += " (none)"
        out.append((split, text + "."))
    return out


def table(rows: Sequence[dict[str, Any]], splits: Sequence[str], proxies: Sequence[str]) -> str:
    """Every proxy's warning rows as one sortable table (empty when no proxy has signals)."""
    from illusions.reports.html import _table, esc, fmt_ci

    cells = warning_cells(rows)
    many = len(proxies) > 1
    body = []
    for proxy in proxies:
        order, signals = _order(cells, proxy, splits)
        agree = all_agreement(rows, proxy, splits)
        for split in order:
            for signal in signals:
                m = {k: cells.get((proxy, split, signal, k)) for k in
                     ("warning_auroc", "warning_flagged_share", "warning_flagged_agreement")}
                if m["warning_auroc"] is None:
                    continue
                auroc = fmt_ci(m["warning_auroc"])
                lo, hi = m["warning_auroc"].get("ci_low"), m["warning_auroc"].get("ci_high")
                if _finite(lo) and _finite(hi) and not lo <= CHANCE <= hi:
                    auroc = f"<span class=sig>{auroc}</span>"
                flagged, everyone = m["warning_flagged_agreement"], agree.get(split)
                diff = (flagged["value"] - everyone["value"]
                        if flagged is not None and everyone is not None and _finite(flagged["value"])
                        and _finite(everyone["value"]) else math.nan)
                n_flagged = int(flagged["n_positions"]) if flagged is not None else 0
                body.append(([esc(proxy)] if many else []) + [
                    esc(split), f"<code>{esc(signal)}</code>", str(int(m["warning_auroc"]["n_positions"])), auroc,
                    fmt_ci(m["warning_flagged_share"]) if m["warning_flagged_share"] is not None else "-",
                    str(n_flagged), fmt_ci(flagged) if flagged is not None else "-",
                    fmt_ci(everyone) if everyone is not None else "-",
                    f"{diff:+.3f}" if math.isfinite(diff) else "-"])
    if not body:
        return ""
    lead = ["proxy"] if many else []
    return _table(lead + ["split", "signal", "positions", "AUROC", "flagged share", "flagged",
                          "agreement flagged", "agreement all", "flagged − all"], body, left=len(lead) + 2)


def _box(values: np.ndarray) -> np.ndarray:
    """``[low whisker, q1, median, q3, high whisker]``: the percentiles a box draws (:data:`WHISKERS`)."""
    return np.percentile(values, [WHISKERS[0], 25.0, 50.0, 75.0, WHISKERS[1]])


def figure(records: Mapping[str, Any], proxy: str, splits: Sequence[str],
           thresholds: Mapping[str, float]) -> Any:
    """The focused proxy's signals on agreeing (grey) and disagreeing (red) positions per split, the
    fitting threshold dashed; None when its records hold no per-position signal.

    Args:
        records: ``{split: Records}`` of the proxy.
        proxy: its label (the title).
        splits: split order.
        thresholds: ``{signal: threshold}`` fixed on the fitting data.
    """
    from illusions.reports import plots

    have = [s for s in splits if s in records and len(records[s]) and records[s].warnings]
    signals = sorted({g for s in have for g in records[s].warnings})
    if not signals:
        return None
    panel_w = max(3.0, 0.75 * len(have) + 1.2)
    cols = min(len(signals), 2)
    n_rows = -(-len(signals) // cols)
    sin, cos = math.sin(math.radians(20)), math.cos(math.radians(20))
    bottom = 0.14 + max(w * sin + h * cos for w, h in (plots._text_inches(s, 9) for s in have))
    row_h = 2.4 + bottom + plots._LINE_IN
    left, gap = plots._Y_TICKS_IN + 0.1, plots._Y_TICKS_IN + 0.25
    fig = plots._fixed_figure(left + cols * panel_w + (cols - 1) * gap + 0.15, n_rows * row_h + 0.2,
                              left=left, right=0.15, bottom=bottom, top=plots._LINE_IN + 0.12, gap=gap)
    if n_rows > 1:  # room between rows for the upper row's split names and the lower row's title
        between = bottom + plots._LINE_IN + 0.12
        inner = n_rows * row_h + 0.2 - bottom - plots._LINE_IN - 0.12
        fig.subplots_adjust(hspace=between / ((inner - (n_rows - 1) * between) / n_rows))
    axes = np.atleast_1d(fig.subplots(n_rows, cols, squeeze=False)).ravel()
    x = np.arange(len(have), dtype=np.float64)
    half = 0.15  # half a box's width
    for ax, signal in zip(axes, signals, strict=False):
        # Every box of the panel drawn at once (one bar call, three line collections): Axes.bxp per box
        # costs ten times as much for the same picture.
        at, stats, colours = [], [], []
        for i, split in enumerate(have):
            rec = records[split]
            values = rec.warnings.get(signal)
            if values is None:
                continue
            disagree = rec.proxy_pred != rec.original_pred
            for side, mask, colour in ((-0.18, ~disagree, "#9a9a9a"), (0.18, disagree, "#d62728")):
                if mask.any():
                    at.append(x[i] + side)
                    stats.append(_box(values[mask]))
                    colours.append(colour)
        if stats:
            lo, q1, med, q3, hi = np.array(stats).T
            ax.vlines(np.r_[at, at], np.r_[lo, q3], np.r_[q1, hi], colors="#333333", linewidth=0.8)
            ax.hlines(np.r_[lo, hi], np.r_[at, at] - half / 2, np.r_[at, at] + half / 2, colors="#333333",
                      linewidth=0.8)
            ax.bar(at, q3 - q1, width=2 * half, bottom=q1, color=colours, edgecolor="#333333", linewidth=0.8)
            ax.hlines(med, np.array(at) - half, np.array(at) + half, colors="#000000", linewidth=1.2, gid="medians")
        threshold = thresholds.get(signal)
        if threshold is not None and math.isfinite(threshold):
            ax.axhline(threshold, color="#1f5fa8", linestyle="--", linewidth=1)
        ax.set_xticks(x, have, rotation=20, ha="right", fontsize=9)
        ax.set_xlim(-0.6, len(have) - 0.4)
        ax.set_title(f"{signal}", fontsize=10, y=plots._TITLE_Y)
        plots._unlabelled(ax.xaxis, ax.yaxis)
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    axes[0].legend(handles=[Patch(facecolor="#9a9a9a", edgecolor="#333333", label="agrees"),
                            Patch(facecolor="#d62728", edgecolor="#333333", label="disagrees"),
                            Line2D([], [], color="#1f5fa8", linestyle="--", label="fitting threshold")],
                   fontsize=7, loc="lower left", framealpha=0.85)
    for ax in axes[len(signals):]:
        ax.set_visible(False)
    return plots.render(fig, FIGURE)


def section_body(rows: Sequence[dict[str, Any]], splits: Sequence[str], proxies: Sequence[str], label: str,
                 fig: Any) -> str:
    """The section's HTML: sentences, the table, the figure (or why there is none)."""
    from illusions.analyses.warning_signals import QUANTILE
    from illusions.reports.html import esc
    from illusions.reports.html import figure as html_figure

    words = sentences(rows, label, splits)
    cells = warning_cells(rows)
    names = sorted({g for p, _, g, _ in cells if p == label})
    defs = "".join(f"<li><code>{esc(n)}</code>: {esc(signal_words(n) or 'declared by the proxy’s hooks')}</li>"
                   for n in names)
    body = (f"<p>Can the activations alone, without labels or the original model's answer, say where "
            f"<b>{esc(label)}</b> stops holding? Each signal is read, per scored position, from the activation the "
            "proxy is about to replace, during the evaluation pass. AUROC: how well the signal ranks the positions "
            "where the proxy's prediction differs from the model's above those where it agrees (0.5 = chance, "
            f"1 = perfect; 95% bootstrap intervals over sequences; red: the interval excludes 0.5). Flagged: "
            f"positions above the signal's {QUANTILE * 100:g}th percentile on the fitting data; a useful signal flags "
            "positions where the agreement is well below the agreement over all positions. <i>overall</i> pools "
            "every evaluated split.</p>"
            + (f"<ul>{defs}</ul>" if defs else "")
            + "<ul class=verdict>" + "".join(f'<li data-split="{esc(s)}">{t}</li>' for s, t in words) + "</ul>"
            + table(rows, splits, proxies)
            + "<p class=note>Agreement all: the split's agreement over every scored position (for <i>overall</i>, "
            "the position-weighted mean of the splits, without an interval); flagged − all: the difference of the "
            "two point estimates.</p>")
    if fig is not None:
        body += html_figure(fig, (
            f"The warning signals of {esc(label)} per split on the scored positions where the proxy agrees with "
            "the model (grey) and where it does not (red): boxes from the 25th to the 75th percentile with the "
            f"median, whiskers at the {WHISKERS[0]:g}th and {WHISKERS[1]:g}th; dashed: the threshold fixed on the "
            "fitting data. A signal that flags the failures puts the red boxes above the grey ones and the line."))
    elif names:
        body += ("<p class=note>The per-position signals are not in this run's records (<code>records.npz</code> "
                 "written before they were stored there), so there is no figure; run the analysis again to draw "
                 "it.</p>")
    return body
