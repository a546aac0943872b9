"""The rules that judge the paper's claims, each on the runs of the recipes a claim names.

Each judge returns ``(verdict, what was measured)``. A gap is *reproduced* when it is significant, in
the same direction, in every seed (:func:`verdict_of`, against the length-matched control) on a whole
split or on a position group the task declares; *partly* when only in some seeds, only before length
matching, or without the in-distribution match (iid agreement below the gate in some seed); *not
reproduced* otherwise. A direction call (under- / over-states, faithful), and every other call read off
a proxy (key depth, code sources), is made only for proxies that pass the in-distribution gate
(:meth:`RecipeRuns.gated`); the others are listed as :data:`NOT_FAITHFUL` (a claim with none left reads
*not judged*). Sparse dictionaries are judged per dictionary set: a site holds only when every SAE
training seed's dictionary does (:func:`judge_gap_dictionaries`). Gaps
against the strict matched control (the recipe's ``match``, ``gap_vs_control``) are reported beside
the length-matched ones. Which claim reads which recipes through which judge is the table in
:mod:`illusions.reproduction.claims`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from illusions.analyses.summary import POSITION_GROUP
from illusions.reproduction.aggregate import (
    FAITHFUL_IID,
    MATCHED_IID,
    REFERENCE,
    Cell,
    RecipeRuns,
    SeedStat,
    Training,
    n_positions,
    ood_splits,
    param_text,
)

# The call of a proxy that fails the in-distribution gate: no direction is read off it.
NOT_FAITHFUL = "not a faithful proxy in distribution"

def verdict_of(signs_per_split: dict[str, list[int]], raw_signs: dict[str, list[int]], direction: int) -> str:
    """Reproduced / partly / not for a gap in ``direction`` (-1 or +1), from per-seed significance."""
    if any(s and all(x == direction for x in s) for s in signs_per_split.values()):
        return "reproduced"
    if any(direction in s for s in signs_per_split.values()) or any(
        s and all(x == direction for x in s) for s in raw_signs.values()
    ):
        return "partly"
    return "not reproduced"


def count(signs: Sequence[int], direction: int) -> str:
    return f"{sum(1 for s in signs if s == direction)}/{len(signs)}"


def gap_cell(runs: RecipeRuns, proxy: str, split: str, metric: str, gap: str, group_by: str = "all",
             group: str = "all") -> str:
    stat = runs.stat(proxy, split, metric, gap, group_by, group)
    if not stat.values:
        return "n/a"
    signs = runs.signs(proxy, split, metric, gap, group_by, group)
    return f"{stat.fmt(3, signed=True)} ({count(signs, -1 if stat.mean < 0 else 1)})"


def strict_cell(runs: RecipeRuns, proxy: str, cell: Cell, metric: str = "agreement") -> str:
    """The gap against the strict matched control with its coverage, or why there is none."""
    if not runs.has_control():
        return "no strict control in this recipe"
    stat = runs.stat(proxy, cell.split, metric, "gap_vs_control", **cell.where)
    coverage = runs.stat(proxy, cell.split, metric, "control_coverage", **cell.where)
    cover = f"{coverage.mean:.0%} of positions matched" if coverage.values else "coverage n/a"
    if not stat.values:
        return f"none ({cover}: no iid positions share these strata)"
    return f"{gap_cell(runs, proxy, cell.split, metric, 'gap_vs_control', **cell.where)}, {cover}"


def matched_iid_text(runs: RecipeRuns, cell: Cell) -> str:
    """The cell's agreement where the sweep's iid agreement reaches each of MATCHED_IID ('' for one proxy)."""
    if len(runs.proxies()) < 2:
        return ""
    parts = []
    for level in MATCHED_IID:
        stat = runs.at_iid(level, cell)
        parts.append(f"{level:.2f}: {stat.fmt()}" + (f" ({stat.n}/{len(runs.seeds)} seeds)"
                                                     if 0 < stat.n < len(runs.seeds) else "")
                     if stat.values else f"{level:.2f}: n/a")
    return f"agreement on `{cell.name}` at matched iid agreement " + ", ".join(parts)


def judge_gap(runs: RecipeRuns) -> tuple[str, str]:
    """(verdict, measured text) for 'matches iid, diverges OOD' on one recipe at its selected proxy,
    judged on every whole split and every declared position group."""
    proxy = runs.selected()
    iid = runs.stat(proxy, REFERENCE, "agreement")
    cells = runs.cells(proxy)
    matched = {c.name: runs.signs(proxy, c.split, "agreement", "gap_vs_matched", **c.where) for c in cells}
    raw = {c.name: runs.signs(proxy, c.split, "agreement", "gap_vs_ref", **c.where) for c in cells}
    verdict = verdict_of(matched, raw, -1)
    if not runs.gated(proxy):
        verdict = "not reproduced" if verdict == "not reproduced" else "partly"
    whole = [c for c in cells if c.group_by == "all"]
    worst = min(whole, key=lambda c: runs.stat(proxy, c.split, "agreement", "gap_vs_matched").mean)
    every = [name for name, signs in matched.items() if signs and all(x == -1 for x in signs)]
    text = (f"`{runs.name}` at {param_text(runs, proxy)}: iid agreement {iid.fmt()}"
            + ("" if runs.gated(proxy) else f" (below {FAITHFUL_IID} in some seed)")
            + f"; largest drop on `{worst.name}`, agreement {runs.stat(proxy, worst.split, 'agreement').fmt()}, "
            f"{gap_cell(runs, proxy, worst.split, 'agreement', 'gap_vs_matched')} vs length-matched iid, "
            f"{strict_cell(runs, proxy, worst)} vs strict matched iid")
    for c in cells:
        if c.group_by != "all" and c.split == worst.split:
            text += (f"; on `{c.name}` {runs.stat(proxy, c.split, 'agreement', **c.where).fmt()}, "
                     f"{gap_cell(runs, proxy, c.split, 'agreement', 'gap_vs_matched', **c.where)} vs length-matched")
    text += "; below 0 in every seed on: " + (", ".join(f"`{n}`" for n in every) or "none")
    interp = matched_iid_text(runs, worst)
    return verdict, text + (f"; {interp}" if interp else "")


def judge_gap_dictionaries(all_runs: Sequence[RecipeRuns]) -> tuple[str, str]:
    """'Matches iid, diverges OOD' for sparse dictionaries: the recipes that differ only in their SAE
    training ``seed`` are one dictionary set, and a set's verdict is its *worst* dictionary's (:func:`judge_gap`
    on each), so a site holds only if it holds for every dictionary seed; the claim's verdict is the best
    set's (sites and tasks are alternatives, as for the other gap claims), with each set's count named."""
    order = ("reproduced", "partly", "not reproduced")
    parts, set_verdicts = [], []
    for group in dictionary_sets(all_runs):
        results = [judge_gap(r) for r in group]
        worst = max((v for v, _ in results), key=order.index)
        set_verdicts.append(worst)
        held = sum(v == "reproduced" for v, _ in results)
        names = ", ".join(f"`{r.name}`" for r in group)
        parts.append(f"{names}: {held} of {len(group)} dictionaries reproduce it (set verdict: {worst}); "
                     + "; ".join(t for _, t in results))
    if not set_verdicts:
        return "not run", "no sparse dictionary runs"
    return min(set_verdicts, key=order.index), " | ".join(parts)


def direction_rows(runs: RecipeRuns, proxies: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per proxy and OOD split (and declared position group): how the proxy's accuracy shift differs
    from iid (length-matched); a proxy failing the in-distribution gate gets no direction call."""
    rows = []
    for proxy in proxies if proxies is not None else runs.proxies():
        gated = runs.gated(proxy)
        for cell in runs.cells(proxy):
            split, where = cell.split, cell.where
            signs = runs.signs(proxy, split, "accuracy_change", "gap_vs_matched", **where)
            raw = runs.signs(proxy, split, "accuracy_change", "gap_vs_ref", **where)
            if not gated:
                call = NOT_FAITHFUL
            elif signs and all(s == -1 for s in signs):
                call = "under-states"
            elif signs and all(s == 1 for s in signs):
                call = "over-states"
            elif any(signs):
                call = f"mixed ({count(signs, -1)} under, {count(signs, 1)} over)"
            else:
                call = "faithful"
            rows.append({"proxy": proxy, "split": cell.name, "call": call, "signs": signs, "raw": raw,
                         "gated": gated, "iid": runs.stat(proxy, REFERENCE, "agreement"),
                         "original": runs.stat(proxy, split, "original_accuracy", **where),
                         "proxy_acc": runs.stat(proxy, split, "proxy_accuracy", **where),
                         "gap": runs.stat(proxy, split, "accuracy_change", "gap_vs_ref", **where),
                         "matched": runs.stat(proxy, split, "accuracy_change", "gap_vs_matched", **where),
                         "strict": (strict_cell(runs, proxy, cell, "accuracy_change") if runs.has_control()
                                    else "n/a")})
    return rows


