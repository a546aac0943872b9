"""JSON Lines files read line by line, every way a file or a line can be wrong one clear error.

The tasks that read JSONL (``custom``'s splits, the ``code`` task's CodeSearchNet corpora) use
:func:`read_objects` and nothing else, so a file is checked the same way everywhere:

* the path must be a readable regular file (:func:`illusions.config.open_regular`): a directory, FIFO, socket or device, a dangling
  symlink and a symlink loop are refused (a FIFO is never opened for reading, so it cannot block);
* ``.gz`` files are decompressed; the text must be UTF-8;
* each non-blank line must be one JSON object with no key given twice (``{"tokens": [1], "tokens":
  [2]}`` is refused rather than read as its last value), whose integers have at most
  :func:`sys.get_int_max_str_digits` digits and whose nesting Python's parser can follow.

Every error is an :class:`IllusionsError` naming the file (and ``file:line`` for a line).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from illusions.config import open_regular
from illusions.errors import IllusionsError


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _digits(exc: ValueError) -> str:
    words = str(exc).split("value has ", 1)
    got = f" (one has {words[1].split(' digits')[0]})" if len(words) == 2 else ""
    return f"holds an integer longer than {sys.get_int_max_str_digits()} digits{got}"


def read_objects(path: Path | str, *, what: str = "", line_label: str = "",
                 expected: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, object)`` for every non-blank line of a JSONL file (``where``: ``line_label`` +
    ``path:line``, for the caller's own messages about the line).

    Args:
        path: the file (``.gz``: gzip-compressed).
        what: the file's role in messages about the file (``"corpus file"``).
        line_label: words before ``path:line`` in messages about a line (``"corpus line "``).
        expected: appended to the message for a line that is not a JSON object (what one looks like).

    Raises:
        IllusionsError: the file is not a readable regular file, not UTF-8 (or not gzip), or a line
            is not JSON, not an object, gives a key twice, holds an integer too long to read or nests
            too deep for the parser.
    """
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    raw = os.fdopen(open_regular(path, what=what), "rb")
    binary: Any = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw
    try:
        with io.TextIOWrapper(binary, encoding="utf-8") as text:
            for lineno, line in enumerate(text, 1):
                if not line.strip():
                    continue
                where = f"{line_label}{path}:{lineno}"
                try:
                    obj = json.loads(line, object_pairs_hook=_no_duplicates)
                except json.JSONDecodeError as exc:
                    raise IllusionsError(f"{where} is not valid JSON ({exc.msg})") from None
                except _DuplicateKey as exc:
                    raise IllusionsError(f"{where} gives the key {exc.key!r} twice") from None
                except RecursionError:
                    raise IllusionsError(f"{where} nests JSON too deep to read (over "
                                         f"{sys.getrecursionlimit()} levels)") from None
                except ValueError as exc:  # an integer of more digits than Python converts
                    raise IllusionsError(f"{where} {_digits(exc)}") from None
                if not isinstance(obj, dict):
                    raise IllusionsError(f"{where} is not a JSON object{expected}")
                yield where, obj
    except UnicodeDecodeError:
        raise IllusionsError(f"{name} is not UTF-8 text") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise IllusionsError(f"cannot read {name} ({exc})") from None
    finally:
        raw.close()
