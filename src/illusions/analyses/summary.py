"""Turn per-position records into estimates with intervals: one tidy row per split x proxy x metric.

Each split gets one set of bootstrap replicate weights over its evaluated sequences (seeded by the
analysis seed and the split's name), shared by all proxies and metrics, so proxies are compared on
the same resamples. Gaps relative to the reference split (``iid``) are differences of independent
replicates. Because the splits differ in length as well as in what they are named for, every gap is
also reported against a *length-matched control*: the reference split's positions re-weighted so that
each length bin carries the same share of positions as in the split under study. Length bins absent
from the reference are left out on **both** sides: the control has no positions there, and the
split's own mean in that gap is taken over its positions in the covered bins only, so both sides
span the same lengths. The share of the split's positions kept is ``matched_coverage`` (the JSON
also gives the excluded share, ``1 - coverage``).

The same control generalises to strata over several meta columns (``match``, e.g. ``length``,
``distance`` and ``key_depth``; ``--match`` on the command line): a stratum is one combination of the
columns' bins (discrete columns value by value, the others in the breakdowns' round bins), the
reference is re-weighted to the split's share of positions in each stratum, and the split's positions
in strata the reference lacks are left out of both sides and counted in the coverage. With the
default ``match = ("length",)`` that is the length-matched control above; any other ``match`` adds a
second control beside it, in the row fields :data:`CONTROL_FIELDS` (``gap_vs_control``, its
interval and ``control_coverage``), which rows carry only then.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from illusions.analyses.faithfulness import METRICS, SEQ_LEN, AnalysisResult, Records, sweep_param
from illusions.analyses.sparse import downstream_estimates, downstream_gaps, downstream_replicates
from illusions.analyses.sparse import estimates as sparse_estimates
from illusions.analyses.spec import BREAKDOWNS
from illusions.analyses.warning_signals import THRESHOLDS, WARNING_GROUP, warning_rows
from illusions.metrics import MIN_INTERVAL_SEQS, Resampler, snap_rounding
from illusions.tasks.base import PositionGroup

# ``group_by`` of the rows of a task's named position groups (beside the whole split).
POSITION_GROUP = "position_group"
# Columns whose values are few and meaningful one by one; anything else is binned.
DISCRETE = ("key_depth", "depth", "category", "max_depth")

ROW_FIELDS = (
    "split", "proxy", "simplifier", "param", "param_value", "group_by", "group", "metric", "value",
    "ci_low", "ci_high", "n_positions", "n_sequences", "gap_vs_ref", "gap_vs_ref_low",
    "gap_vs_ref_high", "gap_vs_matched", "gap_vs_matched_low", "gap_vs_matched_high",
    "matched_coverage",
)
# The control matched on every column of ``match`` (rows carry these only when ``match`` is not just
# ``length``, whose control is ``gap_vs_matched``): gap, its interval, and the share of positions kept.
CONTROL_FIELDS = ("gap_vs_control", "gap_vs_control_low", "gap_vs_control_high", "control_coverage")
# What the matched control matches on unless asked otherwise.
DEFAULT_MATCH = ("length",)


def nice_edges(max_value: float, n_bins: int = 8) -> np.ndarray:
    """Bin edges from 0 in a round step (1, 2 or 5 times a power of ten) covering ``max_value``."""
    max_value = max(float(max_value), 1.0)
    raw = max_value / n_bins
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    step = max(int(step), 1)
    return np.arange(0, max_value + step + 1, step, dtype=np.int64)


def bin_labels(edges: np.ndarray) -> list[str]:
    return [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _length(rec: Records) -> np.ndarray:
    return rec.meta["length"] if "length" in rec.meta else rec.meta[SEQ_LEN]


def _resampler(split: str, n_seqs: int, seed: int, n_boot: int, level: float) -> Resampler:
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    return Resampler.draw(n_seqs, rng, n_boot=n_boot, level=level)


def summarize(
    result: AnalysisResult,
    *,
    reference: str = "iid",
    breakdowns: Sequence[str] = BREAKDOWNS,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    group_names: Mapping[str, Sequence[str]] | None = None,
    discrete: Sequence[str] = DISCRETE,
    position_groups: Mapping[str, PositionGroup] | None = None,
    match: Sequence[str] = DEFAULT_MATCH,
) -> list[dict[str, Any]]:
    """Tidy rows: the overall estimate of each metric per split and proxy, then the breakdowns.

    Overall rows (``group_by == "all"``) carry the gap to ``reference`` and to the length-matched
    control; breakdown rows carry the estimate within each group of one meta column.
    ``group_names[column][code]`` names the groups of a coded column (e.g. the code task's
    character categories); other groups are labelled by their value or bin. Columns in
    ``discrete`` are broken down value by value, the others in round bins.

    ``position_groups`` (a task's :meth:`~illusions.tasks.base.DataSupport.position_groups`) adds,
    after a split's breakdowns, the rows of each named group of its positions: every metric with its
    interval and its gaps to ``reference`` (and to the length-matched control) as for a whole split,
    under ``group_by == "position_group"`` and ``group`` the group's name.

    ``match`` names the meta columns of a second matched control (see the module docstring); with
    the default (``length`` alone) there is only the length-matched one. A column no record has is
    refused (:class:`~illusions.errors.IllusionsError`) before anything is computed.
    """
    splits = list(result.split_rows)
    samplers = {s: _resampler(s, len(result.split_rows[s]), seed, n_boot, level) for s in splits}
    all_records = [r for r in result.records.values() if len(r)]
    match = tuple(dict.fromkeys(match))
    control = match != DEFAULT_MATCH
    edges = _edges(all_records, breakdowns, discrete, match if control else ())
    by_match = _Strata(match, discrete, edges) if control else None
    if by_match is not None:
        by_match.check(all_records)
    setup = _Setup(reference, tuple(breakdowns), tuple(discrete), edges, group_names or {},
                   position_groups or {}, _Strata(("length",), discrete, edges), by_match)
    rows: list[dict[str, Any]] = []
    for j, proxy in enumerate(result.proxies):
        param, param_value = sweep_param(proxy)
        base = {"proxy": result.labels[j], "simplifier": proxy.simplifier, "param": param,
                "param_value": param_value}
        ref_rec, ref_sampler = result.records.get((reference, j)), samplers.get(reference)
        refs = (_reference(ref_rec, ref_sampler, setup.by_length),
                _reference(ref_rec, ref_sampler, by_match) if by_match is not None else None)
        ref_down = (downstream_replicates(ref_rec.downstream, ref_rec.kl, ref_rec.seq, ref_sampler)
                    if refs[0] is not None and ref_rec.downstream else None)
        for split in splits:
            rows += _split_rows(setup, refs, {**base, "split": split}, result.records[(split, j)], samplers[split],
                                ref_down)
        # Unsupervised warning signals: how well each ranks the proxy's disagreements, per split and pooled.
        rows += warning_rows(base, {s: result.records[(s, j)] for s in splits}, samplers,
                             getattr(proxy, "info", {}).get(THRESHOLDS, {}), _complete)
    if control:  # every row carries the control's fields (NaN where it has none), for one CSV header
        rows = [{**r, **{f: r.get(f, float("nan")) for f in CONTROL_FIELDS}} for r in rows]
    return rows


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What :func:`summarize` computes every split's rows with."""

    reference: str
    breakdowns: tuple[str, ...]
    discrete: tuple[str, ...]
    edges: dict[str, np.ndarray]
    group_names: Mapping[str, Sequence[str]]
    position_groups: Mapping[str, PositionGroup]
    by_length: _Strata
    by_match: _Strata | None


def _edges(all_records: Sequence[Records], breakdowns: Sequence[str], discrete: Sequence[str],
           match: Sequence[str]) -> dict[str, np.ndarray]:
    """The bin edges of every binned column: the breakdowns', ``length``, and the matched columns'."""
    length_edges = nice_edges(max((_length(r).max() for r in all_records), default=1))
    edges = {
        col: nice_edges(max((r.meta[col].max() for r in all_records if col in r.meta), default=1))
        for col in breakdowns
        if col not in discrete and col != "length"
    }
    edges["length"] = length_edges
    for col in match:
        if col != "length" and col not in discrete and col not in edges:
            edges[col] = nice_edges(max((r.meta[col].max() for r in all_records if col in r.meta), default=1))
    return edges


def _split_rows(setup: _Setup, refs: tuple[_Reference | None, _Reference | None], base: dict[str, Any],
                rec: Records, sampler: Resampler, ref_down: Any = None) -> list[dict[str, Any]]:
    """One split's rows for one proxy: overall (with gaps), sparse, downstream (with their gaps to the
    reference's, ``ref_down``: its :func:`~illusions.analyses.sparse.downstream_replicates`), breakdowns,
    position groups."""
    split = base["split"]
    ref, ref_control = refs
    values = _matrix(rec)
    points, reps = sampler.grouped(values, rec.seq, np.zeros(len(rec), np.int64), 1)
    lo, hi = sampler.intervals(reps)
    gaps: dict[str, np.ndarray] = {}
    if ref is not None and split != setup.reference and len(rec):
        gaps = _both_gaps(setup, refs, points[0], reps[:, 0], rec, sampler, values, None)
    n_seqs = int(np.unique(rec.seq).shape[0])
    rows = _overall_rows({**base, "group_by": "all", "group": "all"}, points[0],
                         lo[0], hi[0], gaps, len(rec), n_seqs)
    if rec.sparse is not None:  # sparse dictionary proxies: reconstruction and latents
        for metric, (value, low, high) in sparse_estimates(rec.sparse, sampler).items():
            rows.append(_complete({**base, "group_by": "all", "group": "all",
                                   "metric": metric, "value": value, "ci_low": low, "ci_high": high,
                                   "n_positions": rec.sparse.n_positions(metric),
                                   "n_sequences": len(rec.sparse.n_tokens)}))
    if rec.downstream and len(rec):  # ... and their downstream loss against a zero ablation
        down = (ref_down if split == setup.reference and ref_down is not None
                else downstream_replicates(rec.downstream, rec.kl, rec.seq, sampler))
        gaps = downstream_gaps(down, ref_down, sampler) if ref_down is not None and split != setup.reference else {}
        for metric, (value, low, high) in downstream_estimates(down, sampler).items():
            gap = dict(zip(("gap_vs_ref", "gap_vs_ref_low", "gap_vs_ref_high"), gaps[metric], strict=True)
                       ) if gaps else {}
            rows.append(_complete({**base, "group_by": "all", "group": "all", "metric": metric,
                                   "value": value, "ci_low": low, "ci_high": high,
                                   "n_positions": len(rec), "n_sequences": n_seqs, **gap}))
    for col in setup.breakdowns:
        if not len(rec) or (col != "length" and col not in rec.meta):
            continue
        rows += _breakdown_rows(setup, base, col, rec, sampler, values)
    for name, group in setup.position_groups.items():
        if group.split != split or not len(rec):
            continue
        mask = group.mask(rec.meta)
        if mask is None or not mask.any():
            continue
        # The group's own estimates and gaps, computed as for the whole split on its positions.
        g_points, g_reps = sampler.grouped(values, rec.seq, mask.astype(np.int64), 2)
        g_lo, g_hi = sampler.intervals(g_reps[:, 1:])
        g_gaps: dict[str, np.ndarray] = {}
        if ref is not None and split != setup.reference:
            g_gaps = _both_gaps(setup, refs, g_points[1], g_reps[:, 1], rec, sampler, values, mask)
        rows += _overall_rows({**base, "group_by": POSITION_GROUP, "group": name},
                              g_points[1], g_lo[0], g_hi[0], g_gaps, int(mask.sum()),
                              int(np.unique(rec.seq[mask]).shape[0]))
    return rows


def _both_gaps(setup: _Setup, refs: tuple[_Reference | None, _Reference | None], points: np.ndarray,
               reps: np.ndarray, rec: Records, sampler: Resampler, values: np.ndarray,
               mask: np.ndarray | None) -> dict[str, Any]:
    """:func:`_gaps` to the length-matched reference, and to the ``match`` control when there is one,
    of the positions ``mask`` selects (all when None)."""
    ref, ref_control = refs
    keep = slice(None) if mask is None else mask
    gaps = _gaps(points, reps, ref, ref.ids(setup.by_length.codes(rec))[keep], sampler, values[keep],
                 rec.seq[keep])
    if ref_control is not None:
        gaps.update(_control(_gaps(points, reps, ref_control, ref_control.ids(setup.by_match.codes(rec))[keep],
                                   sampler, values[keep], rec.seq[keep])))
    return gaps


def _breakdown_rows(setup: _Setup, base: dict[str, Any], col: str, rec: Records, sampler: Resampler,
                    values: np.ndarray) -> list[dict[str, Any]]:
    """The estimate of every metric within each group (value or bin) of the meta column ``col``."""
    column = _length(rec) if col == "length" else rec.meta[col]
    if col in setup.discrete:
        groups, inverse = np.unique(column, return_inverse=True)
        names = setup.group_names.get(col)
        labels = [names[int(g)] if names is not None and 0 <= g < len(names) else str(int(g))
                  for g in groups]
    else:
        e = setup.edges[col]
        groups, inverse = np.unique(np.digitize(column, e[1:-1]), return_inverse=True)
        names = bin_labels(e)
        labels = [names[int(g)] for g in groups]
    g_points, g_reps = sampler.grouped(values, rec.seq, inverse, len(groups))
    g_lo, g_hi = sampler.intervals(g_reps)
    n_pos = np.bincount(inverse, minlength=len(groups))
    pairs = np.unique(inverse * sampler.n_seqs + rec.seq)
    n_seq = np.bincount(pairs // sampler.n_seqs, minlength=len(groups))
    rows = []
    for g, label in enumerate(labels):
        for k, metric in enumerate(METRICS):
            rows.append(_complete({
                **base, "group_by": col, "group": label, "metric": metric,
                "value": g_points[g, k], "ci_low": g_lo[g, k], "ci_high": g_hi[g, k],
                "n_positions": int(n_pos[g]), "n_sequences": int(n_seq[g]),
            }))
    return rows


def _control(gaps: Mapping[str, Any]) -> dict[str, Any]:
    """The matched-gap fields of :func:`_gaps` renamed as the ``match`` control's (:data:`CONTROL_FIELDS`)."""
    names = {"gap_vs_matched": "gap_vs_control", "gap_vs_matched_low": "gap_vs_control_low",
             "gap_vs_matched_high": "gap_vs_control_high", "matched_coverage": "control_coverage"}
    return {names[k]: v for k, v in gaps.items() if k in names}


def _overall_rows(base: dict[str, Any], points: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  gaps: Mapping[str, Any], n_positions: int, n_sequences: int) -> list[dict[str, Any]]:
    """One row per metric of a whole split (or a position group): estimate, interval, gaps."""
    out = []
    for k, metric in enumerate(METRICS):
        row = {**base, "metric": metric, "value": points[k], "ci_low": lo[k], "ci_high": hi[k],
               "n_positions": n_positions, "n_sequences": n_sequences}
        out.append(_complete({**row, **{name: float(v[k]) if np.ndim(v) else v for name, v in gaps.items()}}))
    return out


def _matrix(rec: Records) -> np.ndarray:
    """``[n, len(METRICS)]`` per-position values in METRICS order."""
    per = rec.per_position()
    return np.stack([per[m] for m in METRICS], axis=1) if len(rec) else np.zeros((0, len(METRICS)))


def check_meta_columns(columns: Sequence[str], have: Sequence[set[str]], doing: str) -> None:
    """Refuse a column of ``columns`` (``length`` aside: every position has one) that the meta columns of
    some split's scored positions (``have``, one set per split) lack, saying what the positions have:
    ``cannot {doing} 'x': the scored positions have no such meta column (they have ...)``."""
    from illusions.errors import IllusionsError

    for col in columns:
        if col != "length" and any(col not in h for h in have):
            known = sorted(set().union(*have)) if have else []
            raise IllusionsError(f"cannot {doing} {col!r}: the scored positions have no such meta column "
                                 f"(they have {', '.join(known) or 'none'})")


class _Strata:
    """Codes positions by the bins of the matched columns: one integer per column and position
    (discrete columns by value, ``length`` and the other columns by the bin of ``edges`` they fall in)."""

    def __init__(self, columns: Sequence[str], discrete: Sequence[str], edges: Mapping[str, np.ndarray]) -> None:
        self.columns = tuple(columns)
        self.discrete = tuple(discrete)
        self.edges = edges

    def check(self, records: Sequence[Records]) -> None:
        check_meta_columns(self.columns, [set(r.meta) for r in records], "match on")

    def codes(self, rec: Records) -> np.ndarray:
        """``[n, n_columns]`` int64 codes of the positions' strata."""
        out = []
        for col in self.columns:
            column = _length(rec) if col == "length" else rec.meta[col]
            if col in self.discrete and col != "length":
                out.append(np.asarray(column, dtype=np.int64))
            else:
                out.append(np.digitize(column, self.edges[col][1:-1]).astype(np.int64))
        return np.stack(out, axis=1) if out else np.zeros((len(rec), 0), np.int64)


@dataclasses.dataclass(frozen=True)
class _Reference:
    points: np.ndarray  # [m] overall
    reps: np.ndarray  # [n_boot, m]
    keys: np.ndarray  # [n_strata, n_columns] the codes of the strata the reference has positions in (sorted)
    strata_points: np.ndarray  # [n_strata, m]
    strata_reps: np.ndarray  # [n_boot, n_strata, m]
    n_seqs: int  # sequences with a position: below MIN_INTERVAL_SEQS no gap to it has an interval

    def ids(self, codes: np.ndarray) -> np.ndarray:
        """``[n]`` each position's stratum among :attr:`keys` (-1 where the reference has none)."""
        n_ref = len(self.keys)
        both = np.concatenate([self.keys, codes])
        _, inverse = np.unique(both, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        where = np.full(len(both), -1, np.int64)
        where[inverse[:n_ref]] = np.arange(n_ref)
        return where[inverse[n_ref:]]


def _reference(rec: Records | None, sampler: Resampler | None, strata: _Strata) -> _Reference | None:
    if rec is None or sampler is None or not len(rec):
        return None
    values = _matrix(rec)
    points, reps = sampler.grouped(values, rec.seq, np.zeros(len(rec), np.int64), 1)
    keys, ids = np.unique(strata.codes(rec), axis=0, return_inverse=True)
    ids = np.asarray(ids).reshape(-1)
    s_points, s_reps = sampler.grouped(values, rec.seq, ids, len(keys))
    return _Reference(points[0], reps[:, 0], keys, s_points, s_reps, int(np.unique(rec.seq).shape[0]))


def _gaps(
    points: np.ndarray, reps: np.ndarray, ref: _Reference, ids: np.ndarray,
    sampler: Resampler, values: np.ndarray, seq: np.ndarray,
) -> dict[str, Any]:
    """Gap columns of one split vs the reference and vs the matched reference control.

    ``ids`` are the positions' strata among the reference's (-1: a stratum the reference lacks). The
    matched gap compares like with like: those positions are excluded from the split's side as they
    are from the control's.
    """
    gap_lo, gap_hi = _gap_interval(sampler, reps - ref.reps, ref)
    covered = ids >= 0  # [n] the position's stratum occurs in the reference
    weight = np.bincount(ids[covered], minlength=len(ref.keys)).astype(np.float64)
    weight /= float(len(ids))
    coverage = float(weight.sum())
    out: dict[str, Any] = {"gap_vs_ref": snap_rounding(points - ref.points), "gap_vs_ref_low": gap_lo,
                           "gap_vs_ref_high": gap_hi, "matched_coverage": coverage}
    if coverage == 0:
        return out
    if covered.all():
        own_points, own_reps = points, reps
    else:
        g_points, g_reps = sampler.grouped(values, seq, covered.astype(np.int64), 2)
        own_points, own_reps = g_points[1], g_reps[:, 1]  # [m], [n_boot, m]: covered positions only
    weight /= coverage
    used = np.flatnonzero(weight)
    control = (weight[used, None] * ref.strata_points[used]).sum(0)  # [m]
    control_reps = (weight[None, used, None] * ref.strata_reps[:, used]).sum(1)  # [n_boot, m]
    m_lo, m_hi = _gap_interval(sampler, own_reps - control_reps, ref)
    out.update(gap_vs_matched=snap_rounding(own_points - control), gap_vs_matched_low=m_lo, gap_vs_matched_high=m_hi)
    return out


def _gap_interval(sampler: Resampler, reps: np.ndarray, ref: _Reference) -> tuple[np.ndarray, np.ndarray]:
    """The interval of a gap's replicates, differences within float rounding of 0 counted as 0 (equal
    estimates); NaN when the reference has fewer than MIN_INTERVAL_SEQS sequences (the split's own
    count is checked on its row, :func:`_no_interval`)."""
    lo, hi = sampler.intervals(reps)
    if ref.n_seqs < MIN_INTERVAL_SEQS:
        return np.full_like(lo, np.nan), np.full_like(hi, np.nan)
    return snap_rounding(lo), snap_rounding(hi)


def _complete(row: dict[str, Any]) -> dict[str, Any]:
    """Every field present (NaN / "" where not applicable), then the matched control's fields the row
    has (overall rows with a ``match`` control), numpy scalars as plain Python values, and no interval
    from fewer than :data:`~illusions.metrics.MIN_INTERVAL_SEQS` sequences (:func:`_no_interval`)."""
    row = _no_interval(row)
    out = {}
    for field in ROW_FIELDS:
        value = row.get(field, float("nan") if field not in ("param", "param_value") else "")
        out[field] = value.item() if isinstance(value, np.generic) else value
    for field in CONTROL_FIELDS:
        if field in row:
            value = row[field]
            out[field] = value.item() if isinstance(value, np.generic) else value
    return out


def _no_interval(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its interval bounds (``ci_low``, ``ci_high``, every gap's ``_low``/``_high``) NaN when
    its positions come from fewer than :data:`~illusions.metrics.MIN_INTERVAL_SEQS` sequences: resampling
    one sequence always gives it back, so its zero-width interval says nothing (and would mark its gaps
    significant)."""
    n = row.get("n_sequences")
    if n is None or not n < MIN_INTERVAL_SEQS:
        return row
    return {k: float("nan") if k.endswith(("_low", "_high")) else v for k, v in row.items()}


def overall(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Only the overall rows (no breakdowns)."""
    return [r for r in rows if r["group_by"] == "all"]


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and np.isfinite(x) else None


def excluded_share(row: Mapping[str, Any]) -> float | None:
    """The share of a split's positions the length-matched gap leaves out (length bins ``iid``
    lacks), from a row's ``matched_coverage``; None where there is no matched gap."""
    coverage = _num(row.get("matched_coverage"))
    return None if coverage is None else max(0.0, round(1.0 - coverage, 10))


def to_json(
    rows: Sequence[dict[str, Any]],
    *,
    task: str,
    model: str,
    proxies: Sequence[dict[str, Any]],
    match: Sequence[str] = DEFAULT_MATCH,
) -> dict[str, Any]:
    """The JSON document printed by ``--json`` and written to ``metrics.json``.

    ``{"task", "simplifier", "params", "model", "splits": {SPLIT: {"n_positions", METRIC:
    {"value", "ci"}}}, ...}`` for the first proxy, with every proxy (for sweeps) under ``"proxies"``
    in the same shape, and gaps and breakdowns beside the metrics. A task's named position groups,
    when it has any, are under ``"groups"``: ``{"SPLIT (NAME)": {"split", "group", ...}}`` in the shape
    of a split's entry. With a ``match`` other than ``length`` alone, each gap also has
    ``"vs_matched_iid": {"on": [COLUMN, ...], "value", "ci", "coverage", "excluded_share"}``.
    A proxy's warning signals, when it has any, are under ``"warnings"``:
    ``{SPLIT or "overall": {SIGNAL: {METRIC: {"value", "ci", "n_positions"}}}}``.
    """
    docs = [_proxy_doc([r for r in rows if r["proxy"] == proxy["label"]], proxy, match) for proxy in proxies]
    first = docs[0]
    out = {"task": task, "simplifier": first["simplifier"], "params": first["params"], "model": model,
           "splits": first["splits"], "breakdowns": first["breakdowns"]}
    if "groups" in first:
        out["groups"] = first["groups"]
    if "warnings" in first:
        out["warnings"] = first["warnings"]
    return {**out, "proxies": docs}


def _proxy_doc(mine: Sequence[dict[str, Any]], proxy: dict[str, Any], match: Sequence[str]) -> dict[str, Any]:
    """One proxy's entry of :func:`to_json` from its rows ``mine``."""
    splits: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for r in mine:
        if r["group_by"] not in ("all", POSITION_GROUP):
            continue
        head = {"n_positions": int(r["n_positions"]), "n_sequences": int(r["n_sequences"]), "gaps": {}}
        if r["group_by"] == "all":
            entry = splits.setdefault(r["split"], head)
        else:
            entry = groups.setdefault(group_label(r["split"], r["group"]),
                                      {"split": r["split"], "group": r["group"], **head})
        entry[r["metric"]] = {"value": _num(r["value"]), "ci": [_num(r["ci_low"]), _num(r["ci_high"])]}
        if _num(r["gap_vs_ref"]) is not None:
            entry["gaps"][r["metric"]] = _gap_entry(r, match)
    breakdowns: dict[str, Any] = {}
    warnings: dict[str, Any] = {}
    for r in mine:
        if r["group_by"] == WARNING_GROUP:
            cell = warnings.setdefault(r["split"], {}).setdefault(r["group"], {})
            cell[r["metric"]] = {"value": _num(r["value"]), "ci": [_num(r["ci_low"]), _num(r["ci_high"])],
                                 "n_positions": int(r["n_positions"])}
            continue
        if r["group_by"] in ("all", POSITION_GROUP):
            continue
        cell = breakdowns.setdefault(r["split"], {}).setdefault(r["group_by"], {}).setdefault(
            r["group"], {"n_positions": int(r["n_positions"])})
        cell[r["metric"]] = {"value": _num(r["value"]), "ci": [_num(r["ci_low"]), _num(r["ci_high"])]}
    doc = {"simplifier": proxy["simplifier"], "label": proxy["label"], "params": proxy["params"],
           "splits": splits, "breakdowns": breakdowns}
    if groups:
        doc["groups"] = groups
    if warnings:
        doc["warnings"] = warnings
    return doc


def _gap_entry(r: Mapping[str, Any], match: Sequence[str]) -> dict[str, Any]:
    """A metric's gaps in :func:`to_json`: to iid, to length-matched iid, and to the ``match`` control."""
    gap = {
        "vs_iid": {"value": _num(r["gap_vs_ref"]),
                   "ci": [_num(r["gap_vs_ref_low"]), _num(r["gap_vs_ref_high"])]},
        "vs_length_matched_iid": {
            "value": _num(r["gap_vs_matched"]),
            "ci": [_num(r["gap_vs_matched_low"]), _num(r["gap_vs_matched_high"])],
            "coverage": _num(r["matched_coverage"]),
            "excluded_share": excluded_share(r),
        },
    }
    if "control_coverage" in r:
        coverage = _num(r["control_coverage"])
        gap["vs_matched_iid"] = {
            "on": list(match), "value": _num(r["gap_vs_control"]),
            "ci": [_num(r["gap_vs_control_low"]), _num(r["gap_vs_control_high"])],
            "coverage": coverage,
            "excluded_share": None if coverage is None else max(0.0, round(1.0 - coverage, 10)),
        }
    return gap


def group_label(split: str, group: str) -> str:
    """How tables name a position group: ``unseen_depth (opener > 10)``."""
    return f"{split} ({group})"
