"""Extra training seeds of the Dyck reference model (src/illusions/assets/seeds/), for intervals
across training runs: each is the bundled recipe with another --seed, and reproduces what it recorded."""

from __future__ import annotations

import pytest

from illusions.bundled import ASSETS, METRICS_FILE
from illusions.config import read_json
from illusions.models import load_model
from illusions.tasks.dyck import DyckConfig, DyckTask
from illusions.training import eval_subset_rows, evaluate

SEEDS = sorted(p for p in (ASSETS / "seeds").glob("dyck-seed*") if p.is_dir())


def test_seed_checkpoints_are_shipped():
    assert [p.name for p in SEEDS] == ["dyck-seed1", "dyck-seed2"]


@pytest.mark.slow
@pytest.mark.parametrize("folder", SEEDS, ids=lambda p: p.name)
def test_seed_checkpoint_reproduces_its_recorded_subset_accuracies(folder):
    metrics = read_json(folder / METRICS_FILE)
    model, meta = load_model(folder)
    bundled_cfg, _ = load_model(ASSETS / "dyck")
    assert meta["recipe"]["train"]["seed"] == int(folder.name.removeprefix("dyck-seed"))
    assert model.cfg.d_model == bundled_cfg.cfg.d_model and model.cfg.n_layers == bundled_cfg.cfg.n_layers
    task = DyckTask(DyckConfig.from_dict(meta["task"]["config"]))
    splits = task.splits()
    rows = {name: eval_subset_rows(len(s), metrics["eval_rows"]) for name, s in splits.items()}
    assert evaluate(model, splits, task.candidates, rows) == metrics["subset_accuracies"]
