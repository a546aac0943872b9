"""Output folders built under a temporary name and moved into place whole: checking where an output
may go, the staging and the swap, and the repair of what a killed replacement left behind.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from illusions.errors import IllusionsError
from illusions.io.files import _umask, check_creatable, disk_full_message, is_disk_full
from illusions.io.manifest import (
    _KINDS,
    FILES,
    STAGE_MARKER,
    OutputKind,
    Ownership,
    _files_under,
    file_sha256,
    kind_noun,
    ownership,
    read_manifest,
    refuse_foreign,
    write_manifest,
)


def numbered_dir(base: Path, kind: OutputKind, same: Callable[[Path], bool], *,
                 limit: int = 10_000) -> tuple[Path, bool]:
    """Where an output goes when the user chose no folder: ``base``, else ``base-2``, ``base-3``, ...

    Returns ``(folder, replace)`` for the first candidate that is absent or empty (``replace``
    False), or that holds an earlier output of ``kind`` for which ``same(folder)`` holds and whose
    files are as illusions wrote them (``replace`` True: the rerun of the same thing replaces it).
    Any other folder (another spec, edited files, a user's folder) is passed over, never touched.
    """
    base = Path(base)
    for n in range(1, limit + 1):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        recover_dir(folder)
        if not folder.exists() and not folder.is_symlink():
            return folder, False
        if folder.is_dir() and not folder.is_symlink() and (same(folder) or not any(folder.iterdir())):
            own = ownership(folder, kind)
            if own.state == "empty":
                return folder, False
            if own.state == "ours" and not own.changed:
                return folder, True
    raise IllusionsError(f"{base} and {limit - 1} numbered folders beside it are all taken; choose a folder "
                         "with --out")


def check_output_dir(
    out: Path, kind: OutputKind, *, overwrite: bool, option: str = "output location",
    overwrite_option: str = "overwrite=True",
) -> Ownership:
    """Fail before any work unless ``out`` can receive ``kind``: absent, empty, or (with ``overwrite``)
    an earlier output of the same kind; and its location must be writable.

    Raises:
        IllusionsError: naming ``option`` and what is in the way.
    """
    out = Path(out)
    recover_dir(out)
    own = ownership(out, kind)
    where = f"{option} {out}" if option else str(out)
    refuse_foreign(own, kind, where, foreign_advice="choose a new or empty folder",
                   other_advice="choose another folder")
    if own.state == "ours":
        if not overwrite:
            raise IllusionsError(f"{where} already holds {kind.noun}; pass {overwrite_option} to replace it "
                                 "(files illusions did not write are kept)")
        if own.changed:
            raise IllusionsError(f"{out / own.changed[0]} was changed after illusions wrote it; move it away "
                                 f"before replacing {out}")
    check_creatable(out.parent if own.state == "absent" or own.state == "ours" else out, target=out)
    return own


def _refusal(final: Path, own: Ownership, kind: OutputKind) -> str:
    if own.state == "file":
        return own.not_a_folder(str(final))
    if own.state == "other":
        return f"{final} holds {kind_noun(own.kind)}, not {kind.noun}; it was left as it is"
    if own.state == "foreign":
        return (f"{final} is not empty and was not written by illusions (it holds {', '.join(own.foreign)}); "
                "it was left as it is")
    return f"{final} already holds {kind.noun}; it was left as it is (replacing it needs overwrite)"


@contextmanager
def staged_dir(final: Path, *, kind: OutputKind = FILES, replace: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place only if the block succeeds.

    On any exception (including KeyboardInterrupt) the staging folder is removed and ``final`` is left
    as it was, so a failed run never leaves a partial result directory behind. The new directory gets
    a manifest (:data:`MANIFEST_FILE`) of ``kind`` listing every file the block wrote.

    ``final`` is replaced only when it is absent, empty, or (with ``replace``) an earlier output of
    the same ``kind``; files in it that illusions did not write (or that changed since) are carried
    into the new directory, unless the new one writes a file of the same name: then nothing is
    replaced. Anything else raises :class:`IllusionsError` and leaves ``final`` untouched.

    The replacement is one atomic exchange where the platform has it (Linux ``renameat2``), so a kill
    at any moment leaves ``final`` holding the old or the new directory; elsewhere two renames, and a
    kill between them is repaired by :func:`recover_dir` (called here and by the output checks) on the
    next start. A disk that fills up (``ENOSPC``) is one :class:`IllusionsError`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    stage, lock = _new_stage(final)
    try:
        try:
            yield stage
            write_manifest(stage, kind)
            own = ownership(final, kind)
            if own.state not in ("absent", "empty", "ours") or (own.state == "ours" and not replace):
                raise IllusionsError(_refusal(final, own, kind))
            for rel in own.foreign:
                target = stage / rel
                if target.exists() or target.is_symlink():
                    raise IllusionsError(f"{final / rel} was not written by illusions or was changed since, and "
                                         f"the new {kind.noun.split(' ', 1)[-1]} would replace it; move it away first")
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(final / rel, target)
            # From here the stage is proved ours by its manifest; the marker must not reach ``final``.
            (stage / STAGE_MARKER).unlink()
        except BaseException as exc:
            shutil.rmtree(stage, ignore_errors=True)
            # (Inside another staging folder, the outer one names the output the user asked for.)
            if is_disk_full(exc) and not (final / STAGE_MARKER).is_file():
                raise IllusionsError(disk_full_message(exc, final, stage)) from None
            raise
        if own.state == "absent":
            os.replace(stage, final)
        elif (final / STAGE_MARKER).is_file():
            _move_entries(stage, final)  # into a staging folder being built: its own swap publishes it
        else:
            _swap_in(stage, final)
    finally:
        os.close(lock)


def _new_stage(final: Path) -> tuple[Path, int]:
    """A fresh staging folder beside ``final``, marked as ours and locked for as long as its writer
    lives (the returned descriptor holds the lock)."""
    for _ in range(100):
        stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
        fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
        _lock(fd, block=True)
        # A recovery in another process may have taken the empty folder before the lock: start again.
        if os.fstat(fd).st_nlink == 0 or not _same_inode(fd, stage):
            os.close(fd)
            continue
        try:
            stage.chmod(0o777 & ~_umask())
            marker = {"format": "illusions-stage/1", "pid": os.getpid(), "host": os.uname().nodename}
            (stage / STAGE_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        except BaseException as exc:
            shutil.rmtree(stage, ignore_errors=True)
            os.close(fd)
            if is_disk_full(exc) and not (final / STAGE_MARKER).is_file():
                raise IllusionsError(disk_full_message(exc, final, stage)) from None
            raise
        return stage, fd
    raise IllusionsError(f"cannot create a staging folder beside {final}")


def _same_inode(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _lock(fd: int, *, block: bool) -> bool:
    """Take an exclusive ``flock`` on ``fd``; False when another holder has it (``block=False``).
    Where the file system has no locks, nothing is locked and True is returned."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return True
        raise
    return True


def _move_entries(stage: Path, final: Path) -> None:
    """Move what ``stage`` holds into ``final`` (another staging folder, not yet published)."""
    for entry in os.listdir(stage):
        target = final / entry
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(stage / entry, target)
    stage.rmdir()


def _swap_in(stage: Path, final: Path) -> None:
    """Put ``stage`` in the place of the directory ``final`` and remove the old one."""
    if exchange_dirs(stage, final):
        # ``final`` is the new directory and ``stage`` the old one: nothing can be lost from here on.
        shutil.rmtree(stage, ignore_errors=True)
        return
    # Two renames. The old directory stays locked while it is aside, so that a recovery running in
    # another process leaves it alone; a kill between the renames leaves ``final`` missing and the
    # backup, which recover_dir moves back on the next start.
    old = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _lock(old, block=True)
        backup = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
        try:
            _rename(final, backup)
        except BaseException:
            backup.rmdir()
            shutil.rmtree(stage, ignore_errors=True)
            raise
        try:
            _rename(stage, final)
        except BaseException:
            _rename(backup, final)
            shutil.rmtree(stage, ignore_errors=True)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        os.close(old)


def _rename(src: Path, dst: Path) -> None:
    """``os.replace``; its own name so that fault tests can stop the program between two renames."""
    os.replace(src, dst)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap the directories ``a`` and ``b`` in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); False, with nothing changed, where the platform or file system cannot."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):
            pass
    if not _renameat2:
        return False
    import ctypes

    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # an old kernel or a file system without exchange (NFS, some FUSE)
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def recover_dir(final: Path) -> list[str]:
    """Repair what a killed replacement of ``final`` left beside it; returns what it did, in words.

    If ``final`` is missing and a backup ``.<name>.XXXXXXXX.old`` that illusions wrote is there (a
    kill between the two renames of :func:`staged_dir`), the backup is moved back to ``final``. Then
    hidden staging folders and backups of ``final`` whose writer is gone are removed, but only those
    illusions can prove it wrote: a staging folder marked by :data:`STAGE_MARKER`, an empty folder,
    or a folder whose every file its manifest lists unchanged or that is the same file as in
    ``final`` (files a user added were carried over by hard links). Anything else is left alone.
    """
    final = Path(final)
    try:
        names = os.listdir(final.parent)
    except OSError:
        return []
    pattern = re.compile(rf"\.{re.escape(final.name)}\.[a-z0-9_]{{8}}\.(partial|old)")
    leftovers = sorted(n for n in names if pattern.fullmatch(n))
    if not leftovers:
        return []
    done: list[str] = []
    held: dict[str, int] = {}
    try:
        for name in leftovers:
            path = final.parent / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue  # gone, a link or not a directory: not ours to touch
            if not _lock(fd, block=False):
                os.close(fd)  # its writer is still at work
                continue
            held[name] = fd
        backups = [n for n in held if n.endswith(".old") and _written_by_us(final.parent / n)]
        if len(backups) == 1 and not final.exists() and not final.is_symlink():
            os.replace(final.parent / backups[0], final)
            os.close(held.pop(backups[0]))
            done.append(f"restored {final} from {backups[0]}, left by an interrupted replacement")
        for name, fd in list(held.items()):
            path = final.parent / name
            if not _same_inode(fd, path):
                continue
            if _disposable(path, final):
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {path}, left by an interrupted run")
    finally:
        for fd in held.values():
            os.close(fd)
    return done


def _written_by_us(directory: Path) -> bool:
    """``directory`` holds a manifest, a staging marker, or a legacy output of some kind."""
    if (directory / STAGE_MARKER).is_file() or read_manifest(directory) is not None:
        return True
    return any(k.is_legacy(directory) for k in _KINDS.values())


def _disposable(directory: Path, final: Path) -> bool:
    """Whether removing the leftover ``directory`` can lose nothing a user could want (see
    :func:`recover_dir`)."""
    if (directory / STAGE_MARKER).is_file():
        return True
    files = _files_under(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return not files and not any(directory.iterdir())
    listed = manifest["files"]
    for rel in files:
        path, twin = directory / rel, final / rel
        if path.is_symlink():
            if not (twin.is_symlink() and os.readlink(path) == os.readlink(twin)):
                return False
            continue
        if rel in listed and file_sha256(path) == listed[rel]:
            continue
        try:
            if twin.is_file() and (os.path.samefile(path, twin) or file_sha256(path) == file_sha256(twin)):
                continue
        except OSError:
            pass
        return False
    return True


def _link_or_copy(src: Path, dst: Path) -> None:
    """A second name for ``src`` at ``dst`` (a hard link; a copy across file systems)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
