"""Rich tables for analysis results (printing only; the numbers come from the tidy rows)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

from illusions.metric_table import DICTIONARY_METRICS, DOWNSTREAM_TABLE, SUMMARY_METRICS, metric


def _ci(value: float, low: float, high: float, digits: int = 3) -> str:
    """``value ±h`` with h the half-width of the 95% interval (exact bounds are in the CSV/JSON)."""
    if not _finite(value):
        return "-"
    if not (_finite(low) and _finite(high)):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ±{(high - low) / 2:.{digits}f}"


def result_console() -> Console:
    """A console for results: as wide as the terminal (or ``$COLUMNS``), else 160 columns when piped."""
    import os

    probe = Console()
    return probe if probe.is_terminal or os.environ.get("COLUMNS", "").isdigit() else Console(width=160)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _gap(row: dict[str, Any], key: str) -> str:
    v, lo, hi = row[key], row[f"{key}_low"], row[f"{key}_high"]
    if not _finite(v):
        return "-"
    mark = "" if not (_finite(lo) and _finite(hi)) or lo <= 0 <= hi else "*"
    return f"{v:+.3f}{mark}"


# Excluded shares below this print as 0.0% and get no mark.
_EXCLUDED_MARK = 0.0005


def print_summary(run: Any, console: Console | None = None) -> None:
    """Per split (and per swept value): accuracies, agreement, JSD, KL with 95% intervals, gaps.

    When the full table is wider than the console, a compact one prints instead: the same values
    without the interval half-widths (``metrics.csv`` and ``--json`` keep the exact intervals) under
    short headers; split and proxy names are never cut.
    """
    from illusions.analyses.summary import POSITION_GROUP

    console = console or result_console()
    rows = [r for r in run.rows if r["group_by"] == "all"]
    spec = run.spec
    proxies = list(dict.fromkeys(r["proxy"] for r in rows))
    title = (f"{spec.task}: {', '.join(proxies)} "
             f"on {run.model_source} model ({run.model_description})")
    # A task's named position groups print under their split as "split (name)".
    grouped = [r for r in run.rows if r["group_by"] == POSITION_GROUP]
    body, excluded = _summary_body(rows, grouped, proxies)
    table, compact, dropped = _fitted_summary_table(console, title, proxies, body, excluded)
    console.print(table)
    note = _summary_note(run, body, excluded, grouped, compact=compact, dropped=dropped)
    console.print(f"[dim]{note}[/dim]")
    if any(r["metric"] == "explained_variance" for r in rows):
        print_sparse(rows, proxies, console)
    if any(r["metric"] == "loss_recovered" for r in rows):
        print_downstream(rows, proxies, console)


def _summary_body(rows: list[dict[str, Any]], grouped: list[dict[str, Any]], proxies: list[str],
                  ) -> tuple[list[tuple[str, str, dict[str, Any]]], dict[str, float]]:
    """The summary table's lines ``(proxy, split or group, metric -> row)`` and, per split, the share
    of positions the length-matched gap leaves out where it is at least :data:`_EXCLUDED_MARK`."""
    from illusions.analyses.summary import excluded_share, group_label

    by = {(r["proxy"], r["split"], r["metric"]): r for r in rows}
    by.update({(r["proxy"], group_label(r["split"], r["group"]), r["metric"]): r for r in grouped})
    body: list[tuple[str, str, dict[str, Any]]] = []
    excluded: dict[str, float] = {}
    for proxy in proxies:
        for split in dict.fromkeys(r["split"] for r in rows if r["proxy"] == proxy):
            names = [split] + list(dict.fromkeys(group_label(split, r["group"]) for r in grouped
                                                 if r["proxy"] == proxy and r["split"] == split))
            for name in names:
                m = {k: by[(proxy, name, k)] for k in SUMMARY_METRICS}
                share = excluded_share(m["agreement"]) if _finite(m["agreement"]["gap_vs_matched"]) else None
                if share is not None and share >= _EXCLUDED_MARK:
                    excluded[name] = max(excluded.get(name, 0.0), share)
                body.append((proxy, name, m))
    return body, excluded


def _fitted_summary_table(console: Console, title: str, proxies: list[str], body: list[Any],
                          excluded: dict[str, float]) -> tuple[Table, bool, list[str]]:
    """The full summary table, or the compact one (with columns dropped while still too wide) when the
    full one is wider than the console: ``(table, compact, dropped columns)``."""
    from rich.measure import Measurement

    def width(t: Table) -> int:
        # Measured with room to spare: a console's own measure is capped at its width.
        return Measurement.get(console, console.options.update_width(10**4), t).maximum

    table = _summary_table(title, proxies, body, excluded, compact=False)
    compact = width(table) > console.width
    dropped: list[str] = []
    if compact:
        table = _summary_table(title, proxies, body, excluded, compact=True)
        # Still too wide: drop whole columns (least needed first) rather than cut numbers or names.
        for column in ("KL", "JSD", "pos", "orig"):
            if width(table) <= console.width:
                break
            dropped.append(column)
            table = _summary_table(title, proxies, body, excluded, compact=True, drop=tuple(dropped))
    return table, compact, dropped


def _summary_note(run: Any, body: list[tuple[str, str, dict[str, Any]]], excluded: dict[str, float],
                  grouped: list[dict[str, Any]], *, compact: bool, dropped: list[str]) -> str:
    """The note under the summary table: what its columns and marks mean."""
    note = ("± half-width of the 95% bootstrap interval over sequences" if not compact else
            "values without intervals (the 95% intervals are in metrics.csv and --json); orig/proxy: accuracy "
            "of the original and the proxy; agree: agreement; Δ iid / Δ len: agreement gap vs iid / vs "
            "length-matched iid")
    if dropped:
        note += f"; columns {', '.join(dropped)} left out for the console's width"
    note += ("; * marks a gap whose interval excludes 0; len-matched: iid re-weighted to the split's length "
             "distribution. JSD in bits over the simplified heads' attention, KL(original || proxy) in nats.")
    if excluded:
        parts = ", ".join(f"{share:.1%} of {split}" for split, share in excluded.items())
        note += (f" † len-matched over the length bins iid covers only; positions in other bins are left out "
                 f"of both sides: {parts}.")
    control = [(name, m["agreement"]) for _, name, m in body if "control_coverage" in m["agreement"]]
    if control:
        on = " x ".join(getattr(run.spec, "match", ()) or ("the --match columns",))
        cover = ", ".join(dict.fromkeys(f"{r['control_coverage']:.1%} of {name}" for name, r in control
                                        if _finite(r["control_coverage"])))
        note += (f" Δ matched: agreement gap vs iid re-weighted to the split's strata of {on}, over the strata iid "
                 f"has (positions in others are left out of both sides); coverage: {cover or 'none'}.")
    if grouped:
        note += " " + _groups_note(run, grouped)
    return note


# (metric, header, decimals) of the sparse dictionary table: a narrow console table.
SPARSE_COLUMNS = tuple((k, metric(k).tiny, metric(k).console_places) for k in DICTIONARY_METRICS)


def print_sparse(rows: list[dict[str, Any]], proxies: list[str], console: Console) -> None:
    """Per split: the sparse dictionary's reconstruction of the replaced activation and its latents."""
    _split_table(rows, proxies, console, SPARSE_COLUMNS, ("tokens", "l0"),
                 "sparse dictionary on each split (token positions: all; explained var, norm. MSE and "
                 "MSE/token leave out each sequence's first)",
                 "[dim]explained variance of the replaced activation (1 - residual / variance on the split) and "
                 "norm. MSE = residual / |x|^2 over every position but each sequence's first (the BOS / attention "
                 "sink); pooled: over all positions; MSE/token: residual per position; L0: active latents per "
                 "position; dead: share of latents never "
                 "active on the split; new: share active on the split but never on the fitting data.[/dim]")


