"""Faithfulness of simplified proxies, split by split: the paper's method as one function.

:func:`analyze` reads like the method section: pick the fitting sequences, collect activations at
the simplifiers' hook points, fit each simplifier into a proxy, run the original model once per split
and every proxy against it, and summarise the per-position records into estimates with intervals.

Works with any ``HookedTransformer`` and any splits a user brings (:class:`illusions.tasks.Split`):
nothing here knows about brackets or code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from illusions.analyses.sparse import CleanPassStats, ZeroAblation
from illusions.backends import scored_logits, stop_at, unembed_stop
from illusions.errors import IllusionsError
from illusions.metric_table import POSITION_METRICS
from illusions.metrics import (
    cross_entropy_chunked,
    js_divergence_chunked,
    kl_and_cross_entropy_chunked,
    kl_divergence_chunked,
)
from illusions.scoring import iter_batches, restricted_argmax
from illusions.simplifiers.base import causal
from illusions.tasks.base import Split

if TYPE_CHECKING:
    from illusions.backends import LensModel
    from illusions.simplifiers.base import Proxy, Simplifier

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class Records:
    """Per-position outcomes of one proxy on one split (all arrays ``[n]``).

    ``seq`` indexes the evaluated sequences of the split (``rows[seq]`` is the split row);
    ``attention_jsd`` is NaN when the proxy leaves every attention pattern unchanged by construction
    (no targeted head). ``sparse`` holds the per-sequence dictionary statistics of a sparse
    dictionary proxy (:class:`illusions.analyses.sparse.SparseStats`), None for other proxies.
    ``warnings`` holds each unsupervised warning signal of the proxy per position
    (:mod:`illusions.analyses.warning_signals`), empty when its hooks declare none.
    ``downstream`` holds, for a sparse dictionary proxy, the target's cross-entropy under the original
    model, the proxy and the replaced activation zero-ablated, and KL(original || ablation), per position
    (:data:`illusions.analyses.sparse.DOWNSTREAM_FIELDS`); empty for other proxies.
    """

    rows: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    target: np.ndarray
    original_pred: np.ndarray
    proxy_pred: np.ndarray
    attention_jsd: np.ndarray
    kl: np.ndarray
    meta: Mapping[str, np.ndarray]
    sparse: Any = None
    warnings: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    downstream: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    def per_position(self) -> dict[str, np.ndarray]:
        """The per-position value of each metric (its mean over positions is the metric)."""
        return {
            "original_accuracy": (self.original_pred == self.target).astype(np.float64),
            "proxy_accuracy": (self.proxy_pred == self.target).astype(np.float64),
            "agreement": (self.original_pred == self.proxy_pred).astype(np.float64),
            "accuracy_change": (self.proxy_pred == self.target).astype(np.float64)
            - (self.original_pred == self.target).astype(np.float64),
            "attention_jsd": self.attention_jsd,
            "kl": self.kl,
        }


METRICS = POSITION_METRICS
"""Per-split metrics, each the mean of a per-position value (:meth:`Records.per_position`); the rows
of :data:`illusions.metric_table.METRICS` computed per scored position, in their order.

