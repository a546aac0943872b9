"""Atomic file output (a result file is either complete or absent, never half-written), output folders
that illusions can tell from a user's, and arrays files that load without copying.

The package's parts, each for one job (every name below is importable from ``illusions.io``):

- :mod:`illusions.io.files`: the data cache's root, names that become folders, atomic writes of one
  file, the check that a place takes files, the one line for a full disk;
- :mod:`illusions.io.manifest`: the manifest each output folder holds and who wrote a folder;
- :mod:`illusions.io.staging`: output folders built aside and swapped in whole, where an output may
  go, and the repair of what a killed replacement left;
- :mod:`illusions.io.npz`: ``.npz`` files whose arrays are mapped from the file, with checksums.
"""

from __future__ import annotations

from illusions.io.files import (
    NAME_MAX,
    NAME_PATTERN,
    NAME_RULE,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    cache_root,
    check_creatable,
    check_inside,
    check_name,
    disk_full_message,
    is_disk_full,
)
from illusions.io.manifest import (
    FILES,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    STAGE_MARKER,
    OutputKind,
    Ownership,
    changed_files,
    check_manifest,
    file_sha256,
    kind_noun,
    ownership,
    read_manifest,
    record_written,
    refuse_foreign,
    write_manifest,
)
from illusions.io.npz import (
    CHECKSUM_MEMBER,
    ChecksumError,
    load_npz_mapped,
    load_npz_verified,
    save_npz_mappable,
)
from illusions.io.staging import (
    check_output_dir,
    exchange_dirs,
    numbered_dir,
    recover_dir,
    staged_dir,
)

__all__ = [
    "CHECKSUM_MEMBER", "FILES", "MANIFEST_FILE", "MANIFEST_FORMAT", "NAME_MAX", "NAME_PATTERN", "NAME_RULE",
    "STAGE_MARKER", "ChecksumError", "OutputKind", "Ownership", "atomic_write_bytes", "atomic_write_json",
    "atomic_write_text", "atomic_writer", "cache_root", "changed_files", "check_creatable", "check_inside",
    "check_manifest", "check_name", "check_output_dir", "disk_full_message", "exchange_dirs", "file_sha256",
    "is_disk_full", "kind_noun", "load_npz_mapped", "load_npz_verified", "numbered_dir", "ownership",
    "read_manifest", "record_written", "recover_dir", "refuse_foreign", "save_npz_mappable", "staged_dir",
    "write_manifest",
]
