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
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from illusions.analyses.faithfulness import METRICS, AnalysisResult, Records, sweep_param
from illusions.analyses.sparse import estimates as sparse_estimates
from illusions.analyses.spec import BREAKDOWNS
from illusions.analyses.warning_signals import THRESHOLDS, WARNING_GROUP, warning_rows
from illusions.metrics import Resampler
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
    return rec.meta["length"] if "length" in rec.meta else rec.meta["seq_len"]


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
    """
    group_names = group_names or {}
    position_groups = position_groups or {}
    splits = list(result.split_rows)
    samplers = {s: _resampler(s, len(result.split_rows[s]), seed, n_boot, level) for s in splits}
    all_records = [r for r in result.records.values() if len(r)]
    length_edges = nice_edges(max((_length(r).max() for r in all_records), default=1))
    n_strata = len(length_edges) - 1
    edges = {
        col: nice_edges(max((r.meta[col].max() for r in all_records if col in r.meta), default=1))
        for col in breakdowns
        if col not in discrete and col != "length"
    }
    edges["length"] = length_edges
    rows: list[dict[str, Any]] = []
    for j, proxy in enumerate(result.proxies):
        param, param_value = sweep_param(proxy)
        base = {"proxy": result.labels[j], "simplifier": proxy.simplifier, "param": param,
                "param_value": param_value}
        ref = _reference(result.records.get((reference, j)), samplers.get(reference), length_edges)
        for split in splits:
            rec = result.records[(split, j)]
            sampler = samplers[split]
            values = _matrix(rec)
            points, reps = sampler.grouped(values, rec.seq, np.zeros(len(rec), np.int64), 1)
            lo, hi = sampler.intervals(reps)
            gaps: dict[str, np.ndarray] = {}
            if ref is not None and split != reference and len(rec):
                gaps = _gaps(points[0], reps[:, 0], ref, _strata(rec, length_edges), n_strata, sampler,
                             values, rec.seq)
            n_seqs = int(np.unique(rec.seq).shape[0])
            rows += _overall_rows({**base, "split": split, "group_by": "all", "group": "all"}, points[0],
                                  lo[0], hi[0], gaps, len(rec), n_seqs)
            if rec.sparse is not None:  # sparse dictionary proxies: reconstruction and latents
                n_tokens = int(rec.sparse.n_tokens.sum())
                for metric, (value, low, high) in sparse_estimates(rec.sparse, sampler).items():
                    rows.append(_complete({**base, "split": split, "group_by": "all", "group": "all",
                                           "metric": metric, "value": value, "ci_low": low, "ci_high": high,
                                           "n_positions": n_tokens, "n_sequences": len(rec.sparse.n_tokens)}))
            for col in breakdowns:
                if not len(rec) or (col != "length" and col not in rec.meta):
                    continue
                column = _length(rec) if col == "length" else rec.meta[col]
                if col in discrete:
                    groups, inverse = np.unique(column, return_inverse=True)
                    names = group_names.get(col)
                    labels = [names[int(g)] if names is not None and 0 <= g < len(names) else str(int(g))
                              for g in groups]
                else:
                    e = edges[col]
                    groups, inverse = np.unique(np.digitize(column, e[1:-1]), return_inverse=True)
                    names = bin_labels(e)
                    labels = [names[int(g)] for g in groups]
                g_points, g_reps = sampler.grouped(values, rec.seq, inverse, len(groups))
                g_lo, g_hi = sampler.intervals(g_reps)
                n_pos = np.bincount(inverse, minlength=len(groups))
                pairs = np.unique(inverse * sampler.n_seqs + rec.seq)
                n_seq = np.bincount(pairs // sampler.n_seqs, minlength=len(groups))
                for g, label in enumerate(labels):
                    for k, metric in enumerate(METRICS):
                        rows.append(_complete({
                            **base, "split": split, "group_by": col, "group": label, "metric": metric,
                            "value": g_points[g, k], "ci_low": g_lo[g, k], "ci_high": g_hi[g, k],
                            "n_positions": int(n_pos[g]), "n_sequences": int(n_seq[g]),
                        }))
            for name, group in position_groups.items():
                if group.split != split or not len(rec):
                    continue
                mask = group.mask(rec.meta)
                if mask is None or not mask.any():
                    continue
                # The group's own estimates and gaps, computed as for the whole split on its positions.
                g_points, g_reps = sampler.grouped(values, rec.seq, mask.astype(np.int64), 2)
                g_lo, g_hi = sampler.intervals(g_reps[:, 1:])
                g_gaps: dict[str, np.ndarray] = {}
                if ref is not None and split != reference:
                    g_gaps = _gaps(g_points[1], g_reps[:, 1], ref, _strata(rec, length_edges)[mask], n_strata,
                                   sampler, values[mask], rec.seq[mask])
                rows += _overall_rows({**base, "split": split, "group_by": POSITION_GROUP, "group": name},
                                      g_points[1], g_lo[0], g_hi[0], g_gaps, int(mask.sum()),
                                      int(np.unique(rec.seq[mask]).shape[0]))
        # Unsupervised warning signals: how well each ranks the proxy's disagreements, per split and pooled.
        rows += warning_rows(base, {s: result.records[(s, j)] for s in splits}, samplers,
                             getattr(proxy, "info", {}).get(THRESHOLDS, {}), _complete)
    return rows


def _overall_rows(base: dict[str, Any], points: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  gaps: Mapping[str, Any], n_positions: int, n_sequences: int) -> list[dict[str, Any]]:
    """One row per metric of a whole split (or a position group): estimate, interval, gaps."""
    out = []
    for k, metric in enumerate(METRICS):
        row = {**base, "metric": metric, "value": points[k], "ci_low": lo[k], "ci_high": hi[k],
               "n_positions": n_positions, "n_sequences": n_sequences}
        row.update({name: float(v[k]) if np.ndim(v) else v for name, v in gaps.items()})
        out.append(_complete(row))
    return out


def _matrix(rec: Records) -> np.ndarray:
    """``[n, len(METRICS)]`` per-position values in METRICS order."""
    per = rec.per_position()
    return np.stack([per[m] for m in METRICS], axis=1) if len(rec) else np.zeros((0, len(METRICS)))


def _strata(rec: Records, length_edges: np.ndarray) -> np.ndarray:
    return np.digitize(_length(rec), length_edges[1:-1])


@dataclasses.dataclass(frozen=True)
class _Reference:
    points: np.ndarray  # [m] overall
    reps: np.ndarray  # [n_boot, m]
    strata_points: np.ndarray  # [n_strata, m]
    strata_reps: np.ndarray  # [n_boot, n_strata, m]
    present: np.ndarray  # [n_strata] bool: the reference has positions in this length bin


def _reference(rec: Records | None, sampler: Resampler | None, length_edges: np.ndarray) -> _Reference | None:
    if rec is None or sampler is None or not len(rec):
        return None
    values = _matrix(rec)
    points, reps = sampler.grouped(values, rec.seq, np.zeros(len(rec), np.int64), 1)
    strata = _strata(rec, length_edges)
    n_strata = len(length_edges) - 1
    s_points, s_reps = sampler.grouped(values, rec.seq, strata, n_strata)
    present = np.bincount(strata, minlength=n_strata) > 0
    return _Reference(points[0], reps[:, 0], s_points, s_reps, present)


def _gaps(
    points: np.ndarray, reps: np.ndarray, ref: _Reference, strata: np.ndarray, n_strata: int,
    sampler: Resampler, values: np.ndarray, seq: np.ndarray,
) -> dict[str, Any]:
    """Gap columns of one split vs the reference and vs the length-matched reference control.

    The matched gap compares like with like: the split's positions in length bins the reference
    lacks are excluded from the split's side as they are from the control's.
    """
    gap_lo, gap_hi = sampler.intervals(reps - ref.reps)
    share = np.bincount(strata, minlength=n_strata).astype(np.float64)
    share /= share.sum()
    weight = np.where(ref.present, share, 0.0)
    coverage = float(weight.sum())
    out: dict[str, Any] = {"gap_vs_ref": points - ref.points, "gap_vs_ref_low": gap_lo,
                           "gap_vs_ref_high": gap_hi, "matched_coverage": coverage}
    if coverage == 0:
        return out
    covered = ref.present[strata]  # [n] the position's length bin occurs in the reference
    if covered.all():
        own_points, own_reps = points, reps
    else:
        g_points, g_reps = sampler.grouped(values, seq, covered.astype(np.int64), 2)
        own_points, own_reps = g_points[1], g_reps[:, 1]  # [m], [n_boot, m]: covered positions only
    weight /= coverage
    used = np.flatnonzero(weight)
    control = (weight[used, None] * ref.strata_points[used]).sum(0)  # [m]
    control_reps = (weight[None, used, None] * ref.strata_reps[:, used]).sum(1)  # [n_boot, m]
    m_lo, m_hi = sampler.intervals(own_reps - control_reps)
    out.update(gap_vs_matched=own_points - control, gap_vs_matched_low=m_lo, gap_vs_matched_high=m_hi)
    return out


def _complete(row: dict[str, Any]) -> dict[str, Any]:
    """Every field present (NaN / "" where not applicable), numpy scalars as plain Python values."""
    out = {}
    for field in ROW_FIELDS:
        value = row.get(field, float("nan") if field not in ("param", "param_value") else "")
        out[field] = value.item() if isinstance(value, np.generic) else value
    return out


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
) -> dict[str, Any]:
    """The JSON document printed by ``--json`` and written to ``metrics.json``.

    ``{"task", "simplifier", "params", "model", "splits": {SPLIT: {"n_positions", METRIC:
    {"value", "ci"}}}, ...}`` for the first proxy, with every proxy (for sweeps) under ``"proxies"``
    in the same shape, and gaps and breakdowns beside the metrics. A task's named position groups,
    when it has any, are under ``"groups"``: ``{"SPLIT (NAME)": {"split", "group", ...}}`` in the shape
    of a split's entry. A proxy's warning signals, when it has any, are under ``"warnings"``:
    ``{SPLIT or "overall": {SIGNAL: {METRIC: {"value", "ci", "n_positions"}}}}``.
    """
    docs = []
    for proxy in proxies:
        label = proxy["label"]
        mine = [r for r in rows if r["proxy"] == label]
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
                entry["gaps"][r["metric"]] = {
                    "vs_iid": {"value": _num(r["gap_vs_ref"]),
                               "ci": [_num(r["gap_vs_ref_low"]), _num(r["gap_vs_ref_high"])]},
                    "vs_length_matched_iid": {
                        "value": _num(r["gap_vs_matched"]),
                        "ci": [_num(r["gap_vs_matched_low"]), _num(r["gap_vs_matched_high"])],
                        "coverage": _num(r["matched_coverage"]),
                        "excluded_share": excluded_share(r),
                    },
                }
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
        doc = {"simplifier": proxy["simplifier"], "label": label, "params": proxy["params"],
               "splits": splits, "breakdowns": breakdowns}
        if groups:
            doc["groups"] = groups
        if warnings:
            doc["warnings"] = warnings
        docs.append(doc)
    first = docs[0]
    out = {"task": task, "simplifier": first["simplifier"], "params": first["params"], "model": model,
           "splits": first["splits"], "breakdowns": first["breakdowns"]}
    if "groups" in first:
        out["groups"] = first["groups"]
    if "warnings" in first:
        out["warnings"] = first["warnings"]
    return {**out, "proxies": docs}


def group_label(split: str, group: str) -> str:
    """How tables name a position group: ``unseen_depth (opener > 10)``."""
    return f"{split} ({group})"