``accuracy_change`` is proxy minus original accuracy on the same positions. Its gap relative to
``iid`` says how the proxy misjudges the model's generalization: negative, the proxy *under-states*
it (the proxy loses more accuracy out of distribution than the model does); positive, it
*over-states* it (the proxy generalizes better than the model it explains).
"""


@dataclasses.dataclass
class AnalysisResult:
    """Everything an analysis produced: fitted proxies, evaluated rows and per-position records."""

    proxies: list[Proxy]
    labels: list[str]
    split_rows: dict[str, np.ndarray]
    records: dict[tuple[str, int], Records]
    fit_rows: np.ndarray


def sweep_param(proxy: Proxy) -> tuple[str, Any]:
    """The parameter the proxy's simplifier swept and its value, as the proxy carries them
    (:attr:`~illusions.simplifiers.base.Proxy.sweep_param`): ``("rank", 4)``, or ``("", "")`` for a
    method that sweeps nothing."""
    param = getattr(proxy, "sweep_param", "")
    return (param, proxy.params[param]) if param and param in proxy.params else ("", "")


def proxy_label(proxy: Proxy) -> str:
    """A short readable name: ``svd(rank=4)``, ``kmeans(k=16)``, ``sae(width=256)``, ``onehot``."""
    param, value = sweep_param(proxy)
    return f"{proxy.simplifier}({param}={value})" if param else proxy.simplifier


def proxy_labels(proxies: Sequence[Proxy]) -> list[str]:
    """:func:`proxy_label` of each proxy, with its heads appended (``svd(rank=4)@L1H0``) when the
    proxies differ in the heads they simplify, so every label names one proxy."""
    labels = [proxy_label(p) for p in proxies]
    if len({tuple(p.heads) for p in proxies}) > 1:
        labels = [f"{label}@{heads_tag(p.heads)}" for label, p in zip(labels, proxies, strict=True)]
    return labels


def heads_tag(heads: Sequence[tuple[int, int]]) -> str:
    """``L1H0`` for one head, ``L1H0+L1H2`` for several (heads are always spelled out)."""
    return "+".join(f"L{layer}H{head}" for layer, head in heads) or "none"


def select_rows(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """``limit`` distinct rows out of ``n`` drawn with ``rng`` (all rows, in order, when limit is None)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def analyze(
    model: LensModel,
    splits: Mapping[str, Split],
    simplifiers: Sequence[Simplifier],
    *,
    candidates: np.ndarray | None,
    fit_split: str = "train",
    fit_n: int = 1000,
    eval_splits: Sequence[str] | None = None,
    max_seqs: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: Progress | None = None,
    reference: str | None = None,
    labels: Sequence[str | None] | None = None,
    token_budget: int | None = None,
) -> AnalysisResult:
    """Fit each simplifier on ``fit_n`` sequences of ``fit_split`` and evaluate it on every split.

    Args:
        model: the original model.
        splits: named splits; ``fit_split`` must be among them unless every simplifier is data-free
            or already fitted.
        simplifiers: configured simplifiers (e.g. several ranks of one method, for a sweep), or
            proxies ready to run (anything with ``fwd_hooks``: a fitted :class:`Proxy`, a proxy of
            your own hook functions), which are evaluated as they are.
        candidates: token ids the prediction argmax ranges over (None: whole vocabulary).
        fit_split: the split whose sequences the proxies are fitted on.
        fit_n: number of fitting sequences (the paper fits on about 1,000 training sequences).
        eval_splits: splits to evaluate (default: every split except ``fit_split``).
        max_seqs: evaluate at most this many sequences per split (drawn with ``seed``).
        seed: seeds the choice of fitting and evaluation sequences.
        batch_size: sequences per forward pass.
        progress: called as ``progress(stage, done, total)``.
        reference: the split gaps will be measured against; named and absent from the evaluated
            splits, it is an error (rather than gaps that silently come out NaN).
        labels: one name per proxy, None for :func:`proxy_labels`' name (a repeated name gets ``#2``).
        token_budget: padded tokens per evaluation batch at most (default: :data:`TOKEN_BUDGET`; see
            :func:`batch_tokens`).

    Returns:
        The fitted proxies and per-position records for every (split, proxy) pair.
    """
    fitted = [is_fitted(s) for s in simplifiers]
    eval_splits = _check_request(splits, simplifiers, fitted, fit_split=fit_split, eval_splits=eval_splits,
                                 fit_n=fit_n, reference=reference, labels=labels)
    rng = np.random.default_rng(seed)
    fit_rows = select_rows(len(splits[fit_split]), fit_n, rng) if fit_split in splits else np.zeros(0, np.int64)
    proxies = _fit_all(model, splits, simplifiers, fitted, fit_split, fit_rows, candidates=candidates,
                       batch_size=batch_size, token_budget=token_budget)
    for proxy in proxies:
        check_hooks(model, proxy)
    split_rows = {name: select_rows(len(splits[name]), max_seqs, rng) for name in eval_splits}
    records: dict[tuple[str, int], Records] = {}
    for i, name in enumerate(eval_splits):
        if progress:
            progress(name, i, len(eval_splits))
        evaluated = evaluate_split(model, splits[name], split_rows[name], proxies, candidates=candidates,
                                   batch_size=batch_size, token_budget=token_budget)
        for j, rec in enumerate(evaluated):
            records[(name, j)] = rec
    if progress:
        progress("done", len(eval_splits), len(eval_splits))
    return AnalysisResult(proxies, _labels(proxies, labels), split_rows, records, fit_rows)


def _check_request(
    splits: Mapping[str, Split], simplifiers: Sequence[Simplifier], fitted: list[bool], *, fit_split: str,
    eval_splits: Sequence[str] | None, fit_n: int, reference: str | None, labels: Sequence[str | None] | None,
) -> Sequence[str]:
    """:func:`analyze`'s arguments checked before anything runs; returns the splits to evaluate."""
    needs_data = [s for s, done in zip(simplifiers, fitted, strict=True) if not done and not s.data_free]
    if fit_split not in splits and needs_data:
        raise IllusionsError(f"fit split {fit_split!r} not found (the data {needs_data[0].name} is fitted on); "
                             f"splits: {', '.join(splits)}")
    if eval_splits is None:
        eval_splits = [name for name in splits if name != fit_split]
    unknown = [s for s in eval_splits if s not in splits]
    if unknown:
        raise IllusionsError(f"unknown split(s) {', '.join(unknown)}; splits: {', '.join(splits)}")
    if fit_n < 1:
        raise IllusionsError(f"fit_n must be at least 1, got {fit_n}")
    if not simplifiers:
        raise IllusionsError("no simplifier given")
    if reference is not None and reference not in eval_splits:
        raise IllusionsError(f"reference split {reference!r} is not among the evaluated splits "
                             f"({', '.join(eval_splits)}); name one of them as the reference, or none for no gaps")
    if labels is not None and len(labels) != len(simplifiers):
        raise IllusionsError(f"{len(labels)} labels for {len(simplifiers)} proxies")
    return eval_splits


def _fit_all(
    model: LensModel, splits: Mapping[str, Split], simplifiers: Sequence[Simplifier], fitted: list[bool],
    fit_split: str, fit_rows: np.ndarray, *, candidates: np.ndarray | None, batch_size: int,
    token_budget: int | None = None,
) -> list[Proxy]:
    """The proxies: the simplifiers not yet fitted fitted on ``fit_rows`` of ``fit_split``, refined,
    and their warning signals calibrated there (when that split exists), every forward pass in batches
    of at most ``batch_size`` rows and :func:`batch_tokens` padded tokens."""
    to_fit = [s for s, done in zip(simplifiers, fitted, strict=True) if not done]
    fitted_now = iter(fit_proxies(model, splits.get(fit_split), fit_rows, to_fit, batch_size=batch_size,
                                  token_budget=token_budget) if to_fit else [])
    proxies = [s if done else next(fitted_now) for s, done in zip(simplifiers, fitted, strict=True)]
    if fit_split in splits:
        proxies = refine_proxies(model, splits[fit_split], fit_rows, simplifiers, proxies, candidates=candidates,
                                 batch_size=batch_size, token_budget=token_budget)
        # Each warning signal's threshold, fixed on the fitting sequences (its training 99th percentile).
        proxies = calibrate_warnings(model, splits[fit_split], fit_rows, proxies, batch_size=batch_size,
                                     token_budget=token_budget)
    return proxies


