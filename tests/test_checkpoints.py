"""Checkpoints along training (`train --save-every`) and the analysis over them (`sweep --over-checkpoints`),
end to end on a tiny Dyck model trained for 30 steps."""

from __future__ import annotations

import csv
import io
import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from illusions.analyses.checkpoints import checkpoint_specs
from illusions.analyses.spec import AnalysisSpec
from illusions.cli import app
from illusions.config import read_json
from illusions.errors import InvalidOption
from illusions.models import CHECKPOINTS_DIR, WEIGHTS_FILE, list_checkpoints, load_model
from illusions.training import TRAINER_FILE

runner = CliRunner()
RECIPE = """
[task]
name = "dyck"
n_train = 3000
n_eval = 40
max_len = 40
ood_depth_max = 13
short_max_brackets = 12
min_distance = 2
[model]
n_layers = 2
d_model = 32
n_heads = 2
d_head = 16
d_mlp = 64
n_ctx = 40
d_vocab = 43
[train]
steps = 30
batch_size = 16
warmup_steps = 5
eval_every = 10
eval_rows = 16
checkpoint_every = 0
"""
FAST = ["--fit-n", "30", "--n-boot", "20", "--max-seqs", "20", "--threads", "1",
        "--split", "iid", "--split", "unseen_depth"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    mp = pytest.MonkeyPatch()
    mp.setenv("ILLUSIONS_CACHE", str(root / "cache"))
    (root / "tiny.toml").write_text(RECIPE)
    result = runner.invoke(app, ["train", str(root / "tiny.toml"), "--out", str(root / "run"), "--save-every", "10",
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    yield root, result
    mp.undo()


@pytest.mark.slow
def test_train_saves_loadable_checkpoints_every_n_steps(trained):
    root, result = trained
    run = root / "run"
    found = list_checkpoints(run)
    assert [step for step, _ in found] == [10, 20, 30]
    assert list_checkpoints(run / CHECKPOINTS_DIR) == found
    assert "step checkpoints:" in result.stdout and "(3: steps 10, 20, 30)" in " ".join(result.stdout.split())
    for step, folder in found:
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "manifest.json", WEIGHTS_FILE]
        model, meta = load_model(folder)
        assert meta["step"] == step and meta["step_checkpoint"]["save_every"] == 10 and not meta["finished"]
        assert meta["task"]["config"]["n_train"] == 3000
    # The last one holds the final weights; earlier ones differ (the model learned in between).
    final = load_file(str(run / WEIGHTS_FILE))
    last = load_file(str(found[-1][1] / WEIGHTS_FILE))
    first = load_file(str(found[0][1] / WEIGHTS_FILE))
    assert all((final[k] == last[k]).all() for k in final)
    assert any((final[k] != first[k]).any() for k in final)
    assert read_json(run / TRAINER_FILE)["save_every"] == 10
    # The step checkpoints are carried along by every checkpoint of the run (never dropped).
    resumed = runner.invoke(app, ["train", str(root / "tiny.toml"), "--out", str(run), "--resume", "--threads", "1"])
    assert resumed.exit_code == 0, resumed.output
    assert [step for step, _ in list_checkpoints(run)] == [10, 20, 30]


@pytest.mark.slow
def test_sweep_over_checkpoints_runs_each_step_and_summarises_them(trained, tmp_path):
    root, _ = trained
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", "dyck", "--over-checkpoints", str(root / "run"), "--simplify", "svd",
                                 "--ranks", "2", *FAST, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"step10", "step20", "step30", "checkpoints.csv", "checkpoints.json",
                                               "config.json", "manifest.json", "report.html", "fig_checkpoints.png"}
    rows = list(csv.DictReader(io.StringIO((out / "checkpoints.csv").read_text())))
    assert sorted({int(r["step"]) for r in rows}) == [10, 20, 30]
    assert {r["split"] for r in rows} == {"iid", "unseen_depth", "unseen_depth (opener > 10)",
                                         "unseen_depth (key_depth >= 10)"}
    assert {r["metric"] for r in rows} == {"original_accuracy", "proxy_accuracy", "agreement", "accuracy_change"}
    # Each step's figures are those of an ordinary analysis of that checkpoint.
    single = tmp_path / "single"
    alone = runner.invoke(app, ["analyze", "dyck", "--model", str(root / "run" / CHECKPOINTS_DIR / "step20"),
                                "--simplify", "svd", "--rank", "2", *FAST, "--no-report", "--out", str(single)])
    assert alone.exit_code == 0, alone.output
    assert (single / "records.npz").read_bytes() == (out / "step20" / "records.npz").read_bytes()
    want = {(r["split"], r["metric"]): r for r in csv.DictReader(io.StringIO((single / "metrics.csv").read_text()))
            if r["group_by"] == "all"}
    for r in rows:
        if r["step"] == "20" and "(" not in r["split"]:
            ref = want[(r["split"], r["metric"])]
            assert (r["value"], r["gap_vs_iid"]) == (ref["value"], ref["gap_vs_ref"])
    doc = json.loads((out / "checkpoints.json").read_text())
    assert doc["steps"] == [10, 20, 30] and doc["by_step"][1]["run"] == "step20"
    assert set(doc["by_step"][0]["original_accuracy"]) == {"iid", "unseen_depth", "unseen_depth (opener > 10)",
                                                           "unseen_depth (key_depth >= 10)"}
    page = (out / "report.html").read_text()
    assert 'id="fig_checkpoints"' in page and "training step" in page and 'href="step20/report.html"' in page
    assert (out / "step20" / "report.html").is_file()
    assert "original accuracy by training step" in " ".join(result.stdout.split())
    # A second run into the same folder needs --overwrite; --json prints the document.
    again = runner.invoke(app, ["sweep", "dyck", "--over-checkpoints", str(root / "run"), "--simplify", "svd",
                                "--ranks", "2", *FAST, "--out", str(out), "--json", "--no-report"])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    again = runner.invoke(app, ["sweep", "dyck", "--over-checkpoints", str(root / "run"), "--simplify", "svd",
                                "--ranks", "2", *FAST, "--out", str(out), "--json", "--no-report", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["by_step"] == doc["by_step"]


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "words"), [
    (["--model", "dyck"], "--over-checkpoints cannot be combined with model"),
    (["--out", "{run}/checkpoints/x"], "is inside the checkpoints folder"),
    (["--engine", "slurm"], "--engine slurm does not apply"),
])
def test_bad_checkpoint_sweeps_are_one_line(trained, tmp_path, extra, words):
    root, _ = trained
    extra = [e.replace("{run}", str(root / "run")) for e in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "o")]
    result = runner.invoke(app, ["sweep", "dyck", "--over-checkpoints", str(root / "run"), "--simplify", "onehot",
                                 *FAST, *out, *extra])
    assert result.exit_code == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (root / "run" / "checkpoints" / "x").exists()


