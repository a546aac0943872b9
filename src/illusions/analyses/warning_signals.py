"""Unsupervised warning signals: can the activations alone say where a proxy will stop holding?

Each fitted hook declares its signals (:meth:`illusions.simplifiers.base.FittedHook.signal_sites`,
the maths in each hook's docstring): for low-rank proxies the share of the activation outside the
kept subspace, for k-means the distance to the nearest centroid relative to its cluster's spread,
for sparse dictionaries the reconstruction error and the activation of latents never active on the
fitting data, for one-hot attention the mass outside the argmax. A signal needs no label and no
comparison with the original model: it reads the activation the proxy's hook is about to replace.

Three steps, each one call:

- :class:`SignalCollector` adds capture hooks in front of a proxy's hooks, so the evaluation pass
  (:func:`illusions.analyses.faithfulness.evaluate_split`) records every signal at the scored
  positions while it runs the proxy: no second forward pass. A signal read at several hook points
  (several layers) keeps the largest value per position.
- :func:`calibrate` runs the proxies over the fitting sequences once, right after the fit, and records
  each signal's training ``QUANTILE`` (99th percentile over the scored positions) in
  ``proxy.info["warning_thresholds"]``: the threshold is fixed on the fitting data, never on a split
  under study.
- :func:`warning_rows` turns a split's records into the metrics of the table
  (:data:`illusions.metric_table.WARNING_METRICS`), per signal, under ``group_by = "warning_signal"``
  and ``group`` the signal's name, per split and pooled over all evaluated splits (``split =
  "overall"``):

    warning_auroc              P(s_i > s_j) + 1/2 P(s_i = s_j) for i a position where the proxy's
                               prediction differs from the model's and j one where it agrees (the
                               area under the ROC curve of the signal as a detector of disagreement;
                               0.5 is chance, 1 a perfect ranking); NaN when either class is empty
    warning_flagged_agreement  agreement among the positions whose signal exceeds the threshold
    warning_flagged_share      the share of positions flagged

Intervals are the cluster bootstrap over sequences every other metric uses (the same replicate
weights, :class:`illusions.metrics.Resampler`): a replicate's AUROC weighs each position by its
sequence's draw count. The pooled rows draw each split's sequences with that split's weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from illusions.metric_table import WARNING_METRICS
from illusions.metrics import Resampler

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from illusions.simplifiers.base import Proxy
    from illusions.tasks.base import Split

QUANTILE = 0.99
"""The training quantile of a signal above which a position is flagged."""
WARNING_GROUP = "warning_signal"
"""``group_by`` of the warning rows; their ``group`` is the signal's name."""
POOLED = "overall"
"""``split`` of the rows pooled over every evaluated split."""
THRESHOLDS = "warning_thresholds"
"""The key of ``proxy.info`` that holds each signal's threshold."""
_REPLICATE_CHUNK = 100  # bootstrap replicates per pass when computing AUROC replicates


class SignalCollector:
    """Records a proxy's warning signals during one forward pass.

    Put :attr:`hooks` *before* the proxy's own hooks (TransformerLens runs a hook point's hooks in
    the order given), so each signal reads the activation the proxy is about to replace.
    """

    def __init__(self, proxy: Proxy) -> None:
        # A proxy or hook made outside this package may declare no signals (no ``signal_sites``).
        self.sites = [site for hook in getattr(proxy, "hooks", ())
                      for site in (hook.signal_sites() if hasattr(hook, "signal_sites") else [])]
        self.values: dict[str, Any] = {}

    @property
    def hooks(self) -> list[tuple[str, Callable[..., Any]]]:
        return [(name, self._capture(fn)) for name, fn in self.sites]

    def _capture(self, fn: Callable[[Any], dict[str, Any]]) -> Callable[..., Any]:
        def hook(activation: Any, hook: Any = None) -> Any:
            for name, value in fn(activation).items():  # each [batch, pos]
                value = value.detach()
                old = self.values.get(name)
                self.values[name] = value if old is None else old.maximum(value)
            return activation

        return hook

    def gather(self, seq: Any, pos: Any) -> dict[str, np.ndarray]:
        """Every signal at the scored ``(seq, pos)`` pairs of the batch just run, as float64 arrays;
        the collector is then empty for the next batch."""
        out = {name: value[seq, pos].double().cpu().numpy() for name, value in self.values.items()}
        self.values = {}
        return out


