"""Turn per-position records into estimates with intervals: one tidy row per split x proxy x metric.

Each split gets one set of bootstrap replicate weights over its evaluated sequences (seeded by the
analysis seed and the split's name), shared by all proxies and metrics, so proxies are compared on
the same resamples. Gaps relative to the reference split (``iid``) are differences of independent
replicates. Because the splits differ in length as well as in what they are named for, every gap is
also reported against a *length-matched control*: the reference split's positions re-weighted so that
each length bin carries the same share of positions as in the split under study (strata absent from
the reference are dropped, and the share of the split's positions they hold is reported as
``matched_coverage``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from illusions.analyses.faithfulness import METRICS, AnalysisResult, Records
from illusions.metrics import Estimate, Resampler, difference

BREAKDOWNS = ("key_depth", "depth", "distance", "length")
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
) -> list[dict[str, Any]]:
    """Tidy rows: the overall estimate of each metric per split and proxy, then the breakdowns.

    Overall rows (``group_by == "all"``) carry the gap to ``reference`` and to the length-matched
    control; breakdown rows carry the estimate within each group of one meta column.
    """
    splits = list(result.split_rows)
    samplers = {s: _resampler(s, len(result.split_rows[s]), seed, n_boot, level) for s in splits}
    all_records = list(result.records.values())
    length_edges = nice_edges(max((_length(r).max() for r in all_records if len(r)), default=1))
    edges = {
        col: nice_edges(max((r.meta[col].max() for r in all_records if len(r) and col in r.meta), default=1))
        for col in breakdowns
        if col not in DISCRETE
    }
    rows: list[dict[str, Any]] = []
    for j, proxy in enumerate(result.proxies):
        param, param_value = _main_param(proxy.params)
        base = {"proxy": result.labels[j], "simplifier": proxy.simplifier, "param": param,
                "param_value": param_value}
        ref_rec = result.records.get((reference, j))
        for split in splits:
            rec = result.records[(split, j)]
            sampler = samplers[split]
            values = rec.per_position()
            strata = np.digitize(_length(rec), length_edges[1:-1]) if len(rec) else np.zeros(0, np.int64)
            for metric in METRICS:
                point_reps = sampler.replicates(values[metric], rec.seq)
                lo, hi = sampler.interval(point_reps[1])
                row = {**base, "split": split, "group_by": "all", "group": "all", "metric": metric,
                       "value": point_reps[0], "ci_low": lo, "ci_high": hi, "n_positions": len(rec),
                       "n_sequences": int(np.unique(rec.seq).shape[0])}
                if ref_rec is not None and split != reference and len(rec) and len(ref_rec):
                    ref_sampler = samplers[reference]
                    ref_values = ref_rec.per_position()[metric]
                    gap = difference(point_reps, ref_sampler.replicates(ref_values, ref_rec.seq), level)
                    row.update(gap_vs_ref=gap.value, gap_vs_ref_low=gap.low, gap_vs_ref_high=gap.high)
                    n_strata = len(length_edges) - 1
                    share = np.bincount(strata, minlength=n_strata).astype(np.float64)
                    share /= share.sum()
                    ref_strata = np.digitize(_length(ref_rec), length_edges[1:-1])
                    covered = np.bincount(ref_strata, minlength=n_strata) > 0
                    control = ref_sampler.stratified(ref_values, ref_rec.seq, ref_strata, share)
                    matched = difference(point_reps, control, level)
                    row.update(gap_vs_matched=matched.value, gap_vs_matched_low=matched.low,
                               gap_vs_matched_high=matched.high,
                               matched_coverage=float(share[covered].sum()))
                rows.append(_complete(row))
            for col in breakdowns:
                if col not in rec.meta and not (col == "length" and len(rec)):
                    continue
                column = _length(rec) if col == "length" else rec.meta[col]
                if col in DISCRETE:
                    groups = np.unique(column)
                    keys, labels = column, [str(int(g)) for g in groups]
                else:
                    e = length_edges if col == "length" else edges[col]
                    keys = np.digitize(column, e[1:-1])
                    groups = np.unique(keys)
                    names = bin_labels(e)
                    labels = [names[int(g)] for g in groups]
                for g, label in zip(groups, labels, strict=True):
                    keep = keys == g
                    for metric in METRICS:
                        est = sampler.estimate(values[metric][keep], rec.seq[keep])
                        rows.append(_complete({**base, "split": split, "group_by": col, "group": label,
                                               "metric": metric, **_est(est)}))
    return rows


def _main_param(params: dict[str, Any]) -> tuple[str, Any]:
    for key in ("rank", "k"):
        if key in params:
            return key, params[key]
    return "", ""


def _est(est: Estimate) -> dict[str, Any]:
    return {"value": est.value, "ci_low": est.low, "ci_high": est.high, "n_positions": est.n,
            "n_sequences": est.n_seqs}


def _complete(row: dict[str, Any]) -> dict[str, Any]:
    return {field: row.get(field, float("nan") if field not in ("param", "param_value") else "")
            for field in ROW_FIELDS}


def overall(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Only the overall rows (no breakdowns)."""
    return [r for r in rows if r["group_by"] == "all"]


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and np.isfinite(x) else None


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
    in the same shape, and gaps and breakdowns beside the metrics.
    """
    docs = []
    for proxy in proxies:
        label = proxy["label"]
        mine = [r for r in rows if r["proxy"] == label]
        splits: dict[str, Any] = {}
        for r in mine:
            if r["group_by"] != "all":
                continue
            entry = splits.setdefault(r["split"], {"n_positions": int(r["n_positions"]),
                                                   "n_sequences": int(r["n_sequences"]), "gaps": {}})
            entry[r["metric"]] = {"value": _num(r["value"]), "ci": [_num(r["ci_low"]), _num(r["ci_high"])]}
            if _num(r["gap_vs_ref"]) is not None:
                entry["gaps"][r["metric"]] = {
                    "vs_iid": {"value": _num(r["gap_vs_ref"]),
                               "ci": [_num(r["gap_vs_ref_low"]), _num(r["gap_vs_ref_high"])]},
                    "vs_length_matched_iid": {
                        "value": _num(r["gap_vs_matched"]),
                        "ci": [_num(r["gap_vs_matched_low"]), _num(r["gap_vs_matched_high"])],
                        "coverage": _num(r["matched_coverage"]),
                    },
                }
        breakdowns: dict[str, Any] = {}
        for r in mine:
            if r["group_by"] == "all":
                continue
            cell = breakdowns.setdefault(r["split"], {}).setdefault(r["group_by"], {}).setdefault(
                r["group"], {"n_positions": int(r["n_positions"])})
            cell[r["metric"]] = {"value": _num(r["value"]), "ci": [_num(r["ci_low"]), _num(r["ci_high"])]}
        docs.append({"simplifier": proxy["simplifier"], "label": label, "params": proxy["params"],
                     "splits": splits, "breakdowns": breakdowns})
    first = docs[0]
    return {"task": task, "simplifier": first["simplifier"], "params": first["params"], "model": model,
            "splits": first["splits"], "breakdowns": first["breakdowns"], "proxies": docs}