def _labels(proxies: Sequence[Proxy], given: Sequence[str | None] | None) -> list[str]:
    """The given labels, :func:`proxy_labels` for the proxies given none, each made unique (``#2``)."""
    given = list(given) if given is not None else [None] * len(proxies)
    unnamed = [p for p, label in zip(proxies, given, strict=True) if label is None]
    defaults = iter(proxy_labels(unnamed)) if unnamed else iter(())
    labels = [label if label is not None else next(defaults) for label in given]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def is_fitted(item: Any) -> bool:
    """A proxy ready to run (it has ``fwd_hooks``), as opposed to a simplifier still to be fitted."""
    return hasattr(item, "fwd_hooks") and not hasattr(item, "fit")


def hook_names_of(proxy: Any) -> list[str]:
    """The hook points a proxy acts at, each once, in the order of its ``fwd_hooks``."""
    return list(dict.fromkeys(name for name, _ in proxy.fwd_hooks))


def check_hooks(model: LensModel, proxy: Any) -> None:
    """Raise unless the proxy has hooks and each is a hook point of ``model`` (the nearest valid names
    are suggested)."""
    from illusions.activations import check_hook_names

    names = hook_names_of(proxy)
    if not names:
        raise IllusionsError("a proxy has no hook: give at least one (hook_name, function) pair")
    check_hook_names(model, names)


def start_layer(model: LensModel, hook_names: Sequence[str]) -> int | None:
    """The block a proxy's forward pass can start at, from its hook names alone: the earliest block
    any hook lives in, or None (a full forward pass from the tokens) when a hook lies outside the
    blocks (``hook_embed``, ``hook_pos_embed``, ``ln_final.*``) or the model cannot start part-way.

    The one place that asks whether a model takes ``start_at_layer`` (a backend without it runs
    every proxy from the tokens: slower, the same numbers).
    """
    from illusions.activations import hook_layer
    from illusions.backends import runs_from_layer

    layers = [hook_layer(name) for name in hook_names]
    if not layers or any(layer is None for layer in layers):
        return None
    # Probed once per model (TransformerLens 3.9's bridge has the argument but raises).
    return min(layers) if runs_from_layer(model) else None  # type: ignore[type-var]


def check_fit_memory(model: LensModel, split: Split, tokens: Any, mask: Any, names: list[str],
                     sizes: dict[str, int]) -> None:
    """Refuse a fit whose collected activations cannot fit in memory, before collecting them.

    ``sizes`` holds the bytes a position takes at each hook point (:func:`position_bytes`, read from
    one sequence, shared with the decision to stream); collecting holds the
    batches and their concatenation (twice the activations), which must fit in the model device's
    whole memory (:func:`illusions.devices.memory_bytes`).
    """
    from illusions.devices import gigabytes, memory_bytes

    have = memory_bytes(model.cfg.device)
    if have is None:
        return
    per_position = sum(sizes[name] for name in names)
    lengths = mask.sum(dim=1)  # [batch]
    need = 2 * per_position * int(lengths.sum())
    if need <= have:
        return
    fits = int(np.searchsorted(np.cumsum(2 * per_position * lengths.numpy()), have, side="right"))
    where = "this machine" if str(model.cfg.device) == "cpu" else f"device {model.cfg.device}"
    raise IllusionsError(f"fitting on {len(lengths):,} sequences of split {split.name} collects {gigabytes(need)} "
                         f"({per_position:,} bytes a position at {', '.join(names)}, twice while collecting), more "
                         f"than the {gigabytes(have)} of {where}; fit on fewer sequences (fit_n at most about {fits:,})")