def judge_direction(head_runs: Sequence[RecipeRuns], layer_runs: Sequence[RecipeRuns] = ()) -> tuple[str, str]:
    """Per-head proxies (every one) and whole-layer proxies (at each sweep's reported parameter)."""
    rows = [r for runs in head_runs for r in direction_rows(runs)]
    rows += [r for runs in layer_runs for r in direction_rows(runs, [runs.selected()])]
    gated = [r for r in rows if r["gated"]]
    under = [r for r in gated if r["call"] == "under-states"]
    over = [r for r in gated if r["call"] == "over-states"]
    verdict = "reproduced" if under and over else "partly" if under or over else "not reproduced"
    unfaithful = list(dict.fromkeys(r["proxy"] for r in rows if not r["gated"]))

    def best(group: list[dict[str, Any]], key: Any) -> str:
        if not group:
            return "none"
        r = key(group)
        return f"`{r['proxy']}` on `{r['split']}` ({r['matched'].fmt(3, signed=True)})"

    text = (f"{len(gated)} of {len(rows)} proxy x cell pairs (whole splits and declared groups) are of proxies with "
            f"iid agreement >= {FAITHFUL_IID} in every seed; of those, {len(under)} under-state generalization in "
            f"every seed and {len(over)} over-state it (accuracy change vs length-matched iid). Strongest under: "
            f"{best(under, lambda g: min(g, key=lambda r: r['matched'].mean))}; strongest over: "
            f"{best(over, lambda g: max(g, key=lambda r: r['matched'].mean))}. {NOT_FAITHFUL}, so no call: "
            + (", ".join(f"`{p}`" for p in unfaithful) if unfaithful else "none"))
    return verdict, text


