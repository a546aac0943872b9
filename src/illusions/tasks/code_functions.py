"""The records of a code corpus: one :class:`Function`, a :class:`Corpus` of them, and the
fingerprint that names a corpus exactly (see :mod:`illusions.tasks.code_corpus`)."""

from __future__ import annotations

import dataclasses
import hashlib
import textwrap
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True, order=True)
class Function:
    """One function's source text (dedented, ``\\n`` line ends) and its lowercase language name.

    Attributes:
        language: lowercase language name.
        text: the function's source, or (in the pinned corpus) its first characters.
        length: the whole function's length in characters when ``text`` is a prefix of it; 0 when
            ``text`` is the whole function (see :attr:`n_chars`).
        path: where it came from, for the record (not compared, not fingerprinted).
    """

    language: str
    text: str
    length: int = 0
    path: str = dataclasses.field(default="", compare=False)

    @property
    def n_chars(self) -> int:
        """Length of the whole function in characters (not only of :attr:`text`)."""
        return self.length or len(self.text)

    @property
    def truncated(self) -> bool:
        """Whether :attr:`text` is only the start of the function."""
        return self.length > len(self.text)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A deduplicated, sorted set of functions.

    Attributes:
        functions: sorted by ``(language, text)``, no duplicates.
        fingerprint: sha256 hex digest over the sorted ``(language, text)`` pairs.
        source: the corpus path as given, ``"machine"``, or ``"pinned"``.
        origins: where the functions came from (files, archives, packages), for the record.
        prefix_chars: when positive, functions longer than this are stored as their first
            ``prefix_chars`` characters (the pinned corpus); 0: every function is whole.
    """

    functions: tuple[Function, ...]
    fingerprint: str
    source: str
    origins: tuple[str, ...] = ()
    prefix_chars: int = 0

    def languages(self) -> dict[str, int]:
        """Number of functions per language, sorted by name."""
        counts: dict[str, int] = {}
        for f in self.functions:
            counts[f.language] = counts.get(f.language, 0) + 1
        return dict(sorted(counts.items()))


def normalize(text: str) -> str:
    """Unix line ends, no trailing whitespace at the end, common indentation removed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return textwrap.dedent(text).strip("\n").rstrip()


def strip_indent(text: str) -> str:
    """Remove the first line's indentation from every line that starts with it, then :func:`normalize`.

    Plain dedenting removes nothing when a multi-line string literal in the body has lines at column
    0; the first line (the signature) says what the function's own indentation was.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    first = text.lstrip("\n")
    prefix = first[: len(first) - len(first.lstrip(" \t"))]
    if prefix:
        text = "\n".join(ln[len(prefix) :] if ln.startswith(prefix) else ln for ln in text.split("\n"))
    return normalize(text)


def _order(f: Function) -> tuple[str, str, int]:
    """The sort key of a function: its dataclass order (language, text, length) as a plain tuple,
    which sorts several times faster than the generated ``__lt__``."""
    return (f.language, f.text, f.length)


def fingerprint(functions: Iterable[Function]) -> str:
    """sha256 over the sorted, deduplicated ``(language, text)`` pairs (NUL-separated).

    A function stored as a prefix (``length`` set) adds ``\\x01`` and its full length after its text,
    so the fingerprint of a corpus of whole functions is what it was before prefixes existed.
    """
    return _fingerprint_sorted(sorted(set(functions), key=_order))


def _fingerprint_sorted(functions: list[Function]) -> str:
    h = hashlib.sha256()
    for f in functions:
        h.update(f.language.encode("utf-8") + b"\0" + f.text.encode("utf-8"))
        if f.length:
            h.update(b"\x01" + str(f.length).encode("ascii"))
        h.update(b"\0")
    return h.hexdigest()


def make_corpus(
    functions: Iterable[Function],
    *,
    source: str,
    origins: Iterable[str] = (),
    max_per_language: int = 0,
    prefix_chars: int = 0,
) -> Corpus:
    """Deduplicate, optionally cap each language, sort and fingerprint.

    Args:
        functions: raw records (duplicates allowed).
        source: the corpus path as given, ``"machine"`` or ``"pinned"``.
        origins: files or archives read, for the record.
        max_per_language: if positive, keep at most this many functions per language: those with the
            smallest sha256 of their text, a pseudo-random sample independent of file order.
        prefix_chars: see :class:`Corpus`.

    Returns:
        The corpus.
    """
    unique = sorted(set(functions), key=_order)
    if max_per_language > 0:
        by_lang: dict[str, list[Function]] = {}
        for f in unique:
            by_lang.setdefault(f.language, []).append(f)
        unique = []
        for fs in by_lang.values():
            if len(fs) > max_per_language:
                fs = sorted(fs, key=lambda f: hashlib.sha256(f.text.encode("utf-8")).digest())
                fs = fs[:max_per_language]
            unique.extend(fs)
        unique.sort(key=_order)
    return Corpus(tuple(unique), _fingerprint_sorted(unique), source, tuple(origins), prefix_chars)
