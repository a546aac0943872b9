"""Arrays files that load by mapping: still ordinary .npz files, read back exactly, never half-written."""

from __future__ import annotations

import json
import mmap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from illusions.io import CHECKSUM_MEMBER, load_npz_mapped, save_npz_mappable

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
        assert sorted(z.files) == sorted([*ARRAYS, CHECKSUM_MEMBER])
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


# ---------------------------------------------------------------- checksums of arrays files


@pytest.mark.parametrize("compress", [False, True])
def test_verified_load_checks_every_array_and_gives_integer_ranges(tmp_path, compress):
    from illusions.io import load_npz_verified

    path = tmp_path / "a.npz"
    save_npz_mappable(path, ARRAYS, compress=compress)
    arrays, ranges = load_npz_verified(path)
    assert sorted(arrays) == sorted(ARRAYS) and all(_same(arrays[k], v) for k, v in ARRAYS.items())
    assert ranges == {"train.tokens": (0, 90), "train.flags": (0, 1), "strided": (0, 18)}


def _flip_byte_inside(path, needle: bytes, at: int = 8) -> None:
    data = bytearray(path.read_bytes())
    i = data.find(needle)
    assert i >= 0
    data[i + at] ^= 0x55
    path.write_bytes(bytes(data))


def test_a_changed_byte_inside_an_array_is_a_checksum_error(tmp_path):
    from illusions.io import ChecksumError, load_npz_verified

    path = tmp_path / "a.npz"
    save_npz_mappable(path, ARRAYS)
    _flip_byte_inside(path, ARRAYS["train.tokens"].tobytes(), at=8 * 40)
    assert load_npz_mapped(path)["train.tokens"][3, 1] != 40  # the mapped loader alone cannot tell
    with pytest.raises(ChecksumError, match="train.tokens"):
        load_npz_verified(path)


def test_a_file_without_checksums_is_not_verified(tmp_path):
    from illusions.io import ChecksumError, load_npz_verified

    path = tmp_path / "b.npz"
    np.savez(path, **ARRAYS)
    with pytest.raises(ChecksumError, match="no checksums"):
        load_npz_verified(path)


# ---------------------------------------------------------------- whose directory is it


def test_staged_dir_never_replaces_a_folder_it_did_not_write(tmp_path):
    from illusions.errors import IllusionsError
    from illusions.io import MANIFEST_FILE, staged_dir

    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(IllusionsError, match="not written by illusions"):
        with staged_dir(user) as stage:
            (stage / "out.txt").write_text("x")
    assert sorted(p.name for p in user.iterdir()) == ["thesis.tex"]
    assert [p.name for p in tmp_path.iterdir()] == ["thesis"], "staging folder left behind"
    # Its own output it replaces, keeping what a user added; the manifest lists only its files.
    ours = tmp_path / "ours"
    with staged_dir(ours) as stage:
        (stage / "out.txt").write_text("1")
    (ours / "notes.txt").write_text("mine")
    with staged_dir(ours) as stage:
        (stage / "out.txt").write_text("2")
    assert (ours / "out.txt").read_text() == "2" and (ours / "notes.txt").read_text() == "mine"
    assert sorted(json.loads((ours / MANIFEST_FILE).read_text())["files"]) == ["out.txt"]
    # ... unless asked not to, or unless the new output would write over an edited file of its own.
    with pytest.raises(IllusionsError, match="overwrite"):
        with staged_dir(ours, replace=False) as stage:
            (stage / "out.txt").write_text("3")
    (ours / "out.txt").write_text("edited by hand")
    with pytest.raises(IllusionsError, match="out.txt was not written by illusions or was changed"):
        with staged_dir(ours) as stage:
            (stage / "out.txt").write_text("4")
    assert (ours / "out.txt").read_text() == "edited by hand"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "thesis"]


def test_a_hidden_neighbour_named_like_the_backup_survives(tmp_path):
    from illusions.io import staged_dir

    (tmp_path / ".run.old").mkdir()
    (tmp_path / ".run.old" / "keep.txt").write_text("mine")
    for _ in range(2):
        with staged_dir(tmp_path / "run") as stage:
            (stage / "a").write_text("x")
    assert (tmp_path / ".run.old" / "keep.txt").read_text() == "mine"


def test_ownership_of_kinds_and_legacy_folders(tmp_path):
    from illusions.io import OutputKind, ownership, staged_dir

    kind_a = OutputKind("test-a", "an A", legacy_required=("a.json",), legacy_files=("a.json", "fig_*.png"))
    kind_b = OutputKind("test-b", "a B")
    assert ownership(tmp_path / "none", kind_a).state == "absent"
    (tmp_path / "empty").mkdir()
    assert ownership(tmp_path / "empty", kind_a).state == "empty"
    (tmp_path / "file").write_text("x")
    assert ownership(tmp_path / "file", kind_a).state == "file"
    with staged_dir(tmp_path / "b", kind=kind_b) as stage:
        (stage / "b.json").write_text("{}")
    assert ownership(tmp_path / "b", kind_a).state == "other"
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("a.json", "fig_1.png", "notes.txt"):
        (legacy / name).write_text(name)
    own = ownership(legacy, kind_a)
    assert own.state == "ours" and own.foreign == ("notes.txt",)
    (legacy / "a.json").unlink()
    assert ownership(legacy, kind_a).state == "foreign"


