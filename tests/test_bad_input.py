"""Bad input, end to end through the real CLI: one table, one row per case.

Each row is a command line, the exit code it must give, words its message must hold, files that
must come through it byte for byte, and files that must not appear. Rows with exit code 2 must print
exactly one line, ``error: ...``, and never a traceback. Rows run through Typer's CliRunner in this
process, and those marked ``subprocess`` through ``python -m illusions`` in a fresh process.

To add a case, append a :class:`Case` to ``CASES``. In ``argv`` (and in ``survive`` / ``absent``),
``{tmp}`` is the case's own folder, ``{model}`` a copy of a tiny Dyck checkpoint there, ``{run}``
a copy of a finished analysis run of it, ``{repo}`` the repository and ``{assets}`` the package's
bundled models; ``FAST`` holds options that keep an analysis of the tiny model quick. ``setup``
names preparations from ``SETUPS`` (a user's folder, a damaged cache, ...), applied in order.
With ``fresh_cache`` the case gets an empty data cache that must still be empty afterwards: the
command failed before building or loading any data.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import illusions
from conftest import SMALL_DYCK, small_dyck
from illusions.bundled import ASSETS
from illusions.cli import app
from illusions.io import MANIFEST_FILE
from illusions.models import build_model, save_model
from illusions.tasks.dyck import DyckTask

REPO = Path(__file__).resolve().parents[1]
FAST = ("--model", "{model}", "--fit-n", "50", "--n-boot", "20", "--threads", "1", "--no-report",
        "--max-seqs", "20")
DEEP = " ".join(f"({c}" for c in "abcdefghijk") + " " + " ".join(f"{c})" for c in reversed("abcdefghijk"))
TOO_DEEP = " ".join(f"({c}" for c in "abcdefghijklmnop") + " " + " ".join(
    f"{c})" for c in reversed("abcdefghijklmnop"))
RECIPES = ("--recipes", "{repo}/analyses", "--task", "dyck", "--seeds", "0", "--threads", "1", "--no-report")


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad (or borderline) input and what the CLI must do with it.

    Attributes:
        id: the test id.
        argv: the command line after ``illusions`` (placeholders as in the module docstring).
        code: the exit code.
        words: words the message must hold (the one error line for code 2; stderr otherwise).
        survive: paths whose bytes must be the same afterwards.
        setup: names of preparations in ``SETUPS``.
        absent: paths that must not exist afterwards (no half-written result).
        not_words: words that must not appear in stderr.
        stdout_words: words that must appear on stdout.
        replaced: paths whose bytes must differ afterwards (an output that was replaced).
        fresh_cache: run on an empty data cache that must stay empty (it failed before any work).
        subprocess: run ``python -m illusions`` in a new process instead of CliRunner.
        fault: ``(name, path)``: a fault from ``FAULTS`` injected below ``path`` (placeholders as in
            ``argv``) while the command runs (CliRunner rows only).
    """

    id: str
    argv: tuple[str, ...]
    code: int = 2
    words: tuple[str, ...] = ()
    survive: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    not_words: tuple[str, ...] = ()
    stdout_words: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    fresh_cache: bool = False
    subprocess: bool = False
    fault: tuple[str, str] = ()


# ------------------------------------------------------------------------------------------ setups


def _user_folder(tmp: Path, env: Env) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("\\chapter{Years of work}\n")


def _notes_in_run(tmp: Path, env: Env) -> None:
    (tmp / "run" / "notes.txt").write_text("what I saw in this run\n")


def _user_report(tmp: Path, env: Env) -> None:
    (tmp / "run" / "report.html").write_text("<p>my own report, edited by hand</p>\n")


def _user_figure(tmp: Path, env: Env) -> None:
    (tmp / "run" / "fig_accuracy.png").write_bytes(b"my own figure\n")


def _user_results(tmp: Path, env: Env) -> None:
    (tmp / "docs").mkdir()
    (tmp / "docs" / "RESULTS.md").write_text("# My results\n\nWritten by me.\n")


def _stale_reproduction(tmp: Path, env: Env) -> None:
    target = tmp / "rep" / "dyck-svd-L1" / "seed0"
    target.parent.mkdir(parents=True)
    shutil.copytree(tmp / "run", target)  # a run of another spec than the recipe's


def _bad_row(tmp: Path, env: Env) -> None:
    path = tmp / "run" / "metrics.csv"
    lines = path.read_text().splitlines()
    cells = lines[3].split(",")
    cells[8] = "abc"  # the value column
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def _changed_value(tmp: Path, env: Env) -> None:
    path = tmp / "run" / "metrics.csv"
    lines = path.read_text().splitlines()
    cells = lines[3].split(",")
    cells[8] = "0.999"  # a plausible number: only the manifest's sha256 can tell
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def _random_csv(tmp: Path, env: Env) -> None:
    path = tmp / "run" / "metrics.csv"
    data = bytearray(path.read_bytes())
    data[200:264] = np.random.default_rng(0).integers(128, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _garbage_records(tmp: Path, env: Env) -> None:
    (tmp / "run" / "records.npz").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _no_manifest(tmp: Path, env: Env) -> None:
    (tmp / "run" / MANIFEST_FILE).unlink()  # a run from before manifests: only parsing can tell


def _overwrite_in_file(path: Path, array: np.ndarray, index: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    start = data.find(array.tobytes()[:2048])
    assert start >= 0
    offset = start + index * array.itemsize
    data[offset : offset + array.itemsize] = np.array(value, dtype=array.dtype).tobytes()
    path.write_bytes(bytes(data))


def _corrupt_cache(tmp: Path, env: Env) -> None:
    # A token id far outside the vocabulary, inside a stored array of a still valid .npz.
    task = DyckTask(SMALL_DYCK, cache_dir=tmp / "cache" / "dyck")
    tokens = np.array(task.splits()["iid"].tokens)
    del task
    _overwrite_in_file(tmp / "cache" / "dyck" / DyckTask(SMALL_DYCK).cache_path.name, tokens, 5, 200)


def _bad_ids_cache(tmp: Path, env: Env) -> None:
    # Checksums that match, over a token id outside the vocabulary (as a buggy writer would leave).
    from illusions.tasks import dyck_splits

    task = DyckTask(SMALL_DYCK, cache_dir=tmp / "cache" / "dyck")
    splits = {k: dataclasses.replace(v, tokens=np.array(v.tokens)) for k, v in task.splits().items()}
    splits["iid"].tokens[0, 1] = 43
    dyck_splits.save(task.cache_path, SMALL_DYCK, splits, task.sampling_stats())


def _corrupt_weights(tmp: Path, env: Env) -> None:
    path = tmp / "model" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-300:-200] = np.random.default_rng(2).integers(0, 256, 100, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _bad_vocab_recipe(tmp: Path, env: Env) -> None:
    text = (REPO / "tasks" / "dyck.toml").read_text().replace("d_vocab = 43", "d_vocab = 10")
    assert "d_vocab = 10" in text
    (tmp / "recipe.toml").write_text(text)


def _bad_wall_keep_recipe(tmp: Path, env: Env) -> None:
    text = (REPO / "tasks" / "dyck-paperlike.toml").read_text().replace("seed = 0\n", "seed = 0\nwall_keep = 0\n")
    assert text.count("wall_keep = 0") == 2  # [task] and [train] both end their seed line; both get it
    (tmp / "recipe.toml").write_text(text.replace("wall_keep = 0\n", "", 1))


def _garbled_manifest(tmp: Path, env: Env) -> None:
    (tmp / "run" / MANIFEST_FILE).write_text('{"format": "illusions-manifest/1", "files": ')


def _garbled_model_manifest(tmp: Path, env: Env) -> None:
    (tmp / "model" / MANIFEST_FILE).write_bytes(b"\x00garbled")


def _no_model_manifest(tmp: Path, env: Env) -> None:
    (tmp / "model" / MANIFEST_FILE).unlink()  # a checkpoint from before manifests, or made by hand


def _edit_model_config(**changes: int) -> Callable[[Path, Env], None]:
    def edit(tmp: Path, env: Env) -> None:
        path = tmp / "model" / "config.json"
        data = json.loads(path.read_text())
        data["model"].update(changes)
        path.write_text(json.dumps(data))
    return edit


def _edit_model_weights(name: str, value: Callable[[Any], Any]) -> Callable[[Path, Env], None]:
    def edit(tmp: Path, env: Env) -> None:
        from safetensors.torch import load_file, save_file

        path = tmp / "model" / "model.safetensors"
        state = load_file(str(path))
        state[name] = value(state[name])
        save_file(state, str(path), metadata={"format": "illusions-model/1"})
    return edit


def _nan_weight(tensor: Any) -> Any:
    tensor = tensor.clone()
    tensor.view(-1)[7] = float("nan")
    return tensor


def _huge_records(tmp: Path, env: Env) -> None:
    # One member's .npy header claims 2^40 elements over the few bytes it holds.
    import io
    import zipfile

    path = tmp / "run" / "records.npz"
    with zipfile.ZipFile(path) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (2**40,)})
    members["fit_rows.npy"] = header.getvalue() + bytes(64)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _deep_config(tmp: Path, env: Env) -> None:
    (tmp / "run" / "config.json").write_text("[" * 100_000 + "]" * 100_000)


