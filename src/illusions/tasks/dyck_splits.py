"""Building the Dyck splits relative to the training set, and caching them on disk without pickle.

Every split draws from its own child of ``np.random.SeedSequence(seed)`` (spawned in the order of
:data:`SPLIT_NAMES`), so the splits are independent and each is reproducible from the seed alone.
Evaluation splits are rejection samples from the training distribution: fresh strings are drawn
from the same sampler and kept when they meet the split's definition; the acceptance rates are
recorded beside the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from illusions.errors import IllusionsError
from illusions.io import ChecksumError, load_npz_verified, save_npz_mappable
from illusions.tasks.base import Scored, Split, id_problem
from illusions.tasks.dyck_sampler import sample
from illusions.tasks.dyck_structure import (
    META_COLUMNS,
    depth_after,
    score,
    segment_keys,
    string_keys,
)

if TYPE_CHECKING:
    from illusions.tasks.dyck import DyckConfig

log = logging.getLogger(__name__)

SPLIT_NAMES = (
    "train",
    "iid",
    "seen_struct",
    "unseen_struct_short",
    "unseen_struct_long",
    "unseen_depth",
)

DESCRIPTIONS = {
    "train": "strings sampled from the Dyck process as drawn (duplicates kept)",
    "iid": "fresh samples from the training distribution whose exact string is not in train",
    "seen_struct": "fresh samples not in train whose every top-level segment structure occurs in train",
    "unseen_struct_short": "fresh samples with a segment structure absent from train, at most "
    "short_max_brackets brackets",
    "unseen_struct_long": "fresh samples with a segment structure absent from train, more than "
    "short_max_brackets brackets",
    "unseen_depth": "samples of the same process with the depth limit raised to ood_depth_max, kept "
    "when their maximum depth is in [ood_depth_min, ood_depth_max]",
}

# Bump when the sampler, the split definitions or the file layout change: old caches are ignored.
# Format 3 stores the int64 arrays a Split holds, mapped from the file on load (format 2 held
# compact dtypes whose conversion to int64 was most of a cached load); format 4 adds the sha256 of
# every array, checked on load.
CACHE_FORMAT = 4

Progress = Callable[[str], None]


def cache_key(config: DyckConfig) -> str:
    """A short hash of the config (and the cache format) naming the cache file."""
    blob = json.dumps({"format": CACHE_FORMAT, **config.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TrainIndex:
    """Exact membership tests against a training set: whole strings and segment structures."""

    def __init__(self, tokens: np.ndarray, config: DyckConfig) -> None:
        self.config = config
        self.width = config.max_len
        self.strings = set(string_keys(tokens, self.width).tolist())
        self.segments = set(segment_keys(tokens, config.n_types, self.width)[0].tolist())

    def in_train(self, tokens: np.ndarray) -> np.ndarray:
        """``[batch]`` whether each row is exactly a training string."""
        keys = string_keys(tokens, self.width).tolist()
        return np.fromiter((k in self.strings for k in keys), dtype=bool, count=len(keys))

    def unseen_segments(self, tokens: np.ndarray) -> np.ndarray:
        """``[batch]`` how many of each row's segments have a structure absent from train."""
        keys, row = segment_keys(tokens, self.config.n_types, self.width)
        seen = np.fromiter((k in self.segments for k in keys.tolist()), dtype=bool, count=len(keys))
        return np.bincount(row[~seen], minlength=tokens.shape[0])


