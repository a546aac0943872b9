"""``docs/RESULTS.md``: the reproduction's Markdown document, every number from a run.

:func:`render` writes the document from the runs combined across seeds (:mod:`.aggregate`): the
claims table (each claim of :mod:`.claims` judged on every model family by the same rules), the
models, the per-head tables, the analyses over training and a section per recipe; the figures
(:mod:`.figures`) sit beside it. :func:`write_document` does all of it from a runs folder.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from illusions.analyses.run import AnalysisRecipe
from illusions.analyses.summary import POSITION_GROUP, group_label
from illusions.reproduction.aggregate import (
    FAITHFUL_IID,
    MATCHED_IID,
    REFERENCE,
    Cell,
    RecipeRuns,
    Training,
    has_sparse,
    n_positions,
    param_text,
)
from illusions.reproduction.claims import CLAIMS, PAPERLIKE, Claim, claim_number, judge
from illusions.reproduction.judges import (
    NOT_FAITHFUL,
    ONE_SEED,
    PAPER_DEPTH_FIGURE,
    category_drops,
    deep_groups,
    direction_rows,
    gap_cell,
    strict_cell,
    training_states,
)
from illusions.reproduction.metrics import SELECTED_COLUMNS, SPARSE_COLUMNS

# The recipe whose runs give each task's model table (original accuracy per split and seed).
MODEL_TABLE_RECIPES = (("dyck", "dyck-svd-L1"), ("code", "code-svd-L1"))

@dataclasses.dataclass(frozen=True)
class Family:
    """The runs of one bundled model family beside the reference family's in the document.

    Attributes:
        name: the family (``dyck-paperlike``).
        runs: its runs by recipe (:func:`load_runs` with ``family``).
        figures: its figures (:func:`write_figures` with ``stem_prefix``).
        about: one sentence on what the family is, for the document.
    """

    name: str
    runs: dict[str, RecipeRuns]
    figures: dict[str, str] = dataclasses.field(default_factory=dict)
    about: str = ""
    training: dict[str, Training] = dataclasses.field(default_factory=dict)



def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]



def selected_table(runs: RecipeRuns, proxy: str) -> list[str]:
    """Per split and declared group at ``proxy``: metrics and gaps (the strict control's where the recipe has it)."""
    rows = []
    strict = runs.has_control()
    cells = [Cell(REFERENCE)] + runs.cells(proxy)
    for cell in cells:
        is_ref = cell.split == REFERENCE
        split, where = cell.split, cell.where
        rows.append([
            f"`{cell.name}`", n_positions(runs, proxy, split, **where),
            *(runs.stat(proxy, split, metric, **where).fmt() for metric, _ in SELECTED_COLUMNS),
            "-" if is_ref else gap_cell(runs, proxy, split, "agreement", "gap_vs_ref", **where),
            "-" if is_ref else gap_cell(runs, proxy, split, "agreement", "gap_vs_matched", **where),
            "-" if is_ref else gap_cell(runs, proxy, split, "accuracy_change", "gap_vs_matched", **where),
            *([] if not strict else ["-" if is_ref else strict_cell(runs, proxy, cell, "accuracy_change")]),
        ])
    return _md_table(["split", "positions", *(header for _, header in SELECTED_COLUMNS),
                      "Δagree vs iid", "Δagree vs len-matched", "Δ(proxy−orig acc) vs len-matched",
                      *(["… vs strict matched"] if strict else [])], rows)


def matched_iid_table(runs: RecipeRuns) -> list[str]:
    """Agreement per split and group where the sweep's iid agreement reaches each of MATCHED_IID."""
    proxy = runs.proxies()[0]
    rows = []
    for cell in runs.cells(proxy):
        stats = [runs.at_iid(level, cell) for level in MATCHED_IID]
        rows.append([f"`{cell.name}`"] + [
            (st.fmt() + (f" ({st.n}/{len(runs.seeds)} seeds)" if st.n < len(runs.seeds) else "")) if st.values
            else "n/a" for st in stats])
    return _md_table(["split"] + [f"agreement at iid {level:.2f}" for level in MATCHED_IID], rows)


def sweep_table(runs: RecipeRuns) -> list[str]:
    splits = runs.splits()
    sparse = has_sparse(runs)
    rows = []
    for proxy in runs.proxies():
        jsd = runs.stat(proxy, REFERENCE, "attention_jsd")
        rows.append([str(runs.param_of(proxy))] + [f"{runs.stat(proxy, s, 'agreement').mean:.3f}" for s in splits]
                    + [f"{jsd.mean:.3f}" if jsd.values else "n/a"]
                    + ([f"{runs.stat(proxy, REFERENCE, 'explained_variance').mean:.3f}"] if sparse else []))
    return _md_table([runs.param_name()] + [f"agree `{s}`" for s in splits] + ["iid JSD"]
                     + (["iid explained var"] if sparse else []), rows)



def sparse_table(runs: RecipeRuns, proxy: str) -> list[str]:
    rows = []
    for split in runs.splits():
        rows.append([f"`{split}`"] + [runs.stat(proxy, split, metric).fmt(digits)
                                      for metric, _, digits in SPARSE_COLUMNS])
    return _md_table(["split"] + [header for _, header, _ in SPARSE_COLUMNS], rows)


def direction_table(runs: RecipeRuns) -> list[str]:
    rows = []
    for r in direction_rows(runs):
        rows.append([f"`{r['proxy']}`", r["iid"].fmt(), f"`{r['split']}`", r["original"].fmt(), r["proxy_acc"].fmt(),
                     r["gap"].fmt(3, signed=True), r["matched"].fmt(3, signed=True), r["strict"], r["call"]])
    return _md_table(["proxy", "iid agreement", "split", "original acc", "proxy acc", "Δ(proxy−orig) vs iid",
                      "… vs len-matched", "… vs strict matched", "call (every seed significant)"], rows)


def key_depth_table(runs: RecipeRuns, proxy: str) -> list[str]:
    splits = [s for s in runs.splits() if runs.groups(proxy, s, "key_depth")]
    depths = sorted({int(g) for s in splits for g in runs.groups(proxy, s, "key_depth") if g.lstrip("-").isdigit()})
    rows = []
    for d in depths:
        cells = []
        for s in splits:
            stat = runs.stat(proxy, s, "agreement", group_by="key_depth", group=str(d))
            cells.append(f"{stat.mean:.3f}" if stat.values else "")
        rows.append([str(d)] + cells)
    return _md_table(["key depth"] + [f"agree `{s}`" for s in splits], rows)


def category_table(runs: RecipeRuns, proxy: str) -> list[str]:
    splits = runs.splits()
    drops = category_drops(runs, proxy)
    rows = []
    for group in runs.groups(proxy, REFERENCE, "category"):
        rows.append([f"`{group}`"] + [
            f"{runs.stat(proxy, s, 'agreement', group_by='category', group=group).mean:.3f}" for s in splits
        ] + [drops[group].fmt(3, signed=True)])
    return _md_table(["category"] + [f"agree `{s}`" for s in splits] + ["other languages − iid"], rows)


def model_table(runs: RecipeRuns) -> list[str]:
    """Original accuracy per split and seed; a split's named position groups follow it as
    ``split (group)`` rows."""
    proxy = runs.proxies()[0]
    rows = []
    for split in runs.splits():
        for group_by, group in [("all", "all")] + [(POSITION_GROUP, g) for g in runs.groups(proxy, split, POSITION_GROUP)]:
            per_seed = []
            for seed in runs.seeds:
                r = runs.row(seed, proxy, split, "original_accuracy", group_by, group)
                per_seed.append(f"{r['value']:.3f}" if r is not None else "")
            name = split if group_by == "all" else group_label(split, group)
            rows.append([f"`{name}`"] + per_seed
                        + [runs.stat(proxy, split, "original_accuracy", group_by=group_by, group=group).fmt()])
    return _md_table(["split"] + [f"seed {s}" for s in runs.seeds] + ["mean [95% across seeds]"], rows)


def _excluded_text(runs: dict[str, RecipeRuns]) -> str:
    """How much of any split the length-matched gaps leave out, at most (from ``matched_coverage``)."""
    worst: tuple[float, str, str, int] | None = None
    for name, r in runs.items():
        for seed in r.seeds:
            for row in r.rows[seed]:
                if row["group_by"] == "all" and row["metric"] == "agreement" and np.isfinite(row["gap_vs_matched"]):
                    share = 1.0 - float(row["matched_coverage"])
                    if share >= 0.0005 and (worst is None or share > worst[0]):
                        worst = (share, name, row["split"], seed)
    if worst is None:
        return "no split of any run has positions in such bins"
    share, name, split, seed = worst
    return f"the largest share left out is {share:.1%} of `{split}` in `{name}` (seed {seed})"



def render(
    runs: dict[str, RecipeRuns],
    recipes: Sequence[AnalysisRecipe],
    *,
    manifest: dict[str, Any],
    figures: dict[str, str],
    others: Sequence[Family] = (),
    training: dict[str, Training] | None = None,
) -> str:
    """The Markdown of ``docs/RESULTS.md``; ``figures`` maps a key to a relative image path.

    ``runs`` are the reference families' runs (``dyck``, ``code``); each of ``others`` is another
    family of a task, shown beside them: its own column in the claims table (judged by the same rules),
    its model table, per-head tables and recipe sections.
    """
    training = training or {}
    lines = _front_matter(runs, manifest, others, training)
    lines += ["", "## Claims", ""]
    lines += _claims_table(runs, training, others)

    lines += ["## The models", ""]
    lines += _models_section(runs, "")
    for family in others:
        lines += _models_section(family.runs, family.name)

    lines += _heads_section(runs, figures, "")
    for family in others:
        lines += _heads_section(family.runs, family.figures, family.name)

    if training or any(f.training for f in others):
        lines += ["## Over training", "",
                  "Each analysis over training runs one recipe on every step checkpoint of one training run (the "
                  "recipe's fit, splits and proxies at each step). Cells: the proxy's accuracy change (proxy "
                  "minus original accuracy) on the split minus its value on iid in the same checkpoint, with "
                  "its 95% bootstrap interval; `*` when the interval excludes 0 (below 0: the proxy "
                  "under-states the model's generalization there, above 0: over-states it).", ""]
        lines += _training_section(training, figures, "")
        for family in others:
            lines += _training_section(family.training, family.figures, family.name)

    lines += ["## Recipe by recipe", ""]
    lines += _recipe_sections(runs, recipes, figures)
    for family in others:
        if family.runs:
            lines += [f"## Recipe by recipe: the `{family.name}` models", ""]
            lines += _recipe_sections(family.runs, recipes, family.figures)
    return "\n".join(lines).rstrip() + "\n"


def _front_matter(runs: dict[str, RecipeRuns], manifest: dict[str, Any], others: Sequence[Family],
                  training: dict[str, Training]) -> list[str]:
    """The title, what was run and in how long, and how to read the document."""
    entries = manifest.get("runs", {})
    computed = [e for e in entries.values() if not e["reused"]]
    families = [runs, *(f.runs for f in others)]
    # The settings the runs used, as their recipes give them (not the defaults).
    specs = [r.recipe.spec for group in [*families, training, *(f.training for f in others)] for r in group.values()]
    seeds = sorted({s for group in families for r in group.values() for s in r.seeds})
    n_recipes = len({e["recipe"] for e in entries.values() if "recipe" in e}
                    | {name for group in families for name in group})
    family_text = "" if not others else (
        " on " + ", ".join(["the reference families"] + [f"`{f.name}`" for f in others]))
    lines = [
        "# Results: reproducing *Interpretability Illusions in the Generalization of Simplified Models*",
        "",
        "Generated by `illusions reproduce` from the runs it wrote; every number below comes from those runs "
        "(do not edit by hand, re-run the command). Paper background: the repository's design notes "
        "(`PAPER.md`, `DESIGN.md`); recipes: `analyses/*.toml`.",
        "",
        f"- **Runs:** {len(entries)} ({n_recipes} recipes x training seeds {', '.join(map(str, seeds))}"
        f"{family_text}); {len(computed)} computed in this invocation, {len(entries) - len(computed)} reused "
        "from earlier identical runs.",
        _wall_time_line(manifest, computed, len(entries)),
        f"- **Version:** illusions {manifest.get('illusions_version', '?')}.",
        "",
        "## How to read this",
        "",
        f"- Each run fits its proxy on {_setting(specs, 'fit_n')} training sequences (`fit_n` in the recipe) of "
        f"one checkpoint and evaluates it on up to {_setting(specs, 'max_seqs')} sequences per split (`max_seqs`). "
        "Metrics: *agreement* (proxy and original make "
        "the same prediction), *accuracy* of each, *attention JSD* (bits, simplified heads, scored queries), "
        "*accuracy change* (proxy minus original accuracy, same positions).",
        f"- Cells read `mean [95% interval]` **across training seeds** (t-interval over {len(seeds)} "
        "checkpoints of the same recipe). A gap cell ends in `(k/n)`: the number of seeds whose own 95% "
        f"bootstrap interval ({_setting(specs, 'n_boot')} resamples of sequences, `n_boot`) excludes 0 in the "
        "gap's direction.",
        "- *Δ vs len-matched* compares a split with an in-distribution control re-weighted to the split's "
        "length distribution: the splits differ in length as well as in what they are named for. Length bins "
        f"that iid lacks are left out on both sides; {_excluded_text(runs)}.",
        "- *Δ vs strict matched* (`match` in the recipe): the same control over strata of what else differs: on "
        "Dyck length x distance x key depth, since the unseen-depth closers differ from iid's in all three; on "
        "code length x nesting depth x character category, since other languages and deeper nesting differ from "
        "iid Python in all three. Strata iid lacks (on Dyck every key depth beyond the training depth, and far "
        "closers of openers at it; on code nesting deeper than iid's) are left out on both sides; the cell gives "
        "the share of positions matched. Gaps are reported against both controls, side by side.",
        "- **Every claim is judged on each whole split and on each position group the task declares** (Dyck: "
        "`unseen_depth (opener > 10)` and `unseen_depth (key_depth >= 10)`, the closers whose opener is beyond, "
        "or at and beyond, the training depth; the code task declares none); a verdict names the cells that carry it.",
        f"- **The in-distribution gate:** a direction call (*under-states*, *over-states*, *faithful*), and every "
        f"other call read off a proxy (the key-depth and code-source claims, and the gaps the control claims count), "
        f"is made only for a proxy whose iid "
        f"agreement is at least {FAITHFUL_IID} **in every seed**; any other proxy is listed as *{NOT_FAITHFUL}* "
        "and counts for no call (a broken proxy's accuracy change hits a floor wherever the model has less "
        "accuracy to lose); a claim with no gated proxy left reads *not judged*. A gap claim on a proxy below "
        "the gate reads at most *partly*. The per-head figures draw ungated proxies hatched; a key-depth figure's "
        "title says when its proxy is ungated. Claim "
        f"{claim_number('original')} reads the model's own accuracy, where no proxy enters.",
        "- **Sparse dictionaries** are judged per dictionary: recipes differing only in the SAE training seed "
        "form one site, which holds only when it holds for every dictionary seed; the count is given.",
        f"- A sweep is reported at its **smallest parameter whose iid agreement is at least {FAITHFUL_IID} in every "
        "seed**, never at a parameter where the proxy is the model itself (agreement 1 on every split in every "
        "seed, e.g. full rank), or at its largest other parameter when none qualifies. So that no single "
        "parameter decides, each sweep is also reported **at matched iid agreement** ("
        + ", ".join(f"{x:.2f}" for x in MATCHED_IID) + "): each seed's out-of-distribution agreement where its "
        "sweep's iid agreement reaches the level, interpolated linearly between the two parameters around it.",
        f"- *Over training* rests on **one training seed per family**: {ONE_SEED}.",
        "- **Verdicts:** *reproduced* when the effect is significant in the same direction in every seed "
        "(for gaps: against the length-matched control); *partly* when only in some seeds, only before "
        "length matching, or without the in-distribution match; *not reproduced* otherwise. A proxy "
        "*under-states* the model's generalization when its accuracy change is lower out of distribution "
        "than in distribution (the proxy fails where the model generalizes), and *over-states* it when higher. "
        "Rows marked *beyond the paper* are our own questions, judged by the same rules (*holds* / *partly* / "
        "*does not hold*).",
    ]
    if others:
        named = "; ".join(f"`{f.name}`" + (f" ({f.about})" if f.about else "") for f in others)
        lines.append(f"- **Model families:** every claim is judged on each family separately, by the same rules, "
                     f"side by side: the reference models (`dyck`, `code`) and {named}. A claim whose recipes have "
                     "no run on a family reads *not run* there."
                     + (f" Claim {claim_number('original')} is about the paper's own models, so it is judged on "
                        f"`{PAPERLIKE}`, the family searched to resemble them (`tasks/README.md`); the reference "
                        "models were chosen to train well, not to match the paper."
                        if any(f.name == PAPERLIKE for f in others) else ""))
    return lines


def _setting(specs: Sequence[Any], field: str) -> str:
    """One setting of the runs' specs as the document states it: its value (``max_seqs`` unset: all),
    or each value when the recipes differ (``500 or 200``); the default when there is no run."""
    from illusions.analyses.spec import AnalysisSpec

    values = {getattr(spec, field) for spec in specs or [AnalysisSpec()]}
    texts = [f"{v:,}" for v in sorted((v for v in values if v is not None), reverse=True)]
    return " or ".join(texts + (["all"] if None in values else []))


def _claim_cells(claim: Claim, runs: dict[str, RecipeRuns], training: dict[str, Training]) -> tuple[str, str]:
    verdict, text = judge(claim, runs, training)
    if claim.beyond:  # a question of ours, not a finding to reproduce
        verdict = {"reproduced": "holds", "not reproduced": "does not hold"}.get(verdict, verdict)
    return text, f"**{verdict}**"


def _claims_table(runs: dict[str, RecipeRuns], training: dict[str, Training], others: Sequence[Family]) -> list[str]:
    rows = []
    for i, claim in enumerate(CLAIMS, 1):
        cells = list(_claim_cells(claim, runs, training))
        for family in others:
            cells += list(_claim_cells(claim, family.runs, family.training))
        rows.append([str(i), ("*(beyond the paper)* " if claim.beyond else "") + claim.text, *cells])
    header = ["#", "claim", "what we measured", "verdict"]
    if others:
        header = ["#", "claim", "reference models: what we measured", "verdict"]
        for family in others:
            header += [f"`{family.name}`: what we measured", "verdict"]
    return _md_table(header, rows)


def _models_section(runs: dict[str, RecipeRuns], family: str) -> list[str]:
    lines = []
    for task, name in MODEL_TABLE_RECIPES:
        if name in runs:
            lines += [f"Original accuracy of the `{family or task}` checkpoints on the evaluated sequences of each "
                      "split:", ""]
            lines += model_table(runs[name])
            first = runs[name].proxies()[0]
            if task == "dyck" and deep_groups(runs[name], first):
                groups = " and ".join(f"`unseen_depth ({g})`" for g in deep_groups(runs[name], first))
                lines += [f"{groups} hold only the unseen-depth closers whose opener is deeper than the training "
                          "depth (or at it and deeper: training strings close an opener at the training depth at "
                          "once), beside the whole split. " + PAPER_DEPTH_FIGURE, ""]
    return lines


def _heads_section(runs: dict[str, RecipeRuns], figures: dict[str, str], family: str) -> list[str]:
    heads = [r for r in runs.values() if r.recipe.spec.per_head]
    if not heads:
        return []
    if family:
        lines = [f"## Which proxies under- or over-state generalization, per layer and head: the `{family}` models",
                 ""]
    else:
        lines = ["## Which proxies under- or over-state generalization, per layer and head", "",
                 "Each proxy simplifies one head only. Accuracy change = proxy minus original accuracy; its gap "
                 "vs iid is how much more (negative) or less (positive) the proxy loses out of distribution "
                 "than in distribution, relative to the model.", ""]
    for r in heads:
        lines += [f"### `{r.name}`{f' on `{family}`' if family else ''}: {r.recipe.description}", ""]
        if f"heads:{r.name}" in figures:
            lines += [f"![{r.name}]({figures[f'heads:{r.name}']})", ""]
            ungated = [p for p in r.proxies() if not r.gated(p)]
            if ungated:
                lines += [f"Hatched bars, ticks marked *(ungated)*: {len(ungated)} of {len(r.proxies())} proxies "
                          f"({', '.join(f'`{p}`' for p in ungated)}) have iid agreement below {FAITHFUL_IID} in "
                          f"some seed: {NOT_FAITHFUL}, drawn for completeness, no direction read off them.", ""]
        lines += direction_table(r)
    layer_level = [r for r in runs.values() if not r.recipe.spec.per_head and r.name.startswith("dyck-")]
    if layer_level:
        lines += [f"### Whole layers, at the reported proxies{f' (`{family}`)' if family else ''}", ""]
        rows = []
        for r in layer_level:
            proxy = r.selected()
            for d in direction_rows(r, [proxy]):
                rows.append([f"`{r.name}`", f"`{proxy}`", d["iid"].fmt(), f"`{d['split']}`",
                             d["matched"].fmt(3, signed=True), d["strict"], d["call"]])
        lines += _md_table(["recipe", "proxy", "iid agreement", "split", "Δ(proxy−orig) vs len-matched",
                            "… vs strict matched", "call"], rows)
    return lines


def _training_section(training: dict[str, Training], figures: dict[str, str], family: str) -> list[str]:
    lines = []
    for t in training.values():
        sweep = t.sweep
        ood = [s for s in sweep.splits if s != REFERENCE]
        lines += [f"### `{t.name}` on {f'`{family}`' if family else 'the reference models'} (training seed "
                  f"{t.seed})", "", f"{t.recipe.description}", ""]
        if f"training:{t.name}" in figures:
            lines += [f"![{t.name}]({figures[f'training:{t.name}']})", ""]
        rows = [[str(step)] + [f"{sweep.value(step, s, sweep.proxies[0], 'original_accuracy'):.3f}"
                               for s in sweep.splits] for step in sweep.steps]
        lines += ["Original accuracy per split:", ""]
        lines += _md_table(["step"] + [f"`{s}`" for s in sweep.splits], rows)
        for proxy in sweep.proxies:
            states = {split: {st: (v, sign) for st, v, sign in training_states(sweep, proxy, split)}
                      for split in ood}
            rows = []
            for step in sweep.steps:
                cells = []
                for split in ood:
                    v, sign = states[split].get(step, (float("nan"), 0))
                    cells.append(f"{v:+.3f}{'*' if sign else ''}" if math.isfinite(v) else "-")
                agree = sweep.value(step, REFERENCE, proxy, "agreement")
                rows.append([str(step), f"{agree:.3f}", *cells])
            lines += [f"`{proxy}`: iid agreement and Δ(proxy−orig acc) vs iid per split:", ""]
            lines += _md_table(["step", "iid agreement"] + [f"`{s}`" for s in ood], rows)
    return lines


def _recipe_sections(runs: dict[str, RecipeRuns], recipes: Sequence[AnalysisRecipe],
                     figures: dict[str, str]) -> list[str]:
    lines = []
    for recipe in recipes:
        r = runs.get(recipe.name)
        if r is None or recipe.spec.per_head:
            continue
        proxy = r.selected()
        lines += [f"### `{recipe.name}`", "", f"{recipe.description}", "", f"*Question:* {recipe.claim}", "",
                  f"Seeds {', '.join(map(str, r.seeds))}; reported proxy `{proxy}` ({param_text(r, proxy)}).", ""]
        _, asked = recipe.spec.sweep_values()
        ran = {r.param_of(p) for p in r.proxies()}
        left_out = [v for v in asked if v not in ran]
        if left_out and ran:
            lines += [f"The recipe's {r.param_name()} {', '.join(map(str, left_out))} exceed what these models "
                      "allow (their width) and were left out.", ""]
        if f"sweep:{recipe.name}" in figures:
            lines += [f"![{recipe.name}]({figures[f'sweep:{recipe.name}']})", ""]
        lines += selected_table(r, proxy)
        if has_sparse(r):
            lines += [f"The sparse dictionary at `{proxy}` on each split (all token positions; mean across seeds):", ""]
            lines += sparse_table(r, proxy)
        if len(r.proxies()) > 1:
            lines += ["Agreement per split over the sweep (mean across seeds):", ""]
            lines += sweep_table(r)
            lines += ["At matched iid agreement (each seed's sweep interpolated where its iid agreement reaches the "
                      "level; n/a where it starts above it or never reaches it):", ""]
            lines += matched_iid_table(r)
        if any(r.groups(proxy, s, "key_depth") for s in r.splits()) and recipe.spec.task == "dyck":
            lines += [f"Agreement by key depth (depth of the attended opener) at `{proxy}`, mean across seeds:", ""]
            if f"depth:{recipe.name}" in figures:
                lines += [f"![{recipe.name} by key depth]({figures[f'depth:{recipe.name}']})", ""]
            lines += key_depth_table(r, proxy)
        if r.groups(proxy, REFERENCE, "category"):
            lines += [f"Agreement by character category at `{proxy}`, mean across seeds:", ""]
            lines += category_table(r, proxy)
    return lines


def _wall_time_line(manifest: dict[str, Any], computed: list[dict[str, Any]], n_runs: int) -> str:
    full = manifest.get("full_run")
    entries = list(manifest.get("runs", {}).values())
    seconds = [e.get("seconds") for e in entries]
    if not full and entries and all(isinstance(x, (int, float)) for x in seconds):
        cpu = [e.get("cpu_seconds") for e in entries]
        cpu_text = (f" and {_duration(sum(cpu))} of CPU time" if all(isinstance(x, (int, float)) for x in cpu)
                    else "")
        return (f"- **Time:** no single invocation computed every run (they were computed in pieces and reused); "
                f"the {n_runs} runs took {_duration(sum(seconds))} of run time{cpu_text} in all (each run's own "
                "wall time, summed: runs of parallel workers overlap, so a whole reproduction in one invocation "
                f"takes less wall time). This invocation took {_duration(manifest.get('total_seconds', 0.0))} and "
                f"computed {len(computed)} of {n_runs} runs.")
    if not full:
        return (f"- **Wall time:** no whole reproduction is recorded in these runs; this invocation took "
                f"{_duration(manifest.get('total_seconds', 0.0))} and computed {len(computed)} of {n_runs} runs "
                "(run with `--force` for the whole figure).")
    cpu = full.get("cpu_seconds")
    cores = full.get("cpu_count")
    if full.get("engine") == "slurm":
        where = f"as {full['runs']} Slurm jobs of {full['threads']} torch thread(s) each"
    else:
        where = (f"in {full['workers']} worker process(es) of {full['threads']} torch thread(s)"
                 + (f" on a {cores}-core machine" if cores else ""))
    device = full.get("device", "cpu")
    return (f"- **Wall time of the whole reproduction:** {_duration(full['seconds'])} for all {full['runs']} runs "
            f"from the bundled checkpoints, {where}" + (f", on device {device}" if device != "cpu" else "")
            + (f"; the runs used {_duration(cpu)} of CPU time in all" if cpu is not None else "") + "."
            + ("" if len(computed) == n_runs else
               f" (This invocation recomputed {len(computed)} runs and reused the rest.)"))


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.1f} s"


