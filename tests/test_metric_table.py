"""The metric table is the one list of metrics: the engine computes exactly its rows, in its order."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from illusions import metric_table as mt


def test_rows_are_complete_and_keys_unique():
    keys = [m.key for m in mt.METRICS]
    assert len(keys) == len(set(keys)) and set(mt.BY_KEY) == set(keys)
    for m in mt.METRICS:
        assert m.label and m.short and m.tiny and m.decimals >= 0
        assert m.better in ("higher", "lower", "zero", "")
        assert m.source in (mt.PREDICTIONS, mt.DISTRIBUTIONS, mt.DICTIONARY, mt.DOWNSTREAM, mt.WARNINGS)
        assert m.proxies in (mt.ALL, mt.ATTENTION, mt.DICTIONARIES, mt.SIGNALS)
        assert (m.source in (mt.DICTIONARY, mt.DOWNSTREAM)) == (m.proxies == mt.DICTIONARIES)
        assert (m.source == mt.WARNINGS) == (m.proxies == mt.SIGNALS)
        assert m.bounds[0] < m.bounds[1] and m.gap_bounds[0] < m.gap_bounds[1]
        # A gap between two values in [lo, hi] lies in [lo - hi, hi - lo].
        assert m.gap_bounds[0] <= m.bounds[0] - m.bounds[1] or math.isinf(m.gap_bounds[0])
    assert (set(mt.POSITION_METRICS) | set(mt.DICTIONARY_METRICS) | set(mt.DOWNSTREAM_METRICS)
            | set(mt.WARNING_METRICS) == set(keys))
    assert set(mt.SUMMARY_METRICS) <= set(mt.POSITION_METRICS) >= set(mt.OVER_TRAINING_METRICS)


def test_labels_headers_and_bounds():
    assert mt.metric("attention_jsd").header == "attn JSD (bits)"
    assert mt.metric("attention_jsd").axis_label == "attention JSD (bits)"
    assert mt.metric("explained_variance").axis_label == "explained variance (positions after the first)"
    assert mt.metric("explained_variance_pooled").axis_label == (
        "explained variance, first position pooled in (all positions)")
    assert mt.FIRST_SKIPPED_METRICS == ("explained_variance", "normalized_mse", "mse")
    assert mt.metric("agreement").axis_label == mt.metric("agreement").header == "agreement"
    assert mt.bounds("agreement") == (0.0, 1.0) and mt.bounds("agreement", "gap_vs_ref") == (-1.0, 1.0)
    assert mt.bounds("accuracy_change", "gap_vs_matched") == (-2.0, 2.0)
    assert mt.bounds("kl") == (0.0, math.inf) and mt.bounds("no_such_metric") == (-math.inf, math.inf)
    try:
        mt.metric("agreemnt")
    except KeyError as exc:
        assert "agreement" in str(exc)
    else:
        raise AssertionError("an unknown metric must raise")


def test_the_engine_computes_exactly_the_rows_of_the_table_in_order():
    from illusions.analyses.faithfulness import METRICS, Records
    from illusions.analyses.sparse import SPARSE_METRICS, SparseStats

    rec = Records(rows=np.arange(3), seq=np.arange(3), pos=np.zeros(3, np.int64), target=np.zeros(3, np.int64),
                  original_pred=np.zeros(3, np.int64), proxy_pred=np.ones(3, np.int64),
                  attention_jsd=np.zeros(3), kl=np.zeros(3), meta={})
    assert tuple(rec.per_position()) == METRICS == mt.POSITION_METRICS
    stats = SparseStats(n_tokens=np.array([2, 3]), err=np.ones(2), sq=np.full(2, 4.0), x_sum=np.ones((2, 2)),
                        l0=np.ones(2), active=np.ones((2, 5), bool), train_active=np.ones(5, bool),
                        err_first=np.zeros(2), sq_first=np.ones(2), x_first=np.zeros((2, 2)))
    assert tuple(stats.values(np.ones((1, 2)))) == SPARSE_METRICS == mt.DICTIONARY_METRICS
    from illusions.analyses.summary import _complete
    from illusions.analyses.warning_signals import warning_rows
    from illusions.metrics import Resampler

    signal = {"offspace_q": np.array([0.1, 0.9, 0.5])}
    rows = warning_rows({"proxy": "p"}, {"iid": dataclasses.replace(rec, warnings=signal)},
                        {"iid": Resampler.draw(3, np.random.default_rng(0), n_boot=20)}, {"offspace_q": 0.4}, _complete)
    assert tuple(r["metric"] for r in rows) == mt.WARNING_METRICS
    from illusions.analyses.sparse import (
        DOWNSTREAM_FIELDS,
        downstream_estimates,
        downstream_replicates,
    )

    down = {f: np.ones(3) for f in DOWNSTREAM_FIELDS}
    sampler = Resampler.draw(3, np.random.default_rng(0), n_boot=20)
    est = downstream_estimates(downstream_replicates(down, rec.kl, rec.seq, sampler), sampler)
    assert tuple(est) == mt.DOWNSTREAM_METRICS


def test_metric_table_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, illusions.metric_table; print(any(m in sys.modules for m in ('numpy', 'torch')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