def test_check_creatable_refuses_proc_and_paths_through_files(tmp_path):
    from illusions.errors import IllusionsError
    from illusions.io import check_creatable

    check_creatable(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists(), "the probe left something behind"
    with pytest.raises(IllusionsError, match="cannot write to /proc/x"):
        check_creatable(Path("/proc/x"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(IllusionsError, match="is not a directory"):
        check_creatable(tmp_path / "f" / "sub")


# ---------------------------------------------------------------- a kill in the middle of a replacement

# Runs in a fresh process: writes run 1 into OUT (plus a user's notes), then replaces it with run 2 and
# is killed (SIGKILL, nothing runs after it) at the moment MODE names.
KILL_SCRIPT = r"""
import os, shutil, signal, sys
from pathlib import Path
import illusions.io as io
import illusions.io.staging as staging

out, mode = Path(sys.argv[1]), sys.argv[2]
with io.staged_dir(out) as stage:
    (stage / "weights.bin").write_bytes(b"1" * 1000)
    (stage / "sub").mkdir()
    (stage / "sub" / "state.json").write_text('{"step": 1}')
(out / "notes.txt").write_text("a user's notes")

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

real_replace, real_rmtree = os.replace, shutil.rmtree
if mode == "fallback":
    staging.exchange_dirs = lambda a, b: False  # a platform without an atomic exchange
if mode in ("between-renames", "fallback"):
    def replace(src, dst):
        # The second rename of a two-rename swap: the staging folder onto the (now missing) run folder.
        if Path(src).name.endswith(".partial") and Path(dst) == out:
            kill()
        real_replace(src, dst)
    os.replace = replace
elif mode == "after-swap":
    def rmtree(path, *a, **k):
        if Path(path).parent == out.parent and Path(path).name.startswith("." + out.name):
            kill()
        real_rmtree(path, *a, **k)
    shutil.rmtree = rmtree
with io.staged_dir(out) as stage:
    (stage / "weights.bin").write_bytes(b"2" * 1000)
    (stage / "sub").mkdir()
    (stage / "sub" / "state.json").write_text('{"step": 2}')
    if mode == "mid-write":
        kill()
print("not killed")
"""


@pytest.mark.parametrize("mode", ["between-renames", "fallback", "after-swap", "mid-write"])
def test_a_kill_during_a_replacement_never_hides_the_output(tmp_path, mode):
    """SIGKILL at any moment of a replacement: on the next start the folder holds the old or the new
    output, whole, with the user's files, and the hidden leftovers illusions wrote are gone."""
    import os
    import signal
    import subprocess
    import sys

    from illusions.io import FILES, check_output_dir, ownership

    out = tmp_path / "run"
    # A user's hidden folder named like a leftover must survive the clean-up.
    lookalike = tmp_path / ".run.abcdefgh.old"
    lookalike.mkdir()
    (lookalike / "mine.txt").write_text("keep")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), mode], env=env, capture_output=True,
                          text=True, timeout=120)
    if mode == "between-renames" and proc.returncode == 0:
        # The platform swapped in one atomic step: there was no moment between two renames.
        assert "not killed" in proc.stdout
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    check_output_dir(out, FILES, overwrite=True)  # the next start
    assert ownership(out, FILES).state == "ours"
    weights = (out / "weights.bin").read_bytes()
    assert weights in (b"1" * 1000, b"2" * 1000)
    step = {b"1" * 1000: 1, b"2" * 1000: 2}[weights]
    assert json.loads((out / "sub" / "state.json").read_text()) == {"step": step}, "old and new mixed"
    assert (out / "notes.txt").read_text() == "a user's notes"
    assert ownership(out, FILES).changed == ()
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden == [lookalike.name], f"leftovers not cleaned: {hidden}"
    assert (lookalike / "mine.txt").read_text() == "keep"


def test_a_live_writer_s_staging_folder_is_left_alone(tmp_path):
    """Recovery in one process never touches the staging folder of a writer still at work."""
    from illusions.io import recover_dir, staged_dir

    out = tmp_path / "run"
    with staged_dir(out) as stage:
        (stage / "a.txt").write_text("x")
        assert recover_dir(out) == []
        assert stage.is_dir() and (stage / "a.txt").is_file()
    assert (out / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