def calibrate(
    model: HookedTransformer,
    split: Split,
    rows: np.ndarray,
    proxies: Sequence[Proxy],
    *,
    batch_size: int = 64,
    quantile: float = QUANTILE,
    max_tokens: int | None = None,
) -> list[Proxy]:
    """The proxies with each signal's ``quantile`` over the scored positions of ``rows`` (the fitting
    sequences) in ``info["warning_thresholds"]``; proxies without signals are returned unchanged.
    Batches hold at most ``batch_size`` rows and ``max_tokens`` padded tokens."""
    import torch

    from illusions.activations import stop_layer
    from illusions.backends import stop_at
    from illusions.scoring import iter_batches
    from illusions.simplifiers.base import causal

    device = torch.device(model.cfg.device)
    out = []
    for proxy in proxies:
        collector = SignalCollector(proxy)
        if not collector.sites:
            out.append(proxy)
            continue
        hooks = collector.hooks + list(proxy.fwd_hooks)
        # The signals are read at the proxy's hooks: the pass ends after the deepest block they are in
        # (no logits; a hook after the blocks runs the whole model).
        stop = stop_layer(model, [name for name, _ in hooks])
        until = stop_at(stop)
        seen: dict[str, list[np.ndarray]] = {}
        with torch.inference_mode():
            for batch in iter_batches(split, batch_size, rows=rows, max_tokens=max_tokens,
                                      scored_only=causal(proxy)):  # signals are read at scored positions
                if len(batch.scored) == 0:
                    continue
                tokens = torch.as_tensor(batch.tokens, device=device)
                model.run_with_hooks(tokens, fwd_hooks=hooks, **until)
                sc = batch.scored
                got = collector.gather(torch.as_tensor(sc.seq, device=device), torch.as_tensor(sc.pos, device=device))
                for name, value in got.items():
                    seen.setdefault(name, []).append(value)
        thresholds = {name: float(np.quantile(np.concatenate(v), quantile)) for name, v in sorted(seen.items())}
        out.append(dataclasses.replace(proxy, info={**getattr(proxy, "info", {}), THRESHOLDS: thresholds}))
    return out


def auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Area under the ROC curve of ``scores`` for detecting ``positive``, ties counted half.

    ``weights`` ``[n]`` or ``[b, n]`` (one row per bootstrap replicate) weigh the positions; the
    result has the weights' leading shape (a scalar array without weights). NaN without both classes.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    w = np.ones((1, scores.shape[0])) if weights is None else np.atleast_2d(np.asarray(weights, np.float64))
    _, group = np.unique(scores, return_inverse=True)  # ascending score groups, ties together
    n_groups = int(group.max()) + 1 if group.size else 0
    pos = np.zeros((w.shape[0], n_groups))
    neg = np.zeros((w.shape[0], n_groups))
    for row in range(w.shape[0]):
        pos[row] = np.bincount(group, weights=w[row] * positive, minlength=n_groups)
        neg[row] = np.bincount(group, weights=w[row] * ~positive, minlength=n_groups)
    below = np.cumsum(neg, axis=1) - neg  # negatives strictly below each group
    total_pos, total_neg = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        area = (pos * (below + 0.5 * neg)).sum(1) / (total_pos * total_neg)
    area = np.where((total_pos > 0) & (total_neg > 0), area, np.nan)
    return area[0] if weights is None or np.ndim(weights) == 1 else area


def auroc_replicates(scores: np.ndarray, positive: np.ndarray, seq: np.ndarray, sampler: Resampler) -> np.ndarray:
    """``[n_boot]`` AUROC of each bootstrap replicate (positions weighted by their sequence's draws),
    from per-(sequence, score run) sums (:func:`_rank_groups`) so a replicate costs one product, in
    chunks of replicates."""
    from scipy import sparse

    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    group, n_groups = _rank_groups(scores, positive)
    shape = (sampler.n_seqs, n_groups)
    pos = sparse.csr_matrix((positive.astype(np.float64), (seq, group)), shape=shape)
    neg = sparse.csr_matrix(((~positive).astype(np.float64), (seq, group)), shape=shape)
    out = []
    for start in range(0, sampler.weights.shape[0], _REPLICATE_CHUNK):
        w = sampler.weights[start : start + _REPLICATE_CHUNK]  # [c, n_seqs]
        p = np.asarray((pos.T @ w.T).T)  # [c, groups]
        n = np.asarray((neg.T @ w.T).T)
        below = np.cumsum(n, axis=1) - n
        tp, tn = p.sum(1), n.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            area = (p * (below + 0.5 * n)).sum(1) / (tp * tn)
        out.append(np.where((tp > 0) & (tn > 0), area, np.nan))
    return np.concatenate(out) if out else np.zeros(0)