def _link_to_run(tmp: Path, env: Env) -> None:
    (tmp / "link").symlink_to(tmp / "run", target_is_directory=True)


ANALYSIS_TABLE = '[analysis]\ntask = "dyck"\nsimplifier = "onehot"\nfit_n = 50\nn_boot = 20\nmax_seqs = 20\n'


def _write_recipe(tmp: Path, text: str) -> None:
    """An analysis recipe of ``text`` on the tiny model, as ``{tmp}/recipes/r.toml`` and ``{tmp}/r.toml``."""
    text += f"model = {json.dumps(str(tmp / 'model'))}\n"
    (tmp / "recipes").mkdir()
    (tmp / "recipes" / "r.toml").write_text(text)
    (tmp / "r.toml").write_text(text)


def _recipe_named(name: str) -> Callable[[Path, Env], None]:
    """An analysis recipe (:func:`_write_recipe`) whose name is ``name``."""

    def setup(tmp: Path, env: Env) -> None:
        _write_recipe(tmp, f"name = {json.dumps(name.format(tmp=tmp))}\n{ANALYSIS_TABLE}")

    return setup


def _analysis_recipe(table: str) -> Callable[[Path, Env], None]:
    """An analysis recipe (:func:`_write_recipe`) of ``table`` (an ``[analysis]`` table)."""

    def setup(tmp: Path, env: Env) -> None:
        _write_recipe(tmp, table)

    return setup


def _tiny_recipe(tmp: Path, env: Env) -> None:
    fields = "\n".join(f"{k} = {v}" for k, v in SMALL_DYCK.to_dict().items())
    (tmp / "tiny.toml").write_text(TINY_RECIPE.format(task=fields, n_ctx=SMALL_DYCK.max_len))


def _training_recipe_with_a_name(tmp: Path, env: Env) -> None:
    _tiny_recipe(tmp, env)
    (tmp / "tiny.toml").write_text('name = "../escape"\n' + (tmp / "tiny.toml").read_text())


def _user_folder_at_the_default_out(tmp: Path, env: Env) -> None:
    (tmp / "runs" / "dyck-svd-rank2").mkdir(parents=True)
    (tmp / "runs" / "dyck-svd-rank2" / "thesis.tex").write_text("\\chapter{Years of work}\n")
