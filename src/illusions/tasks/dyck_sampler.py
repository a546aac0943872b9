"""The Dyck-(k, m) sampler of Hewitt et al. (2020) / Murty et al. (2023), vectorised over strings.

At every step, with the current stack depth ``d``:
    * ``d == 0``: END with probability 1/2, else each of the ``k`` openers with probability 1/(2k);
    * ``d == m``: close the top bracket;
    * otherwise: close the top bracket with probability 1/2, else each opener with 1/(2k).
Strings with fewer than ``min_brackets`` brackets, or longer than ``max_len`` tokens with START and
END, are rejected and re-drawn, so accepted strings follow the process conditioned on both.

A batch of strings is stepped in lockstep (one numpy operation per token position over the rows still
running, each row's stack a row of a 2-D array) rather than one Python loop per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from illusions.tasks.dyck_structure import END, FIRST_OPENER, START


@dataclass(frozen=True)
class Sampled:
    """Accepted strings and how many draws they took.

    Attributes:
        tokens: ``[n, max_len]`` uint8 rows ``START brackets END PAD...``.
        lengths: ``[n]`` int64 non-PAD tokens per row.
        drawn: strings simulated in total (accepted + rejected).
        accepted: how many of them were accepted (``>= n``; the surplus of the last round is
            dropped), so ``accepted / drawn`` is the sampler's acceptance rate.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    drawn: int
    accepted: int


def _simulate(
    rng: np.random.Generator,
    m: int,
    *,
    n_types: int,
    max_depth: int,
    max_len: int,
    min_brackets: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``m`` strings of the process; returns all rows and a mask of the accepted ones."""
    tokens = np.zeros((m, max_len), dtype=np.uint8)
    tokens[:, 0] = START
    stack = np.zeros((m, max_depth + 1), dtype=np.uint8)  # stack[row, d] = type opened at depth d
    depth = np.zeros(m, dtype=np.int64)
    accepted = np.zeros(m, dtype=bool)
    live = np.arange(m)
    for t in range(1, max_len):
        if live.size == 0:
            break
        d = depth[live]
        # One draw per row: values < k mean "END or close" (probability 1/2), k + i opens type i.
        draw = rng.integers(0, 2 * n_types, size=live.size, dtype=np.int64)
        stop = (d == 0) & (draw < n_types)
        close = (d > 0) & ((d >= max_depth) | (draw < n_types))
        opens = ~(stop | close)

        rows = live[stop]
        tokens[rows, t] = END
        accepted[rows] = t - 1 >= min_brackets

        rows, dc = live[close], d[close]
        tokens[rows, t] = FIRST_OPENER + n_types + stack[rows, dc]
        depth[rows] = dc - 1

        rows, do, typ = live[opens], d[opens] + 1, (draw[opens] - n_types).astype(np.uint8)
        stack[rows, do] = typ
        tokens[rows, t] = FIRST_OPENER + typ
        depth[rows] = do

        # Rows that ended stop; so do rows that can no longer close and END within max_len
        # (they would be rejected anyway, so cutting them early changes no accepted string).
        remaining = max_len - 1 - t
        live = live[~stop & (depth[live] + 1 <= remaining)]
    lengths = np.where(accepted, (tokens != 0).sum(axis=1), 0).astype(np.int64)
    return tokens[accepted], lengths[accepted]


def sample(
    rng: np.random.Generator,
    n: int,
    *,
    n_types: int,
    max_depth: int,
    max_len: int,
    min_brackets: int,
) -> Sampled:
    """Draw ``n`` accepted strings in sampling order.

    Args:
        rng: the only source of randomness.
        n: strings to return.
        n_types: bracket types ``k``.
        max_depth: maximum stack depth ``m``.
        max_len: longest accepted string in tokens, START and END included.
        min_brackets: shortest accepted string in brackets.

    Returns:
        :class:`Sampled` with exactly ``n`` rows of width ``max_len``.
    """
    parts_t: list[np.ndarray] = []
    parts_l: list[np.ndarray] = []
    have = drawn = 0
    rate = 0.3  # first guess at the acceptance rate; later rounds use the measured one
    while have < n:
        m = int((n - have) / max(rate, 1e-3) * 1.1) + 64
        tok, lens = _simulate(
            rng, m, n_types=n_types, max_depth=max_depth, max_len=max_len, min_brackets=min_brackets
        )
        drawn += m
        have += tok.shape[0]
        rate = max(have / drawn, 1e-3)
        parts_t.append(tok)
        parts_l.append(lens)
    tokens = np.concatenate(parts_t)[:n]
    lengths = np.concatenate(parts_l)[:n]
    return Sampled(tokens, lengths, drawn, have)
