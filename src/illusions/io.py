"""Atomic file output (a result file is either complete or absent, never half-written) and arrays
files that load without copying.

:func:`save_npz_mappable` writes an ordinary ``.npz`` (``np.load`` reads it as usual) whose members
are stored uncompressed with their data aligned to 64 bytes, so :func:`load_npz_mapped` can map each
array straight from the file: opening costs nothing, and only the rows a run touches are read.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def cache_root() -> Path:
    """Where generated data is cached: ``$ILLUSIONS_CACHE`` or ``~/.cache/illusions``."""
    env = os.environ.get("ILLUSIONS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "illusions"


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


# Member data starts on this boundary (a cache line; any dtype's alignment divides it).
_NPZ_ALIGN = 64
# A private extra-field id for the padding (the one zipalign uses); zip readers skip unknown ids.
_PAD_FIELD = 0xD935
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... file name length, extra field length


def save_npz_mappable(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` whose array data is 64-byte aligned, atomically.

    The file is a standard ``.npz`` (no pickle); the alignment lives in a padding extra field of
    each member's local header, which zip readers skip.
    """
    import zipfile

    import numpy as np

    with atomic_writer(path) as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            array = np.asarray(value)
            if not array.flags.c_contiguous:
                array = np.array(array, order="C")
            npy_header = _npy_header(array)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.file_size = len(npy_header) + array.nbytes
            zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule
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
    writable; writes stay private to the process. Raises ``OSError``, ``ValueError`` or
    ``zipfile.BadZipFile`` for a file that is not a readable ``.npz``.
    """
    import io
    import mmap
    import zipfile

    import numpy as np

    with open(path, "rb") as fh:
        with zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            out: dict[str, np.ndarray] = {}
            for info in infos:
                key = info.filename.removesuffix(".npy")
                array = None
                if info.compress_type == zipfile.ZIP_STORED:
                    array = _mapped_member(mapped, info)
                if array is None:
                    with zf.open(info) as member:
                        array = np.lib.format.read_array(io.BytesIO(member.read()), allow_pickle=False)
                out[key] = array
    return out


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