def _depth_split(runs: RecipeRuns, proxy: str, split: str, max_depth: int,
                 metric: str = "agreement") -> tuple[SeedStat, SeedStat]:
    """Position-weighted mean of ``metric`` over key depths <= and > ``max_depth``, per seed."""
    inside, beyond = [], []
    for seed in runs.seeds:
        acc = {True: [0.0, 0.0], False: [0.0, 0.0]}
        for group in runs.groups(proxy, split, "key_depth"):
            r = runs.row(seed, proxy, split, metric, "key_depth", group)
            if r is None or not np.isfinite(r["value"]) or not group.lstrip("-").isdigit():
                continue
            cell = acc[int(group) <= max_depth]
            cell[0] += r["value"] * r["n_positions"]
            cell[1] += r["n_positions"]
        if acc[True][1] and acc[False][1]:
            inside.append(acc[True][0] / acc[True][1])
            beyond.append(acc[False][0] / acc[False][1])
    return SeedStat(tuple(inside), (0.0, 1.0)), SeedStat(tuple(beyond), (0.0, 1.0))


def unfaithful_text(runs: RecipeRuns, proxy: str) -> str:
    """How an ungated proxy is listed: recipe, parameter and iid agreement."""
    return f"`{runs.name}` ({param_text(runs, proxy)}, iid agreement {runs.stat(proxy, REFERENCE, 'agreement').fmt()})"


def ungated_note(unfaithful: Sequence[str]) -> str:
    """The sentence listing the proxies left out by the in-distribution gate ('' when none)."""
    if not unfaithful:
        return ""
    return (f"{NOT_FAITHFUL} (iid agreement below {FAITHFUL_IID} in some seed), so no call: "
            + ", ".join(unfaithful))


def judge_key_depth(all_runs: Sequence[RecipeRuns]) -> tuple[str, str]:
    """Agreement at key depths beyond the training depth vs within it, on unseen_depth, at each recipe's
    reported proxy; only proxies passing the in-distribution gate are judged, the others are listed."""
    parts, verdicts, unfaithful = [], [], []
    for runs in all_runs:
        proxy = runs.selected()
        max_depth = runs.task_config.get("max_depth")  # the training strings' deepest nesting
        if not isinstance(max_depth, int):
            continue
        inside, beyond = _depth_split(runs, proxy, "unseen_depth", max_depth)
        if not inside.values:
            continue
        if not runs.gated(proxy):
            unfaithful.append(unfaithful_text(runs, proxy))
            continue
        diff = SeedStat(tuple(b - a for a, b in zip(inside.values, beyond.values, strict=True)), (-1.0, 1.0))
        lo, hi = diff.interval
        verdicts.append("reproduced" if hi < 0 else "partly" if diff.mean < 0 else "not reproduced")
        parts.append(f"`{runs.name}` ({param_text(runs, proxy)}) on unseen_depth: agreement {inside.fmt()} at key "
                     f"depth <= {max_depth} vs {beyond.fmt()} beyond (difference {diff.fmt(3, signed=True)}; "
                     f"{'below 0' if hi < 0 else 'above 0' if lo > 0 else 'includes 0'})")
    if not verdicts and not unfaithful:
        return "not run", "no key-depth breakdown available"
    text = "; ".join(parts + [ungated_note(unfaithful)] if unfaithful else parts)
    if not verdicts:
        return "not judged", text
    verdict = "reproduced" if "reproduced" in verdicts else "partly" if "partly" in verdicts else "not reproduced"
    return verdict, text


