"""`illusions reproduce`: recipes x training seeds -> runs -> RESULTS.md, on tiny models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import TINY_RECIPE_SETTINGS, tiny_reproduction
from illusions import __version__, bundled
from illusions.cli import app
from illusions.models import build_model, save_model
from illusions.reproduction.aggregate import (
    RecipeRuns,
    SeedStat,
    has_sparse,
    load_runs,
    load_training,
)
from illusions.reproduction.claims import CLAIMS, judge
from illusions.reproduction.document import Family, _duration, render
from illusions.reproduction.figures import write_figures, write_training_figures
from illusions.reproduction.judges import _depth_split, judge_gap, judge_key_depth, training_course
from illusions.reproduction.outputs import check_outputs
from illusions.reproduction.plan import Job, load_recipes, plan, task_families
from illusions.reproduction.run import MANIFEST, is_current, run_all

runner = CliRunner()
COMMON = TINY_RECIPE_SETTINGS


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dyck):
    """Assets with a tiny 'bundled' Dyck model (seed 0) and a second seed, plus two recipes."""
    root = tmp_path_factory.mktemp("reproduce")
    assets, recipes = tiny_reproduction(root, tiny_dyck)
    (recipes / "dyck-svd-L1.toml").write_text(
        'name = "dyck-svd-L1"\ndescription = "svd sweep"\nclaim = "c"\n[analysis]\ntask = "dyck"\n'
        'simplifier = "svd"\nranks = [1, 16]\nlayers = [1]\n' + COMMON)
    (recipes / "dyck-heads-onehot.toml").write_text(
        'name = "dyck-heads-onehot"\ndescription = "per head"\nclaim = "c"\n[analysis]\ntask = "dyck"\n'
        'simplifier = "onehot"\nlayers = [0, 1]\nper_head = true\nbreakdowns = []\n' + COMMON)
    return root, assets, recipes


def test_plan_pairs_every_recipe_with_every_seed(env, tmp_path):
    _, assets, recipes = env
    jobs = plan(load_recipes(recipes), tmp_path, assets=assets)
    assert [j.key for j in jobs] == ["dyck-heads-onehot/seed0", "dyck-heads-onehot/seed1",
                                     "dyck-svd-L1/seed0", "dyck-svd-L1/seed1"]
    assert jobs[1].spec.model == str(assets / "seeds" / "dyck-seed1")
    assert [j.key for j in plan(load_recipes(recipes), tmp_path, seeds=[1], assets=assets)] == [
        "dyck-heads-onehot/seed1", "dyck-svd-L1/seed1"]
    with pytest.raises(Exception, match="no checkpoint of task 'dyck' for seed"):
        plan(load_recipes(recipes), tmp_path, seeds=[5], assets=assets)


def test_the_shipped_plan_names_bundled_checkpoints_not_where_the_package_lies(tmp_path):
    # A run's spec holds the model as the catalogue names it ("dyck:seed1"), so runs made in one
    # checkout or install are reused from another (an absolute path made every one of them stale).
    jobs = plan(load_recipes(Path(__file__).parents[1] / "analyses"), tmp_path)
    models = {j.spec.model for j in jobs}
    assert {"", "dyck:seed1", "dyck-paperlike", "dyck-paperlike:seed2", "code:seed2"} <= models
    assert not any(str(bundled.ASSETS) in m or m.startswith("/") for m in models)
    job = next(j for j in jobs if j.spec.model == "dyck:seed1")
    job.out.mkdir(parents=True)
    for name in ("metrics.csv", "metrics.json"):
        (job.out / name).write_text("x")
    (job.out / "config.json").write_text(json.dumps({"illusions_version": __version__, "spec": job.spec.to_dict()}))
    assert is_current(job)


def test_a_recipe_counting_layers_from_the_end_plans_the_index_its_runs_record(env, tmp_path):
    # layers = [-1] is resolved against each checkpoint in the plan, as the run writes it into
    # config.json, so the finished run is reused (it never was while the plan kept -1).
    _, assets, recipes = env
    last = tmp_path / "recipes"
    last.mkdir()
    (last / "dyck-svd-last.toml").write_text(
        'name = "dyck-svd-last"\ndescription = "d"\nclaim = "c"\n[analysis]\ntask = "dyck"\n'
        'simplifier = "svd"\nranks = [1]\nlayers = [-1]\n' + COMMON)
    jobs = plan(load_recipes(last), tmp_path / "out", seeds=[0], assets=assets)
    assert [j.spec.layers for j in jobs] == [(1,)]
    run_all(jobs, tmp_path / "out", report=False)
    assert is_current(jobs[0])


def test_runs_are_reused_results_come_from_the_runs(env, tmp_path):
    _, assets, recipes = env
    loaded = load_recipes(recipes)
    jobs = plan(loaded, tmp_path / "runs", assets=assets)
    first = run_all(jobs, tmp_path / "runs", report=False)
    assert not any(e["reused"] for e in first["runs"].values())
    assert json.loads((tmp_path / "runs" / MANIFEST).read_text())["runs"].keys() == first["runs"].keys()
    assert first["full_run"]["runs"] == len(jobs) and first["full_run"]["seconds"] == first["total_seconds"]
    assert first["full_run"]["cpu_seconds"] > 0
    again = run_all(jobs, tmp_path / "runs", report=False)
    assert all(e["reused"] for e in again["runs"].values())
    # Reused runs keep their times, and the whole-reproduction figure is carried over, not replaced by 0.
    assert again["full_run"] == first["full_run"]
    assert again["runs"][jobs[0].key]["seconds"] == first["runs"][jobs[0].key]["seconds"]
    # A changed spec is not reused.
    changed = [Job(j.recipe, j.seed, j.spec.replace(n_boot=30), j.out) for j in jobs[:1]]
    assert not is_current(changed[0])

    runs = load_runs(loaded, tmp_path / "runs")
    heads = runs["dyck-heads-onehot"]
    assert heads.seeds == [0, 1]
    assert heads.proxies() == ["onehot@L0H0", "onehot@L0H1", "onehot@L1H0", "onehot@L1H1"]
    # The across-seed mean in the document is the mean of the two runs' CSV values.
    values = []
    for seed in (0, 1):
        with open(tmp_path / "runs" / "dyck-svd-L1" / f"seed{seed}" / "metrics.csv") as fh:
            values += [float(r["value"]) for r in csv.DictReader(fh) if r["proxy"] == "svd(rank=16)"
                       and r["split"] == "iid" and r["metric"] == "agreement" and r["group_by"] == "all"]
    stat = runs["dyck-svd-L1"].stat("svd(rank=16)", "iid", "agreement")
    assert stat.values == pytest.approx(values) and stat.mean == pytest.approx(np.mean(values))

    figures = write_figures(runs, tmp_path / "docs" / "figures", relative_to=tmp_path / "docs")
    assert figures["sweep:dyck-svd-L1"] == "figures/dyck-svd-L1.png"
    assert (tmp_path / "docs" / "figures" / "dyck-heads-onehot.png").read_bytes()[:4] == b"\x89PNG"
    doc = render(runs, loaded, manifest=first, figures=figures)
    assert "| # | claim | what we measured | verdict |" in doc
    assert f"Wall time of the whole reproduction:** {_duration(first['total_seconds'])} for all 4 runs" in doc
    assert f"{stat.mean:.3f}" in doc
    assert "`onehot@L1H0`" in doc and "![dyck-svd-L1](figures/dyck-svd-L1.png)" in doc
    assert "recipes `dyck-kmeans-L1`, `dyck-kmeans-L0` were not run" in doc
    # The settings it states are the recipes' (TINY_RECIPE_SETTINGS), not the defaults.
    assert "fits its proxy on 40 training sequences" in doc and "up to 20 sequences per split" in doc
    assert "(20 resamples of sequences" in doc and "1,000 training" not in doc and "1,000 resamples" not in doc


def test_the_document_states_each_setting_the_recipes_use():
    from types import SimpleNamespace

    from illusions.reproduction.document import _setting

    specs = [SimpleNamespace(fit_n=1000, max_seqs=500), SimpleNamespace(fit_n=1000, max_seqs=200),
             SimpleNamespace(fit_n=1000, max_seqs=None)]
    assert _setting(specs, "fit_n") == "1,000"
    assert _setting(specs, "max_seqs") == "500 or 200 or all"
    assert _setting([], "n_boot") == "1,000"  # no run: the default


def _runs(gap_rows):
    """A two-seed RecipeRuns holding agreement rows with the given (value, low, high) matched gaps."""
    from illusions.analyses.run import AnalysisRecipe, AnalysisSpec

    rows = {}
    for seed, (iid_agree, gaps) in enumerate(gap_rows):
        seed_rows = []
        for split, gap in [("iid", None), *gaps.items()]:
            row = {f: float("nan") for f in ("ci_low", "ci_high", "gap_vs_ref", "gap_vs_ref_low",
                                             "gap_vs_ref_high", "gap_vs_matched", "gap_vs_matched_low",
                                             "gap_vs_matched_high", "matched_coverage")}
            row.update(split=split, proxy="svd(rank=4)", simplifier="svd", param="rank", param_value=4,
                       group_by="all", group="all", metric="agreement", n_positions=10, n_sequences=5,
                       value=iid_agree if gap is None else iid_agree + gap[0])
            if gap is not None:
                row.update(gap_vs_matched=gap[0], gap_vs_matched_low=gap[1], gap_vs_matched_high=gap[2],
                           gap_vs_ref=gap[0], gap_vs_ref_low=gap[1], gap_vs_ref_high=gap[2])
            seed_rows.append(row)
        rows[seed] = seed_rows
    recipe = AnalysisRecipe("r", "d", "c", AnalysisSpec(ranks=(4,)), "r.toml")
    return RecipeRuns(recipe, rows)


@pytest.mark.parametrize("gaps, verdict", [
    ([(-0.05, -0.08, -0.02), (-0.04, -0.06, -0.01)], "reproduced"),
    ([(-0.05, -0.08, -0.02), (-0.01, -0.03, 0.01)], "partly"),
    ([(0.0, -0.02, 0.02), (0.01, -0.01, 0.03)], "not reproduced"),
    ([(0.05, 0.02, 0.08), (0.04, 0.01, 0.06)], "not reproduced"),  # the proxy improves: not this claim
])
def test_gap_verdict_follows_per_seed_significance(gaps, verdict):
    runs = _runs([(0.99, {"unseen_depth": g}) for g in gaps])
    assert judge_gap(runs)[0] == verdict


def test_no_in_distribution_match_caps_the_verdict_at_partly():
    runs = _runs([(0.80, {"unseen_depth": (-0.05, -0.08, -0.02)}) for _ in range(2)])
    assert judge_gap(runs)[0] == "partly"


def test_seed_interval_is_a_t_interval_clipped_to_the_range():
    stat = SeedStat((0.9, 1.0, 0.95), (0.0, 1.0))
    half = 4.303 * np.std([0.9, 1.0, 0.95], ddof=1) / np.sqrt(3)
    assert stat.half_width == pytest.approx(half, rel=1e-3)  # t_{0.975, 2} = 4.3027
    assert stat.interval == pytest.approx((0.95 - stat.half_width, 1.0))


def test_key_depth_claim_splits_at_the_runs_training_depth():
    """Depths up to the task's recorded max_depth count as seen in training; without it, no verdict."""
    base = _runs([(0.99, {"unseen_depth": (-0.05, -0.08, -0.02)}) for _ in range(3)])
    for seed_rows in base.rows.values():
        for depth, value in ((2, 0.9), (5, 0.5)):
            seed_rows.append({**seed_rows[-1], "group_by": "key_depth", "group": str(depth), "value": value})
    def split(d):
        return _depth_split(RecipeRuns(base.recipe, base.rows), "svd(rank=4)", "unseen_depth", d)
    assert [s.mean for s in split(3)] == pytest.approx([0.9, 0.5])
    assert [s.values for s in split(10)] == [(), ()]  # nothing beyond depth 10
    runs = RecipeRuns(base.recipe, base.rows, {"max_depth": 3})
    verdict, text = judge_key_depth([runs])
    assert verdict == "reproduced" and "key depth <= 3" in text
    assert judge_key_depth([RecipeRuns(base.recipe, base.rows)])[0] == "not run"


