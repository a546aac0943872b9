"""The report page: one self-contained HTML file that opens from ``file://`` with no network.

The CircuitsVis browser bundle shipped in the installed wheel (``circuitsvis/dist/cdn/iife.js``) is
inlined once in a classic ``<script>`` (module scripts are blocked on ``file://``); each attention
figure is drawn by ``CircuitsVis.render(elementId, CircuitsVis.AttentionHeads, props)`` from a
classic script, with element ids derived from the example's position in the report (CircuitsVis'
own helpers use random uuids and load JavaScript from a CDN). A strict Content-Security-Policy makes
any network fetch impossible. Static figures are inline SVG.

Hooks for automated checks, harmless for a reader: ``report.html#only-attention`` shows only the
example cards (all opened and drawn) at the top of the page, ``#draw-all`` opens and draws every card,
and after drawing, ``<pre id="render-status">`` holds a JSON note of every canvas the figures drew (with
its position on the page), the points of each geometry panel and any script error
(:mod:`illusions.reports.interactive`).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from illusions.metric_table import DICTIONARY_METRICS, DOWNSTREAM_TABLE, SUMMARY_METRICS, metric
from illusions.reports.interactive import SCRIPT, STYLE
from illusions.reports.plots import StaticFigure

CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"
# Marks the inlined bundle so tests can count it; appears once per page.
BUNDLE_MARK = "/* circuitsvis bundle */"

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 24px 48px;
       color: #222; max-width: 1400px; }
header h1 { font-size: 1.5em; margin: 18px 0 4px; }
header p { margin: 2px 0; color: #555; }
nav { margin: 10px 0 18px; } nav a { margin-right: 14px; color: #1f5fa8; }
section { margin: 26px 0; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 3px; }
table { border-collapse: collapse; font-size: 0.85em; margin: 8px 0 12px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
pre.config { background: #f7f7f7; padding: 10px; font-size: 0.8em; max-height: 420px; overflow: auto; }
.note { color: #555; font-size: 0.9em; } .sig { color: #b00; font-weight: bold; }
figure { margin: 10px 0; } figure svg { max-width: 100%; height: auto; }
figcaption { color: #444; font-size: 0.88em; margin-top: 4px; }
.example { margin: 18px 0 30px; } .pair { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; }
.pair > div { min-width: 0; } .cv canvas { max-width: 100%; } .scroll { overflow-x: auto; }
.cv { position: relative; min-height: 200px; border: 1px solid #eee; padding: 4px; }
.cv h4 { margin: 2px 0 6px; }
html.only-attention header, html.only-attention nav { display: none; }
html.only-attention body { margin-top: 0; }
"""

# Runs before the bundle: collects script errors and honours #only-attention.
_HEAD_SCRIPT = """
window.__report = {errors: [], figures: []};
window.addEventListener("error", function (e) { window.__report.errors.push(String(e.message)); });
if (location.hash === "#only-attention") { document.documentElement.classList.add("only-attention"); }
"""