# Which of the depth split's two figures the paper's ~80% is compared with, and why.
PAPER_DEPTH_FIGURE = (
    "The paper's ~80% most likely corresponds to the whole split: its scoring rule scores every closer at "
    "distance >= 10 on the depth split, whatever the depth of its opener, as the whole-split figure does; "
    "the deep-opener group is our stricter reading (only there is the depth itself unseen), with no "
    "counterpart in the paper.")


def deep_groups(runs: RecipeRuns, proxy: str, split: str = "unseen_depth") -> list[str]:
    """The named position groups of ``split`` in these runs (Dyck: ``opener > 10``)."""
    return runs.groups(proxy, split, POSITION_GROUP)


def judge_original(runs: RecipeRuns) -> tuple[str, str]:
    proxy = runs.proxies()[0]
    stat = runs.stat(proxy, "unseen_depth", "original_accuracy")
    iid = runs.stat(proxy, REFERENCE, "original_accuracy")
    verdict = "reproduced" if abs(stat.mean - 0.8) <= 0.05 else "not reproduced"
    how = "" if verdict == "reproduced" else (" higher: our models generalize to deeper nesting better than the "
                                              "paper's" if stat.mean > 0.8 else " lower than the paper's")
    groups = ""
    for group in deep_groups(runs, proxy):
        deep = runs.stat(proxy, "unseen_depth", "original_accuracy", group_by=POSITION_GROUP, group=group)
        groups += (f"; on `unseen_depth ({group})` ({n_positions(runs, proxy, 'unseen_depth', POSITION_GROUP, group)}"
                   f" of {n_positions(runs, proxy, 'unseen_depth')} positions) {deep.fmt()}")
    return verdict, (f"the model's own accuracy (no proxy enters, so the in-distribution gate does not apply): "
                     f"original accuracy on unseen_depth {stat.fmt()} across {stat.n} training seeds "
                     f"(iid {iid.fmt()}){how}{groups}" + (f". {PAPER_DEPTH_FIGURE}" if groups else ""))


def category_drops(runs: RecipeRuns, proxy: str) -> dict[str, SeedStat]:
    """Per character category: agreement on the other-language splits minus agreement on iid."""
    others = [s for s in ood_splits(runs) if s != "deep_nesting"]
    out = {}
    for group in runs.groups(proxy, REFERENCE, "category"):
        values = []
        for seed in runs.seeds:
            base = runs.row(seed, proxy, REFERENCE, "agreement", "category", group)
            ood = [runs.row(seed, proxy, s, "agreement", "category", group) for s in others]
            ood = [r["value"] for r in ood if r is not None and np.isfinite(r["value"])]
            if base is not None and ood:
                values.append(float(np.mean(ood)) - base["value"])
        out[group] = SeedStat(tuple(values), (-1.0, 1.0))
    return out


def judge_code_sources(all_runs: Sequence[RecipeRuns]) -> tuple[str, str]:
    """Is the largest code gap tied to nesting depth (deep_nesting below length-matched iid in every seed)
    and to copying (the largest category drop on other languages)? Only at reported proxies that pass
    the in-distribution gate; the others are listed."""
    parts, hits, unfaithful = [], [], []
    for runs in all_runs:
        proxy = runs.selected()
        depth = runs.signs(proxy, "deep_nesting", "agreement", "gap_vs_matched") if "deep_nesting" in runs.splits() else []
        drops = category_drops(runs, proxy)
        if not drops:
            continue
        if not runs.gated(proxy):
            unfaithful.append(unfaithful_text(runs, proxy))
            continue
        worst = min(drops, key=lambda g: drops[g].mean)
        nesting = bool(depth) and all(s == -1 for s in depth)
        hits.append((nesting, worst == "copy"))
        parts.append(f"`{runs.name}` ({param_text(runs, proxy)}): deep_nesting agreement vs length-matched iid "
                     f"{gap_cell(runs, proxy, 'deep_nesting', 'agreement', 'gap_vs_matched')}"
                     + (f", {strict_cell(runs, proxy, Cell('deep_nesting'))} vs strict matched iid"
                        if "deep_nesting" in runs.splits() and runs.has_control() else "")
                     + f"; largest category drop on other languages: `{worst}` ({drops[worst].fmt(3, signed=True)})")
    if not hits and not unfaithful:
        return "not run", "no code runs"
    text = "; ".join(parts + [ungated_note(unfaithful)] if unfaithful else parts)
    if not hits:
        return "not judged", text
    both = any(n and c for n, c in hits)
    either = any(n or c for n, c in hits)
    return ("reproduced" if both else "partly" if either else "not reproduced"), text


