"""The bundled Dyck reference model: it loads as a plain HookedTransformer, was trained by exactly the
shipped recipe, reproduces its recorded accuracies, and meets the issue's targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from illusions.bundled import (
    LOG_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    bundled_metrics,
    bundled_model_dir,
    bundled_recipe_path,
    load_bundled,
)
from illusions.config import read_json
from illusions.errors import IllusionsError
from illusions.models import WEIGHTS_FILE, ModelConfig, build_model, read_checkpoint_config
from illusions.recipes import load_recipe, resolve_recipe
from illusions.training import TrainConfig, eval_subset_rows, evaluate

REPO_RECIPE = Path(__file__).parents[1] / "tasks" / "dyck.toml"
SECTIONS = {"model": ModelConfig, "train": TrainConfig}


def test_bundled_folder_has_the_fixed_files_and_is_small():
    folder = bundled_model_dir("dyck")
    for name in ("config.json", WEIGHTS_FILE, RECIPE_FILE, METRICS_FILE, LOG_FILE):
        assert (folder / name).is_file(), name
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5 * 2**20
    with pytest.raises(IllusionsError, match="no bundled model for task 'nope'"):
        bundled_model_dir("nope")


def test_trained_by_exactly_the_repository_recipe():
    assert bundled_recipe_path("dyck").read_bytes() == REPO_RECIPE.read_bytes()
    recipe = load_recipe(REPO_RECIPE, SECTIONS)
    assert resolve_recipe("dyck", SECTIONS).to_dict() == recipe.to_dict()
    cfg, meta = read_checkpoint_config(bundled_model_dir("dyck"))
    assert cfg == recipe["model"]
    saved = dict(meta["recipe"])
    saved.pop("source")
    assert saved == recipe.to_dict()
    assert meta["finished"] and meta["step"] == recipe["train"].steps
    assert meta["task"]["config"] == recipe.task.to_dict()


@pytest.mark.tl3
def test_loads_into_a_plain_hooked_transformer_with_identical_logits():
    from transformer_lens import HookedTransformer

    model, meta = load_bundled("dyck")
    assert type(model) is HookedTransformer
    fresh = build_model(read_checkpoint_config(bundled_model_dir("dyck"))[0], seed=123)
    fresh.load_state_dict(load_file(str(bundled_model_dir("dyck") / WEIGHTS_FILE)), strict=True)
    tokens = torch.tensor([[1, 3, 4, 24, 23, 2]])  # START (a (b b) a) END
    with torch.no_grad():
        assert torch.equal(model(tokens), fresh(tokens))


@pytest.mark.slow
def test_reproduces_recorded_subset_accuracies_and_meets_targets():
    metrics = bundled_metrics("dyck")
    assert metrics["accuracies"]["iid"]["accuracy"] >= 0.99
    assert metrics["accuracies"]["seen_struct"]["accuracy"] >= 0.99
    model, meta = load_bundled("dyck")
    assert meta["accuracies"] == metrics["accuracies"]
    task = load_recipe(REPO_RECIPE, SECTIONS).make_task()
    splits = task.splits()
    rows = {name: eval_subset_rows(len(s), metrics["eval_rows"]) for name, s in splits.items()}
    got = evaluate(model, splits, task.candidates, rows)
    assert got == metrics["subset_accuracies"]
    log = read_json(bundled_model_dir("dyck") / LOG_FILE)
    assert log["eval"][-1]["accuracies"] == metrics["subset_accuracies"]


def test_every_shipped_checkpoint_has_a_manifest_that_matches_its_files():
    """Shipped files are checked on load: each folder's manifest lists all of them, with their sha256."""
    from illusions.bundled import ASSETS
    from illusions.io import MANIFEST_FILE, file_sha256, read_manifest

    folders = [p.parent for p in ASSETS.rglob(WEIGHTS_FILE)]
    assert {f.name for f in folders} >= {"dyck", "code", "dyck-seed1", "dyck-seed2", "code-seed1", "code-seed2"}
    for folder in folders:
        manifest = read_manifest(folder)
        assert manifest is not None and manifest["kind"] == "model", folder
        on_disk = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_FILE)
        assert sorted(manifest["files"]) == on_disk, folder
        for name, digest in manifest["files"].items():
            assert file_sha256(folder / name) == digest, folder / name