def _split_table(rows: list[dict[str, Any]], proxies: list[str], console: Console,
                 columns: tuple[tuple[str, str, int], ...], count: tuple[str, str], title: str, note: str) -> None:
    """A table of per-split ``columns`` (metric, header, decimals) with intervals, one section per proxy
    when there are several, the positions counted from the ``count`` (header, metric) row; a split
    without the first column's metric is left out. ``note`` is printed under it."""
    by = {(r["proxy"], r["split"], r["metric"]): r for r in rows}
    table = Table(title=title, title_justify="left")
    if len(proxies) > 1:
        table.add_column("proxy")
    table.add_column("split")
    table.add_column(count[0], justify="right")
    for _, header, _ in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for proxy in proxies:
        for split in dict.fromkeys(r["split"] for r in rows if r["proxy"] == proxy):
            m = {key: by.get((proxy, split, key)) for key, _, _ in columns}
            if m[columns[0][0]] is None:
                continue
            cells = [split, str(int(by[(proxy, split, count[1])]["n_positions"]))]
            cells += [_ci(m[key]["value"], m[key]["ci_low"], m[key]["ci_high"], digits) for key, _, digits in columns]
            table.add_row(*([proxy] if len(proxies) > 1 else []), *cells)
        if len(proxies) > 1:
            table.add_section()
    console.print(table)
    console.print(note)