def judge_length(all_runs: Sequence[RecipeRuns]) -> tuple[str, str]:
    """Whole splits: which raw gaps stay significant against the length-matched control and, where the
    recipe has one, against the strict matched control; the verdict reads the strictest control each has.
    Only reported proxies passing the in-distribution gate count; the others are listed."""
    raw_total = survived = flipped = strict_total = strict_kept = kept = 0
    lost, strict_lost, unfaithful = [], [], []
    for runs in all_runs:
        proxy = runs.selected()
        if not runs.gated(proxy):
            unfaithful.append(unfaithful_text(runs, proxy))
            continue
        for split in ood_splits(runs):
            raw = runs.signs(proxy, split, "agreement", "gap_vs_ref")
            if not raw or not (all(s == -1 for s in raw) or all(s == 1 for s in raw)):
                continue
            raw_total += 1
            matched = runs.signs(proxy, split, "agreement", "gap_vs_matched")
            strict = runs.signs(proxy, split, "agreement", "gap_vs_control") == raw if runs.has_control() else True
            survived += matched == raw
            kept += matched == raw and strict  # survives every control the recipe has
            if matched != raw:
                lost.append(f"`{runs.name}`/`{split}`")
                flipped += any(m == -raw[0] for m in matched)
            if runs.has_control():
                strict_total += 1
                strict_kept += strict
                if not strict:
                    strict_lost.append(f"`{runs.name}`/`{split}`")
    text = (f"{raw_total} agreement gaps vs iid are significant in every seed at the reported proxies"
            + (" that pass the in-distribution gate" if unfaithful else "") + "; "
            f"{survived} stay significant in every seed against the length-matched control"
            + (f"; not: {', '.join(lost)}" if lost else "")
            + (f" ({flipped} reverse sign)" if flipped else ""))
    if strict_total:
        on = sorted({" x ".join(r.recipe.spec.match) for r in all_runs if r.has_control()})
        text += (f". Of the {strict_total} in recipes with the strict control ({'; '.join(on)}), "
                 f"{strict_kept} stay significant in every seed against it"
                 + (f"; not: {', '.join(strict_lost)}" if strict_lost else ""))
    if unfaithful:
        text += ". " + ungated_note(unfaithful)
    if unfaithful and not any(r.gated(r.selected()) for r in all_runs):
        return "not judged", text
    verdict = "all survive" if raw_total and kept == raw_total else "some survive" if kept else "none survive"
    return verdict, text


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (NaN when either side is constant or has fewer than 3 values)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def dictionary_sets(all_runs: Sequence[RecipeRuns]) -> list[list[RecipeRuns]]:
    """The sparse dictionary recipes grouped by everything but their ``seed`` (SAE training seed): each
    group holds several dictionaries per width."""
    groups: dict[str, list[RecipeRuns]] = {}
    for runs in all_runs:
        spec = {k: v for k, v in runs.recipe.spec.to_dict().items() if k != "seed"}
        groups.setdefault(repr(sorted(spec.items())), []).append(runs)
    return list(groups.values())


