"""Examples for the report: which sequences to show, their predictions and original/proxy attention.

For each evaluated split the report shows the sequences where the proxy departs most from the
original model, those around the median and those where it departs least (ranked by changed
predictions, then attention JSD, then lowest row), each with its scored positions (target, both
predictions, KL, JSD, meta columns). Patterns are computed for the proxy's simplified heads, trimmed
to the sequence length and stored as the lower triangle in bytes, deflated (causal attention is zero
above the diagonal): a 128-token example with eight patterns takes a few tens of kB of HTML.
"""

from __future__ import annotations

import base64
import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor

    from illusions.backends import LensModel

# Packed patterns are bytes in units of 1/PACK_SCALE.
PACK_SCALE = 255
# At most this many simplified heads are drawn per example (the rest are named in the caption).
MAX_HEADS = 8


@dataclasses.dataclass(frozen=True)
class ExampleChoice:
    """One sequence picked from a split.

    Attributes:
        split: split name.
        row: row of the split's token array.
        n_scored: scored positions in that sequence.
        disagreements: scored positions where proxy and original predict differently.
        mean_jsd: mean attention JSD over its scored positions (NaN when the proxy changes no head).
        changed_pos: query positions with a changed prediction.
        kind: why it was picked: ``most``, ``median`` or ``fewest`` disagreements.
    """

    split: str
    row: int
    n_scored: int
    disagreements: int
    mean_jsd: float
    changed_pos: tuple[int, ...]
    kind: str = "most"