def test_cli_writes_results_and_refuses_bad_input(env, tmp_path):
    root, _, recipes = env
    own = tmp_path / "recipes"
    own.mkdir()
    text = (recipes / "dyck-svd-L1.toml").read_text().replace('task = "dyck"\n',
                                                               f'task = "dyck"\nmodel = "{root / "assets" / "dyck"}"\n')
    (own / "dyck-svd-L1.toml").write_text(text)
    doc = tmp_path / "docs" / "RESULTS.md"
    ok = runner.invoke(app, ["reproduce", "--recipes", str(own), "--out", str(tmp_path / "runs"),
                             "--results", str(doc), "--threads", "1", "--no-report"])
    assert ok.exit_code == 0, ok.output
    assert "1 runs in" in ok.stdout and doc.is_file() and (doc.parent / "figures" / "dyck-svd-L1.png").is_file()
    for args, message in [
        (["--recipes", str(tmp_path / "nope")], "recipe folder"),
        (["--recipes", str(own), "--seeds", "x"], "--seeds must be comma-separated integers"),
        (["--recipes", str(own), "--seeds", "3"], "no checkpoint of task 'dyck' for seed(s) 3"),
        (["--recipes", str(own), "--task", "code"], "no recipe is for task 'code'; the recipes' tasks: dyck"),
        (["--recipes", str(own), "--task", "code", "--family", "dyck"], "no recipe is for task 'code'"),
        (["--recipes", str(own), "--family", "nope"], "no bundled model family 'nope' for these recipes; families: dyck"),
    ]:
        bad = runner.invoke(app, ["reproduce", *args, "--out", str(tmp_path / "bad"),
                                  "--results", str(tmp_path / "bad-docs" / "R.md")])
        assert bad.exit_code == 2, (args, bad.output)
        assert message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists() and not (tmp_path / "bad-docs").exists()


