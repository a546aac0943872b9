from __future__ import annotations

import numpy as np
import torch

from illusions.scoring import accuracy_on_split, gather_scored, iter_batches, restricted_argmax
from illusions.tasks.base import Scored, Split


def _split() -> Split:
    # Four rows of different lengths, right-padded with 0; scored positions spread over rows.
    tokens = np.array([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0], [1, 5, 5, 6, 6, 2], [1, 3, 0, 0, 0, 0]])
    lengths = np.array([4, 3, 6, 2])
    seq = np.array([0, 0, 1, 2, 2, 2])
    pos = np.array([1, 2, 1, 2, 3, 4])
    target = tokens[seq, pos + 1]
    return Split("toy", tokens, lengths, Scored(seq, pos, target, {"tag": np.arange(6)}))


def test_batches_cover_every_scored_position_once_and_map_back():
    split = _split()
    seen = []
    for batch in iter_batches(split, 3):
        assert batch.tokens.shape[1] == split.lengths[batch.rows].max()
        # the local scored entries point at the same tokens as the split's entries they map back to
        np.testing.assert_array_equal(
            batch.tokens[batch.scored.seq, batch.scored.pos + 1], split.scored.target[batch.index]
        )
        np.testing.assert_array_equal(batch.scored.meta["tag"], batch.index)
        seen.extend(batch.index.tolist())
    assert sorted(seen) == list(range(6))


def test_token_budget_cuts_batches_by_rows_times_width():
    split = _split()  # lengths 4, 3, 6, 2: sorted 2, 3, 4, 6
    widths = [(len(b.rows), b.tokens.shape[1]) for b in iter_batches(split, 64, max_tokens=9)]
    # 2 rows of width 3 (6 tokens; a third row of width 4 would make 12), then 4 alone, then 6 alone
    assert widths == [(2, 3), (1, 4), (1, 6)]
    assert all(rows * width <= 9 or rows == 1 for rows, width in widths)
    seen = sorted(i for b in iter_batches(split, 64, max_tokens=9) for i in b.index.tolist())
    assert seen == list(range(6))
    # a budget below one row's width still runs that row, alone
    assert [len(b.rows) for b in iter_batches(split, 64, max_tokens=1)] == [1, 1, 1, 1]
    # no budget: the plain row count
    assert [len(b.rows) for b in iter_batches(split, 3)] == [3, 1]


def test_scored_only_leaves_out_rows_without_scored_positions_and_cuts_after_the_last_one():
    split = _split()  # row 3 has no scored position; the last scored positions: row 0 at 2, 1 at 1, 2 at 4
    batches = list(iter_batches(split, 64, scored_only=True))
    assert [b.rows.tolist() for b in batches] == [[1, 0, 2]]  # by width: 2, 3, 5
    assert batches[0].tokens.shape == (3, 5)  # row 2's length is 6
    np.testing.assert_array_equal(batches[0].tokens, split.tokens[[1, 0, 2], :5])
    np.testing.assert_array_equal(batches[0].scored.target, split.scored.target[batches[0].index])
    widths = [(len(b.rows), b.tokens.shape[1]) for b in iter_batches(split, 64, max_tokens=6, scored_only=True)]
    assert widths == [(2, 3), (1, 5)]
    assert sorted(i for b in iter_batches(split, 2, scored_only=True) for i in b.index.tolist()) == list(range(6))
    # the selection given is kept to (row 3 asked for, but it has nothing to score)
    assert [b.rows.tolist() for b in iter_batches(split, 64, rows=np.array([3, 2]), scored_only=True)] == [[2]]


def test_restricted_argmax_ignores_non_candidates():
    logits = torch.tensor([[0.0, 9.0, 1.0, 2.0], [0.0, 9.0, 3.0, 2.0]])
    assert restricted_argmax(logits, None).tolist() == [1, 1]
    assert restricted_argmax(logits, np.array([2, 3])).tolist() == [3, 2]


def test_gather_and_accuracy_with_an_oracle_model():
    split = _split()

    class Oracle(torch.nn.Module):
        # Puts all mass on the true next token (row-wise lookup of the full token table).
        def forward(self, tokens):
            nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
            return torch.nn.functional.one_hot(nxt, 8).float()

    acc, n = accuracy_on_split(Oracle(), split, None, batch_size=2)
    assert (acc, n) == (1.0, 6)
    logits = Oracle()(torch.as_tensor(split.tokens))
    assert gather_scored(logits, split.scored).argmax(-1).tolist() == split.scored.target.tolist()
    acc, _ = accuracy_on_split(Oracle(), split, np.array([3, 4]), batch_size=2)
    assert acc == 0.0
