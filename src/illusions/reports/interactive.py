"""The report's interactive parts: small hand-written HTML, CSS and JavaScript, no library but CircuitsVis.

* every ``table.sortable`` sorts by a column when its header is clicked (numbers as numbers);
* the example browser: a table of the chosen sequences (filter by split and by a range of any column,
  sort by any column; a row opens its card), and per sequence a card with the tokens, every scored
  position's target, original and proxy predictions, KL and JSD, and the original | proxy attention
  (CircuitsVis, drawn when the card opens; patterns arrive deflated, see
  :func:`illusions.reports.attention.pack_patterns`);
* the geometry scatter: inline SVG drawn from JSON, hover a point for its values, drag a rectangle to
  zoom (double-click to reset), click a legend entry to hide or show a split, switch the vertical
  axis between the removed norm and the second kept direction;
* the latent table of sparse dictionary proxies and the cards of the top latents.

Hooks for automated checks: ``#only-attention`` shows only the example cards, ``#only-<section>``
only that section (e.g. ``#only-geometry``), ``#draw-all`` opens and draws every card, and ``<pre id="render-status">`` receives a JSON note (figures drawn, their canvases,
SVG points per panel, examples, script errors) once everything has drawn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from illusions.reports.attention import Example
from illusions.reports.geometry import GeometryPanel
from illusions.reports.latents import Latent
from illusions.reports.verdict import metric_words

FIT_COLOUR = "#9a9a9a"

STYLE = """
ul.verdict li { margin: 4px 0; line-height: 1.4; }
details.config > summary, details.example > summary { cursor: pointer; }
table.sortable th { cursor: pointer; } table.sortable th[data-dir=asc]::after { content: " \\25B2"; }
table.sortable th[data-dir=desc]::after { content: " \\25BC"; }
.controls { margin: 8px 0; font-size: 0.9em; } .controls label { margin-right: 12px; }
.controls input { width: 5em; }
table.sortable td:first-child, table.sortable th:first-child, table.examples td:nth-child(2),
table.examples th:nth-child(2) { text-align: left; }
#example-table tbody tr { cursor: pointer; } #example-table tbody tr:hover { background: #eef4fb; }
details.example { margin: 10px 0; border: 1px solid #ddd; padding: 6px 10px; }
details.example > summary { font-weight: bold; }
.tokens { font-family: monospace; line-height: 1.9; margin: 6px 0; }
.tokens span { padding: 1px 2px; margin-right: 2px; border-radius: 2px; }
.tokens span.ok { background: #dcebdc; } .tokens span.chg { background: #f3b7b7; }
tr.chg td { background: #fbe3e3; }
.scatters { display: flex; flex-wrap: wrap; gap: 12px; } .scatter { border: 1px solid #eee; }
.scatter svg { display: block; } .legend span { cursor: pointer; margin-right: 12px; font-size: 0.85em; }
.legend span.off { opacity: 0.3; } .legend i { display: inline-block; width: 10px; height: 10px; margin-right: 3px; }
#tooltip { position: fixed; pointer-events: none; background: #fff; border: 1px solid #888; padding: 3px 6px;
           font-size: 0.8em; display: none; z-index: 10; white-space: pre; }
.latent { margin: 10px 0; } .latent code.hit { background: #f3d38a; }
html.only-attention section#examples > :not(.cards) { display: none; }
html.only-attention section:not(#examples) { display: none; }
"""

SCRIPT = r"""
(function () {
  var state = window.__report;
  var node = document.getElementById("report-data");
  var data = node ? JSON.parse(node.textContent) : {examples: [], geometry: [], colours: {}};
  var waits = [];
  // "#only-<section id>" shows that section alone at the top (for screenshots and checks).
  var only = location.hash.indexOf("#only-") === 0 && location.hash !== "#only-attention" ?
    location.hash.slice(6) : null;
  if (only && document.getElementById(only)) {
    document.querySelectorAll("header, nav, section").forEach(function (e) {
      if (e.id !== only) { e.style.display = "none"; }
    });
  }

  function value(cell) {
    var v = cell.getAttribute("data-v");
    if (v === null) { v = cell.textContent; }
    var f = parseFloat(v);
    return isNaN(f) ? v.toLowerCase() : f;
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("thead th").forEach(function (th, col) {
      th.title = "click to sort";
      th.addEventListener("click", function () {
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        var dir = th.getAttribute("data-dir") === "desc" ? "asc" : "desc";
        table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-dir"); });
        th.setAttribute("data-dir", dir);
        rows.sort(function (a, b) {
          var x = value(a.cells[col]), y = value(b.cells[col]), c;
          if (typeof x === typeof y) { c = x < y ? -1 : x > y ? 1 : 0; } else { c = typeof x === "number" ? -1 : 1; }
          return dir === "asc" ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });

  // --- examples ---------------------------------------------------------------------------------
  function inflate(b64) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) { bytes[i] = bin.charCodeAt(i); }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Response(stream).arrayBuffer().then(function (buf) { return new Uint8Array(buf); });
  }
  function expand(flat, nHeads, n) {
    var per = n * (n + 1) / 2, heads = [];
    for (var h = 0; h < nHeads; h++) {
      var k = h * per, m = [];
      for (var i = 0; i < n; i++) {
        var row = new Array(n);
        for (var j = 0; j < n; j++) { row[j] = j <= i ? flat[k++] / data.scale : 0; }
        m.push(row);
      }
      heads.push(m);
    }
    return heads;
  }
  var drawn = {};
  function draw(i) {
    if (drawn[i]) { return drawn[i]; }
    var ex = data.examples[i];
    if (!ex || !ex.heads.length) { drawn[i] = Promise.resolve(); return drawn[i]; }
    drawn[i] = Promise.all([inflate(ex.original), inflate(ex.proxy)]).then(function (got) {
      ["original", "proxy"].forEach(function (kind, k) {
        var id = "ex-" + i + "-" + kind;
        try {
          CircuitsVis.render(id, CircuitsVis.AttentionHeads, {
            attention: expand(got[k], ex.heads.length, ex.tokens.length), tokens: ex.tokens,
            attentionHeadNames: ex.heads, maskUpperTri: true
          });
          state.figures.push(id);
        } catch (err) { state.errors.push(id + ": " + String(err)); }
      });
    }).catch(function (err) { state.errors.push("ex-" + i + ": " + String(err)); });
    return drawn[i];
  }
  var all = location.hash === "#draw-all" || location.hash === "#only-attention";
  document.querySelectorAll("details.example").forEach(function (d) {
    var i = +d.getAttribute("data-i");
    if (all) { d.open = true; }
    if (d.open) { waits.push(draw(i)); }
    d.addEventListener("toggle", function () { if (d.open) { draw(i); } });
  });
  var browser = document.getElementById("example-browser");
  if (browser) {
    var split = browser.querySelector("#ex-split"), col = browser.querySelector("#ex-col");
    var lo = browser.querySelector("#ex-min"), hi = browser.querySelector("#ex-max");
    var filter = function () {
      var shown = 0, a = parseFloat(lo.value), b = parseFloat(hi.value);
      browser.querySelectorAll("#example-table tbody tr").forEach(function (tr) {
        var ok = !split.value || tr.getAttribute("data-split") === split.value;
        var v = parseFloat(tr.getAttribute("data-" + col.value));
        if (ok && !isNaN(a) && !(v >= a)) { ok = false; }
        if (ok && !isNaN(b) && !(v <= b)) { ok = false; }
        tr.hidden = !ok;
        var card = document.getElementById(tr.getAttribute("data-ex"));
        if (card) { card.hidden = !ok; }
        if (ok) { shown++; }
      });
      browser.querySelector("#ex-count").textContent = shown + " shown";
    };
    [split, col, lo, hi].forEach(function (el) { el.addEventListener("input", filter); });
    browser.querySelectorAll("#example-table tbody tr").forEach(function (tr) {
      tr.addEventListener("click", function () {
        var card = document.getElementById(tr.getAttribute("data-ex"));
        card.open = true;
        card.scrollIntoView({block: "start"});
      });
    });
    filter();
  }

  // --- geometry ---------------------------------------------------------------------------------
  // The SVG namespace, as the HTML parser assigns it (the page spells out no URL).
  var probe = document.createElement("div");
  probe.innerHTML = "<svg></svg>";
  var SVG = probe.firstChild.namespaceURI;
  var tip = document.getElementById("tooltip");
  var hidden = {}, yMode = "removed", plots = [];
  function el(name, attrs, parent) {
    var e = document.createElementNS(SVG, name);
    for (var k in attrs) { e.setAttribute(k, attrs[k]); }
    if (parent) { parent.appendChild(e); }
    return e;
  }
  function ticks(a, b) {
    var span = b - a || 1, step = Math.pow(10, Math.floor(Math.log10(span / 5))), out = [];
    [1, 2, 5, 10].some(function (m) { if (span / (step * m) <= 6) { step *= m; return true; } return false; });
    for (var t = Math.ceil(a / step) * step; t <= b + 1e-9; t += step) { out.push(+t.toFixed(10)); }
    return out;
  }
  function scatter(box, panel, index) {
    var W = 440, H = 300, L = 48, R = 10, T = 22, B = 36;
    var plot = {box: box, panel: panel, zoom: null};
    function extent(k) {
      var lo = Infinity, hi = -Infinity;
      panel.points.forEach(function (pts, s) {
        if (hidden[panel.splits[s]]) { return; }
        pts.forEach(function (p) { lo = Math.min(lo, p[k]); hi = Math.max(hi, p[k]); });
      });
      if (!isFinite(lo)) { lo = 0; hi = 1; }
      var pad = (hi - lo) * 0.04 || 0.5;
      return [lo - pad, hi + pad];
    }
    plot.draw = function () {
      while (box.firstChild) { box.removeChild(box.firstChild); }
      var yk = yMode === "removed" ? 2 : 1;
      var xr = plot.zoom ? plot.zoom[0] : extent(0), yr = plot.zoom ? plot.zoom[1] : extent(yk);
      var sx = function (v) { return L + (v - xr[0]) / (xr[1] - xr[0]) * (W - L - R); };
      var sy = function (v) { return H - B - (v - yr[0]) / (yr[1] - yr[0]) * (H - T - B); };
      var svg = el("svg", {width: W, height: H, "class": "geo", "data-panel": index}, box);
      el("text", {x: L, y: 15, "font-size": 12, "font-weight": "bold"}, svg).textContent = panel.title;
      ticks(xr[0], xr[1]).forEach(function (t) {
        el("line", {x1: sx(t), x2: sx(t), y1: T, y2: H - B, stroke: "#eee"}, svg);
        el("text", {x: sx(t), y: H - B + 13, "font-size": 10, "text-anchor": "middle"}, svg).textContent = t;
      });
      ticks(yr[0], yr[1]).forEach(function (t) {
        el("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), stroke: "#eee"}, svg);
        el("text", {x: L - 4, y: sy(t) + 3, "font-size": 10, "text-anchor": "end"}, svg).textContent = t;
      });
      el("rect", {x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#999"}, svg);
      el("text", {x: (L + W - R) / 2, y: H - 6, "font-size": 11, "text-anchor": "middle"}, svg).textContent =
        "kept direction 1";
      el("text", {x: 12, y: (T + H - B) / 2, "font-size": 11, "text-anchor": "middle",
                  transform: "rotate(-90 12 " + (T + H - B) / 2 + ")"}, svg).textContent =
        yMode === "removed" ? (panel.kind === "centroid" ? "distance to nearest centroid" : "off-subspace norm")
                            : "kept direction 2";
      var g = el("g", {"clip-path": "url(#clip-" + index + ")"}, svg);
      var clip = el("clipPath", {id: "clip-" + index}, svg);
      el("rect", {x: L, y: T, width: W - L - R, height: H - T - B}, clip);
      var n = 0;
      panel.points.forEach(function (pts, s) {
        var name = panel.splits[s];
        if (hidden[name]) { return; }
        var colour = data.colours[name] || "#9a9a9a";
        pts.forEach(function (p) {
          var c = el("circle", {cx: sx(p[0]).toFixed(1), cy: sy(p[yk]).toFixed(1), r: 2.6, fill: colour,
                                "fill-opacity": s === 0 ? 0.45 : 0.7}, g);
          c.addEventListener("mouseenter", function (e) {
            tip.textContent = name + "  row " + p[3] + "  pos " + p[4] + "\n" + panel.colour + ": " + p[5] +
              "\nkept 1: " + p[0] + "  kept 2: " + p[1] + "\nremoved: " + p[2];
            tip.style.display = "block"; tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px";
          });
          c.addEventListener("mouseleave", function () { tip.style.display = "none"; });
          n++;
        });
      });
      state.svgPoints[index] = n;
      var sel = null, start = null;
      var at = function (e) { var r = svg.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
      svg.addEventListener("mousedown", function (e) {
        start = at(e); sel = el("rect", {x: start[0], y: start[1], width: 0, height: 0, fill: "rgba(31,95,168,0.15)",
                                          stroke: "#1f5fa8"}, svg);
        e.preventDefault();
      });
      svg.addEventListener("mousemove", function (e) {
        if (!sel) { return; }
        var p = at(e);
        sel.setAttribute("x", Math.min(p[0], start[0])); sel.setAttribute("width", Math.abs(p[0] - start[0]));
        sel.setAttribute("y", Math.min(p[1], start[1])); sel.setAttribute("height", Math.abs(p[1] - start[1]));
      });
      svg.addEventListener("mouseup", function (e) {
        if (!sel) { return; }
        var p = at(e); svg.removeChild(sel); sel = null;
        if (Math.abs(p[0] - start[0]) < 5 || Math.abs(p[1] - start[1]) < 5) { return; }
        var ix = function (v) { return xr[0] + (v - L) / (W - L - R) * (xr[1] - xr[0]); };
        var iy = function (v) { return yr[0] + (H - B - v) / (H - T - B) * (yr[1] - yr[0]); };
        plot.zoom = [[ix(Math.min(p[0], start[0])), ix(Math.max(p[0], start[0]))],
                     [iy(Math.max(p[1], start[1])), iy(Math.min(p[1], start[1]))]];
        plot.draw();
      });
      svg.addEventListener("dblclick", function () { plot.zoom = null; plot.draw(); });
    };
    plots.push(plot);
    plot.draw();
  }
  state.svgPoints = {};
  var geo = document.getElementById("geometry-plots");
  if (geo) {
    data.geometry.forEach(function (panel, i) {
      var box = document.createElement("div");
      box.className = "scatter";
      geo.appendChild(box);
      try { scatter(box, panel, i); } catch (err) { state.errors.push("geometry " + i + ": " + String(err)); }
    });
    var legend = document.getElementById("geometry-legend");
    if (legend && data.geometry.length) {
      data.geometry[0].splits.forEach(function (name) {
        var s = document.createElement("span");
        s.innerHTML = "<i></i>";
        s.firstChild.style.background = data.colours[name] || "#9a9a9a";
        s.appendChild(document.createTextNode(name));
        s.title = "click to hide or show";
        s.addEventListener("click", function () {
          hidden[name] = !hidden[name]; s.classList.toggle("off");
          plots.forEach(function (p) { p.draw(); });
        });
        legend.appendChild(s);
      });
    }
    var y = document.getElementById("geometry-y");
    if (y) { y.addEventListener("input", function () { yMode = y.value; plots.forEach(function (p) { p.zoom = null; p.draw(); }); }); }
  }

  Promise.all(waits).then(function () {
    setTimeout(function () {
      var canvases = [];
      state.figures.forEach(function (id) {
        document.getElementById(id).querySelectorAll("canvas").forEach(function (c) {
          var r = c.getBoundingClientRect();
          canvases.push({figure: id, x: r.left, y: r.top, width: r.width, height: r.height});
        });
      });
      document.getElementById("render-status").textContent = JSON.stringify({
        figures: state.figures, canvases: canvases, errors: state.errors, svg_points: state.svgPoints,
        examples: document.querySelectorAll("details.example").length});
    }, 3000);
  });
})();
"""


def _esc(value: Any) -> str:
    import html

    return html.escape(str(value), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return "" if not math.isfinite(x) else f"{x:.{digits}f}"
    return str(x)


def _table(cls: str, header: Sequence[str], rows: Sequence[tuple[str, Sequence[tuple[str, str]]]],
           ident: str = "") -> str:
    """A sortable table; each row is ``(tr attributes, [(sort value, cell HTML)])``."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(f"<tr{attrs}>" + "".join(f'<td data-v="{_esc(v)}">{c}</td>' for v, c in cells) + "</tr>"
                   for attrs, cells in rows)
    ident = f' id="{ident}"' if ident else ""
    return (f'<div class=scroll><table class="sortable {cls}"{ident}><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def verdict_list(sentences: Sequence[tuple[str, str]]) -> str:
    """The summary sentences (already HTML) as a list, one item per split."""
    return "<ul class=verdict>" + "".join(f'<li data-split="{_esc(s)}">{text}</li>' for s, text in sentences) + "</ul>"


def _meta_columns(examples: Sequence[Example]) -> list[str]:
    skip = {"pos", "target", "original", "proxy", "kl", "jsd"}
    return list(dict.fromkeys(k for ex in examples for p in ex.positions for k in p if k not in skip))


def examples_section(examples: Sequence[Example], splits: Sequence[str]) -> tuple[str, list[dict[str, Any]]]:
    """The example browser (controls, table, cards) and the examples' JSON for the script."""
    meta = _meta_columns(examples)
    columns = [("disagreements", "changed predictions"), ("scored", "scored positions"), ("length", "tokens"),
               ("mean_kl", f"mean {metric_words('kl')}"), ("max_kl", f"max {metric_words('kl')}"),
               ("mean_jsd", f"mean {metric_words('attention_jsd')}")] + [(f"max_{m}", f"max {m}") for m in meta]
    rows, cards, payload = [], [], []
    for i, ex in enumerate(examples):
        c = ex.choice
        kl = [p["kl"] for p in ex.positions if math.isfinite(p["kl"])]
        jsd = [p["jsd"] for p in ex.positions if math.isfinite(p["jsd"])]
        values: dict[str, Any] = {
            "disagreements": c.disagreements, "scored": c.n_scored, "length": len(ex.tokens),
            "mean_kl": sum(kl) / len(kl) if kl else math.nan, "max_kl": max(kl) if kl else math.nan,
            "mean_jsd": sum(jsd) / len(jsd) if jsd else math.nan,
        }
        for m in meta:
            got = [p[m] for p in ex.positions if isinstance(p.get(m), int | float)]
            values[f"max_{m}"] = max(got) if got else math.nan
        ident = f"ex-{i}"
        attrs = f' data-ex="{ident}" data-split="{_esc(c.split)}"' + "".join(
            f' data-{k}="{_esc(_num(v, 4))}"' for k, v in values.items())
        cells = [(c.split, _esc(c.split)), (c.kind, _esc(c.kind)), (str(c.row), str(c.row))]
        cells += [(_num(values[k], 4), _num(values[k], 4 if "kl" in k or "jsd" in k else 3)
                   if isinstance(values[k], float) else str(values[k])) for k, _ in columns]
        rows.append((attrs, cells))
        cards.append(_card(i, ex, meta, opened=all(e.choice.split != c.split for e in examples[:i])))
        payload.append({"tokens": list(ex.tokens), "heads": list(ex.head_names), "original": ex.original,
                        "proxy": ex.proxy})
    options = "".join(f'<option value="{_esc(s)}">{_esc(s)}</option>' for s in splits)
    cols = "".join(f'<option value="{k}">{_esc(label)}</option>' for k, label in columns)
    controls = (f'<div class=controls><label>split <select id=ex-split><option value="">all</option>{options}'
                f"</select></label><label>keep <select id=ex-col>{cols}</select></label>"
                "<label>from <input id=ex-min type=number step=any></label>"
                "<label>to <input id=ex-max type=number step=any></label><span id=ex-count class=note></span></div>")
    table = _table("examples", ["split", "picked for", "row", *[label for _, label in columns]], rows,
                   ident="example-table")
    return (f'<div id="example-browser">{controls}{table}</div><div class=cards>{"".join(cards)}</div>', payload)


def _card(i: int, ex: Example, meta: Sequence[str], opened: bool) -> str:
    """One example's card; ``opened``: drawn when the page opens (each split's first example)."""
    c = ex.choice
    scored = {p["pos"]: p for p in ex.positions}
    strip = []
    for pos, tok in enumerate(ex.tokens):
        p = scored.get(pos)
        if p is None:
            strip.append(f"<span>{_esc(tok)}</span>")
            continue
        cls = "chg" if p["original"] != p["proxy"] else "ok"
        title = (f"pos {pos}: target {p['target']}, original {p['original']}, proxy {p['proxy']}, "
                 f"KL {_num(p['kl'], 4)}")
        strip.append(f'<span class={cls} title="{_esc(title)}">{_esc(tok)}</span>')
    header = ["pos", "token", "target", "original predicts", "proxy predicts", "KL (nats)", "attn JSD (bits)", *meta]
    rows = []
    for p in ex.positions:
        changed = p["original"] != p["proxy"]
        cells = [(str(p["pos"]), str(p["pos"])), (ex.tokens[p["pos"]], _esc(ex.tokens[p["pos"]])),
                 (p["target"], _esc(p["target"])), (p["original"], f"<span class=pred>{_esc(p['original'])}</span>"),
                 (p["proxy"], f"<span class=pred>{_esc(p['proxy'])}</span>"),
                 (_num(p["kl"], 4), _num(p["kl"], 4)), (_num(p["jsd"], 4), _num(p["jsd"], 4))]
        cells += [(_num(p.get(m, "")), _esc(_num(p.get(m, "")))) for m in meta]
        rows.append((" class=chg" if changed else "", cells))
    hidden = f" Not drawn: {_esc(', '.join(ex.hidden_heads))}." if ex.hidden_heads else ""
    attention = ('<div class="pair">'
                 f'<div class="cv"><h4>original model</h4><div id="ex-{i}-original"></div></div>'
                 f'<div class="cv"><h4>proxy</h4><div id="ex-{i}-proxy"></div></div></div>'
                 if ex.head_names else "<p class=note>This proxy changes no attention head directly.</p>")
    jsd = f"{c.mean_jsd:.4f} bits" if math.isfinite(c.mean_jsd) else "n/a"
    return (f'<details class="example" id="ex-{i}" data-i="{i}"{" open" if opened else ""}>'
            f"<summary>{_esc(c.split)}: row {c.row} ({_esc(c.kind)} disagreements: {c.disagreements} of "
            f"{c.n_scored} scored positions changed; mean attention JSD {jsd})</summary>"
            f'<div class="tokens">{"".join(strip)}</div>'
            "<p class=note>Scored positions are shaded: green where the proxy predicts what the model predicts, red "
            f"where it does not (hover for target, predictions and KL).{hidden}</p>"
            + _table("positions", header, rows) + attention + "</details>")


def geometry_section(found: Sequence[GeometryPanel], fit_name: str, order: Sequence[str]) -> str:
    """Controls, the plot container (filled by the script) and the median table."""
    rows = []
    for p in found:
        base = p.median_removed.get(fit_name, math.nan)
        for split in order:
            if split not in p.median_removed:
                continue
            m = p.median_removed[split]
            ratio = m / base if base and math.isfinite(base) and base > 0 else math.nan
            rows.append(("", [(p.title, _esc(p.title)), (split, _esc(split)), (_num(m), _num(m)),
                              (_num(ratio, 2), _num(ratio, 2) + ("×" if math.isfinite(ratio) else ""))]))
    removed = "distance to the nearest centroid" if found and found[0].kind == "centroid" else "off-subspace norm"
    table = _table("geometry", ["panel", "data", f"median {removed}", f"× {fit_name}"], rows)
    return ('<div class=controls><label>vertical axis <select id=geometry-y><option value=removed>removed norm '
            "|x − proxy(x)|</option><option value=kept2>kept direction 2</option></select></label>"
            '<span id=geometry-legend class=legend></span></div><div id="geometry-plots" class="scatters"></div>'
            + f"<h3>Median {removed} per panel and split</h3>" + table)


def latents_section(found: Sequence[Latent], groups: Sequence[str], fit_name: str) -> str:
    """The latent table and the cards of the top latents."""
    rows = []
    for lat in found:
        cells = [(lat.name, _esc(lat.name)), ("1" if lat.new else "0", "new" if lat.new else ""),
                 (_num(lat.ood_score, 4), _num(lat.ood_score, 4))]
        cells += [(_num(lat.frequency.get(g, math.nan), 4), _num(lat.frequency.get(g, math.nan), 4)) for g in groups]
        rows.append((' class="new"' if lat.new else "", cells))
    table = _table("latents", ["latent", "new", "OOD score", *[f"frequency {g}" for g in groups]], rows,
                   ident="latent-table")
    cards = []
    for lat in found:
        if not lat.contexts and not lat.promoted:
            continue
        ctx = "".join(f"<li>{_esc(s)} row {row}, pos {pos} (activation {act}): <code>{_esc(before)}</code> "
                      f"<code class=hit>{_esc(tok)}</code> <code>{_esc(after)}</code></li>"
                      for s, row, pos, act, before, tok, after in lat.contexts)
        promoted = ", ".join(f"<code>{_esc(t)}</code> ({v:+.3f})" for t, v in lat.promoted)
        cards.append(f'<div class="latent"><h4>{_esc(lat.name)}{" (new)" if lat.new else ""}: frequency '
                     f"{lat.frequency.get(fit_name, 0):.4f} on {_esc(fit_name)}, OOD score {lat.ood_score:+.4f}</h4>"
                     f"<p>Top activating contexts out of distribution:</p><ul>{ctx or '<li>none active</li>'}</ul>"
                     f"<p>Top promoted tokens (W_dec · W_U): {promoted}</p></div>")
    return table + "<h3>Top latents by out-of-distribution activation</h3>" + "".join(cards)


def payload(examples: list[dict[str, Any]], geometry: list[dict[str, Any]], colours: Mapping[str, str],
            scale: int) -> str:
    """The page's JSON data, safe inside ``<script>``."""
    text = json.dumps({"scale": scale, "examples": examples, "geometry": geometry, "colours": dict(colours)},
                      separators=(",", ":"), ensure_ascii=True)
    # Inside <script> the HTML parser only looks for "<"-sequences; "\u003c" is "<" to JSON.
    return text.replace("<", "\\u003c")