def fit_proxies(
    model: LensModel,
    split: Split | None,
    rows: np.ndarray,
    simplifiers: Sequence[Simplifier],
    *,
    batch_size: int = 64,
    token_budget: int | None = None,
) -> list[Proxy]:
    """Collect activations once for all simplifiers' hook points, then fit each one (``split`` may be
    None when every simplifier is data-free). Collection batches hold at most ``batch_size`` rows and
    ``token_budget`` (default :data:`TOKEN_BUDGET`) padded positions: a fit of long sequences takes
    fewer rows per forward pass, and the bundled tasks' batches (64 rows of at most 128 tokens) are
    the plain ``batch_size`` ones, bit for bit as before.

    When the collected activations would take more than :data:`STREAM_FIT_BYTES`, simplifiers that
    can fit from batches (``stream``: svd and resid-svd from scatter matrices, kmeans and resid-kmeans
    in one mini-batch pass, sae and transcoder on a seeded sample) take them batch by batch and only
    the others' are held (:func:`_collect_streamed`), and only those are checked against memory; below
    it every fit reads the held activations, as always.
    """
    import torch

    from illusions.activations import collect

    # Methods that fit every value of their swept parameter from shared work (``fit_sweep``: one
    # decomposition for all ranks of svd) do so once per group of simplifiers differing only there.
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(simplifiers):
        param = getattr(s, "sweep_param", "")
        if param and hasattr(s, "fit_sweep"):
            neutral = next(f.default for f in dataclasses.fields(s) if f.name == param)
            groups.setdefault(dataclasses.replace(s, **{param: neutral}), []).append(i)
        else:
            groups[("one", i)] = [i]
    names = sorted({name for s in simplifiers for name in s.hook_names(model)})
    acts: dict[str, Any] = {}
    streams: dict[int, Any] = {}  # first member of a group -> its stream
    if names:
        # Shortest first, so each collection batch is padded only to its own longest row.
        rows = rows[np.argsort(split.lengths[rows], kind="stable")]
        tokens = torch.as_tensor(split.tokens[rows, : int(split.lengths[rows].max())])
        mask = torch.as_tensor(np.arange(tokens.shape[1])[None, :] < split.lengths[rows][:, None])
        sizes = position_bytes(model, tokens, mask, names)
        positions = _token_budget(token_budget)
        if _can_stream(simplifiers) and sum(sizes.values()) * int(mask.sum()) > STREAM_FIT_BYTES:
            streams = {members[0]: simplifiers[members[0]].stream(model) for members in groups.values()
                       if hasattr(simplifiers[members[0]], "stream")}
            held = sorted({name for i, s in enumerate(simplifiers) if not _streamed(i, groups, streams)
                           for name in s.hook_names(model)})
            if held:
                check_fit_memory(model, split, tokens, mask, held, sizes)
            acts = _collect_streamed(model, tokens, mask, names, held, list(streams.values()), batch_size,
                                     positions)
        else:
            check_fit_memory(model, split, tokens, mask, names, sizes)
            acts = collect(model, tokens, names, mask, batch_size=batch_size, max_positions=positions)
    proxies: dict[int, Proxy] = {}
    for members in groups.values():
        first = simplifiers[members[0]]
        values = [getattr(simplifiers[j], first.sweep_param) for j in members] if len(members) > 1 else []
        if members[0] in streams:
            fitted = streams[members[0]].fit_sweep(values or [getattr(first, first.sweep_param)])
            proxies.update({j: fitted[getattr(simplifiers[j], first.sweep_param)] for j in members})
            continue
        mine = {n: acts[n] for n in first.hook_names(model)}
        if len(members) == 1:
            proxies[members[0]] = first.fit(model, mine)
            continue
        fitted = first.fit_sweep(model, mine, values)
        proxies.update({j: fitted[v] for j, v in zip(members, values, strict=True)})
    out = [proxies[i] for i in range(len(simplifiers))]
    device = torch.device(model.cfg.device)
    if device.type != "cpu":
        # Fits that leave the device (k-means runs in scikit-learn) come back to it, so that no hook
        # copies its tensors across at every call.
        out = [p.to(device) for p in out]
    return out


def _can_stream(simplifiers: Sequence[Simplifier]) -> bool:
    """Whether any simplifier can fit from batches (``stream``)."""
    return any(hasattr(s, "stream") for s in simplifiers)


def _streamed(i: int, groups: dict[Any, list[int]], streams: dict[int, Any]) -> bool:
    return any(i in members and members[0] in streams for members in groups.values())


def position_bytes(model: LensModel, tokens: Any, mask: Any, names: list[str]) -> dict[str, int]:
    """Bytes one position's activation takes at each of ``names``, read from one collected sequence
    (the one probe the fit's memory checks share)."""
    from illusions.activations import collect

    probe = collect(model, tokens[:1], names, mask[:1])
    return {name: t[0].numel() * t.element_size() for name, t in probe.items()}


def _collect_streamed(model: LensModel, tokens: Any, mask: Any, names: list[str], held: list[str],
                      streams: list[Any], batch_size: int, max_positions: int | None = None) -> dict[str, Any]:
    """Activations at ``names`` collected ``batch_size`` rows (and at most ``max_positions`` padded
    positions) at a time: each batch goes to every stream, and only those at ``held`` are kept (joined
    in row order, as ``collect`` returns them)."""
    import torch

    from illusions.activations import collect

    kept: dict[str, list[Any]] = {name: [] for name in held}
    for start in range(0, int(tokens.shape[0]), batch_size):
        batch = collect(model, tokens[start : start + batch_size], names, mask[start : start + batch_size],
                        batch_size=batch_size, max_positions=max_positions)
        for stream in streams:
            stream.add(batch)
        for name in held:
            kept[name].append(batch[name])
    return {name: torch.cat(parts) for name, parts in kept.items()}


# Collected fit activations (bytes) above which simplifiers that can fit from batches (``stream``: svd,
# resid-svd, kmeans, resid-kmeans, sae, transcoder) stream them (500 sequences of 1,024 tokens at one
# 768-wide layer's queries and keys are 3.1 GB, held twice while collecting); the bundled tasks' fits
# (a few MB) always take the held path, bit for bit as before.
STREAM_FIT_BYTES = 2**30


def refine_proxies(
    model: LensModel,
    split: Split,
    rows: np.ndarray,
    simplifiers: Sequence[Simplifier],
    proxies: Sequence[Proxy],
    *,
    candidates: np.ndarray | None,
    batch_size: int = 64,
    token_budget: int | None = None,
) -> list[Proxy]:
    """Proxies whose simplifier searches on the fitting sequences after fitting (``refine``: the
    circuit search of :mod:`illusions.simplifiers.circuit`) replaced by what the search keeps."""
    return [s.refine(model, p, split, rows, candidates=candidates, batch_size=batch_size,
                     max_tokens=batch_tokens(model, token_budget))
            if hasattr(s, "refine") else p for s, p in zip(simplifiers, proxies, strict=True)]


