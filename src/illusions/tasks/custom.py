"""Data you bring: a directory of JSONL splits, checked against the model they are analysed on.

``DIR`` holds one file per split: ``train.jsonl`` (the proxy is fitted on it) and any other
``NAME.jsonl``, evaluated as split ``NAME``; ``iid.jsonl``, when present, is the reference split that
gaps are measured against. Each non-blank line is one sequence, a JSON object with

    "tokens": [int, ...]    the token ids, or
    "text": "..."           a string encoded with the model folder's tokenizer (as the tokenizer
                            encodes it, with whatever special tokens it adds); scored by default at
                            every position but the last and but the special tokens the tokenizer puts
                            in front (its BOS is never scored); a text longer than ``window`` tokens
                            (default: the model's context) is cut into windows (:func:`text_windows`:
                            the BOS repeated in each, ``stride`` text tokens apart, each text token
                            predicted at most once) when the line gives no score, target or meta;
    "score": [int, ...]     optional: the query positions to score (default: every position but the
                            last); the model's output at position p predicts the token at p + 1;
    "target": [int, ...]    optional: the expected next token at each scored position (default: the
                            sequence's own next token; with a target the last position may be scored);
    "meta": {"name": [...]} optional: one integer or string per scored position, for ``--by name``
                            breakdowns (every line of a split gives the same names).

Everything is read and checked when the task is made, before any model weight is loaded: a split
file that is not a readable regular file (a directory, FIFO, dangling symlink, symlink loop), a line
that is not JSON or gives a key twice (:func:`illusions.tasks.jsonl.read_objects`), a token id
outside the vocabulary, a ``tokens`` sequence longer than the model's context, a window longer than
the context or a stride that would skip tokens, a long text line with score / target / meta, a score
position out of range, a
meta integer beyond 64 bits, ``score`` / ``target`` / ``meta`` of different lengths, text without a
tokenizer and an empty split are each one :class:`IllusionsError` naming the file and line.

The argmax of a prediction ranges over the whole vocabulary, or over the token ids listed one per
line in ``candidates`` (a file). Meta columns holding strings (or true/false) are coded as groups
named by their values; integer columns with few values (at most :data:`MAX_DISCRETE`) or negative
ones are broken down value by value, other integer columns in round bins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from illusions.config import Config, check_regular
from illusions.errors import IllusionsError
from illusions.tasks.base import DataSupport, Scored, Split, Vocab
from illusions.tasks.jsonl import read_objects

FIT_SPLIT = "train"
REFERENCE_SPLIT = "iid"
SUFFIX = ".jsonl"
MAX_DISCRETE = 16
# Integer meta values are stored as int64.
INT64 = (-(2**63), 2**63 - 1)
# Meta names the analysis uses itself: the overall group, and the sequence length behind the
# length-matched gaps and ``--by length``.
RESERVED_META = ("all", "length", "seq_len")
_KEYS = ("tokens", "text", "score", "target", "meta")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_META_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class CustomConfig(Config):
    """Where the data is.

    Attributes:
        data: the directory of JSONL splits.
        candidates: a file of token ids, one per line, the prediction argmax ranges over (empty: the
            whole vocabulary).
        window: a ``text`` line that encodes to more tokens than this is cut into windows
            (:func:`text_windows`); 0: the model's context.
        stride: text tokens between the starts of two windows of a line; 0: a window's text tokens
            (windows side by side, no overlap).
    """

    data: str = ""
    candidates: str = ""
    window: int = 0
    stride: int = 0


@dataclasses.dataclass
class _Column:
    """One meta column of one split while reading: its values and whether they are strings."""

    values: list[Any]
    strings: bool | None = None


@dataclasses.dataclass
class _RawSplit:
    name: str
    path: Path
    seqs: list[list[int]]
    seq: list[int]
    pos: list[int]
    target: list[int]
    meta: dict[str, _Column]


class CustomTask(DataSupport):
    """Splits read from ``config.data`` and checked against a model's vocabulary and context.

    The analysis builds it from a model folder (:func:`illusions.model_folders.folder_tokens` gives the
    tokenizer and readable tokens); every file is read and checked here, in the constructor.

    Args:
        config: the data directory and candidates file.
        d_vocab: the model's vocabulary size.
        n_ctx: the model's context length.
        encode: text -> token ids (the model folder's tokenizer); None refuses text lines.
        vocab_tokens: readable form of each token id, ``d_vocab`` of them (default ``<id>``).
        pad_id: the id rows are right-padded with (never scored, never attended to by scored queries).
        bos_id: the tokenizer's beginning-of-sequence id (recorded; sequences are used as given).
        model_name: how errors name the model.
        encode_parts: text -> ``(prefix, text_ids, suffix)``, the special tokens the tokenizer adds
            before and after the text's own ids (:class:`illusions.model_folders.FolderTokens`);
            None: ``encode``'s ids are all the text's own.
    """

    name: ClassVar[str] = "custom"
    Config = CustomConfig

    def __init__(
        self,
        config: CustomConfig,
        *,
        d_vocab: int | None = None,
        n_ctx: int | None = None,
        encode: Callable[[str], Sequence[int]] | None = None,
        vocab_tokens: Sequence[str] | None = None,
        pad_id: int = 0,
        bos_id: int = 0,
        model_name: str = "the model",
        encode_parts: Callable[[str], tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
    ) -> None:
        if not config.data:
            raise IllusionsError("task 'custom' needs data: a directory of JSONL splits (train.jsonl and one "
                                 "NAME.jsonl per split to evaluate)")
        if d_vocab is None or n_ctx is None:
            raise IllusionsError("task 'custom' reads your splits against a model; run it with "
                                 "`illusions analyze custom --data DIR --model PATH`")
        for what, value in (("vocabulary size", d_vocab), ("context length", n_ctx)):
            if int(value) < 1:
                raise IllusionsError(f"{model_name} gives a {what} of {value}; it must be at least 1 (check its "
                                     "config.json)")
        self.config = config
        self.d_vocab = int(d_vocab)
        self.n_ctx = int(n_ctx)
        self._encode = encode
        self._encode_parts = encode_parts
        self._model = model_name
        for what, value in (("window", config.window), ("stride", config.stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise IllusionsError(f"{what} must be a whole number of tokens (0: the default), got {value!r}")
        if config.window > self.n_ctx:
            raise IllusionsError(f"window {config.window} is longer than the context of {model_name} "
                                 f"({self.n_ctx} tokens)")
        if config.window == 1:
            raise IllusionsError("window must be at least 2 (a window of one token predicts nothing)")
        self.window = config.window or self.n_ctx
        self._cut = {"lines": 0, "windows": 0}
        tokens = list(vocab_tokens) if vocab_tokens is not None else [f"<{i}>" for i in range(self.d_vocab)]
        self.vocab = Vocab(tuple(unique_tokens(tokens, self.d_vocab)), pad_id=pad_id, bos_id=bos_id)
        self._candidates = read_candidates(Path(config.candidates), self.d_vocab) if config.candidates else None
        raw = [self._read(path) for path in split_files(Path(config.data))]
        self._splits, self._columns = _assemble(raw, pad_id)
        self._fingerprint = _fingerprint(
            [r.path for r in raw] + ([Path(config.candidates)] if config.candidates else []))

    @property
    def candidates(self) -> np.ndarray | None:
        return self._candidates

    @property
    def meta_columns(self) -> tuple[str, ...]:
        """The meta names found in the data, for breakdowns."""
        return tuple(self._columns)

    def splits(self, progress: Any = None) -> dict[str, Split]:
        return dict(self._splits)

    def meta(self) -> dict[str, Any]:
        """Where the data came from (with a fingerprint of its files), its splits and meta columns."""
        discrete = [name for name, c in self._columns.items() if c["discrete"]]
        return {
            "task": self.name,
            "config": {"data": str(Path(self.config.data).resolve()),
                       "candidates": str(Path(self.config.candidates).resolve()) if self.config.candidates else ""},
            "fingerprint": self._fingerprint,
            "splits": {name: {"sequences": len(s), "scored_positions": len(s.scored),
                              "tokens": int(s.lengths.sum())} for name, s in self._splits.items()},
            "reference_split": REFERENCE_SPLIT if REFERENCE_SPLIT in self._splits else "",
            "n_candidates": None if self._candidates is None else int(self._candidates.shape[0]),
            "meta_columns": list(self._columns),
            **({"text_windows": {"window": self.window, "stride": self.config.stride, "lines_cut": self._cut["lines"],
                                 "windows": self._cut["windows"]}} if self._cut["lines"] else {}),
            "discrete": discrete,
            "group_names": {name: c["names"] for name, c in self._columns.items() if c["names"] is not None},
        }

    # --- reading ------------------------------------------------------------------------------------

    def _read(self, path: Path) -> _RawSplit:
        name = path.name[: -len(SUFFIX)]
        raw = _RawSplit(name, path, [], [], [], [], {})
        names: tuple[str, ...] | None = None
        expected = "; expected {\"tokens\": [...]} or {\"text\": ...}"
        for where, obj in read_objects(path, what="split file", expected=expected):
            unknown = sorted(set(obj) - set(_KEYS))
            if unknown:
                raise IllusionsError(f"{where} has unknown key(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
            meta = obj.get("meta", {})
            if not isinstance(meta, dict):
                raise IllusionsError(f"{where}: meta must be an object of lists, one value per scored position")
            if names is None:
                names = tuple(sorted(meta))
                for key in names:
                    _check_meta_name(key, where)
                    raw.meta[key] = _Column([])
            elif tuple(sorted(meta)) != names:
                raise IllusionsError(f"{where}: meta names {sorted(meta)} differ from the first line's {list(names)} "
                                     f"(every line of {path.name} gives the same names)")
            for tokens, window_score in self._pieces(obj, where):
                if window_score is None:
                    score, target = self._scored(obj, tokens, where)
                else:  # a text line's window, or a text line scored by default: its own next tokens
                    score, target = window_score, [tokens[p + 1] for p in window_score]
                for key in names:
                    _add_meta(raw.meta[key], key, meta[key], len(score), where)
                row = len(raw.seqs)
                raw.seqs.append(tokens)
                raw.seq.extend([row] * len(score))
                raw.pos.extend(score)
                raw.target.extend(target)
        if not raw.seqs:
            raise IllusionsError(f"{path} holds no sequence (an empty split)")
        if name != FIT_SPLIT and not raw.pos:
            raise IllusionsError(f"{path} has no scored position (an empty split): its sequences are one token "
                                 "long or their score lists are empty")
        return raw

    def _pieces(self, obj: dict[str, Any], where: str) -> list[tuple[list[int], list[int] | None]]:
        """The sequences one line gives, each with its scored positions (None: as the line's
        ``score`` / ``target`` say). A ``text`` line scored by default never scores the special tokens
        the tokenizer puts in front (its BOS); one longer than :attr:`window` is cut by
        :func:`text_windows`."""
        if "text" not in obj or "tokens" in obj or not isinstance(obj["text"], str) or self._encode is None:
            return [(self._tokens(obj, where), None)]
        if self._encode_parts is not None:
            prefix, body, suffix = (list(map(int, part)) for part in self._encode_parts(obj["text"]))
        else:
            prefix, body, suffix = [], [int(t) for t in self._encode(obj["text"])], []
        tokens = self._check_ids(prefix + body + suffix, where, limit=False)
        given = [key for key in ("score", "target") if key in obj]
        if len(tokens) <= self.window:
            return [(tokens, None if given else list(range(len(prefix), len(tokens) - 1)))]
        given += ["meta"] if obj.get("meta") else []
        if given:
            raise IllusionsError(f"{where}: the text encodes to {len(tokens)} tokens, more than the window of "
                                 f"{self.window}, and cannot be cut into windows because it gives "
                                 f"{' and '.join(given)} (positions of the whole text); shorten it or drop them")
        room = self.window - len(prefix)
        if room < 2:
            raise IllusionsError(f"window {self.window} leaves no room for text after the {len(prefix)} special "
                                 f"token(s) the tokenizer of {self._model} puts in front; give a longer window")
        stride = self.config.stride or room
        if stride > room:
            raise IllusionsError(f"stride {stride} is longer than a window's {room} text tokens (window {self.window}"
                                 f"{f' less {len(prefix)} special token(s) in front' if prefix else ''}): windows "
                                 f"would skip tokens of {where}; give a stride of 1..{room}")
        windows = text_windows(prefix, body + suffix, room, stride)
        self._cut["lines"] += 1
        self._cut["windows"] += len(windows)
        return windows

    def _tokens(self, obj: dict[str, Any], where: str) -> list[int]:
        if ("tokens" in obj) == ("text" in obj):
            raise IllusionsError(f"{where} needs exactly one of \"tokens\" (token ids) or \"text\"")
        if "text" in obj:
            text = obj["text"]
            if not isinstance(text, str):
                raise IllusionsError(f"{where}: text must be a string")
            if self._encode is None:
                raise IllusionsError(f"{where} has text but {self._model} has no tokenizer; give token ids as "
                                     "\"tokens\" instead")
            tokens = [int(t) for t in self._encode(text)]
            if not tokens:
                raise IllusionsError(f"{where}: the text encodes to no token")
        else:
            tokens = _int_list(obj["tokens"], "tokens", where)
            if not tokens:
                raise IllusionsError(f"{where}: tokens is empty")
        return self._check_ids(tokens, where)

    def _check_ids(self, tokens: list[int], where: str, *, limit: bool = True) -> list[int]:
        """``tokens``, refused when empty, outside the vocabulary or (``limit``) longer than the context."""
        if not tokens:
            raise IllusionsError(f"{where}: the text encodes to no token")
        bad = next((t for t in tokens if not 0 <= t < self.d_vocab), None)
        if bad is not None:
            raise IllusionsError(f"{where}: token id {_show(bad)} is outside the vocabulary of {self._model} "
                                 f"(0..{self.d_vocab - 1})")
        if limit and len(tokens) > self.n_ctx:
            raise IllusionsError(f"{where}: the sequence has {len(tokens)} tokens, more than the context of "
                                 f"{self._model} ({self.n_ctx} tokens)")
        return tokens

    def _scored(self, obj: dict[str, Any], tokens: list[int], where: str) -> tuple[list[int], list[int]]:
        n = len(tokens)
        has_target = "target" in obj
        if "score" in obj:
            score = _int_list(obj["score"], "score", where)
            last = n - 1 if has_target else n - 2
            bad = next((p for p in score if not 0 <= p <= last), None)
            if bad is not None:
                why = "" if has_target else " (the last position has no next token to predict unless target gives one)"
                raise IllusionsError(f"{where}: score position {_show(bad)} is out of range 0..{last} for a sequence of "
                                     f"{n} tokens{why}")
            if len(set(score)) != len(score):
                raise IllusionsError(f"{where}: score lists a position twice")
        else:
            score = list(range(n - 1))
        if has_target:
            target = _int_list(obj["target"], "target", where)
            if len(target) != len(score):
                raise IllusionsError(f"{where}: target has {len(target)} entries but {len(score)} positions are "
                                     "scored (score and target must have the same length)")
            bad = next((t for t in target if not 0 <= t < self.d_vocab), None)
            if bad is not None:
                raise IllusionsError(f"{where}: target token id {_show(bad)} is outside the vocabulary of {self._model} "
                                     f"(0..{self.d_vocab - 1})")
        else:
            target = [tokens[p + 1] for p in score]
        return score, target


def text_windows(prefix: Sequence[int], text: Sequence[int], room: int,
                 stride: int) -> list[tuple[list[int], list[int]]]:
    """The windows of one long text line: ``(tokens, scored positions)`` each.

    The rule: window ``k`` holds ``prefix`` (the special tokens the tokenizer puts in front, its BOS;
    repeated in every window, as the tokenizer's ``add_special_tokens`` would put it before any text
    it encodes) and then ``text[k * stride : k * stride + room]``, ``room`` being the window less
    the prefix; windows start every ``stride`` text tokens (``1 <= stride <= room``) until one
    reaches the end of the text (the tokenizer's EOS, when it adds one, is the last text token). A
    query position is scored when the token it predicts is in the window's text and was not
    predicted by an earlier window, so every text token after the first is predicted at most once,
    with the longest context the windows give; the prefix (BOS) position is never scored. With
    ``stride == room`` (no overlap) the first text token of each window has no context in its window
    and is not predicted. A window that would score nothing is left out. Deterministic.
    """
    b = len(prefix)
    out: list[tuple[list[int], list[int]]] = []
    predicted = 1  # text tokens before this index are predicted already (the first one never is)
    start = 0
    while True:
        piece = list(text[start: start + room])
        # Window position b + i predicts text[start + i + 1].
        score = [b + i for i in range(len(piece) - 1) if start + i + 1 >= predicted]
        if score:
            out.append(([*prefix, *piece], score))
        predicted = max(predicted, start + len(piece))
        if start + len(piece) >= len(text):
            return out
        start += stride


def split_files(data: Path) -> list[Path]:
    """The split files of a data directory: ``train.jsonl`` first, then ``iid.jsonl``, then the rest."""
    if not data.is_dir():
        raise IllusionsError(f"data directory {data} does not exist or is not a directory")
    files = sorted(p for p in data.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))
    for p in files:  # a directory, FIFO or broken link named like a split is refused, not skipped
        check_regular(p, what="split file")
    names = [p.name[: -len(SUFFIX)] for p in files]
    if FIT_SPLIT not in names:
        raise IllusionsError(f"data directory {data} has no {FIT_SPLIT}{SUFFIX} (the split the proxy is fitted on)")
    for p, name in zip(files, names, strict=True):
        if not _SPLIT_NAME.match(name):
            raise IllusionsError(f"{p}: a split name may hold letters, digits, '_', '.' and '-' only")
    if len(files) == 1:
        raise IllusionsError(f"data directory {data} holds only {FIT_SPLIT}{SUFFIX}; add a NAME{SUFFIX} file for "
                             "each split to evaluate")
    order = {FIT_SPLIT: 0, REFERENCE_SPLIT: 1}
    return sorted(files, key=lambda p: (order.get(p.name[: -len(SUFFIX)], 2), p.name))


def read_candidates(path: Path, d_vocab: int) -> np.ndarray:
    """The token ids of a candidates file (one per line; blank lines skipped), checked and in order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise IllusionsError(f"candidates file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IllusionsError(f"cannot read candidates file {path} ({exc})") from None
    ids: list[int] = []
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise IllusionsError(f"{path}:{lineno}: {text!r} is not a token id (one integer per line)") from None
        if not 0 <= value < d_vocab:
            raise IllusionsError(f"{path}:{lineno}: token id {value} is outside the vocabulary (0..{d_vocab - 1})")
        if value in ids:
            raise IllusionsError(f"{path}:{lineno}: token id {value} is listed twice")
        ids.append(value)
    if not ids:
        raise IllusionsError(f"candidates file {path} holds no token id")
    return np.array(ids, dtype=np.int64)


def unique_tokens(tokens: Sequence[str], d_vocab: int) -> list[str]:
    """``d_vocab`` readable token strings, made unique (a repeat gets its id appended)."""
    out: list[str] = []
    seen: set[str] = set()
    for i in range(d_vocab):
        t = str(tokens[i]) if i < len(tokens) and tokens[i] is not None else f"<{i}>"
        if t in seen:
            t = f"{t}<{i}>"
        seen.add(t)
        out.append(t)
    return out


def _show(value: int) -> str:
    """An integer for a message: in full up to 24 digits, else its first digits and its length."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text.lstrip('-'))} digits)"


def _int_list(value: Any, key: str, where: str) -> list[int]:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise IllusionsError(f"{where}: {key} must be a list of integers")
    return value


def _check_meta_name(key: str, where: str) -> None:
    if not _META_NAME.match(key):
        raise IllusionsError(f"{where}: meta name {key!r} must be an identifier (letters, digits, '_')")
    if key in RESERVED_META:
        raise IllusionsError(f"{where}: meta name {key!r} is reserved (the sequence length is recorded for you; "
                             "break down by it with --by length)")


def _add_meta(column: _Column, key: str, values: Any, n: int, where: str) -> None:
    if not isinstance(values, list) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, list) else "no list"
        raise IllusionsError(f"{where}: meta {key!r} has {got} but {n} positions are scored (score, target and "
                             "meta must have the same length)")
    for v in values:
        if isinstance(v, bool):
            v = "true" if v else "false"
        if isinstance(v, str):
            is_string = True
        elif isinstance(v, int):
            is_string = False
            if not INT64[0] <= v <= INT64[1]:
                raise IllusionsError(f"{where}: meta {key!r} value {_show(v)} is out of range (meta integers are 64-bit: "
                                     "-2**63..2**63-1)")
        else:
            raise IllusionsError(f"{where}: meta {key!r} values must be integers or strings, got {v!r}")
        if column.strings is None:
            column.strings = is_string
        elif column.strings != is_string:
            raise IllusionsError(f"{where}: meta {key!r} mixes integers and strings")
        column.values.append(v)


def _assemble(raw: list[_RawSplit], pad_id: int) -> tuple[dict[str, Split], dict[str, dict[str, Any]]]:
    """Padded splits, with every meta column coded the same way in every split."""
    columns: dict[str, dict[str, Any]] = {}
    for r in raw:
        for key, col in r.meta.items():
            if col.strings is None:  # no scored position: no value to decide the kind from
                continue
            info = columns.setdefault(key, {"strings": col.strings, "values": set(), "where": r.path})
            if info["strings"] != col.strings:
                raise IllusionsError(f"meta {key!r} holds strings in {info['where'] if info['strings'] else r.path} "
                                     f"but integers in {r.path if info['strings'] else info['where']}")
            info["values"].update(col.values)
    coded: dict[str, dict[str, Any]] = {}
    for key, info in columns.items():
        values = sorted(info["values"])
        if info["strings"]:
            coded[key] = {"names": values, "discrete": True, "index": {v: i for i, v in enumerate(values)}}
        else:
            few = len(values) <= MAX_DISCRETE or values[0] < 0
            coded[key] = {"names": None, "discrete": few, "index": None}
    splits: dict[str, Split] = {}
    for r in raw:
        lengths = np.array([len(s) for s in r.seqs], dtype=np.int64)
        tokens = np.full((len(r.seqs), int(lengths.max())), pad_id, dtype=np.int64)  # [batch, pos]
        for i, s in enumerate(r.seqs):
            tokens[i, : len(s)] = s
        meta: dict[str, np.ndarray] = {}
        for key, col in r.meta.items():
            if key not in coded:
                continue
            index = coded[key]["index"]
            values = [index[v] for v in col.values] if index is not None else col.values
            meta[key] = np.array(values, dtype=np.int64).reshape(-1)
        scored = Scored(seq=np.array(r.seq, dtype=np.int64), pos=np.array(r.pos, dtype=np.int64),
                        target=np.array(r.target, dtype=np.int64), meta=meta)
        role = {FIT_SPLIT: " (the proxy is fitted on it)", REFERENCE_SPLIT: " (the reference for gaps)"}
        description = f"{r.path.name}: {len(r.seqs)} sequences you supplied{role.get(r.name, '')}"
        splits[r.name] = Split(r.name, tokens, lengths, scored, description)
    return splits, {k: {"names": v["names"], "discrete": v["discrete"]} for k, v in coded.items()}


def _fingerprint(paths: Sequence[Path]) -> str:
    """SHA-256 over the files' names and bytes: a rebuilt report can tell that the data changed."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return digest.hexdigest()
