"""Frozen configuration dataclasses with JSON-primitive fields.

Every config in the package subclasses :class:`Config`: ``to_dict`` gives plain JSON data and
``from_dict`` rebuilds the object, rejecting unknown keys with an error that names them (and the file
they came from, when given), so a typo in a recipe never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Self

from illusions.errors import IllusionsError


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: a frozen dataclass whose fields are JSON primitives (or tuples of them)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> Self:
        """Build from a mapping; unknown keys and wrong types raise :class:`IllusionsError`."""
        where = f" in {source}" if source else ""
        if not isinstance(data, dict):
            raise IllusionsError(f"expected a table of {cls.__name__} settings{where}, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise IllusionsError(
                f"unknown {cls.__name__} key(s) {', '.join(unknown)}{where}; "
                f"known keys: {', '.join(fields)}"
            )
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            default = fields[name].default
            if value is None and "None" in str(fields[name].type):
                kwargs[name] = None  # an optional field (e.g. ``max_seqs = None``: no limit)
                continue
            if isinstance(value, list):
                value = tuple(value)
            if isinstance(default, bool) and not isinstance(value, bool):
                raise IllusionsError(f"{cls.__name__}.{name}{where} must be true or false, got {value!r}")
            if isinstance(default, int) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                raise IllusionsError(f"{cls.__name__}.{name}{where} must be an integer, got {value!r}")
            if isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise IllusionsError(f"{cls.__name__}.{name}{where} must be a number, got {value!r}")
            if isinstance(default, float):
                value = float(value)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise IllusionsError(f"invalid {cls.__name__}{where}: {exc}") from None

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


def read_json(path: Path) -> Any:
    """Read a JSON file, turning a missing or corrupt file into one clear error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise IllusionsError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IllusionsError(f"{path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise IllusionsError(f"{path} is not JSON illusions reads (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise IllusionsError(f"{path} is not JSON illusions reads ({str(exc)[:120]})") from None
    except IsADirectoryError:
        raise IllusionsError(f"{path} is a directory, not a JSON file") from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML recipe, turning a missing, unreadable or malformed file into one clear error naming it.

    The recipe must be a regular UTF-8 file: a directory, FIFO, dangling symlink or symlink loop is
    refused (see :func:`open_regular`).
    """
    try:
        with os.fdopen(open_regular(path, what="recipe"), "rb") as fh:
            return tomllib.loads(fh.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise IllusionsError(f"recipe {path} is not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    except OSError as exc:
        raise IllusionsError(f"cannot read recipe {path} ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise IllusionsError(f"recipe {path} is not valid TOML ({exc})") from None


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _open_error(path: Path, exc: OSError, what: str) -> IllusionsError:
    name = f"{what} {path}" if what else str(path)
    if exc.errno == errno.ELOOP:
        return IllusionsError(f"{name} is a symlink loop, not a readable file")
    if isinstance(exc, FileNotFoundError) and path.is_symlink():
        return IllusionsError(f"{name} is a dangling symlink (to {os.readlink(path)}, which does not exist)")
    if isinstance(exc, FileNotFoundError):
        return IllusionsError(f"{name} does not exist")
    return IllusionsError(f"cannot read {name} ({exc.strerror or exc})")


def open_regular(path: Path | str, *, what: str = "") -> int:
    """A file descriptor open for reading on ``path``, which must be a regular file.

    The file is opened without blocking and checked with ``fstat`` before any byte is read, so a
    FIFO cannot hang the program and the check and the read see the same file. ``what`` names the
    file's role in messages (``"split file"``, ``"corpus file"``).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise _open_error(path, exc, what) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((k for test, k in _KINDS if test(mode)), "a special file")
        name = f"{what} {path}" if what else str(path)
        raise IllusionsError(f"{name} is {kind}, not a readable file")
    os.set_blocking(fd, True)
    return fd


def check_regular(path: Path | str, *, what: str = "") -> None:
    """Refuse ``path`` unless it is a readable regular file (see :func:`open_regular`)."""
    os.close(open_regular(path, what=what))