def calibrate_warnings(model: LensModel, split: Split, rows: np.ndarray, proxies: Sequence[Proxy],
                       *, batch_size: int = 64, token_budget: int | None = None) -> list[Proxy]:
    """:func:`illusions.analyses.warning_signals.calibrate`: each signal's threshold on the fitting rows,
    in the evaluation's batches (:func:`batch_tokens`)."""
    from illusions.analyses.warning_signals import calibrate

    return calibrate(model, split, rows, proxies, batch_size=batch_size, max_tokens=batch_tokens(model, token_budget))


def evaluate_split(
    model: LensModel,
    split: Split,
    rows: np.ndarray,
    proxies: Sequence[Proxy],
    *,
    candidates: np.ndarray | None,
    batch_size: int = 64,
    token_budget: int | None = None,
) -> list[Records]:
    """Run the original model once over ``rows`` of a split and every proxy against it.

    Batches hold at most ``batch_size`` rows and :func:`batch_tokens` padded tokens.

    Each proxy runs from the first block its hooks touch (:func:`start_layer`, worked out from the
    hook names) on a copy of the original residual stream cached at that block, so the shared prefix
    is computed once per batch for all proxies and no hook can change what another proxy starts from;
    a proxy with a hook outside the blocks, or any proxy of a model that cannot start at a layer
    (:func:`illusions.backends.runs_from_layer`), runs from the tokens. A hook that never runs in the
    forward pass is an error, not a proxy that agrees with the model everywhere.
    Everything runs on the model's device; only the per-position records come back to the CPU.
    Sparse dictionaries also get their reconstruction and latent statistics on the split
    (:attr:`Records.sparse`), read from the same clean pass (:class:`~illusions.analyses.sparse.CleanPassStats`),
    and their downstream losses (:attr:`Records.downstream`): one more pass per batch with the replaced
    activations zero-ablated (:class:`~illusions.analyses.sparse.ZeroAblation`), run as the proxy is
    (one for all the proxies that zero the same activations from the same block, as a sweep's widths).
    """
    import torch

    setup = _Setup.of(model, proxies)
    parts: list[list[dict[str, np.ndarray]]] = [[] for _ in proxies]
    with torch.inference_mode():
        # Rows run up to their last scored position when that cannot change a number: the dictionaries'
        # statistics read every position, and hooks not known to be causal get whole rows.
        scored_only = not setup.sparse.names and all(causal(p) for p in proxies)
        for batch in iter_batches(split, batch_size, rows=rows, max_tokens=batch_tokens(model, token_budget),
                                  scored_only=scored_only):
            if len(batch.scored) == 0 and not setup.sparse.names:
                continue
            clean = _clean_pass(model, split, batch, setup, candidates)
            if clean is None:  # read for the dictionaries only
                continue
            for j, proxy in enumerate(proxies):
                parts[j].append(_proxy_part(model, split, batch, setup, j, proxy, clean, candidates))
            setup.clean_rows.clear()
    stats = setup.sparse.result(rows)
    return [rec if got is None else dataclasses.replace(rec, sparse=got)
            for rec, got in zip(_join_records(parts, split, rows), stats, strict=True)]


@dataclasses.dataclass
class _Setup:
    """What :func:`evaluate_split` works out once per split for its proxies."""

    device: Any
    f64: Any  # KL and JSD are float64: on the CPU for MPS
    stop: int | None  # n_layers: stop at the final residual and unembed the scored rows only
    hook_sets: list[list[str]]
    starts: list[int | None]  # the block each proxy starts from (None: the tokens)
    cache_names: list[str]  # the residual streams cached for those starts
    # The clean attention rows the JSD compares: only the simplified heads' scored query rows, gathered
    # inside the pattern hook (never a whole [batch, head, query, key] pattern held across passes).
    clean_rows: PatternRows
    sparse: CleanPassStats  # the dictionaries' statistics, from the clean pass
    clean_stop: int | None
    collectors: list[Any]  # each proxy's warning signals, read by capture hooks in front of its own
    ablations: list[ZeroAblation | None]  # the downstream baselines of sparse dictionaries

    @classmethod
    def of(cls, model: LensModel, proxies: Sequence[Proxy]) -> _Setup:
        import torch

        from illusions.activations import stop_layer
        from illusions.analyses.warning_signals import SignalCollector
        from illusions.devices import float64_device

        device = torch.device(model.cfg.device)
        stop = unembed_stop(model)
        hook_sets = [hook_names_of(p) for p in proxies]
        starts = [start_layer(model, names) for names in hook_sets]
        sparse = CleanPassStats(proxies)
        return cls(
            device=device, f64=float64_device(device), stop=stop, hook_sets=hook_sets, starts=starts,
            cache_names=[f"blocks.{layer}.hook_resid_pre" for layer in sorted({s for s in starts if s is not None})],
            clean_rows=PatternRows(sorted({lh for p in proxies for lh in p.heads})), sparse=sparse,
            clean_stop=stop if stop_layer(model, sparse.names) is not None else None,
            collectors=[SignalCollector(p) for p in proxies], ablations=[ZeroAblation.of(g) for g in sparse.groups],
        )


