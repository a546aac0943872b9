"""Bundled models by name: the catalogue of assets/<name>/ and assets/seeds/<name>-seed<N>/, --model NAME
everywhere a model is taken (a folder of that name wins), `illusions list`, reproduce's seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from illusions import bundled
from illusions.cli import app
from illusions.config import read_json
from illusions.errors import IllusionsError
from illusions.models import WEIGHTS_FILE, build_model, save_model

runner = CliRunner()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_dyck):
    """Assets with two families of tiny Dyck models: dyck (seeds 0, 1) and dyck-paperlike (0, 2)."""
    root = tmp_path_factory.mktemp("named")
    task, cfg = tiny_dyck.task, tiny_dyck.config
    assets = root / "assets"
    for folder, seed in (("dyck", 0), ("seeds/dyck-seed1", 1), ("dyck-paperlike", 3), ("seeds/dyck-paperlike-seed2", 2)):
        save_model(build_model(cfg, seed=seed), assets / folder, meta={"task": task.meta()})
    (assets / "dyck" / "metrics.json").write_text(json.dumps(
        {"accuracies": {"iid": {"accuracy": 0.12345, "n_positions": 9}, "unseen_depth": {"accuracy": 0.5}}}))
    (assets / "seeds" / "not-a-seed").mkdir()
    (assets / "empty").mkdir()
    return root, assets


def test_catalogue_names_every_checkpoint_by_family_and_seed(assets):
    _, folder = assets
    cat = bundled.catalogue(folder)
    assert list(cat) == ["dyck", "dyck:seed1", "dyck-paperlike", "dyck-paperlike:seed2"]
    assert cat["dyck-paperlike:seed2"].path == folder / "seeds" / "dyck-paperlike-seed2"
    assert (cat["dyck-paperlike:seed2"].family, cat["dyck-paperlike:seed2"].seed) == ("dyck-paperlike", 2)
    assert cat["dyck-paperlike"].task() == "dyck"
    assert bundled.family_seeds("dyck", folder) == {0: folder / "dyck", 1: folder / "seeds" / "dyck-seed1"}
    # The package's own catalogue holds the shipped reference models and their seeds.
    shipped = bundled.catalogue()
    assert {"dyck", "dyck:seed1", "code"} <= set(shipped) and shipped["dyck"].path == bundled.bundled_model_dir("dyck")


def test_parameters_are_read_from_the_safetensors_header(assets):
    from illusions.models import load_model

    _, folder = assets
    model, _ = load_model(folder / "dyck")
    params, size = bundled.catalogue(folder)["dyck"].size()
    assert params == sum(p.numel() for p in model.parameters())
    assert size == (folder / "dyck" / WEIGHTS_FILE).stat().st_size
    with pytest.raises(IllusionsError, match="not a readable safetensors file"):
        bad = folder.parent / "bad.safetensors"
        bad.write_bytes(b"\x05\x00")
        bundled.safetensors_parameters(bad)


def test_resolve_prefers_an_existing_folder_then_a_name(assets, tmp_path, monkeypatch):
    _, folder = assets
    assert bundled.resolve_model("dyck:seed1", folder) == (folder / "seeds" / "dyck-seed1", "dyck:seed1")
    assert bundled.resolve_model("dyck-paperlike:seed0", folder) == (folder / "dyck-paperlike", "dyck-paperlike")
    with pytest.raises(IllusionsError) as err:
        bundled.resolve_model("dyck:seed7", folder)
    message = str(err.value)
    assert "\n" not in message and "neither a folder nor a bundled model" in message
    assert "dyck, dyck:seed1, dyck-paperlike, dyck-paperlike:seed2" in message
    # Paths that do not exist are left to the loader (which names what it expected).
    assert bundled.resolve_model("runs/missing", folder) == (bundled.Path("runs/missing"), None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dyck:seed1").mkdir()
    assert bundled.resolve_model("dyck:seed1", folder) == (bundled.Path("dyck:seed1"), None)


def test_analyze_takes_a_bundled_name_and_computes_what_its_folder_gives(assets, tmp_path, monkeypatch):
    _, folder = assets
    monkeypatch.setattr(bundled, "ASSETS", folder)
    fast = ["--simplify", "onehot", "--fit-n", "20", "--n-boot", "20", "--max-seqs", "20", "--threads", "1",
            "--no-report", "--split", "iid", "--split", "unseen_depth"]
    by_name = runner.invoke(app, ["analyze", "dyck", "--model", "dyck-paperlike:seed2", *fast, "--out",
                                  str(tmp_path / "a")])
    assert by_name.exit_code == 0, by_name.output
    assert "on bundled dyck-paperlike:seed2 model" in " ".join(by_name.stdout.split())
    by_path = runner.invoke(app, ["analyze", "dyck", "--model", str(folder / "seeds" / "dyck-paperlike-seed2"),
                                  *fast, "--out", str(tmp_path / "b")])
    assert by_path.exit_code == 0, by_path.output
    assert (tmp_path / "a" / "records.npz").read_bytes() == (tmp_path / "b" / "records.npz").read_bytes()
    assert read_json(tmp_path / "a" / "metrics.json")["model"] == "bundled dyck-paperlike:seed2"
    unknown = runner.invoke(app, ["analyze", "dyck", "--model", "dyck-paperlik", *fast, "--out", str(tmp_path / "c")])
    assert unknown.exit_code == 2 and len(unknown.stderr.strip().splitlines()) == 1
    assert "error: model 'dyck-paperlik' is neither a folder nor a bundled model; bundled models: dyck" in unknown.stderr
    assert not (tmp_path / "c").exists()
    wrong = runner.invoke(app, ["analyze", "code", "--model", "dyck:seed1", *fast[:-4], "--out", str(tmp_path / "d")])
    assert wrong.exit_code == 2 and "bundled model dyck:seed1 was trained on task 'dyck', not 'code'" in wrong.stderr


def test_reproduce_seeds_come_from_the_catalogue(assets):
    from illusions.reproduction.plan import seed_models

    _, folder = assets
    assert seed_models("dyck", folder) == {0: folder / "dyck", 1: folder / "seeds" / "dyck-seed1"}
    assert seed_models("dyck-paperlike", folder) == {0: folder / "dyck-paperlike",
                                                     2: folder / "seeds" / "dyck-paperlike-seed2"}


def test_list_shows_each_bundled_model_with_task_size_and_accuracy(assets, monkeypatch):
    _, folder = assets
    monkeypatch.setattr(bundled, "ASSETS", folder)
    monkeypatch.setenv("COLUMNS", "250")
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 4}
    assert {"dyck", "dyck:seed1", "dyck-paperlike", "dyck-paperlike:seed2"} <= set(lines)
    params, size = bundled.catalogue(folder)["dyck"].size()
    assert f"{params:,}" in lines["dyck"] and f"{size / 2**20:.2f}" in lines["dyck"]
    assert "iid 0.123" in lines["dyck"] and "unseen_depth 0.500" in lines["dyck"]
    assert "not recorded" in lines["dyck:seed1"]
    assert np.all([" dyck " in lines[name] for name in lines if name.startswith("dyck")])