def test_parallel_workers_write_the_same_runs_as_one_process(env, tmp_path):
    _, assets, recipes = env
    loaded = [r for r in load_recipes(recipes) if r.name == "dyck-svd-L1"]
    serial = plan(loaded, tmp_path / "serial", assets=assets)
    parallel = plan(loaded, tmp_path / "parallel", assets=assets)
    run_all(serial, tmp_path / "serial", report=False)
    manifest = run_all(parallel, tmp_path / "parallel", report=False, workers=2, threads=1)
    assert manifest["workers"] == 2 and list(manifest["runs"]) == [j.key for j in parallel]
    assert len(serial) >= 2  # a pool with one job would run it in this process
    for a, b in zip(serial, parallel, strict=True):
        assert (a.out / "metrics.csv").read_bytes() == (b.out / "metrics.csv").read_bytes()


@pytest.mark.sae
def test_sparse_dictionary_recipe_feeds_its_claims_and_tables(env, tmp_path):
    pytest.importorskip("sae_lens", reason="the sae simplifier needs sae-lens (pip install '.[sae]')")
    _, assets, _ = env
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for name, seed in (("dyck-sae-resid-L1", ""), ("dyck-sae-resid-L1-s1", "seed = 1\n")):
        (recipes / f"{name}.toml").write_text(
            f'name = "{name}"\ndescription = "sae sweep"\nclaim = "c"\n[analysis]\ntask = "dyck"\n'
            'simplifier = "sae"\nwidths = [8, 16, 32]\ntop_k = 4\nsae_steps = 10\nlayers = [1]\nbreakdowns = []\n'
            + seed + COMMON)
    loaded = load_recipes(recipes)
    jobs = plan(loaded, tmp_path / "runs", assets=assets)
    manifest = run_all(jobs, tmp_path / "runs", report=False)
    runs = load_runs(loaded, tmp_path / "runs")
    sae = runs["dyck-sae-resid-L1"]
    assert has_sparse(sae) and sae.proxies() == ["sae(width=8)", "sae(width=16)", "sae(width=32)"]
    ev = sae.stat("sae(width=8)", "iid", "explained_variance")
    assert ev.n == 2 and ev.mean <= 1
    doc = render(runs, loaded, manifest=manifest, figures={})
    # Claim 13 correlates the two dictionaries of each width (SAE seeds 0 and 1), centred per width and seed.
    assert "In-distribution reconstruction quality predicts" in doc
    assert "`dyck-sae-resid-L1`, `dyck-sae-resid-L1-s1` (2 dictionaries per width, widths 8, 16, 32): rho `" in doc
    one = {"dyck-sae-resid-L1": sae}
    from illusions.reproduction.claims import CLAIMS as ALL

    verdict, text = judge(next(c for c in ALL if c.key == "sae_predicts"), one)
    assert verdict == "not run" and "several dictionaries per width" in text
    assert ("| split | explained variance | explained variance, first position pooled in | normalised MSE | "
            "normalised MSE, first position pooled in | MSE per token | L0 (active latents) | dead latents | "
            "latents new vs fit data |") in doc
    assert "iid explained var" in doc
    # Reused as they are: the spec a run records reads back equal.
    assert all(is_current(job) for job in jobs)


