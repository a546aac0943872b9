"""Faithfulness metrics: pure functions on tensors and arrays, and bootstrap intervals over sequences.

Per scored position ``i`` (a query position whose next token the task checks), with ``y_i`` the true
next token, ``o_i`` / ``s_i`` the original / simplified model's prediction (argmax over the task's
candidate tokens), ``P_i`` / ``Q_i`` their next-token distributions over the whole vocabulary and
``A_ih`` / ``B_ih`` the attention distributions of simplified head ``h`` at that query position:

    accuracy          mean_i [o_i = y_i]              (original)   and   mean_i [s_i = y_i] (proxy)
    agreement         mean_i [o_i = s_i]
    attention JSD     mean_i mean_h JSD(A_ih, B_ih),  JSD(A, B) = 1/2 KL(A || M) + 1/2 KL(B || M),
                      M = (A + B) / 2, in bits (log base 2), so 0 <= JSD <= 1
    KL                mean_i KL(P_i || Q_i) = sum_v P_iv (log P_iv - log Q_iv), in nats
    cross-entropy     mean_i -log Q_i(y_i) (and -log P_i(y_i)), in nats over the whole vocabulary

Every metric is a mean of per-position values. Positions within one sequence are not independent,
so intervals come from a bootstrap over *sequences* (cluster bootstrap): each replicate draws the
split's sequences with replacement and recomputes the position-weighted mean
``sum_j w_j S_j / sum_j w_j N_j`` from per-sequence sums ``S_j`` and counts ``N_j``. The percentile
interval of the replicates is reported (95% by default). Replicate weights are drawn once per split
and shared by every metric and proxy, so comparisons between proxies on one split are paired.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor

LOG2 = float(np.log(2.0))


def kl_divergence(
    logits_p: Float[Tensor, "n d_vocab"], logits_q: Float[Tensor, "n d_vocab"]
) -> Float[Tensor, " n"]:
    """KL(P || Q) in nats between the softmax distributions of two logit tensors, per row."""
    import torch

    return _kl_of_logs(torch.log_softmax(logits_p.double(), dim=-1), torch.log_softmax(logits_q.double(), dim=-1))


def _kl_of_logs(logp: Any, logq: Any) -> Any:
    """``[n]`` KL(P || Q) in nats from the rows' log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def kl_divergence_chunked(
    logits_p: Float[Tensor, "n d_vocab"], logits_q: Float[Tensor, "n d_vocab"], *,
    max_elements: int = 2**24, device: Any = None,
) -> Float[Tensor, " n"]:
    """:func:`kl_divergence` over row chunks of at most ``max_elements`` logits each.

    The float64 ``log_softmax`` copies (the exact figure) then exist for one chunk at a time instead
    of for every scored position of a batch (8,128 positions x 50,257 tokens x 8 bytes = 3.3 GB each).
    Every row is computed alone, so the numbers are those of :func:`kl_divergence`, bit for bit.

    Args:
        logits_p, logits_q: ``[n, d_vocab]`` logits (any float dtype).
        max_elements: logits per chunk (rows x vocabulary); at least one row.
        device: where the float64 work runs (default: where the logits are).
    """
    return _by_row_chunks(kl_divergence, (logits_p, logits_q), max_elements, device)


def _by_row_chunks(fn: Any, tensors: tuple[Any, ...], max_elements: int, device: Any) -> Any:
    """``[n]`` float64 values of ``fn`` (row-wise) over ``[n, k]`` ``tensors`` taken a chunk of at most
    ``max_elements`` entries (at least one row) at a time, each chunk moved to ``device`` (default:
    where the first tensor is), floats as float64; rows are computed alone, so any chunk gives the same bits."""
    import torch

    n, k = tensors[0].shape
    rows = max(1, max_elements // max(k, 1))
    where = device or tensors[0].device
    out = [fn(*(t[i : i + rows].to(where, torch.float64 if t.is_floating_point() else t.dtype) for t in tensors))
           for i in range(0, n, rows)]
    if out and isinstance(out[0], tuple):  # several values per row: each joined on its own
        return tuple(torch.cat(parts) for parts in zip(*out, strict=True))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=where)


