"""Models and splits from Python objects: what :func:`illusions.evaluate` accepts, checked up front.

A model is a ``HookedTransformer`` in memory (``HookedTransformer.from_pretrained(...)`` and
SAELens' ``HookedSAETransformer`` included), or a folder / bundled name as ``--model`` takes it.
A split is a :class:`illusions.tasks.Split`, token ids (a ``[batch, pos]`` tensor or array, a
``(tokens, lengths)`` pair, a dict ``{"tokens": ..., "lengths": ...}``, or a list of token lists of
any lengths), or the path of a JSONL file as ``illusions analyze custom`` reads it. Every check runs
before any forward pass: a bad input is one :class:`~illusions.errors.IllusionsError` line.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from illusions.errors import IllusionsError
from illusions.tasks.base import Scored, Split, id_problem

# Score: which positions of a sequence are scored; targets: the expected token at each.
ScoreFn = Callable[[np.ndarray], Any]
TargetFn = Callable[[np.ndarray, np.ndarray], Any]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready for the engine, and how the run records it.

    Attributes:
        model: the hooked model.
        source: what was passed (``in memory``, a folder, ``bundled dyck``).
        folder: its folder when it came from one (the output guards keep runs out of it).
        task_meta: the task an illusions checkpoint was trained on (its ``meta["task"]``), else {}.
    """

    model: Any
    source: str
    folder: Path | None = None
    task_meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def is_hooked_model(model: Any) -> bool:
    """A model the engine can run: TransformerLens' hooked interface (``hook_dict``,
    ``run_with_hooks``, ``run_with_cache``, ``cfg``). ``HookedTransformer`` and its subclasses have
    it; a TransformerLens 4 ``TransformerBridge`` is accepted through the same check (the engine then
    runs every proxy from the tokens where the model cannot start part-way)."""
    return all(hasattr(model, name) for name in ("hook_dict", "run_with_hooks", "run_with_cache", "cfg"))


def as_model(model: Any, *, device: Any = None) -> LoadedModel:
    """The model to evaluate: a hooked model in memory as it is, or a folder / bundled name loaded.

    Args:
        model: a ``HookedTransformer`` (or subclass) in memory; a folder (an illusions checkpoint
            or a Hugging Face folder of a supported architecture); a bundled name (``dyck``,
            ``dyck:seed1``, see ``illusions list``).
        device: where a loaded model goes (default ``cpu``); a model in memory stays where it is.
    """
    if isinstance(model, str | os.PathLike):
        from illusions.bundled import resolve_model
        from illusions.model_folders import ILLUSIONS, inspect_model_folder, load_model_folder

        path, name = resolve_model(str(model))
        folder = inspect_model_folder(path, device=device or "cpu")
        loaded = load_model_folder(folder, device=device or "cpu")
        task_meta = dict(folder.meta.get("task") or {}) if folder.kind == ILLUSIONS else {}
        return LoadedModel(loaded, f"bundled {name}" if name else str(path), path, task_meta)
    if is_hooked_model(model):
        if device is not None:
            raise IllusionsError("device= moves a model that is loaded from a folder; move a model in memory "
                                 "yourself (model.to(device))")
        return LoadedModel(model, f"{type(model).__name__} in memory")
    raise IllusionsError(f"model must be a HookedTransformer (or another hooked model), a model folder or a "
                         f"bundled model's name, got {type(model).__name__}")


def token_names(model: Any, vocab: Sequence[str] | None = None) -> Sequence[str]:
    """Readable token strings for ids ``0..d_vocab-1``: ``vocab`` when given, else the model's
    tokenizer, else the ids themselves."""
    if vocab is not None:
        return list(vocab)
    return _TokenNames(getattr(model, "tokenizer", None), int(model.cfg.d_vocab))


class _TokenNames(Sequence[str]):
    """Token strings looked up when needed (a 50k-token vocabulary is not listed up front)."""

    def __init__(self, tokenizer: Any, size: int) -> None:
        self._tokenizer = tokenizer
        self._size = size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._size))]
        i = int(i)
        if self._tokenizer is not None:
            try:
                return str(self._tokenizer.convert_ids_to_tokens(i))
            except Exception:  # noqa: BLE001 - a tokenizer without this id: show the id
                pass
        return str(i)


