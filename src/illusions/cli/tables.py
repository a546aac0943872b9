"""Rich tables for analysis results (printing only; the numbers come from the tidy rows)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table


def _ci(value: float, low: float, high: float, digits: int = 3) -> str:
    """``value ±h`` with h the half-width of the 95% interval (exact bounds are in the CSV/JSON)."""
    if not _finite(value):
        return "-"
    if not (_finite(low) and _finite(high)):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ±{(high - low) / 2:.{digits}f}"


def result_console() -> Console:
    """A console for results: as wide as the terminal, or 160 columns when piped to a file."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=160)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _gap(row: dict[str, Any], key: str) -> str:
    v, lo, hi = row[key], row[f"{key}_low"], row[f"{key}_high"]
    if not _finite(v):
        return "-"
    mark = "" if not (_finite(lo) and _finite(hi)) or lo <= 0 <= hi else "*"
    return f"{v:+.3f}{mark}"


def print_summary(run: Any, console: Console | None = None) -> None:
    """Per split (and per swept value): accuracies, agreement, JSD, KL with 95% intervals, gaps."""
    console = console or result_console()
    rows = [r for r in run.rows if r["group_by"] == "all"]
    spec = run.spec
    title = (f"{spec.task}: {', '.join(dict.fromkeys(r['proxy'] for r in rows))} "
             f"on {run.model_source} model ({run.model_description})")
    table = Table(title=title, title_justify="left")
    proxies = list(dict.fromkeys(r["proxy"] for r in rows))
    if len(proxies) > 1:
        table.add_column("proxy")
    for name in ("split", "positions", "original acc", "proxy acc", "agreement", "attn JSD", "KL",
                 "Δagree\nvs iid", "Δagree vs\nlen-matched"):
        table.add_column(name, justify="left" if name == "split" else "right", no_wrap=True)
    by = {(r["proxy"], r["split"], r["metric"]): r for r in rows}
    for proxy in proxies:
        for split in dict.fromkeys(r["split"] for r in rows if r["proxy"] == proxy):
            m = {k: by[(proxy, split, k)] for k in ("original_accuracy", "proxy_accuracy", "agreement",
                                                   "attention_jsd", "kl")}
            cells = [split, str(int(m["agreement"]["n_positions"]))]
            cells += [_ci(m[k]["value"], m[k]["ci_low"], m[k]["ci_high"]) for k in
                      ("original_accuracy", "proxy_accuracy", "agreement", "attention_jsd")]
            cells.append(_ci(m["kl"]["value"], m["kl"]["ci_low"], m["kl"]["ci_high"], 4))
            cells += [_gap(m["agreement"], "gap_vs_ref"), _gap(m["agreement"], "gap_vs_matched")]
            table.add_row(*([proxy] if len(proxies) > 1 else []), *cells)
        if len(proxies) > 1:
            table.add_section()
    console.print(table)
    console.print("[dim]± half-width of the 95% bootstrap interval over sequences; * marks a gap whose "
                  "interval excludes 0; len-matched: iid re-weighted to the split's length distribution. "
                  "JSD in bits over the simplified heads' attention, KL(original || proxy) in nats.[/dim]")


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