# (metric, header, decimals) of the downstream loss table.
DOWNSTREAM_COLUMNS = tuple((k, metric(k).tiny, metric(k).console_places) for k in DOWNSTREAM_TABLE)


def print_downstream(rows: list[dict[str, Any]], proxies: list[str], console: Console) -> None:
    """Per split: a sparse dictionary's downstream loss against a zero ablation, as SAELens reports it."""
    _split_table(rows, proxies, console, DOWNSTREAM_COLUMNS, ("pos", "loss_recovered"),
                 "sparse dictionary downstream (scored positions; nats)",
                 "[dim]CE: cross-entropy of the target token (whole vocabulary) with the original model, the proxy "
                 "and the replaced activation zero-ablated; loss rec = (CE abl - CE proxy) / (CE abl - CE orig); "
                 "KL(original || proxy) and KL(original || ablated); KL score = (KL abl - KL) / KL abl (SAELens' "
                 "ce_loss_score and kl_div_score: 1 = as the model, 0 = no better than zeros).[/dim]")


def _groups_note(run: Any, grouped: list[dict[str, Any]]) -> str:
    """What the ``split (name)`` rows are: the task's own descriptions when the run has its task."""
    from illusions.analyses.summary import group_label
    from illusions.tasks.base import DataSupport

    task = getattr(run, "task", None)  # a RunSummary from another process has none
    declared = task.position_groups() if isinstance(task, DataSupport) else {}
    names = dict.fromkeys((r["split"], r["group"]) for r in grouped)
    parts = [f"{group_label(split, name)}: {declared[name].description}" if name in declared
             and declared[name].description else f"{group_label(split, name)}: a named group of {split}'s positions"
             for split, name in names]
    return "; ".join(parts) + " (its gaps compare it with the whole of iid)."


# (compact header, metric, decimals) of the summary table's columns; "pos" is the position count.
_METRIC_COLUMNS = (("pos", None, 0), *((metric(k).tiny, k, metric(k).decimals) for k in SUMMARY_METRICS))


def _summary_table(title: str, proxies: list[str], body: list[tuple[str, str, dict[str, Any]]],
                   excluded: dict[str, float], *, compact: bool, drop: tuple[str, ...] = ()) -> Table:
    from rich import box

    names = [r[1] for r in body]
    columns = [c for c in _METRIC_COLUMNS if c[0] not in drop]
    control = any("gap_vs_control" in m["agreement"] for _, _, m in body)  # a --match control beside
    if compact:
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                      pad_edge=False, collapse_padding=True)
        headers = ("split", *(c[0] for c in columns), "Δ iid", "Δ len", *(("Δ matched",) if control else ()))
    else:
        table = Table(title=title, title_justify="left")
        headers = ("split", "positions", *(metric(k).short for k in SUMMARY_METRICS),
                   "Δagree\nvs iid", "Δagree vs\nlen-matched", *(("Δagree vs\nmatched",) if control else ()))
    many = len(proxies) > 1
    if many:
        table.add_column("proxy", no_wrap=True, min_width=max(len(p) for p in proxies))
    for name in headers:
        if name == "split":
            table.add_column(name, no_wrap=True, min_width=max((len(n) for n in names), default=5))
        else:
            table.add_column(name, justify="right", no_wrap=not compact)
    previous = None
    for proxy, split, m in body:
        if many and previous is not None and proxy != previous:
            table.add_section()
        previous = proxy
        cells = [split]
        for _, k, digits in columns:
            if k is None:
                cells.append(str(int(m["agreement"]["n_positions"])))
                continue
            r = m[k]
            cells.append(_value(r["value"], digits) if compact else _ci(r["value"], r["ci_low"], r["ci_high"], digits))
        matched = _gap(m["agreement"], "gap_vs_matched")
        if split in excluded and matched != "-":
            matched += "†"
        cells += [_gap(m["agreement"], "gap_vs_ref"), matched]
        if control:
            cells.append(_gap(m["agreement"], "gap_vs_control"))
        table.add_row(*([proxy] if many else []), *cells)
    return table