def as_splits(
    splits: Mapping[str, Any],
    model: Any,
    *,
    score: ScoreFn | Mapping[str, Any] | None = None,
    targets: TargetFn | Mapping[str, Any] | None = None,
    pad: int | None = None,
    fit: Any = None,
) -> tuple[dict[str, Split], dict[str, Any]]:
    """Named :class:`Split` objects checked against ``model``, and what a task would say of them.

    Args:
        splits: split name -> data (see the module docstring).
        model: the hooked model (its ``d_vocab`` and ``n_ctx`` bound the ids and lengths).
        score: which positions to score: a function of one sequence's tokens (without padding)
            returning positions or a boolean mask, or a dict split -> such a function or one list of
            positions per sequence. Default: every position but the last (each predicts the next
            token).
        targets: the expected token at each scored position: a function ``(tokens, positions) ->
            ids``, or a dict split -> such a function or one list of ids per sequence. Default: the
            next token (then the last position cannot be scored).
        pad: the id right-padding a token array (rows end at their last non-``pad`` token);
            default: rows are full length unless lengths are given.
        fit: data the simplifiers are fitted on, in any form a split takes, or the name of one of
            ``splits`` (which is then fitted on and not evaluated). None: the split ``train`` if
            there is one.

    Returns:
        ``(splits, info)``: the splits (the fitting data under ``info["fit_split"]``) and
        ``{"fit_split", "eval_splits", "meta_columns", "discrete", "group_names"}``.
    """
    if not isinstance(splits, Mapping) or not splits:
        raise IllusionsError("splits must be a dict of split name -> data with at least one split")
    d_vocab, n_ctx = int(model.cfg.d_vocab), int(model.cfg.n_ctx)
    _check_split_keys(splits, score, targets)
    jsonl = {str(k): v for k, v in splits.items() if _is_jsonl(v)}
    read = _read_jsonl(jsonl, d_vocab, n_ctx, model) if jsonl else ({}, {})
    out: dict[str, Split] = {}
    for key, value in splits.items():
        name = str(key)
        if not name:
            raise IllusionsError("a split name is empty")
        mine_score = score.get(key) if isinstance(score, Mapping) else score
        mine_targets = targets.get(key) if isinstance(targets, Mapping) else targets
        if name in read[0]:
            split = read[0][name]
            given = [w for w, v in (("score", mine_score), ("targets", mine_targets)) if v is not None]
            if given and (isinstance(score, Mapping) or isinstance(targets, Mapping)):
                raise IllusionsError(f"split {name!r} is a JSONL file, whose lines say what is scored; "
                                     f"{' and '.join(given)} cannot apply to it")
        elif isinstance(value, Split):
            split = dataclasses.replace(value, name=name)
        else:
            tokens, lengths = _tokens_and_lengths(name, value, pad)
            split = _scored_split(name, tokens, lengths, mine_score, mine_targets, d_vocab)
        out[name] = _checked(split, d_vocab, n_ctx)
    fit_split = _add_fit(out, fit, pad, model)
    eval_splits = [n for n in out if n != fit_split]
    if not eval_splits:
        raise IllusionsError(f"no split to evaluate: the only split, {fit_split!r}, is the one the proxies are "
                             "fitted on")
    columns = read[1]
    meta_columns = list(dict.fromkeys(c for s in out.values() for c in s.scored.meta))
    return out, {
        "fit_split": fit_split, "eval_splits": eval_splits, "meta_columns": meta_columns,
        # JSONL columns as the custom task codes them; positions in round bins.
        "discrete": [c for c in meta_columns if columns.get(c, {}).get("discrete", False)],
        "group_names": {c: v["names"] for c, v in columns.items() if v.get("names") is not None},
    }


def _check_split_keys(splits: Mapping[str, Any], score: Any, targets: Any) -> None:
    """A ``score`` or ``targets`` dict names only splits there are."""
    for mapping, what in ((score, "score"), (targets, "targets")):
        if isinstance(mapping, Mapping):
            unknown = [k for k in mapping if k not in splits]
            if unknown:
                raise IllusionsError(f"{what} names split(s) {', '.join(map(str, unknown))} that are not among the "
                                     f"splits ({', '.join(splits)})")


def _add_fit(out: dict[str, Split], fit: Any, pad: int | None, model: Any) -> str:
    """The name of the fitting split: ``fit`` when it names one of ``out``, else ``train``; fitting data
    given as data is added to ``out`` (every position scored) under a name no split has."""
    d_vocab, n_ctx = int(model.cfg.d_vocab), int(model.cfg.n_ctx)
    fit_split = "train"
    if isinstance(fit, str) and not _is_jsonl(fit):
        if fit not in out:
            raise IllusionsError(f"fit names split {fit!r}, which is not among the splits ({', '.join(out)})")
        fit_split = fit
    elif fit is not None:
        fit_split = next(n for n in ("fit", "_fit", "__fit") if n not in out)
        tokens, lengths = (_tokens_and_lengths("fit", fit, pad) if not isinstance(fit, Split)
                           else (fit.tokens, fit.lengths))
        if _is_jsonl(fit):
            fitted = _read_jsonl({fit_split: fit}, d_vocab, n_ctx, model)[0][fit_split]
            tokens, lengths = fitted.tokens, fitted.lengths
        out[fit_split] = _checked(_scored_split(fit_split, tokens, lengths, None, None, d_vocab, every=True),
                                  d_vocab, n_ctx)
    return fit_split


