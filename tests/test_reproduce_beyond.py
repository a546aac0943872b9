"""The two claims beyond the paper of issue 28 (warning signals, circuits) on tiny models: their recipes
run through `illusions reproduce`'s machinery, their judges read the runs, and RESULTS.md renders them."""

from __future__ import annotations

import pytest

from conftest import TINY_RECIPE_SETTINGS, tiny_reproduction
from illusions.reproduction.aggregate import RecipeRuns, load_runs
from illusions.reproduction.claims import CLAIMS, claim_number, judge
from illusions.reproduction.document import render
from illusions.reproduction.judges import judge_circuit, judge_warnings
from illusions.reproduction.plan import load_recipes, plan
from illusions.reproduction.run import run_all

COMMON = TINY_RECIPE_SETTINGS


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dyck):
    root = tmp_path_factory.mktemp("beyond")
    assets, recipes = tiny_reproduction(root, tiny_dyck)
    (recipes / "dyck-warnings-L1.toml").write_text(
        'name = "dyck-warnings-L1"\ndescription = "d"\nclaim = "c"\n[analysis]\ntask = "dyck"\n'
        'simplifier = "svd"\nranks = [2]\nlayers = [1]\n' + COMMON)
    (recipes / "dyck-circuit.toml").write_text(
        'name = "dyck-circuit"\ndescription = "d"\nclaim = "c"\n[analysis]\ntask = "dyck"\n'
        'simplifier = "circuit"\nfind_circuit = 0.95\n' + COMMON)
    loaded = load_recipes(recipes)
    manifest = run_all(plan(loaded, root / "runs", assets=assets), root / "runs", report=False)
    return load_runs(loaded, root / "runs"), loaded, manifest


def test_beyond_claims_are_judged_on_their_recipes_and_render(runs):
    found, loaded, manifest = runs
    warnings = next(c for c in CLAIMS if c.key == "warnings")
    circuit = next(c for c in CLAIMS if c.key == "circuit")
    assert warnings.beyond and circuit.beyond and CLAIMS[-2:] == (warnings, circuit)
    verdict, text = judge(warnings, found)
    assert verdict in ("reproduced", "partly", "not reproduced")
    assert "signals reach AUROC >= 0.8" in text and "offspace_q" in text and "offspace_k" in text
    verdict, text = judge(circuit, found)
    assert verdict in ("reproduced", "partly", "not reproduced", "not judged") and "`dyck-circuit`" in text
    # the pooled warning rows are no split of their own
    assert found["dyck-warnings-L1"].splits() == ["iid", "unseen_depth", "seen_struct"]
    doc = render(found, loaded, manifest=manifest, figures={})
    for claim in (warnings, circuit):
        row = next(line for line in doc.splitlines() if line.startswith(f"| {claim_number(claim.key)} |"))
        assert "*(beyond the paper)*" in row and any(
            v in row for v in ("**holds**", "**partly**", "**does not hold**", "**not judged**"))


def _rows(seed_values, metric, group_by, group, split):
    nan = float("nan")
    fields = ("ci_low", "ci_high", "gap_vs_ref", "gap_vs_ref_low", "gap_vs_ref_high", "gap_vs_matched",
              "gap_vs_matched_low", "gap_vs_matched_high", "matched_coverage")
    return {seed: [{**dict.fromkeys(fields, nan), "split": split, "proxy": "p", "simplifier": "svd", "param": "",
                    "param_value": "", "group_by": group_by, "group": group, "metric": metric, "value": v,
                    "n_positions": 10, "n_sequences": 5}] for seed, v in enumerate(seed_values)}


def _recipe_runs(rows):
    from illusions.analyses.run import AnalysisRecipe, AnalysisSpec

    return RecipeRuns(AnalysisRecipe("r", "d", "c", AnalysisSpec(), "r.toml"), rows)


@pytest.mark.parametrize("values, verdict", [
    ((0.9, 0.85), "reproduced"), ((0.9, 0.7), "not reproduced"), ((0.5, 0.5), "not reproduced")])
def test_warning_claim_asks_every_seed(values, verdict):
    rows = _rows(values, "warning_auroc", "warning_signal", "offspace_q", "overall")
    iid = _rows((1.0, 1.0), "agreement", "all", "all", "iid")
    merged = {s: iid[s] + rows[s] for s in rows}
    assert judge_warnings([_recipe_runs(merged)])[0] == verdict


def test_circuit_claim_fails_when_the_circuit_drops_in_every_seed_and_holds_when_it_does_not():
    def runs(gap, control=None, iid_values=(0.99, 0.98)):
        iid = _rows(iid_values, "agreement", "all", "all", "iid")
        ood = _rows(tuple(v + gap[0] for v in iid_values), "agreement", "all", "all", "unseen_depth")
        for seed in ood:
            ood[seed][0].update(gap_vs_matched=gap[0], gap_vs_matched_low=gap[1], gap_vs_matched_high=gap[2],
                                gap_vs_ref=gap[0], gap_vs_ref_low=gap[1], gap_vs_ref_high=gap[2])
            if control is not None:  # the recipe's strict matched control
                for row in (ood[seed][0], iid[seed][0]):
                    row.update(gap_vs_control=control[0], gap_vs_control_low=control[1],
                               gap_vs_control_high=control[2], control_coverage=0.8)
        return _recipe_runs({s: iid[s] + ood[s] for s in iid})

    assert judge_circuit([runs((-0.1, -0.15, -0.05))])[0] == "not reproduced"
    assert judge_circuit([runs((0.0, -0.02, 0.02))])[0] == "reproduced"
    # A drop must hold against the strict control too: gone there, the call is only partly.
    assert judge_circuit([runs((-0.1, -0.15, -0.05), control=(-0.01, -0.04, 0.02))])[0] == "partly"
    verdict, text = judge_circuit([runs((-0.1, -0.15, -0.05), control=(-0.08, -0.12, -0.03))])
    assert verdict == "not reproduced" and "drops in every seed against every control on: `unseen_depth`" in text
    assert "80% of positions matched" in text
    # The gate asks every seed, not the mean: 0.99 and 0.93 average 0.96 but fail it.
    verdict, text = judge_circuit([runs((0.0, -0.02, 0.02), iid_values=(0.99, 0.93))])
    assert verdict == "not reproduced" and "not faithful in distribution" in text
    # A search that could prune nothing leaves the model itself: no evidence either way.
    verdict, text = judge_circuit([runs((0.0, 0.0, 0.0), iid_values=(1.0, 1.0))])
    assert verdict == "not judged" and "the circuit is the whole model" in text
