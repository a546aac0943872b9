"""The bundled paper-like Dyck family (issue #17): three training seeds by name, each trained by exactly
tasks/dyck-paperlike.toml with its seed, step checkpoints of one seed for the over-training analysis, and
the issue's command on it."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from illusions import bundled
from illusions.cli import app
from illusions.config import read_json
from illusions.models import ModelConfig, list_checkpoints, read_checkpoint_config
from illusions.recipes import load_recipe
from illusions.training import TrainConfig

REPO = Path(__file__).parents[1]
RECIPE = REPO / "tasks" / "dyck-paperlike.toml"
SECTIONS = {"model": ModelConfig, "train": TrainConfig}
NAMES = {"dyck-paperlike": 0, "dyck-paperlike:seed1": 1, "dyck-paperlike:seed2": 2}


def test_three_seeds_by_name_each_trained_by_the_repository_recipe():
    catalogue = bundled.catalogue()
    assert set(NAMES) <= set(catalogue)
    assert bundled.family_seeds("dyck-paperlike") == {s: catalogue[n].path for n, s in NAMES.items()}
    recipe = load_recipe(RECIPE, SECTIONS)
    for name, seed in NAMES.items():
        model = catalogue[name]
        assert model.task() == "dyck" and (model.path / "recipe.toml").read_bytes() == RECIPE.read_bytes()
        cfg, meta = read_checkpoint_config(model.path)
        assert cfg == recipe["model"]
        saved = dict(meta["recipe"])
        saved.pop("source")
        assert saved == recipe.replace("train", seed=seed).to_dict()
        assert meta["finished"] and meta["step"] == recipe["train"].steps
        # The reference family's task and splits, so both families are judged on the same data.
        assert meta["task"]["config"] == load_recipe(REPO / "tasks" / "dyck.toml", SECTIONS).task.to_dict()
        accuracies = read_json(model.path / "metrics.json")["accuracies"]
        assert accuracies == meta["accuracies"]
        # The search's keep rule: not weak everywhere, and short of the reference on unseen depths.
        assert accuracies["iid"]["accuracy"] >= 0.97
        assert accuracies["unseen_depth"]["accuracy"] < 0.95


def test_one_seed_ships_evenly_spaced_step_checkpoints_ending_at_its_bundled_weights():
    shipped = bundled.family_checkpoints("dyck-paperlike")
    assert list(shipped) == [1]
    steps = [s for s, _ in list_checkpoints(shipped[1])]
    assert len(steps) >= 6 and len({b - a for a, b in zip(steps, steps[1:], strict=False)}) == 1
    final = dict(list_checkpoints(shipped[1]))[steps[-1]]
    bundled_seed1 = bundled.catalogue()["dyck-paperlike:seed1"].path
    assert (final / "model.safetensors").read_bytes() == (bundled_seed1 / "model.safetensors").read_bytes()
    # The reference family ships one such run too.
    assert len(list_checkpoints(bundled.family_checkpoints("dyck")[0])) >= 6


@pytest.mark.slow
def test_analyze_onehot_on_the_paperlike_model(tmp_path):
    """The issue's command, with fewer sequences: one line of output per split, a run directory."""
    result = CliRunner().invoke(app, ["analyze", "dyck", "--model", "dyck-paperlike", "--simplify", "onehot",
                                      "--max-seqs", "60", "--fit-n", "100", "--n-boot", "50", "--threads", "1",
                                      "--no-report", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "on bundled dyck-paperlike model" in " ".join(result.stdout.split())
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["model"] == "bundled dyck-paperlike"
    assert {"iid", "unseen_depth"} <= set(metrics["splits"])
