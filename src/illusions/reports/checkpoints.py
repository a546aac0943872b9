"""The report of an analysis over training checkpoints (``illusions sweep --over-checkpoints``).

``report.html`` beside ``checkpoints.csv``: the figure over training steps (``fig_checkpoints``: the
model's accuracy per split; per proxy, its agreement and its accuracy change's gap to iid per split),
the same numbers as tables, and links to each step's own run (with its own report).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from illusions.io import atomic_write_bytes, atomic_write_text
from illusions.reports import html, plots

REPORT_FILE = "report.html"
# At most this many proxies get their own row of panels in the figure (all are in the tables).
FIGURE_PROXIES = 4


def checkpoint_figure(sweep: Any) -> plots.StaticFigure:
    """``fig_checkpoints``: x is the training step. First panel: original accuracy per split; then,
    per proxy (up to :data:`FIGURE_PROXIES`), agreement per split and the accuracy change's gap to
    iid per split (below 0 under-states, above 0 over-states the model's generalization), with 95%
    bootstrap intervals."""
    splits, proxies, steps = sweep.splits, sweep.proxies[:FIGURE_PROXIES], sweep.steps
    colors = plots.split_colors(splits)
    n_rows = max(len(proxies), 1)
    fig = plots._new_figure(13.0, 3.2 * n_rows)
    axes = fig.subplots(n_rows, 3, squeeze=False)

    def line(ax: Any, split: str, proxy: str, metric: str, field: str) -> None:
        rows = [(s, sweep.value(s, split, proxy, metric, field), sweep.value(s, split, proxy, metric, f"{field}_low"
                 if field != "value" else "ci_low"), sweep.value(s, split, proxy, metric, f"{field}_high"
                 if field != "value" else "ci_high")) for s in steps]
        rows = [r for r in rows if math.isfinite(r[1])]
        if not rows:
            return
        xs = [r[0] for r in rows]
        ys = [r[1] for r in rows]
        lo = [max(r[1] - r[2], 0.0) if math.isfinite(r[2]) else 0.0 for r in rows]
        hi = [max(r[3] - r[1], 0.0) if math.isfinite(r[3]) else 0.0 for r in rows]
        ax.errorbar(xs, ys, yerr=[lo, hi], color=colors[split], marker="o", markersize=4, capsize=2, label=split,
                    linestyle="--" if "(" in split else "-")

    for i, proxy in enumerate(proxies or [""]):
        acc, agree, gap = axes[i]
        for split in splits:
            if i == 0:
                line(acc, split, proxy, "original_accuracy", "value")
            line(agree, split, proxy, "agreement", "value")
            if split != "iid":
                line(gap, split, proxy, "accuracy_change", "gap_vs_iid")
        if i == 0:
            acc.set_title("original model: accuracy per split", fontsize=9)
            acc.set_ylabel("accuracy")
            acc.legend(fontsize=7)
        else:
            acc.set_axis_off()
        agree.set_title(f"{proxy}: agreement with the model", fontsize=9)
        agree.set_ylabel("agreement")
        gap.axhline(0.0, color="black", linewidth=0.6)
        gap.set_title(f"{proxy}: Δ(proxy − original acc) vs iid", fontsize=9)
        gap.set_ylabel("< 0 under-states, > 0 over-states")
        for ax in (acc, agree, gap):
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
    return plots.render(fig, "fig_checkpoints")


def _cell(sweep: Any, step: int, split: str, proxy: str, metric: str) -> str:
    value = sweep.value(step, split, proxy, metric)
    if not math.isfinite(value):
        return "-"
    row = {"value": value, "ci_low": sweep.value(step, split, proxy, metric, "ci_low"),
           "ci_high": sweep.value(step, split, proxy, metric, "ci_high")}
    return html.fmt_ci(row)


def _gap_cell(sweep: Any, step: int, split: str, proxy: str) -> str:
    row = {k.replace("gap_vs_iid", "gap"): sweep.value(step, split, proxy, "accuracy_change", k)
           for k in ("gap_vs_iid", "gap_vs_iid_low", "gap_vs_iid_high")}
    return html.fmt_gap(row, "gap")


def build_page(sweep: Any) -> tuple[str, list[plots.StaticFigure]]:
    spec = sweep.spec
    splits, proxies = sweep.splits, sweep.proxies
    figure = checkpoint_figure(sweep)
    sections = [html.Section("over-steps", "Over training steps", html.figure(figure, (
        "x: training step. Left: the original model's accuracy per split; middle: each proxy's agreement "
        "with the model; right: how much more (below 0) or less (above 0) the proxy loses in accuracy on the "
        "split than on iid, relative to the model (below 0 it under-states the model's generalization, above "
        "0 over-states it). Dashed: a named group of a split's positions. Bars: 95% bootstrap intervals.")))]
    body = html._table(["step"] + [html.esc(s) for s in splits],
                       [[str(step)] + [_cell(sweep, step, s, proxies[0], "original_accuracy") for s in splits]
                        for step in sweep.steps])
    sections.append(html.Section("model", "Original accuracy per split", body))
    for j, proxy in enumerate(proxies):
        agree = html._table(["step"] + [html.esc(s) for s in splits],
                            [[str(step)] + [_cell(sweep, step, s, proxy, "agreement") for s in splits]
                             for step in sweep.steps])
        ood = [s for s in splits if s != "iid"]
        gaps = html._table(["step"] + [html.esc(s) for s in ood],
                           [[str(step)] + [_gap_cell(sweep, step, s, proxy) for s in ood] for step in sweep.steps])
        sections.append(html.Section(f"proxy-{j}", html.esc(proxy), (
            f"<h3>Agreement (95% intervals)</h3>{agree}<h3>Accuracy change (proxy − original) minus its value on "
            f"iid</h3>{gaps}<p class=note>Red: the interval excludes 0.</p>")))
    links = "".join(f'<li><a href="step{step}/report.html">step {step}</a> '
                    f"(<code>{html.esc(sweep.models[step])}</code>)</li>" for step in sweep.steps)
    sections.append(html.Section("runs", "Each checkpoint's own run", f"<ul>{links}</ul>"))
    title = f"{spec.task}: {spec.simplifier} over training checkpoints"
    subtitle = [f"checkpoints: {html.esc(spec.checkpoints)} ({len(sweep.steps)} steps; "
                f"{html.esc(sweep.model_description)})",
                f"proxies: {html.esc(', '.join(proxies))}; fitted on {spec.fit_n} {html.esc(spec.fit_split)} "
                f"sequences of each checkpoint; seed {spec.seed}"]
    return html.render_static_page(title=title, subtitle=subtitle, sections=sections), [figure]


def report_writers() -> tuple[Any, Any]:
    """``(run_files, sweep_files)`` for :func:`illusions.analyses.checkpoints.run_over_checkpoints`:
    each step's own report, and the sweep's report over steps (which links to them)."""
    from illusions.reports import write_report_files

    def run_files(run: Any, stage: Path) -> None:
        write_report_files(run, stage)

    def sweep_files(sweep: Any, stage: Path) -> None:
        write_checkpoint_report(sweep, stage)

    return run_files, sweep_files


def write_checkpoint_report(sweep: Any, directory: Path) -> Path:
    """Write ``report.html`` and ``fig_checkpoints.png`` for a checkpoint sweep into ``directory``."""
    page, figures = build_page(sweep)
    directory = Path(directory)
    for fig in figures:
        atomic_write_bytes(directory / f"{fig.name}.png", fig.png)
    atomic_write_text(directory / REPORT_FILE, page)
    return directory / REPORT_FILE