@pytest.fixture(scope="module")
def family_env(env, tmp_path_factory):
    """The env's assets plus a second family of the same task ('dyck-paperlike': seeds 0 and 1) and a
    checkpoint of another task's family that must not be picked up for Dyck recipes."""
    import shutil

    root, assets, recipes = env
    both = tmp_path_factory.mktemp("families") / "assets"
    shutil.copytree(assets, both)
    config = json.loads((assets / "dyck" / "config.json").read_text())
    from illusions.models import ModelConfig

    cfg = ModelConfig.from_dict(config["model"])
    meta = config["meta"]
    save_model(build_model(cfg, seed=5), both / "dyck-paperlike", meta=meta)
    (both / "dyck-paperlike" / "recipe.toml").write_text('description = "a paper-like family"\n')
    save_model(build_model(cfg, seed=6), both / "seeds" / "dyck-paperlike-seed1", meta=meta)
    save_model(build_model(cfg, seed=7), both / "other", meta={"task": {**meta["task"], "task": "code"}})
    # Step checkpoints of one training seed per family (as `train --save-every` writes them).
    for folder, seeds in (("dyck-paperlike-seed1", (8, 9, 10)), ("dyck-seed0", (11, 12, 13))):
        for step, seed in zip((10, 20, 30), seeds, strict=True):
            save_model(build_model(cfg, seed=seed), both / "checkpoints" / folder / f"step{step}", meta=meta)
    return root, both, recipes