def _value(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "-"


def print_breakdown(run: Any, by: str, console: Console | None = None) -> None:
    """Agreement and proxy accuracy by group of one column, one table per proxy."""
    console = console or result_console()
    rows = [r for r in run.rows if r["group_by"] == by]
    if not rows:
        console.print(f"[yellow]no '{by}' column for this task[/yellow]")
        return
    for proxy in dict.fromkeys(r["proxy"] for r in rows):
        mine = [r for r in rows if r["proxy"] == proxy]
        splits = list(dict.fromkeys(r["split"] for r in mine))
        groups = sorted(dict.fromkeys(r["group"] for r in mine), key=_group_key)
        table = Table(title=f"{proxy}: agreement (proxy accuracy / original accuracy) by {by}",
                      title_justify="left")
        table.add_column(by)
        for s in splits:
            table.add_column(s, justify="right")
        cell = {(r["split"], r["group"], r["metric"]): r for r in mine}
        for g in groups:
            out = [g]
            for s in splits:
                a = cell.get((s, g, "agreement"))
                if a is None:
                    out.append("")
                    continue
                p, o = cell[(s, g, "proxy_accuracy")], cell[(s, g, "original_accuracy")]
                out.append(f"{a['value']:.2f} ({p['value']:.2f}/{o['value']:.2f}) n={int(a['n_positions'])}")
            table.add_row(*out)
        console.print(table)


def _group_key(label: str) -> tuple[int, str]:
    head = label.split("-")[0]
    return (int(head), label) if head.lstrip("-").isdigit() else (10**9, label)


def print_checkpoints(sweep: Any, console: Console | None = None) -> None:
    """Over training steps: the model's accuracy per split, then per proxy its agreement and its
    accuracy change's gap to iid per split (``checkpoints.csv`` holds the intervals)."""
    console = console or result_console()
    splits, proxies = sweep.splits, sweep.proxies
    spec = sweep.spec
    table = Table(title=f"{spec.task}: original accuracy by training step ({spec.checkpoints}; "
                        f"{sweep.model_description})", title_justify="left")
    table.add_column("step", justify="right")
    for split in splits:
        table.add_column(split, justify="right")
    for step in sweep.steps:
        table.add_row(str(step), *(_value(sweep.value(step, s, proxies[0], "original_accuracy"), 3) for s in splits))
    console.print(table)
    for proxy in proxies:
        table = Table(title=f"{proxy}: agreement / Δ(proxy − original accuracy) vs iid, by training step",
                      title_justify="left")
        table.add_column("step", justify="right")
        for split in splits:
            table.add_column(split, justify="right")
        for step in sweep.steps:
            cells = []
            for split in splits:
                agree = _value(sweep.value(step, split, proxy, "agreement"), 3)
                row = {k: sweep.value(step, split, proxy, "accuracy_change", k)
                       for k in ("gap_vs_iid", "gap_vs_iid_low", "gap_vs_iid_high")}
                gap = _gap({"g": row["gap_vs_iid"], "g_low": row["gap_vs_iid_low"],
                            "g_high": row["gap_vs_iid_high"]}, "g")
                cells.append(agree if gap == "-" else f"{agree} / {gap}")
            table.add_row(str(step), *cells)
        console.print(table)
    console.print("[dim]Δ: the proxy's accuracy change on the split minus on iid, in the same checkpoint: "
                  "below 0 the proxy under-states the model's generalization, above 0 it over-states it; "
                  "* marks an interval that excludes 0 (intervals in checkpoints.csv).[/dim]")


def print_warnings(run: Any, console: Console | None = None) -> None:
    """Per proxy: each warning signal's AUROC for the proxy's disagreements per split and pooled
    (``overall``), with the agreement and share of the positions it flags above its training 99th
    percentile; nothing for proxies without signals."""
    from illusions.analyses.warning_signals import WARNING_GROUP
    from illusions.metric_table import WARNING_METRICS

    console = console or result_console()
    rows = [r for r in run.rows if r["group_by"] == WARNING_GROUP]
    for proxy in dict.fromkeys(r["proxy"] for r in rows):
        mine = {(r["split"], r["group"], r["metric"]): r for r in rows if r["proxy"] == proxy}
        table = Table(title=f"{proxy}: unsupervised warning signals (no labels) vs the proxy's disagreements",
                      title_justify="left")
        table.add_column("split")
        table.add_column("signal")
        for key in WARNING_METRICS:
            table.add_column(metric(key).header, justify="right")
        for split, signal in dict.fromkeys((s, g) for s, g, _ in mine):
            cells = []
            for key in WARNING_METRICS:
                r = mine[(split, signal, key)]
                text = _ci(r["value"], r["ci_low"], r["ci_high"], metric(key).decimals)
                cells.append(f"{text} n={int(r['n_positions'])}" if key == "warning_flagged_agreement" else text)
            table.add_row(split, signal, *cells)
        console.print(table)
    if rows:
        console.print("[dim]AUROC: how well the signal ranks the positions where the proxy's prediction differs "
                      "from the model's (0.5 = chance, 1 = perfect); flagged: positions above the signal's 99th "
                      "percentile on the fitting data, n of them; overall pools every split.[/dim]")


def print_circuits(run: Any, console: Console | None = None) -> None:
    """For each circuit proxy: the components it keeps and ablates, and how the search found them."""
    console = console or result_console()
    analysis = getattr(run, "analysis", None)
    if analysis is None:  # a run made elsewhere (a Slurm job) sends back its document, not its proxies
        for proxy in run.document.get("proxies") or [run.document]:
            if proxy.get("simplifier") == "circuit":
                keep = proxy.get("params", {}).get("keep", [])
                console.print(f"{proxy.get('label', 'circuit')}: keeps {', '.join(keep) or 'none'}")
        return
    for label, proxy in zip(analysis.labels, analysis.proxies, strict=True):
        if proxy.simplifier != "circuit":
            continue
        kept, ablated = proxy.info.get("kept", []), proxy.info.get("ablated", [])
        console.print(f"{label}: keeps {len(kept)} of {len(kept) + len(ablated)} components: "
                      f"{', '.join(kept) or 'none'}; {proxy.params['ablation']}-ablated: {', '.join(ablated) or 'none'}")
        search = proxy.info.get("circuit_search")
        if not search:
            continue
        threshold, agreement = search["threshold"], search["agreement"]
        shown = _beside(agreement, threshold)
        if agreement >= threshold:
            console.print(f"[dim]found by greedy pruning on {search['data']}: agreement with the model "
                          f"{shown} >= {threshold} (tried last layer first, MLP before heads, heads from the "
                          "highest index)[/dim]")
        else:
            tried = "removing any one of its components does not reach it either" if search["steps"] else \
                "it has no component to remove"
            console.print(f"[yellow]greedy pruning on {search['data']} did not reach agreement {threshold}: the "
                          f"circuit it starts from (--keep) agrees {shown} with the model and {tried}, so nothing "
                          "was pruned; this proxy is that starting circuit, below the target[/yellow]")


def _beside(value: float, bound: float) -> str:
    """``value`` to 3 decimals, or to as many more as it takes to print it on its side of ``bound`` (0.8996
    short of 0.9 is 0.8996, not 0.900)."""
    for digits in range(3, 10):
        text = f"{value:.{digits}f}"
        if (float(text) >= bound) == (value >= bound):
            return text
    return repr(value)