def _is_jsonl(value: Any) -> bool:
    return isinstance(value, str | os.PathLike) and str(value).endswith(".jsonl")


def _read_jsonl(paths: Mapping[str, Any], d_vocab: int, n_ctx: int, model: Any) -> tuple[dict[str, Split], dict]:
    """JSONL splits read and checked by the ``custom`` task's own reader (every line as
    ``illusions analyze custom`` reads it), meta columns coded alike across the files."""
    from illusions.model_folders import split_special
    from illusions.tasks import custom

    reader = custom.CustomTask.__new__(custom.CustomTask)
    tokenizer = getattr(model, "tokenizer", None)
    reader.d_vocab, reader.n_ctx, reader._model = d_vocab, n_ctx, "the model"
    reader._encode = (lambda text: tokenizer.encode(text)) if tokenizer is not None else None
    # Text longer than the context is cut into windows as `analyze custom` cuts it (default window and stride).
    reader._encode_parts = (lambda text: split_special(tokenizer.encode(text), tokenizer.encode(
        text, add_special_tokens=False))) if tokenizer is not None else None
    reader.config, reader.window, reader._cut = custom.CustomConfig(), n_ctx, {"lines": 0, "windows": 0}
    raw = []
    for name, path in paths.items():
        if not Path(path).is_file():
            raise IllusionsError(f"split {name!r}: {path} does not exist or is not a file")
        one = reader._read(Path(path))
        one.name = name
        raw.append(one)
    pad = getattr(getattr(tokenizer, "pad_token_id", None), "__index__", None)
    return custom._assemble(raw, int(tokenizer.pad_token_id) if pad is not None else 0)


def _tokens_and_lengths(name: str, value: Any, pad: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``[batch, pos]`` int64 tokens (right-padded) and ``[batch]`` lengths of one split's data."""
    lengths: Any = None
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"tokens", "lengths"})
        if "tokens" not in value or unknown:
            raise IllusionsError(f"split {name!r}: a dict needs \"tokens\" (and optionally \"lengths\"), got keys "
                                 f"{', '.join(map(str, value))}")
        value, lengths = value["tokens"], value.get("lengths")
    elif isinstance(value, tuple) and len(value) == 2 and np.ndim(_plain(value[0])) == 2:
        value, lengths = value
    if isinstance(value, list | tuple) and value and all(_is_row(r) for r in value):
        rows = [_int_row(name, r) for r in value]
        if lengths is None:
            lengths = [len(r) for r in rows]
        width = max(len(r) for r in rows)
        tokens = np.full((len(rows), width), 0 if pad is None else pad, dtype=np.int64)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
    else:
        tokens = _as_array(name, value)
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise IllusionsError(f"split {name!r}: tokens must be [batch, pos] with at least one sequence, got shape "
                             f"{tuple(tokens.shape)}")
    if lengths is None:
        if pad is None:
            lengths = np.full(tokens.shape[0], tokens.shape[1], dtype=np.int64)
        else:
            real = tokens != pad
            lengths = np.where(real.any(1), tokens.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)
    lengths = _as_array(name, lengths, what="lengths")
    if lengths.shape != (tokens.shape[0],):
        raise IllusionsError(f"split {name!r}: {lengths.shape[0] if lengths.ndim == 1 else tuple(lengths.shape)} "
                             f"lengths for {tokens.shape[0]} sequences")
    return tokens, lengths


def _plain(value: Any) -> Any:
    """A tensor as a numpy array (other values as they are)."""
    return value.detach().cpu().numpy() if type(value).__name__ == "Tensor" else value


def _is_row(value: Any) -> bool:
    return isinstance(value, list | tuple | np.ndarray) or type(value).__name__ == "Tensor"


def _int_row(name: str, row: Any) -> list[int]:
    array = _as_array(name, row)
    if array.ndim != 1:
        raise IllusionsError(f"split {name!r}: each sequence must be a flat list of token ids")
    return array.tolist()


def _as_array(name: str, value: Any, what: str = "tokens") -> np.ndarray:
    if type(value).__name__ == "Tensor":
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise IllusionsError(f"split {name!r}: {what} must be integers (a tensor, an array or lists)") from None
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise IllusionsError(f"split {name!r}: {what} must be integers, got {array.dtype}")
    return array.astype(np.int64)


