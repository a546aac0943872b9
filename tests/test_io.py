"""Arrays files that load by mapping: still ordinary .npz files, read back exactly, never half-written."""

from __future__ import annotations

import mmap
import zipfile

import numpy as np
import pytest

from illusions.io import load_npz_mapped, save_npz_mappable

ARRAYS = {
    "train.tokens": np.arange(7 * 13, dtype=np.int64).reshape(7, 13),
    "train.flags": np.array([1, 0, 1], dtype=np.uint8),
    "config": np.array('{"seed": 0}'),
    "empty": np.zeros(0, dtype=np.int64),
    "strided": np.arange(20, dtype=np.int32)[::3],
    "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_file_is_a_plain_npz_and_maps_back_exactly(tmp_path):
    path = tmp_path / "a.npz"
    save_npz_mappable(path, ARRAYS)
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(ARRAYS)
        assert all(_same(z[k], v) for k, v in ARRAYS.items())
    assert zipfile.ZipFile(path).testzip() is None
    loaded = load_npz_mapped(path)
    assert sorted(loaded) == sorted(ARRAYS)
    for key, value in ARRAYS.items():
        assert _same(loaded[key], value), key
        assert isinstance(loaded[key].base, mmap.mmap), f"{key} was read, not mapped"
        assert loaded[key].ctypes.data % 64 == 0


def test_mapped_arrays_are_writable_without_touching_the_file(tmp_path):
    path = tmp_path / "a.npz"
    save_npz_mappable(path, ARRAYS)
    before = path.read_bytes()
    loaded = load_npz_mapped(path)
    loaded["train.tokens"][0, 0] = -1
    assert path.read_bytes() == before
    assert load_npz_mapped(path)["train.tokens"][0, 0] == 0


@pytest.mark.parametrize("writer", [np.savez, np.savez_compressed])
def test_other_npz_files_are_read_as_np_load_would(tmp_path, writer):
    path = tmp_path / "b.npz"
    writer(path, **ARRAYS)
    loaded = load_npz_mapped(path)
    assert all(_same(loaded[k], v) for k, v in ARRAYS.items())


def test_not_an_npz_raises_and_a_failed_write_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(zipfile.BadZipFile):
        load_npz_mapped(bad)
    path = tmp_path / "c.npz"
    with pytest.raises(ValueError, match="pickle"):
        save_npz_mappable(path, {"ok": np.arange(3), "objects": np.array([{}, []], dtype=object)})
    assert list(tmp_path.iterdir()) == [bad]
