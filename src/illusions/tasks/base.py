"""What every task provides: a vocabulary, named splits of padded token arrays, and scored positions.

Tasks are numpy-only (no torch import), so data commands stay fast.

Conventions shared by all tasks:
    * sequences start with a beginning token (``vocab.bos_id``) and are padded on the **right** with
      ``vocab.pad_id`` (learned absolute positions would shift otherwise);
    * ``logits[b, p]`` predicts ``tokens[b, p + 1]``; a scored position is the *query* position ``p``
      whose prediction is checked against the true next token;
    * the prediction at a scored position is the argmax over ``task.candidates`` (e.g. the 20 closing
      brackets for Dyck), or over the whole vocabulary when ``candidates`` is None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A fixed token vocabulary: ``tokens[i]`` is the readable form of id ``i``."""

    tokens: tuple[str, ...]
    pad_id: int
    bos_id: int

    def __post_init__(self) -> None:
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


@dataclasses.dataclass(frozen=True)
class Scored:
    """The positions of one split that a metric looks at, one entry per scored prediction.

    Attributes:
        seq: ``[n]`` row of the split's token array.
        pos: ``[n]`` query position; the model's output there predicts ``tokens[seq, pos + 1]``.
        target: ``[n]`` the true next token id.
        meta: per-position columns (each ``[n]``), e.g. ``distance``, ``depth``, ``key_depth``,
            ``key_pos`` (position of the token the answer depends on, for attention metrics),
            ``length``; used for breakdowns.
    """

    seq: np.ndarray
    pos: np.ndarray
    target: np.ndarray
    meta: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    def subset(self, keep: np.ndarray) -> Scored:
        """The entries where boolean ``keep`` is true (or at integer indices ``keep``)."""
        return Scored(
            seq=self.seq[keep],
            pos=self.pos[keep],
            target=self.target[keep],
            meta={k: v[keep] for k, v in self.meta.items()},
        )


@dataclasses.dataclass(frozen=True)
class Split:
    """One named split: padded tokens, true lengths and scored positions.

    Attributes:
        name: split name, e.g. ``iid`` or ``unseen_depth``.
        tokens: ``[batch, pos]`` int64, right-padded with the pad id.
        lengths: ``[batch]`` number of non-PAD tokens of each row.
        scored: positions to score under the task's default filter.
        description: one sentence saying how the split is defined.
    """

    name: str
    tokens: np.ndarray
    lengths: np.ndarray
    scored: Scored
    description: str = ""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, index: np.ndarray | Sequence[int]) -> Split:
        """A split holding only the given rows (scored positions renumbered to match)."""
        index = np.asarray(index, dtype=np.int64)
        remap = np.full(len(self), -1, dtype=np.int64)
        remap[index] = np.arange(index.shape[0])
        keep = remap[self.scored.seq] >= 0
        sc = self.scored.subset(keep)
        sc = dataclasses.replace(sc, seq=remap[sc.seq])
        width = int(self.lengths[index].max()) if index.size else self.tokens.shape[1]
        return Split(self.name, self.tokens[index, :width], self.lengths[index], sc, self.description)