def _custom_data(tmp: Path, env: Env) -> None:
    # Splits of data you bring for the tiny Dyck checkpoint (43 tokens, context 40).
    rng = np.random.default_rng(3)
    (tmp / "data").mkdir()
    for name, n in (("train", 40), ("iid", 12), ("long", 12)):
        rows = [{"tokens": [1, *rng.integers(3, 43, int(rng.integers(6, 30))).tolist()]} for _ in range(n)]
        (tmp / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _replace_iid(make: Callable[[Path], None]) -> Callable[[Path, Env], None]:
    def setup(tmp: Path, env: Env) -> None:
        (tmp / "data" / "iid.jsonl").unlink()
        make(tmp / "data" / "iid.jsonl")
    return setup


def _iid_line(line: str, *, alone: bool = False) -> Callable[[Path, Env], None]:
    """Append ``line`` to iid.jsonl (its line 13), or make it the file's only line."""
    def setup(tmp: Path, env: Env) -> None:
        with open(tmp / "data" / "iid.jsonl", "w" if alone else "a") as fh:
            fh.write(line + "\n")
    return setup


def _recipe_not_utf8(tmp: Path, env: Env) -> None:
    (tmp / "recipe.toml").write_bytes((REPO / "tasks" / "dyck.toml").read_bytes().replace(b"Dyck-(20,10)", b"Dyck \xff"))


def _recipe_loop(tmp: Path, env: Env) -> None:
    (tmp / "recipe.toml").symlink_to("recipe.toml")


def _model_recipe(old: str, new: str) -> Callable[[Path, Env], None]:
    def setup(tmp: Path, env: Env) -> None:
        text = (REPO / "tasks" / "dyck.toml").read_text()
        assert text.count(old) == 1
        (tmp / "recipe.toml").write_text(text.replace(old, new))
    return setup


SETUPS: dict[str, Callable[[Path, Env], None]] = {
    "user_folder": _user_folder,
    "notes_in_run": _notes_in_run,
    "user_report": _user_report,
    "user_figure": _user_figure,
    "user_results": _user_results,
    "stale_reproduction": _stale_reproduction,
    "bad_row": _bad_row,
    "changed_value": _changed_value,
    "random_csv": _random_csv,
    "garbage_records": _garbage_records,
    "no_manifest": _no_manifest,
    "corrupt_cache": _corrupt_cache,
    "bad_ids_cache": _bad_ids_cache,
    "corrupt_weights": _corrupt_weights,
    "bad_vocab_recipe": _bad_vocab_recipe,
    "bad_wall_keep_recipe": _bad_wall_keep_recipe,
    "garbled_manifest": _garbled_manifest,
    "garbled_model_manifest": _garbled_model_manifest,
    "no_model_manifest": _no_model_manifest,
    "n_ctx_1e9": _edit_model_config(n_ctx=10**9),
    "n_layers_100000": _edit_model_config(n_layers=100_000),
    "nan_weight": _edit_model_weights("blocks.0.attn.W_Q", _nan_weight),
    "int8_weight": _edit_model_weights("blocks.1.mlp.W_in", lambda t: t.to(torch.int8)),
    "bool_weight": _edit_model_weights("unembed.b_U", lambda t: t > 0),
    "huge_records": _huge_records,
    "deep_config": _deep_config,
    "link_to_run": _link_to_run,
    "recipe_named_dotdot_escape": _recipe_named("../../escape"),
    "recipe_named_absolute": _recipe_named("{tmp}/elsewhere"),
    "recipe_named_dotdot": _recipe_named(".."),
    "recipe_named_hidden": _recipe_named(".hidden"),
    "dyck_recipe": _analysis_recipe(ANALYSIS_TABLE),
    "per_head_resid_svd_recipe": _analysis_recipe(
        ANALYSIS_TABLE.replace('"onehot"', '"resid-svd"\nranks = [2]\nper_head = true')),
    "tiny_recipe": _tiny_recipe,
    "training_recipe_with_a_name": _training_recipe_with_a_name,
    "user_folder_at_the_default_out": _user_folder_at_the_default_out,
    "custom_data": _custom_data,
    "iid_dir": _replace_iid(lambda p: p.mkdir()),
    "iid_fifo": _replace_iid(os.mkfifo),
    "iid_dangling": _replace_iid(lambda p: p.symlink_to(p.parent / "gone.jsonl")),
    "iid_loop": _replace_iid(lambda p: p.symlink_to(p.name)),
    "iid_twice_a_key": _iid_line('{"tokens": [1, 5, 6], "tokens": [1, 5]}'),
    "iid_5000_digits": _iid_line('{"tokens": [1, ' + "7" * 5000 + "]}"),
    "iid_200000_deep": _iid_line('{"tokens": [1, 5], "meta": {"x": [' + "[" * 200_000 + "]" * 200_000 + "]}}"),
    "iid_meta_1e29": _iid_line('{"tokens": [1, 5, 6], "meta": {"x": [' + str(10**29) + ", 2]}}", alone=True),
    "recipe_not_utf8": _recipe_not_utf8,
    "recipe_dir": lambda tmp, env: (tmp / "recipe.toml").mkdir(),
    "recipe_loop": _recipe_loop,
    "recipe_n_ctx_1e9": _model_recipe("n_ctx = 128", "n_ctx = 1000000000"),
    "recipe_n_layers_1e6": _model_recipe("n_layers = 2", "n_layers = 1000000"),
}


# ------------------------------------------------------------------------------------------ faults


def _no_space(place: Path, monkeypatch: pytest.MonkeyPatch, *, probe_fails: bool) -> None:
    """Writes below ``place`` fail as on a full disk: a flush (``os.fsync``: every atomic write and
    the probe of an output check make one) raises ENOSPC, and safetensors' writer raises the error a
    real full disk gives it. With ``probe_fails`` False the disk fills only after the output checks."""
    import safetensors.torch
    from safetensors import SafetensorError

    place = place.resolve()
    real_fsync, real_save = os.fsync, safetensors.torch.save_file

    def below(path: str | Path) -> bool:
        resolved = Path(path).resolve()
        return resolved == place or place in resolved.parents

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if below(path) and (probe_fails or not Path(path).name.startswith(".illusions-probe-")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    def save_file(tensors, filename, *args, **kwargs):
        if below(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


FAULTS: dict[str, Callable[[Path, pytest.MonkeyPatch], None]] = {
    "disk_full": lambda place, mp: _no_space(place, mp, probe_fails=True),
    "disk_fills": lambda place, mp: _no_space(place, mp, probe_fails=False),
}

ANALYZE = ("analyze", "dyck", "--simplify", "svd", "--rank", "2", *FAST)
MODEL_FILES = ("model/model.safetensors", "model/config.json")
CUSTOM = ("analyze", "custom", "--data", "{tmp}/data", "--model", "{model}", "--rank", "2", "--threads", "1",
          "--n-boot", "20", "--no-report", "--out", "{tmp}/new")

CASES = [
    # 1. never delete what illusions did not write
    Case("analyze-out-user-folder", (*ANALYZE, "--out", "{tmp}/out"), 2,
         ("--out", "not empty", "not written by illusions", "thesis.tex"), ("out/thesis.tex",),
         ("user_folder",), fresh_cache=True, subprocess=True),
    Case("sweep-out-user-folder", ("sweep", "dyck", "--ranks", "1,2", *FAST, "--out", "{tmp}/out"), 2,
         ("not empty", "not written by illusions"), ("out/thesis.tex",), ("user_folder",), fresh_cache=True),
    Case("analyze-out-earlier-run", (*ANALYZE, "--out", "{run}"), 2,
         ("already holds an analysis run", "--overwrite"), ("run/metrics.csv", "run/notes.txt"),
         ("notes_in_run",), fresh_cache=True),
    Case("analyze-overwrite-keeps-user-files",
         ("analyze", "dyck", "--simplify", "svd", "--rank", "1", *FAST, "--out", "{run}", "--overwrite"), 0,
         survive=("run/notes.txt",), setup=("notes_in_run",), replaced=("run/config.json", "run/metrics.csv")),
    Case("analyze-out-is-the-model", (*ANALYZE, "--out", "{model}"), 2, ("--out", "is the model folder"),
         MODEL_FILES, fresh_cache=True),
    Case("analyze-out-inside-the-model", (*ANALYZE, "--out", "{model}/sub"), 2, ("inside the model folder",),
         MODEL_FILES, absent=("model/sub",), fresh_cache=True),
    Case("analyze-out-in-bundled-assets", (*ANALYZE, "--out", "{assets}/code"), 2,
         ("inside the bundled models",), ("{assets}/code/model.safetensors", "{assets}/code/config.json"),
         fresh_cache=True),
    Case("report-over-a-user-report", ("report", "{run}", "--threads", "1"), 2, ("report.html", "--overwrite"),
         ("run/report.html",), ("user_report",), fresh_cache=True),
    Case("report-over-report-files-without-manifest", ("report", "{run}", "--threads", "1"), 2,
         ("fig_accuracy.png", "no manifest.json", "--overwrite"), ("run/report.html", "run/fig_accuracy.png"),
         ("user_report", "user_figure", "no_manifest"), fresh_cache=True),
    Case("reproduce-out-user-folder", ("reproduce", *RECIPES, "--out", "{tmp}/out", "--results",
                                       "{tmp}/docs/RESULTS.md"), 2,
         ("--out", "holds no reproduction"), ("out/thesis.tex",), ("user_folder",), absent=("docs",),
         fresh_cache=True),
    Case("reproduce-results-user-file", ("reproduce", *RECIPES, "--out", "{tmp}/rep", "--results",
                                         "{tmp}/docs/RESULTS.md"), 2,
         ("--results", "not written by illusions reproduce"), ("docs/RESULTS.md",), ("user_results",),
         absent=("rep",), fresh_cache=True),
    Case("reproduce-earlier-run-needs-overwrite", ("reproduce", *RECIPES, "--out", "{tmp}/rep", "--results",
                                                   "{tmp}/docs/RESULTS.md"), 2,
         ("would be recomputed", "--overwrite"), ("rep/dyck-svd-L1/seed0/metrics.csv",), ("stale_reproduction",),
         absent=("docs",), fresh_cache=True),
    Case("train-out-user-folder", ("train", "dyck", "--out", "{tmp}/out", "--threads", "1"), 2,
         ("already holds other files", "--resume"), ("out/thesis.tex",), ("user_folder",), fresh_cache=True,
         subprocess=True),
    Case("train-resume-user-folder", ("train", "dyck", "--out", "{tmp}/out", "--resume", "--threads", "1"), 2,
         ("cannot resume", "holds no training run"), ("out/thesis.tex",), ("user_folder",), fresh_cache=True),
    Case("train-out-is-a-model", ("train", "dyck", "--out", "{model}", "--threads", "1"), 2,
         ("already holds other files",), MODEL_FILES, fresh_cache=True),
    # 3. an output location that cannot be written fails before any work
    Case("analyze-out-proc", (*ANALYZE, "--out", "/proc/illusions-x"), 2, ("cannot write to /proc/illusions-x",),
         fresh_cache=True, subprocess=True),
    Case("sweep-out-proc", ("sweep", "dyck", "--ranks", "1,2", *FAST, "--out", "/proc/illusions-x"), 2,
         ("cannot write",), fresh_cache=True),
    Case("train-out-proc", ("train", "dyck", "--out", "/proc/illusions-x", "--threads", "1"), 2,
         ("cannot write to /proc",), fresh_cache=True),
    Case("reproduce-out-proc", ("reproduce", *RECIPES, "--out", "/proc/illusions-x", "--results",
                                "{tmp}/docs/RESULTS.md"), 2, ("cannot write to /proc/illusions-x",),
         absent=("docs",), fresh_cache=True),
    Case("data-cache-dir-proc", ("data", "dyck", "--n-train", "100", "--cache-dir", "/proc/illusions-x"), 2,
         ("cannot write to /proc/illusions-x",), fresh_cache=True),
    # 2. never trust a damaged cache or checkpoint
    Case("analyze-damaged-cache-is-rebuilt", (*ANALYZE, "--split", "iid", "--out", "{tmp}/new", "--json"), 0,
         ("notice:", "damaged", "checksum mismatch in iid.tokens", "rebuilding"), setup=("corrupt_cache",)),
    Case("analyze-cache-with-bad-token-ids-is-rebuilt", (*ANALYZE, "--split", "iid", "--out", "{tmp}/new",
                                                         "--json"), 0,
         ("notice:", "iid tokens holds token ids 0..43, outside 0..42", "rebuilding"), setup=("bad_ids_cache",)),
    Case("analyze-damaged-checkpoint", (*ANALYZE, "--out", "{tmp}/new"), 2,
         ("model.safetensors", "does not match the sha256", "damaged"), setup=("corrupt_weights",),
         absent=("new",), fresh_cache=True),
    # 5. a damaged metrics.csv (and 7. records.npz) of a saved run
    Case("report-bad-row", ("report", "{run}", "--threads", "1"), 2, ("metrics.csv", "does not match the sha256"),
         ("run/metrics.csv",), ("bad_row",), absent=("run/report.html",), fresh_cache=True),
    Case("report-bad-row-without-manifest", ("report", "{run}", "--threads", "1"), 2,
         ("metrics.csv line 4", "value holds 'abc', not a number"), setup=("bad_row", "no_manifest"),
         absent=("run/report.html",), fresh_cache=True),
    Case("report-random-bytes-in-csv", ("report", "{run}", "--threads", "1"), 2, ("metrics.csv", "not UTF-8"),
         setup=("random_csv", "no_manifest"), absent=("run/report.html",), fresh_cache=True),
    Case("report-garbage-records", ("report", "{run}", "--threads", "1"), 2,
         ("records.npz", "not a readable records file"), setup=("garbage_records", "no_manifest"),
         absent=("run/report.html",), not_words=("pickle",), fresh_cache=True, subprocess=True),
    # 7. smaller things
    Case("data-check-two-brackets", ("data", "dyck", "--check", "(a a)"), 2, ("too short", "min_brackets=4"),
         fresh_cache=True),
    Case("data-check-no-brackets", ("data", "dyck", "--check", ""), 2, ("too short", "0 bracket"),
         fresh_cache=True),
    Case("data-check-depth-11-is-unseen-depth", ("data", "dyck", "--n-train", "2000", "--n-eval", "20",
                                                 "--check", DEEP), 0, stdout_words=("max depth 11", "unseen_depth")),
    Case("data-check-depth-16", ("data", "dyck", "--check", TOO_DEEP), 2, ("too deep", "ood_depth_max=15"),
         fresh_cache=True),
    *[Case(f"data-custom-cache-dir{'-json' * json}", ("data", "custom", "--cache-dir", "{tmp}/c1", *("--json",) * json),
           2, ("task 'custom' keeps no cache on disk; --cache-dir does not apply to it",), absent=("c1",),
           fresh_cache=True) for json in (False, True)],
    Case("train-bad-device", ("train", "dyck", "--out", "{tmp}/new", "--device", "nosuchdevice"), 2,
         ("unknown device 'nosuchdevice'",), absent=("new",), fresh_cache=True),
    # 4 and 6: options the spec refuses before any work (the spec owns every analysis option)
    Case("analyze-negative-seed", ("analyze", "dyck", *FAST, "--seed", "-1", "--out", "{tmp}/new"), 2,
         ("--seed must be at least 0, got -1",), absent=("new",), fresh_cache=True, subprocess=True),
    Case("analyze-layer-beyond-the-start", ("analyze", "dyck", *FAST, "--layer", "-99", "--out", "{tmp}/new"), 2,
         ("layer -99 does not exist; this model has 2 layers: 0..1, or -2..-1 counting from the end",),
         absent=("new",)),
    Case("analyze-rank-for-onehot", ("analyze", "dyck", "--simplify", "onehot", "--rank", "4", *FAST,
                                     "--out", "{tmp}/new"), 2,
         ("--rank does not apply to onehot",), absent=("new",), fresh_cache=True),
    Case("analyze-uncentered-for-kmeans", ("analyze", "dyck", "--simplify", "kmeans", "--uncentered", *FAST,
                                           "--out", "{tmp}/new"), 2,
         ("--uncentered does not apply to kmeans",), absent=("new",), fresh_cache=True),
    Case("analyze-split-named-twice-is-evaluated-once",
         ("analyze", "dyck", "--simplify", "svd", "--rank", "1", *FAST, "--split", "iid", "--split", "iid",
          "--out", "{tmp}/new", "--json"), 0, stdout_words=('"splits": {"iid": {',)),
    Case("analyze-unknown-model-name", ("analyze", "dyck", "--simplify", "onehot", "--model", "dyck-paperlik",
                                        "--threads", "1", "--out", "{tmp}/new"), 2,
         ("model 'dyck-paperlik' is neither a folder nor a bundled model", "dyck:seed1"), absent=("new",),
         fresh_cache=True),
    Case("sweep-over-checkpoints-of-a-folder-without-any", ("sweep", "dyck", "--over-checkpoints", "{model}",
                                                            "--simplify", "onehot", "--threads", "1", "--out",
                                                            "{tmp}/new"), 2,
         ("--over-checkpoints", "holds no step checkpoints"), MODEL_FILES, absent=("new",), fresh_cache=True),
    Case("train-vocab-mismatch-before-progress", ("train", "{tmp}/recipe.toml", "--out", "{tmp}/new"), 2,
         ("d_vocab is 10", "43 tokens"), setup=("bad_vocab_recipe",), absent=("new",), fresh_cache=True),
    Case("train-wall-keep-out-of-range", ("train", "{tmp}/recipe.toml", "--out", "{tmp}/new"), 2,
         ("wall_keep must lie in (0, 1], got 0",), setup=("bad_wall_keep_recipe",), absent=("new",),
         fresh_cache=True),
    # issue 24: every parameter from the file, integrity checks that cannot be switched off, one line
    Case("analyze-garbled-model-manifest", (*ANALYZE, "--out", "{tmp}/new"), 2,
         ("model/manifest.json is damaged", "cannot be checked"), setup=("corrupt_weights", "garbled_model_manifest"),
         absent=("new",), fresh_cache=True),
    Case("report-garbled-run-manifest", ("report", "{run}", "--threads", "1"), 2,
         ("run/manifest.json is damaged", "cannot be checked"), setup=("changed_value", "garbled_manifest"),
         absent=("run/report.html",), fresh_cache=True),
    Case("analyze-nan-weights", (*ANALYZE, "--out", "{tmp}/new"), 2,
         ("model.safetensors: tensor blocks.0.attn.W_Q holds 1 NaN or infinite value(s)",),
         setup=("nan_weight", "no_model_manifest"), absent=("new",), fresh_cache=True),
    Case("analyze-int8-weights", (*ANALYZE, "--out", "{tmp}/new"), 2,
         ("tensor blocks.1.mlp.W_in is int8, not a floating-point type",),
         setup=("int8_weight", "no_model_manifest"), absent=("new",), fresh_cache=True),
    Case("analyze-bool-weights", (*ANALYZE, "--out", "{tmp}/new"), 2, ("tensor unembed.b_U is bool",),
         setup=("bool_weight", "no_model_manifest"), absent=("new",), fresh_cache=True),
    Case("analyze-checkpoint-n-ctx-1e9", (*ANALYZE, "--out", "{tmp}/new"), 2,
         ("n_ctx=1,000,000,000", "more than this machine's"), setup=("n_ctx_1e9", "no_model_manifest"),
         absent=("new",), fresh_cache=True, subprocess=True),
    Case("analyze-checkpoint-n-layers-100000", (*ANALYZE, "--out", "{tmp}/new"), 2,
         ("the config does not describe these weights",), setup=("n_layers_100000", "no_model_manifest"),
         absent=("new",), fresh_cache=True),
    Case("report-records-header-claims-2-40-elements", ("report", "{run}", "--threads", "1"), 2,
         ("records.npz is not an intact records file", "fit_rows.npy claims shape (1,099,511,627,776) of int64"),
         setup=("huge_records", "no_manifest"), absent=("run/report.html",), fresh_cache=True, subprocess=True),
    Case("report-config-nested-100k-deep", ("report", "{run}", "--threads", "1"), 2,
         ("config.json is not JSON illusions reads (nested too deeply)",), setup=("deep_config", "no_manifest"),
         absent=("run/report.html",), fresh_cache=True, subprocess=True),
    Case("report-through-a-symlink-to-the-run", ("report", "{tmp}/link", "--threads", "1"), 0,
         stdout_words=("report.html",), setup=("link_to_run",)),
    Case("analyze-out-a-symlink-to-a-run", (*ANALYZE, "--out", "{tmp}/link", "--overwrite"), 2,
         ("is a symbolic link (to", "does not write through links"), ("run/metrics.csv",), ("link_to_run",),
         fresh_cache=True),
    # 8. names that become folders are one plain path component; outputs stay inside --out
    Case("reproduce-recipe-name-escapes", ("reproduce", "--recipes", "{tmp}/recipes", "--task", "dyck", "--seeds", "0",
                                           "--threads", "1", "--no-report", "--out", "{tmp}/rep", "--results",
                                           "{tmp}/docs/R.md"), 2,
         ("name in", "'../../escape'", "not a plain folder name", "letters, digits"),
         setup=("recipe_named_dotdot_escape",), absent=("rep", "docs", "{tmp}/../escape"), fresh_cache=True),
    Case("sweep-recipe-name-absolute", ("sweep", "{tmp}/r.toml", "--threads", "1", "--no-report"), 2,
         ("name in", "elsewhere", "not a plain folder name"), setup=("recipe_named_absolute",),
         absent=("elsewhere", "runs"), fresh_cache=True, subprocess=True),
    Case("analyze-recipe-name-dotdot", ("analyze", "{tmp}/r.toml", "--threads", "1", "--no-report"), 2,
         ("name in", "'..'", "not a plain folder name"), setup=("recipe_named_dotdot",), absent=("runs",),
         fresh_cache=True, subprocess=True),
    Case("analyze-recipe-name-hidden", ("analyze", "{tmp}/r.toml", "--threads", "1", "--no-report"), 2,
         ("'.hidden'", "starting with a letter or digit"), setup=("recipe_named_hidden",), absent=("runs",),
         fresh_cache=True, subprocess=True),
    Case("reproduce-family-not-a-name", ("reproduce", *RECIPES, "--family", "../x", "--out", "{tmp}/rep",
                                         "--results", "{tmp}/docs/R.md"), 2,
         ("--family '../x' is not a plain folder name",), absent=("rep", "docs"), fresh_cache=True),
    Case("train-recipe-with-a-name", ("train", "{tmp}/tiny.toml", "--out", "{tmp}/new", "--threads", "1"), 2,
         ("unknown section(s) or key(s) name",), setup=("training_recipe_with_a_name",),
         absent=("new", "{tmp}/../escape"), fresh_cache=True),
    # 9. a full disk under --out: one line, no half-written output, the earlier one kept
    Case("analyze-disk-full", (*ANALYZE, "--out", "{tmp}/full/run"), 2,
         ("no space left on the device under", "full/run cannot be written"), absent=("full/run",),
         fault=("disk_full", "{tmp}/full"), fresh_cache=True),
    Case("analyze-disk-fills", (*ANALYZE, "--out", "{tmp}/full/run"), 2,
         ("no space left on the device while writing", "full/run; nothing was written"), absent=("full/run",),
         fault=("disk_fills", "{tmp}/full")),
    Case("analyze-overwrite-disk-fills", ("analyze", "dyck", "--simplify", "svd", "--rank", "1", *FAST, "--out",
                                          "{run}", "--overwrite"), 2,
         ("no space left on the device while writing", "it was left as it was"),
         ("run/metrics.csv", "run/config.json", "run/records.npz", "run/manifest.json"),
         fault=("disk_fills", "{tmp}")),
    Case("report-disk-fills", ("report", "{run}", "--threads", "1"), 2,
         ("no space left on the device while writing the report into", "results are untouched"),
         ("run/metrics.csv", "run/manifest.json"), absent=("run/report.html",), fault=("disk_fills", "{run}")),
    Case("train-disk-full", ("train", "{tmp}/tiny.toml", "--out", "{tmp}/full/train", "--threads", "1"), 2,
         ("no space left on the device under", "full/train cannot be written"), setup=("tiny_recipe",),
         absent=("full/train",), fault=("disk_full", "{tmp}/full"), fresh_cache=True),
    # 10. without --out, a rerun just works: the same spec replaces its run, another goes to a numbered folder
    Case("analyze-default-out-holds-a-user-folder", (*ANALYZE,), 0, ("note:", "runs/dyck-svd-rank2-2"),
         ("runs/dyck-svd-rank2/thesis.tex",), ("user_folder_at_the_default_out",),
         stdout_words=("wrote runs/dyck-svd-rank2-2/",), subprocess=True),
    Case("reproduce-unknown-family", ("reproduce", *RECIPES, "--family", "dyck-paperlik", "--out", "{tmp}/rep",
                                      "--results", "{tmp}/docs/R.md"), 2,
         ("no bundled model family 'dyck-paperlik'", "dyck-paperlike"), absent=("rep", "docs"), fresh_cache=True),
    # issue 24: split files, JSON lines, recipes, sizes and flags (each one line, before the work)
    *[Case(f"custom-split-{kind}", CUSTOM, 2, ("split file", "data/iid.jsonl", words), setup=("custom_data", f"iid_{kind}"),
           absent=("new",), fresh_cache=True)
      for kind, words in (("dir", "is a directory"), ("fifo", "is a FIFO"), ("dangling", "is a dangling symlink"),
                          ("loop", "is a symlink loop"))],
    *[Case(f"custom-line-{kind}", CUSTOM, 2, (f"data/iid.jsonl:{line}", words), setup=("custom_data", f"iid_{kind}"),
           absent=("new",), fresh_cache=True)
      for kind, line, words in (("twice_a_key", 13, "gives the key 'tokens' twice"),
                                ("5000_digits", 13, "an integer longer than 4300 digits"),
                                ("200000_deep", 13, "nests JSON too deep"),
                                ("meta_1e29", 1, "meta 'x' value 100000000000... (30 digits) is out of range"))],
    *[Case(f"{command}-recipe-{kind}", (command, "{tmp}/recipe.toml", "--threads", "1", "--out", "{tmp}/new"), 2,
           ("recipe", "recipe.toml", words), setup=(f"recipe_{kind}",), absent=("new",), fresh_cache=True)
      for command in ("train", "analyze")
      for kind, words in (("not_utf8", "is not UTF-8"), ("dir", "is a directory"), ("loop", "is a symlink loop"))],
    Case("train-recipe-n-ctx-1e9", ("train", "{tmp}/recipe.toml", "--threads", "1", "--out", "{tmp}/new"), 2,
         ("128,000,000,000 in the positional embedding", "make the recipe's [model] smaller"),
         setup=("recipe_n_ctx_1e9",), absent=("new",), fresh_cache=True),
    Case("train-recipe-n-layers-1e6", ("train", "{tmp}/recipe.toml", "--threads", "1", "--out", "{tmp}/new"), 2,
         ("in the blocks", "n_layers=1,000,000"), setup=("recipe_n_layers_1e6",), absent=("new",), fresh_cache=True),
    Case("analyze-threads-100000", ("analyze", "dyck", "--model", "{model}", "--threads", "100000", "--out",
                                    "{tmp}/new"), 2, ("--threads must be in 1..", "per CPU"), absent=("new",),
         fresh_cache=True),
    Case("train-threads-100000", ("train", "dyck", "--threads", "100000", "--out", "{tmp}/new"), 2,
         ("--threads must be in 1..",), absent=("new",), fresh_cache=True),
    Case("analyze-n-boot-1e8", ("analyze", "dyck", "--model", "{model}", "--n-boot", "100000000", "--threads", "1",
                                "--out", "{tmp}/new"), 2, ("--n-boot must be at most 100,000",), absent=("new",),
         fresh_cache=True),
    Case("analyze-k-above-the-width", ("analyze", "dyck", "--simplify", "sae", "--width", "16", "--top-k", "32", "--model",
                                       "{model}", "--threads", "1", "--out", "{tmp}/new"), 2,
         ("--top-k must be in 1..16 (the dictionary width), got 32",), absent=("new",), not_words=("top_k",),
         fresh_cache=True),
    # a refusal says something true: no empty list, no option the user did not give
    *[Case(f"analyze-circuit-{flag[2:]}", ("analyze", "dyck", "--simplify", "circuit", "--keep", "L1H0", flag, value,
                                          *FAST, "--out", "{tmp}/new"), 2,
           (f"{flag} does not apply to circuit (it targets no layers, heads, queries/keys or residual hook)",),
           absent=("new",), not_words=("targets )",), fresh_cache=True)
      for flag, value in (("--layer", "0"), ("--heads", "1"), ("--target", "q"))],
    Case("reproduce-family-of-a-task-no-recipe-is-for", ("reproduce", "--recipes", "{tmp}/recipes", "--family", "dyck",
                                                         "--task", "code", "--seeds", "0", "--threads", "1",
                                                         "--no-report", "--out", "{tmp}/rep", "--results",
                                                         "{tmp}/docs/R.md"), 2,
         ("no recipe is for task 'code'; the recipes' tasks: dyck",), setup=("dyck_recipe",),
         absent=("rep", "docs"), not_words=("families: \n",), fresh_cache=True),
    Case("analyze-recipe-per-head-resid-svd", ("analyze", "{tmp}/r.toml", "--threads", "1", "--no-report", "--out",
                                               "{tmp}/new"), 2,
         ("per_head does not apply to resid-svd: it has no heads to place a proxy on (it targets layers, resid)",),
         setup=("per_head_resid_svd_recipe",), absent=("new",), not_words=("does not take heads",),
         fresh_cache=True),
    # a column the task's positions lack (dyck has no category): refused once the splits are read, before the fit
    *[Case(f"analyze-{option[2:]}-a-column-the-task-lacks{'-json' * bool(json)}",
           ("analyze", "dyck", "--simplify", "svd", "--rank", "2", option, "category", *FAST, "--out", "{tmp}/new",
            *json), 2,
           (f"cannot {doing} 'category': the scored positions have no such meta column (they have depth,",),
           absent=("new",))
      for option, doing in (("--by", "break down by"), ("--match", "match on")) for json in ((), ("--json",))],
    Case("analyze-default-k-above-the-width", ("analyze", "dyck", "--simplify", "sae", "--width", "8", "--model",
                                               "{model}", "--threads", "1", "--out", "{tmp}/new"), 2,
         ("--top-k must be in 1..8 (the dictionary width), got 16 (its default); set it to at most 8, or make the "
          "dictionary at least 16 wide",), absent=("new",), fresh_cache=True),
    Case("analyze-width-1e9", ("analyze", "dyck", "--simplify", "sae", "--width", "1000000000", "--sae-steps", "5",
                               *FAST, "--out", "{tmp}/new"), 2,
         ("a dictionary of width 1,000,000,000", "the width can be at most"), absent=("new",)),
]


# ------------------------------------------------------------------------------------------ running


@dataclasses.dataclass(frozen=True)
class Env:
    root: Path  # holds model/, run/ and cache/ (the small Dyck task's splits)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    mp = pytest.MonkeyPatch()
    task, cfg = small_dyck(root, mp)
    save_model(build_model(cfg, seed=0), root / "model", meta={"task": task.meta()})
    result = CliRunner().invoke(app, [*_fill(ANALYZE, root, root), "--out", str(root / "run")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    mp.undo()
    yield Env(root)


def _fill(parts: tuple[str, ...], tmp: Path, root: Path) -> list[str]:
    names = {"tmp": str(tmp), "model": str(tmp / "model"), "run": str(tmp / "run"), "repo": str(REPO),
             "assets": str(ASSETS)}
    return [p.format(**names) for p in parts]


def _path(p: str, tmp: Path) -> Path:
    filled = Path(_fill((p,), tmp, tmp)[0])
    return filled if filled.is_absolute() else tmp / filled


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def run_case(case: Case, env: Env, tmp: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    shutil.copytree(env.root / "model", tmp / "model")
    shutil.copytree(env.root / "run", tmp / "run")
    cache = tmp / "cache"
    if case.fresh_cache:
        cache.mkdir()
    else:
        shutil.copytree(env.root / "cache", cache)
    for name in case.setup:
        SETUPS[name](tmp, env)
    before = {p: _digest(_path(p, tmp)) for p in (*case.survive, *case.replaced)}
    argv = _fill(case.argv, tmp, env.root)
    if case.subprocess:
        pythonpath = os.pathsep.join([str(Path(illusions.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "illusions", *argv], capture_output=True, text=True, cwd=tmp,
                              env={**os.environ, "ILLUSIONS_CACHE": str(cache), "PYTHONPATH": pythonpath,
                                   "OMP_NUM_THREADS": "1"}, timeout=300)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        if case.fault:
            name, place = case.fault
            assert monkeypatch is not None, "a fault needs the test's monkeypatch"
            (tmp / "full").mkdir(exist_ok=True)
            FAULTS[name](_path(place, tmp), monkeypatch)
        result = CliRunner().invoke(app, argv, env={"ILLUSIONS_CACHE": str(cache)})
        if monkeypatch is not None:
            monkeypatch.undo()
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        code, stdout, stderr = result.exit_code, result.stdout, result.stderr
    shown = f"exit {code}\nstdout: {stdout}\nstderr: {stderr}"
    assert "Traceback" not in stdout + stderr, shown
    assert code == case.code, shown
    if case.code == 2:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), shown
    for word in case.words:
        assert word in stderr, f"{word!r} missing\n{shown}"
    for word in case.not_words:
        assert word not in stderr, f"{word!r} shown\n{shown}"
    for word in case.stdout_words:
        assert word in stdout, f"{word!r} missing from stdout\n{shown}"
    for p in case.survive:
        assert _digest(_path(p, tmp)) == before[p], f"{p} changed"
    for p in case.replaced:
        assert _digest(_path(p, tmp)) != before[p], f"{p} was not replaced"
    for p in case.absent:
        assert not _path(p, tmp).exists(), f"{p} was written"
    if case.fresh_cache:
        assert not _files(cache), f"data was built or loaded before the error: {_files(cache)}"
    leftovers = [str(p.relative_to(tmp)) for p in tmp.rglob(".*") if not p.is_relative_to(cache)]
    assert not leftovers, f"staging folders or temporary files left behind: {leftovers}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, env, tmp_path, monkeypatch):
    if "sae" in case.argv and importlib.util.find_spec("sae_lens") is None:
        pytest.skip("needs SAELens (the [sae] extra; not installable beside TransformerLens 4)")
    run_case(case, env, tmp_path, monkeypatch)


def test_case_ids_are_unique_and_setups_exist():
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(name in SETUPS for c in CASES for name in c.setup)


# ------------------------------------------------------------------------- cases beyond one command


def test_overwritten_run_lists_only_its_own_files(env, tmp_path):
    """After --overwrite the user's notes are still there but the manifest does not claim them."""
    run_case(CASES[[c.id for c in CASES].index("analyze-overwrite-keeps-user-files")], env, tmp_path)
    manifest = json.loads((tmp_path / "run" / MANIFEST_FILE).read_text())
    assert "notes.txt" not in manifest["files"] and "metrics.csv" in manifest["files"]


def test_report_refuses_a_model_whose_weights_changed_since_the_run(env, tmp_path):
    """The run records the sha256 of the weights it used; `report` then refuses other bytes there."""
    from illusions.io import file_sha256
    from illusions.models import load_model, model_config_of

    shutil.copytree(env.root / "model", tmp_path / "model")
    cache = {"ILLUSIONS_CACHE": str(env.root / "cache")}
    argv = _fill((*ANALYZE, "--out", "{tmp}/run"), tmp_path, env.root)
    assert CliRunner().invoke(app, argv, env=cache).exit_code == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    weights = tmp_path / "model" / "model.safetensors"
    assert config["model"]["weights_sha256"] == {"model.safetensors": file_sha256(weights)}
    model, meta = load_model(tmp_path / "model")
    save_model(build_model(model_config_of(model), seed=1), tmp_path / "model", meta=meta)  # same shape, new weights
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--threads", "1"], env=cache)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "(model.safetensors) are not those run" in lines[0] and "sha256 differs" in lines[0], lines[0]
    assert not (tmp_path / "run" / "report.html").exists()


def test_results_table_fits_80_columns_without_cutting_split_names(env, tmp_path):
    shutil.copytree(env.root / "model", tmp_path / "model")
    argv = _fill(("analyze", "dyck", "--simplify", "svd", "--rank", "2", *FAST, "--out", "{tmp}/new"), tmp_path,
                 env.root)
    for columns in (80, 200):
        shutil.rmtree(tmp_path / "new", ignore_errors=True)
        result = CliRunner().invoke(app, argv, env={"ILLUSIONS_CACHE": str(env.root / "cache"),
                                                    "COLUMNS": str(columns)}, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        lines = [line for line in result.stdout.splitlines() if not line.startswith("wrote ")]
        assert max(len(line) for line in lines) <= columns, "\n".join(lines)
        splits = {"iid", "seen_struct", "unseen_struct_short", "unseen_struct_long", "unseen_depth"}
        table = [line for line in lines if line.replace("│", " ").split()[:1] and
                 line.replace("│", " ").split()[0] in splits]
        names = {line.replace("│", " ").split()[0] for line in table}
        assert names == splits
        assert not any("…" in line for line in table), "\n".join(table)
        # The summary table (before the warning-signal table) drops the ± half-widths when narrow.
        summary = result.stdout.split("unsupervised warning signals")[0]
        assert ("±" in summary) == (columns == 200)


TINY_RECIPE = """
[task]
name = "dyck"
{task}

[model]
n_layers = 2
d_model = 32
n_heads = 2
d_head = 16
d_mlp = 64
n_ctx = {n_ctx}
d_vocab = 43

[train]
steps = 3
batch_size = 8
warmup_steps = 1
log_every = 1
eval_every = 0
eval_rows = 8
checkpoint_every = 0
"""


def test_ctrl_c_during_the_final_evaluation_saves_and_resume_finishes(env, tmp_path, monkeypatch):
    """Ctrl-C in training's final evaluation stops it at once; --resume then only evaluates."""
    from illusions import training

    fields = "\n".join(f"{k} = {v}" for k, v in SMALL_DYCK.to_dict().items())
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(task=fields, n_ctx=SMALL_DYCK.max_len))
    real = training.evaluate
    seen = []

    def evaluate(model, splits, candidates, rows, **kw):
        if all(v is None for v in rows.values()):  # the final, full evaluation
            seen.append("sigint")
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, splits, candidates, rows, **kw)

    monkeypatch.setattr(training, "evaluate", evaluate)
    out = tmp_path / "train"
    cache = {"ILLUSIONS_CACHE": str(env.root / "cache")}
    result = CliRunner().invoke(app, ["train", str(recipe), "--out", str(out), "--threads", "1"], env=cache)
    assert seen == ["sigint"], (result.output, repr(result.exception), result.exit_code)
    assert result.exit_code == 130, result.output
    assert "interrupted in the final evaluation" in result.stderr and "--resume" in result.stderr
    meta = json.loads((out / "config.json").read_text())["meta"]
    assert meta["step"] == 3 and meta["finished"] is False and "accuracies" not in meta
    monkeypatch.setattr(training, "evaluate", real)
    result = CliRunner().invoke(app, ["train", str(recipe), "--out", str(out), "--resume", "--threads", "1"],
                                env=cache)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "config.json").read_text())["meta"]
    assert meta["step"] == 3 and meta["finished"] is True and set(meta["accuracies"]) >= {"iid", "unseen_depth"}
    # No step was left to time: say so instead of "nan tok/s".
    assert "no training step was left (all 3 were done)" in result.stdout and "nan" not in result.output


def test_a_rerun_without_out_replaces_the_same_spec_and_numbers_another(env, tmp_path, monkeypatch):
    """Without --out the same command twice just works (the same spec's run is replaced); another spec
    with the same default name goes to runs/<name>-2 and says so; an explicit --out keeps its rule."""
    shutil.copytree(env.root / "model", tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    cache = {"ILLUSIONS_CACHE": str(env.root / "cache")}
    argv = _fill(ANALYZE, tmp_path, env.root)
    runs = tmp_path / "runs"

    def analyze(*extra: str) -> Any:
        result = CliRunner().invoke(app, [*argv, *extra], env=cache)
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        return result

    first = analyze()
    assert first.exit_code == 0, first.output
    assert "wrote runs/dyck-svd-rank2/" in first.stdout and "note:" not in first.stderr
    (runs / "dyck-svd-rank2" / "notes.txt").write_text("mine")
    before = json.loads((runs / "dyck-svd-rank2" / MANIFEST_FILE).read_text())["files"]
    second = analyze()
    assert second.exit_code == 0, second.output
    assert "wrote runs/dyck-svd-rank2/" in second.stdout and "note:" not in second.stderr
    assert sorted(p.name for p in runs.iterdir()) == ["dyck-svd-rank2"]
    assert json.loads((runs / "dyck-svd-rank2" / MANIFEST_FILE).read_text())["files"] == before  # same files
    assert (runs / "dyck-svd-rank2" / "notes.txt").read_text() == "mine"
    # Another spec of the same default name (another seed): a numbered folder, and a line saying so.
    other = analyze("--seed", "1")
    assert other.exit_code == 0, other.output
    assert "wrote runs/dyck-svd-rank2-2/" in other.stdout
    assert "note:" in other.stderr and "runs/dyck-svd-rank2-2" in other.stderr
    again = analyze("--seed", "1")
    assert again.exit_code == 0 and "wrote runs/dyck-svd-rank2-2/" in again.stdout, again.output
    # A run whose files were edited since is never replaced: the rerun goes to the next free number.
    (runs / "dyck-svd-rank2" / "metrics.csv").write_text("edited by hand\n")
    edited = analyze()
    assert edited.exit_code == 0 and "wrote runs/dyck-svd-rank2-3/" in edited.stdout, edited.output
    assert (runs / "dyck-svd-rank2" / "metrics.csv").read_text() == "edited by hand\n"
    assert sorted(p.name for p in runs.iterdir()) == ["dyck-svd-rank2", "dyck-svd-rank2-2", "dyck-svd-rank2-3"]
    # An explicit --out keeps today's rule: an earlier run there is replaced only with --overwrite.
    explicit = analyze("--out", "runs/dyck-svd-rank2-3")
    assert explicit.exit_code == 2 and "already holds an analysis run" in explicit.stderr, explicit.output
    # sweep follows the same rule.
    sweep = ("sweep", "dyck", "--ranks", "1,2", *_fill(FAST, tmp_path, env.root))
    for expected in ("runs/dyck-svd-rank1_2/", "runs/dyck-svd-rank1_2/"):
        result = CliRunner().invoke(app, list(sweep), env=cache)
        assert result.exit_code == 0 and f"wrote {expected}" in result.stdout, result.output
    assert not [p for p in runs.iterdir() if p.name.startswith(".")]


def test_a_disk_that_fills_during_training_ends_in_one_line(env, tmp_path, monkeypatch):
    """ENOSPC at training's checkpoint: exit 2 with one error line, and no half-written run."""
    _tiny_recipe(tmp_path, Env(env.root))
    (tmp_path / "full").mkdir()
    out = tmp_path / "full" / "train"
    FAULTS["disk_fills"](tmp_path / "full", monkeypatch)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "tiny.toml"), "--out", str(out), "--threads", "1"],
                                env={"ILLUSIONS_CACHE": str(env.root / "cache")})
    monkeypatch.undo()
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr
    assert errors[0].startswith("error: no space left on the device while writing") and str(out) in errors[0]
    assert "nothing was written" in errors[0]
    assert list((tmp_path / "full").iterdir()) == [], "a half-written run or staging folder was left"


def test_a_kill_between_a_checkpoint_s_renames_still_resumes(env, tmp_path):
    """The issue's case: SIGKILL between the two renames of a training checkpoint (on a platform
    without an atomic exchange) left no run folder; the next `train --resume` must find the run."""
    _tiny_recipe(tmp_path, Env(env.root))
    text = (tmp_path / "tiny.toml").read_text().replace("checkpoint_every = 0", "checkpoint_every = 1")
    (tmp_path / "tiny.toml").write_text(text)
    out = tmp_path / "train"
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "import illusions.io.staging as io\n"
        "from illusions.cli import app\n"
        "out = Path(sys.argv[1])\n"
        "io.exchange_dirs = lambda a, b: False\n"
        "real, seen = io._rename, []\n"
        "def rename(src, dst):\n"
        "    if Path(dst) == out and Path(src).name.endswith('.partial'):\n"
        "        seen.append(src)\n"
        "        if len(seen) == 1:\n"  # the checkpoint of step 2 replacing that of step 1
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(src, dst)\n"
        "io._rename = rename\n"
        "app(['train', sys.argv[2], '--out', str(out), '--threads', '1'])\n"
    )
    pythonpath = os.pathsep.join([str(Path(illusions.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "tiny.toml")], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "ILLUSIONS_CACHE": str(env.root / "cache"), "PYTHONPATH": pythonpath,
                               "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists(), "the fault did not strike between the renames"
    result = CliRunner().invoke(app, ["train", str(tmp_path / "tiny.toml"), "--out", str(out), "--resume",
                                      "--threads", "1"], env={"ILLUSIONS_CACHE": str(env.root / "cache")})
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "config.json").read_text())["meta"]
    assert meta["step"] == 3 and meta["finished"] is True
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "leftovers not cleaned"


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=16k tmpfs /mnt"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and a tmpfs mount in a user namespace")
def test_a_real_full_disk_under_out(env, tmp_path):
    """The table's full disks are simulated; this one is real: a 16 KiB tmpfs (mounted in a private
    user and mount namespace) under --out fills while the run is written."""
    shutil.copytree(env.root / "model", tmp_path / "model")
    (tmp_path / "disk").mkdir()
    argv = " ".join(f"'{a}'" for a in _fill((*ANALYZE, "--out", "{tmp}/disk/run"), tmp_path, env.root))
    pythonpath = os.pathsep.join([str(Path(illusions.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    script = (f"mount -t tmpfs -o size=16k tmpfs '{tmp_path}/disk' && "
              f"'{sys.executable}' -m illusions {argv} >/dev/null; echo \"rc=$?\"; ls -A '{tmp_path}/disk'")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ILLUSIONS_CACHE": str(env.root / "cache"), "PYTHONPATH": pythonpath,
                               "OMP_NUM_THREADS": "1"})
    assert proc.stdout.split() == ["rc=2"], (proc.stdout, proc.stderr)  # and nothing left on the disk
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no space left on the device"), proc.stderr
    assert "disk/run" in lines[0] and "Traceback" not in proc.stderr


def test_fit_n_beyond_memory_is_one_line_before_collecting(env, tmp_path, monkeypatch):
    """--fit-n 1e9 takes the whole train split; activations that cannot fit are refused, not collected.

    The machine's memory is made 2 MB here (the tiny model's split needs a few MB), standing in for a
    bundled model's 200,000 training sequences on a small machine."""
    from illusions import activations, devices

    collected = []
    real = activations.collect
    monkeypatch.setattr(devices, "memory_bytes", lambda device="cpu": 2_000_000)
    monkeypatch.setattr(activations, "collect", lambda model, tokens, *a, **kw: (
        collected.append(len(tokens)), real(model, tokens, *a, **kw))[1])
    shutil.copytree(env.root / "model", tmp_path / "model")
    argv = _fill(("analyze", "dyck", "--simplify", "svd", "--rank", "2", *FAST, "--fit-n", "1000000000", "--out",
                  "{tmp}/new"), tmp_path, env.root)
    result = CliRunner().invoke(app, argv, env={"ILLUSIONS_CACHE": str(env.root / "cache")})
    assert result.exit_code == 2, (result.output, repr(result.exception))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "fitting on 3,000 sequences of split train" in lines[0], result.stderr
    assert "fit on fewer sequences (fit_n at most about" in lines[0]
    assert collected == [1], collected  # only the one-sequence probe ran
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("option", ["--by", "--match"])
def test_a_column_the_task_lacks_is_refused_before_the_fit(env, tmp_path, monkeypatch, option):
    """--by category / --match category on dyck (whose positions have no category): one line once the splits are
    read; nothing is fitted or evaluated (the engine is never reached)."""
    from illusions.analyses import engine

    measured = []
    monkeypatch.setattr(engine, "measure", lambda *a, **kw: measured.append(1))
    shutil.copytree(env.root / "model", tmp_path / "model")
    argv = _fill(("analyze", "dyck", "--simplify", "svd", "--rank", "2", option, "category", *FAST, "--out",
                  "{tmp}/new"), tmp_path, env.root)
    result = CliRunner().invoke(app, argv, env={"ILLUSIONS_CACHE": str(env.root / "cache")})
    assert result.exit_code == 2, (result.output, repr(result.exception))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "'category': the scored positions have no such meta column" in lines[0], result.stderr
    assert measured == [] and result.stdout == "" and not (tmp_path / "new").exists()
