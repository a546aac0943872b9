"""Dyck string structure: depths, top-level segments, matching brackets and scored positions.

Token ids follow the Dyck vocabulary of :mod:`illusions.tasks.dyck`: ``PAD=0``, ``START=1``,
``END=2``, openers ``3 .. 3+k-1`` and closers ``3+k .. 3+2k-1`` for ``k`` bracket types, so opener
``3+i`` is closed by ``3+k+i``. Every function here is numpy-only and works on any right-padded token
array, not only on sampled data, so a user can score strings they bring.

Definitions used throughout (the tests check them against a hand-written example table):
    * **depth** of a token: the stack depth right *after* that token (START, END and PAD: unchanged);
      e.g. ``(a (b b) a)`` has bracket depths ``1 2 1 0``.
    * **segment**: a top-level excursion, from an empty stack back to an empty stack.
    * **segment structure**: the depth sequence of a segment, bracket types ignored
      (``(a (b b) a)`` -> ``(1, 2, 1, 0)``); a string's **structure** is the list of those.
"""

from __future__ import annotations

import numpy as np

from illusions.errors import IllusionsError
from illusions.tasks.base import Scored

PAD, START, END = 0, 1, 2
FIRST_OPENER = 3

# Columns of Scored.meta, in this order.
META_COLUMNS = ("distance", "depth", "key_depth", "key_pos", "length", "max_depth")


def bracket_steps(tokens: np.ndarray, n_types: int) -> np.ndarray:
    """+1 for openers, -1 for closers, 0 for any other token (same shape as ``tokens``)."""
    tokens = np.asarray(tokens)
    is_open = (tokens >= FIRST_OPENER) & (tokens < FIRST_OPENER + n_types)
    is_close = (tokens >= FIRST_OPENER + n_types) & (tokens < FIRST_OPENER + 2 * n_types)
    return is_open.astype(np.int16) - is_close.astype(np.int16)


def depth_after(tokens: np.ndarray, n_types: int) -> np.ndarray:
    """Stack depth right after every token of each row.

    Args:
        tokens: ``[batch, pos]`` (or ``[pos]``) token ids.
        n_types: number of bracket types ``k``.

    Returns:
        int16 array of the same shape; non-bracket tokens repeat the depth before them.
    """
    return np.cumsum(bracket_steps(tokens, n_types), axis=-1, dtype=np.int16)


def depth_sequence(brackets: np.ndarray, n_types: int) -> np.ndarray:
    """The depth after each bracket of one string given as bracket ids only (no START/END).

    Args:
        brackets: ``[n_brackets]`` opener/closer ids.
        n_types: number of bracket types ``k``.

    Returns:
        ``[n_brackets]`` int64 depths.
    """
    return depth_after(np.asarray(brackets), n_types).astype(np.int64)


def segments(depths: np.ndarray) -> list[tuple[int, ...]]:
    """Split one string's depth sequence (after each bracket) into its top-level segments.

    Args:
        depths: ``[n_brackets]`` depths of a balanced string, e.g. from :func:`depth_sequence`.

    Returns:
        The segment structures, each the depth sequence of one excursion ending at depth 0.
    """
    depths = [int(d) for d in np.asarray(depths)]
    out: list[tuple[int, ...]] = []
    start = 0
    for i, d in enumerate(depths):
        if d == 0:
            out.append(tuple(depths[start : i + 1]))
            start = i + 1
    if start != len(depths):
        raise ValueError("depth sequence does not return to 0: the string is not balanced")
    return out