def _rank_groups(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, int]:
    """``(group of each position, number of groups)``: positions of tied scores in one group, in ascending
    score order, and each run of consecutive groups that hold only positives (or only negatives) merged
    into one. No (positive, negative) pair changes its comparison, so the AUROC is the same, and a
    replicate's sums run over the runs (a few thousand) instead of every distinct score."""
    _, group = np.unique(scores, return_inverse=True)
    if not group.size:
        return group, 0
    n = int(group.max()) + 1
    kind = ((np.bincount(group, weights=positive, minlength=n) > 0).astype(np.int8)
            + 2 * (np.bincount(group, weights=~positive, minlength=n) > 0).astype(np.int8))  # 1, 2 or 3 (tied)
    run = np.cumsum(np.r_[True, (kind[1:] != kind[:-1]) | (kind[1:] == 3)]) - 1
    return run[group], int(run[-1]) + 1


@dataclasses.dataclass(frozen=True)
class _Positions:
    """One split's (or the pooled splits') positions: signals, disagreement, sequences, sampler."""

    signals: Mapping[str, np.ndarray]
    disagree: np.ndarray
    seq: np.ndarray
    sampler: Resampler


def warning_rows(
    base: Mapping[str, Any],
    records: Mapping[str, Any],
    samplers: Mapping[str, Resampler],
    thresholds: Mapping[str, float],
    complete: Callable[[dict[str, Any]], dict[str, Any]],
) -> list[dict[str, Any]]:
    """The warning rows of one proxy: per split, then pooled (``split = POOLED``) when there are
    several splits, each signal's :data:`WARNING_METRICS` with their bootstrap intervals.

    Args:
        base: the proxy's row fields (``proxy``, ``simplifier``, ``param``, ``param_value``).
        records: ``{split: Records}`` of this proxy.
        samplers: ``{split: Resampler}``, the summary's replicate weights.
        thresholds: ``{signal: threshold}`` fixed on the fitting data.
        complete: fills a row's remaining fields (:func:`illusions.analyses.summary._complete`).
    """
    parts = {split: _Positions(rec.warnings, rec.proxy_pred != rec.original_pred, rec.seq, samplers[split])
             for split, rec in records.items() if len(rec) and rec.warnings}
    if not parts:
        return []
    if len(parts) > 1:
        parts[POOLED] = _pool(list(parts.values()))
    rows = []
    for split, part in parts.items():
        for signal in sorted(part.signals):
            values = _signal_metrics(part, part.signals[signal], thresholds.get(signal, np.nan))
            n_seq = int(np.unique(part.seq).shape[0])
            for metric in WARNING_METRICS:
                value, low, high, n_pos = values[metric]
                rows.append(complete({**base, "split": split, "group_by": WARNING_GROUP, "group": signal,
                                      "metric": metric, "value": value, "ci_low": low, "ci_high": high,
                                      "n_positions": n_pos, "n_sequences": n_seq}))
    return rows


def _pool(parts: list[_Positions]) -> _Positions:
    """All splits' positions as one set, each split's sequences drawn by its own replicate weights."""
    offsets = np.cumsum([0] + [p.sampler.n_seqs for p in parts[:-1]])
    names = sorted(set.intersection(*(set(p.signals) for p in parts)))
    sampler = Resampler(np.hstack([p.sampler.weights for p in parts]), parts[0].sampler.level)
    return _Positions({n: np.concatenate([p.signals[n] for p in parts]) for n in names},
                      np.concatenate([p.disagree for p in parts]),
                      np.concatenate([p.seq + off for p, off in zip(parts, offsets, strict=True)]), sampler)


def _signal_metrics(part: _Positions, signal: np.ndarray, threshold: float) -> dict[str, tuple[float, float, float, int]]:
    """``{metric: (value, low, high, n_positions)}`` of one signal on one set of positions."""
    n = signal.shape[0]
    area = float(auroc(signal, part.disagree))
    low, high = part.sampler.interval(auroc_replicates(signal, part.disagree, part.seq, part.sampler))
    flagged = signal > threshold  # NaN threshold (no calibration): nothing flagged
    values = np.stack([~part.disagree, flagged], axis=1).astype(np.float64)  # [n, 2]
    points, reps = part.sampler.grouped(values, part.seq, flagged.astype(np.int64), 2)
    _, all_reps = part.sampler.grouped(values[:, 1:], part.seq, np.zeros(n, np.int64), 1)
    f_lo, f_hi = part.sampler.intervals(reps[:, 1, 0])
    s_lo, s_hi = part.sampler.intervals(all_reps[:, 0, 0])
    return {
        "warning_auroc": (area, low, high, n),
        "warning_flagged_agreement": (float(points[1, 0]), float(f_lo), float(f_hi), int(flagged.sum())),
        "warning_flagged_share": (float(flagged.mean()) if n else np.nan, float(s_lo), float(s_hi), n),
    }