def circuitsvis_bundle() -> str:
    """The CircuitsVis browser bundle from the installed wheel, safe to inline in ``<script>``."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    text = path.read_text(encoding="utf-8")
    # The source map is not shipped beside the page; drop the pointer to it.
    text = "\n".join(line for line in text.splitlines() if not line.startswith("//# sourceMappingURL="))
    # "</script" would end the element early; "<\/" is the same string to JavaScript.
    return text.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def fmt_ci(row: dict[str, Any], digits: int = 3) -> str:
    """``value [low, high]``, or ``-`` when there is no estimate."""
    v, lo, hi = row.get("value"), row.get("ci_low"), row.get("ci_high")
    if not _finite(v):
        return "-"
    if not (_finite(lo) and _finite(hi)):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} <span class=note>[{lo:.{digits}f}, {hi:.{digits}f}]</span>"


def fmt_gap(row: dict[str, Any] | None, key: str) -> str:
    """Signed gap with its interval; red when the interval excludes 0."""
    if row is None:
        return "-"
    v, lo, hi = row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high")
    if not _finite(v):
        return "-"
    if not (_finite(lo) and _finite(hi)):
        return f"{v:+.3f}"
    text = f"{v:+.3f}<br><span class=note>[{lo:+.3f}, {hi:+.3f}]</span>"
    return f"<span class=sig>{text}</span>" if not lo <= 0 <= hi else text


def _table(header: Sequence[str], body: Sequence[Sequence[str]], left: int = 1) -> str:
    """An HTML table; ``header`` is escaped, ``body`` cells are trusted HTML; first ``left`` columns left-aligned."""
    cls = lambda i: " class=l" if i < left else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(header))
    rows = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in body)
    return f"<div class=scroll><table class=sortable><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"


# The metrics whose gaps the report's gap table shows, in its column order.
_GAP_METRICS = ("agreement", "proxy_accuracy", "original_accuracy")


def summary_tables(rows: Sequence[dict[str, Any]], splits: Sequence[str], proxies: Sequence[str],
                   reference: str = "iid") -> str:
    """Two tables from the overall rows: estimates with 95% intervals, then gaps to the reference."""
    from illusions.analyses.summary import POSITION_GROUP, group_label

    cell = {(r["proxy"], r["split"], r["metric"]): r for r in rows if r["group_by"] == "all"}
    # A task's named position groups (e.g. deep openers of unseen_depth) follow their split.
    grouped = [r for r in rows if r["group_by"] == POSITION_GROUP]
    cell.update({(r["proxy"], group_label(r["split"], r["group"]), r["metric"]): r for r in grouped})
    many = len(proxies) > 1
    lead = ["proxy"] if many else []
    est_body, gap_body = [], []
    control = any("gap_vs_control" in r for r in cell.values())  # a --match control beside the length one
    for proxy in proxies:
        names = [name for split in splits for name in [split] + list(dict.fromkeys(
            group_label(split, r["group"]) for r in grouped if r["proxy"] == proxy and r["split"] == split))]
        for split in names:
            m = {k: cell.get((proxy, split, k)) for k in SUMMARY_METRICS}
            if m["agreement"] is None:
                continue
            first = [esc(proxy)] if many else []
            est_body.append(first + [esc(split), str(int(m["agreement"]["n_positions"])),
                                     str(int(m["agreement"]["n_sequences"]))]
                            + [fmt_ci(m[k], metric(k).decimals) for k in SUMMARY_METRICS])
            if split == reference:
                continue
            cov = m["agreement"].get("matched_coverage")
            gap_body.append(first + [esc(split)]
                            + [fmt_gap(m[k], g) for k in _GAP_METRICS for g in ("gap_vs_ref", "gap_vs_matched")]
                            + [_coverage_cell(cov)]
                            + ([fmt_gap(m["agreement"], "gap_vs_control"),
                                _coverage_cell(m["agreement"].get("control_coverage"))] if control else []))
    est = _table(lead + ["split", "positions", "sequences", *(metric(k).header for k in SUMMARY_METRICS)],
                 est_body, left=len(lead) + 1)
    gaps = _table(lead + ["split", *(f"Δ{metric(k).short} vs {against}" for k in _GAP_METRICS
                                     for against in (reference, "len-matched")),
                          "len-matched coverage", *(("Δagreement vs matched", "matched coverage") if control else ())],
                  gap_body, left=len(lead) + 1)
    return (f"<h3>Estimates (95% bootstrap intervals over sequences)</h3>{est}"
            f"<h3>Gaps: split minus {esc(reference)}, and minus a length-matched {esc(reference)} control"
            f"</h3>{gaps}<p class=note>Red: the interval excludes 0. The length-matched control re-weights "
            f"{esc(reference)} positions to the split's length distribution; coverage is the share of the "
            f"split's positions whose length bin occurs in {esc(reference)}, and the matched gap is taken over "
            "those positions only (positions in other bins are left out of both sides)."
            + (" A row <i>split (group)</i> holds only that split's positions in a group the task names (for "
               "Dyck: closers whose opener is deeper than the training depth); its gaps compare it with the "
               f"whole of {esc(reference)}." if grouped else "")
            + (" <i>Matched</i>: the same control over strata of every column named by <code>--match</code> "
               "(see config.json), with its own coverage." if control else "") + "</p>"
            + sparse_table(cell, splits, proxies))


def _coverage_cell(cov: Any) -> str:
    if not _finite(cov):
        return "-"
    excluded = 1.0 - cov
    return f"{cov:.0%}" + (f" ({excluded:.1%} excluded)" if excluded >= 0.0005 else "")


def _estimates_table(cell: dict[tuple[str, str, str], dict[str, Any]], splits: Sequence[str],
                     proxies: Sequence[str], keys: Sequence[str], count: str,
                     count_label: str) -> tuple[str, list[tuple[str, str]]]:
    """The table of ``keys``' estimates with intervals, a row per proxy and split that has a ``count``
    row (whose ``n_positions`` fills the ``count_label`` column), and those (proxy, split) pairs; an
    empty table when there is none."""
    lead = ["proxy"] if len(proxies) > 1 else []
    pairs = [(proxy, split) for proxy in proxies for split in splits if cell.get((proxy, split, count)) is not None]
    if not pairs:
        return "", pairs
    body = [([esc(proxy)] if lead else []) + [esc(split), str(int(cell[(proxy, split, count)]["n_positions"]))]
            + [fmt_ci(cell.get((proxy, split, k)) or {}, metric(k).decimals) for k in keys] for proxy, split in pairs]
    return _table(lead + ["split", count_label, *(metric(k).header for k in keys)], body, left=len(lead) + 1), pairs


def sparse_table(cell: dict[tuple[str, str, str], dict[str, Any]], splits: Sequence[str],
                 proxies: Sequence[str]) -> str:
    """The sparse dictionary table (only for runs of ``sae``/``transcoder``; empty otherwise)."""
    # "tokens": l0's positions, every one (explained variance leaves each sequence's first out).
    table, _ = _estimates_table(cell, splits, proxies, DICTIONARY_METRICS, "l0", "tokens")
    if not table:
        return ""
    return ("<h3>Sparse dictionary on each split (95% bootstrap intervals)</h3>" + table
            + "<p class=note>Explained variance of the replaced activation on the split (1 - residual sum of "
            "squares / the split's variance about its own mean), normalised MSE = residual / sum of |x|^2 and MSE "
            "per token = residual / positions, over every token position but each sequence's first (the BOS "
            "token or first token, the attention sink whose norm dwarfs the others on real models); "
            "<i>pooled</i>: the same over all positions (tokens: all positions); L0: "
            "active latents per position; dead: share of latents never active on the split; new: share of "
            "latents active on the split but never on the data the dictionary was fitted on.</p>")


# The downstream gap table's columns: the two scores, then agreement's gap beside them for comparison.
_DOWNSTREAM_GAPS = ("loss_recovered", "kl_div_score", "agreement")


def downstream_tables(rows: Sequence[dict[str, Any]], splits: Sequence[str], proxies: Sequence[str],
                      sentences: str = "", reference: str = "iid") -> str:
    """A sparse dictionary's downstream loss per split (only for runs of ``sae``/``transcoder``; empty
    otherwise): estimates with intervals, then the gaps of loss recovered and KL score to ``reference``
    beside agreement's; ``sentences`` (HTML) go between the heading and the tables."""
    cell = {(r["proxy"], r["split"], r["metric"]): r for r in rows if r["group_by"] == "all"}
    est, pairs = _estimates_table(cell, splits, proxies, DOWNSTREAM_TABLE, "loss_recovered", "positions")
    if not est:
        return ""
    lead = ["proxy"] if len(proxies) > 1 else []
    gap_body = [([esc(proxy)] if lead else []) + [esc(split)]
                + [fmt_gap(cell.get((proxy, split, k)), "gap_vs_ref") for k in _DOWNSTREAM_GAPS]
                for proxy, split in pairs if split != reference]
    gaps = _table(lead + ["split", *(f"Δ{metric(k).short} vs {reference}" for k in _DOWNSTREAM_GAPS)], gap_body,
                  left=len(lead) + 1) if gap_body else ""
    return ("<h3>Sparse dictionary downstream: loss recovered and KL score (95% bootstrap intervals)</h3>"
            + sentences + est + gaps
            + "<p class=note>At the scored positions: the target's cross-entropy (whole vocabulary) with the "
            "original model, the proxy and the replaced activation zero-ablated; loss recovered = (CE ablated - "
            "CE proxy) / (CE ablated - CE original); KL(original || proxy) and KL(original || ablated); KL score "
            "= (KL ablated - KL) / KL ablated (SAELens' ce_loss_score and kl_div_score: 1 = as the model, 0 = no "
            "better than zeros; ratios of means over the split). Gaps: split minus "
            f"{esc(reference)}, raw (not length-matched), with the 95% interval of the difference of the two "
            "splits' bootstrap replicates; agreement's is the summary table's raw gap. Red: the interval "
            "excludes 0.</p>")


