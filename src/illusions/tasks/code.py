"""Character-level code completion with out-of-distribution splits (the paper's Task 2).

A sequence is ``BOS`` followed by the first ``n_ctx - 1`` characters of one function: long functions
are **truncated**, not windowed, so every sequence starts at a signature whose names the body goes on
to repeat (windows from the middle would cut copying targets from their first occurrence). The
tokens are characters; the vocabulary is ``<pad>``, ``<bos>``, ``<unk>`` and the characters seen at
least ``min_char_count`` times in the training split (at most ``max_vocab`` of them, most frequent
first); any other character becomes ``<unk>``. The vocabulary goes into :meth:`CodeTask.meta`, so it is
saved beside every model trained on the task.

Splits (functions are deduplicated on the truncated text the model sees, so no ``train`` sequence
appears in any other split):

* ``train`` / ``iid``: disjoint random samples of the training language's functions (Python) whose
  nesting depth stays below the deep threshold ``D``;
* ``deep_nesting``: functions of the training language whose maximum depth is at least ``D``, hence
  deeper than every training function;
* one split per other language of the corpus (e.g. ``java``, ``javascript``), any depth.

``D`` is ``deep_depth`` when set, else the smallest depth reached by at most a ``deep_fraction`` of the
training language's functions (see :func:`deep_threshold`).

Every position ``p`` of a sequence predicts the character at ``p + 1``; all of them are scored (up to
``max_scored`` per split, a seeded uniform subsample beyond that). Each scored position carries, for
its **target** character: ``category`` (an index into :data:`CATEGORIES`), ``depth`` (see
:func:`label`), ``key_pos`` and ``distance`` (for copying characters: the token position of the same
character in the identifier's previous occurrence, and how far back that is; else -1), ``length``
(the row's number of tokens, BOS included).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from illusions.config import Config
from illusions.errors import IllusionsError
from illusions.io import ChecksumError, cache_root, load_npz_verified, save_npz_mappable
from illusions.tasks.base import DataOption, DataSupport, Scored, Split, Vocab, id_problem
from illusions.tasks.code_corpus import (
    MACHINE,
    Corpus,
    corpus_cache_path,
    describe_corpus,
    load_corpus,
)
from illusions.tasks.code_labels import (
    _CLOSE,
    _IDENT,
    _OPEN,
    _TAB,
    BRACKET,
    CATEGORIES,
    COPY,
    IDENTIFIER,
    KEYWORDS,
    OTHER,
    WHITESPACE,
    Labels,
    _bracket_scan,
    bracket_depths,
    deep_threshold,
    depths,
    label,
)

Progress = Callable[[str], None]
log = logging.getLogger(__name__)

# The character labels live in code_labels; their names stay importable from here.
__all__ = [
    "BOS", "BRACKET", "CACHE_FORMAT", "CATEGORIES", "COPY", "IDENTIFIER", "KEYWORDS", "OTHER", "PAD",
    "SPLIT_ORDER", "UNK", "WHITESPACE", "_CLOSE", "_IDENT", "_OPEN", "_TAB", "CodeConfig", "CodeTask",
    "Labels", "Progress", "_bracket_scan", "_encode_rows", "_load_npz", "_sample", "_save_npz",
    "_split_name", "bracket_depths", "build_splits", "cache_key", "deep_threshold", "depths", "label",
    "make_split", "make_vocab",
]

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
# Format 2 stores the sha256 of every array, checked on load.
CACHE_FORMAT = 2
SPLIT_ORDER = ("train", "iid", "deep_nesting")


@dataclasses.dataclass(frozen=True)
class CodeConfig(Config):
    """Settings of the code-completion task.

    Attributes:
        corpus: ``""`` (default) for the pinned corpus shipped with the package (the same on every
            machine; it keeps the first 255 characters of each function, so ``n_ctx`` <= 256);
            ``"machine"`` for this machine's Python stdlib, JDK ``src.zip`` and npm's JavaScript; else
            a CodeSearchNet JSONL file or folder.
        train_language: language of ``train``, ``iid`` and ``deep_nesting``.
        n_ctx: tokens per sequence including BOS; functions are truncated to ``n_ctx - 1`` characters.
        n_train: functions in ``train`` (at most).
        n_eval: functions per evaluation split (``iid``, ``deep_nesting``, each other language), at
            most; when the training language has too few shallow functions, ``iid`` keeps a fifth.
        min_chars, max_chars: functions outside this length (before truncation) are not used.
        min_char_count, max_vocab: vocabulary = characters seen at least ``min_char_count`` times in
            ``train``, the ``max_vocab`` most frequent at most.
        vocab_chars: if not empty, exactly these characters form the vocabulary (to share one across
            corpora).
        deep_depth: threshold ``D`` of ``deep_nesting`` (0 = automatic from ``deep_fraction``).
        deep_fraction: automatic ``D`` leaves at most this fraction of functions in ``deep_nesting``.
        max_scored: scored positions per split at most (seeded subsample beyond).
        max_functions_per_language: cap on the corpus per language (hash-ordered sample; 0 = none).
        seed: seed of every random choice (split sampling, subsampling).
    """

    corpus: str = ""
    train_language: str = "python"
    n_ctx: int = 256
    n_train: int = 4000
    n_eval: int = 500
    min_chars: int = 40
    max_chars: int = 5000
    min_char_count: int = 20
    max_vocab: int = 120
    vocab_chars: str = ""
    deep_depth: int = 0
    deep_fraction: float = 0.05
    max_scored: int = 20000
    max_functions_per_language: int = 20000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_ctx < 3:
            raise ValueError(f"n_ctx must be at least 3, got {self.n_ctx}")
        for name in ("n_train", "n_eval", "min_chars", "max_scored"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        if self.min_char_count < 1 or self.max_vocab < 1:
            raise ValueError("min_char_count and max_vocab must be at least 1")
        if len(set(self.vocab_chars)) != len(self.vocab_chars):
            raise ValueError("vocab_chars holds a character twice")
        if self.deep_depth < 0 or not 0.0 < self.deep_fraction < 1.0:
            raise ValueError("deep_depth must be >= 0 and deep_fraction strictly between 0 and 1")
        if self.max_functions_per_language < 0:
            raise ValueError("max_functions_per_language must be >= 0")

class CodeTask(DataSupport):
    """Character-level code completion: Python training data, held-out Python, other languages, deep nesting.

    Building is lazy: the corpus is read and the splits made on first use of :attr:`vocab`,
    :meth:`splits` or :meth:`meta`, then cached under ``cache_dir`` (default
    ``illusions.io.cache_root() / "code"``) in one ``.npz`` keyed by the config and the corpus
    fingerprint.
    """

    name: ClassVar[str] = "code"
    Config: ClassVar[type[CodeConfig]] = CodeConfig
    data_options: ClassVar[tuple[DataOption, ...]] = (
        DataOption("corpus", str, "'machine' (this machine's Python stdlib, JDK src.zip, npm) or a CodeSearchNet JSONL "
                   "file or folder (.jsonl / .jsonl.gz); default: the pinned corpus shipped with illusions."),
    )
    takes_cache_dir: ClassVar[bool] = True

    def __init__(self, config: CodeConfig | None = None, *, cache_dir: Path | str | None = None) -> None:
        self.config = config if config is not None else CodeConfig()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "code"
        self._built: tuple[Vocab, dict[str, Split], dict[str, Any]] | None = None

    @classmethod
    def from_meta(
        cls, meta: dict[str, Any], *, cache_dir: Path | str | None = None, strict: bool = True
    ) -> CodeTask:
        """The task a model was trained on, from the ``meta`` saved beside it (:meth:`meta`).

        The vocabulary is pinned to the saved one, so token ids match the model's embedding even where
        the corpus has changed.

        Args:
            meta: the checkpoint's task metadata.
            cache_dir: as for the constructor.
            strict: raise if the corpus here differs from the one the model was trained on.

        Raises:
            IllusionsError: ``meta`` is not from this task, or (strict) the corpus fingerprint differs.
        """
        if meta.get("task") != cls.name or "config" not in meta or "vocab" not in meta:
            raise IllusionsError("model metadata does not describe a code task (no task/config/vocab)")
        saved = list(meta["vocab"])
        if saved[:3] != [PAD, BOS, UNK]:
            raise IllusionsError("model metadata holds a vocabulary that does not start with <pad>, <bos>, <unk>")
        config = CodeConfig.from_dict(dict(meta["config"]), source="the model's metadata")
        if not config.corpus and meta.get("corpus_source") == MACHINE:
            # Saved before the pinned corpus existed, when corpus = "" named the machine corpus.
            config = config.replace(corpus=MACHINE)
        task = cls(config.replace(vocab_chars="".join(saved[3:])), cache_dir=cache_dir)
        want = meta.get("corpus_fingerprint")
        if strict and want and task.corpus().fingerprint != want:
            # The CLI shows this line alone, so it names what to do there (strict=False is API-only).
            if not config.corpus:
                hint = ("the model was trained on another version of the pinned corpus: use the illusions "
                        "release it came with, or train a model with `illusions train`")
            elif config.corpus == MACHINE:
                hint = ("the machine corpus depends on this machine's Python, JDK and Node.js: use the same "
                        "ones, or train a model here with `illusions train`")
            else:
                hint = "use the same corpus, or train a model on this one with `illusions train`"
            raise IllusionsError(
                f"{describe_corpus(config.corpus)} here has fingerprint {task.corpus().fingerprint[:12]}, "
                f"but the model was trained on {want[:12]}, so its splits cannot be rebuilt; {hint}"
            )
        return task

    # ------------------------------------------------------------------ protocol

    @property
    def vocab(self) -> Vocab:
        return self._build()[0]

    @property
    def unk_id(self) -> int:
        return self.vocab.index[UNK]

    @property
    def candidates(self) -> np.ndarray | None:
        return None

    def splits(self, progress: Progress | None = None) -> dict[str, Split]:
        """``train``, ``iid``, ``deep_nesting`` and one split per other language.

        Args:
            progress: optional callback given a short message before each building stage.
        """
        return dict(self._build(progress)[1])

    def meta(self) -> dict[str, Any]:
        """Task name, config, vocabulary, corpus fingerprint and split facts, as JSON data."""
        vocab, _, info = self._build()
        return {
            "task": self.name,
            "config": self.config.to_dict(),
            "vocab": list(vocab.tokens),
            "pad_id": vocab.pad_id,
            "bos_id": vocab.bos_id,
            "unk_id": vocab.index[UNK],
            "categories": list(CATEGORIES),
            **info,
        }

    # ------------------------------------------------------------------ helpers

    def encode(self, text: str) -> np.ndarray:
        """``[BOS] + characters`` of ``text`` as int64 ids (unknown characters -> ``<unk>``)."""
        index, unk = self.vocab.index, self.unk_id
        return np.array([self.vocab.bos_id] + [index.get(c, unk) for c in text], dtype=np.int64)

    def decode(self, ids: np.ndarray) -> str:
        """Characters of ``ids``, without PAD and BOS (``<unk>`` shown as U+FFFD)."""
        toks = self.vocab.tokens
        skip = {self.vocab.pad_id, self.vocab.bos_id}
        return "".join("\ufffd" if toks[i] == UNK else toks[i] for i in np.asarray(ids).tolist() if i not in skip)

    @property
    def cache_path(self) -> Path:
        """The ``.npz`` holding this config's splits (reads the corpus, from its cache if there)."""
        return self.cache_dir / f"splits-{cache_key(self.config, self.corpus().fingerprint)}.npz"

    def is_cached(self) -> bool:
        """Whether both the corpus and the splits are cached, so that nothing has to be built."""
        if self._built is not None:
            return True
        c = self.config
        corpus = corpus_cache_path(c.corpus, self.cache_dir, max_per_language=c.max_functions_per_language)
        return (corpus is None or corpus.is_file()) and self.cache_path.is_file()

    def split_stats(self, split: Split) -> dict[str, Any]:
        """Size, length in characters, maximum depth per function, scored positions and their mix.

        Returns:
            ``n``, ``length_mean``/``_median``/``_max`` (characters, BOS excluded), ``depth_mean`` and
            ``depth_max`` (of each function's maximum depth), ``scored``, ``unk`` (share of ``<unk>``
            characters) and ``share_<category>`` over the scored positions.
        """
        chars = split.lengths - 1
        row_depth = np.array([int(depths(self.decode(r)).max(initial=0)) for r in split.tokens])
        n = len(split)
        body = split.tokens[:, 1:][np.arange(split.tokens.shape[1] - 1) < chars[:, None]]
        stats: dict[str, Any] = {
            "n": n,
            "length_mean": float(chars.mean()) if n else 0.0,
            "length_median": float(np.median(chars)) if n else 0.0,
            "length_max": int(chars.max()) if n else 0,
            "depth_mean": float(row_depth.mean()) if n else 0.0,
            "depth_max": int(row_depth.max()) if n else 0,
            "scored": len(split.scored),
            "unk": float((body == self.unk_id).mean()) if body.size else 0.0,
        }
        counts = np.bincount(split.scored.meta["category"], minlength=len(CATEGORIES))
        total = max(int(counts.sum()), 1)
        stats |= {f"share_{name}": float(k / total) for name, k in zip(CATEGORIES, counts, strict=True)}
        return stats

    def corpus(self) -> Corpus:
        """The corpus this task reads (JSONL and machine corpora are cached after the first read)."""
        c = self.config
        return load_corpus(c.corpus, cache_dir=self.cache_dir, max_per_language=c.max_functions_per_language)

    # ------------------------------------------------------------------ building

    def _build(self, progress: Progress | None = None) -> tuple[Vocab, dict[str, Split], dict[str, Any]]:
        if self._built is not None:
            return self._built
        say = progress or (lambda message: None)
        say(f"reading {describe_corpus(self.config.corpus)}")
        corpus = self.corpus()
        path = self.cache_dir / f"splits-{cache_key(self.config, corpus.fingerprint)}.npz"
        built = _load_npz(path)
        if built is None:
            say(f"building splits from {len(corpus.functions):,} functions")
            built = build_splits(self.config, corpus)
            say("writing the cache")
            _save_npz(path, *built)
        self._built = built
        return built