# The meta column every record carries beside its split's own: the length of the position's sequence.
SEQ_LEN = "seq_len"


def record_meta_columns(split: Split) -> set[str]:
    """The meta columns the records of ``split``'s scored positions carry (its own and :data:`SEQ_LEN`),
    known before anything is evaluated."""
    return {*split.scored.meta, SEQ_LEN}


@dataclasses.dataclass
class _Clean:
    """One batch's clean pass: what every proxy is compared against."""

    tokens: Any
    cache: Any  # the residual streams the proxies start from
    seq: Any  # [n] the scored positions' rows and positions in the batch, on the device
    pos: Any
    logits: Any  # [n, vocabulary] at the scored positions
    pred: Any
    ce: Any  # the target's cross-entropy (float64, whole vocabulary), for dictionaries' downstream loss
    # The zero ablations' downstream values by (ablation, start): proxies sharing both share one pass.
    ablated: dict[tuple[ZeroAblation, int | None], dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)


def _clean_pass(model: LensModel, split: Split, batch: Any, setup: _Setup,
                candidates: np.ndarray | None) -> _Clean | None:
    """The original model's pass over a batch, feeding the dictionaries' statistics and keeping the
    clean attention rows; None when the batch has no scored position (read for the dictionaries only)."""
    import torch

    tokens = torch.as_tensor(batch.tokens, device=setup.device)
    lengths = split.lengths[batch.rows]
    sc = batch.scored
    seq_t = torch.as_tensor(sc.seq, device=setup.device)
    pos_t = torch.as_tensor(sc.pos, device=setup.device)
    clean_hooks = setup.sparse.hooks(lengths, tokens.shape[1], setup.device)
    if len(sc):
        clean_hooks += setup.clean_rows.hooks(seq_t, pos_t)
    until = stop_at(setup.clean_stop)
    with model.hooks(fwd_hooks=clean_hooks):
        out, cache = model.run_with_cache(tokens, names_filter=lambda name: name in setup.cache_names, **until)
    if setup.sparse.names:
        setup.sparse.add(batch.rows, lengths)
    if len(sc) == 0:
        return None
    logits = scored_logits(model, out, sc, setup.clean_stop)
    del out  # only the scored positions' logits are kept (memory)
    ce = (cross_entropy_chunked(logits, sc.target, max_elements=KL_CHUNK, device=setup.f64)
          if any(setup.ablations) else None)
    return _Clean(tokens, cache, seq_t, pos_t, logits, restricted_argmax(logits, candidates), ce)


def _proxy_part(model: LensModel, split: Split, batch: Any, setup: _Setup, j: int, proxy: Proxy, clean: _Clean,
                candidates: np.ndarray | None) -> dict[str, np.ndarray]:
    """Proxy ``j``'s pass over a batch and its per-position values against the clean pass."""
    sc = batch.scored
    proxy_logits, captured = _proxy_logits(model, clean.tokens, clean.cache, proxy, setup.hook_sets[j],
                                           setup.starts[j], setup.collectors[j].hooks, sc, setup.stop,
                                           jsd_against=(setup.clean_rows, clean.seq, clean.pos, setup.f64))
    jsd = _attention_jsd(captured, proxy, len(sc), setup.f64)
    if setup.ablations[j] is None:
        kl = kl_divergence_chunked(clean.logits, proxy_logits, max_elements=KL_CHUNK, device=setup.f64)
        down = {}
    else:  # a dictionary's downstream loss also needs the proxy's cross-entropy: one log-softmax for both
        kl, ce_proxy = kl_and_cross_entropy_chunked(clean.logits, proxy_logits, sc.target, max_elements=KL_CHUNK,
                                                    device=setup.f64)
        down = _downstream(model, clean, setup.ablations[j], setup.starts[j], sc, setup.stop, ce_proxy, setup.f64)
    return {
        "rows": batch.rows[sc.seq],
        "pos": sc.pos,
        "target": sc.target,
        "original_pred": clean.pred.cpu().numpy(),
        "proxy_pred": restricted_argmax(proxy_logits, candidates).cpu().numpy(),
        "attention_jsd": jsd.cpu().numpy(),
        "kl": kl.cpu().numpy(),
        f"meta:{SEQ_LEN}": split.lengths[batch.rows[sc.seq]],
        **{f"meta:{k}": v for k, v in sc.meta.items()},
        **{f"warn:{k}": v for k, v in setup.collectors[j].gather(clean.seq, clean.pos).items()},
        **{f"down:{k}": v for k, v in down.items()},
    }


