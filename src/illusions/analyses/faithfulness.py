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

from illusions.analyses.sparse import sparse_stats
from illusions.errors import IllusionsError
from illusions.metric_table import POSITION_METRICS
from illusions.metrics import js_divergence, kl_divergence_chunked
from illusions.scoring import gather_scored, iter_batches, restricted_argmax
from illusions.tasks.base import Split

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from illusions.simplifiers.base import Proxy, Simplifier

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class Records:
    """Per-position outcomes of one proxy on one split (all arrays ``[n]``).

    ``seq`` indexes the evaluated sequences of the split (``rows[seq]`` is the split row);
    ``attention_jsd`` is NaN when the proxy leaves every attention pattern unchanged by construction
    (no targeted head). ``sparse`` holds the per-sequence dictionary statistics of a sparse
    dictionary proxy (:class:`illusions.analyses.sparse.SparseStats`), None for other proxies.
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
    model: HookedTransformer,
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
    token_budget: int | None = None,
) -> AnalysisResult:
    """Fit each simplifier on ``fit_n`` sequences of ``fit_split`` and evaluate it on every split.

    Args:
        model: the original model.
        splits: named splits; ``fit_split`` must be among them.
        simplifiers: configured simplifiers (e.g. several ranks of one method, for a sweep).
        candidates: token ids the prediction argmax ranges over (None: whole vocabulary).
        fit_split: the split whose sequences the proxies are fitted on.
        fit_n: number of fitting sequences (the paper fits on about 1,000 training sequences).
        eval_splits: splits to evaluate (default: every split except ``fit_split``).
        max_seqs: evaluate at most this many sequences per split (drawn with ``seed``).
        seed: seeds the choice of fitting and evaluation sequences.
        batch_size: sequences per forward pass.
        progress: called as ``progress(stage, done, total)``.
        token_budget: padded tokens per evaluation batch at most (default: :data:`TOKEN_BUDGET`; see
            :func:`batch_tokens`).

    Returns:
        The fitted proxies and per-position records for every (split, proxy) pair.
    """
    if fit_split not in splits:
        raise IllusionsError(f"fit split {fit_split!r} not found; splits: {', '.join(splits)}")
    if eval_splits is None:
        eval_splits = [name for name in splits if name != fit_split]
    unknown = [s for s in eval_splits if s not in splits]
    if unknown:
        raise IllusionsError(f"unknown split(s) {', '.join(unknown)}; splits: {', '.join(splits)}")
    if fit_n < 1:
        raise IllusionsError(f"fit_n must be at least 1, got {fit_n}")
    if not simplifiers:
        raise IllusionsError("no simplifier given")

    rng = np.random.default_rng(seed)
    fit_rows = select_rows(len(splits[fit_split]), fit_n, rng)
    proxies = fit_proxies(model, splits[fit_split], fit_rows, simplifiers, batch_size=batch_size)
    split_rows = {name: select_rows(len(splits[name]), max_seqs, rng) for name in eval_splits}
    records: dict[tuple[str, int], Records] = {}
    for i, name in enumerate(eval_splits):
        if progress:
            progress(name, i, len(eval_splits))
        evaluated = evaluate_split(model, splits[name], split_rows[name], proxies, candidates=candidates,
                                   batch_size=batch_size, token_budget=token_budget)
        # Sparse dictionaries also report their reconstruction and latents on the split.
        stats = sparse_stats(model, splits[name], split_rows[name], proxies, batch_size=batch_size)
        for j, rec in enumerate(evaluated):
            records[(name, j)] = rec if stats[j] is None else dataclasses.replace(rec, sparse=stats[j])
    if progress:
        progress("done", len(eval_splits), len(eval_splits))
    return AnalysisResult(proxies, proxy_labels(proxies), split_rows, records, fit_rows)


def fit_proxies(
    model: HookedTransformer,
    split: Split,
    rows: np.ndarray,
    simplifiers: Sequence[Simplifier],
    *,
    batch_size: int = 64,
) -> list[Proxy]:
    """Collect activations once for all simplifiers' hook points, then fit each one."""
    import torch

    from illusions.activations import collect

    names = sorted({name for s in simplifiers for name in s.hook_names(model)})
    acts: dict[str, Any] = {}
    if names:
        # Shortest first, so each collection batch is padded only to its own longest row.
        rows = rows[np.argsort(split.lengths[rows], kind="stable")]
        tokens = torch.as_tensor(split.tokens[rows, : int(split.lengths[rows].max())])
        mask = torch.as_tensor(np.arange(tokens.shape[1])[None, :] < split.lengths[rows][:, None])
        acts = collect(model, tokens, names, mask, batch_size=batch_size)
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
    proxies: dict[int, Proxy] = {}
    for members in groups.values():
        first = simplifiers[members[0]]
        mine = {n: acts[n] for n in first.hook_names(model)}
        if len(members) == 1:
            proxies[members[0]] = first.fit(model, mine)
            continue
        values = [getattr(simplifiers[j], first.sweep_param) for j in members]
        fitted = first.fit_sweep(model, mine, values)
        proxies.update({j: fitted[v] for j, v in zip(members, values, strict=True)})
    out = [proxies[i] for i in range(len(simplifiers))]
    device = torch.device(model.cfg.device)
    if device.type != "cpu":
        # Fits that leave the device (k-means runs in scikit-learn) come back to it, so that no hook
        # copies its tensors across at every call.
        out = [p.to(device) for p in out]
    return out


