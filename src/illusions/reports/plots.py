"""Static figures for the report: matplotlib on the Agg canvas, written as inline SVG and as PNG.

Every function takes plain rows/arrays and returns a :class:`StaticFigure`. Output is deterministic:
figures are built with the object-oriented API (no pyplot state), text is drawn as paths, the SVG
hash salt is fixed per figure and no date is written, so the same inputs give the same bytes.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from illusions.metric_table import ALL
from illusions.metric_table import metric as metric_row

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Split colours follow the order splits appear in the rows, so a split keeps its colour everywhere.
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf")
_PNG_DPI = 100


@dataclasses.dataclass(frozen=True)
class StaticFigure:
    """One rendered figure.

    Attributes:
        name: file stem, e.g. ``fig_accuracy`` (the PNG is written as ``fig_accuracy.png``).
        svg: an ``<svg>`` element ready to inline in HTML (no XML prolog, no metadata).
        png: the same figure as PNG bytes.
    """

    name: str
    svg: str
    png: bytes


def split_colors(splits: Sequence[str]) -> dict[str, str]:
    """A fixed colour per split, in the given order."""
    return {s: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(splits)}


def render(fig: Figure, name: str) -> StaticFigure:
    """SVG and PNG bytes of ``fig``, reproducible byte for byte."""
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": f"illusions-{name}", "svg.fonttype": "path"}):
        buf = io.StringIO()
        # dpi only affects rasterized artists (dense scatters), embedded in the SVG as PNG.
        fig.savefig(buf, format="svg", dpi=_PNG_DPI, metadata={"Date": None, "Creator": None})
        # The SVG save ran the layout engine; keep its result for the PNG instead of measuring again.
        if fig.get_layout_engine() is not None:
            fig.set_layout_engine("none")
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=_PNG_DPI, metadata={"Software": None})
    return StaticFigure(name=name, svg=_inline_svg(buf.getvalue()), png=png.getvalue())


def _inline_svg(text: str) -> str:
    """Strip what an inline ``<svg>`` does not need: the prolog, the RDF metadata, namespace URLs.

    The HTML parser puts ``<svg>`` and ``xlink:href`` in their namespaces by itself, so dropping the
    ``xmlns`` attributes leaves the drawing unchanged and the page free of external-looking URLs.
    """
    start = text.index("<svg")
    text = text[start:]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    return text.strip()


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _fixed_figure(width: float, height: float, *, left: float, right: float, bottom: float, top: float,
                  gap: float = 0.0) -> Figure:
    """A figure whose subplots sit inside margins given in inches (``gap``: between columns).

    Constrained layout measures every text artist in one extra pass per figure; the fixed figures
    measure only the few labels that set a margin (:func:`_text_inches`) and skip that pass.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=gap / ((width - left - right - gap) / 2) if gap else None)
    return fig