def cache_key(config: CodeConfig, corpus_fingerprint: str) -> str:
    """Hash of the config and the corpus fingerprint: the name of the cached splits."""
    data = json.dumps([CACHE_FORMAT, config.to_dict(), corpus_fingerprint], sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _sample(rng: np.random.Generator, items: list[str], n: int) -> list[str]:
    if len(items) <= n:
        return list(items)
    idx = np.sort(rng.choice(len(items), size=n, replace=False))
    return [items[i] for i in idx]


def _split_name(language: str) -> str:
    name = re.sub(r"[^a-z0-9_]+", "_", language.lower()).strip("_") or "unknown"
    return f"lang_{name}" if name in SPLIT_ORDER else name


def make_vocab(texts: list[str], *, min_count: int, max_size: int, chars: str = "") -> Vocab:
    """``<pad>, <bos>, <unk>`` + characters (sorted by code point).

    Args:
        texts: training texts to count characters in (unused when ``chars`` is given).
        min_count: characters seen fewer times become ``<unk>``.
        max_size: at most this many characters, the most frequent (ties: lower code point).
        chars: if not empty, exactly these characters.

    Returns:
        The vocabulary; PAD is id 0, BOS id 1, UNK id 2.
    """
    if not chars:
        counts: dict[str, int] = {}
        for t in texts:
            for c in t:
                counts[c] = counts.get(c, 0) + 1
        kept = sorted((c for c, k in counts.items() if k >= min_count), key=lambda c: (-counts[c], c))
        chars = "".join(kept[:max_size])
    return Vocab(tokens=(PAD, BOS, UNK, *sorted(chars)), pad_id=0, bos_id=1)


def _encode_rows(texts: list[str], vocab: Vocab, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    index, unk = vocab.index, vocab.index[UNK]
    lengths = np.array([len(t) + 1 for t in texts], dtype=np.int64)
    width = int(lengths.max()) if texts else 1
    tokens = np.full((len(texts), width), vocab.pad_id, dtype=np.int64)  # [batch, pos]
    for r, t in enumerate(texts):
        tokens[r, 0] = vocab.bos_id
        tokens[r, 1 : len(t) + 1] = [index.get(c, unk) for c in t]
    return tokens, lengths


def make_split(
    name: str, texts: list[str], language: str, vocab: Vocab, config: CodeConfig, rng: np.random.Generator,
    description: str,
) -> Split:
    """Tokens and scored positions (all, or a ``max_scored`` subsample) of one split's texts."""
    tokens, lengths = _encode_rows(texts, vocab, config.n_ctx)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("seq", "pos", "category", "depth", "key_pos")}
    for r, t in enumerate(texts):
        lab = label(t, language)
        # Query p in 0..len(t)-1 predicts text[p] (token p + 1).
        cols["seq"].append(np.full(len(t), r, dtype=np.int64))
        cols["pos"].append(np.arange(len(t), dtype=np.int64))
        cols["category"].append(lab.category)
        cols["depth"].append(lab.depth)
        cols["key_pos"].append(lab.key_pos)
    flat = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for k, v in cols.items()}
    if flat["seq"].shape[0] > config.max_scored:
        keep = np.sort(rng.choice(flat["seq"].shape[0], size=config.max_scored, replace=False))
        flat = {k: v[keep] for k, v in flat.items()}
    seq, pos = flat["seq"], flat["pos"]
    key_pos = flat["key_pos"]
    distance = np.where(key_pos >= 0, pos + 1 - key_pos, -1)
    meta = {
        "category": flat["category"],
        "depth": flat["depth"],
        "key_pos": key_pos,
        "distance": distance,
        "length": lengths[seq],
    }
    scored = Scored(seq=seq, pos=pos, target=tokens[seq, pos + 1], meta=meta)
    return Split(name, tokens, lengths, scored, description)