def test_plan_runs_each_recipe_on_every_family_of_its_task(family_env, tmp_path):
    _, assets, recipes = family_env
    loaded = [r for r in load_recipes(recipes) if r.name == "dyck-svd-L1"]
    assert task_families("dyck", assets) == ["dyck", "dyck-paperlike"]
    jobs = plan(loaded, tmp_path, assets=assets)
    assert [j.key for j in jobs] == ["dyck-svd-L1/seed0", "dyck-svd-L1/seed1", "dyck-svd-L1/dyck-paperlike-seed0",
                                     "dyck-svd-L1/dyck-paperlike-seed1"]
    assert jobs[2].family == "dyck-paperlike" and jobs[2].spec.model == str(assets / "dyck-paperlike")
    assert jobs[3].out == tmp_path / "dyck-svd-L1" / "dyck-paperlike-seed1"
    only = plan(loaded, tmp_path, families=["dyck-paperlike"], seeds=[1], assets=assets)
    assert [j.key for j in only] == ["dyck-svd-L1/dyck-paperlike-seed1"]
    with pytest.raises(Exception, match="no bundled model family 'nope' for these recipes; families: dyck, "
                                        "dyck-paperlike"):
        plan(loaded, tmp_path, families=["nope"], assets=assets)


def test_another_family_is_judged_beside_the_reference(family_env, tmp_path):
    _, assets, recipes = family_env
    loaded = [r for r in load_recipes(recipes) if r.name == "dyck-svd-L1"]
    out = tmp_path / "runs"
    reference = plan(loaded, out, families=["dyck"], assets=assets)
    run_all(reference, out, report=False)
    jobs = plan(loaded, out, assets=assets)
    # A tree holding runs of both layouts is ours: a second invocation is not refused.
    check_outputs(jobs, out, tmp_path / "docs" / "RESULTS.md")
    manifest = run_all(jobs, out, report=False)
    (out / MANIFEST).rename(tmp_path / "manifest.json")  # recognised by its run folders alone
    check_outputs(jobs, out, tmp_path / "docs" / "RESULTS.md")
    (tmp_path / "manifest.json").rename(out / MANIFEST)
    assert bundled.family_description("dyck-paperlike", assets) == "a paper-like family"
    assert [e["reused"] for e in manifest["runs"].values()] == [True, True, False, False]
    assert manifest["runs"]["dyck-svd-L1/dyck-paperlike-seed0"]["family"] == "dyck-paperlike"
    ref = load_runs(loaded, out)
    other = load_runs(loaded, out, family="dyck-paperlike")
    assert ref["dyck-svd-L1"].seeds == other["dyck-svd-L1"].seeds == [0, 1]
    # The family's numbers are its own runs', not the reference's.
    with open(out / "dyck-svd-L1" / "dyck-paperlike-seed1" / "metrics.csv") as fh:
        value = next(float(r["value"]) for r in csv.DictReader(fh) if r["proxy"] == "svd(rank=1)"
                     and r["split"] == "iid" and r["metric"] == "agreement" and r["group_by"] == "all")
    assert other["dyck-svd-L1"].row(1, "svd(rank=1)", "iid", "agreement")["value"] == value
    assert ref["dyck-svd-L1"].stat("svd(rank=1)", "iid", "agreement").values != \
        other["dyck-svd-L1"].stat("svd(rank=1)", "iid", "agreement").values
    figures = write_figures(other, tmp_path / "docs" / "figures", relative_to=tmp_path / "docs",
                                stem_prefix="dyck-paperlike-")
    assert figures["sweep:dyck-svd-L1"] == "figures/dyck-paperlike-dyck-svd-L1.png"
    family = Family("dyck-paperlike", other, figures, "a paper-like family")
    doc = render(ref, loaded, manifest=manifest, figures={}, others=[family])
    header = ("| # | claim | reference models: what we measured | verdict | `dyck-paperlike`: what we measured "
              "| verdict |")
    assert header in doc
    claim1 = next(line for line in doc.splitlines() if line.startswith("| 1 |")).split(" | ")
    # One cell per header column: the reference's text and verdict, then the family's own.
    assert len(claim1) == header.count(" | ") + 1
    assert claim1[2] == judge(CLAIMS[0], ref)[1] and claim1[4] == judge(CLAIMS[0], other)[1]
    assert "## Recipe by recipe: the `dyck-paperlike` models" in doc and "(a paper-like family)" in doc
    assert "Claim 6 is about the paper's own models, so it is judged on `dyck-paperlike`" in doc
    assert "Original accuracy of the `dyck-paperlike` checkpoints" in doc
    assert "![dyck-svd-L1](figures/dyck-paperlike-dyck-svd-L1.png)" in doc
    # Computed in two invocations: the time line sums the runs' own times instead of claiming a whole run.
    assert "no single invocation computed every run" in doc and "the 4 runs took" in doc


