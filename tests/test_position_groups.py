"""Named position groups (a task's subsets of a split's scored positions) beside the whole split:
rows, JSON, tables, report, RESULTS.md; and Dyck's own group, the closers of deep openers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from illusions.analyses.faithfulness import analyze
from illusions.analyses.spec import AnalysisSpec
from illusions.analyses.summary import POSITION_GROUP, summarize, to_json
from illusions.tasks.base import PositionGroup
from illusions.tasks.dyck import DyckConfig, DyckTask
from test_analyses import FakeSimplifier, make_split


def _csv(rows):
    """Rows as metrics.csv writes them (NaN cells compare equal there)."""
    from illusions.analyses.run import rows_to_csv

    return rows_to_csv(rows)


GROUPS = {"deep": PositionGroup("ood", "depth", lambda d: d == 2, "positions of depth 2")}


@pytest.fixture
def result(tiny_model, rng):
    splits = {name: make_split(name, rng, n=16) for name in ("train", "iid", "ood")}
    return analyze(tiny_model, splits, [FakeSimplifier(1.0), FakeSimplifier(0.0)], candidates=None, fit_n=4, seed=0)


def test_group_rows_are_added_and_every_other_row_stays_the_same(result):
    plain = summarize(result, n_boot=50)
    grouped = summarize(result, n_boot=50, position_groups=GROUPS)
    extra = [r for r in grouped if r["group_by"] == POSITION_GROUP]
    assert _csv([r for r in grouped if r["group_by"] != POSITION_GROUP]) == _csv(plain)
    # One row per metric and proxy, on the named split only.
    assert len(extra) == 2 * 6 and {r["split"] for r in extra} == {"ood"} and {r["group"] for r in extra} == {"deep"}


def test_group_values_are_the_metrics_on_the_groups_positions(result):
    rows = summarize(result, n_boot=50, position_groups=GROUPS)
    index = {(r["proxy"], r["split"], r["group_by"], r["metric"]): r for r in rows}
    for j, label in enumerate(result.labels):
        rec = result.records[("ood", j)]
        mask = rec.meta["depth"] == 2
        per = rec.per_position()
        for metric in ("original_accuracy", "proxy_accuracy", "agreement", "accuracy_change", "kl"):
            row = index[(label, "ood", POSITION_GROUP, metric)]
            assert row["value"] == pytest.approx(per[metric][mask].mean())
            assert row["n_positions"] == int(mask.sum())
            assert row["n_sequences"] == len(np.unique(rec.seq[mask]))
            assert row["ci_low"] <= row["value"] <= row["ci_high"]
            iid = index[(label, "iid", "all", metric)]
            assert row["gap_vs_ref"] == pytest.approx(row["value"] - iid["value"])


def test_empty_or_absent_groups_add_nothing(result):
    groups = {"none": PositionGroup("ood", "depth", lambda d: d > 99),
              "missing column": PositionGroup("ood", "key_depth", lambda d: d > 0),
              "other split": PositionGroup("unseen", "depth", lambda d: d >= 0)}
    assert _csv(summarize(result, n_boot=20, position_groups=groups)) == _csv(summarize(result, n_boot=20))


def test_json_lists_groups_beside_the_splits_not_among_breakdowns(result):
    rows = summarize(result, n_boot=50, position_groups=GROUPS)
    doc = to_json(rows, task="toy", model="tiny",
                  proxies=[{"label": p, "simplifier": "scale", "params": {}} for p in result.labels])
    entry = doc["groups"]["ood (deep)"]
    assert entry["split"] == "ood" and entry["group"] == "deep"
    mask = result.records[("ood", 0)].meta["depth"] == 2
    assert entry["n_positions"] == int(mask.sum()) > 0
    assert set(entry) >= {"agreement", "original_accuracy", "gaps"} and "vs_iid" in entry["gaps"]["agreement"]
    assert POSITION_GROUP not in doc["breakdowns"].get("ood", {})
    assert all("groups" in p for p in doc["proxies"])
    assert "groups" not in to_json(summarize(result, n_boot=20), task="t", model="m",
                                   proxies=[{"label": result.labels[0], "simplifier": "s", "params": {}}])


def test_summary_table_prints_the_group_under_its_split(result):
    from illusions.cli.tables import print_summary

    rows = summarize(result, n_boot=50, position_groups=GROUPS)
    run = SimpleNamespace(rows=rows, spec=AnalysisSpec(), model_source="tiny", model_description="toy",
                          task=SimpleNamespace())
    console = Console(record=True, width=250)
    print_summary(run, console)
    text = console.export_text()
    lines = [line for line in text.splitlines() if "│" in line]
    names = [line.split("│")[2].strip() for line in lines]
    assert names.index("ood (deep)") == names.index("ood") + 1
    assert "ood (deep): a named group of ood's positions" in " ".join(text.split())


def test_report_tables_hold_the_group_row(result):
    from illusions.reports.html import summary_tables

    rows = summarize(result, n_boot=50, position_groups=GROUPS)
    page = summary_tables(rows, ["iid", "ood"], result.labels)
    assert page.count("ood (deep)") == 2 * 2  # estimates and gaps, for each proxy


def test_dyck_declares_the_deep_opener_group_from_its_training_depth():
    task = DyckTask(DyckConfig(max_depth=7, ood_depth_min=8, ood_depth_max=9, max_len=40, short_max_brackets=12))
    groups = task.position_groups()
    assert list(groups) == ["opener > 7", "key_depth >= 7"]
    depths = {"key_depth": np.array([6, 7, 8, 9])}
    for group, want in zip(groups.values(), ([False, False, True, True], [False, True, True, True]),
                                   strict=True):
        assert group.split == "unseen_depth" and group.column == "key_depth"
        np.testing.assert_array_equal(group.mask(depths), want)
        assert "max_depth=7" in group.description


def test_results_report_the_deep_group_beside_the_whole_split():
    from illusions.analyses.run import AnalysisRecipe
    from illusions.reproduction.aggregate import RecipeRuns
    from illusions.reproduction.document import model_table
    from illusions.reproduction.judges import PAPER_DEPTH_FIGURE, judge_original

    def row(split, metric, value, group_by="all", group="all", n=100):
        return {"split": split, "proxy": "svd(rank=4)", "simplifier": "svd", "param": "rank", "param_value": 4,
                "group_by": group_by, "group": group, "metric": metric, "value": value, "ci_low": math.nan,
                "ci_high": math.nan, "n_positions": n, "n_sequences": 10, "gap_vs_ref": math.nan,
                "gap_vs_ref_low": math.nan, "gap_vs_ref_high": math.nan, "gap_vs_matched": math.nan,
                "gap_vs_matched_low": math.nan, "gap_vs_matched_high": math.nan, "matched_coverage": math.nan}

    rows = {seed: [row("iid", "original_accuracy", 0.99), row("iid", "agreement", 0.9),
                   row("unseen_depth", "original_accuracy", 0.97 - seed / 100),
                   row("unseen_depth", "agreement", 0.8, n=1000),
                   row("unseen_depth", "original_accuracy", 0.85 - seed / 100, POSITION_GROUP, "opener > 10", 80),
                   row("unseen_depth", "agreement", 0.5, POSITION_GROUP, "opener > 10", 80)] for seed in (0, 1)}
    recipe = AnalysisRecipe("dyck-svd-L1", "d", "c", AnalysisSpec(ranks=(4,)), "r.toml")
    runs = RecipeRuns(recipe, rows)
    verdict, text = judge_original(runs)
    assert verdict == "not reproduced"  # judged on the whole split, as before
    assert "original accuracy on unseen_depth 0.965" in text
    assert "on `unseen_depth (opener > 10)` (80 of 1000 positions) 0.845" in text
    assert PAPER_DEPTH_FIGURE in text
    table = "\n".join(model_table(runs))
    assert "| `unseen_depth (opener > 10)` | 0.850 | 0.840 |" in table
    assert table.index("`unseen_depth`") < table.index("`unseen_depth (opener > 10)`")
