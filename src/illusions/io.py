"""Atomic file output (a result file is either complete or absent, never half-written) and arrays
files that load without copying.

:func:`save_npz_mappable` writes an ordinary ``.npz`` (``np.load`` reads it as usual) whose members
are stored uncompressed with their data aligned to 64 bytes, so :func:`load_npz_mapped` can map each
array straight from the file: opening costs nothing, and only the rows a run touches are read.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from illusions.errors import IllusionsError

if TYPE_CHECKING:
    import numpy as np


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


# Every directory illusions writes holds this file: what kind of output it is and the sha256 of each
# file it wrote, so that a later command can tell its own earlier output (which it may replace) from
# a user's folder (which it must never delete) and notice a file changed or damaged since.
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "illusions-manifest/1"

_KINDS: dict[str, OutputKind] = {}


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """A kind of output directory, and how to recognise one written before manifests existed.

    Attributes:
        tag: recorded in the manifest, e.g. ``analysis-run``.
        noun: how messages name it, e.g. ``an analysis run``.
        legacy_required: files every manifest-less directory of this kind holds (empty: no legacy
            directory is recognised).
        legacy_files: glob patterns of the relative paths such a directory's files may have; other
            files in it are taken to be the user's.
        legacy_marker: ``(file, key, value)``: the JSON ``file`` (one of ``legacy_required``) has
            ``key`` equal to ``value`` (or, with ``value`` None, has ``key``), so a folder of the same
            file names written by another program (a Hugging Face model's ``config.json``) is not
            mistaken for one of ours.
    """

    tag: str
    noun: str
    legacy_required: tuple[str, ...] = ()
    legacy_files: tuple[str, ...] = ()
    legacy_marker: tuple[str, str, Any] | None = None

    def is_legacy(self, directory: Path) -> bool:
        """Whether ``directory`` (without a manifest) is one of these written by an older version."""
        if not self.legacy_required or not all((directory / f).is_file() for f in self.legacy_required):
            return False
        if self.legacy_marker is None:
            return True
        name, key, value = self.legacy_marker
        try:
            data = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return False
        return isinstance(data, dict) and key in data and (value is None or data[key] == value)

    def __post_init__(self) -> None:
        _KINDS[self.tag] = self


FILES = OutputKind("files", "files written by illusions")


@dataclasses.dataclass(frozen=True)
class Ownership:
    """Who wrote a directory, as far as illusions can tell.

    Attributes:
        state: ``absent``, ``file`` (a non-directory is there), ``empty``, ``ours`` (written by
            illusions as this kind), ``other`` (written by illusions as another kind) or ``foreign``
            (a non-empty directory illusions did not write).
        kind: the manifest's tag, when there is one.
        foreign: relative paths (sorted) of files in an ``ours`` directory that illusions did not
            write or that changed since; for ``foreign``, a few of the directory's entries.
        changed: those of ``foreign`` that illusions wrote and that were changed since.
        link: for ``file``, where the path links to when it is a symbolic link (illusions never writes
            through one).
    """

    state: str
    kind: str | None = None
    foreign: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    link: str | None = None

    def not_a_folder(self, where: str) -> str:
        """What is wrong with a ``file`` state, for a message about ``where``."""
        if self.link is not None:
            return (f"{where} is a symbolic link (to {self.link}); illusions does not write through links, "
                    "so give the folder itself")
        return f"{where} exists and is not a directory"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files_under(directory: Path) -> list[str]:
    """Relative POSIX paths of every file (or link) below ``directory``, manifest excluded."""
    out = []
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        out += [(rel_root / f).as_posix() for f in files]
        # A linked directory is listed as an entry, never followed.
        out += [(rel_root / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(p for p in out if p not in (MANIFEST_FILE, STAGE_MARKER))


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of ``directory`` as ``{"kind", "files": {path: sha256}}``; None if absent or garbled."""
    try:
        data = json.loads((Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("files"), dict):
        return None
    return data


def write_manifest(directory: Path, kind: OutputKind, files: list[str] | None = None) -> None:
    """Record ``files`` (default: every file below ``directory``) with their sha256 in its manifest."""
    from illusions import __version__

    directory = Path(directory)
    names = _files_under(directory) if files is None else sorted(files)
    manifest = {
        "format": MANIFEST_FORMAT,
        "written_by": f"illusions {__version__}",
        "kind": kind.tag,
        "files": {name: file_sha256(directory / name) for name in names},
    }
    atomic_write_json(directory / MANIFEST_FILE, manifest)


def record_written(directory: Path, files: list[str]) -> None:
    """Add (or update) ``files`` of ``directory`` in its manifest after writing them in place."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return
    listed = dict(manifest["files"])
    listed.update({name: file_sha256(directory / name) for name in files})
    manifest["files"] = dict(sorted(listed.items()))
    atomic_write_json(directory / MANIFEST_FILE, manifest)


def check_manifest(directory: Path) -> None:
    """Refuse a directory whose manifest is there but unreadable (garbled, truncated, edited into
    something else): a damaged manifest must not switch the integrity check off."""
    path = Path(directory) / MANIFEST_FILE
    if (path.exists() or path.is_symlink()) and read_manifest(directory) is None:
        raise IllusionsError(f"{path} is damaged (not an illusions manifest), so the files of {directory} cannot "
                             "be checked against the sha256 recorded when illusions wrote them; write them again")


def changed_files(directory: Path, names: tuple[str, ...] | list[str]) -> list[str]:
    """Those of ``names`` that the manifest of ``directory`` lists with another sha256 than the file
    has now (a damaged or edited file). Files it does not list, or a missing manifest, pass; a manifest
    that is there but unreadable is refused (:func:`check_manifest`)."""
    check_manifest(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return []
    listed = manifest["files"]
    directory = Path(directory)
    return [n for n in names if n in listed and (directory / n).is_file()
            and file_sha256(directory / n) != listed[n]]


def ownership(directory: Path, kind: OutputKind) -> Ownership:
    """Whether ``directory`` is absent, empty, illusions' own output of ``kind``, or someone else's."""
    directory = Path(directory)
    if not directory.exists() and not directory.is_symlink():
        return Ownership("absent")
    if not directory.is_dir() or directory.is_symlink():
        return Ownership("file", link=os.readlink(directory) if directory.is_symlink() else None)
    files = _files_under(directory)
    manifest = read_manifest(directory)
    if manifest is None and not files and not any(p.name != STAGE_MARKER for p in directory.iterdir()):
        return Ownership("empty")  # (a staging folder being built, holding only its marker, is empty too)
    if manifest is not None:
        tag = manifest.get("kind")
        if tag != kind.tag:
            return Ownership("other", kind=str(tag))
        listed = manifest["files"]
        changed = tuple(f for f in files if f in listed and file_sha256(directory / f) != listed[f])
        foreign = tuple(f for f in files if f not in listed) + changed
        return Ownership("ours", kind=tag, foreign=tuple(sorted(foreign)), changed=changed)
    if kind.is_legacy(directory):
        foreign = tuple(f for f in files if not any(fnmatch.fnmatchcase(f, p) for p in kind.legacy_files))
        return Ownership("ours", kind=None, foreign=foreign)
    for other in _KINDS.values():
        if other is not kind and other.is_legacy(directory):
            return Ownership("other", kind=other.tag)
    entries = sorted(p.name for p in directory.iterdir())
    return Ownership("foreign", foreign=tuple(entries[:3]) + (("...",) if len(entries) > 3 else ()))


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


def kind_noun(tag: str | None) -> str:
    kind = _KINDS.get(tag or "")
    return kind.noun if kind is not None else "another kind of illusions output"


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


def refuse_foreign(own: Ownership, kind: OutputKind, where: str, *, foreign_advice: str,
                   other_advice: str) -> None:
    """Raise when ``own`` is a plain file, a folder illusions did not write, or an output of another kind
    than ``kind``: the states in which nothing may be written there. ``where`` names the place."""
    if own.state == "file":
        raise IllusionsError(own.not_a_folder(where))
    if own.state == "foreign":
        raise IllusionsError(f"{where} is not empty and was not written by illusions (it holds "
                             f"{', '.join(own.foreign)}); {foreign_advice}")
    if own.state == "other":
        raise IllusionsError(f"{where} holds {kind_noun(own.kind)}, not {kind.noun}; {other_advice}")


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


# Inside a staging folder while its block runs: proves the folder is illusions' own (with the lock
# its writer holds on the folder, that the writer is gone when the lock is free). Never in an output.
STAGE_MARKER = ".illusions-staging"
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


# Member data starts on this boundary (a cache line; any dtype's alignment divides it).
_NPZ_ALIGN = 64
# A private extra-field id for the padding (the one zipalign uses); zip readers skip unknown ids.
_PAD_FIELD = 0xD935
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... file name length, extra field length


# The member holding each other member's sha256 (over its .npy bytes, header included), as JSON.
CHECKSUM_MEMBER = "__sha256__"


class ChecksumError(ValueError):
    """An arrays file whose contents differ from the checksums stored in it (or that has none)."""


def save_npz_mappable(path: Path, arrays: Mapping[str, np.ndarray], *, compress: bool = False) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` whose array data is 64-byte aligned, atomically.

    The file is a standard ``.npz`` (no pickle); the alignment lives in a padding extra field of
    each member's local header, which zip readers skip. A last member, :data:`CHECKSUM_MEMBER`,
    records the sha256 of every other member, which :func:`load_npz_verified` checks. With
    ``compress`` the members are deflated instead (smaller, but read rather than mapped).
    """
    import zipfile

    import numpy as np

    digests: dict[str, str] = {}
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_writer(path) as fh, zipfile.ZipFile(fh, "w", compression=method) as zf:
        for key, value in [*arrays.items(), (CHECKSUM_MEMBER, None)]:
            if key == CHECKSUM_MEMBER and value is None:
                array = np.array(json.dumps(digests, sort_keys=True))
            else:
                if key == CHECKSUM_MEMBER:
                    raise ValueError(f"{CHECKSUM_MEMBER} is a reserved member name")
                array = np.asarray(value)
            if not array.flags.c_contiguous:
                array = np.array(array, order="C")
            npy_header = _npy_header(array)
            if key != CHECKSUM_MEMBER:
                digest = hashlib.sha256(npy_header)
                digest.update(array.data)
                digests[key] = digest.hexdigest()
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            info.file_size = len(npy_header) + array.nbytes
            zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule
            if not compress:
                name_len = len(info.filename.encode("ascii"))
                start = fh.tell() + _LOCAL_HEADER.size + name_len + 4 + (20 if zip64 else 0) + len(npy_header)
                info.extra = struct.pack("<HH", _PAD_FIELD, -start % _NPZ_ALIGN) + bytes(-start % _NPZ_ALIGN)
            with zf.open(info, "w", force_zip64=zip64) as out:
                out.write(npy_header)
                out.write(array.data)


def _npy_header(array: np.ndarray) -> bytes:
    import io

    import numpy as np

    if array.dtype.hasobject:
        raise ValueError("object arrays cannot be saved without pickle")
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(array))
    return buf.getvalue()


def load_npz_mapped(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``, mapped copy-on-write from the file where a member allows it.

    Members written by :func:`save_npz_mappable` are mapped without reading them; compressed or
    unaligned members (any other ``.npz``) are read into memory as ``np.load`` would. The arrays are
    writable; writes stay private to the process. The checksum member is not returned (nor
    checked: see :func:`load_npz_verified`). Raises ``OSError``, ``ValueError`` or
    ``zipfile.BadZipFile`` for a file that is not a readable ``.npz``.
    """
    return _load_npz(path, verify=False)[0]


def load_npz_verified(path: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    """:func:`load_npz_mapped`, after checking every member against the file's stored sha256.

    The check reads the file once, in chunks (mapped members stay unread by the process, so they
    add nothing to its memory); the same pass finds the smallest and largest value of every
    non-empty integer array, which callers use to check ids against a vocabulary without touching
    the mapped data.

    Returns:
        ``(arrays, ranges)`` with ``ranges[name] = (min, max)`` for the non-empty integer arrays.

    Raises:
        ChecksumError: the file has no checksums, lists other members than it holds, or a member's
            bytes differ from its checksum.
        OSError, ValueError, zipfile.BadZipFile: the file is not a readable ``.npz``.
    """
    return _load_npz(path, verify=True)


def _load_npz(path: Path, *, verify: bool) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    import io
    import mmap
    import zipfile

    import numpy as np

    ranges: dict[str, tuple[int, int]] = {}
    digests: dict[str, str] = {}
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as fh:
        with zipfile.ZipFile(fh) as zf:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            for info in zf.infolist():
                key = info.filename.removesuffix(".npy")
                check = verify and key != CHECKSUM_MEMBER
                array = _mapped_member(mapped, info) if info.compress_type == zipfile.ZIP_STORED else None
                if array is not None:
                    if check:
                        digests[key], lo_hi = _scan_stored(fh, info, array)
                        if lo_hi is not None:
                            ranges[key] = lo_hi
                else:
                    with zf.open(info) as member:
                        raw = member.read()
                    array = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
                    if check:
                        digests[key] = hashlib.sha256(raw).hexdigest()
                        if array.dtype.kind in "iu" and array.size:
                            ranges[key] = (int(array.min()), int(array.max()))
                out[key] = array
    stored = out.pop(CHECKSUM_MEMBER, None)
    if verify:
        _compare_digests(path, stored, digests)
    return out, ranges


def _compare_digests(path: Path, stored: Any, digests: dict[str, str]) -> None:
    if stored is None:
        raise ChecksumError(f"{path} holds no checksums")
    try:
        want = json.loads(str(stored))
    except ValueError:
        raise ChecksumError(f"{path} holds unreadable checksums") from None
    if not isinstance(want, dict) or set(want) != set(digests):
        raise ChecksumError(f"{path} holds other arrays than its checksums list")
    bad = sorted(k for k, v in digests.items() if want[k] != v)
    if bad:
        raise ChecksumError(f"checksum mismatch in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")


def _scan_stored(fh: Any, info: Any, array: np.ndarray) -> tuple[str, tuple[int, int] | None]:
    """sha256 of a stored member's bytes read from the file, and its integer range, in one pass."""
    import numpy as np

    local = _LOCAL_HEADER.unpack(_pread(fh, _LOCAL_HEADER.size, info.header_offset))
    start = info.header_offset + _LOCAL_HEADER.size + local[-2] + local[-1]
    end = start + info.file_size
    data_start = end - array.nbytes
    digest = hashlib.sha256(_pread(fh, data_start - start, start))
    integer = array.dtype.kind in "iu" and array.size > 0
    lo = hi = None
    itemsize = max(array.dtype.itemsize, 1)
    buf = bytearray(min(_SCAN_CHUNK // itemsize * itemsize, max(array.nbytes, 1)))
    view = memoryview(buf)
    offset = data_start
    while offset < end:
        n = os.preadv(fh.fileno(), [view[: min(len(buf), end - offset)]], offset)
        if n <= 0 or (integer and n % itemsize):
            raise ValueError(f"{info.filename} is truncated")
        digest.update(view[:n])
        if integer:
            values = np.frombuffer(buf, dtype=array.dtype, count=n // itemsize)
            c_lo, c_hi = int(values.min()), int(values.max())
            lo = c_lo if lo is None else min(lo, c_lo)
            hi = c_hi if hi is None else max(hi, c_hi)
        offset += n
    return digest.hexdigest(), ((lo, hi) if integer and lo is not None and hi is not None else None)


# Bytes read per call while checking a mapped member (a reused buffer: no allocation per chunk).
_SCAN_CHUNK = 8 << 20


def _pread(fh: Any, size: int, offset: int) -> bytes:
    return os.pread(fh.fileno(), size, offset)


def _mapped_member(mapped: Any, info: Any) -> np.ndarray | None:
    """The array of one stored member as a view of ``mapped``; None when it cannot be mapped."""
    import io

    import numpy as np

    local = _LOCAL_HEADER.unpack_from(mapped, info.header_offset)
    if local[0] != b"PK\x03\x04":
        raise ValueError(f"bad local header for {info.filename}")
    data = info.header_offset + _LOCAL_HEADER.size + local[-2] + local[-1]
    head = io.BytesIO(mapped[data : data + min(info.file_size, 1 << 16)])
    version = np.lib.format.read_magic(head)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
    else:
        return None
    offset = data + head.tell()
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if dtype.hasobject or offset % _NPZ_ALIGN or offset + size > data + info.file_size:
        return None
    return np.ndarray(shape, dtype, buffer=mapped, offset=offset, order="F" if fortran else "C")
