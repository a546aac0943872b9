"""The rules that judge the paper's claims, each on the runs of the recipes a claim names.

Each judge returns ``(verdict, what was measured)``. A gap is *reproduced* when it is significant, in
the same direction, in every seed (:func:`verdict_of`, against the length-matched control); *partly*
when only in some seeds, only before length matching, or without the in-distribution match; *not
reproduced* otherwise. Which claim reads which recipes through which judge is the table in
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
    REFERENCE,
    RecipeRuns,
    SeedStat,
    Training,
    n_positions,
    ood_splits,
    param_text,
)

# The rank correlation the 'predicts' claim of the sparse dictionaries asks for.
RANK_AGREEMENT = 0.8

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


def gap_cell(runs: RecipeRuns, proxy: str, split: str, metric: str, gap: str) -> str:
    stat = runs.stat(proxy, split, metric, gap)
    return f"{stat.fmt(3, signed=True)} ({count(runs.signs(proxy, split, metric, gap), -1 if stat.mean < 0 else 1)})"


def judge_gap(runs: RecipeRuns) -> tuple[str, str]:
    """(verdict, measured text) for 'matches iid, diverges OOD' on one recipe at its selected proxy."""
    proxy = runs.selected()
    iid = runs.stat(proxy, REFERENCE, "agreement")
    splits = ood_splits(runs)
    matched = {s: runs.signs(proxy, s, "agreement", "gap_vs_matched") for s in splits}
    raw = {s: runs.signs(proxy, s, "agreement", "gap_vs_ref") for s in splits}
    verdict = verdict_of(matched, raw, -1)
    if iid.mean < FAITHFUL_IID:
        verdict = "not reproduced" if verdict == "not reproduced" else "partly"
    worst = min(splits, key=lambda s: runs.stat(proxy, s, "agreement", "gap_vs_matched").mean)
    text = (f"`{runs.name}` at {param_text(runs, proxy)}: iid agreement {iid.fmt()}; "
            f"largest drop on `{worst}`, agreement {runs.stat(proxy, worst, 'agreement').fmt()}, "
            f"{gap_cell(runs, proxy, worst, 'agreement', 'gap_vs_matched')} vs length-matched iid")
    return verdict, text


def direction_rows(runs: RecipeRuns, proxies: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per proxy and OOD split: how the proxy's accuracy shift differs from iid (length-matched)."""
    rows = []
    for proxy in proxies if proxies is not None else runs.proxies():
        for split in ood_splits(runs):
            signs = runs.signs(proxy, split, "accuracy_change", "gap_vs_matched")
            raw = runs.signs(proxy, split, "accuracy_change", "gap_vs_ref")
            if signs and all(s == -1 for s in signs):
                call = "under-states"
            elif signs and all(s == 1 for s in signs):
                call = "over-states"
            elif any(signs):
                call = f"mixed ({count(signs, -1)} under, {count(signs, 1)} over)"
            else:
                call = "faithful"
            rows.append({"proxy": proxy, "split": split, "call": call, "signs": signs, "raw": raw,
                         "original": runs.stat(proxy, split, "original_accuracy"),
                         "proxy_acc": runs.stat(proxy, split, "proxy_accuracy"),
                         "gap": runs.stat(proxy, split, "accuracy_change", "gap_vs_ref"),
                         "matched": runs.stat(proxy, split, "accuracy_change", "gap_vs_matched")})
    return rows


def judge_direction(head_runs: Sequence[RecipeRuns], layer_runs: Sequence[RecipeRuns] = ()) -> tuple[str, str]:
    """Per-head proxies (every one) and whole-layer proxies (at each sweep's reported parameter)."""
    rows = [r for runs in head_runs for r in direction_rows(runs)]
    rows += [r for runs in layer_runs for r in direction_rows(runs, [runs.selected()])]
    under = [r for r in rows if r["call"] == "under-states"]
    over = [r for r in rows if r["call"] == "over-states"]
    verdict = "reproduced" if under and over else "partly" if under or over else "not reproduced"

    def best(group: list[dict[str, Any]], key: Any) -> str:
        if not group:
            return "none"
        r = key(group)
        return f"`{r['proxy']}` on `{r['split']}` ({r['matched'].fmt(3, signed=True)})"

    text = (f"{len(under)} of {len(rows)} proxy x split cells under-state generalization in every seed and "
            f"{len(over)} over-state it (accuracy change vs length-matched iid). Strongest under: "
            f"{best(under, lambda g: min(g, key=lambda r: r['matched'].mean))}; strongest over: "
            f"{best(over, lambda g: max(g, key=lambda r: r['matched'].mean))}")
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