def _scored_split(name: str, tokens: np.ndarray, lengths: np.ndarray, score: Any, targets: Any, d_vocab: int,
                  *, every: bool = False) -> Split:
    """The split with its scored positions: ``score`` / ``targets`` as :func:`as_splits` takes them."""
    if lengths.size and (lengths.min() < 1 or lengths.max() > tokens.shape[1]):
        raise IllusionsError(f"split {name!r}: lengths must lie in 1..{tokens.shape[1]} (the padded width), got "
                             f"{lengths.min()}..{lengths.max()}")
    seq, pos, target = [], [], []
    for row in range(tokens.shape[0]):
        ids = tokens[row, : lengths[row]]
        p = np.arange(max(len(ids) - 1, 0)) if score is None or every else _positions(name, row, score, ids)
        last = len(ids) - 1 if targets is not None and not every else len(ids) - 2
        if p.size and (p.min() < 0 or p.max() > last):
            why = "" if targets is not None else " (the last position has no next token unless targets gives one)"
            raise IllusionsError(f"split {name!r}, sequence {row}: score position {int(p.max() if p.max() > last else p.min())} "
                                 f"is out of range 0..{last}{why}")
        if len(set(p.tolist())) != p.size:
            raise IllusionsError(f"split {name!r}, sequence {row}: a position is scored twice")
        t = ids[p + 1] if targets is None or every else _targets(name, row, targets, ids, p)
        seq.append(np.full(p.size, row, np.int64))
        pos.append(p)
        target.append(t)
    scored = Scored(seq=np.concatenate(seq), pos=np.concatenate(pos), target=np.concatenate(target),
                    meta={"position": np.concatenate(pos)})
    if not len(scored) and not every:
        raise IllusionsError(f"split {name!r} has no scored position (sequences of one token, or empty scores)")
    return Split(name, tokens, lengths, scored, f"{tokens.shape[0]} sequences given in Python")


def _positions(name: str, row: int, score: Any, ids: np.ndarray) -> np.ndarray:
    value = score(ids) if callable(score) else _nth(name, "score", score, row)
    array = np.asarray(value)
    if array.dtype == bool:
        if array.shape != ids.shape:
            raise IllusionsError(f"split {name!r}, sequence {row}: a score mask must have one entry per token "
                                 f"({ids.shape[0]}), got {array.shape}")
        return np.flatnonzero(array).astype(np.int64)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise IllusionsError(f"split {name!r}, sequence {row}: score positions must be integers")
    return array.astype(np.int64).reshape(-1)


def _targets(name: str, row: int, targets: Any, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
    value = targets(ids, pos) if callable(targets) else _nth(name, "targets", targets, row)
    array = _as_array(name, value, what="targets").reshape(-1)
    if array.shape[0] != pos.shape[0]:
        raise IllusionsError(f"split {name!r}, sequence {row}: {array.shape[0]} targets for {pos.shape[0]} scored "
                             "positions")
    return array


def _nth(name: str, what: str, value: Any, row: int) -> Any:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise IllusionsError(f"split {name!r}: {what} must be a function or one list per sequence")
    if row >= len(value):
        raise IllusionsError(f"split {name!r}: {what} has {len(value)} lists but the split more sequences")
    return value[row]


def _checked(split: Split, d_vocab: int, n_ctx: int) -> Split:
    # Positions are checked where they are made (a scored last position is fine with a target given).
    arrays = {"tokens": split.tokens, "lengths": split.lengths, "seq": split.scored.seq, "target": split.scored.target}
    ranges = {k: (int(v.min()), int(v.max())) for k, v in arrays.items() if v.size}
    problem = id_problem(split.name, ranges, n_rows=split.tokens.shape[0], width=split.tokens.shape[1],
                         vocab_size=d_vocab)
    pos = split.scored.pos
    if problem is None and pos.size and (pos.min() < 0 or pos.max() >= split.tokens.shape[1]):
        problem = f"{split.name} pos holds values {pos.min()}..{pos.max()}, outside 0..{split.tokens.shape[1] - 1}"
    if problem is not None:
        raise IllusionsError(problem)
    if int(split.lengths.max()) > n_ctx:
        raise IllusionsError(f"split {split.name!r}: a sequence has {int(split.lengths.max())} tokens, more than the "
                             f"model's context ({n_ctx})")
    return split


def check_candidates(candidates: Any, d_vocab: int) -> np.ndarray | None:
    """Candidate token ids as an int64 array, each in the vocabulary and listed once (None: all)."""
    if candidates is None:
        return None
    array = _as_array("candidates", candidates, what="candidates").reshape(-1)
    if not array.size:
        raise IllusionsError("candidates is empty; give the token ids predictions range over, or None for all")
    if array.min() < 0 or array.max() >= d_vocab:
        raise IllusionsError(f"candidates must be token ids in 0..{d_vocab - 1}, got {array.min()}..{array.max()}")
    if np.unique(array).size != array.size:
        raise IllusionsError("candidates lists a token id twice")
    return array