def cross_entropy_chunked(
    logits: Float[Tensor, "n d_vocab"], target: Any, *, max_elements: int = 2**24, device: Any = None,
) -> Float[Tensor, " n"]:
    """``[n]`` cross-entropy in nats of each row's ``target`` token, ``-log softmax(logits)[target]`` over
    the whole vocabulary in float64, over row chunks of at most ``max_elements`` logits (as
    :func:`kl_divergence_chunked`: every row is computed alone, so any chunk gives the same bits).

    Args:
        logits: ``[n, d_vocab]`` logits (any float dtype).
        target: ``[n]`` token ids (a tensor or an array).
        max_elements: logits per chunk (rows x vocabulary); at least one row.
        device: where the float64 work runs (default: where the logits are).
    """
    import torch

    ids = torch.as_tensor(target, dtype=torch.long, device=logits.device)[:, None]

    def ce(chunk: Any, chunk_ids: Any) -> Any:
        return -torch.log_softmax(chunk, dim=-1).gather(1, chunk_ids)[:, 0]

    return _by_row_chunks(ce, (logits, ids), max_elements, device)


def kl_and_cross_entropy_chunked(
    logits_p: Float[Tensor, "n d_vocab"], logits_q: Float[Tensor, "n d_vocab"], target: Any, *,
    max_elements: int = 2**24, device: Any = None,
) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
    """:func:`kl_divergence_chunked` of ``logits_p`` and ``logits_q`` and :func:`cross_entropy_chunked`
    of ``logits_q`` together, from one float64 ``log_softmax`` of each chunk of ``logits_q`` (the two
    take it alike, so the bits are theirs). A chunk holds what the KL's alone does.

    Args:
        logits_p, logits_q: ``[n, d_vocab]`` logits (any float dtype).
        target: ``[n]`` token ids (a tensor or an array).
        max_elements: logits per chunk (rows x vocabulary); at least one row.
        device: where the float64 work runs (default: where ``logits_p`` is).

    Returns:
        ``[n]`` KL(P || Q) and ``[n]`` ``-log Q(target)``, in nats.
    """
    import torch

    ids = torch.as_tensor(target, dtype=torch.long, device=logits_q.device)[:, None]

    def both(chunk_p: Any, chunk_q: Any, chunk_ids: Any) -> tuple[Any, Any]:
        logq = torch.log_softmax(chunk_q, dim=-1)
        return _kl_of_logs(torch.log_softmax(chunk_p, dim=-1), logq), -logq.gather(1, chunk_ids)[:, 0]

    if len(ids) == 0:  # no chunk to take the pair from
        return (torch.zeros(0, dtype=torch.float64, device=device or logits_p.device),) * 2
    return _by_row_chunks(both, (logits_p, logits_q, ids), max_elements, device)


def js_divergence(p: Float[Tensor, "... k"], q: Float[Tensor, "... k"]) -> Float[Tensor, "..."]:
    """Jensen-Shannon divergence in bits between probability vectors along the last axis.

    Zero entries contribute nothing (0 log 0 = 0), so masked (future) keys with probability 0 in both
    distributions are harmless.
    """
    import torch

    p = p.double()
    q = q.double()
    m = 0.5 * (p + q)
    # KL(a || m) = sum a log a - a log m, with xlogy's 0 log 0 = 0; m > 0 wherever a > 0.
    ent = torch.special.xlogy(p, p).sum(-1) + torch.special.xlogy(q, q).sum(-1)
    cross = torch.special.xlogy(p + q, m).sum(-1)
    return (0.5 * (ent - cross)).clamp(0.0, LOG2) / LOG2


def js_divergence_chunked(
    p: Float[Tensor, "n k"], q: Float[Tensor, "n k"], *, max_elements: int = 2**24, device: Any = None,
) -> Float[Tensor, " n"]:
    """:func:`js_divergence` of ``[n, k]`` rows over row chunks of at most ``max_elements`` entries.

    The float64 copies and intermediates then exist for one chunk at a time (16,384 scored query rows
    x 1,024 keys are 134 MB per float64 copy, about six alive). Every row is computed alone, so the
    numbers are those of :func:`js_divergence`, bit for bit.

    Args:
        p, q: ``[n, k]`` probability rows (any float dtype).
        max_elements: entries per chunk (rows x k); at least one row.
        device: where the float64 work runs (default: where ``p`` is).
    """
    return _by_row_chunks(js_divergence, (p, q), max_elements, device)


def accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of positions where the prediction equals the target."""
    return float(np.mean(pred == target)) if pred.size else float("nan")


def agreement(pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    """Fraction of positions where two models make the same prediction."""
    return float(np.mean(pred_a == pred_b)) if pred_a.size else float("nan")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile interval; ``n`` positions, ``n_seqs`` sequences behind it."""

    value: float
    low: float
    high: float
    n: int
    n_seqs: int


# An interval needs positions from at least this many sequences: the bootstrap resamples sequences, and
# one sequence resampled is always itself (a zero-width interval that would mark any gap significant).
MIN_INTERVAL_SEQS = 2
# Differences within this of 0 are the float rounding of equal estimates (a matched control's weighted
# sum of strata that are all 1 comes to 0.9999999999999998): they are 0, so their interval holds 0.
ROUNDING = 1e-12


