"""`illusions analyze` / `sweep` end to end through Typer's CliRunner on a tiny Dyck model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from illusions.analyses.faithfulness import analyze
from illusions.analyses.summary import overall, summarize
from illusions.cli import app
from illusions.registry import make_simplifier

runner = CliRunner()


@pytest.fixture(scope="module")
def dyck_env(tiny_dyck):
    """The session's small Dyck task and its untrained tiny model, saved in ``root / "model"``."""
    return tiny_dyck.task, tiny_dyck.model, tiny_dyck.root


def _invoke(args):
    return runner.invoke(app, args, catch_exceptions=False)


def test_analyze_json_and_run_directory(dyck_env, tmp_path):
    task, _, root = dyck_env
    out = tmp_path / "run"
    result = _invoke(["analyze", "dyck", "--simplify", "svd", "--rank", "2", "--model", str(root / "model"),
                      "--fit-n", "50", "--n-boot", "50", "--threads", "1", "--no-report", "--out", str(out),
                      "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["task"] == "dyck" and doc["simplifier"] == "svd" and doc["params"]["rank"] == 2
    assert set(doc["splits"]) == {"iid", "seen_struct", "unseen_struct_short", "unseen_struct_long", "unseen_depth"}
    for entry in doc["splits"].values():
        assert entry["n_positions"] > 0
        for metric in ("original_accuracy", "proxy_accuracy", "agreement", "attention_jsd", "kl"):
            value, (low, high) = entry[metric]["value"], entry[metric]["ci"]
            assert low <= value <= high
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "metrics.csv", "metrics.json", "proxies",
                                                    "records.npz"]
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("split,proxy,simplifier,param,param_value,group_by,group,metric,value")
    assert json.loads((out / "metrics.json").read_text()) == doc


def test_sweep_table_and_breakdown(dyck_env, tmp_path):
    _, _, root = dyck_env
    result = _invoke(["sweep", "dyck", "--simplify", "svd", "--ranks", "1,4", "--model", str(root / "model"),
                      "--fit-n", "50", "--n-boot", "20", "--threads", "1", "--no-report",
                      "--out", str(tmp_path / "sweep"), "--by", "key_depth", "--split", "iid",
                      "--split", "unseen_depth"])
    assert result.exit_code == 0, result.output
    assert "svd(rank=1)" in result.stdout and "svd(rank=4)" in result.stdout
    assert "by key_depth" in result.stdout
    csv = (tmp_path / "sweep" / "metrics.csv").read_text()
    assert "svd(rank=1)" in csv and "svd(rank=4)" in csv and ",key_depth," in csv


def test_full_rank_svd_agrees_everywhere(dyck_env):
    task, model, _ = dyck_env
    splits = task.splits()
    svd = make_simplifier("svd", rank=model.cfg.d_head, layers=(0, 1))
    rows = overall(summarize(analyze(model, splits, [svd], candidates=task.candidates, fit_n=200), n_boot=20))
    assert {r["split"] for r in rows if r["metric"] == "agreement"} == set(splits) - {"train"}
    for r in rows:
        if r["metric"] == "agreement":
            assert r["value"] == 1.0, r
        if r["metric"] == "attention_jsd":
            assert r["value"] < 1e-6, r


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["analyze", "nope"], "unknown task 'nope'"),
        (["analyze", "dyck", "--simplify", "pca"], "unknown simplifier 'pca'"),
        (["analyze", "dyck", "--split", "ood"], "unknown split(s) ood"),
        (["analyze", "dyck", "--rank", "0"], "rank must be at least 1"),
        (["analyze", "dyck", "--rank", "17"], "rank must be in 1..16"),
        (["analyze", "dyck", "--simplify", "kmeans", "--clusters", "100000"], "k must be in 1.."),
        (["analyze", "dyck", "--layer", "5"], "layer 5 does not exist; this model has 2 layers: 0..1, or -2..-1"),
        (["analyze", "dyck", "--layer", "-99"], "layer -99 does not exist; this model has 2 layers: 0..1, or -2..-1"),
        (["analyze", "dyck", "--layer", "-1", "--layer", "1"], "name layer 1 twice"),
        (["sweep", "dyck", "--ranks", "1,x"], "--ranks must be comma-separated integers"),
        (["sweep", "dyck"], "give --ranks, --clusters or --widths (the values to sweep)"),
        (["sweep", "dyck", "--simplify", "sae", "--ranks", "4"], "--ranks does not apply to sae"),
        # The SAE's top-k is --top-k (--k still works, a deprecated alias).
        (["analyze", "dyck", "--top-k", "4"], "--top-k does not apply to svd"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run_dir(dyck_env, tmp_path, args, message):
    _, _, root = dyck_env
    out = tmp_path / "run"
    result = runner.invoke(app, [*args, "--model", str(root / "model"), "--out", str(out), "--fit-n", "50",
                                 "--threads", "1", "--no-report"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")], "staging folder left behind"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--k", "4"], "--k"),
        (["--k=4"], "--k"),
        (["--top-k", "4"], "--top-k"),
        (["--k", "4", "--top-k", "4"], "--top-k"),  # the current flag given too: the message names it
    ],
)
def test_messages_name_a_deprecated_alias_as_typed(dyck_env, tmp_path, flags, named):
    """The message names the flag the command received (not the test runner's own sys.argv)."""
    _, _, root = dyck_env
    result = runner.invoke(app, ["analyze", "dyck", *flags, "--model", str(root / "model"), "--out",
                                 str(tmp_path / "run"), "--no-report"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {named} does not apply to svd", result.stderr


def test_model_dir_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["analyze", "dyck", "--model", str(tmp_path / "empty"), "--out",
                                 str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "config.json does not exist" in result.stderr
    assert not (tmp_path / "run").exists()


def test_unwritable_out(dyck_env, tmp_path):
    _, _, root = dyck_env
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["analyze", "dyck", "--model", str(root / "model"), "--out",
                                 str(blocker / "run")])
    assert result.exit_code == 2
    assert "is not a directory" in result.stderr
    result = runner.invoke(app, ["analyze", "dyck", "--model", str(root / "model"), "--out", str(blocker)])
    assert result.exit_code == 2
    assert "exists and is not a directory" in result.stderr


def test_layer_from_the_end_is_resolved_printed_and_saved(dyck_env, tmp_path):
    """``--layer -1`` is the last layer: the run records (and names itself after) the index it used,
    and its metrics are those of ``--layer 1`` on this 2-layer model."""
    _, _, root = dyck_env
    common = ["analyze", "dyck", "--simplify", "svd", "--rank", "2", "--model", str(root / "model"), "--fit-n", "40",
              "--max-seqs", "40", "--n-boot", "20", "--threads", "1", "--no-report", "--split", "iid"]
    back = runner.invoke(app, [*common, "--layer", "-1", "--out", str(tmp_path / "back")])
    assert back.exit_code == 0, back.output
    assert "note: --layer -1 is layer 1 of this model" in back.stderr
    assert json.loads((tmp_path / "back" / "config.json").read_text())["spec"]["layers"] == [1]
    assert _invoke([*common, "--layer", "1", "--out", str(tmp_path / "index")]).exit_code == 0
    assert (tmp_path / "back" / "metrics.csv").read_bytes() == (tmp_path / "index" / "metrics.csv").read_bytes()


def test_same_seed_same_metrics_file(dyck_env, tmp_path):
    _, _, root = dyck_env
    common = ["analyze", "dyck", "--simplify", "kmeans", "--clusters", "4", "--model", str(root / "model"),
              "--fit-n", "50", "--n-boot", "20", "--threads", "1", "--no-report"]
    for name in ("a", "b"):
        assert _invoke([*common, "--out", str(tmp_path / name)]).exit_code == 0
    assert (tmp_path / "a" / "metrics.csv").read_bytes() == (tmp_path / "b" / "metrics.csv").read_bytes()
    assert np.array_equal(np.load(tmp_path / "a" / "records.npz")["iid/0/proxy_pred"],
                          np.load(tmp_path / "b" / "records.npz")["iid/0/proxy_pred"])
    assert _invoke([*common, "--seed", "1", "--out", str(tmp_path / "c")]).exit_code == 0
    assert (tmp_path / "a" / "metrics.csv").read_bytes() != (tmp_path / "c" / "metrics.csv").read_bytes()


def test_sweep_gives_the_same_records_as_single_analyses(dyck_env):
    task, model, _ = dyck_env
    splits = task.splits()
    kw = {"candidates": task.candidates, "fit_n": 100, "eval_splits": ["iid", "unseen_depth"], "seed": 1}
    swept = analyze(model, splits, [make_simplifier("svd", rank=r) for r in (1, 3)], **kw)
    single = analyze(model, splits, [make_simplifier("svd", rank=3)], **kw)
    for split in ("iid", "unseen_depth"):
        np.testing.assert_array_equal(swept.records[(split, 1)].proxy_pred, single.records[(split, 0)].proxy_pred)
        np.testing.assert_allclose(swept.records[(split, 1)].kl, single.records[(split, 0)].kl, atol=1e-6)


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "analyses").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_analysis_recipes_parse_and_name_registered_things(path):
    from illusions import registry
    from illusions.analyses.run import build_simplifiers, load_analysis_recipe

    recipe = load_analysis_recipe(path)
    assert recipe.name == path.stem
    assert recipe.description and recipe.claim
    assert recipe.spec.task in registry.TASKS and recipe.spec.simplifier in registry.SIMPLIFIERS
    param, values = recipe.spec.sweep_values()
    built = build_simplifiers(recipe.spec)
    assert len(built) == max(len(values), 1)
    assert [getattr(s, param) for s in built] == list(values) if values else param == "" or len(built) == 1


def test_recipe_runs_through_the_cli_and_refuses_other_options(dyck_env, tmp_path):
    _, _, root = dyck_env
    recipe = tmp_path / "tiny-sweep.toml"
    recipe.write_text(
        'name = "tiny-sweep"\ndescription = "d"\nclaim = "c"\n[analysis]\n'
        f'task = "dyck"\nmodel = "{root / "model"}"\nsimplifier = "svd"\nranks = [1, 2]\n'
        'fit_n = 40\nn_boot = 20\nsplits = ["iid"]\n'
    )
    out = tmp_path / "runs" / "x"
    result = _invoke(["sweep", str(recipe), "--out", str(out), "--threads", "1", "--no-report", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [p["label"] for p in doc["proxies"]] == ["svd(rank=1)", "svd(rank=2)"]
    refused = runner.invoke(app, ["analyze", str(recipe), "--rank", "3"])
    assert refused.exit_code == 2 and "cannot be combined with a recipe" in refused.stderr
    recipe.write_text('[analysis]\ntask = "dyck"\nrank = 4\n')
    bad = runner.invoke(app, ["analyze", str(recipe)])
    assert bad.exit_code == 2 and "unknown AnalysisSpec key(s) rank" in bad.stderr and str(recipe) in bad.stderr


def test_a_recipe_with_max_seqs_0_evaluates_every_sequence(dyck_env, tmp_path):
    task, _, root = dyck_env
    recipe = tmp_path / "all-seqs.toml"
    recipe.write_text(
        '[analysis]\n'
        f'task = "dyck"\nmodel = "{root / "model"}"\nsimplifier = "onehot"\n'
        'fit_n = 10\nn_boot = 10\nsplits = ["iid", "unseen_depth"]\nmax_seqs = 0\n'
    )
    out = tmp_path / "run"
    result = _invoke(["analyze", str(recipe), "--out", str(out), "--threads", "1", "--no-report", "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["spec"]["max_seqs"] is None
    splits = task.splits()
    assert config["evaluated_sequences"] == {"iid": len(splits["iid"]), "unseen_depth": len(splits["unseen_depth"])}
    assert len(splits["iid"]) > 500 or len(splits["iid"]) > 0


def test_a_split_named_twice_is_evaluated_once(dyck_env, tmp_path):
    _, _, root = dyck_env
    # Fewer sequences than the split holds, so each evaluation draws its own rows: a second draw of
    # the same split would change the numbers.
    common = ["analyze", "dyck", "--rank", "2", "--model", str(root / "model"), "--fit-n", "30",
              "--n-boot", "20", "--threads", "1", "--no-report", "--max-seqs", "5"]
    once = _invoke([*common, "--split", "iid", "--out", str(tmp_path / "once")])
    twice = _invoke([*common, "--split", "iid", "--split", "iid", "--out", str(tmp_path / "twice")])
    assert once.exit_code == 0 and twice.exit_code == 0, once.output + twice.output
    assert (tmp_path / "once" / "metrics.csv").read_bytes() == (tmp_path / "twice" / "metrics.csv").read_bytes()


def test_an_allocation_that_fails_is_one_line_naming_what_to_reduce(dyck_env, tmp_path, monkeypatch):
    from illusions.analyses import faithfulness

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(faithfulness, "evaluate_split", no_memory)
    _, _, root = dyck_env
    out = tmp_path / "run"
    result = runner.invoke(app, ["analyze", "dyck", "--model", str(root / "model"), "--fit-n", "50", "--n-boot", "20",
                                 "--threads", "1", "--no-report", "--token-budget", "4096", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out of memory"), result.output
    assert "--token-budget (now 4096)" in lines[0] and "--batch-size (now 64)" in lines[0]
    assert "Traceback" not in result.output and not out.exists()
    # Another error is not dressed up as one of memory.
    monkeypatch.setattr(faithfulness, "evaluate_split", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape")))
    with pytest.raises(RuntimeError, match="shape"):
        _invoke(["analyze", "dyck", "--model", str(root / "model"), "--fit-n", "50", "--n-boot", "20",
                 "--threads", "1", "--no-report", "--out", str(tmp_path / "other")])
