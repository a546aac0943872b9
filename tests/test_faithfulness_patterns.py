"""Attention JSD gathered inside the pattern hooks: the clean pass keeps only the scored query rows of
the simplified heads, and the JSD is the one the whole cached patterns gave."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import illusions.analyses.faithfulness as faithfulness
from illusions.analyses.faithfulness import evaluate_split
from illusions.metrics import js_divergence, js_divergence_chunked
from illusions.scoring import iter_batches
from illusions.simplifiers.base import Targets
from illusions.simplifiers.onehot import OneHot
from test_analyses import FakeProxy, make_split


def _old_jsd(model, split, proxy) -> np.ndarray:
    """The JSD as the evaluation computed it before: whole clean patterns cached, the proxy's whole
    pattern captured, rows gathered afterwards (one batch holding every row, as the test's call)."""
    (batch,) = list(iter_batches(split, len(split)))
    tokens = torch.as_tensor(batch.tokens)
    layers = sorted({layer for layer, _ in proxy.heads})
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    captured = {}

    def capture(layer):
        def hook(pattern, hook):
            captured[layer] = pattern
            return pattern

        return hook

    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
        model.run_with_hooks(tokens, fwd_hooks=[*proxy.fwd_hooks, *((f"blocks.{layer}.attn.hook_pattern",
                                                                     capture(layer)) for layer in layers)])
    seq, pos = torch.as_tensor(batch.scored.seq), torch.as_tensor(batch.scored.pos)
    per_head = [js_divergence(cache[f"blocks.{layer}.attn.hook_pattern"][seq, head, pos],
                              captured[layer][seq, head, pos]) for layer, head in proxy.heads]
    order = np.lexsort((batch.scored.pos, batch.rows[batch.scored.seq]))
    return torch.stack(per_head).mean(0).numpy()[order]


@pytest.fixture
def split(rng):
    return make_split("ood", rng, n=10)


def _onehot(model):
    return OneHot(targets=Targets(layers=(0, 1), heads=(1, 3))).fit(model, {})


@pytest.mark.parametrize("make", [lambda model: FakeProxy(0.3), _onehot], ids=["queries", "onehot"])
def test_jsd_from_gathered_rows_equals_the_whole_pattern_computation(tiny_model, split, make):
    proxy = make(tiny_model)
    (rec,) = evaluate_split(tiny_model, split, np.arange(len(split)), [proxy], candidates=None,
                            batch_size=len(split))
    order = np.lexsort((rec.pos, rec.rows))
    want = _old_jsd(tiny_model, split, proxy)
    assert np.nanmin(want) >= 0 and want.max() > 0.01  # the proxy does change attention
    np.testing.assert_array_equal(rec.attention_jsd[order], want)


def test_the_clean_pass_keeps_only_the_scored_rows_of_the_simplified_heads(tiny_model, split, monkeypatch):
    proxies = [FakeProxy(0.3), _onehot(tiny_model)]
    cached, gathered = [], []
    run_with_cache = tiny_model.run_with_cache
    gather_rows = faithfulness.gather_rows

    def record_cache(*args, **kwargs):
        out, cache = run_with_cache(*args, **kwargs)
        cached.extend(cache.keys())
        return out, cache

    def record_rows(pattern, head, seq, pos):
        rows = gather_rows(pattern, head, seq, pos)
        gathered.append((tuple(pattern.shape), tuple(rows.shape), head))
        return rows

    monkeypatch.setattr(tiny_model, "run_with_cache", record_cache)
    monkeypatch.setattr(faithfulness, "gather_rows", record_rows)
    evaluate_split(tiny_model, split, np.arange(len(split)), proxies, candidates=None, batch_size=4)
    assert cached and not [name for name in cached if "pattern" in name]  # only the residual is cached
    batches = list(iter_batches(split, 4, scored_only=True))  # the evaluation's batches
    n_heads = tiny_model.cfg.n_heads
    for batch in batches:
        width, n = batch.tokens.shape[1], len(batch.scored)
        mine = [g for g in gathered if g[0] == (len(batch.rows), n_heads, width, width)]
        assert mine and all(rows == (n, width) for _, rows, _ in mine)
    # Per batch: the clean pass gathers the union of the heads (L1: 0-3 and L0: 1, 3), each proxy its own.
    clean = len({(1, h) for h in range(4)} | {(0, 1), (0, 3)})
    assert len(gathered) == len(batches) * (clean + 4 + 4)


def test_chunked_jsd_is_bit_for_bit_the_whole_one(rng):
    p = torch.as_tensor(rng.dirichlet(np.ones(7), size=23))
    q = torch.as_tensor(rng.dirichlet(np.ones(7), size=23)).float()
    p[:, 5:] = 0.0  # masked keys, as causal attention has
    q[:4, 5:] = 0.0
    whole = js_divergence(p, q)
    for elements in (1, 7, 20, 70, 10**6):
        np.testing.assert_array_equal(js_divergence_chunked(p, q, max_elements=elements).numpy(), whole.numpy())
    assert js_divergence_chunked(p[:0], q[:0]).shape == (0,)
