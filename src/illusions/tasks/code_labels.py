"""What the code task knows of each character: its category (:data:`CATEGORIES`), its nesting
depth (:func:`depths`) and, for a copied identifier character, where it can be copied from
(:func:`label`); and the deep-nesting threshold (:func:`deep_threshold`). See
:mod:`illusions.tasks.code`."""

from __future__ import annotations

import dataclasses
import keyword
import re

import numpy as np

CATEGORIES = ("bracket", "whitespace", "copy", "identifier", "other")
"""Names of the ``category`` codes 0..4 of a target character:

* ``bracket``: one of ``()[]{}``;
* ``whitespace``: space, tab or newline (indentation included);
* ``copy``: a character after the first of an identifier that already occurred earlier in the same
  sequence (the same whole word, language keywords excluded): it can be copied from context;
* ``identifier``: any other character of an identifier (``[A-Za-z_$][A-Za-z0-9_$]*``), including the
  first character of a repeated one and keywords;
* ``other``: everything else (operators, punctuation, digits, non-ASCII).
"""
BRACKET, WHITESPACE, COPY, IDENTIFIER, OTHER = range(5)

_IDENT = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*|[0-9][A-Za-z0-9_$]*")
_OPEN, _CLOSE = "([{", ")]}"
_TAB = 8

KEYWORDS: dict[str, frozenset[str]] = {
    "python": frozenset(keyword.kwlist) | frozenset(keyword.softkwlist),
    "java": frozenset(
        "abstract assert boolean break byte case catch char class const continue default do double "
        "else enum extends final finally float for goto if implements import instanceof int interface "
        "long native new package private protected public return short static strictfp super switch "
        "synchronized this throw throws transient try void volatile while var record yield sealed "
        "permits true false null".split()
    ),
    "javascript": frozenset(
        "await break case catch class const continue debugger default delete do else export extends "
        "false finally for function if import in instanceof let new null return static super switch "
        "this throw true try typeof var void while with yield async of get set undefined".split()
    ),
    "go": frozenset(
        "break case chan const continue default defer else fallthrough for func go goto if import "
        "interface map package range return select struct switch type var nil true false".split()
    ),
    "ruby": frozenset(
        "BEGIN END alias and begin break case class def defined? do else elsif end ensure false for if "
        "in module next nil not or redo rescue retry return self super then true undef unless until "
        "when while yield".split()
    ),
    "php": frozenset(
        "abstract and array as break callable case catch class clone const continue declare default do "
        "echo else elseif empty enddeclare endfor endforeach endif endswitch endwhile extends final "
        "finally fn for foreach function global goto if implements include instanceof insteadof "
        "interface isset list match namespace new or print private protected public require return "
        "static switch throw trait try unset use var while xor yield null true false self this".split()
    ),
}


@dataclasses.dataclass(frozen=True)
class Labels:
    """Per-character labels of one text (index ``i`` is the character at token position ``i + 1``)."""

    category: np.ndarray  # [chars] int64, codes of CATEGORIES
    depth: np.ndarray  # [chars] int64
    key_pos: np.ndarray  # [chars] int64 token position, -1 unless category is COPY


def _bracket_scan(text: str) -> tuple[np.ndarray, np.ndarray]:
    around = np.zeros(len(text), dtype=np.int64)
    before = np.zeros(len(text), dtype=np.int64)
    d = 0
    for i, c in enumerate(text):
        before[i] = d
        if c in _CLOSE:
            d = max(d - 1, 0)
        around[i] = d
        if c in _OPEN:
            d += 1
    return around, before


def bracket_depths(text: str) -> np.ndarray:
    """Brackets ``()[]{}`` open around each character, unmatched closers clamped at zero.

    An opening bracket and its closing bracket both get the depth *outside* them (the opener counts
    what is open before it, the closer what is open after it); brackets inside strings and comments
    count like any other (the labels read characters, they do not parse).
    """
    return _bracket_scan(text)[0]


def depths(text: str) -> np.ndarray:
    """Nesting depth of every character of ``text``: ``brackets + indent``.

    ``brackets`` is :func:`bracket_depths`; ``indent`` is the indentation level of the *logical* line
    holding the character. A logical line starts at a physical line that begins outside any bracket;
    continuation lines (begun inside a bracket) and whitespace-only lines keep the level of the
    logical line before them. A level is the line's leading whitespace width (tabs to multiples of 8)
    divided by the function's indentation unit, the smallest positive width among its logical line
    starts (4 if none). So Python block nesting counts through indentation and Java/JavaScript block
    nesting through braces (their bodies lie inside ``{``, so only the signature starts a logical
    line), each once.
    """
    n = len(text)
    brackets, before = _bracket_scan(text)
    lines = text.split("\n")
    widths: list[int | None] = []  # leading width of each logical line start, None otherwise
    starts = []
    offset = 0
    for line in lines:
        starts.append(offset)
        continuation = offset < n and before[offset] > 0
        expanded = line.expandtabs(_TAB)
        blank = not expanded.strip()
        widths.append(None if continuation or blank else len(expanded) - len(expanded.lstrip()))
        offset += len(line) + 1
    positive = [w for w in widths if w]
    unit = min(positive) if positive else 4
    indent = np.zeros(n, dtype=np.int64)
    level = 0
    for line, start, w in zip(lines, starts, widths, strict=True):
        if w is not None:
            level = w // unit
        indent[start : min(start + len(line) + 1, n)] = level
    return brackets + indent


def label(text: str, language: str) -> Labels:
    """Category, nesting depth (:func:`depths`) and copy source of every character of ``text``.

    Args:
        text: one function (or its truncated prefix).
        language: its language, for the keywords excluded from copying.

    Returns:
        The labels; ``key_pos`` counts token positions (BOS is position 0, ``text[i]`` is ``i + 1``).
    """
    n = len(text)
    category = np.full(n, OTHER, dtype=np.int64)
    key_pos = np.full(n, -1, dtype=np.int64)
    for i, c in enumerate(text):
        if c in _OPEN or c in _CLOSE:
            category[i] = BRACKET
        elif c in " \t\n\r\f\v":
            category[i] = WHITESPACE
    keywords = KEYWORDS.get(language, frozenset())
    last: dict[str, int] = {}
    for m in _IDENT.finditer(text):
        word, s, e = m.group(), m.start(), m.end()
        if word[0].isdigit():
            continue  # a number: stays OTHER
        category[s:e] = IDENTIFIER
        if word in keywords:
            continue
        if word in last:
            category[s + 1 : e] = COPY
            key_pos[s + 1 : e] = np.arange(last[word] + 1, last[word] + len(word)) + 1
        last[word] = s
    return Labels(category, depths(text), key_pos)


def deep_threshold(max_depths: np.ndarray, fraction: float) -> int:
    """Smallest depth ``D`` with ``0 < #(max_depth >= D) <= fraction * n``.

    Falls back to the largest depth when no such ``D`` exists (many functions tie at the maximum), so
    that ``deep_nesting`` is never empty while some depth difference exists.
    """
    n = max_depths.shape[0]
    top = int(max_depths.max())
    for d in range(1, top + 1):
        if 0 < int((max_depths >= d).sum()) <= fraction * n:
            return d
    return top