@dataclasses.dataclass(frozen=True)
class PositionGroup:
    """A named subset of one split's scored positions, reported beside the whole split.

    Summaries give the group every metric of a split (estimates, intervals, gaps to ``iid``) in rows
    with ``group_by == "position_group"`` and ``group`` its name; tables show it as
    ``split (name)``.

    Attributes:
        split: the split whose scored positions it selects from.
        column: the meta column (of :attr:`Scored.meta`) the predicate reads.
        predicate: ``[n]`` column values -> ``[n]`` bool, True for positions in the group.
        description: one sentence saying what the group holds and why it matters.
    """

    split: str
    column: str
    predicate: Callable[[np.ndarray], np.ndarray]
    description: str = ""

    def mask(self, meta: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The group's positions among ``meta``'s (None when the column is missing)."""
        if self.column not in meta:
            return None
        return np.asarray(self.predicate(np.asarray(meta[self.column])), dtype=bool)


def id_problem(
    name: str, ranges: Mapping[str, tuple[int, int]], *, n_rows: int, width: int, vocab_size: int
) -> str | None:
    """The first way a split's arrays fall outside what a split of ``n_rows`` x ``width`` tokens of a
    ``vocab_size``-token vocabulary can hold, or None.

    Args:
        name: the split's name, for the message.
        ranges: ``(min, max)`` of the split's non-empty arrays under the field names ``tokens``,
            ``lengths``, ``seq``, ``pos`` and ``target`` (others are ignored).
        n_rows, width: the shape of the token array.
        vocab_size: token ids must lie in ``0..vocab_size - 1``.
    """
    limits = {"tokens": (0, vocab_size - 1), "target": (0, vocab_size - 1), "lengths": (1, width),
              "seq": (0, n_rows - 1), "pos": (0, width - 2)}
    for field, (lo, hi) in limits.items():
        if field in ranges:
            a, b = ranges[field]
            if a < lo or b > hi:
                what = "token ids" if field in ("tokens", "target") else "values"
                return f"{name} {field} holds {what} {a}..{b}, outside {lo}..{hi}"
    return None


@runtime_checkable
class Task(Protocol):
    """A task: vocabulary, splits and scoring.

    Implementations are constructed from their frozen config (``Task(config)``) and register a name
    in :mod:`illusions.registry`.
    """

    name: ClassVar[str]
    vocab: Vocab
    config: Any

    @property
    def candidates(self) -> np.ndarray | None:
        """Token ids the prediction argmax ranges over at scored positions (None = all)."""
        ...

    def splits(self, progress: Any = None) -> dict[str, Split]:
        """All splits, including ``train``, built once (and cached on disk where the task caches).

        ``progress``, when given, is called with a short message before each generation stage."""
        ...

    def meta(self) -> dict[str, Any]:
        """JSON data saved beside a model trained on this task (name, config, vocabulary)."""
        ...


@dataclasses.dataclass(frozen=True)
class DataOption:
    """One option a task adds to ``illusions data TASK`` (shown in the task's own help panel, refused
    with one line for every other task).

    Attributes:
        name: the parameter's name; its flag is ``--name`` with ``_`` written ``-`` (``min_distance``:
            ``--min-distance``).
        type: ``int`` or ``str``; the option takes one value and is unset (None) by default.
        help: the help line.
        config_field: the value replaces the task config's field of the same name; False for an
            action the command carries out instead of listing the splits (``check``:
            :meth:`DataSupport.check` on the value).
    """

    name: str
    type: type
    help: str
    config_field: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


class DataSupport:
    """What ``illusions data`` may ask of a task, with defaults that mean "not offered".

    A task subclasses this (beside satisfying :class:`Task`) and overrides what it can do: declare its
    own ``data`` options, cache its splits on disk, describe a split with its own statistics, report
    sampling acceptance, show the depth under every token of a row, or check one string typed by the
    user. The command calls these methods and never probes a task with ``hasattr`` or names a task.
    """

    #: Options of ``illusions data`` that only this task takes (its help panel: "<Name> options").
    data_options: ClassVar[tuple[DataOption, ...]] = ()
    #: What a split's length counts, for the ``data`` table's caption ("len: length in <unit>").
    length_unit: ClassVar[str] = "tokens"

    #: Whether the constructor takes ``cache_dir`` (the folder its splits are cached in); ``data --cache-dir``
    #: is refused for a task that does not.
    takes_cache_dir: ClassVar[bool] = False
    #: Where the splits are cached (None: not cached on disk).
    cache_path: Any = None

    def is_cached(self) -> bool:
        """Whether the splits can be loaded without generating them."""
        return False

    def split_stats(self, split: Split) -> dict[str, Any]:
        """Statistics of one split for the ``data`` table: n, length mean/median/max, scored count."""
        lengths = split.lengths.astype(float)
        return {
            "n": len(split),
            "length_mean": float(lengths.mean()) if len(split) else 0.0,
            "length_median": float(np.median(lengths)) if len(split) else 0.0,
            "length_max": int(lengths.max()) if len(split) else 0,
            "scored": len(split.scored),
        }

    def position_groups(self) -> dict[str, PositionGroup]:
        """Named subsets of a split's scored positions to report beside the whole split, by name
        (e.g. Dyck's unseen-depth closers whose opener is deeper than the training depth). None by
        default."""
        return {}

    def sampling_stats(self) -> dict[str, Any]:
        """Per split, ``{"acceptance": share of sampled candidates kept}`` where splits are sampled."""
        return {}

    def depths(self, ids: np.ndarray) -> np.ndarray | None:
        """The nesting depth after every token of one row (``[pos]``) or of several (``[rows, pos]``,
        as :func:`illusions.training.training_rows` asks), or None where the task has no depth."""
        return None

    def decode(self, ids: np.ndarray) -> str:
        """A readable form of one row of token ids."""
        return " ".join(self.vocab.tokens[int(t)] for t in ids)  # type: ignore[attr-defined]

    def scored_note(self) -> str | None:
        """What the ``data`` table's "scored" column counts, for its caption (None: nothing to add)."""
        return None

    def check_summary(self, result: dict[str, Any]) -> str:
        """The line ``illusions data TASK --check`` prints for a valid string (``result`` from :meth:`check`)."""
        return f"valid: {result['tokens']} tokens"

    def check(self, text: str, progress: Any = None) -> dict[str, Any]:
        """Validate one string: ``{"valid": True, "tokens": n, ...}``; raises IllusionsError saying
        what is wrong. Tasks without a parser refuse."""
        from illusions.errors import IllusionsError

        raise IllusionsError(f"task {self.name!r} cannot check strings (it has no parser)")  # type: ignore[attr-defined]