def build_splits(config: CodeConfig, corpus: Corpus) -> tuple[Vocab, dict[str, Split], dict[str, Any]]:
    """Make the vocabulary, every split, and the facts recorded in :meth:`CodeTask.meta`.

    Args:
        config: task settings.
        corpus: the functions to draw from.

    Returns:
        ``(vocab, splits, info)``; ``info`` holds the corpus fingerprint, the deep threshold and the
        number of functions per split.
    """
    c = config
    where = describe_corpus(c.corpus)
    if corpus.prefix_chars and c.n_ctx - 1 > corpus.prefix_chars:
        raise IllusionsError(
            f"{where} keeps the first {corpus.prefix_chars} characters of each function, so n_ctx can be "
            f"at most {corpus.prefix_chars + 1} with it (got {c.n_ctx}); use the machine corpus or a "
            "JSONL corpus for longer contexts"
        )
    by_lang: dict[str, list[str]] = {}
    seen: set[tuple[str, str]] = set()
    for f in corpus.functions:
        if not c.min_chars <= f.n_chars <= c.max_chars:
            continue
        w = f.text[: c.n_ctx - 1]
        if (f.language, w) in seen:  # same visible prefix: the model could not tell them apart
            continue
        seen.add((f.language, w))
        by_lang.setdefault(f.language, []).append(w)
    pool = by_lang.pop(c.train_language, [])
    if len(pool) < 3:
        raise IllusionsError(
            f"{where} has {len(pool)} usable {c.train_language} functions "
            f"({c.min_chars}..{c.max_chars} characters); at least 3 are needed"
        )
    max_depth = np.array([int(depths(t).max()) for t in pool])
    threshold = c.deep_depth or deep_threshold(max_depth, c.deep_fraction)
    shallow = [t for t, d in zip(pool, max_depth, strict=True) if d < threshold]
    deep = [t for t, d in zip(pool, max_depth, strict=True) if d >= threshold]
    if len(shallow) < 2 or not deep:
        raise IllusionsError(
            f"{where}: deep threshold {threshold} leaves {len(shallow)} {c.train_language} "
            f"functions for train/iid and {len(deep)} for deep_nesting; need at least 2 and 1"
        )
    rng = np.random.default_rng(c.seed)
    order = rng.permutation(len(shallow))
    n_iid = c.n_eval if len(shallow) >= c.n_train + c.n_eval else min(c.n_eval, max(1, len(shallow) // 5))
    iid = [shallow[i] for i in np.sort(order[:n_iid])]
    train = [shallow[i] for i in np.sort(order[n_iid : n_iid + c.n_train])]
    deep = _sample(rng, deep, c.n_eval)
    ood = {lang: _sample(rng, texts, c.n_eval) for lang, texts in sorted(by_lang.items())}

    vocab = make_vocab(train, min_count=c.min_char_count, max_size=c.max_vocab, chars=c.vocab_chars)
    lang = c.train_language
    specs = [
        ("train", train, lang, f"{len(train)} {lang} functions with nesting depth < {threshold}"),
        ("iid", iid, lang, f"{len(iid)} held-out {lang} functions with nesting depth < {threshold}"),
        ("deep_nesting", deep, lang, f"{len(deep)} {lang} functions reaching nesting depth >= {threshold}"),
    ]
    specs += [(_split_name(o), texts, o, f"{len(texts)} {o} functions (any depth)") for o, texts in ood.items()]
    splits: dict[str, Split] = {}
    for k, (name, texts, language, desc) in enumerate(specs):
        # One generator per split, so adding a language leaves the others' subsamples unchanged.
        split_rng = np.random.default_rng([c.seed, k + 1])
        splits[name] = make_split(name, texts, language, vocab, c, split_rng, desc)
    info = {
        "corpus_fingerprint": corpus.fingerprint,
        "corpus_source": corpus.source,
        "corpus_languages": corpus.languages(),
        "deep_depth": int(threshold),
        "split_languages": {name: language for name, _, language, _ in specs},
        "split_functions": {name: len(texts) for name, texts, _, _ in specs},
    }
    return vocab, splits, info


# ---------------------------------------------------------------------- npz cache (no pickle)


def _save_npz(path: Path, vocab: Vocab, splits: dict[str, Split], info: dict[str, Any]) -> None:
    arrays: dict[str, np.ndarray] = {}
    header = {
        "format": CACHE_FORMAT,
        "vocab": list(vocab.tokens),
        "pad_id": vocab.pad_id,
        "bos_id": vocab.bos_id,
        "info": info,
        "splits": [{"name": n, "description": s.description, "meta": sorted(s.scored.meta)} for n, s in splits.items()],
    }
    # JSON as a unicode array: numpy stores it without pickle.
    arrays["header"] = np.array(json.dumps(header))
    for i, s in enumerate(splits.values()):
        arrays[f"{i}.tokens"] = s.tokens
        arrays[f"{i}.lengths"] = s.lengths
        arrays[f"{i}.seq"] = s.scored.seq
        arrays[f"{i}.pos"] = s.scored.pos
        arrays[f"{i}.target"] = s.scored.target
        for k, v in s.scored.meta.items():
            arrays[f"{i}.meta.{k}"] = v
    try:
        save_npz_mappable(path, arrays, compress=True)
    except OSError as exc:
        # The splits are built; only the next run will have to build them again.
        log.warning("could not write the code splits cache %s (%s); continuing without it", path,
                    exc.strerror or exc)


def _load_npz(path: Path) -> tuple[Vocab, dict[str, Split], dict[str, Any]] | None:
    """The cached splits, after checking every array's sha256 and every token id; None to rebuild."""
    if not path.is_file():
        return None
    try:
        z, ranges = load_npz_verified(path)
        header = json.loads(str(z["header"]))
        if header.get("format") != CACHE_FORMAT:
            return None
        vocab = Vocab(tuple(header["vocab"]), header["pad_id"], header["bos_id"])
        splits = {}
        for i, spec in enumerate(header["splits"]):
            tokens = z[f"{i}.tokens"]
            fields = {f: ranges[f"{i}.{f}"] for f in ("tokens", "lengths", "seq", "pos", "target")
                      if f"{i}.{f}" in ranges}
            problem = id_problem(spec["name"], fields, n_rows=tokens.shape[0], width=tokens.shape[1],
                                 vocab_size=len(vocab))
            if problem is not None:
                raise ChecksumError(problem)
            meta = {k: z[f"{i}.meta.{k}"] for k in spec["meta"]}
            scored = Scored(z[f"{i}.seq"], z[f"{i}.pos"], z[f"{i}.target"], meta)
            splits[spec["name"]] = Split(spec["name"], tokens, z[f"{i}.lengths"], scored, spec["description"])
        return vocab, splits, header["info"]
    except ChecksumError as exc:
        log.warning("the cached code splits in %s are damaged (%s); rebuilding them", path, exc)
    except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        log.warning("the cached code splits in %s are unreadable (%s); rebuilding them", path, exc)
    return None