def _fixed_width_rho(group: Sequence[RecipeRuns], split: str) -> tuple[float, float, float, int]:
    """Spearman rho between iid explained variance and ``split`` agreement across the dictionaries of one
    width, pooled over widths and training seeds after centring each (width, training seed) cell, with
    a 95% Fisher interval (standard error 1.03 / sqrt(n - 3)); NaNs when fewer than 5 points."""
    ev, agree = [], []
    first = group[0]
    seeds = sorted(set.intersection(*(set(r.seeds) for r in group)))
    for seed in seeds:
        for proxy in first.proxies():
            cell = [(r.row(seed, proxy, REFERENCE, "explained_variance"), r.row(seed, proxy, split, "agreement"))
                    for r in group]
            cell = [(a["value"], b["value"]) for a, b in cell if a is not None and b is not None
                    and np.isfinite(a["value"]) and np.isfinite(b["value"])]
            if len(cell) >= 2:
                xs, ys = np.array(cell).T
                ev += list(xs - xs.mean())
                agree += list(ys - ys.mean())
    rho = _spearman(ev, agree)
    n = len(ev)
    if n < 5 or not np.isfinite(rho):
        return float("nan"), float("nan"), float("nan"), n
    z, half = math.atanh(max(min(rho, 0.999999), -0.999999)), 1.96 * 1.03 / math.sqrt(n - 3)
    return rho, math.tanh(z - half), math.tanh(z + half), n


def judge_sae_predicts(all_runs: Sequence[RecipeRuns]) -> tuple[str, str]:
    """At fixed width, across dictionaries (SAE training seeds): does a dictionary's iid explained variance
    rank-order its agreement on each other split? *reproduced* when rho's 95% interval lies above 0 on
    every split of every recipe set with several dictionaries, *partly* when on some, *not reproduced*
    otherwise; *not run* without several dictionaries per width."""
    parts, calls = [], []
    for group in dictionary_sets(all_runs):
        if len(group) < 2:
            continue
        cells = []
        for split in ood_splits(group[0]):
            rho, lo, hi, n = _fixed_width_rho(group, split)
            if not np.isfinite(rho):
                continue
            calls.append(lo > 0)
            cells.append(f"`{split}` {rho:+.2f} [{lo:+.2f}, {hi:+.2f}] (n={n})")
        names = ", ".join(f"`{r.name}`" for r in group)
        widths = ", ".join(str(group[0].param_of(p)) for p in group[0].proxies())
        parts.append(f"{names} ({len(group)} dictionaries per width, widths {widths}): rho "
                     + ("; ".join(cells) or "n/a"))
    if not calls:
        return "not run", ("no sparse dictionary recipes with several dictionaries per width (SAE training seeds): "
                           + ", ".join(f"`{r.name}`" for r in all_runs))
    verdict = "reproduced" if all(calls) else "partly" if any(calls) else "not reproduced"
    return verdict, "; ".join(parts)


def judge_sae_direction(all_runs: Sequence[RecipeRuns]) -> tuple[str, str]:
    """Which OOD splits the reported SAE proxies under- or over-state generalization on, in every seed."""
    rows = [(runs, r) for runs in all_runs for r in direction_rows(runs, [runs.selected()])]
    under = [(runs, r) for runs, r in rows if r["call"] == "under-states"]
    over = [(runs, r) for runs, r in rows if r["call"] == "over-states"]

    def cells(group: list[tuple[RecipeRuns, dict[str, Any]]]) -> str:
        return ", ".join(f"`{runs.name}`/`{r['split']}` ({r['matched'].fmt(3, signed=True)})" for runs, r in group) or "none"

    verdict = ("both directions" if under and over else "under-states" if under else "over-states" if over
               else "faithful")
    return verdict, (f"{len(under)} of {len(rows)} recipe x split cells under-state generalization in every seed: "
                     f"{cells(under)}; {len(over)} over-state it: {cells(over)}")


def training_states(sweep: Any, proxy: str, split: str) -> list[tuple[int, float, int]]:
    """Per step: (step, accuracy change minus iid's, -1/+1 when its interval lies below/above 0, else 0)."""
    out = []
    for step in sweep.steps:
        value = sweep.value(step, split, proxy, "accuracy_change", "gap_vs_iid")
        lo = sweep.value(step, split, proxy, "accuracy_change", "gap_vs_iid_low")
        hi = sweep.value(step, split, proxy, "accuracy_change", "gap_vs_iid_high")
        if math.isfinite(value):
            out.append((step, value, -1 if hi < 0 else 1 if lo > 0 else 0))
    return out


def training_course(states: Sequence[tuple[int, float, int]]) -> str:
    """How a cell's illusion changes from the first to the final checkpoint."""
    signs = [s for _, _, s in states]
    if not any(signs):
        return "never"
    first, last = signs[0], signs[-1]
    if first == 0 and last != 0:
        return "appears"
    if first != 0 and last == 0:
        return "vanishes"
    if first != 0 and last != 0 and first != last:
        return "flips"
    if first == 0 and last == 0:
        return "comes and goes"
    grew = abs(states[-1][1]) > abs(states[0][1])
    return "persists, grows" if grew else "persists, shrinks"


