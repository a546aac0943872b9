"""Recipes: TOML -> typed configs, with unknown sections/keys rejected and overrides validated."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from illusions import registry
from illusions.cli import app
from illusions.config import Config
from illusions.errors import IllusionsError
from illusions.models import ModelConfig
from illusions.recipes import load_recipe, parse_recipe, resolve_recipe
from illusions.training import TrainConfig

SECTIONS = {"model": ModelConfig, "train": TrainConfig}


@dataclasses.dataclass(frozen=True)
class ToyConfig(Config):
    n: int = 10
    seed: int = 0


class ToyTask:
    name: ClassVar[str] = "toy"
    Config = ToyConfig

    def __init__(self, config: ToyConfig, *, cache_dir=None) -> None:
        self.config = config
        self.cache_dir = cache_dir


@pytest.fixture(autouse=True)
def toy_registered(monkeypatch):
    monkeypatch.setitem(registry.TASKS, "toy", f"{__name__}:ToyTask")


RECIPE = """
description = "a toy recipe"
[task]
name = "toy"
n = 7
[model]
d_model = 64
n_heads = 2
[train]
steps = 30
betas = [0.9, 0.95]
lr = 2e-3
"""


def test_sections_become_typed_configs_with_defaults_for_the_rest(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(RECIPE)
    r = load_recipe(path, SECTIONS)
    assert r.task_name == "toy" and r.task == ToyConfig(n=7) and r.description == "a toy recipe"
    assert r["model"] == ModelConfig(d_model=64, n_heads=2)
    assert r["train"] == TrainConfig(steps=30, betas=(0.9, 0.95), lr=2e-3)
    assert parse_recipe(r.to_dict(), SECTIONS, source="again").to_dict() == r.to_dict()
    task = r.make_task(cache_dir="x")
    assert isinstance(task, ToyTask) and task.config == ToyConfig(n=7) and task.cache_dir == "x"
    # A section the caller did not declare is an error; an absent declared one is all defaults.
    assert parse_recipe({"task": {"name": "toy"}}, SECTIONS)["train"] == TrainConfig()
    with pytest.raises(IllusionsError, match=r"no \[analysis\] section"):
        r["analysis"]


def test_overrides_are_validated_like_the_file(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(RECIPE)
    r = load_recipe(path, SECTIONS)
    assert r.replace("train", steps=5, seed=3)["train"] == r["train"].replace(steps=5, seed=3)
    assert r.replace("task", n=3).task == ToyConfig(n=3)
    with pytest.raises(IllusionsError, match="must be an integer"):
        r.replace("train", steps=1.5)
    with pytest.raises(IllusionsError, match="steps must be at least 1"):
        r.replace("train", steps=0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[task]\nname='toy'\n[modle]\nd_model=3\n", "unknown section.*modle"),
        ("[task]\nname='toy'\n[model]\nwidth=3\n", r"unknown ModelConfig key\(s\) width"),
        ("[task]\nname='toy'\nsize=3\n", r"unknown ToyConfig key\(s\) size.*\[task\]"),
        ("[task]\nname='nope'\n", "unknown task 'nope'"),
        ("[model]\nd_model=3\n", r"needs a \[task\] table with a name"),
        ("[task]\nname='toy'\n[train]\nlr='fast'\n", "TrainConfig.lr.*must be a number"),
        ("[task\nname='toy'\n", "not valid TOML"),
    ],
)
def test_bad_recipes_raise_one_clear_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(IllusionsError, match=message) as info:
        load_recipe(path, SECTIONS)
    assert "bad.toml" in str(info.value)


def test_resolve_reads_paths_and_rejects_unknown_names(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(RECIPE)
    assert resolve_recipe(str(path), SECTIONS)["model"].d_model == 64
    with pytest.raises(IllusionsError, match="neither a recipe file nor a task name"):
        resolve_recipe("dyk", SECTIONS)
    with pytest.raises(IllusionsError, match="no bundled recipe for task 'toy'"):
        resolve_recipe("toy", SECTIONS)


def test_train_command_turns_bad_input_into_one_line_and_exit_2(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.toml"
    bad.write_text("[task]\nname='toy'\n[train]\nstep=3\n")
    for args in (["train", str(bad)], ["train", str(tmp_path / "missing.toml")], ["train", "dyk"],
                 ["train", str(bad), "--threads", "0"]):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not (tmp_path / "out").exists()