OVER_TRAINING = ('name = "dyck-svd-L1-over-training"\ndescription = "svd over training"\nclaim = "c"\n'
                 'over_training = true\n[analysis]\ntask = "dyck"\nsimplifier = "svd"\nranks = [1]\nlayers = [1]\n'
                 'breakdowns = []\n' + COMMON)


def test_over_training_recipes_run_on_the_shipped_step_checkpoints_of_each_family(family_env, tmp_path):
    _, assets, _ = family_env
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "over.toml").write_text(OVER_TRAINING)
    loaded = load_recipes(recipes)
    assert loaded[0].over_training
    out = tmp_path / "runs"
    jobs = plan(loaded, out, assets=assets)
    assert [j.key for j in jobs] == ["dyck-svd-L1-over-training/seed0",
                                     "dyck-svd-L1-over-training/dyck-paperlike-seed1"]
    assert jobs[1].spec.checkpoints == str(assets / "checkpoints" / "dyck-paperlike-seed1")
    assert [j.key for j in plan(loaded, out, seeds=[1], assets=assets)] == [jobs[1].key]
    check_outputs(jobs, out, tmp_path / "R.md")
    manifest = run_all(jobs, out, report=False)
    assert (out / jobs[1].key / "checkpoints.csv").is_file() and (out / jobs[1].key / "step30").is_dir()
    # Finished analyses over checkpoints are recognised: reused, and the tree is ours (by its manifest,
    # and by its run folders alone).
    assert all(is_current(j) for j in jobs)
    check_outputs(jobs, out, tmp_path / "R.md")
    (out / MANIFEST).unlink()
    check_outputs(jobs, out, tmp_path / "R.md")
    reference = load_training(loaded, out)
    other = load_training(loaded, out, family="dyck-paperlike")
    assert reference["dyck-svd-L1-over-training"].seed == 0 and other["dyck-svd-L1-over-training"].seed == 1
    sweep = other["dyck-svd-L1-over-training"].sweep
    assert sweep.steps == [10, 20, 30] and sweep.proxies == ["svd(rank=1)"]
    with open(out / jobs[1].key / "checkpoints.csv") as fh:
        row = next(r for r in csv.DictReader(fh) if r["step"] == "20" and r["split"] == "unseen_depth"
                   and r["metric"] == "accuracy_change")
    assert sweep.value(20, "unseen_depth", "svd(rank=1)", "accuracy_change", "gap_vs_iid") == float(row["gap_vs_iid"])
    figures = write_training_figures(other, tmp_path / "figures", relative_to=tmp_path, stem_prefix="p-")
    assert figures == {"training:dyck-svd-L1-over-training": "figures/p-dyck-svd-L1-over-training.png"}
    doc = render({}, loaded, manifest=manifest, figures={}, training=reference,
                     others=[Family("dyck-paperlike", {}, figures, "", other)])
    claim = next(line for line in doc.splitlines() if "Over training: does an illusion" in line)
    assert claim.count("`dyck-svd-L1-over-training` (training seed") == 2
    assert "## Over training" in doc and "### `dyck-svd-L1-over-training` on `dyck-paperlike` (training seed 1)" in doc
    assert "![dyck-svd-L1-over-training](figures/p-dyck-svd-L1-over-training.png)" in doc