def figure(fig: StaticFigure, caption: str) -> str:
    """An inline SVG figure with a caption naming its PNG copy."""
    return (f'<figure id="{esc(fig.name)}">{fig.svg}<figcaption>{caption} '
            f"<span class=note>(PNG: {esc(fig.name)}.png)</span></figcaption></figure>")


@dataclasses.dataclass(frozen=True)
class Section:
    ident: str
    title: str
    body: str


def render_page(*, title: str, subtitle: Sequence[str], sections: Sequence[Section], data: str) -> str:
    """The complete page: sections in order, the bundle once, then the drawing script
    (:mod:`illusions.reports.interactive`) over ``data``, its JSON."""
    return (
        _page_start(title, subtitle, sections, head_script=f"<script>{_HEAD_SCRIPT}</script>")
        + '<pre id="render-status" hidden></pre><div id="tooltip"></div>'
        f'<script type="application/json" id="report-data">{data}</script>\n'
        f"<script>{BUNDLE_MARK}\n{circuitsvis_bundle()}\n</script>\n"
        f"<script>{SCRIPT}</script>\n</body></html>\n"
    )


def config_block(config: dict[str, Any]) -> str:
    """The configuration, collapsed until opened."""
    return (f"<details class=config><summary>config.json</summary><pre class=config>"
            f"{esc(json.dumps(config, indent=2))}</pre></details>")


def render_static_page(*, title: str, subtitle: Sequence[str], sections: Sequence[Section]) -> str:
    """A page of tables and inline figures only (no script, no bundle), e.g. the checkpoint report."""
    return _page_start(title, subtitle, sections, head_script="") + "</body></html>\n"


def _page_start(title: str, subtitle: Sequence[str], sections: Sequence[Section], *, head_script: str) -> str:
    """Head (CSP, style, ``head_script``), header, navigation and sections: what both pages share."""
    nav = "".join(f'<a href="#{esc(s.ident)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{esc(s.ident)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    sub = "".join(f"<p>{line}</p>" for line in subtitle)
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_STYLE}{STYLE}</style>{head_script}</head>\n"
        f"<body><header><h1>{esc(title)}</h1>{sub}</header><nav>{nav}</nav>{body}"
    )