# Why the over-training claim rests on one training seed per family.
ONE_SEED = ("step checkpoints ship for one training run per family; the other training seeds would need "
            "retraining with `--save-every` (about 30 min of CPU each), which the reproduction does not do")
# Gated checkpoints a proxy x cell needs before its course over training is judged.
MIN_GATED_STEPS = 4


def gated_course(per_step: RecipeRuns, proxy: str, cell: Cell) -> tuple[list[tuple[int, int]], str]:
    """``[(step, sign)]`` over the checkpoints where ``proxy`` passes the in-distribution gate (sign of the
    accuracy change's gap vs length-matched iid: -1 / +1 when its interval lies below / above 0), and
    the course: *appears*, *vanishes* or *flips* when the first two and the last two gated checkpoints
    agree among themselves and differ from each other, *stays* when they agree, else *unsettled*."""
    states = []
    for step in per_step.seeds:
        iid = per_step.row(step, proxy, REFERENCE, "agreement")
        row = per_step.row(step, proxy, cell.split, "accuracy_change", **cell.where)
        if iid is None or row is None or not iid["value"] >= FAITHFUL_IID or not np.isfinite(row["gap_vs_matched"]):
            continue
        lo, hi = row["gap_vs_matched_low"], row["gap_vs_matched_high"]
        states.append((step, -1 if hi < 0 else 1 if lo > 0 else 0))
    if len(states) < MIN_GATED_STEPS:
        return states, "too few gated checkpoints"
    (_, a), (_, b), (_, c), (_, d) = states[0], states[1], states[-2], states[-1]
    if a != b or c != d:
        return states, "unsettled"
    if a == d:
        return states, "stays"
    return states, "appears" if a == 0 else "vanishes" if d == 0 else "flips"


def judge_over_training(series: Sequence[Training]) -> tuple[str, str]:
    """Holds when some gated proxy x cell (whole split or declared group) changes state persistently
    between the start and the end of training (:func:`gated_course`); judged on length-matched gaps."""
    parts, courses = [], []
    for t in series:
        if t.per_step is None:
            continue
        ps = t.per_step
        changed, judged = [], 0
        for proxy in ps.proxies():
            for cell in ps.cells(proxy):
                states, course = gated_course(ps, proxy, cell)
                courses.append(course)
                if course in ("appears", "vanishes", "flips", "stays", "unsettled"):
                    judged += 1
                if course in ("appears", "vanishes", "flips"):
                    changed.append(f"{proxy} on `{cell.name}` {course} (gated steps {states[0][0]}-{states[-1][0]})")
        parts.append(f"`{t.name}` (training seed {t.seed} only: {ONE_SEED}; {len(ps.seeds)} checkpoints): "
                     f"{judged} proxy x cell pairs pass the iid gate at >= {MIN_GATED_STEPS} checkpoints; "
                     f"{len(changed)} change state persistently" + (": " + "; ".join(changed) if changed else ""))
    if not courses:
        return "not run", "no analysis over training checkpoints"
    tally = {c: courses.count(c) for c in dict.fromkeys(courses)}
    summary = ", ".join(f"{n} {c}" for c, n in tally.items())
    if not any(c not in ("too few gated checkpoints",) for c in courses):
        return "not judged", f"no proxy passes the gate at {MIN_GATED_STEPS} checkpoints ({summary}). " + " ".join(parts)
    changed = any(c in ("appears", "vanishes", "flips") for c in courses)
    return ("reproduced" if changed else "not reproduced"), f"{summary}. " + " ".join(parts)


# The AUROC the warning-signal claim asks of each signal, in every seed.
WARNING_AUROC = 0.8


