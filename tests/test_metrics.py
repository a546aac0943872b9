from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from illusions.metrics import (
    Resampler,
    accuracy,
    agreement,
    cross_entropy_chunked,
    js_divergence,
    kl_and_cross_entropy_chunked,
    kl_divergence,
    kl_divergence_chunked,
)


def test_chunked_kl_is_the_whole_kl_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(37, 101, generator=gen) * 4
    q = torch.randn(37, 101, generator=gen) * 4
    whole = kl_divergence(p, q)
    for max_elements in (1, 101, 250, 101 * 37, 10**9):  # one row per chunk ... all rows at once
        assert torch.equal(kl_divergence_chunked(p, q, max_elements=max_elements), whole)
    assert kl_divergence_chunked(p[:0], q[:0]).shape == (0,)


def test_kl_and_cross_entropy_together_are_each_alone_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(37, 101, generator=gen) * 4
    q = torch.randn(37, 101, generator=gen) * 4
    target = torch.randint(0, 101, (37,), generator=gen).numpy()
    for max_elements in (1, 250, 10**9):
        kl, ce = kl_and_cross_entropy_chunked(p, q, target, max_elements=max_elements)
        assert torch.equal(kl, kl_divergence_chunked(p, q, max_elements=max_elements))
        assert torch.equal(ce, cross_entropy_chunked(q, target, max_elements=max_elements))
    kl, ce = kl_and_cross_entropy_chunked(p[:0], q[:0], target[:0])
    assert kl.shape == ce.shape == (0,) and kl.dtype == ce.dtype == torch.float64


def test_kl_against_hand_computed_value():
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.25, 0.75]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    torch.testing.assert_close(kl_divergence(p, q), torch.tensor([expected], dtype=torch.float64))
    torch.testing.assert_close(kl_divergence(p, p), torch.zeros(1, dtype=torch.float64))


def test_jsd_in_bits_bounds_and_hand_value():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0])
    assert js_divergence(a, b).item() == pytest.approx(1.0)  # disjoint supports: 1 bit
    assert js_divergence(a, a).item() == pytest.approx(0.0)
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([1.0, 0.0, 0.0])
    expected = 0.5 * (0.5 * np.log2(0.5 / 0.75) + 0.5 * np.log2(0.5 / 0.25)) + 0.5 * np.log2(1 / 0.75)
    assert js_divergence(p, q).item() == pytest.approx(expected)
    # symmetric
    assert js_divergence(q, p).item() == pytest.approx(expected)


def test_accuracy_and_agreement():
    assert accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 0])) == 0.5
    assert agreement(np.array([1, 2, 3]), np.array([1, 0, 3])) == pytest.approx(2 / 3)
    assert math.isnan(accuracy(np.array([]), np.array([])))


def test_bootstrap_point_is_position_weighted_mean_and_interval_brackets_it():
    rng = np.random.default_rng(0)
    seq = np.repeat(np.arange(50), 4)
    values = (rng.random(200) < 0.7).astype(float)
    sampler = Resampler.draw(50, np.random.default_rng(1), n_boot=500)
    est = sampler.estimate(values, seq)
    assert est.value == pytest.approx(values.mean())
    assert est.low < est.value < est.high
    assert (est.n, est.n_seqs) == (200, 50)


def test_bootstrap_over_sequences_is_wider_than_over_positions_when_sequences_cluster():
    # Each sequence is all-right or all-wrong: positions are not independent, and the interval over
    # sequences must reflect 20 effective samples, not 2000.
    seq = np.repeat(np.arange(20), 100)
    values = np.repeat((np.arange(20) % 2).astype(float), 100)
    est = Resampler.draw(20, np.random.default_rng(0), n_boot=1000).estimate(values, seq)
    naive_half_width = 1.96 * math.sqrt(0.25 / 2000)
    assert (est.high - est.low) / 2 > 5 * naive_half_width


def test_constant_values_give_degenerate_interval():
    est = Resampler.draw(10, np.random.default_rng(0), n_boot=100).estimate(np.ones(30), np.arange(30) % 10)
    assert (est.value, est.low, est.high) == (1.0, 1.0, 1.0)


def test_grouped_matches_one_estimate_per_group_and_metric():
    rng = np.random.default_rng(5)
    seq = np.sort(rng.integers(0, 30, size=300))
    values = rng.random((300, 2))
    values[rng.random(300) < 0.1, 1] = np.nan  # a NaN column stays confined to its own metric
    groups = rng.integers(0, 3, size=300)
    sampler = Resampler.draw(30, np.random.default_rng(9), n_boot=200)
    points, reps = sampler.grouped(values, seq, groups, 3)
    lo, hi = sampler.intervals(reps)
    for g in range(3):
        keep = groups == g
        est = sampler.estimate(values[keep, 0], seq[keep])
        assert points[g, 0] == pytest.approx(est.value)
        assert (lo[g, 0], hi[g, 0]) == pytest.approx((est.low, est.high))
        assert np.isnan(points[g, 1])
