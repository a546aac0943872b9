"""Arrays files that load without copying.

:func:`save_npz_mappable` writes an ordinary ``.npz`` (``np.load`` reads it as usual) whose members
are stored uncompressed with their data aligned to 64 bytes, so :func:`load_npz_mapped` can map each
array straight from the file: opening costs nothing, and only the rows a run touches are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from illusions.io.files import atomic_writer

if TYPE_CHECKING:
    import numpy as np


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
