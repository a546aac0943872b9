"""tools/search_paperlike.py, the paper-like Dyck search, on one tiny candidate for a few steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "task.n_train=3000", "--set", "task.n_eval=40", "--set", "task.max_len=40",
        "--set", "task.ood_depth_max=13", "--set", "task.short_max_brackets=12", "--set", "task.min_distance=2",
        "--set", "model.n_ctx=40", "--set", "model.d_model=16", "--set", "model.d_head=8", "--set", "model.d_mlp=32",
        "--set", "train.warmup_steps=2", "--set", "train.eval_every=0", "--set", "train.eval_rows=16"]


def _tool():
    spec = importlib.util.spec_from_file_location("search_paperlike", REPO / "tools" / "search_paperlike.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_candidate_is_a_valid_change_of_the_recipe_and_the_readme_lists_them():
    tool = _tool()
    readme = (REPO / "tasks" / "README.md").read_text()
    assert "| " + " | ".join(tool.HEADER) + " |" in readme
    # Every candidate is a measured row of the table or named among those not run.
    not_run = readme.split("- Not run", 1)[1].split("\n\n", 1)[0]
    for name, (_, changes) in tool.CANDIDATES.items():
        tool.resolved_recipe(changes, {})  # validated like a recipe file
        assert f"| `{name}` |" in readme or f"`{name}`" in not_run, name


@pytest.mark.slow
def test_one_tiny_candidate_trains_is_reused_and_fills_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ILLUSIONS_CACHE", str(tmp_path / "cache"))
    tool = _tool()
    args = ["--out", str(tmp_path / "search"), "--candidates", "rotary", "--steps", "3", "--threads", "1", *TINY]
    assert tool.main(args) == 0
    result = json.loads((tmp_path / "search" / "rotary" / "result.json").read_text())
    assert result["steps"] == 3 and result["recipe"]["model"]["positional_embedding"] == "rotary"
    assert set(result["accuracies"]) >= {"iid", "unseen_depth"} and "unseen_depth (opener > 10)" in result["groups"]
    table = (tmp_path / "search" / "search.md").read_text()
    assert table.splitlines()[0] == "| " + " | ".join(tool.HEADER) + " |"
    assert "| `rotary` |" in table and "smoke test only" in table
    assert f"{result['accuracies']['iid']['accuracy']:.4f}" in table
    capsys.readouterr()
    assert tool.main(args) == 0
    assert "rotary: reused" in capsys.readouterr().err
    assert tool.main(["--candidates", "nope"]) == 2