def choose_examples(split: str, records: Any, n_each: int = 2) -> list[ExampleChoice]:
    """Sequences of ``records`` with the most, the median and the fewest disagreements.

    Sequences are ranked by disagreements, then mean attention JSD, then lowest row (a full tie);
    ``n_each`` are taken from the top, around the median and from the bottom of that ranking, each
    sequence once (fewer when the split has fewer than ``3 * n_each`` sequences).

    Args:
        split: split name, copied into the result.
        records: per-position records of one proxy on the split (``rows``, ``pos``,
            ``original_pred``, ``proxy_pred``, ``attention_jsd``).
        n_each: sequences taken at each of the three places.

    Returns:
        The choices, most disagreeing first; empty when the split has no scored position.
    """
    if len(records.rows) == 0:
        return []
    rows, inverse = np.unique(records.rows, return_inverse=True)
    changed = (records.original_pred != records.proxy_pred).astype(np.int64)
    disagreements = np.bincount(inverse, weights=changed, minlength=rows.shape[0])
    counts = np.bincount(inverse, minlength=rows.shape[0])
    jsd = np.nan_to_num(records.attention_jsd.astype(np.float64), nan=0.0)
    mean_jsd = np.bincount(inverse, weights=jsd, minlength=rows.shape[0]) / counts
    # lexsort's last key is the primary one; -rows makes the lowest row win a full tie.
    ranking = np.lexsort((-rows, mean_jsd, disagreements))[::-1]  # most disagreeing first
    n = ranking.shape[0]
    mid = max(0, min(n - n_each, (n - n_each) // 2))
    places = [("most", range(0, min(n_each, n))), ("median", range(mid, min(mid + n_each, n))),
              ("fewest", range(max(0, n - n_each), n))]
    seen: set[int] = set()
    out = []
    for kind, ranks in places:
        for rank in ranks:
            best = int(ranking[rank])
            if best in seen:
                continue
            seen.add(best)
            mine = inverse == best
            has_jsd = not np.all(np.isnan(records.attention_jsd[mine]))
            out.append(ExampleChoice(
                split=split,
                row=int(rows[best]),
                n_scored=int(counts[best]),
                disagreements=int(disagreements[best]),
                mean_jsd=float(mean_jsd[best]) if has_jsd else float("nan"),
                changed_pos=tuple(int(p) for p in np.sort(records.pos[mine & (changed == 1)])),
                kind=kind,
            ))
    return out


def choose_example(split: str, records: Any) -> ExampleChoice | None:
    """The sequence of ``records`` with most disagreements (then highest mean JSD, then lowest row)."""
    found = choose_examples(split, records, n_each=1)
    return found[0] if found else None


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
    return batch_patterns(model, [tokens], heads, fwd_hooks)[0]


def batch_patterns(
    model: LensModel,
    sequences: Sequence[np.ndarray],
    heads: Sequence[tuple[int, int]],
    fwd_hooks: Sequence[tuple[str, Any]] = (),
) -> list[Float[Tensor, "head_index pos key_pos"]]:
    """:func:`head_patterns` of several sequences in one forward pass.

    The sequences are right-padded to the longest; attention is causal, so a sequence's patterns never
    see the padding after it. The pass stops after the last block holding one of ``heads`` (hooks of a
    later block cannot change these patterns).

    Returns:
        One ``[len(heads), pos, pos]`` tensor per sequence, ``pos`` its own length.
    """
    import torch

    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int) -> Any:
        def hook(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
            captured[layer] = pattern.detach()
            return pattern

        return hook

    layers = sorted({layer for layer, _ in heads})
    lengths = [int(np.asarray(t).shape[0]) for t in sequences]
    batch = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
    for i, t in enumerate(sequences):
        batch[i, : lengths[i]] = torch.as_tensor(np.asarray(t), dtype=torch.long)
    capture_hooks = [(f"blocks.{layer}.attn.hook_pattern", capture(layer)) for layer in layers]
    with torch.inference_mode(), model.hooks(fwd_hooks=list(fwd_hooks) + capture_hooks):
        model(batch.to(model.cfg.device), stop_at_layer=layers[-1] + 1)
    # captured[layer]: [batch, head_index, pos, key_pos]
    full = torch.stack([captured[layer][:, head] for layer, head in heads], dim=1).float().cpu()
    return [full[i, :, :n, :n] for i, n in enumerate(lengths)]


def pack_patterns(patterns: np.ndarray) -> str:
    """``[head, pos, pos]`` causal patterns as text for the page: per head, row ``i``'s keys ``0..i`` as
    bytes (``round(255 p)``), all rows of all heads concatenated, deflated (zlib) and base64-encoded.

    Causal attention is zero above the diagonal, so only the lower triangle travels; the page inflates
    it with the browser's ``DecompressionStream("deflate")``. A 128-token sequence with eight heads
    takes about 15-40 kB.
    """
    p = np.clip(np.asarray(patterns, dtype=np.float64), 0.0, 1.0)
    n = p.shape[1]
    rows, cols = np.tril_indices(n)
    quantised = np.rint(p[:, rows, cols] * PACK_SCALE).astype(np.uint8)  # [head, n(n+1)/2]
    # Level 6 (zlib's default): level 9 was 10x slower here for 5% fewer bytes.
    return base64.b64encode(zlib.compress(quantised.tobytes(), 6)).decode("ascii")


def unpack_patterns(text: str, n_heads: int, n: int) -> np.ndarray:
    """:func:`pack_patterns` undone: ``[head, pos, pos]`` with the upper triangle zero."""
    flat = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8).reshape(n_heads, -1)
    out = np.zeros((n_heads, n, n))
    rows, cols = np.tril_indices(n)
    out[:, rows, cols] = flat / PACK_SCALE
    return out


@dataclasses.dataclass(frozen=True)
class Example:
    """Everything the page needs to show one sequence, original beside proxy.

    Attributes:
        choice: which sequence and why.
        tokens: readable token strings.
        positions: one dict per scored position, in position order: ``pos``, ``token``, ``target``,
            ``original``, ``proxy`` (readable tokens), ``kl``, ``jsd`` and the split's meta columns.
        head_names: e.g. ``L1H0`` (empty when the proxy changes no head directly).
        original: packed patterns of those heads (:func:`pack_patterns`), "" when none.
        proxy: the same under the proxy.
        hidden_heads: simplified heads left out of the drawing (beyond ``MAX_HEADS``).
    """

    choice: ExampleChoice
    tokens: tuple[str, ...]
    positions: tuple[dict[str, Any], ...]
    head_names: tuple[str, ...]
    original: str
    proxy: str
    hidden_heads: tuple[str, ...] = ()


def positions_of(records: Any, row: int, vocab_tokens: Sequence[str]) -> tuple[dict[str, Any], ...]:
    """The scored positions of split row ``row`` in ``records``, readable (see :class:`Example`)."""
    mine = np.flatnonzero(records.rows == row)
    mine = mine[np.argsort(records.pos[mine], kind="stable")]
    out = []
    for i in mine:
        entry: dict[str, Any] = {
            "pos": int(records.pos[i]), "target": str(vocab_tokens[int(records.target[i])]),
            "original": str(vocab_tokens[int(records.original_pred[i])]),
            "proxy": str(vocab_tokens[int(records.proxy_pred[i])]),
            "kl": float(records.kl[i]), "jsd": float(records.attention_jsd[i]),
        }
        entry.update({k: v[i].item() for k, v in records.meta.items()})
        out.append(entry)
    return tuple(out)


def build_examples(
    model: LensModel,
    splits: Mapping[str, Any],
    records: Mapping[str, Any],
    proxy: Any,
    vocab_tokens: Sequence[str],
    n_each: int = 2,
) -> list[Example]:
    """The chosen sequences of every split (in ``records`` order), with both attention patterns.

    Args:
        model: the original model.
        splits: split name -> :class:`illusions.tasks.Split`.
        records: split name -> records of ``proxy`` on that split.
        proxy: the fitted proxy (``heads``, ``fwd_hooks``).
        vocab_tokens: readable form of each token id.
        n_each: sequences per place (most, median, fewest disagreements) and split.

    Returns:
        The examples; splits without scored positions have none.
    """
    all_heads = [tuple(h) for h in proxy.heads]
    heads = all_heads[:MAX_HEADS]
    names = tuple(f"L{layer}H{head}" for layer, head in heads)
    hidden = tuple(f"L{layer}H{head}" for layer, head in all_heads[MAX_HEADS:])
    out = []
    for name, rec in records.items():
        split = splits[name]
        choices = choose_examples(name, rec, n_each)
        seqs = [np.asarray(split.tokens[c.row, : int(split.lengths[c.row])]) for c in choices]
        originals = simplifieds = [""] * len(choices)
        if heads and choices:  # one forward pass per split and model, not one per sequence
            originals = [pack_patterns(p.numpy()) for p in batch_patterns(model, seqs, heads)]
            simplifieds = [pack_patterns(p.numpy()) for p in batch_patterns(model, seqs, heads, proxy.fwd_hooks)]
        for choice, tokens, original, simplified in zip(choices, seqs, originals, simplifieds, strict=True):
            out.append(Example(
                choice=choice,
                tokens=tuple(str(vocab_tokens[int(t)]) for t in tokens),
                positions=positions_of(rec, choice.row, vocab_tokens),
                head_names=names,
                original=original,
                proxy=simplified,
                hidden_heads=hidden,
            ))
    return out