def segment_keys(tokens: np.ndarray, n_types: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact, hashable keys of every top-level segment of every row (bracket types ignored).

    A segment is encoded by its opener/closer pattern as bits (bit ``j`` set when the segment's
    ``j``-th bracket opens), packed into ``ceil(width / 64)`` little words. A Dyck excursion is
    fully determined by that pattern and no two excursions share one (an excursion cannot continue
    with closers after returning to 0), so equal keys mean equal segment structures.

    Args:
        tokens: ``[batch, pos]`` balanced, right-padded rows.
        n_types: number of bracket types.
        width: the longest segment any compared array can hold (``max_len - 2``); arrays whose keys
            are compared must use the same width.

    Returns:
        ``(keys, row)``: ``keys`` a ``[n_segments]`` void array (``.tolist()`` gives ``bytes``),
        ``row`` the ``[n_segments]`` row each segment belongs to, in row then position order.
    """
    n_words = max(1, -(-width // 64))
    steps = bracket_steps(tokens, n_types)
    depth = np.cumsum(steps, axis=-1, dtype=np.int16)
    rows, cols = np.nonzero(steps)  # row-major: grouped by row, positions increasing
    before = depth[rows, cols] - steps[rows, cols]
    starts = before == 0
    seg = np.cumsum(starts) - 1
    offset = cols - cols[starts][seg]
    if offset.size and int(offset.max()) >= 64 * n_words:
        raise ValueError(f"a segment has more than width={width} brackets")
    bits = (steps[rows, cols] > 0).astype(np.uint64) << (offset % 64).astype(np.uint64)
    group = seg * n_words + offset // 64  # nondecreasing, so each group is one contiguous run
    n_seg = int(starts.sum())
    keys = np.zeros(n_seg * n_words, dtype=np.uint64)
    if group.size:
        first = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        keys[group[first]] = np.bitwise_or.reduceat(bits, first)
    keys = keys.reshape(n_seg, n_words)  # [n_segments, n_words]
    return keys.view(np.dtype((np.void, 8 * n_words))).ravel(), rows[starts]


def string_keys(tokens: np.ndarray, width: int) -> np.ndarray:
    """Hashable exact keys of whole rows (padded with PAD to ``width`` tokens).

    Args:
        tokens: ``[batch, pos]`` right-padded rows with ``pos <= width``; ids must fit in a byte.
        width: common width, so that rows of arrays of different widths compare equal.

    Returns:
        ``[batch]`` void array whose ``.tolist()`` gives one ``bytes`` per row.
    """
    padded = np.zeros((tokens.shape[0], width), dtype=np.uint8)
    padded[:, : tokens.shape[1]] = tokens
    return padded.view(np.dtype((np.void, width))).ravel()


def score(
    tokens: np.ndarray,
    lengths: np.ndarray,
    *,
    min_distance: int,
    n_types: int,
) -> Scored:
    """The closing brackets to score in a padded array of Dyck strings.

    Every closer at token index ``c`` whose opener sits at ``o = c - distance`` with
    ``distance >= min_distance`` gives one entry: the **query position** is ``c - 1`` (the logits
    there predict the closer), the target is the closer id.

    Meta columns (int64):
        ``distance``: ``c - o``. ``depth``: the query depth, i.e. the stack depth at the query
        position before the closer pops. ``key_depth``: the stack depth right after the opener was
        pushed. For a matching pair these two are equal by definition (the stack between opener and
        closer returns to the same height); both are kept because analyses group by either name.
        ``key_pos``: ``o``. ``length``: brackets in the string. ``max_depth``: the string's maximum
        depth.

    Args:
        tokens: ``[batch, pos]`` rows ``START brackets END PAD...``.
        lengths: ``[batch]`` non-PAD tokens per row.
        min_distance: keep closers at distance at least this (1 keeps every closer).
        n_types: number of bracket types.

    Returns:
        A :class:`Scored` in row, then position order.

    Raises:
        IllusionsError: a row is not a balanced string of matching brackets.
    """
    tokens = np.asarray(tokens)
    lengths = np.asarray(lengths, dtype=np.int64)
    _check_score_inputs(tokens, lengths, min_distance=min_distance, n_types=n_types)
    seq, close, opener, query_depth, string_depth = _match_closers(
        tokens, lengths, min_distance=min_distance, n_types=n_types
    )
    n_brackets = ((tokens >= FIRST_OPENER) & (tokens < FIRST_OPENER + 2 * n_types)).sum(axis=1, dtype=np.int64)
    meta = {
        "distance": close - opener,
        "depth": query_depth,
        "key_depth": query_depth.copy(),
        "key_pos": opener,
        "length": n_brackets[seq],
        "max_depth": string_depth[seq],
    }
    target = tokens[seq, close].astype(np.int64)
    return Scored(seq=seq, pos=close - 1, target=target, meta=meta)


def _check_score_inputs(tokens: np.ndarray, lengths: np.ndarray, *, min_distance: int, n_types: int) -> None:
    """Refuse what :func:`score` cannot read: wrong shapes, ``min_distance < 1``, tokens beyond a row's
    length that are not PAD, ids outside the vocabulary."""
    if tokens.ndim != 2 or lengths.shape != (tokens.shape[0],):
        raise IllusionsError(
            f"expected tokens [batch, pos] and lengths [batch], got {tokens.shape} and {lengths.shape}"
        )
    if min_distance < 1:
        raise IllusionsError(f"min_distance must be at least 1, got {min_distance}")
    beyond = np.arange(tokens.shape[1])[None, :] >= lengths[:, None]
    if np.any(tokens[beyond] != PAD):
        bad = int(np.flatnonzero(np.any(beyond & (tokens != PAD), axis=1))[0])
        raise IllusionsError(f"row {bad} has non-PAD tokens beyond its length {int(lengths[bad])}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= FIRST_OPENER + 2 * n_types):
        raise IllusionsError(f"token ids must lie in 0..{FIRST_OPENER + 2 * n_types - 1}")


def _match_closers(
    tokens: np.ndarray, lengths: np.ndarray, *, min_distance: int, n_types: int
) -> tuple[np.ndarray, ...]:
    """Match every closer with its opener: ``(seq, close, opener, query_depth)`` of the closers at
    distance >= ``min_distance`` in row, then position order, and each row's maximum depth ``[batch]``.

    Raises IllusionsError on the first unbalanced row (a closer without or with the wrong opener, or
    brackets never closed)."""
    batch, width = tokens.shape
    opener_lo, closer_lo, closer_hi = (
        FIRST_OPENER,
        FIRST_OPENER + n_types,
        FIRST_OPENER + 2 * n_types,
    )
    # Lockstep over positions, rows sorted longest first and tokens made position-major so that step
    # t reads a contiguous prefix; each row's stack holds the positions of its open brackets.
    order = np.argsort(-lengths, kind="stable")
    n_live = np.searchsorted(-lengths[order], -np.arange(width), side="left")
    tok_t = np.ascontiguousarray(tokens[order].T.astype(np.uint8))  # [pos, batch], sorted rows
    stack = np.zeros((batch, width // 2 + 2), dtype=np.int32)  # stack[row, d] = opener at depth d
    depth = np.zeros(batch, dtype=np.int64)
    top = np.zeros(batch, dtype=np.int64)
    found: list[tuple[np.ndarray, ...]] = []
    for t in range(width):
        col = tok_t[t, : n_live[t]]
        rows = np.flatnonzero((col >= opener_lo) & (col < closer_lo))
        depth[rows] += 1
        stack[rows, depth[rows]] = t
        top[rows] = np.maximum(top[rows], depth[rows])
        rows = np.flatnonzero((col >= closer_lo) & (col < closer_hi))
        if rows.size == 0:
            continue
        d = depth[rows]
        if np.any(d == 0):
            bad = int(order[rows[np.flatnonzero(d == 0)[0]]])
            raise IllusionsError(
                f"row {bad} is not balanced: the closer at token {t} has no opener"
            )
        key = stack[rows, d]
        wrong = tok_t[key, rows].astype(np.int64) + n_types != col[rows]
        if np.any(wrong):
            bad = int(order[rows[np.flatnonzero(wrong)[0]]])
            raise IllusionsError(
                f"row {bad} is not balanced: the closer at token {t} does not match its opener"
            )
        depth[rows] = d - 1
        keep = t - key >= min_distance
        found.append((rows[keep], np.full(int(keep.sum()), t), key[keep].astype(np.int64), d[keep]))
    if np.any(depth != 0):
        bad = int(order[np.flatnonzero(depth != 0)[0]])
        raise IllusionsError(f"row {bad} is not balanced: some brackets are never closed")
    if found:
        sorted_row, close, opener, query_depth = (
            np.concatenate(c) for c in zip(*found, strict=True)
        )
    else:
        sorted_row = close = opener = query_depth = np.zeros(0, dtype=np.int64)
    seq = order[sorted_row]
    by_row = np.lexsort((close, seq))
    string_depth = np.empty(batch, dtype=np.int64)
    string_depth[order] = top
    return seq[by_row], close[by_row], opener[by_row], query_depth[by_row], string_depth