@pytest.mark.parametrize(("signs", "values", "course"), [
    ((0, 0, 0), (0.01, -0.01, 0.0), "never"),
    ((0, -1, -1), (0.0, -0.05, -0.1), "appears"),
    ((-1, 0, 0), (-0.1, -0.01, 0.0), "vanishes"),
    ((-1, 0, 1), (-0.1, 0.0, 0.1), "flips"),
    ((0, 1, 0), (0.0, 0.1, 0.0), "comes and goes"),
    ((-1, -1, -1), (-0.05, -0.1, -0.2), "persists, grows"),
    ((1, 1, 1), (0.2, 0.1, 0.05), "persists, shrinks"),
])
def test_training_course_names_how_an_illusion_changes(signs, values, course):
    states = [(step, v, s) for step, v, s in zip((1, 2, 3), values, signs, strict=True)]
    assert training_course(states) == course


@pytest.mark.parametrize(("extra", "message"), [
    ('over_training = "yes"\n', "over_training in .* must be true or false"),
    ('over_training = true\nmodel = "x"\n', "cannot also name a model or checkpoints"),
])
def test_over_training_recipe_errors(tmp_path, extra, message):
    from illusions.analyses.run import load_analysis_recipe
    from illusions.errors import IllusionsError

    head, analysis = extra.split("\n", 1)
    path = tmp_path / "r.toml"
    path.write_text(f'name = "r"\n{head}\n[analysis]\ntask = "dyck"\nsimplifier = "onehot"\n{analysis}')
    with pytest.raises(IllusionsError, match=message):
        load_analysis_recipe(path)


