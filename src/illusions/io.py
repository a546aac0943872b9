"""Atomic file output: a result file is either complete or absent, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Where generated data is cached: ``$ILLUSIONS_CACHE`` or ``~/.cache/illusions``."""
    env = os.environ.get("ILLUSIONS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "illusions"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the mode an ordinary open() would (0666 minus umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def staged_dir(final: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place only if the block succeeds.

    On any exception (including KeyboardInterrupt) the staging folder is removed and ``final`` is left
    as it was, so a failed run never leaves a partial result directory behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    stage.chmod(0o777 & ~_umask())
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if final.exists():
        if not overwrite:
            shutil.rmtree(stage, ignore_errors=True)
            raise FileExistsError(final)
        backup = final.with_name(f".{final.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(final, backup)
        os.replace(stage, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(stage, final)
