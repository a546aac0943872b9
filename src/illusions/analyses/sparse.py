"""Per-split statistics of sparse dictionary proxies (``sae``, ``transcoder``), with bootstrap intervals.

For every evaluated sequence of a split, each dictionary of the proxy encodes the clean activation it
replaces (a transcoder: the MLP's input, with the MLP's output as target ``x``), read during the
evaluation's own clean pass (:class:`CleanPassStats`). Over the non-PAD token positions ``t`` of the split (every position
the proxy acts on, not only the scored ones), with ``x_hat`` the dictionary's output and ``c`` its
codes; ``T`` is every such position but each sequence's first (position 0: the BOS token, or the first
token where the tokenizer adds none), ``A`` every one:

    explained_variance         1 - sum_T |x_t - x_hat_t|^2 / sum_T |x_t - mean_T(x)|^2
    explained_variance_pooled  the same over A (mean over A)
    normalized_mse             sum_T |x_t - x_hat_t|^2 / sum_T |x_t|^2
    normalized_mse_pooled      the same over A
    mse                        sum_T |x_t - x_hat_t|^2 / |T|    (squared error per token, summed over dimensions)
    l0                   mean_t #{i : c_ti != 0}            (active latents per position)
    dead_fraction        share of the latents that are never active on the split
    new_latent_fraction  share of the latents active on the split but never on the fitting data

Why position 0 is left out: on real language models the residual stream at the first position (the
attention sink) has a norm ~100x that of the others (SmolLM2-135M layer 15: ~23,000 against ~160), so
over ``A`` one direction carries nearly all the variance and explained variance reads 1.000 while the
proxy's agreement is 0.6; SAELens leaves such positions out as well. The ``_pooled`` figures keep the
old definition beside. ``l0``, ``dead_fraction`` and ``new_latent_fraction`` count every position.

A proxy with several dictionaries (several layers) pools them: the sums run over all of them, the
latents are the union of theirs, and ``l0`` adds their active latents. Activations are the clean
model's, so each dictionary is judged on the inputs it was fitted to reproduce.

Downstream loss, as SAELens' ``evals.get_downstream_reconstruction_metrics`` reports it for a spliced-in
SAE, over the split's *scored* positions ``i`` (the positions every other per-position metric uses; the
BOS position is never one), with ``y_i`` the target token and ``P_i``, ``Q_i``, ``Z_i`` the next-token
distributions (whole vocabulary, float64) of the original model, the proxy and the model with each
replaced activation zero-ablated (one extra forward pass, :class:`ZeroAblation`):

    ce_loss_original   mean_i -log P_i(y_i)            (SAELens: ce_loss_without_sae)
    ce_loss_proxy      mean_i -log Q_i(y_i)            (ce_loss_with_sae)
    ce_loss_ablation   mean_i -log Z_i(y_i)            (ce_loss_with_ablation)
    loss_recovered     (ce_loss_ablation - ce_loss_proxy) / (ce_loss_ablation - ce_loss_original)
                                                       (ce_loss_score)
    kl_ablation        mean_i KL(P_i || Z_i)           (kl_div_with_ablation; kl_div_with_sae is ``kl``)
    kl_div_score       (kl_ablation - kl) / kl_ablation

As there, each score is a ratio of the means over positions (not a mean of per-position ratios): 1 when
the proxy is the model, 0 when it does no better than zeros, above 1 or below 0 possible.
Differences from SAELens: its positions are every position but those whose *input* token is special
(BOS, EOS, PAD) and it splices the SAE only at those positions; here the positions are the task's
scored ones and the proxy replaces the activation at every position, as in every other metric.

Intervals: the split's bootstrap replicate weights over sequences (shared with the other metrics)
resample the per-sequence sums; a latent counts as active in a replicate when it fires in a drawn
sequence. ``dead_fraction`` is biased upwards in replicates (fewer distinct sequences), which the
percentile interval shows as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from illusions.errors import IllusionsError
from illusions.metric_table import DICTIONARY_METRICS, DOWNSTREAM_METRICS, FIRST_SKIPPED_METRICS
from illusions.metrics import snap_rounding

if TYPE_CHECKING:
    from illusions.backends import LensModel
    from illusions.metrics import Resampler
    from illusions.simplifiers.base import Proxy
    from illusions.tasks.base import Split

SPARSE_METRICS = DICTIONARY_METRICS  # the table's dictionary rows (illusions.metric_table), in its order
FIELDS = ("n_tokens", "err", "sq", "x_sum", "l0", "active", "train_active", "err_first", "sq_first", "x_first")
# Read from a run written before the first position was kept apart: those metrics are then NaN.
_LATER_FIELDS = ("err_first", "sq_first", "x_first")


@dataclasses.dataclass(frozen=True)
class SparseStats:
    """Per-sequence sums of one proxy's dictionaries on one split (``S`` evaluated sequences).

    Attributes:
        n_tokens: ``[S]`` positions the dictionaries act on.
        err: ``[S]`` sum of ``|x - x_hat|^2``.
        sq: ``[S]`` sum of ``|x|^2``.
        x_sum: ``[S, d]`` sum of ``x`` (``d``: all dictionaries' targets side by side).
        l0: ``[S]`` sum over positions of the number of active latents.
        active: ``[S, n_latents]`` bool, the latent fired somewhere in the sequence.
        train_active: ``[n_latents]`` bool, the latent fired on the fitting data.
        err_first, sq_first: ``[S]`` the terms of ``err`` and ``sq`` at each sequence's first position.
        x_first: ``[S, d]`` ``x`` at each sequence's first position.
    """

    n_tokens: np.ndarray
    err: np.ndarray
    sq: np.ndarray
    x_sum: np.ndarray
    l0: np.ndarray
    active: np.ndarray
    train_active: np.ndarray
    err_first: np.ndarray
    sq_first: np.ndarray
    x_first: np.ndarray

    def n_positions(self, metric: str) -> int:
        """The token positions ``metric`` is computed over (each sequence's first left out for
        :data:`~illusions.metric_table.FIRST_SKIPPED_METRICS`)."""
        total = int(self.n_tokens.sum())
        return total - int((self.n_tokens > 0).sum()) if metric in FIRST_SKIPPED_METRICS else total

    def values(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Each metric under sequence weights ``[B, S]`` (ones for the point estimate): ``[B]`` each."""
        n = weights @ self.n_tokens.astype(np.float64)
        err = weights @ self.err
        sq = weights @ self.sq
        x_sum = weights @ self.x_sum  # [B, d]
        # Every position but each sequence's first: the sums less their first terms.
        n_rest = weights @ np.maximum(self.n_tokens - 1, 0).astype(np.float64)
        err_rest = weights @ (self.err - self.err_first)
        sq_rest = weights @ (self.sq - self.sq_first)
        x_rest = x_sum - weights @ self.x_first
        with np.errstate(invalid="ignore", divide="ignore"):
            variance = sq - np.einsum("bd,bd->b", x_sum, x_sum) / n  # sum |x - mean|^2
            variance_rest = sq_rest - np.einsum("bd,bd->b", x_rest, x_rest) / n_rest
            active = ((weights > 0).astype(np.float64) @ self.active.astype(np.float64)) > 0  # [B, latents]
            return {
                "explained_variance": 1.0 - err_rest / variance_rest,
                "explained_variance_pooled": 1.0 - err / variance,
                "normalized_mse": err_rest / sq_rest,
                "normalized_mse_pooled": err / sq,
                "mse": err_rest / n_rest,
                "l0": (weights @ self.l0) / n,
                "dead_fraction": 1.0 - active.mean(axis=1),
                "new_latent_fraction": (active & ~self.train_active[None, :]).mean(axis=1),
            }

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in FIELDS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SparseStats:
        """The statistics saved by :meth:`arrays`; a run saved before the first position was kept
        apart has no ``*_first`` arrays, and its first-position-free metrics come out NaN."""
        fields = {f: np.asarray(arrays[f]) for f in FIELDS if f in arrays or f not in _LATER_FIELDS}
        for f in _LATER_FIELDS:
            if f not in fields:
                like = fields["x_sum"] if f == "x_first" else fields["err"]
                fields[f] = np.full(like.shape, np.nan)
        return cls(**fields)


def dictionary_hooks(proxy: Proxy) -> list[Any]:
    """The proxy's sparse dictionary hooks (empty for every other kind of proxy)."""
    from illusions.simplifiers.sae import DictionaryHook

    # The engine needs only fwd_hooks and heads of a proxy; one without hooks has none.
    return [h for h in getattr(proxy, "hooks", ()) if isinstance(h, DictionaryHook)]


def sparse_stats(
    model: LensModel,
    split: Split,
    rows: np.ndarray,
    proxies: Sequence[Proxy],
    *,
    batch_size: int = 64,
) -> list[SparseStats | None]:
    """:class:`SparseStats` of each proxy on ``rows`` of ``split`` (None for proxies without dictionaries),
    from a clean pass of its own (the engine gathers them from the evaluation's: :class:`CleanPassStats`)."""
    import torch

    from illusions.activations import collect

    hooks = [dictionary_hooks(p) for p in proxies]
    names = sorted({name for group in hooks for h in group for name in h.stat_names})
    if not names or not len(rows):
        return [None] * len(proxies)
    lengths = split.lengths[rows]
    tokens = torch.as_tensor(split.tokens[rows, : int(lengths.max())])
    acts = collect(model, tokens, names, torch.as_tensor(lengths), batch_size=batch_size)  # row-major
    return [stats_of(group, acts, lengths) if group else None for group in hooks]


class CleanPassStats:
    """:class:`SparseStats` gathered from the evaluation's own clean pass, batch by batch, so the split
    is not run a second time (:func:`sparse_stats` does that, and gives the same numbers when its
    batches are the evaluation's: the bundled tasks' always are).

    Put :meth:`hooks` on each batch's clean forward pass, call :meth:`add` after it, and
    :meth:`result` once every batch has run.
    """

    def __init__(self, proxies: Sequence[Proxy]) -> None:
        self.groups = [dictionary_hooks(p) for p in proxies]
        self.names = sorted({name for group in self.groups for h in group for name in h.stat_names})
        self._captured: dict[str, Any] = {}
        self._parts: list[tuple[np.ndarray, list[SparseStats | None]]] = []

    def hooks(self, lengths: np.ndarray, width: int, device: Any) -> list[tuple[str, Any]]:
        """Capture hooks for one batch of rows of ``lengths``, padded to ``width``: each keeps the
        non-PAD positions of its activation in ``collect``'s row-major layout, keyed by the name
        asked for (as :func:`illusions.activations.collect` does)."""
        import torch

        keep = torch.as_tensor(np.arange(width)[None, :] < np.asarray(lengths)[:, None], device=device)

        def capture(name: str) -> Any:
            def hook(activation: Any, hook: Any) -> None:
                self._captured[name] = activation.detach()[keep]  # [n_batch, ...]

            return hook

        return [(name, capture(name)) for name in self.names]

    def add(self, rows: np.ndarray, lengths: np.ndarray) -> None:
        """The statistics of the batch of split ``rows`` whose clean pass just ran."""
        missing = [name for name in self.names if name not in self._captured]
        if missing:
            raise IllusionsError(f"hook(s) {', '.join(missing)} did not run in this model's forward pass")
        acts, self._captured = self._captured, {}
        self._parts.append((np.asarray(rows), [stats_of(g, acts, lengths) if g else None for g in self.groups]))

    def result(self, rows: np.ndarray) -> list[SparseStats | None]:
        """Each proxy's :class:`SparseStats` over ``rows`` (in that order; None without dictionaries)."""
        if not self.names or not self._parts:
            return [None] * len(self.groups)
        done = np.concatenate([part_rows for part_rows, _ in self._parts])
        sorter = np.argsort(rows, kind="stable")
        where = sorter[np.searchsorted(rows, done, sorter=sorter)]  # [S]: place of each batch row in rows
        out: list[SparseStats | None] = []
        for j, group in enumerate(self.groups):
            if not group:
                out.append(None)
                continue
            parts = [stats[j] for _, stats in self._parts]
            fields = {}
            for f in (f for f in FIELDS if f != "train_active"):  # per-sequence arrays, batch after batch,
                # put back in the order of rows
                joined = np.concatenate([getattr(p, f) for p in parts])
                fields[f] = np.empty_like(joined)
                fields[f][where] = joined
            out.append(SparseStats(**fields, train_active=parts[0].train_active))
        return out


def stats_of(hooks: Sequence[Any], acts: dict[str, Any], lengths: np.ndarray) -> SparseStats:
    """:class:`SparseStats` of one proxy's dictionary hooks from collected activations.

    Args:
        hooks: the proxy's dictionary hooks.
        acts: clean activations at their ``stat_names`` in ``collect``'s layout (``[n, ...]``, the
            positions of sequence 0, then of sequence 1, ...).
        lengths: ``[S]`` positions of each sequence (``lengths.sum() == n``).
    """
    import torch

    from illusions.simplifiers.sae import encode_all

    n_seqs = len(lengths)
    seq = torch.repeat_interleave(torch.arange(n_seqs), torch.as_tensor(lengths))  # [n] sequence of each position
    starts = torch.as_tensor(np.cumsum(lengths) - lengths, dtype=torch.long)  # [S] first position of each
    has = torch.as_tensor(np.asarray(lengths) > 0)  # [S] (a sequence of no position has no first one)
    first = starts[has]
    err = torch.zeros(n_seqs, dtype=torch.float64)
    sq = torch.zeros(n_seqs, dtype=torch.float64)
    l0 = torch.zeros(n_seqs, dtype=torch.float64)
    err_first = torch.zeros(n_seqs, dtype=torch.float64)
    sq_first = torch.zeros(n_seqs, dtype=torch.float64)
    x_sums, x_firsts, actives, trained = [], [], [], []
    for hook in hooks:
        x, target = hook.input_and_target(acts)  # [n, d_in], [n, d_out], on the model's device
        recon, active = encode_all(hook, x)
        # Sums in float64 on the CPU (MPS has no float64; the sums are small).
        recon, active, target = recon.cpu().double(), active.cpu(), target.cpu().double()
        sq_err, sq_x = (recon - target).pow(2).sum(-1), target.pow(2).sum(-1)  # [n] each
        err.index_add_(0, seq, sq_err)
        sq.index_add_(0, seq, sq_x)
        err_first[has] += sq_err[first]
        sq_first[has] += sq_x[first]
        x_first = torch.zeros(n_seqs, target.shape[1], dtype=torch.float64)
        x_first[has] = target[first]
        x_firsts.append(x_first)
        l0.index_add_(0, seq, active.sum(-1).double())
        x_sums.append(torch.zeros(n_seqs, target.shape[1], dtype=torch.float64).index_add_(0, seq, target))
        actives.append(torch.zeros(n_seqs, active.shape[1]).index_add_(0, seq, active.float()) > 0)
        trained.append(hook.train_active.bool().cpu())
    return SparseStats(
        n_tokens=np.asarray(lengths, dtype=np.int64), err=err.numpy(), sq=sq.numpy(),
        x_sum=torch.cat(x_sums, dim=1).numpy(), l0=l0.numpy(), active=torch.cat(actives, dim=1).numpy(),
        train_active=torch.cat(trained).numpy(), err_first=err_first.numpy(), sq_first=sq_first.numpy(),
        x_first=torch.cat(x_firsts, dim=1).numpy(),
    )


def estimates(stats: SparseStats, sampler: Resampler) -> dict[str, tuple[float, float, float]]:
    """``{metric: (value, ci_low, ci_high)}`` with the split's bootstrap replicates."""
    point = stats.values(np.ones((1, stats.n_tokens.shape[0])))
    reps = stats.values(sampler.weights)
    out = {}
    for metric in SPARSE_METRICS:
        lo, hi = sampler.intervals(reps[metric])
        out[metric] = (float(point[metric][0]), float(lo), float(hi))
    return out


DOWNSTREAM_FIELDS = ("ce_original", "ce_proxy", "ce_ablation", "kl_ablation")
"""Per scored position of a dictionary proxy's records (:attr:`~illusions.analyses.faithfulness.Records.downstream`):
the target's cross-entropy under the original model, the proxy and the zero ablation, and KL(original || ablation)."""


@dataclasses.dataclass(frozen=True)
class ZeroHook:
    """Zero-ablates the activation a dictionary replaces (``heads``: only those heads of a ``hook_z``)."""

    hook_name: str
    heads: tuple[int, ...] | None

    def __call__(self, activation: Any, hook: Any = None) -> Any:
        import torch

        from illusions.simplifiers.base import head_rows, replace_heads

        if self.heads is None:
            return torch.zeros_like(activation)
        rows = head_rows(self.heads, activation.shape[2])
        return replace_heads(activation, rows, torch.zeros_like(activation[:, :, rows]), axis=2)


@dataclasses.dataclass(frozen=True)
class ZeroAblation:
    """The baseline of :func:`downstream_estimates`: every activation a proxy's dictionaries replace, set
    to zero (as SAELens' ``standard_zero_ablate_hook``; a transcoder's MLP output), in a proxy's shape
    (``fwd_hooks``, no attention heads) so the evaluation runs it as it runs the proxy."""

    hooks: tuple[ZeroHook, ...]
    heads: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, hooks: Sequence[Any]) -> ZeroAblation | None:
        """The zero ablation of a proxy's dictionary ``hooks`` (:func:`dictionary_hooks`; the engine passes
        :attr:`CleanPassStats.groups`, already found), None for a proxy without any."""
        return cls(tuple(ZeroHook(h.hook_name, h.heads) for h in hooks)) if hooks else None

    @property
    def fwd_hooks(self) -> list[tuple[str, Any]]:
        return [(h.hook_name, h) for h in self.hooks]


