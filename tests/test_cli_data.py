"""`illusions data dyck`: the split table, --json, --show, --check and the error boundary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from illusions.cli import app
from illusions.tasks.dyck import SPLIT_NAMES, DyckConfig, DyckTask

runner = CliRunner()
SMALL = ["--n-train", "3000", "--n-eval", "40", "--seed", "5"]


@pytest.fixture
def cache(tmp_path) -> list[str]:
    return ["--cache-dir", str(tmp_path)]


def _run(*args: str):
    return runner.invoke(app, ["data", "dyck", *args])


def test_table_lists_every_split_and_the_cache(cache):
    result = _run(*SMALL, *cache)
    assert result.exit_code == 0, result.output
    for name in SPLIT_NAMES:
        assert name in result.stdout
    assert "3,000" in result.stdout and "cache:" in result.stdout


def test_json_statistics_match_the_splits(cache, tmp_path):
    result = _run(*SMALL, *cache, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["task"] == "dyck" and out["config"]["n_train"] == 3000 and out["config"]["seed"] == 5
    assert list(out["splits"]) == list(SPLIT_NAMES)
    splits = DyckTask(DyckConfig(n_train=3000, n_eval=40, seed=5), cache_dir=tmp_path).splits()
    for name, s in out["splits"].items():
        split = splits[name]
        brackets = split.lengths - 2
        assert s["n"] == len(split) and s["scored"] == len(split.scored)
        assert s["length_max"] == brackets.max() and s["length_median"] == np.median(brackets)
        assert s["length_mean"] == pytest.approx(brackets.mean())
        assert 0 < s["acceptance"] <= 1
    assert out["splits"]["unseen_depth"]["depth_max"] >= 11 > out["splits"]["iid"]["depth_max"]


def test_min_distance_one_scores_every_closer(cache):
    default = json.loads(_run(*SMALL, *cache, "--json").stdout)
    every = json.loads(_run(*SMALL, *cache, "--json", "--min-distance", "1").stdout)
    for name in SPLIT_NAMES:
        s = every["splits"][name]
        assert s["scored"] * 2 == round(s["length_mean"] * s["n"])  # one per closer
        assert s["scored"] > default["splits"][name]["scored"]


def test_show_prints_tokens_with_their_depths(cache):
    result = _run(*SMALL, *cache, "--show", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("first 2 of 40") == 5 and "first 2 of 3000" in result.stdout
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("START"))
    assert lines[start + 1].split()[0] == "0"  # the depth row under the tokens
    assert lines[start + 1].split()[1] == "1"  # after the first opener


def test_check_valid_string(cache):
    result = _run(*SMALL, *cache, "--check", "(a (b b) a) (c c)")
    assert result.exit_code == 0, result.output
    assert "valid: 6 brackets, max depth 2, 2 segment(s)" in result.stdout


def test_check_json_reports_structure_and_split(cache):
    result = _run(*SMALL, *cache, "--json", "--check", "(a(bb)a)")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["segments"] == [[1, 2, 1, 0]] and out["max_depth"] == 2
    assert out["split"] in {"train", "seen_struct"}  # a 4-bracket structure is always in train


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("(a (b a) b)", "mismatched: 'a)' at token 3 (character 7)"),
        ("(a (b b)", "never closed"),
        ("(a zz", "unknown token 'zz' at character 4"),
    ],
)
def test_check_invalid_string_exits_2_with_one_line(cache, text, reason):
    result = _run(*cache, "--check", text)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and reason in result.stderr


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--n-train", "0"], "n_train must be at least 1"),
        (["--seed", "-1"], "seed must be non-negative"),
        (["--min-distance", "0"], "min_distance must be at least 1"),
    ],
)
def test_bad_settings_exit_2(cache, args, reason):
    result = _run(*cache, *args)
    assert result.exit_code == 2 and reason in result.stderr and result.stderr.count("\n") == 1


def test_unknown_task_lists_the_known_ones(cache):
    result = runner.invoke(app, ["data", "nope", *cache])
    assert result.exit_code == 2 and "known tasks: code, custom, dyck" in result.stderr


def test_a_task_declares_its_own_options(monkeypatch, cache):
    """The command names no task: an option a task adds to its data_options gets the task's help panel,
    sets the task's config field, and is refused for every other task."""
    from illusions.tasks.base import DataOption

    extra = DataOption("n_types", int, "Bracket types.")
    monkeypatch.setattr(DyckTask, "data_options", (*DyckTask.data_options, extra))
    page = runner.invoke(app, ["data", "dyck", "--help"], env={"COLUMNS": "120"}).stdout
    panel = page[page.index("Dyck options"):]
    assert "--n-types" in panel and "Bracket types." in panel and "--n-types" not in page[:page.index("Dyck options")]
    result = _run(*cache, "--n-types", "27")  # reaches DyckConfig, which refuses it before any generation
    assert result.exit_code == 2 and "n_types must be in 1..26, got 27" in result.stderr, result.output
    result = runner.invoke(app, ["data", "code", "--n-types", "3"])
    assert result.exit_code == 2 and result.stderr.strip() == "error: --n-types can only be used with the dyck task"
    monkeypatch.undo()
    assert "--n-types" not in runner.invoke(app, ["data", "dyck", "--help"]).stdout
