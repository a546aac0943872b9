"""Dyck-(20,10): bracket strings with 20 types and nesting depth at most 10 (Friedman et al., Task 1).

Vocabulary: ``PAD=0``, ``START=1``, ``END=2``, openers ``(a`` .. ``(t`` (ids 3..22) and closers ``a)``
.. ``t)`` (ids 23..42); ``START`` is the beginning-of-sequence token and rows are right-padded.

Sampling (:mod:`illusions.tasks.dyck_sampler`): the process of Hewitt et al. (2020) as used by Murty
et al. (2023); strings with fewer than ``min_brackets`` brackets or more than ``max_len`` tokens
(START and END included) are re-drawn.

Structure (:mod:`illusions.tasks.dyck_structure`): a string's top-level segments run from an empty
stack back to an empty stack; a segment's structure is its depth sequence (depth after each bracket,
types ignored).

Splits (:mod:`illusions.tasks.dyck_splits`), ``n_train`` training strings and ``n_eval`` strings in
every other split, none of which is a training string:
    * ``train``: strings as sampled (duplicates kept: short strings repeat).
    * ``iid``: fresh samples whose exact string is not in ``train``. Excluding training strings removes
      mostly short ones, so ``iid`` is longer on average than ``train``.
    * ``seen_struct``: fresh samples not in ``train`` whose every segment structure occurs in ``train``
      (short by construction: long strings almost always hold a new segment).
    * ``unseen_struct_short`` / ``unseen_struct_long``: fresh samples with at least one segment
      structure absent from ``train``, with at most / more than ``short_max_brackets`` brackets.
    * ``unseen_depth``: samples of the same process with the depth limit raised to ``ood_depth_max``,
      kept when their maximum depth lies in ``[ood_depth_min, ood_depth_max]``, within ``max_len``.
Evaluation splits are rejection samples (drawn from the sampler, kept when they meet the definition),
so within a split strings follow the training distribution conditioned on the definition; splits may
share strings with each other. Every split has its own generator spawned from ``seed``.

Scoring: each closer at distance at least ``min_distance`` from its opener (1 scores every closer);
the query position is the token before the closer. See :func:`score` for the meta columns.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from illusions.config import Config
from illusions.errors import IllusionsError
from illusions.io import cache_root
from illusions.tasks.base import DataOption, DataSupport, PositionGroup, Scored, Split, Vocab
from illusions.tasks.dyck_splits import SPLIT_NAMES, Progress, TrainIndex, build_splits, cache_key
from illusions.tasks.dyck_structure import (
    END,
    FIRST_OPENER,
    PAD,
    START,
    depth_after,
    depth_sequence,
    segment_keys,
    segments,
    string_keys,
)
from illusions.tasks.dyck_structure import score as _score

__all__ = [
    "SPLIT_NAMES",
    "DyckConfig",
    "DyckTask",
    "depth_after",
    "depth_sequence",
    "score",
    "segment_keys",
    "segments",
    "string_keys",
]


@dataclasses.dataclass(frozen=True)
class DyckConfig(Config):
    """Settings of the Dyck task; the data and its cache are a function of these alone.

    Attributes:
        n_types: bracket types ``k`` (at most 26, one letter each).
        max_depth: maximum nesting depth ``m`` of training strings.
        max_len: longest string in tokens, START and END included.
        min_brackets: shorter strings are re-drawn.
        n_train: training strings.
        n_eval: strings in each evaluation split.
        short_max_brackets: the boundary between ``unseen_struct_short`` and ``_long``.
        ood_depth_min, ood_depth_max: depth range of ``unseen_depth``.
        min_distance: score closers at least this far from their opener (1 scores every closer).
        seed: root of every split's generator.
    """

    n_types: int = 20
    max_depth: int = 10
    max_len: int = 128
    min_brackets: int = 4
    n_train: int = 200_000
    n_eval: int = 2000
    short_max_brackets: int = 32
    ood_depth_min: int = 11
    ood_depth_max: int = 15
    min_distance: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise IllusionsError(f"invalid DyckConfig: {message}")

        need(1 <= self.n_types <= 26, f"n_types must be in 1..26, got {self.n_types}")
        need(self.max_depth >= 1, f"max_depth must be at least 1, got {self.max_depth}")
        need(self.min_brackets >= 0, f"min_brackets must be at least 0, got {self.min_brackets}")
        need(
            self.min_brackets + 2 <= self.max_len <= 4096,
            f"max_len must be in min_brackets + 2 ({self.min_brackets + 2})..4096, got {self.max_len}",
        )
        need(self.n_train >= 1, f"n_train must be at least 1, got {self.n_train}")
        need(self.n_eval >= 1, f"n_eval must be at least 1, got {self.n_eval}")
        need(
            self.min_brackets <= self.short_max_brackets < self.max_len - 2,
            f"short_max_brackets must be in min_brackets..max_len - 3 ({self.min_brackets}.."
            f"{self.max_len - 3}), got {self.short_max_brackets}",
        )
        need(
            self.max_depth < self.ood_depth_min <= self.ood_depth_max,
            f"need max_depth < ood_depth_min <= ood_depth_max, got {self.max_depth}, "
            f"{self.ood_depth_min}, {self.ood_depth_max}",
        )
        need(
            2 * self.ood_depth_min + 2 <= self.max_len,
            f"a string of depth ood_depth_min={self.ood_depth_min} does not fit in max_len={self.max_len}",
        )
        need(self.min_distance >= 1, f"min_distance must be at least 1, got {self.min_distance}")
        need(self.seed >= 0, f"seed must be non-negative, got {self.seed}")


def score(
    tokens: np.ndarray, lengths: np.ndarray, *, min_distance: int, n_types: int = 20
) -> Scored:
    """The closers to score in any padded array of Dyck strings (see :func:`.dyck_structure.score`).

    Args:
        tokens: ``[batch, pos]`` rows ``START brackets END PAD...``.
        lengths: ``[batch]`` non-PAD tokens per row.
        min_distance: keep closers at least this far from their opener; 1 keeps every closer.
        n_types: bracket types of the vocabulary.

    Returns:
        :class:`Scored` with query positions and meta ``distance``, ``depth``, ``key_depth``
        (equal to ``depth`` by definition), ``key_pos``, ``length``, ``max_depth``.
    """
    return _score(tokens, lengths, min_distance=min_distance, n_types=n_types)


def make_vocab(n_types: int) -> Vocab:
    """``PAD START END``, openers ``(a``.., closers ``a)``..; START is the beginning token."""
    letters = string.ascii_lowercase[:n_types]
    tokens = ("PAD", "START", "END", *(f"({c}" for c in letters), *(f"{c})" for c in letters))
    return Vocab(tokens=tokens, pad_id=PAD, bos_id=START)


_LEX = re.compile(r"START|END|PAD|\(([a-z])|([a-z])\)")


class DyckTask(DataSupport):
    """The Dyck task: vocabulary, parser, splits (cached on disk) and scoring.

    Args:
        config: the task settings.
        cache_dir: where generated splits are cached; ``cache_root() / "dyck"`` by default.
    """

    name: ClassVar[str] = "dyck"
    Config: ClassVar[type[DyckConfig]] = DyckConfig
    data_options: ClassVar[tuple[DataOption, ...]] = (
        DataOption("check", str, 'Validate one string, e.g. "(a (b b) a)": exit 0 if valid, 2 with the reason.',
                   config_field=False),
        DataOption("min_distance", int, "Score closers at least this far from their opener (1: every closer)."),
    )
    length_unit: ClassVar[str] = "brackets"
    takes_cache_dir: ClassVar[bool] = True

    def __init__(self, config: DyckConfig = DyckConfig(), *, cache_dir: Path | None = None) -> None:
        if not isinstance(config, DyckConfig):
            raise IllusionsError(f"DyckTask needs a DyckConfig, got {type(config).__name__}")
        self.config = config
        self.vocab = make_vocab(config.n_types)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "dyck"
        self._splits: dict[str, Split] | None = None
        self._stats: dict[str, Any] | None = None
        self._index: TrainIndex | None = None

    # -- vocabulary -------------------------------------------------------------------------------

    @property
    def candidates(self) -> np.ndarray:
        """The closer ids, over which predictions at scored positions are taken."""
        k = self.config.n_types
        return np.arange(FIRST_OPENER + k, FIRST_OPENER + 2 * k, dtype=np.int64)

    def _lex(self, text: str) -> Iterator[tuple[int, int]]:
        """``(token id, 1-based character)`` for each token of ``text``; unknown tokens raise."""
        k = self.config.n_types
        pos = 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                return
            m = _LEX.match(text, pos)
            letter = m and (m.group(1) or m.group(2))
            if m is None or (letter and ord(letter) - ord("a") >= k):
                bad = (m.group(0) if m else re.match(r"\S+", text[pos:]).group(0))[:12]
                last = string.ascii_lowercase[k - 1]
                raise IllusionsError(
                    f"unknown token {bad!r} at character {pos + 1}; expected (a..({last}, a)..{last}), "
                    "START or END"
                )
            yield self.vocab.index[m.group(0)], pos + 1
            pos = m.end()

    def encode(self, text: str) -> np.ndarray:
        """Token ids of whitespace-separated (or run-together) readable tokens, nothing added."""
        return np.array([tok for tok, _ in self._lex(text)], dtype=np.int64)

    def decode(self, ids: np.ndarray) -> str:
        """Readable tokens joined by spaces, PAD dropped."""
        return " ".join(self.vocab.tokens[int(i)] for i in np.asarray(ids).ravel() if int(i) != PAD)

    def _depth_limit(self, for_splits: bool) -> tuple[int, str]:
        """The deepest a string :meth:`parse` accepts may go, and how a "too deep" message names it."""
        cfg = self.config
        if for_splits:
            return cfg.ood_depth_max, (f"ood_depth_max={cfg.ood_depth_max}, the deepest a split holds "
                                       f"(unseen_depth: depths {cfg.ood_depth_min}..{cfg.ood_depth_max})")
        return cfg.max_depth, f"max_depth={cfg.max_depth}"

    def parse(self, text: str, *, for_splits: bool = False) -> np.ndarray:
        """Validate a user-written string and return its ids with START and END added.

        ``START`` and ``END`` may be written (first and last) or left out. Positions in messages are
        token indices with START at 0 (the first bracket is token 1) and 1-based characters.

        Args:
            text: the string.
            for_splits: accept what some split can hold rather than what training strings can:
                depths up to ``ood_depth_max`` (``unseen_depth``), and refuse strings with fewer
                than ``min_brackets`` brackets, which no split holds (the sampler re-draws them).

        Raises:
            IllusionsError: naming the first problem in reading order and where it is: an unknown
                token, a closer with nothing open (unbalanced), a closer of the wrong type
                (mismatched), depth beyond ``max_depth`` (too deep; ``ood_depth_max`` with
                ``for_splits``), more than ``max_len`` tokens (too long), brackets left open at the
                end (unbalanced), or (``for_splits``) too few brackets (too short).
        """
        cfg = self.config
        depth_limit, limit = self._depth_limit(for_splits)
        out = [START]
        stack: list[tuple[int, int, int]] = []  # (opener id, token index, character)
        ended = False
        for n, (tok, char) in enumerate(self._lex(text)):
            where = f"token {len(out)} (character {char})"
            if ended:
                raise IllusionsError(
                    f"{self.vocab.tokens[tok]!r} at character {char} comes after END"
                )
            if tok == START:
                if n:
                    raise IllusionsError(
                        f"START may only begin the string, found at character {char}"
                    )
                continue
            if tok == END:
                ended = True
                continue
            if tok == PAD:
                raise IllusionsError(f"PAD is not part of a string, found at character {char}")
            if len(out) >= cfg.max_len - 1:
                raise IllusionsError(
                    f"too long: {where} is past max_len={cfg.max_len} "
                    f"(at most {cfg.max_len - 2} brackets between START and END)"
                )
            if tok < FIRST_OPENER + cfg.n_types:
                if len(stack) >= depth_limit:
                    raise IllusionsError(
                        f"too deep: {self.vocab.tokens[tok]!r} at {where} reaches depth {len(stack) + 1}, "
                        f"beyond {limit}"
                    )
                stack.append((tok, len(out), char))
            else:
                if not stack:
                    raise IllusionsError(
                        f"unbalanced: {self.vocab.tokens[tok]!r} at {where} has no open bracket to close"
                    )
                opener, at, _ = stack.pop()
                if tok - cfg.n_types != opener:
                    raise IllusionsError(
                        f"mismatched: {self.vocab.tokens[tok]!r} at {where} closes "
                        f"{self.vocab.tokens[opener]!r} opened at token {at}"
                    )
            out.append(tok)
        if stack:
            opener, at, char = stack[-1]
            raise IllusionsError(
                f"unbalanced: {self.vocab.tokens[opener]!r} at token {at} (character {char}) is never "
                f"closed ({len(stack)} bracket(s) left open)"
            )
        out.append(END)
        if for_splits and len(out) - 2 < cfg.min_brackets:
            raise IllusionsError(
                f"too short: {len(out) - 2} bracket(s), but every split's strings have at least "
                f"min_brackets={cfg.min_brackets} (the sampler re-draws shorter ones), so no split holds it"
            )
        return np.array(out, dtype=np.int64)

    # -- structure --------------------------------------------------------------------------------

    def depths(self, ids: np.ndarray) -> np.ndarray:
        """Depth after each token of one string's ids, or of each row of ``[rows, pos]`` ids
        (START/END/PAD keep the depth before them)."""
        return depth_after(np.asarray(ids), self.config.n_types).astype(np.int64)

    def structure(self, ids: np.ndarray) -> list[tuple[int, ...]]:
        """The segment structures of one string (START/END/PAD ignored)."""
        ids = np.asarray(ids)
        k = self.config.n_types
        brackets = ids[(ids >= FIRST_OPENER) & (ids < FIRST_OPENER + 2 * k)]
        return segments(depth_sequence(brackets, k))

    def score(
        self, tokens: np.ndarray, lengths: np.ndarray, *, min_distance: int | None = None
    ) -> Scored:
        """:func:`score` with this task's bracket types; ``min_distance`` defaults to the config's."""
        md = self.config.min_distance if min_distance is None else min_distance
        return score(tokens, lengths, min_distance=md, n_types=self.config.n_types)

    # -- splits -----------------------------------------------------------------------------------

    @property
    def cache_path(self) -> Path:
        """The ``.npz`` file holding this config's splits."""
        return self.cache_dir / f"dyck-{cache_key(self.config)}.npz"

    def is_cached(self) -> bool:
        return self._splits is not None or self.cache_path.exists()

    def splits(self, progress: Progress | None = None) -> dict[str, Split]:
        """All splits, keyed in the order of :data:`SPLIT_NAMES`, built once and cached on disk.

        Args:
            progress: optional callback given a short message before each generation stage.
        """
        if self._splits is None:
            self._splits, self._stats = build_splits(self.config, self.cache_path, progress)
        return self._splits

    def position_groups(self) -> dict[str, PositionGroup]:
        """Two groups of the ``unseen_depth`` closers, by the depth of their opener (the bracket the
        answer depends on). Most of that split's scored closers have openers within the training depth
        (only the strings' deepest stretch is new), so the whole split mostly measures in-range depths.

        ``opener > max_depth``: the opener sits deeper than any training string reaches.
        ``key_depth >= max_depth``: also the openers at the training maximum itself, which training
        strings can only close at once (nothing can open above them), so a scored closer (distance
        ``>= min_distance``) of such an opener is new too: every closer whose position is out of the
        training distribution by its key depth."""
        deepest = self.config.max_depth

        def deeper(key_depth: np.ndarray) -> np.ndarray:
            return key_depth > deepest

        def at_least(key_depth: np.ndarray) -> np.ndarray:
            return key_depth >= deepest

        return {
            f"opener > {deepest}": PositionGroup(
                "unseen_depth", "key_depth", deeper,
                f"unseen_depth closers whose opener is deeper than max_depth={deepest}, the training depth"),
            f"key_depth >= {deepest}": PositionGroup(
                "unseen_depth", "key_depth", at_least,
                f"unseen_depth closers whose opener is at or beyond max_depth={deepest}: at the training "
                f"maximum, training strings close at once, so these far closers are new as well"),
        }

    def sampling_stats(self) -> dict[str, Any]:
        """Per split: candidate strings drawn, how many were kept, and the acceptance rate."""
        self.splits()
        assert self._stats is not None
        return self._stats

    def split_stats(self, split: Split) -> dict[str, Any]:
        """Summary of one split: size, length in brackets, string maximum depth, scored positions."""
        brackets = split.lengths - 2
        depth = (
            depth_after(split.tokens, self.config.n_types).max(axis=1)
            if len(split)
            else np.zeros(1)
        )
        return {
            "n": len(split),
            "length_mean": float(brackets.mean()) if len(split) else 0.0,
            "length_median": float(np.median(brackets)) if len(split) else 0.0,
            "length_max": int(brackets.max()) if len(split) else 0,
            "depth_mean": float(depth.mean()),
            "depth_max": int(depth.max()),
            "scored": len(split.scored),
        }

    def classify(self, ids: np.ndarray) -> str:
        """Which split's definition a valid string (ids with START/END) meets, relative to ``train``.

        Returns:
            ``"unseen_depth"`` when its depth lies beyond ``max_depth`` (up to ``ood_depth_max``),
            else ``"train"`` when it is a training string, else ``"seen_struct"`` or
            ``"unseen_struct_short"`` / ``"unseen_struct_long"``; ``iid`` holds any non-training
            string of the distribution, so it is not a separate answer.
        """
        depth = int(self.depths(ids).max(initial=0))
        if self.config.ood_depth_min <= depth <= self.config.ood_depth_max:
            return "unseen_depth"
        if depth > self.config.max_depth:
            raise IllusionsError(f"depth {depth} lies between max_depth={self.config.max_depth} and "
                                 f"ood_depth_min={self.config.ood_depth_min}: no split holds it")
        if self._index is None:
            self._index = TrainIndex(self.splits()["train"].tokens.astype(np.uint8), self.config)
        row = np.asarray(ids, dtype=np.uint8)[None, :]
        if self._index.in_train(row)[0]:
            return "train"
        if self._index.unseen_segments(row)[0] == 0:
            return "seen_struct"
        short = row.shape[1] - 2 <= self.config.short_max_brackets
        return "unseen_struct_short" if short else "unseen_struct_long"

    def check(self, text: str, progress: Progress | None = None) -> dict[str, Any]:
        """``illusions data dyck --check``: parse one string (errors name its first problem, before
        any generation), then its brackets, depth, segments, scored closers and split membership.

        The string is checked against what some split can hold (depths up to ``ood_depth_max``, at
        least ``min_brackets`` brackets), not only against training strings."""
        ids = self.parse(text, for_splits=True)
        scored = self.score(ids[None, :], np.array([ids.shape[0]]))
        self.splits(progress=progress)  # membership is relative to the (cached) training set
        return {
            "valid": True,
            "tokens": int(ids.shape[0]),
            "brackets": int(ids.shape[0]) - 2,
            "max_depth": int(self.depths(ids).max()),
            "segments": [list(s) for s in self.structure(ids)],
            "scored": len(scored),
            "split": self.classify(ids),
        }

    def check_summary(self, result: dict[str, Any]) -> str:
        md = self.config.min_distance
        return (
            f"valid: {result['brackets']} brackets, max depth {result['max_depth']}, "
            f"{len(result['segments'])} segment(s), {result['scored']} closer(s) at distance >= {md}; "
            f"relative to the training set it belongs to: {result['split']}"
        )

    def scored_note(self) -> str:
        return f"closers at distance >= {self.config.min_distance} from their opener"

    def meta(self) -> dict[str, Any]:
        """JSON data saved beside a model trained on this task."""
        return {
            "task": self.name,
            "config": self.config.to_dict(),
            "vocab": list(self.vocab.tokens),
        }