def write_document(recipes: Sequence[AnalysisRecipe], jobs: Sequence[Any], runs_dir: Path, results: Path,
                   manifest: dict[str, Any]) -> int:
    """Read the runs of ``jobs`` (:class:`~illusions.reproduction.plan.Job`) back from ``runs_dir``, draw
    the figures into ``figures/`` beside ``results`` and write the document there; returns how many
    figures were drawn. ``recipes`` are the recipes loaded (those without a job are left out), in order;
    ``manifest`` is :func:`~illusions.reproduction.run.run_all`'s."""
    from illusions.bundled import family_description
    from illusions.io import atomic_write_text
    from illusions.reproduction.aggregate import load_runs, load_training
    from illusions.reproduction.figures import write_figures, write_training_figures

    used = [r for r in recipes if r.name in {j.recipe.name for j in jobs}]
    figure_dir, where = Path(results).parent / "figures", Path(results).parent

    def family(name: str | None) -> tuple[dict[str, RecipeRuns], dict[str, Training], dict[str, str]]:
        runs, training = load_runs(used, runs_dir, family=name), load_training(used, runs_dir, family=name)
        prefix = f"{name}-" if name else ""
        return runs, training, {**write_figures(runs, figure_dir, relative_to=where, stem_prefix=prefix),
                                **write_training_figures(training, figure_dir, relative_to=where, stem_prefix=prefix)}

    runs, training, figures = family(None)
    others = []
    for name in dict.fromkeys(j.family for j in jobs if j.family != j.recipe.spec.task):
        family_runs, family_training, family_figures = family(name)
        others.append(Family(name, family_runs, family_figures, family_description(name), family_training))
    text = render(runs, used, manifest=manifest, figures=figures, others=others, training=training)
    atomic_write_text(Path(results), text)
    return len(figures) + sum(len(f.figures) for f in others)