def downstream_replicates(downstream: dict[str, np.ndarray], kl: np.ndarray, seq: np.ndarray,
                          sampler: Resampler) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Point estimates and bootstrap replicates (``[n_boot]``) of each of
    :data:`~illusions.metric_table.DOWNSTREAM_METRICS`, from per-position ``downstream`` arrays
    (:data:`DOWNSTREAM_FIELDS`) and the proxy's KL, with the split's replicate weights (each
    replicate's scores are ratios of its own means)."""
    values = np.stack([*(downstream[f] for f in DOWNSTREAM_FIELDS), kl], axis=1)  # [n, 5]
    points, reps = sampler.grouped(values, seq, np.zeros(len(seq), np.int64), 1)

    def metrics(m: np.ndarray) -> dict[str, np.ndarray]:  # m [..., 5]: the five means
        clean, proxy, ablation, kl_ablation, kl_proxy = np.moveaxis(m, -1, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"ce_loss_original": clean, "ce_loss_proxy": proxy, "ce_loss_ablation": ablation,
                    "loss_recovered": (ablation - proxy) / (ablation - clean), "kl_ablation": kl_ablation,
                    "kl_div_score": (kl_ablation - kl_proxy) / kl_ablation}

    point, rep = metrics(points[0]), metrics(reps[:, 0])
    return {k: float(point[k]) for k in DOWNSTREAM_METRICS}, {k: rep[k] for k in DOWNSTREAM_METRICS}


def downstream_estimates(replicates: tuple[dict[str, float], dict[str, np.ndarray]],
                         sampler: Resampler) -> dict[str, tuple[float, float, float]]:
    """``{metric: (value, ci_low, ci_high)}`` of :func:`downstream_replicates`' point estimates and
    replicates (taken as they are, so a split's can also serve as the reference of
    :func:`downstream_gaps`)."""
    point, rep = replicates
    out = {}
    for metric in DOWNSTREAM_METRICS:
        lo, hi = sampler.intervals(rep[metric])
        out[metric] = (point[metric], float(lo), float(hi))
    return out


def downstream_gaps(split: tuple[dict[str, float], dict[str, np.ndarray]],
                    reference: tuple[dict[str, float], dict[str, np.ndarray]],
                    sampler: Resampler) -> dict[str, tuple[float, float, float]]:
    """``{metric: (gap, low, high)}``: each of :func:`downstream_replicates`' metrics on a split minus the
    reference split's, with the interval of the differences of their (independent) replicates, as the
    per-position metrics' ``gap_vs_ref`` (:func:`illusions.analyses.summary._gaps`). No length-matched
    gap: a score is a ratio of means over the whole split."""
    (point, rep), (ref_point, ref_rep) = split, reference
    out = {}
    for metric in DOWNSTREAM_METRICS:
        lo, hi = sampler.intervals(rep[metric] - ref_rep[metric])
        # Equal scores' differences within float rounding of 0 are 0 (metrics.snap_rounding).
        out[metric] = (snap_rounding(point[metric] - ref_point[metric]), snap_rounding(float(lo)),
                       snap_rounding(float(hi)))
    return out