def judge_warnings(all_runs: Sequence[RecipeRuns]) -> tuple[str, str]:
    """Does each unsupervised warning signal flag the proxy's failures? At each recipe's reported
    proxy, every signal's AUROC for the disagreements, pooled over the evaluated splits
    (``split = "overall"``), must reach :data:`WARNING_AUROC` in every seed: *reproduced* when every
    signal does, *partly* when some do, *not reproduced* when none does."""
    from illusions.analyses.warning_signals import POOLED, WARNING_GROUP

    cells, passed, total = [], 0, 0
    for runs in all_runs:
        proxy = runs.selected()
        for signal in runs.groups(proxy, POOLED, WARNING_GROUP):
            per_seed = [runs.row(seed, proxy, POOLED, "warning_auroc", WARNING_GROUP, signal) for seed in runs.seeds]
            values = [float(r["value"]) for r in per_seed if r is not None]
            ok = bool(values) and len(values) == len(runs.seeds) and all(v >= WARNING_AUROC for v in values)
            total += 1
            passed += ok
            stat = runs.stat(proxy, POOLED, "warning_auroc", group_by=WARNING_GROUP, group=signal)
            cells.append(f"`{runs.name}` {signal} {stat.fmt()} ({sum(v >= WARNING_AUROC for v in values)}/"
                         f"{len(runs.seeds)} seeds >= {WARNING_AUROC})")
    if not total:
        return "not run", "no warning signal rows in the runs (runs made before the signals existed?)"
    verdict = "reproduced" if passed == total else "partly" if passed else "not reproduced"
    return verdict, (f"{passed}/{total} signals reach AUROC >= {WARNING_AUROC} for the proxy's disagreements in "
                     f"every seed (pooled over splits, at each recipe's reported proxy): " + "; ".join(cells))


def _below_in_every_seed(signs: Sequence[int]) -> bool:
    return bool(signs) and all(x == -1 for x in signs)


def judge_circuit(all_runs: Sequence[RecipeRuns]) -> tuple[str, str]:
    """Does a circuit found faithful in distribution stay faithful out of distribution, after
    matching? Per recipe (its one circuit proxy): found faithful when it passes the in-distribution
    gate (iid agreement >= :data:`FAITHFUL_IID` in every seed). On a split or declared position group
    it *drops* when its agreement gap is significantly negative in every seed against every control the
    recipe has (length-matched iid and, with a ``match``, the strict matched control). *reproduced*
    (the circuit holds) when every gated circuit drops nowhere and no gap is negative in any seed,
    *partly* when some gap is negative only in some seeds, only against one control or only before
    matching, *not reproduced* when some cell drops; *not reproduced* too when a circuit fails the
    gate. A search that kept every component (the circuit is the model: agreement 1 everywhere) asks
    nothing and is left out; with no circuit left the claim is *not judged*."""
    verdicts, texts = [], []
    for runs in all_runs:
        proxy = runs.proxies()[0]
        iid = runs.stat(proxy, REFERENCE, "agreement")
        if not runs.gated(proxy):
            verdicts.append("not reproduced")
            texts.append(f"`{runs.name}`: not faithful in distribution (iid agreement {iid.fmt()}, "
                         f"below {FAITHFUL_IID} in some seed)")
            continue
        if runs.is_model(proxy):
            # Nothing could be pruned: the circuit is the model itself, so the question does not arise.
            texts.append(f"`{runs.name}`: the search kept every component in every seed (agreement 1 on "
                         "every split): the circuit is the whole model, so it asks nothing here")
            continue
        strict = runs.has_control()
        dropped, some = [], []
        for c in runs.cells(proxy):
            matched = runs.signs(proxy, c.split, "agreement", "gap_vs_matched", **c.where)
            control = runs.signs(proxy, c.split, "agreement", "gap_vs_control", **c.where) if strict else matched
            raw = runs.signs(proxy, c.split, "agreement", "gap_vs_ref", **c.where)
            if _below_in_every_seed(matched) and _below_in_every_seed(control):
                dropped.append(c.name)
            elif -1 in matched or -1 in control or _below_in_every_seed(raw):
                some.append(c.name)
        verdicts.append("not reproduced" if dropped else "partly" if some else "reproduced")
        whole = [c for c in runs.cells(proxy) if c.group_by == "all"]
        worst = min(whole, key=lambda c: runs.stat(proxy, c.split, "agreement", "gap_vs_matched").mean)
        texts.append(f"`{runs.name}`: iid agreement {iid.fmt()}; lowest on `{worst.name}`, agreement "
                     f"{runs.stat(proxy, worst.split, 'agreement').fmt()}, "
                     f"{gap_cell(runs, proxy, worst.split, 'agreement', 'gap_vs_matched')} vs length-matched iid, "
                     f"{strict_cell(runs, proxy, worst)} vs strict matched iid; drops in every seed against "
                     f"every control on: {', '.join(f'`{n}`' for n in dropped) or 'none'}"
                     + (f"; below 0 only in some seeds or against one control on: "
                        f"{', '.join(f'`{n}`' for n in some)}" if some else ""))
    order = ("not reproduced", "partly", "reproduced")  # the claim holds only where every circuit does
    if not verdicts:
        return "not judged", "; ".join(texts)
    return min(verdicts, key=order.index), "; ".join(texts)