def judge_key_depth(all_runs: Sequence[RecipeRuns]) -> tuple[str, str]:
    parts, verdicts = [], []
    for runs in all_runs:
        proxy = runs.selected()
        max_depth = runs.task_config.get("max_depth")  # the training strings' deepest nesting
        if not isinstance(max_depth, int):
            continue
        inside, beyond = _depth_split(runs, proxy, "unseen_depth", max_depth)
        if not inside.values:
            continue
        diff = SeedStat(tuple(b - a for a, b in zip(inside.values, beyond.values, strict=True)), (-1.0, 1.0))
        lo, hi = diff.interval
        verdicts.append("reproduced" if hi < 0 else "partly" if diff.mean < 0 else "not reproduced")
        parts.append(f"`{runs.name}` ({param_text(runs, proxy)}) on unseen_depth: agreement {inside.fmt()} at key "
                     f"depth <= {max_depth} vs {beyond.fmt()} beyond (difference {diff.fmt(3, signed=True)}; "
                     f"{'below 0' if hi < 0 else 'above 0' if lo > 0 else 'includes 0'})")
    if not verdicts:
        return "not run", "no key-depth breakdown available"
    verdict = "reproduced" if "reproduced" in verdicts else "partly" if "partly" in verdicts else "not reproduced"
    return verdict, "; ".join(parts)


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
    return verdict, (f"original accuracy on unseen_depth {stat.fmt()} across {stat.n} training seeds "
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
    parts, hits = [], []
    for runs in all_runs:
        proxy = runs.selected()
        depth = runs.signs(proxy, "deep_nesting", "agreement", "gap_vs_matched") if "deep_nesting" in runs.splits() else []
        drops = category_drops(runs, proxy)
        if not drops:
            continue
        worst = min(drops, key=lambda g: drops[g].mean)
        nesting = bool(depth) and all(s == -1 for s in depth)
        hits.append((nesting, worst == "copy"))
        parts.append(f"`{runs.name}` ({param_text(runs, proxy)}): deep_nesting agreement vs length-matched iid "
                     f"{gap_cell(runs, proxy, 'deep_nesting', 'agreement', 'gap_vs_matched')}; largest "
                     f"category drop on other languages: `{worst}` ({drops[worst].fmt(3, signed=True)})")
    if not hits:
        return "not run", "no code runs"
    both = any(n and c for n, c in hits)
    either = any(n or c for n, c in hits)
    return ("reproduced" if both else "partly" if either else "not reproduced"), "; ".join(parts)


def judge_length(all_runs: Sequence[RecipeRuns]) -> tuple[str, str]:
    raw_total = survived = flipped = 0
    lost = []
    for runs in all_runs:
        proxy = runs.selected()
        for split in ood_splits(runs):
            raw = runs.signs(proxy, split, "agreement", "gap_vs_ref")
            if not raw or not (all(s == -1 for s in raw) or all(s == 1 for s in raw)):
                continue
            raw_total += 1
            matched = runs.signs(proxy, split, "agreement", "gap_vs_matched")
            if matched == raw:
                survived += 1
            else:
                lost.append(f"`{runs.name}`/`{split}`")
                flipped += any(m == -raw[0] for m in matched)
    text = (f"{raw_total} agreement gaps vs iid are significant in every seed at the reported proxies; "
            f"{survived} stay significant in every seed against the length-matched control"
            + (f"; not: {', '.join(lost)}" if lost else "")
            + (f" ({flipped} reverse sign)" if flipped else ""))
    verdict = "all survive" if raw_total and survived == raw_total else "some survive" if survived else "none survive"
    return verdict, text


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (NaN when either side is constant or has fewer than 3 values)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def judge_sae_predicts(all_runs: Sequence[RecipeRuns]) -> tuple[str, str]:
    """Per recipe and OOD split: across widths, does iid explained variance rank-order the split's agreement?"""
    parts, rhos = [], []
    for runs in all_runs:
        proxies = runs.proxies()
        cells = []
        for split in ood_splits(runs):
            per_seed = []
            for seed in runs.seeds:
                ev = [runs.row(seed, p, REFERENCE, "explained_variance") for p in proxies]
                agree = [runs.row(seed, p, split, "agreement") for p in proxies]
                if all(r is not None for r in ev + agree):
                    per_seed.append(_spearman([r["value"] for r in ev], [r["value"] for r in agree]))
            if per_seed:
                rhos.append(per_seed)
                cells.append(f"`{split}` {np.nanmean(per_seed):+.2f}" if np.isfinite(per_seed).any()
                             else f"`{split}` n/a")
        proxy = runs.selected()
        iid_ev = runs.stat(proxy, REFERENCE, "explained_variance")
        splits = ood_splits(runs)
        if not cells or not iid_ev.values or not splits:
            continue
        worst = min(splits, key=lambda s: runs.stat(proxy, s, "agreement", "gap_vs_matched").mean)
        parts.append(f"`{runs.name}`: mean rho {', '.join(cells)}; at {param_text(runs, proxy)} iid explained "
                     f"variance {iid_ev.fmt()}, on `{worst}` {runs.stat(proxy, worst, 'explained_variance').fmt()} "
                     f"(agreement {runs.stat(proxy, REFERENCE, 'agreement').fmt()} on iid, "
                     f"{runs.stat(proxy, worst, 'agreement').fmt()} on `{worst}`)")
    if not rhos:
        return "not run", "no sparse dictionary runs with explained variance"
    flat = [r for cell in rhos for r in cell]
    if all(np.isfinite(r) and r >= RANK_AGREEMENT for r in flat):
        verdict = "reproduced"
    elif np.isfinite(flat).any() and float(np.nanmean(flat)) > 0:
        verdict = "partly"
    else:
        verdict = "not reproduced"
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


def judge_over_training(series: Sequence[Training]) -> tuple[str, str]:
    parts, courses = [], []
    for t in series:
        sweep = t.sweep
        ood = [s for s in sweep.splits if s != REFERENCE]
        cells = []
        for proxy in sweep.proxies:
            for split in ood:
                states = training_states(sweep, proxy, split)
                if not states:
                    continue
                course = training_course(states)
                courses.append(course)
                if split.startswith("unseen_depth"):
                    sig = [str(step) for step, _, sign in states if sign]
                    cells.append(f"{proxy} on `{split}`: {states[0][1]:+.3f} at step {states[0][0]} -> "
                                 f"{states[-1][1]:+.3f} at step {states[-1][0]}, {course}"
                                 + (f" (significant at steps {', '.join(sig)})" if sig else ""))
        parts.append(f"`{t.name}` (training seed {t.seed}, {len(sweep.steps)} checkpoints): " + "; ".join(cells))
    if not courses:
        return "not run", "no analysis over training checkpoints"
    tally = {c: courses.count(c) for c in dict.fromkeys(courses)}
    summary = ", ".join(f"{n} {c}" for c, n in tally.items())
    changed = any(c in ("appears", "vanishes", "flips", "comes and goes") for c in courses)
    return ("reproduced" if changed else "not reproduced"), (f"over {len(courses)} proxy x split cells: {summary}. "
                                                             + " ".join(parts))



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


def judge_circuit(all_runs: Sequence[RecipeRuns]) -> tuple[str, str]:
    """Does a circuit found faithful in distribution stay faithful out of distribution, after
    matching? Per recipe (its one circuit proxy): found faithful when its mean iid agreement reaches
    :data:`FAITHFUL_IID`; it stays faithful on a split unless the agreement gap vs length-matched iid
    is significantly negative in every seed. *reproduced* (holds) when every faithful circuit stays
    faithful on every OOD split, *partly* when it drops only in some seeds (or only before matching),
    *not reproduced* when some split drops in every seed; *not reproduced* too when no circuit was
    found faithful in distribution (the question does not arise)."""
    verdicts, texts = [], []
    for runs in all_runs:
        proxy = runs.proxies()[0]
        iid = runs.stat(proxy, REFERENCE, "agreement")
        splits = ood_splits(runs)
        matched = {s: runs.signs(proxy, s, "agreement", "gap_vs_matched") for s in splits}
        raw = {s: runs.signs(proxy, s, "agreement", "gap_vs_ref") for s in splits}
        drop = verdict_of(matched, raw, -1)  # the drop's own verdict: reproduced = drops in every seed
        if iid.mean < FAITHFUL_IID:
            verdicts.append("not reproduced")
            texts.append(f"`{runs.name}`: not faithful in distribution (iid agreement {iid.fmt()})")
            continue
        verdicts.append({"reproduced": "not reproduced", "partly": "partly"}.get(drop, "reproduced"))
        worst = min(splits, key=lambda s: runs.stat(proxy, s, "agreement", "gap_vs_matched").mean)
        texts.append(f"`{runs.name}`: iid agreement {iid.fmt()}; lowest on `{worst}`, agreement "
                     f"{runs.stat(proxy, worst, 'agreement').fmt()}, "
                     f"{gap_cell(runs, proxy, worst, 'agreement', 'gap_vs_matched')} vs length-matched iid")
    order = ("not reproduced", "partly", "reproduced")  # the claim holds only where every circuit does
    return min(verdicts, key=order.index), "; ".join(texts)