def _proxy_logits(model: LensModel, tokens: Any, cache: Any, proxy: Proxy, hook_names: list[str],
                  start: int | None, signal_hooks: Sequence[Any], sc: Any,
                  stop: int | None = None, jsd_against: tuple[PatternRows, Any, Any, Any] | None = None,
                  ) -> tuple[Any, dict[tuple[int, int], Any]]:
    """One proxy's forward pass on a batch: its logits at the scored positions ``sc`` and, given
    ``jsd_against`` (the clean pass's :class:`PatternRows`, the scored ``seq`` and ``pos`` index
    tensors, the float64 device), the ``[n]`` attention JSD of each head it simplifies, computed
    inside the pattern hook from the same gathered rows (the proxy's whole pattern is never kept).

    It runs from the tokens when ``start`` is None, else from a copy of the cached residual stream
    at block ``start``; a hook of ``hook_names`` that never ran is an error. Given ``stop``
    (``n_layers``), the pass ends at the final residual and only the scored rows are unembedded,
    unless a hook lies after the blocks (``ln_final.*``, ``unembed.*``), which then needs the whole
    output head to run inside the pass.
    """
    from illusions.activations import hook_layer, stop_layer

    if stop is not None and stop_layer(model, [name for name, _ in [*signal_hooks, *proxy.fwd_hooks]]) is None:
        stop = None
    until = stop_at(stop)
    per_head: dict[tuple[int, int], Any] = {}
    capture_hooks = []
    if jsd_against is not None and proxy.heads:
        clean, seq_t, pos_t, f64 = jsd_against
        # After the proxy's own hooks: a hook at hook_pattern (one-hot) is what this one reads.
        capture_hooks = [(name, _jsd_hook(per_head, clean, hook_layer(name), heads, seq_t, pos_t, f64))
                         for name, heads in PatternRows.by_layer(proxy.heads).items()]
    fired: set[str] = set()
    hooks = [*signal_hooks, *proxy.fwd_hooks, *((n, _mark(fired, n)) for n in hook_names), *capture_hooks]
    if start is None:
        out = model.run_with_hooks(tokens, fwd_hooks=hooks, **until)
    else:
        # A copy: a hook that edits its input in place must not reach the cache that
        # the other proxies start from.
        resid = cache[f"blocks.{start}.hook_resid_pre"].clone()
        out = model.run_with_hooks(resid, start_at_layer=start, fwd_hooks=hooks, **until)
    silent = [n for n in hook_names if n not in fired]
    if silent:
        raise IllusionsError(f"hook(s) {', '.join(silent)} never ran in a forward pass of this model "
                             "(a hook point this configuration does not use), so the proxy would "
                             "agree with the model everywhere")
    return scored_logits(model, out, sc, stop), per_head


def _downstream(model: LensModel, clean: _Clean, ablation: ZeroAblation, start: int | None, sc: Any,
                stop: int | None, proxy_ce: Any, f64: Any) -> dict[str, np.ndarray]:
    """A dictionary proxy's downstream values at the scored positions (``sparse.DOWNSTREAM_FIELDS``):
    the target's cross-entropy under the clean logits, the proxy's (``proxy_ce``) and the zero-ablated
    ones, and KL(clean || ablated). The ablation runs from the proxy's ``start`` on the cached residual,
    once per batch for every proxy with the same ablation and start (an SAE sweep's widths at one
    hook): its values depend on nothing else, and are kept in ``clean.ablated``."""
    key = (ablation, start)
    if key not in clean.ablated:
        ablated, _ = _proxy_logits(model, clean.tokens, clean.cache, ablation, hook_names_of(ablation), start, [], sc,
                                   stop)
        kl_ablation, ce_ablation = kl_and_cross_entropy_chunked(clean.logits, ablated, sc.target,
                                                                max_elements=KL_CHUNK, device=f64)
        clean.ablated[key] = {"ce_ablation": ce_ablation.cpu().numpy(), "kl_ablation": kl_ablation.cpu().numpy()}
    return {"ce_original": clean.ce.cpu().numpy(), "ce_proxy": proxy_ce.cpu().numpy(), **clean.ablated[key]}


def _attention_jsd(per_head: dict[tuple[int, int], Any], proxy: Proxy, n: int, f64: Any) -> Any:
    """``[n]`` float64 JSD between the original and the proxy's attention at the scored positions,
    averaged over the proxy's heads (NaN when it simplifies none), from each head's JSD as
    :func:`_proxy_logits` computed it."""
    import torch

    if not proxy.heads:
        return torch.full((n,), float("nan"), dtype=torch.float64, device=f64)
    missing = [f"L{layer}H{head}" for layer, head in proxy.heads if (layer, head) not in per_head]
    if missing:
        raise IllusionsError(f"the attention pattern of head(s) {', '.join(missing)} did not run in the "
                             "proxy's forward pass (a head before the block it starts at)")
    return torch.stack([per_head[lh] for lh in proxy.heads], dim=0).mean(0)  # [n]


class PatternRows:
    """The attention rows the JSD reads, gathered inside the ``hook_pattern`` hooks of the clean pass.

    For each simplified ``(layer, head)``, the scored query rows ``pattern[seq, head, pos]``
    (``[n, key_pos]``, a copy): the ``[batch, head_index, query_pos, key_pos]`` pattern itself is
    dropped as soon as the hook returns (at 16 rows of 1,024 tokens and 12 heads one pattern is
    805 MB of float32; the rows of one head at the scored positions are what the JSD needs).
    Put :meth:`hooks` on a batch's clean pass, read :meth:`rows` during the proxies' passes, and
    :meth:`clear` before the next batch.
    """

    def __init__(self, heads: Sequence[tuple[int, int]]) -> None:
        self.heads = list(dict.fromkeys(heads))
        self._rows: dict[tuple[int, int], Any] = {}

    @staticmethod
    def by_layer(heads: Sequence[tuple[int, int]]) -> dict[str, list[int]]:
        """``{"blocks.L.attn.hook_pattern": [head, ...]}`` for ``(layer, head)`` pairs."""
        out: dict[str, list[int]] = {}
        for layer, head in heads:
            out.setdefault(f"blocks.{layer}.attn.hook_pattern", []).append(head)
        return out

    def hooks(self, seq_t: Any, pos_t: Any) -> list[tuple[str, Callable[..., Any]]]:
        """One gathering hook per simplified layer for the batch's scored ``(seq, pos)`` pairs."""

        def gather(layer: int, heads: list[int]) -> Callable[..., Any]:
            def hook(pattern: Any, hook: Any) -> None:
                for head in heads:
                    self._rows[(layer, head)] = gather_rows(pattern, head, seq_t, pos_t)

            return hook

        from illusions.activations import hook_layer

        return [(name, gather(hook_layer(name), heads)) for name, heads in self.by_layer(self.heads).items()]

    def rows(self, layer: int, head: int) -> Any:
        """``[n, key_pos]`` clean attention of ``head`` at ``layer`` at the scored positions."""
        return self._rows[(layer, head)]

    def clear(self) -> None:
        self._rows = {}


