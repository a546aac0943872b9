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
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
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


# ------------------------------------------------------------------------------------------ setups


def _user_folder(tmp: Path, env: Env) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("\\chapter{Years of work}\n")


def _notes_in_run(tmp: Path, env: Env) -> None:
    (tmp / "run" / "notes.txt").write_text("what I saw in this run\n")


def _user_report(tmp: Path, env: Env) -> None:
    (tmp / "run" / "report.html").write_text("<p>my own report, edited by hand</p>\n")


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
    "user_results": _user_results,
    "stale_reproduction": _stale_reproduction,
    "bad_row": _bad_row,
    "random_csv": _random_csv,
    "garbage_records": _garbage_records,
    "no_manifest": _no_manifest,
    "corrupt_cache": _corrupt_cache,
    "bad_ids_cache": _bad_ids_cache,
    "corrupt_weights": _corrupt_weights,
    "bad_vocab_recipe": _bad_vocab_recipe,
    "bad_wall_keep_recipe": _bad_wall_keep_recipe,
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
    Case("train-bad-device", ("train", "dyck", "--out", "{tmp}/new", "--device", "nosuchdevice"), 2,
         ("unknown device 'nosuchdevice'",), absent=("new",), fresh_cache=True),
    # 4 and 6: options the spec refuses before any work (the spec owns every analysis option)
    Case("analyze-negative-seed", ("analyze", "dyck", *FAST, "--seed", "-1", "--out", "{tmp}/new"), 2,
         ("--seed must be at least 0, got -1",), absent=("new",), fresh_cache=True, subprocess=True),
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
         ("in the blocks", "n_layers 1000000"), setup=("recipe_n_layers_1e6",), absent=("new",), fresh_cache=True),
    Case("analyze-threads-100000", ("analyze", "dyck", "--model", "{model}", "--threads", "100000", "--out",
                                    "{tmp}/new"), 2, ("--threads must be in 1..", "per CPU"), absent=("new",),
         fresh_cache=True),
    Case("train-threads-100000", ("train", "dyck", "--threads", "100000", "--out", "{tmp}/new"), 2,
         ("--threads must be in 1..",), absent=("new",), fresh_cache=True),
    Case("analyze-n-boot-1e8", ("analyze", "dyck", "--model", "{model}", "--n-boot", "100000000", "--threads", "1",
                                "--out", "{tmp}/new"), 2, ("--n-boot must be at most 100,000",), absent=("new",),
         fresh_cache=True),
    Case("analyze-k-above-the-width", ("analyze", "dyck", "--simplify", "sae", "--width", "16", "--k", "32", "--model",
                                       "{model}", "--threads", "1", "--out", "{tmp}/new"), 2,
         ("--k must be in 1..16 (the dictionary width), got 32",), absent=("new",), not_words=("top_k",),
         fresh_cache=True),
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


def run_case(case: Case, env: Env, tmp: Path) -> None:
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
        result = CliRunner().invoke(app, argv, env={"ILLUSIONS_CACHE": str(cache)})
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
    leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"staging folders left behind: {leftovers}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, env, tmp_path):
    run_case(case, env, tmp_path)


def test_case_ids_are_unique_and_setups_exist():
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(name in SETUPS for c in CASES for name in c.setup)


# ------------------------------------------------------------------------- cases beyond one command


def test_overwritten_run_lists_only_its_own_files(env, tmp_path):
    """After --overwrite the user's notes are still there but the manifest does not claim them."""
    run_case(CASES[[c.id for c in CASES].index("analyze-overwrite-keeps-user-files")], env, tmp_path)
    manifest = json.loads((tmp_path / "run" / MANIFEST_FILE).read_text())
    assert "notes.txt" not in manifest["files"] and "metrics.csv" in manifest["files"]


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
        assert ("±" in result.stdout) == (columns == 200)


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