def _text_inches(text: str, size: float) -> tuple[float, float]:
    """Width and height of one line of ``text`` at ``size`` points in the default font, in inches."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    width, height, _ = text_to_path.get_text_width_height_descent(text, FontProperties(size=size), ismath=False)
    return width / 72, height / 72


def _unlabelled(*axes: Any) -> None:
    """Tell matplotlib that these axes (``ax.xaxis``, ``ax.yaxis``) carry no label to place.

    At every draw matplotlib places each axis label beyond that axis's tick labels, measuring them
    once more; for an axis without a label that measuring changes nothing.
    """
    for axis in axes:
        axis.set_label_coords(*((0.5, 0.0) if axis.axis_name == "x" else (0.0, 0.5)))


# Titles are placed at y=1.0 explicitly (the default spot): matplotlib otherwise re-measures the
# tick labels at every draw to check that no top axis or offset text pushes the title up, and
# none of these figures has either.
_TITLE_Y = 1.0

# Inches taken by y tick labels "0.0".."1.0" with their ticks and padding, and by one line of
# 10-point text (a title or axis label) with its padding.
_Y_TICKS_IN = 0.42
_LINE_IN = 0.26


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _errors(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """``[2, n]`` distances from each value down to ci_low and up to ci_high (0 where missing)."""
    lo = [r["value"] - r["ci_low"] if _finite(r["ci_low"]) else 0.0 for r in rows]
    hi = [r["ci_high"] - r["value"] if _finite(r["ci_high"]) else 0.0 for r in rows]
    return np.clip(np.array([lo, hi], dtype=np.float64), 0.0, None)


def accuracy_figure(rows: Sequence[dict[str, Any]], proxy: str, splits: Sequence[str]) -> StaticFigure:
    """Per split: original accuracy, proxy accuracy and agreement with 95% intervals.

    Args:
        rows: tidy rows (``group_by == "all"`` are used).
        proxy: the proxy label to plot.
        splits: split order on the x axis.

    Returns:
        The figure ``fig_accuracy``.
    """
    cell = {(r["split"], r["metric"]): r for r in rows if r["group_by"] == "all" and r["proxy"] == proxy}
    width, height = max(5.0, 1.1 * len(splits) + 2.0), 3.4
    # Split names are drawn rotated by 20 degrees, right-aligned at their tick: the longest sets the
    # bottom margin, the first may reach left of the axes (its tick is half a slot in).
    sin, cos = math.sin(math.radians(20)), math.cos(math.radians(20))
    sizes = [_text_inches(str(s), 10) for s in splits] or [(0.0, 0.0)]
    bottom = 0.14 + max(w * sin + h * cos for w, h in sizes)
    left, right = _Y_TICKS_IN + _LINE_IN, 0.15
    reach = sizes[0][0] * cos + sizes[0][1] * sin + 0.05
    slot = 0.5 / max(len(splits), 1)
    left = max(left, (reach - slot * (width - right)) / (1 - slot))
    fig = _fixed_figure(width, height, left=left, right=right, bottom=bottom, top=_LINE_IN + 0.06)
    ax = fig.add_subplot()
    x = np.arange(len(splits), dtype=np.float64)
    styles = (("original_accuracy", "o", "#444444", -0.2), ("proxy_accuracy", "s", "#d62728", 0.0),
              ("agreement", "D", "#1f77b4", 0.2))
    for metric, marker, color, dx in styles:
        label = metric_row(metric).label
        mine = [cell.get((s, metric)) for s in splits]
        keep = [i for i, r in enumerate(mine) if r is not None and _finite(r["value"])]
        if not keep:
            continue
        sel = [mine[i] for i in keep]
        ax.errorbar(x[keep] + dx, [r["value"] for r in sel], yerr=_errors(sel), fmt=marker, color=color,
                    label=label, capsize=3, markersize=5, linestyle="none")
    ax.set_xticks(x, list(splits), rotation=20, ha="right")
    ax.set_xlim(-0.5, len(splits) - 0.5)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction of scored positions")
    ax.set_title(f"{proxy}: accuracy and agreement per split (95% intervals)", fontsize=10, y=_TITLE_Y)
    _unlabelled(ax.xaxis)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return render(fig, "fig_accuracy")


def sweep_figure(rows: Sequence[dict[str, Any]], splits: Sequence[str]) -> StaticFigure:
    """Agreement, attention JSD and proxy accuracy across the run's proxies, one line per split.

    A sweep (one swept parameter, a distinct value per proxy) is drawn against that parameter. Other
    multi-proxy runs (one proxy per head, or data-free proxies with no parameter) are drawn against the
    proxy labels, in run order.

    Args:
        rows: tidy rows of a run with several proxies.
        splits: split order (and colours).

    Returns:
        The figure ``fig_sweep``.
    """
    overall = [r for r in rows if r["group_by"] == "all"]
    labels = list(dict.fromkeys(r["proxy"] for r in overall))
    by_label = {r["proxy"]: r["param_value"] for r in overall}
    numeric = (bool(labels) and all(_finite(by_label[lab]) for lab in labels)
               and len({float(by_label[lab]) for lab in labels}) == len(labels))
    if numeric:
        param = next((r["param"] for r in overall if r["param"]), "parameter")
        values = sorted(float(by_label[lab]) for lab in labels)
        position = {lab: float(by_label[lab]) for lab in labels}
    else:
        param, values = "proxy", [float(i) for i in range(len(labels))]
        position = {lab: float(i) for i, lab in enumerate(labels)}
    colors = split_colors(splits)
    # The accuracy panel draws the original's accuracy too (dotted), hence its plain axis label.
    panels: tuple[tuple[str, str], ...] = (("agreement", metric_row("agreement").axis_label),
                                           ("attention_jsd", metric_row("attention_jsd").axis_label),
                                           ("proxy_accuracy", "accuracy"))
    if any(r["metric"] == "explained_variance" for r in overall):  # sparse dictionaries: their reconstruction
        panels += (("explained_variance", metric_row("explained_variance").axis_label),)
    # A metric only some proxies have (attention JSD: proxies that change a head directly) is drawn
    # only where a proxy of the run has it.
    panels = tuple(p for p in panels if metric_row(p[0]).proxies == ALL
                   or any(r["metric"] == p[0] and _finite(r["value"]) for r in overall))
    fig = _new_figure(4.0 * len(panels), 3.6 if numeric else 4.2)
    axes = fig.subplots(1, len(panels))
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for i, split in enumerate(splits):
            mine = sorted((r for r in overall if r["split"] == split and r["metric"] == metric
                           and _finite(r["value"])), key=lambda r: position[r["proxy"]])
            if not mine:
                continue
            # Against labels, the splits sit side by side around each proxy's tick instead of on top.
            dodge = 0.0 if numeric else 0.5 * (i - (len(splits) - 1) / 2) / max(len(splits), 1)
            xs = [position[r["proxy"]] + dodge for r in mine]
            ax.errorbar(xs, [r["value"] for r in mine], yerr=_errors(mine), color=colors[split],
                        marker="o", markersize=4, capsize=2, label=split,
                        linestyle="-" if numeric else "none")
            if metric == "proxy_accuracy":
                orig = [r for r in overall if r["split"] == split and r["metric"] == "original_accuracy"
                        and _finite(r["value"])]
                if orig:
                    ax.axhline(orig[0]["value"], color=colors[split], linestyle=":", linewidth=1)
        if numeric and values[0] > 0 and values[-1] / values[0] >= 8:
            ax.set_xscale("log", base=2)
        if numeric:
            ax.set_xticks(values, [f"{v:g}" for v in values])
        else:
            ax.set_xticks(values, labels, rotation=45, ha="right", fontsize=7)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.minorticks_off()
        ax.set_xlabel(param)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    accuracy_axis = axes[[metric for metric, _ in panels].index("proxy_accuracy")]
    accuracy_axis.set_title("proxy (solid) vs original (dotted)" if numeric else "proxy (points) vs original (dotted)",
                            fontsize=9)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    return render(fig, "fig_sweep")


def _group_value(label: str) -> float:
    head = label.split("-")[0]
    try:
        return float(head)
    except ValueError:
        return float("nan")


def breakdown_figure(rows: Sequence[dict[str, Any]], proxy: str, splits: Sequence[str],
                     by: str = "key_depth") -> StaticFigure | None:
    """Agreement and accuracy per value of one breakdown column, one line per split.

    Args:
        rows: tidy rows; those with ``group_by == by`` and ``proxy == proxy`` are plotted.
        proxy: the proxy label to plot.
        splits: split order (and colours).
        by: the breakdown column (``key_depth``: depth of the attended bracket).

    Returns:
        The figure ``fig_{by}``, or None when the rows hold no such breakdown.
    """
    mine = [r for r in rows if r["group_by"] == by and r["proxy"] == proxy and _finite(r["value"])]
    if not mine:
        return None
    colors = split_colors(splits)
    # Numeric groups (depths, bins) go on a numeric axis; named groups (categories) at 0, 1, ...
    named = list(dict.fromkeys(r["group"] for r in mine))
    numeric = all(math.isfinite(_group_value(g)) for g in named)
    # Below the panels: tick labels (named groups at 8 points) and the axis label.
    tick_h = _LINE_IN if numeric else 0.06 + max(_text_inches(str(g), 8)[1] for g in named)
    fig = _fixed_figure(11.0, 3.6, left=_Y_TICKS_IN + 0.05, right=0.15, bottom=0.1 + tick_h + _LINE_IN,
                        top=_LINE_IN + 0.06, gap=_Y_TICKS_IN + 0.15)
    left, right = fig.subplots(1, 2, sharex=True)
    position = (lambda g: _group_value(g)) if numeric else (lambda g: float(named.index(g)))
    for split in splits:
        for ax, metric, style in ((left, "agreement", "-"), (right, "proxy_accuracy", "-"),
                                  (right, "original_accuracy", ":")):
            sel = sorted((r for r in mine if r["split"] == split and r["metric"] == metric),
                         key=lambda r: position(r["group"]))
            if not sel:
                continue
            xs = [position(r["group"]) for r in sel]
            ax.errorbar(xs, [r["value"] for r in sel], yerr=_errors(sel), color=colors[split],
                        linestyle=style, marker="o" if style == "-" else None, markersize=4, capsize=2,
                        label=split if metric != "original_accuracy" else None)
    label = by.replace("_", " ")
    left.set_title(f"{proxy}: agreement by {label}", fontsize=10, y=_TITLE_Y)
    right.set_title("proxy accuracy (solid) vs original (dotted)", fontsize=10, y=_TITLE_Y)
    _unlabelled(left.yaxis, right.yaxis)
    for ax in (left, right):
        ax.set_xlabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if not numeric:
            ax.set_xticks(range(len(named)), named, fontsize=8)
    left.legend(fontsize=8)
    return render(fig, f"fig_{by}")
