"""Predictions at a task's scored positions, shared by training-time evaluation and the analyses.

``logits[b, p]`` predicts ``tokens[b, p + 1]``; the prediction at a scored position is the argmax of
the logits restricted to the task's candidate tokens (all tokens when there are none).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from illusions.tasks.base import Scored, Split

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float, Int
    from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """Rows ``rows`` of a split, trimmed to their longest sequence, with their scored positions.

    ``scored.seq`` is renumbered to index into this batch (0..len(rows)-1).
    """

    rows: np.ndarray
    tokens: np.ndarray  # [batch, pos] int64
    scored: Scored
    index: np.ndarray  # positions of these entries in the split's full Scored arrays


def iter_batches(split: Split, batch_size: int, *, rows: np.ndarray | None = None,
                 max_tokens: int | None = None, scored_only: bool = False) -> Iterator[Batch]:
    """Batches of a split in row order (or of the given ``rows``), each trimmed to its longest row.

    Rows are sorted by width (length) within the selection so that padding stays small; every scored
    position of the selected rows appears in exactly one batch, and ``Batch.index`` maps it back. A batch holds
    at most ``batch_size`` rows and, given ``max_tokens``, at most that many padded tokens (rows x its
    width; a row longer than that goes alone), so long sequences come in fewer rows per batch.

    ``scored_only``: for work that reads a causal model at the scored positions only, rows without a
    scored position are left out and each row's width is its last scored position + 1 (tokens after it
    cannot change what a causal model computes there), so batches are narrower.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    rows = np.arange(len(split)) if rows is None else np.asarray(rows, dtype=np.int64)
    order = np.argsort(split.scored.seq, kind="stable")
    seq_sorted = split.scored.seq[order]
    widths = split.lengths.astype(np.int64)  # a row's width: its length, or its last scored position + 1
    if scored_only:
        last = np.full(len(split), -1, dtype=np.int64)  # each row's last scored position (-1: none)
        if seq_sorted.size:
            starts = np.flatnonzero(np.r_[True, seq_sorted[1:] != seq_sorted[:-1]])
            last[seq_sorted[starts]] = np.maximum.reduceat(split.scored.pos[order], starts)
        rows = rows[last[rows] >= 0]
        widths[rows] = last[rows] + 1
    rows = rows[np.argsort(widths[rows], kind="stable")]
    for chunk in _row_chunks(widths[rows], rows, batch_size, max_tokens):
        width = int(widths[chunk].max())
        local = np.full(len(split), -1, dtype=np.int64)
        local[chunk] = np.arange(chunk.shape[0])
        # Scored entries of these rows, found through the seq-sorted order without a full scan per row.
        lo = np.searchsorted(seq_sorted, chunk, side="left")
        hi = np.searchsorted(seq_sorted, chunk, side="right")
        index = np.concatenate([order[a:b] for a, b in zip(lo, hi, strict=True)]) if chunk.size else order[:0]
        index = np.sort(index)
        sc = split.scored.subset(index)
        sc = Scored(seq=local[sc.seq], pos=sc.pos, target=sc.target, meta=sc.meta)
        yield Batch(rows=chunk, tokens=split.tokens[chunk, :width], scored=sc, index=index)


def _row_chunks(widths: np.ndarray, rows: np.ndarray, batch_size: int, max_tokens: int | None) -> list[np.ndarray]:
    """``rows`` (ascending ``widths``) cut into runs of at most ``batch_size`` rows and ``max_tokens``
    padded tokens, the widest row of a run setting its width."""
    if max_tokens is None:
        return [rows[start : start + batch_size] for start in range(0, rows.shape[0], batch_size)]
    out, start, n = [], 0, rows.shape[0]
    for end in range(1, n + 1):
        # rows start..end-1 go together; row `end` would make the run too long or too wide
        if end == n or end - start == batch_size or (end + 1 - start) * int(widths[end]) > max_tokens:
            out.append(rows[start:end])
            start = end
    return out


def gather_scored(logits: Float[Tensor, "batch pos d_vocab"], scored: Scored) -> Float[Tensor, "n d_vocab"]:
    """The logit vectors at the scored (query) positions of a batch."""
    import torch

    seq = torch.as_tensor(scored.seq, device=logits.device)
    pos = torch.as_tensor(scored.pos, device=logits.device)
    return logits[seq, pos]


def restricted_argmax(
    logits: Float[Tensor, "n d_vocab"], candidates: np.ndarray | None
) -> Int[Tensor, " n"]:
    """Argmax over the candidate token ids (whole vocabulary when ``candidates`` is None)."""
    import torch

    if candidates is None:
        return logits.argmax(dim=-1)
    cand = torch.as_tensor(candidates, device=logits.device)
    return cand[logits[:, cand].argmax(dim=-1)]


def accuracy_on_split(
    model: torch.nn.Module,
    split: Split,
    candidates: np.ndarray | None,
    *,
    batch_size: int = 64,
    rows: np.ndarray | None = None,
) -> tuple[float, int]:
    """Task accuracy of ``model`` on a split's scored positions: ``(accuracy, n_positions)``."""
    import torch

    correct = 0
    total = 0
    with torch.no_grad():
        for batch in iter_batches(split, batch_size, rows=rows):
            if len(batch.scored) == 0:
                continue
            logits = model(torch.as_tensor(batch.tokens))
            pred = restricted_argmax(gather_scored(logits, batch.scored), candidates)
            correct += int((pred.cpu().numpy() == batch.scored.target).sum())
            total += len(batch.scored)
    return (correct / total if total else float("nan")), total