def _accept_rule(
    name: str, config: DyckConfig, index: TrainIndex
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def rule(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if name == "iid":
            return ~index.in_train(tokens)
        unseen = index.unseen_segments(tokens)
        if name == "seen_struct":
            return (unseen == 0) & ~index.in_train(tokens)
        short = lengths - 2 <= config.short_max_brackets
        return (unseen > 0) & (short if name == "unseen_struct_short" else ~short)

    return rule


# Candidate rounds double from FIRST_ROUND up to MAX_ROUND strings; the schedule does not depend on how
# many strings are wanted, so a larger n_eval extends a split without changing its first rows.
FIRST_ROUND = 1024
MAX_ROUND = 262_144
# Give up (with a clear error) after this many candidates: the config makes the split (nearly) empty.
MAX_CANDIDATES = 4_000_000


def _rejection(
    rng: np.random.Generator,
    want: int,
    accept: Callable[[np.ndarray, np.ndarray], np.ndarray],
    sampler_kwargs: dict[str, int],
    name: str,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Sample from the process in rounds until ``want`` strings pass ``accept``, in draw order."""
    toks: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    kept = candidates = 0
    m = FIRST_ROUND
    while kept < want:
        if candidates >= MAX_CANDIDATES:
            raise IllusionsError(
                f"split {name} found only {kept} of {want} strings in {candidates:,} samples; "
                "the config leaves it (nearly) empty"
            )
        batch = sample(rng, m, **sampler_kwargs)
        keep = accept(batch.tokens, batch.lengths)
        candidates += m
        kept += int(keep.sum())
        toks.append(batch.tokens[keep])
        lens.append(batch.lengths[keep])
        m = min(2 * m, MAX_ROUND)
    stats = {"candidates": candidates, "kept": kept, "acceptance": kept / candidates}
    return np.concatenate(toks)[:want], np.concatenate(lens)[:want], stats


def build(
    config: DyckConfig, progress: Progress | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """Sample the training set and every evaluation split.

    Args:
        config: the task config.
        progress: called with a short message before each stage (for a CLI status line).

    Returns:
        ``(data, stats)``: ``data[name] = (tokens uint8 [n, pos], lengths int64 [n])`` for each name of
        :data:`SPLIT_NAMES`, and per-split sampling statistics (candidates drawn, acceptance rate).
    """
    say = progress or (lambda _msg: None)
    rngs = [
        np.random.default_rng(c)
        for c in np.random.SeedSequence(config.seed).spawn(len(SPLIT_NAMES))
    ]
    kw = {
        "n_types": config.n_types,
        "max_depth": config.max_depth,
        "max_len": config.max_len,
        "min_brackets": config.min_brackets,
    }
    say(f"sampling {config.n_train:,} training strings")
    train = sample(rngs[0], config.n_train, **kw)
    data = {"train": (train.tokens, train.lengths)}
    stats: dict[str, Any] = {
        "train": {
            "candidates": config.n_train,
            "kept": config.n_train,
            "acceptance": 1.0,
            "sampler_acceptance": train.accepted / train.drawn,
        },
    }
    say("indexing training strings and segment structures")
    index = TrainIndex(train.tokens, config)
    for name, rng in zip(SPLIT_NAMES[1:5], rngs[1:5], strict=True):
        say(f"sampling {name}")
        tokens, lengths, st = _rejection(
            rng, config.n_eval, _accept_rule(name, config, index), kw, name
        )
        data[name] = (tokens, lengths)
        stats[name] = st
    say("sampling unseen_depth")
    deep_kw = {**kw, "max_depth": config.ood_depth_max}

    def deep_enough(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return depth_after(tokens, config.n_types).max(axis=1) >= config.ood_depth_min

    tokens, lengths, st = _rejection(rngs[5], config.n_eval, deep_enough, deep_kw, "unseen_depth")
    data["unseen_depth"] = (tokens, lengths)
    stats["unseen_depth"] = st
    # Trim each split to its longest row.
    data = {k: (t[:, : int(ln.max()) if ln.size else 2], ln) for k, (t, ln) in data.items()}
    return data, stats


def _to_split(
    name: str, tokens: np.ndarray, lengths: np.ndarray, scored: Scored, config: DyckConfig
) -> Split:
    """A :class:`Split` of int64 arrays (no copy of arrays that are int64 already)."""
    description = DESCRIPTIONS[name].replace("short_max_brackets", str(config.short_max_brackets))
    description = description.replace("ood_depth_min", str(config.ood_depth_min))
    description = description.replace("ood_depth_max", str(config.ood_depth_max))
    scored = Scored(
        seq=np.asarray(scored.seq, dtype=np.int64),
        pos=np.asarray(scored.pos, dtype=np.int64),
        target=np.asarray(scored.target, dtype=np.int64),
        meta={c: np.asarray(v, dtype=np.int64) for c, v in scored.meta.items()},
    )
    return Split(name, np.asarray(tokens, dtype=np.int64), np.asarray(lengths, dtype=np.int64), scored,
                 description)


def save(path: Path, config: DyckConfig, splits: dict[str, Split], stats: dict[str, Any]) -> None:
    """Write all splits to one ``.npz`` (no object arrays), atomically, with a checksum per array.

    Arrays are stored as the int64 a :class:`Split` holds, uncompressed and aligned, so :func:`load`
    maps them instead of reading and converting them: a cached load costs a checksum pass and only
    the rows a run uses are ever mapped in. The price is disk: the 200k-string default training set
    takes about 205 MB as int64 tokens.
    """
    arrays: dict[str, np.ndarray] = {
        "config": np.array(json.dumps(config.to_dict())),
        "stats": np.array(json.dumps(stats)),
    }
    for name, split in splits.items():
        sc = split.scored
        arrays[f"{name}.tokens"] = split.tokens
        arrays[f"{name}.lengths"] = split.lengths
        arrays[f"{name}.seq"] = sc.seq
        arrays[f"{name}.pos"] = sc.pos
        arrays[f"{name}.target"] = sc.target
        for col in META_COLUMNS:
            arrays[f"{name}.meta.{col}"] = sc.meta[col]
    save_npz_mappable(path, arrays)


def load(path: Path, config: DyckConfig) -> tuple[dict[str, Split], dict[str, Any]] | None:
    """Read the splits written by :func:`save`; None when the file is missing, damaged or foreign.

    Every array is checked against its stored sha256 and every token id against the vocabulary
    before anything is used; a damaged file is reported with one warning (the caller rebuilds it).
    """
    if not path.exists():
        return None
    try:
        z, ranges = load_npz_verified(path)
        if json.loads(str(z["config"])) != config.to_dict():
            log.warning("ignoring cache %s: it was written for another config", path)
            return None
        stats = json.loads(str(z["stats"]))
        splits = {}
        vocab_size = 3 + 2 * config.n_types
        for name in SPLIT_NAMES:
            tokens = z[f"{name}.tokens"]
            fields = {f: ranges[f"{name}.{f}"] for f in ("tokens", "lengths", "seq", "pos", "target")
                      if f"{name}.{f}" in ranges}
            problem = id_problem(name, fields, n_rows=tokens.shape[0], width=tokens.shape[1],
                                 vocab_size=vocab_size)
            if problem is not None:
                raise ChecksumError(problem)
            sc = Scored(
                seq=z[f"{name}.seq"],
                pos=z[f"{name}.pos"],
                target=z[f"{name}.target"],
                meta={c: z[f"{name}.meta.{c}"] for c in META_COLUMNS},
            )
            splits[name] = _to_split(name, tokens, z[f"{name}.lengths"], sc, config)
    except ChecksumError as exc:
        log.warning("the cached Dyck splits in %s are damaged (%s); rebuilding them", path, exc)
        return None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        log.warning("the cached Dyck splits in %s are unreadable (%s); rebuilding them", path, exc)
        return None
    return splits, stats


def build_splits(
    config: DyckConfig, path: Path, progress: Progress | None = None
) -> tuple[dict[str, Split], dict[str, Any]]:
    """The splits from the cache at ``path``, or built, scored and written there first."""
    cached = load(path, config)
    if cached is not None:
        return cached
    data, stats = build(config, progress)
    if progress:
        progress("scoring closing brackets")
    scored = {
        name: score(tokens, lengths, min_distance=config.min_distance, n_types=config.n_types)
        for name, (tokens, lengths) in data.items()
    }
    splits = {name: _to_split(name, t, ln, scored[name], config) for name, (t, ln) in data.items()}
    del data, scored  # the int64 splits replace them; keeps peak memory at one copy
    if progress:
        progress(f"writing {path}")
    try:
        save(path, config, splits, stats)
    except OSError as exc:
        # The splits are built; only the next run will have to build them again.
        log.warning("could not write the Dyck splits cache %s (%s); continuing without it", path,
                    exc.strerror or exc)
    return splits, stats