def gather_rows(pattern: Any, head: int, seq_t: Any, pos_t: Any) -> Any:
    """``[n, key_pos]`` rows ``pattern[seq, head, pos]`` of a ``[batch, head_index, query_pos, key_pos]``
    attention pattern (a copy, detached from the pattern)."""
    return pattern.detach()[seq_t, head, pos_t]


def _jsd_hook(store: dict[tuple[int, int], Any], clean: PatternRows, layer: int, heads: list[int], seq_t: Any,
              pos_t: Any, f64: Any) -> Callable[..., Any]:
    """A hook for layer ``layer``'s ``hook_pattern`` in a proxy's pass: each head's ``[n]`` float64 JSD
    between the clean rows and the same rows of this pattern, into ``store``; the pattern passes through
    unchanged."""
    def hook(pattern: Any, hook: Any) -> Any:
        for head in heads:
            proxy_rows = gather_rows(pattern, head, seq_t, pos_t)  # [n, key_pos]
            store[(layer, head)] = js_divergence_chunked(clean.rows(layer, head), proxy_rows,
                                                         max_elements=JSD_CHUNK, device=f64)
        return pattern

    return hook


def _join_records(parts: list[list[dict[str, np.ndarray]]], split: Split, rows: np.ndarray) -> list[Records]:
    """Each proxy's batches of per-position values joined into its :class:`Records`, in the order of
    ``rows`` and then of positions, whatever order the batches ran in."""
    local_seq = np.full(len(split), -1, dtype=np.int64)
    local_seq[rows] = np.arange(rows.shape[0])
    out = []
    for chunks in parts:
        joined = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
        if joined:
            order = np.lexsort((joined["pos"], local_seq[joined["rows"]]))
            joined = {k: v[order] for k, v in joined.items()}
        if not joined:
            empty = np.zeros(0, dtype=np.int64)
            out.append(Records(empty, empty, empty, empty, empty, empty, np.zeros(0), np.zeros(0), {}))
            continue
        out.append(
            Records(
                rows=joined["rows"],
                seq=local_seq[joined["rows"]],
                pos=joined["pos"],
                target=joined["target"],
                original_pred=joined["original_pred"],
                proxy_pred=joined["proxy_pred"],
                attention_jsd=joined["attention_jsd"],
                kl=joined["kl"],
                meta={k.removeprefix("meta:"): v for k, v in joined.items() if k.startswith("meta:")},
                warnings={k.removeprefix("warn:"): v for k, v in joined.items() if k.startswith("warn:")},
                downstream={k.removeprefix("down:"): v for k, v in joined.items() if k.startswith("down:")},
            )
        )
    return out


def _mark(fired: set[str], name: str) -> Callable[..., Any]:
    def hook(activation: Any, hook: Any) -> None:
        fired.add(name)

    return hook


# Padded tokens per evaluation batch (rows x width) by default: 64 rows of 256 tokens. The bundled
# tasks' sequences (at most 128 tokens) keep their 64-row batches, so their numbers do not move.
TOKEN_BUDGET = 16384
# Logits (batch tokens x vocabulary) per batch at most: 2**24 float32 logits are 64 MB per tensor, and the
# evaluation holds about three (the clean and proxy logits at scored positions, the proxy pass's output).
LOGIT_BUDGET = 2**24
# Scored positions x vocabulary per float64 KL chunk: 2**19 logits are 4 MB per float64 copy, and the
# KL holds about five (2**24, the whole batch at a 4,096 vocabulary, took the evaluation from 0.15 to 1.1 GB;
# 2**21 left 32 MB more than 2**19 at 4 x 256, 64 rows of 64). Rows are computed alone: any chunk gives the
# same bits, and the bundled tasks' 43-token vocabulary keeps whole batches in one chunk.
KL_CHUNK = 2**19
# Query rows x key positions per float64 JSD chunk (the same rule as the KL's: rows computed alone, so
# any chunk gives the same bits; the bundled tasks' batches are one chunk).
JSD_CHUNK = 2**19


def _token_budget(token_budget: int | None) -> int:
    """``token_budget``, or :data:`TOKEN_BUDGET` when None: the one place the fit's and the evaluation's
    forward passes take their default from."""
    return TOKEN_BUDGET if token_budget is None else int(token_budget)


def batch_tokens(model: LensModel, token_budget: int | None = None) -> int:
    """Padded tokens one evaluation batch may hold: ``token_budget`` (default :data:`TOKEN_BUDGET`),
    and no more than :data:`LOGIT_BUDGET` logits over the model's vocabulary (a 50,257-token
    vocabulary: 333 tokens, 5 rows of 64; the bundled tasks' 43-token vocabulary: no limit below the
    token budget)."""
    return max(1, min(_token_budget(token_budget), LOGIT_BUDGET // max(int(model.cfg.d_vocab_out), 1)))
