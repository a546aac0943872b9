"""The matched in-distribution control over several meta columns (``match``, ``--match``): its rows,
coverage, CSV/JSON fields and checks, against a direct computation on the per-position records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from illusions.analyses.faithfulness import analyze
from illusions.analyses.run import rows_from_csv, rows_to_csv
from illusions.analyses.spec import AnalysisSpec
from illusions.analyses.summary import CONTROL_FIELDS, nice_edges, summarize, to_json
from illusions.errors import IllusionsError, InvalidOption
from test_analyses import FakeSimplifier, make_split

MATCH = ("length", "distance", "depth")


@pytest.fixture
def result(tiny_model, rng):
    splits = {name: make_split(name, rng, n=24) for name in ("train", "iid", "ood")}
    # Half of ood's sequences sit at distances iid never has: their strata have no iid positions.
    ood = splits["ood"].scored
    ood.meta["distance"] = ood.meta["distance"] + 40 * (ood.seq % 2)
    return analyze(tiny_model, splits, [FakeSimplifier(1.0), FakeSimplifier(0.3)], candidates=None, fit_n=4, seed=0)


def _index(rows):
    return {(r["proxy"], r["split"], r["group_by"], r["metric"]): r for r in rows}


def test_default_match_is_the_length_matched_control_alone(result):
    plain = summarize(result, n_boot=50)
    assert rows_to_csv(summarize(result, n_boot=50, match=("length",))) == rows_to_csv(plain)
    assert not any(f in plain[0] for f in CONTROL_FIELDS)


def test_control_adds_fields_and_leaves_every_other_field_alone(result):
    plain = summarize(result, n_boot=50)
    matched = summarize(result, n_boot=50, match=MATCH)
    assert len(plain) == len(matched)
    for a, b in zip(plain, matched, strict=True):
        assert set(b) == set(a) | set(CONTROL_FIELDS)
        assert rows_to_csv([a]) == rows_to_csv([{k: b[k] for k in a}])


def _direct(rec, ref, columns, edges):
    """Gap of ood vs iid re-weighted to ood's strata, over ood's covered positions only, and coverage."""
    def codes(r):
        return np.stack([np.digitize(r.meta[c], edges[c][1:-1]) if c in edges else r.meta[c] for c in columns], 1)

    own, base = codes(rec), codes(ref)
    keys = {tuple(k) for k in base}
    covered = np.array([tuple(k) in keys for k in own])
    value = rec.per_position()["agreement"]
    ref_value = ref.per_position()["agreement"]
    control = 0.0
    for key in {tuple(k) for k in own[covered]}:
        share = np.all(own[covered] == key, axis=1).mean()
        control += share * ref_value[np.all(base == key, axis=1)].mean()
    return value[covered].mean() - control, covered.mean()


def test_control_is_the_reweighted_reference_over_covered_strata(result):
    rows = _index(summarize(result, n_boot=50, match=MATCH))
    all_records = [r for r in result.records.values() if len(r)]
    edges = {c: nice_edges(max(r.meta[c].max() for r in all_records)) for c in ("length", "distance")}
    for j, label in enumerate(result.labels):
        row = rows[(label, "ood", "all", "agreement")]
        gap, coverage = _direct(result.records[("ood", j)], result.records[("iid", j)], MATCH, edges)
        assert 0.3 < coverage < 0.8  # the shifted half is left out
        assert row["control_coverage"] == pytest.approx(coverage)
        assert row["gap_vs_control"] == pytest.approx(gap)
        assert row["gap_vs_control_low"] <= row["gap_vs_control"] <= row["gap_vs_control_high"]
        # The length-matched control is unchanged beside it and covers every position here.
        assert row["matched_coverage"] == pytest.approx(1.0)
        iid = rows[(label, "iid", "all", "agreement")]
        assert all(math.isnan(iid[f]) for f in CONTROL_FIELDS)


def test_control_fields_round_trip_through_csv_and_json(result):
    rows = summarize(result, n_boot=50, match=MATCH)
    text = rows_to_csv(rows)
    assert text.splitlines()[0].endswith(",".join(CONTROL_FIELDS))
    back = rows_from_csv(text)
    assert rows_to_csv(back) == text
    doc = to_json(rows, task="toy", model="tiny", match=MATCH,
                  proxies=[{"label": p, "simplifier": "scale", "params": {}} for p in result.labels])
    gap = doc["splits"]["ood"]["gaps"]["agreement"]["vs_matched_iid"]
    row = _index(rows)[(result.labels[0], "ood", "all", "agreement")]
    assert gap["on"] == list(MATCH) and gap["value"] == pytest.approx(row["gap_vs_control"])
    assert gap["coverage"] == pytest.approx(row["control_coverage"])
    assert gap["excluded_share"] == pytest.approx(1 - row["control_coverage"])
    plain = to_json(summarize(result, n_boot=20), task="t", model="m",
                    proxies=[{"label": result.labels[0], "simplifier": "s", "params": {}}])
    assert "vs_matched_iid" not in plain["splits"]["ood"]["gaps"]["agreement"]


def test_a_column_the_positions_lack_is_refused(result):
    with pytest.raises(IllusionsError, match="cannot match on 'key_depth'.*have depth, distance, length"):
        summarize(result, n_boot=20, match=("length", "key_depth"))


@pytest.mark.parametrize(("match", "detail"), [
    ((), "needs at least one meta column"),
    (("length", "length"), "lists a column twice"),
    (("length", "colour"), "unknown column(s) colour"),
])
def test_spec_refuses_bad_match(match, detail):
    with pytest.raises(InvalidOption, match=detail.replace("(", r"\(").replace(")", r"\)")):
        AnalysisSpec(match=match)


def test_spec_records_match_only_when_not_the_default():
    assert "match" not in AnalysisSpec().to_dict()
    spec = AnalysisSpec(match=["length", "distance", "key_depth"])
    assert spec.match == ("length", "distance", "key_depth") and spec.to_dict()["match"] == list(spec.match)
    assert AnalysisSpec.from_dict(spec.to_dict()) == spec


def test_cli_refuses_an_unknown_match_column_in_one_line():
    from typer.testing import CliRunner

    from illusions.cli import app

    result = CliRunner().invoke(app, ["analyze", "dyck", "--match", "length,colour", "--threads", "1"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --match has unknown column(s) colour; known: key_depth, depth, distance, length, category"]


def test_table_and_report_show_the_control_beside_the_length_matched_one(result):
    from types import SimpleNamespace

    from rich.console import Console

    from illusions.cli.tables import print_summary
    from illusions.reports.html import summary_tables

    for match, present in ((MATCH, True), (("length",), False)):
        rows = summarize(result, n_boot=50, match=match)
        run = SimpleNamespace(rows=rows, spec=AnalysisSpec(match=("length", "distance", "depth") if present else
                                                          ("length",)),
                              model_source="tiny", model_description="toy", task=SimpleNamespace())
        console = Console(record=True, width=300)
        print_summary(run, console)
        text = " ".join(console.export_text().split())
        coverage = _index(rows)[(result.labels[0], "ood", "all", "agreement")].get("control_coverage")
        assert ("Δagree vs matched" in text or "Δ matched" in text) == present
        assert (f"coverage: {coverage:.1%} of ood" in text) if present else coverage is None
        page = summary_tables(rows, ["iid", "ood"], result.labels)
        assert ("Δagreement vs matched" in page) == present


def test_a_proxy_equal_to_the_model_has_gaps_of_exactly_0_that_no_interval_excludes(result):
    """FakeSimplifier(1.0) is the model itself: agreement is 1 at every position of every split, so its
    gaps are 0. The matched controls are weighted sums of strata (1 - 2.2e-16 in float), which left
    gaps of -2.2e-16 with zero-width intervals, marked significant."""
    rows = summarize(result, n_boot=50, match=MATCH)
    same = [r for r in rows if r["group_by"] == "all" and r["metric"] == "agreement" and r["split"] == "ood"
            and r["proxy"] == result.labels[0]]
    assert len(same) == 1
    row = same[0]
    for gap in ("gap_vs_ref", "gap_vs_matched", "gap_vs_control"):
        assert (row[gap], row[f"{gap}_low"], row[f"{gap}_high"]) == (0.0, 0.0, 0.0), gap


def test_an_estimate_from_one_sequence_has_no_interval(tiny_model, rng):
    """Resampling one sequence always gives it back: its zero-width interval would mark any gap
    significant, so a split (or group) with positions from one sequence gets none, nor do its gaps;
    with a one-sequence reference, no gap has one."""
    splits = {name: make_split(name, rng, n=n) for name, n in (("train", 24), ("iid", 24), ("ood", 1))}
    rows = summarize(analyze(tiny_model, splits, [FakeSimplifier(0.3)], candidates=None, fit_n=4, seed=0), n_boot=50)
    ood = [r for r in rows if r["split"] == "ood" and r["group_by"] == "all"]
    assert ood and all(r["n_sequences"] == 1 for r in ood)
    for r in ood:
        assert math.isfinite(r["value"]) and math.isfinite(r["gap_vs_ref"])
        assert all(math.isnan(r[k]) for k in ("ci_low", "ci_high", "gap_vs_ref_low", "gap_vs_ref_high")), r
    iid = [r for r in rows if r["split"] == "iid" and r["group_by"] == "all" and r["metric"] == "agreement"]
    assert iid[0]["n_sequences"] > 1 and iid[0]["ci_low"] < iid[0]["ci_high"]
    swapped = summarize(analyze(tiny_model, {"train": splits["train"], "iid": splits["ood"], "ood": splits["iid"]},
                                [FakeSimplifier(0.3)], candidates=None, fit_n=4, seed=0), n_boot=50)
    gaps = [r for r in swapped if r["split"] == "ood" and r["group_by"] == "all"]
    assert gaps and all(math.isnan(r["gap_vs_ref_low"]) and math.isnan(r["gap_vs_matched_low"]) for r in gaps)
