"""Extra training seeds of the bundled families (src/illusions/assets/seeds/<family>-seed<N>/), for
intervals across training runs: each is its family's bundled recipe with another --seed, and
reproduces what it recorded."""

from __future__ import annotations

import pytest

from illusions.bundled import ASSETS, METRICS_FILE, bundled_recipe_path
from illusions.config import read_json
from illusions.models import load_model, read_checkpoint_config
from illusions.recipes import load_recipe
from illusions.reproduction.plan import seed_models
from illusions.tasks.code import CodeTask
from illusions.tasks.dyck import DyckConfig, DyckTask
from illusions.training import eval_subset_rows, evaluate

SEEDS = sorted(p for p in (ASSETS / "seeds").iterdir() if p.is_dir())


def _task_and_seed(folder):
    """The family (the folder name's stem, e.g. ``dyck-paperlike``) and the training seed."""
    family, _, seed = folder.name.rpartition("-seed")
    return family, int(seed)


def test_three_training_seeds_per_family_are_shipped():
    assert [p.name for p in SEEDS] == ["code-seed1", "code-seed2", "dyck-paperlike-seed1", "dyck-paperlike-seed2",
                                       "dyck-seed1", "dyck-seed2"]
    for family in ("code", "dyck", "dyck-paperlike"):
        assert sorted(seed_models(family)) == [0, 1, 2]


@pytest.mark.parametrize("folder", SEEDS, ids=lambda p: p.name)
def test_seed_is_the_bundled_recipe_with_another_training_seed(folder):
    from illusions.models import ModelConfig
    from illusions.training import TrainConfig

    task, seed = _task_and_seed(folder)
    assert (folder / "recipe.toml").read_bytes() == bundled_recipe_path(task).read_bytes()
    recipe = load_recipe(bundled_recipe_path(task), {"model": ModelConfig, "train": TrainConfig})
    cfg, meta = read_checkpoint_config(folder)
    assert cfg == recipe["model"] and meta["finished"] and meta["step"] == recipe["train"].steps
    expected = recipe.to_dict()
    expected["train"]["seed"] = seed
    saved = dict(meta["recipe"])
    saved.pop("source")
    assert saved == expected


@pytest.mark.slow
@pytest.mark.parametrize("folder", SEEDS, ids=lambda p: p.name)
def test_seed_checkpoint_reproduces_its_recorded_subset_accuracies(folder):
    metrics = read_json(folder / METRICS_FILE)
    model, meta = load_model(folder)
    if meta["task"]["task"] == "dyck":
        task = DyckTask(DyckConfig.from_dict(meta["task"]["config"]))
    else:
        task = CodeTask.from_meta(meta["task"])  # the pinned corpus: the same on every machine
    splits = task.splits()
    rows = {name: eval_subset_rows(len(s), metrics["eval_rows"]) for name, s in splits.items()}
    assert evaluate(model, splits, task.candidates, rows) == metrics["subset_accuracies"]