def test_export_checkpoints_ships_a_runs_step_checkpoints(env, tmp_path):
    from illusions.bundled import export_checkpoints, family_checkpoints
    from illusions.errors import IllusionsError
    from illusions.io import file_sha256, read_manifest
    from illusions.models import ModelConfig, load_model

    _, assets, _ = env
    config = json.loads((assets / "dyck" / "config.json").read_text())
    cfg = ModelConfig.from_dict(config["model"])
    run = tmp_path / "run"
    for step in (5, 10):
        save_model(build_model(cfg, seed=step), run / "checkpoints" / f"step{step}", meta=config["meta"])
    shipped = tmp_path / "assets"
    folder = export_checkpoints(run, "fam", 2, assets=shipped)
    assert folder == shipped / "checkpoints" / "fam-seed2"
    assert family_checkpoints("fam", shipped) == {2: folder} and family_checkpoints("dyck", shipped) == {}
    for step in (5, 10):
        manifest = read_manifest(folder / f"step{step}")
        assert manifest["kind"] == "model"
        assert manifest["files"]["model.safetensors"] == file_sha256(run / "checkpoints" / f"step{step}" / "model.safetensors")
        load_model(folder / f"step{step}")
    with pytest.raises(IllusionsError, match="holds no step checkpoints"):
        export_checkpoints(tmp_path / "empty", "fam", 3, assets=shipped)


def test_a_sweep_is_cut_to_what_each_models_width_allows(family_env, tmp_path):
    _, assets, _ = family_env
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "wide.toml").write_text('name = "wide"\ndescription = "d"\nclaim = "c"\n[analysis]\ntask = "dyck"\n'
                                       'simplifier = "svd"\nranks = [1, 16, 64]\nlayers = [1]\nbreakdowns = []\n'
                                       + COMMON)
    (recipes / "too-wide.toml").write_text('name = "too-wide"\ndescription = "d"\nclaim = "c"\n[analysis]\n'
                                           'task = "dyck"\nsimplifier = "resid-svd"\nranks = [64]\nlayers = [1]\n'
                                           'breakdowns = []\n' + COMMON)
    loaded = load_recipes(recipes)
    jobs = plan(loaded, tmp_path / "runs", families=["dyck-paperlike"], seeds=[0], assets=assets)
    # d_head 16 bounds the query/key ranks; d_model 32 leaves no rank of the residual-stream recipe.
    assert [(j.key, j.spec.ranks) for j in jobs] == [("wide/dyck-paperlike-seed0", (1, 16))]
    run_all(jobs, tmp_path / "runs", report=False)
    runs = load_runs(loaded, tmp_path / "runs", family="dyck-paperlike")
    doc = render({}, loaded, manifest={"runs": {}}, figures={}, others=[Family("dyck-paperlike", runs)])
    assert "The recipe's rank 64 exceed what these models allow (their width) and were left out." in doc


def test_a_failing_local_run_leaves_the_others_and_their_times_recorded(env, tmp_path):
    """One run that raises no longer takes the whole reproduction down: the others finish, the manifest
    keeps their times and names the missing run, and a rerun computes only that one."""
    from illusions.engines import JobsFailed

    _, assets, recipes = env
    loaded = [r for r in load_recipes(recipes) if r.name == "dyck-svd-L1"]
    out = tmp_path / "runs"
    good = plan(loaded, out, assets=assets)
    broken = Job(good[1].recipe, good[1].seed, good[1].spec.replace(model=str(tmp_path / "gone")), good[1].out)
    for workers in (1, 2):
        where = out / f"w{workers}"
        jobs = [Job(j.recipe, j.seed, j.spec, where / j.out.relative_to(out)) for j in (good[0], broken)]
        with pytest.raises(JobsFailed) as failed:
            run_all(jobs, where, report=False, workers=workers, threads=1)
        assert list(failed.value.missing) == [jobs[1].key] and "gone" in failed.value.missing[jobs[1].key]
        manifest = json.loads((where / MANIFEST).read_text())
        assert manifest["missing"] == failed.value.missing
        assert manifest["runs"][jobs[0].key]["seconds"] > 0 and is_current(jobs[0])
        assert not (where / jobs[1].key).exists()
    fixed = [jobs[0], Job(good[1].recipe, good[1].seed, good[1].spec, where / good[1].out.relative_to(out))]
    again = run_all(fixed, where, report=False)
    assert [e["reused"] for e in again["runs"].values()] == [True, False] and "missing" not in again