def snap_rounding(x: Any) -> Any:
    """``x`` (a float or an array) with every value within :data:`ROUNDING` of 0 set to 0."""
    snapped = np.where(np.abs(np.asarray(x, dtype=np.float64)) <= ROUNDING, 0.0, x)
    return float(snapped) if np.ndim(snapped) == 0 else snapped


@dataclasses.dataclass(frozen=True)
class Resampler:
    """Bootstrap replicate weights over the sequences of one split.

    ``weights[b, j]`` is how often sequence ``j`` is drawn in replicate ``b`` (a multinomial draw of
    ``n_seqs`` out of ``n_seqs``). Built once per split from a seeded generator.
    """

    weights: np.ndarray  # [n_boot, n_seqs] float64
    level: float = 0.95

    @classmethod
    def draw(cls, n_seqs: int, rng: np.random.Generator, n_boot: int = 1000, level: float = 0.95) -> Resampler:
        if n_seqs == 0:
            return cls(np.zeros((n_boot, 0)), level)
        weights = rng.multinomial(n_seqs, np.full(n_seqs, 1.0 / n_seqs), size=n_boot).astype(np.float64)
        return cls(weights, level)

    @property
    def n_seqs(self) -> int:
        return int(self.weights.shape[1])

    def replicates(self, values: np.ndarray, seq: np.ndarray) -> tuple[float, np.ndarray]:
        """Point estimate and bootstrap replicates of the mean of ``values`` (per position).

        Args:
            values: ``[n]`` per-position values.
            seq: ``[n]`` sequence index (0..n_seqs-1) of each position.
        """
        values = np.asarray(values, dtype=np.float64)
        sums = np.bincount(seq, weights=values, minlength=self.n_seqs)
        counts = np.bincount(seq, minlength=self.n_seqs).astype(np.float64)
        point = sums.sum() / counts.sum() if counts.sum() else np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            reps = (self.weights @ sums) / (self.weights @ counts)
        return float(point), reps

    def grouped(
        self, values: np.ndarray, seq: np.ndarray, groups: np.ndarray, n_groups: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Means of several per-position columns within groups, with replicates, in one pass.

        Args:
            values: ``[n, m]`` per-position values of ``m`` metrics.
            seq: ``[n]`` sequence index of each position.
            groups: ``[n]`` group index (0..n_groups-1) of each position.
            n_groups: number of groups.

        Returns:
            ``points [n_groups, m]`` and ``reps [n_boot, n_groups, m]`` (NaN where a group is empty).
        """
        from scipy import sparse

        values = np.asarray(values, dtype=np.float64).reshape(seq.shape[0], -1)
        m = values.shape[1]
        n = seq.shape[0]
        # one-hot of (sequence) x (position) turns per-position columns into per-sequence sums
        onehot = sparse.csr_matrix((np.ones(n), (seq, np.arange(n))), shape=(self.n_seqs, n))
        cols = np.zeros((n, n_groups * (m + 1)))  # [n, groups x (metrics + count)]
        base = groups * (m + 1)
        for k in range(m):
            cols[np.arange(n), base + k] = values[:, k]
        cols[np.arange(n), base + m] = 1.0
        per_seq = np.asarray(onehot @ cols).reshape(self.n_seqs, n_groups, m + 1)  # [n_seqs, g, m+1]
        totals = per_seq.sum(0)  # [g, m+1]
        with np.errstate(invalid="ignore", divide="ignore"):
            points = totals[:, :m] / totals[:, m:]
            boot = np.tensordot(self.weights, per_seq, axes=(1, 0))  # [n_boot, g, m+1]
            reps = boot[:, :, :m] / boot[:, :, m:]
        return points, reps

    def intervals(self, reps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval along the first (replicate) axis, ignoring NaN replicates."""
        alpha = (1.0 - self.level) / 2
        with np.errstate(invalid="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                lo, hi = np.nanquantile(reps, [alpha, 1.0 - alpha], axis=0)
        return lo, hi

    def interval(self, reps: np.ndarray) -> tuple[float, float]:
        reps = reps[np.isfinite(reps)]
        if reps.size == 0:
            return float("nan"), float("nan")
        alpha = (1.0 - self.level) / 2
        lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
        return float(lo), float(hi)

    def estimate(self, values: np.ndarray, seq: np.ndarray) -> Estimate:
        """Mean of per-position ``values`` with its bootstrap interval."""
        point, reps = self.replicates(values, seq)
        lo, hi = self.interval(reps)
        return Estimate(point, lo, hi, int(np.asarray(values).shape[0]), int(np.unique(seq).shape[0]))