def test_spec_checks_its_checkpoints_and_records_them_only_when_set(tmp_path):
    assert "checkpoints" not in AnalysisSpec().to_dict()
    with pytest.raises(InvalidOption, match="is not a directory"):
        AnalysisSpec(checkpoints=str(tmp_path / "nope"))
    with pytest.raises(InvalidOption, match="holds no step checkpoints"):
        AnalysisSpec(checkpoints=str(tmp_path))
    result = runner.invoke(app, ["sweep", "dyck", "--over-checkpoints", str(tmp_path), "--simplify", "onehot"])
    assert result.exit_code == 2 and "error: --over-checkpoints" in result.stderr and "holds no step" in result.stderr


@pytest.mark.slow
def test_checkpoint_specs_refuse_mixed_runs(trained, tmp_path):
    import shutil

    root, _ = trained
    spec = AnalysisSpec(simplifier="onehot", checkpoints=str(root / "run"))
    specs = checkpoint_specs(spec)
    assert [(s, sub.model, sub.checkpoints) for s, _, sub in specs][0] == (10, str(root / "run/checkpoints/step10"), "")
    assert AnalysisSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(Exception, match="trained on task 'dyck', not 'code'"):
        checkpoint_specs(AnalysisSpec(task="code", simplifier="onehot", checkpoints=str(root / "run")))
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "run" / "checkpoints", mixed)
    config = read_json(mixed / "step20" / "config.json")
    config["meta"]["task"]["config"]["seed"] = 9
    (mixed / "step20" / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="other dyck settings"):
        checkpoint_specs(AnalysisSpec(simplifier="onehot", checkpoints=str(mixed)))


def test_a_checkpoint_spec_is_not_run_as_a_single_analysis_nor_by_reproduce(tmp_path, tiny_config):
    from illusions.analyses.run import run_analysis
    from illusions.errors import IllusionsError
    from illusions.models import build_model, save_model
    from illusions.reproduction.plan import load_recipes, plan

    save_model(build_model(tiny_config), tmp_path / "run" / CHECKPOINTS_DIR / "step5")
    spec = AnalysisSpec(simplifier="onehot", checkpoints=str(tmp_path / "run"))
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [5] and spec.default_name().endswith("-checkpoints")
    with pytest.raises(IllusionsError, match="run_over_checkpoints"):
        run_analysis(spec)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "r.toml").write_text(f'name = "r"\n[analysis]\nsimplifier = "onehot"\ncheckpoints = "{tmp_path / "run"}"\n')
    with pytest.raises(IllusionsError, match="analyses training checkpoints"):
        plan(load_recipes(recipes), tmp_path / "out")