def evaluate_split(
    model: HookedTransformer,
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

    Each proxy runs from its first simplified layer (``start_at_layer``) on the original residual
    stream cached at that layer, so the shared prefix is computed once per batch for all proxies.
    Everything runs on the model's device; only the per-position records come back to the CPU.
    """
    import torch

    from illusions.devices import float64_device

    device = torch.device(model.cfg.device)
    f64 = float64_device(device)  # KL and JSD are float64: on the CPU for MPS

    first_layers = sorted({p.first_layer for p in proxies})
    pattern_layers = sorted({layer for p in proxies for layer, _ in p.heads})
    cache_names = [f"blocks.{layer}.hook_resid_pre" for layer in first_layers] + [
        f"blocks.{layer}.attn.hook_pattern" for layer in pattern_layers
    ]
    local_seq = np.full(len(split), -1, dtype=np.int64)
    local_seq[rows] = np.arange(rows.shape[0])
    parts: list[list[dict[str, np.ndarray]]] = [[] for _ in proxies]

    with torch.inference_mode():
        for batch in iter_batches(split, batch_size, rows=rows, max_tokens=batch_tokens(model, token_budget)):
            if len(batch.scored) == 0:
                continue
            tokens = torch.as_tensor(batch.tokens, device=device)
            logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in cache_names)
            sc = batch.scored
            seq_t = torch.as_tensor(sc.seq, device=device)
            pos_t = torch.as_tensor(sc.pos, device=device)
            clean_logits = gather_scored(logits, sc)
            del logits  # only the scored positions' logits are kept (memory)
            clean_pred = restricted_argmax(clean_logits, candidates)
            for j, proxy in enumerate(proxies):
                captured: dict[int, torch.Tensor] = {}
                layers = sorted({layer for layer, _ in proxy.heads})
                capture_hooks = [
                    (f"blocks.{layer}.attn.hook_pattern", _capture(captured, layer)) for layer in layers
                ]
                resid = cache[f"blocks.{proxy.first_layer}.hook_resid_pre"]
                proxy_logits_full = model.run_with_hooks(
                    resid,
                    start_at_layer=proxy.first_layer,
                    fwd_hooks=list(proxy.fwd_hooks) + capture_hooks,
                )
                proxy_logits = gather_scored(proxy_logits_full, sc)
                del proxy_logits_full
                jsd = torch.full((len(sc),), float("nan"), dtype=torch.float64, device=f64)
                if proxy.heads:
                    per_head = []
                    for layer, head in proxy.heads:
                        clean_pat = cache[f"blocks.{layer}.attn.hook_pattern"][seq_t, head, pos_t]  # [n, key_pos]
                        proxy_pat = captured[layer][seq_t, head, pos_t]  # [n, key_pos]
                        per_head.append(js_divergence(clean_pat.to(f64), proxy_pat.to(f64)))
                    jsd = torch.stack(per_head, dim=0).mean(0)  # [n]
                parts[j].append(
                    {
                        "rows": batch.rows[sc.seq],
                        "pos": sc.pos,
                        "target": sc.target,
                        "original_pred": clean_pred.cpu().numpy(),
                        "proxy_pred": restricted_argmax(proxy_logits, candidates).cpu().numpy(),
                        "attention_jsd": jsd.cpu().numpy(),
                        "kl": kl_divergence_chunked(clean_logits, proxy_logits, max_elements=KL_CHUNK,
                                                    device=f64).cpu().numpy(),
                        "meta:seq_len": split.lengths[batch.rows[sc.seq]],
                        **{f"meta:{k}": v for k, v in sc.meta.items()},
                    }
                )
    out = []
    for chunks in parts:
        joined = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
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
            )
        )
    return out


# Padded tokens per evaluation batch (rows x width) by default: 64 rows of 256 tokens. The bundled
# tasks' sequences (at most 128 tokens) keep their 64-row batches, so their numbers do not move.
TOKEN_BUDGET = 16384
# Logits (batch tokens x vocabulary) per batch at most: 2**24 float32 logits are 64 MB per tensor, and the
# evaluation holds about three (the clean and proxy logits at scored positions, the proxy pass's output).
LOGIT_BUDGET = 2**24
# Scored positions x vocabulary per float64 KL chunk: 2**21 logits are 16 MB per float64 copy, and the
# KL holds about five (2**24, the whole batch at a 4,096 vocabulary, took the evaluation from 0.15 to 1.1 GB).
KL_CHUNK = 2**21


def batch_tokens(model: HookedTransformer, token_budget: int | None = None) -> int:
    """Padded tokens one evaluation batch may hold: ``token_budget`` (default :data:`TOKEN_BUDGET`),
    and no more than :data:`LOGIT_BUDGET` logits over the model's vocabulary (a 50,257-token
    vocabulary: 333 tokens, 5 rows of 64; the bundled tasks' 43-token vocabulary: no limit below the
    token budget)."""
    budget = TOKEN_BUDGET if token_budget is None else int(token_budget)
    return max(1, min(budget, LOGIT_BUDGET // max(int(model.cfg.d_vocab_out), 1)))


def _capture(store: dict[int, Any], layer: int) -> Callable[..., Any]:
    def hook(pattern: Any, hook: Any) -> Any:
        store[layer] = pattern
        return pattern

    return hook

