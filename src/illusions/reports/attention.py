"""Attention examples for the report: which sequences to show, and their original/proxy patterns.

For each evaluated split the report shows the sequence where the proxy departs most from the
original model: the most changed predictions, ties broken by the larger attention JSD, then by the
lower row. Patterns are computed for the proxy's simplified heads, trimmed to the sequence length
and stored as the lower triangle in thousandths (causal attention is zero above the diagonal), which
keeps a 128-token example with eight patterns near 0.2 MB of HTML.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor

    from illusions.backends import LensModel

# Patterns are stored as integers in units of 1/SCALE (three decimals).
SCALE = 1000
# At most this many simplified heads are drawn per example (the rest are named in the caption).
MAX_HEADS = 8


@dataclasses.dataclass(frozen=True)
class ExampleChoice:
    """The sequence picked from one split.

    Attributes:
        split: split name.
        row: row of the split's token array.
        n_scored: scored positions in that sequence.
        disagreements: scored positions where proxy and original predict differently.
        mean_jsd: mean attention JSD over its scored positions (NaN when the proxy changes no head).
        changed_pos: query positions with a changed prediction.
    """

    split: str
    row: int
    n_scored: int
    disagreements: int
    mean_jsd: float
    changed_pos: tuple[int, ...]


def choose_example(split: str, records: Any) -> ExampleChoice | None:
    """The sequence of ``records`` with most disagreements (then highest mean JSD, then lowest row).

    Args:
        split: split name, copied into the result.
        records: per-position records of one proxy on the split (``rows``, ``pos``,
            ``original_pred``, ``proxy_pred``, ``attention_jsd``).

    Returns:
        The choice, or None when the split has no scored position.
    """
    if len(records.rows) == 0:
        return None
    rows, inverse = np.unique(records.rows, return_inverse=True)
    changed = (records.original_pred != records.proxy_pred).astype(np.int64)
    disagreements = np.bincount(inverse, weights=changed, minlength=rows.shape[0])
    counts = np.bincount(inverse, minlength=rows.shape[0])
    jsd = np.nan_to_num(records.attention_jsd.astype(np.float64), nan=0.0)
    mean_jsd = np.bincount(inverse, weights=jsd, minlength=rows.shape[0]) / counts
    # lexsort's last key is the primary one; -rows makes the lowest row win a full tie.
    best = int(np.lexsort((-rows, mean_jsd, disagreements))[-1])
    mine = inverse == best
    has_jsd = not np.all(np.isnan(records.attention_jsd[mine]))
    return ExampleChoice(
        split=split,
        row=int(rows[best]),
        n_scored=int(counts[best]),
        disagreements=int(disagreements[best]),
        mean_jsd=float(mean_jsd[best]) if has_jsd else float("nan"),
        changed_pos=tuple(int(p) for p in np.sort(records.pos[mine & (changed == 1)])),
    )


def head_patterns(
    model: LensModel,
    tokens: np.ndarray,
    heads: Sequence[tuple[int, int]],
    fwd_hooks: Sequence[tuple[str, Any]] = (),
) -> Float[Tensor, "head_index pos key_pos"]:
    """Attention patterns of ``heads`` on one sequence, with ``fwd_hooks`` (a proxy) attached or not.

    Args:
        model: the original model.
        tokens: ``[pos]`` token ids of one sequence, without padding.
        heads: ``(layer, head)`` pairs, in output order.
        fwd_hooks: the proxy's hooks (empty: the original model).

    Returns:
        ``[len(heads), pos, pos]`` patterns (rows: query positions, columns: key positions).
    """
    import torch

    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int) -> Any:
        def hook(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
            captured[layer] = pattern.detach()
            return pattern

        return hook

    layers = sorted({layer for layer, _ in heads})
    capture_hooks = [(f"blocks.{layer}.attn.hook_pattern", capture(layer)) for layer in layers]
    with torch.inference_mode():
        model.run_with_hooks(torch.as_tensor(tokens, dtype=torch.long)[None, :],
                             fwd_hooks=list(fwd_hooks) + capture_hooks)
    # captured[layer]: [batch=1, head_index, pos, key_pos]
    return torch.stack([captured[layer][0, head] for layer, head in heads]).float().cpu()


def lower_triangle(patterns: np.ndarray) -> list[list[list[int]]]:
    """``[head, pos, pos]`` patterns as, per head, row ``i`` holding keys ``0..i`` in 1/SCALE units."""
    scaled = np.rint(np.asarray(patterns, dtype=np.float64) * SCALE).astype(np.int64)
    return [[scaled[h, i, : i + 1].tolist() for i in range(scaled.shape[1])] for h in range(scaled.shape[0])]


@dataclasses.dataclass(frozen=True)
class AttentionExample:
    """Everything the page needs to draw one example, original beside proxy.

    Attributes:
        choice: which sequence and why.
        tokens: readable token strings.
        head_names: e.g. ``L1H0``.
        original: per head, lower-triangle rows in 1/SCALE units.
        proxy: the same under the proxy.
        hidden_heads: simplified heads left out of the drawing (beyond ``MAX_HEADS``).
    """

    choice: ExampleChoice
    tokens: tuple[str, ...]
    head_names: tuple[str, ...]
    original: list[list[list[int]]]
    proxy: list[list[list[int]]]
    hidden_heads: tuple[str, ...] = ()


def build_examples(
    model: LensModel,
    splits: Mapping[str, Any],
    records: Mapping[str, Any],
    proxy: Any,
    vocab_tokens: Sequence[str],
) -> list[AttentionExample]:
    """One example per split (in ``records`` order): the most-disagreeing sequence, both patterns.

    Args:
        model: the original model.
        splits: split name -> :class:`illusions.tasks.Split`.
        records: split name -> records of ``proxy`` on that split.
        proxy: the fitted proxy (``heads``, ``fwd_hooks``).
        vocab_tokens: readable form of each token id.

    Returns:
        The examples; splits without scored positions are skipped.
    """
    all_heads = [tuple(h) for h in proxy.heads]
    heads = all_heads[:MAX_HEADS]
    names = tuple(f"L{layer}H{head}" for layer, head in heads)
    hidden = tuple(f"L{layer}H{head}" for layer, head in all_heads[MAX_HEADS:])
    out = []
    for name, rec in records.items():
        choice = choose_example(name, rec)
        if choice is None or not heads:
            continue
        split = splits[name]
        tokens = np.asarray(split.tokens[choice.row, : int(split.lengths[choice.row])])
        original = head_patterns(model, tokens, heads).numpy()
        simplified = head_patterns(model, tokens, heads, proxy.fwd_hooks).numpy()
        out.append(AttentionExample(
            choice=choice,
            tokens=tuple(str(vocab_tokens[int(t)]) for t in tokens),
            head_names=names,
            original=lower_triangle(original),
            proxy=lower_triangle(simplified),
            hidden_heads=hidden,
        ))
    return out
