"""Downstream loss of sparse dictionary proxies as SAELens reports it: cross-entropy of the target with
the original model, the proxy and the replaced activation zero-ablated, loss recovered and KL score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from illusions.analyses.faithfulness import evaluate_split
from illusions.analyses.sparse import (
    DOWNSTREAM_FIELDS,
    ZeroAblation,
    dictionary_hooks,
    downstream_estimates,
    downstream_replicates,
)
from illusions.analyses.summary import overall, summarize
from illusions.metric_table import DOWNSTREAM_METRICS
from illusions.metrics import Resampler, cross_entropy_chunked
from illusions.scoring import iter_batches
from illusions.simplifiers.base import Proxy
from illusions.simplifiers.sae_hooks import SAEHook
from test_analyses import FakeProxy, make_split

HOOK = "blocks.1.hook_resid_pre"
D = 32  # the tiny model's d_model


def _dictionary(W_enc: torch.Tensor, W_dec: torch.Tensor, hook_name: str = HOOK) -> Proxy:
    width = W_enc.shape[1]
    hook = SAEHook(hook_name=hook_name, heads=None, architecture="standard", top_k=0, normalize="none",
                   subtract_b_dec=False, W_enc=W_enc, b_enc=torch.zeros(width), W_dec=W_dec,
                   b_dec=torch.zeros(W_dec.shape[1]), train_active=torch.ones(width, dtype=torch.bool))
    return Proxy("sae", {"width": width}, (hook,))


def identity_dictionary() -> Proxy:
    """relu(x) - relu(-x) = x: a dictionary whose output is its input, exactly."""
    eye = torch.eye(D)
    return _dictionary(torch.cat([eye, -eye], dim=1), torch.cat([eye, -eye], dim=0))


def zero_dictionary() -> Proxy:
    """A dictionary that outputs zeros: the zero ablation itself."""
    gen = torch.Generator().manual_seed(0)
    return _dictionary(torch.randn(D, 16, generator=gen), torch.zeros(16, D))


def random_dictionary() -> Proxy:
    gen = torch.Generator().manual_seed(1)
    return _dictionary(torch.randn(D, 16, generator=gen) / D**0.5, torch.randn(16, D, generator=gen) / 4)


@pytest.fixture
def split(rng):
    return make_split("ood", rng, n=12)


def _summary(model, split, proxies):
    import dataclasses

    from illusions.analyses.faithfulness import AnalysisResult

    rows = np.arange(len(split))
    records = evaluate_split(model, split, rows, proxies, candidates=None, batch_size=5)
    result = AnalysisResult(list(proxies), [f"p{j}" for j in range(len(proxies))], {split.name: rows},
                            {(split.name, j): rec for j, rec in enumerate(records)}, np.zeros(0, np.int64))
    assert all(dataclasses.is_dataclass(r) for r in records)
    out = {(r["proxy"], r["metric"]): r for r in overall(summarize(result, n_boot=50))}
    return records, out


def test_a_dictionary_equal_to_the_model_recovers_everything(tiny_model, split):
    records, rows = _summary(tiny_model, split, [identity_dictionary()])
    (rec,) = records
    np.testing.assert_allclose(rec.downstream["ce_proxy"], rec.downstream["ce_original"], rtol=0, atol=1e-9)
    # Zeros move the loss (on this untrained model they even lower it), so the score's denominator is not 0.
    assert abs(rec.downstream["ce_ablation"].mean() - rec.downstream["ce_original"].mean()) > 0.01
    assert rows[("p0", "loss_recovered")]["value"] == pytest.approx(1.0, abs=1e-9)
    assert rows[("p0", "kl_div_score")]["value"] == pytest.approx(1.0, abs=1e-9)


def test_a_dictionary_that_outputs_zeros_recovers_nothing(tiny_model, split):
    records, rows = _summary(tiny_model, split, [zero_dictionary()])
    (rec,) = records
    np.testing.assert_array_equal(rec.downstream["ce_proxy"], rec.downstream["ce_ablation"])
    np.testing.assert_array_equal(rec.kl, rec.downstream["kl_ablation"])
    assert rows[("p0", "loss_recovered")]["value"] == 0.0
    assert rows[("p0", "kl_div_score")]["value"] == 0.0


def test_per_position_losses_are_the_hand_computed_ones(tiny_model, split):
    proxy = random_dictionary()
    (rec,) = evaluate_split(tiny_model, split, np.arange(len(split)), [proxy], candidates=None, batch_size=len(split))
    (batch,) = list(iter_batches(split, len(split)))
    tokens = torch.as_tensor(batch.tokens)
    sc = batch.scored
    with torch.inference_mode():
        clean = tiny_model(tokens)[sc.seq, sc.pos].double()
        hooked = tiny_model.run_with_hooks(tokens, fwd_hooks=proxy.fwd_hooks)[sc.seq, sc.pos].double()
        zeroed = tiny_model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook: torch.zeros_like(a))])
        zeroed = zeroed[sc.seq, sc.pos].double()
    target = torch.as_tensor(sc.target)
    want = {"ce_original": torch.nn.functional.cross_entropy(clean, target, reduction="none"),
            "ce_proxy": torch.nn.functional.cross_entropy(hooked, target, reduction="none"),
            "ce_ablation": torch.nn.functional.cross_entropy(zeroed, target, reduction="none"),
            "kl_ablation": (clean.softmax(-1) * (clean.log_softmax(-1) - zeroed.log_softmax(-1))).sum(-1)}
    order = np.lexsort((rec.pos, rec.rows))
    ref = np.lexsort((sc.pos, batch.rows[sc.seq]))
    assert set(rec.downstream) == set(DOWNSTREAM_FIELDS)
    for field, value in want.items():
        np.testing.assert_allclose(rec.downstream[field][order], value.numpy()[ref], rtol=1e-5, atol=1e-6,
                                   err_msg=field)


def test_scores_are_ratios_of_means_as_saelens_computes_them():
    # Two sequences, three positions: means clean 1.0, proxy 1.5, ablation 3.0; KL proxy 0.2, ablation 0.8.
    down = {"ce_original": np.array([0.5, 1.0, 1.5]), "ce_proxy": np.array([1.0, 2.0, 1.5]),
            "ce_ablation": np.array([3.0, 2.0, 4.0]), "kl_ablation": np.array([0.6, 1.2, 0.6])}
    kl = np.array([0.1, 0.3, 0.2])
    seq = np.array([0, 0, 1])
    sampler = Resampler.draw(2, np.random.default_rng(0), n_boot=20)
    est = downstream_estimates(downstream_replicates(down, kl, seq, sampler), sampler)
    assert tuple(est) == DOWNSTREAM_METRICS
    assert est["ce_loss_original"][0] == pytest.approx(1.0)
    assert est["ce_loss_proxy"][0] == pytest.approx(1.5)
    assert est["ce_loss_ablation"][0] == pytest.approx(3.0)
    assert est["loss_recovered"][0] == pytest.approx((3.0 - 1.5) / (3.0 - 1.0))  # 0.75
    assert est["kl_ablation"][0] == pytest.approx(0.8)
    assert est["kl_div_score"][0] == pytest.approx((0.8 - 0.2) / 0.8)  # 0.75
    for value, low, high in est.values():
        assert low <= value + 1e-12 or np.isnan(low)
        assert np.isfinite(high)


def test_only_dictionary_proxies_get_downstream_rows(tiny_model, split):
    records, rows = _summary(tiny_model, split, [FakeProxy(0.5), random_dictionary()])
    assert records[0].downstream == {} and set(records[1].downstream) == set(DOWNSTREAM_FIELDS)
    assert not [m for (p, m) in rows if p == "p0" and m in DOWNSTREAM_METRICS]
    assert {m for (p, m) in rows if p == "p1" and m in DOWNSTREAM_METRICS} == set(DOWNSTREAM_METRICS)
    assert rows[("p1", "ce_loss_original")]["n_positions"] == len(split.scored)


def test_zero_ablation_of_chosen_heads_leaves_the_others():
    from illusions.analyses.sparse import ZeroHook

    z = torch.randn(2, 3, 4, 5)  # [batch, pos, head_index, d_head]
    out = ZeroHook("blocks.0.attn.hook_z", (1, 3))(z)
    assert (out[:, :, [1, 3]] == 0).all()
    torch.testing.assert_close(out[:, :, [0, 2]], z[:, :, [0, 2]])
    assert (ZeroHook("blocks.0.hook_resid_pre", None)(z) == 0).all()
    assert ZeroAblation.of(dictionary_hooks(FakeProxy(1.0))) is None


def test_chunked_cross_entropy_is_bit_for_bit_the_whole_one(rng):
    logits = torch.as_tensor(rng.normal(size=(9, 11))).float()
    target = rng.integers(0, 11, size=9)
    whole = cross_entropy_chunked(logits, target, max_elements=10**6)
    torch.testing.assert_close(whole, torch.nn.functional.cross_entropy(logits.double(), torch.as_tensor(target),
                                                                        reduction="none"))
    for elements in (1, 11, 30):
        np.testing.assert_array_equal(cross_entropy_chunked(logits, target, max_elements=elements).numpy(),
                                      whole.numpy())


def test_a_transcoder_is_scored_against_its_mlp_output_zeroed(tiny_dyck):
    from test_warning_signals import _mlp_transcoder, _relu_model

    model = _relu_model(tiny_dyck)
    split = tiny_dyck.task.splits()["iid"]
    exact = Proxy("transcoder", {"width": 64}, (_mlp_transcoder(model),))
    ablation = ZeroAblation.of(dictionary_hooks(exact))
    assert [name for name, _ in ablation.fwd_hooks] == ["blocks.1.hook_mlp_out"]
    zeroed = _mlp_transcoder(model, W_dec=torch.zeros_like(model.blocks[1].mlp.W_out),
                             b_dec=torch.zeros_like(model.blocks[1].mlp.b_out))
    dead = Proxy("transcoder", {"width": 64}, (zeroed,))
    records, rows = _summary(model, split, [exact, dead])
    assert rows[("p0", "loss_recovered")]["value"] == pytest.approx(1.0, abs=1e-4)
    assert rows[("p0", "kl_div_score")]["value"] == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_array_equal(records[1].downstream["ce_proxy"], records[1].downstream["ce_ablation"])
    assert rows[("p1", "loss_recovered")]["value"] == 0.0


def test_gap_to_the_reference_is_the_difference_with_an_interval_from_both_splits_replicates(rng):
    from illusions.analyses.sparse import downstream_gaps

    n_seqs, per_seq = 40, 5
    seq = np.repeat(np.arange(n_seqs), per_seq)
    clean = rng.uniform(0.5, 1.0, size=len(seq))
    down = {"ce_original": clean, "ce_proxy": clean + rng.uniform(0.0, 0.4, size=len(seq)),
            "ce_ablation": clean + rng.uniform(1.5, 2.5, size=len(seq)), "kl_ablation": rng.uniform(1, 2, len(seq))}
    kl = rng.uniform(0.0, 0.3, size=len(seq))
    ref_sampler, split_sampler = (Resampler.draw(n_seqs, np.random.default_rng(s), n_boot=200) for s in (1, 2))
    reference = downstream_replicates(down, kl, seq, ref_sampler)
    # The same positions resampled independently: no gap, and an interval that holds 0.
    same = downstream_gaps(downstream_replicates(down, kl, seq, split_sampler), reference, split_sampler)
    assert tuple(same) == DOWNSTREAM_METRICS
    for gap, low, high in same.values():
        assert gap == pytest.approx(0.0, abs=1e-12) and low < 0 < high
    # A proxy a whole nat worse (and its KL too): loss recovered and KL score fall, beyond noise.
    worse = dict(down, ce_proxy=down["ce_proxy"] + 1.0)
    split = downstream_replicates(worse, kl + 0.5, seq, split_sampler)
    gaps = downstream_gaps(split, reference, split_sampler)
    for key in ("loss_recovered", "kl_div_score"):
        gap, low, high = gaps[key]
        assert gap == pytest.approx(split[0][key] - reference[0][key])
        assert low <= gap <= high < 0
    assert gaps["ce_loss_original"][0] == pytest.approx(0.0, abs=1e-12)


def test_proxies_zeroing_the_same_activation_share_one_ablation_pass_per_batch(tiny_model, split, monkeypatch):
    from illusions.analyses import faithfulness

    other = "blocks.0.hook_resid_pre"
    gen = torch.Generator().manual_seed(2)
    elsewhere = _dictionary(torch.randn(D, 16, generator=gen), torch.randn(16, D, generator=gen) / 4, other)
    proxies = [random_dictionary(), identity_dictionary(), elsewhere, zero_dictionary()]
    rows = np.arange(len(split))
    alone = [evaluate_split(tiny_model, split, rows, [p], candidates=None, batch_size=5)[0] for p in proxies]
    passes = []
    run = faithfulness._proxy_logits

    def counting(model, tokens, cache, proxy, *args, **kwargs):
        if isinstance(proxy, ZeroAblation):
            passes.append(proxy.fwd_hooks[0][0])
        return run(model, tokens, cache, proxy, *args, **kwargs)

    monkeypatch.setattr(faithfulness, "_proxy_logits", counting)
    together = evaluate_split(tiny_model, split, rows, proxies, candidates=None, batch_size=5)
    n_batches = len(list(iter_batches(split, 5)))
    assert sorted(passes) == sorted([HOOK] * n_batches + [other] * n_batches)  # not one per proxy
    for one, rec in zip(alone, together, strict=True):
        assert list(rec.downstream) == list(one.downstream) == list(DOWNSTREAM_FIELDS)
        for field in DOWNSTREAM_FIELDS:
            np.testing.assert_array_equal(rec.downstream[field], one.downstream[field], err_msg=field)
