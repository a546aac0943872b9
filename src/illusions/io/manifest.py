"""The manifest every output folder holds, and who wrote a folder (illusions as which kind, or a user).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from illusions.errors import IllusionsError
from illusions.io.files import atomic_write_json

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


def kind_noun(tag: str | None) -> str:
    kind = _KINDS.get(tag or "")
    return kind.noun if kind is not None else "another kind of illusions output"


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


# Inside a staging folder while its block runs: proves the folder is illusions' own (with the lock
# its writer holds on the folder, that the writer is gone when the lock is free). Never in an output.
STAGE_MARKER = ".illusions-staging"
