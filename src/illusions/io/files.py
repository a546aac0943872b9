"""Single files written whole or not at all, where they may go, and why a write failed.

The data cache's root, the rule for names that become folders, atomic writes (a result file is either
complete or absent, never half-written), the up-front check that a place takes files, and the one line
for a full disk.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from illusions.errors import IllusionsError


def cache_root() -> Path:
    """Where generated data is cached: ``$ILLUSIONS_CACHE`` or ``~/.cache/illusions``."""
    env = os.environ.get("ILLUSIONS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "illusions"


# A name that becomes one folder of a path (a recipe's or run's name, a model family): one plain path
# component that is the same on every file system, never hidden, never "." or "..".
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX = 100
NAME_RULE = (f"letters, digits, '.', '_' and '-', starting with a letter or digit, no '..', "
             f"at most {NAME_MAX} characters")


def check_name(value: Any, field: str) -> str:
    """``value`` if it is one plain path component (:data:`NAME_RULE`), else :class:`IllusionsError`.

    ``field`` names where the value came from in the message, e.g. ``"name in analyses/x.toml"``.
    Every user-supplied name that becomes part of an output path goes through here before any work.
    """
    if (not isinstance(value, str) or len(value) > NAME_MAX or ".." in value
            or NAME_PATTERN.fullmatch(value) is None):
        shown = repr(value) if not isinstance(value, str) or len(value) <= 160 else repr(value[:160] + "...")
        raise IllusionsError(f"{field} {shown} is not a plain folder name; use {NAME_RULE}")
    return value


def check_inside(path: Path, root: Path, what: str = "output") -> Path:
    """``path`` if it resolves (symlinks followed) to ``root`` or below it, else :class:`IllusionsError`:
    the second guard behind :func:`check_name` for paths derived from names."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise IllusionsError(f"{what} {path} would lie outside {root} (at {resolved}); refused")
    return Path(path)


@contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """A binary file handle whose contents appear at ``path`` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the mode an ordinary open() would (0666 minus umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    with atomic_writer(path) as fh:
        fh.write(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk (``ENOSPC``) or an exhausted quota (``EDQUOT``): an ``OSError``,
    or an error of a library that writes by itself (safetensors says "os error 28")."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    text = str(exc)
    return any(f"(os error {code})" in text for code in _DISK_FULL)


def disk_full_message(exc: BaseException, final: Path | None = None, stage: Path | None = None, *,
                      writing: str | None = None) -> str:
    """The one line for :func:`is_disk_full` errors. ``final`` is the output that was left as it was
    (files of its staging folder ``stage`` are named by it); ``writing`` says what was being written
    when the error names no file."""
    name = getattr(exc, "filename", None)
    if name is None or (stage is not None and (Path(name) == stage or Path(stage) in Path(name).parents)):
        name = final
    what = writing if writing is not None and name is None else name
    where = f" while writing {what}" if what is not None else ""
    kept = "" if final is None else (f" ({final} was left as it was)" if final.exists() and Path(name) != final
                                     else "; it was left as it was" if final.exists() else "; nothing was written")
    return f"{_disk_full_what(exc)}{where}{kept}; free some space and run again"


def _disk_full_what(exc: BaseException) -> str:
    code = exc.errno if isinstance(exc, OSError) else (
        errno.EDQUOT if f"(os error {errno.EDQUOT})" in str(exc) else errno.ENOSPC)
    return "no space left on the device" if code == errno.ENOSPC else "disk quota exceeded"


def check_creatable(directory: Path, *, target: Path | None = None) -> None:
    """Fail unless a file can be created in ``directory`` (or, if it does not exist yet, in the nearest
    existing folder above it): catches read-only places, ``/proc`` and paths through a file.

    ``target`` is what the caller will write there, for the message (default ``directory``).
    """
    directory = Path(directory)
    named = Path(target) if target is not None else directory
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise IllusionsError(f"cannot create {named}: {existing} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".illusions-probe-")
    except OSError as exc:
        raise IllusionsError(f"cannot write to {named}: no file can be created in {existing} "
                             f"({exc.strerror or exc})") from None
    try:
        # A few bytes, flushed to the disk: a disk that is already full fails here, before any work.
        os.write(fd, bytes(_PROBE_BYTES))
        os.fsync(fd)
    except OSError as exc:
        if is_disk_full(exc):
            raise IllusionsError(f"{_disk_full_what(exc)} under {existing}, so {named} cannot be written; "
                                 "free some space and run again") from None
        raise IllusionsError(f"cannot write to {named}: {existing} takes no data ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
        os.unlink(probe)


# What the probe of check_creatable writes: a disk that cannot take this much is refused up front.
_PROBE_BYTES = 4096
