"""Unsupervised warning signals (illusions.analyses.warning_signals): invariances first, then the rows.

A full-rank projection leaves nothing outside its subspace, a one-hot pattern throws no mass away,
k-means with a centroid per point is on its centroid; a random signal ranks disagreements at chance
(0.5 inside its bootstrap interval), a perfect one at 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from illusions.analyses.faithfulness import analyze, evaluate_split, fit_proxies
from illusions.analyses.summary import _complete, summarize
from illusions.analyses.warning_signals import (
    POOLED,
    THRESHOLDS,
    WARNING_GROUP,
    SignalCollector,
    auroc,
    auroc_replicates,
    calibrate,
    warning_rows,
)
from illusions.backends import uses_bridge
from illusions.metric_table import WARNING_METRICS
from illusions.metrics import Resampler
from illusions.simplifiers.base import Targets
from illusions.simplifiers.kmeans import CentroidHook, cluster_spread
from illusions.simplifiers.onehot import OneHot, OneHotPatternHook, hard_attention
from illusions.simplifiers.svd import SVD


def _records(tiny_dyck, simplifier, split="iid", n=30):
    model, task = tiny_dyck.model, tiny_dyck.task
    splits = task.splits()
    rows = np.arange(min(n, len(splits["train"])))
    proxy = fit_proxies(model, splits["train"], rows, [simplifier])[0]
    return proxy, evaluate_split(model, splits[split], np.arange(n), [proxy], candidates=task.candidates)[0]


def test_full_rank_projection_leaves_no_energy_outside(tiny_dyck):
    proxy, rec = _records(tiny_dyck, SVD(rank=tiny_dyck.config.d_head))
    assert set(rec.warnings) == {"offspace_q", "offspace_k"}
    for values in rec.warnings.values():
        assert values.shape == (len(rec),) and np.abs(values).max() < 1e-3


def test_low_rank_projection_signal_is_a_share(tiny_dyck):
    _, rec = _records(tiny_dyck, SVD(rank=1))
    for values in rec.warnings.values():
        assert values.min() >= 0 and values.max() <= 1 + 1e-6 and values.max() > 0.05


def test_signal_is_the_off_subspace_share_of_each_head():
    from illusions.simplifiers.svd import ProjectionHook

    basis = torch.zeros(2, 3, 1)
    basis[:, 0, 0] = 1.0  # keep the first coordinate of each head
    proj = ProjectionHook("blocks.0.attn.hook_q", (0, 1), mean=torch.zeros(2, 3), basis=basis)
    x = torch.zeros(1, 2, 2, 3)
    x[0, 0, 0] = torch.tensor([3.0, 4.0, 0.0])  # head 0 keeps 3 of |(3,4,0)| = 5: share 4/5
    x[0, 1, 1] = torch.tensor([1.0, 0.0, 0.0])  # fully kept: 0
    out = proj.offspace(x)["offspace_q"]
    assert torch.allclose(out, torch.tensor([[0.8, 0.0]]))


def test_onehot_signal_is_zero_on_one_hot_rows_and_the_lost_mass_otherwise():
    pattern = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])  # [batch 1, heads 1, q 2, k 2]
    hook = OneHotPatternHook("blocks.0.attn.hook_pattern", (0,))
    assert torch.allclose(hook.offargmax(pattern)["offargmax_mass"], torch.tensor([[0.0, 0.25]]))
    assert hook.offargmax(hard_attention(pattern))["offargmax_mass"].abs().max() == 0


def test_kmeans_signal_is_zero_on_centroids_and_relative_to_the_spread():
    centroids = torch.tensor([[[0.0, 0.0], [10.0, 0.0]]])  # [heads 1, k 2, d 2]
    data = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [10.0, 2.0], [10.0, -2.0]])
    spread = cluster_spread(data, centroids[0])
    assert torch.allclose(spread, torch.tensor([1.0, 2.0]))
    hook = CentroidHook("blocks.0.attn.hook_k", (0,), centroids=centroids, spread=spread[None])
    x = torch.tensor([[[[0.0, 0.0]], [[10.0, 4.0]], [[3.0, 0.0]]]])  # [batch 1, pos 3, heads 1, d 2]
    assert torch.allclose(hook.distance(x)["centroid_distance_k"], torch.tensor([[0.0, 2.0, 3.0]]))


def test_auroc_of_random_perfect_and_tied_signals():
    rng = np.random.default_rng(0)
    n_seqs, per = 200, 10
    seq = np.repeat(np.arange(n_seqs), per)
    disagree = rng.random(seq.shape[0]) < 0.3
    sampler = Resampler.draw(n_seqs, np.random.default_rng(1), n_boot=300)
    noise = rng.random(seq.shape[0])
    low, high = sampler.interval(auroc_replicates(noise, disagree, seq, sampler))
    assert low <= 0.5 <= high and high - low < 0.1
    perfect = disagree.astype(float) + 0.1 * noise
    assert auroc(perfect, disagree) == 1.0
    assert np.all(auroc_replicates(perfect, disagree, seq, sampler) == 1.0)
    assert auroc(np.zeros(seq.shape[0]), disagree) == 0.5  # all tied: chance
    assert np.isnan(auroc(noise, np.zeros(seq.shape[0], bool)))  # one class only


def test_auroc_agrees_with_scikit_learn_and_its_unit_weight_replicate():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, 400).astype(float)  # many ties
    labels = rng.random(400) < scores / 8
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    ones = Resampler(np.ones((1, 40)))
    seq = np.repeat(np.arange(40), 10)
    assert auroc_replicates(scores, labels, seq, ones)[0] == pytest.approx(roc_auc_score(labels, scores))
    weights = rng.integers(0, 3, 400).astype(float)
    assert auroc(scores, labels, weights) == pytest.approx(roc_auc_score(labels, scores, sample_weight=weights))


def test_replicates_sum_over_runs_of_one_class_and_match_the_weighted_auroc_of_every_score():
    from illusions.analyses.warning_signals import _rank_groups

    rng = np.random.default_rng(5)
    n_seqs = 60
    seq = np.sort(rng.integers(0, n_seqs, 900))
    sampler = Resampler.draw(n_seqs, np.random.default_rng(2), n_boot=50)
    for scores in (rng.normal(size=900), rng.integers(0, 12, 900).astype(float)):  # continuous; many ties
        labels = rng.random(900) < 0.25 + 0.5 * (scores > np.median(scores))
        want = auroc(scores, labels, sampler.weights[:, seq])  # one group per distinct score
        np.testing.assert_allclose(auroc_replicates(scores, labels, seq, sampler), want, rtol=1e-12, atol=0)
    # runs: all negatives below all positives are two groups; a tie of both classes stays its own
    group, n = _rank_groups(np.array([1.0, 2.0, 3.0, 4.0, 4.0, 5.0, 6.0]),
                            np.array([False, False, False, True, False, True, True]))
    assert n == 3 and group.tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_collector_adds_hooks_that_change_nothing(tiny_dyck):
    model, task = tiny_dyck.model, tiny_dyck.task
    split = task.splits()["iid"]
    proxy = OneHot().fit(model)
    collector = SignalCollector(proxy)
    tokens = torch.as_tensor(split.tokens[:4])
    plain = model.run_with_hooks(tokens, fwd_hooks=list(proxy.fwd_hooks))
    watched = model.run_with_hooks(tokens, fwd_hooks=collector.hooks + list(proxy.fwd_hooks))
    assert torch.equal(plain, watched) and set(collector.values) == {"offargmax_mass"}
    assert not any(model.hook_dict[name]._forward_hooks for name in model.hook_dict)


def test_thresholds_are_the_fitting_quantile_and_rows_cover_every_split(tiny_dyck):
    model, task = tiny_dyck.model, tiny_dyck.task
    splits = task.splits()
    result = analyze(model, splits, [SVD(rank=2)], candidates=task.candidates, fit_n=40, max_seqs=20,
                     eval_splits=["iid", "unseen_depth"])
    thresholds = result.proxies[0].info[THRESHOLDS]
    assert set(thresholds) == {"offspace_q", "offspace_k"}
    # The same quantile recomputed from the fitting rows' scored positions.
    again = calibrate(model, splits["train"], result.fit_rows, result.proxies)[0].info[THRESHOLDS]
    assert again == thresholds
    rows = [r for r in summarize(result, n_boot=50) if r["group_by"] == WARNING_GROUP]
    assert {(r["split"], r["group"]) for r in rows} == {
        (s, g) for s in ("iid", "unseen_depth", POOLED) for g in ("offspace_q", "offspace_k")}
    assert {r["metric"] for r in rows} == set(WARNING_METRICS)
    pooled = next(r for r in rows if r["split"] == POOLED and r["metric"] == "warning_flagged_share")
    assert pooled["n_positions"] == sum(len(result.records[(s, 0)]) for s in ("iid", "unseen_depth"))


@pytest.mark.skipif(uses_bridge(), reason="counts calls by patching HookedTransformer's blocks' forward, which a "
                    "TransformerBridge's blocks do not have")
def test_calibration_stops_after_the_proxys_last_block(tiny_dyck, monkeypatch):
    import illusions.activations

    model, task = tiny_dyck.model, tiny_dyck.task
    splits = task.splits()
    rows = np.arange(30)
    proxy = fit_proxies(model, splits["train"], rows, [SVD(rank=2, targets=Targets(layers=(0,)))])[0]
    ran: list[str] = []
    monkeypatch.setattr(model.unembed, "forward", lambda x: ran.append("unembed") or x)
    monkeypatch.setattr(model.blocks[1], "forward", lambda x, **kw: ran.append("block 1") or x)
    stopped = calibrate(model, splits["train"], rows, [proxy])[0].info[THRESHOLDS]
    assert ran == []  # neither the later block nor the unembedding ran
    monkeypatch.undo()
    monkeypatch.setattr(illusions.activations, "stop_layer", lambda model, names: None)  # the whole model
    assert calibrate(model, splits["train"], rows, [proxy])[0].info[THRESHOLDS] == stopped


def test_no_rows_for_a_proxy_without_signals():
    from illusions.analyses.faithfulness import Records

    empty = np.zeros(3, np.int64)
    rec = Records(np.arange(3), np.arange(3), empty, empty, empty, empty, np.zeros(3), np.zeros(3), {})
    assert warning_rows({}, {"iid": rec}, {"iid": Resampler.draw(3, np.random.default_rng(0))}, {}, _complete) == []


# --- the transcoder's signals ------------------------------------------------------------------------

def _relu_model(tiny_dyck):
    import dataclasses

    from illusions.models import build_model

    return build_model(dataclasses.replace(tiny_dyck.config, act_fn="relu"), seed=1)


def _mlp_transcoder(model, layer=1, **change):
    """Layer ``layer``'s ReLU MLP as a standard transcoder (W_enc = W_in, W_dec = W_out): it reproduces
    the MLP exactly; ``change`` replaces fields (e.g. ``train_active``, ``W_dec``)."""
    from illusions.simplifiers.sae_hooks import TranscoderHook

    mlp = model.blocks[layer].mlp
    fields = {"hook_name": f"blocks.{layer}.hook_mlp_out", "heads": None,
              "input_name": f"blocks.{layer}.ln2.hook_normalized", "architecture": "standard", "top_k": 0,
              "normalize": "none", "subtract_b_dec": False, "W_enc": mlp.W_in.detach(), "b_enc": mlp.b_in.detach(),
              "W_dec": mlp.W_out.detach(), "b_dec": mlp.b_out.detach(),
              "train_active": torch.ones(mlp.W_in.shape[1], dtype=torch.bool)}
    return TranscoderHook(**{**fields, **change})


def _transcoder_signals(model, hook, tokens):
    from illusions.simplifiers.base import Proxy

    proxy = Proxy("transcoder", {"width": hook.d_sae}, (hook,))
    collector = SignalCollector(proxy)
    watched = model.run_with_hooks(tokens, fwd_hooks=collector.hooks + proxy.fwd_hooks)
    assert torch.equal(watched, model.run_with_hooks(tokens, fwd_hooks=proxy.fwd_hooks))
    return collector.values


def test_a_transcoder_that_reproduces_the_mlp_has_no_error_and_no_new_latent(tiny_dyck):
    model = _relu_model(tiny_dyck)
    tokens = torch.as_tensor(tiny_dyck.task.splits()["iid"].tokens[:6])
    values = _transcoder_signals(model, _mlp_transcoder(model), tokens)
    assert set(values) == {"recon_error", "new_latents"}
    assert values["recon_error"].shape == tokens.shape and values["recon_error"].abs().max() < 1e-5
    assert values["new_latents"].abs().max() == 0


def test_transcoder_error_is_the_missed_share_of_the_mlp_output_and_unseen_latents_flag(tiny_dyck):
    model = _relu_model(tiny_dyck)
    tokens = torch.as_tensor(tiny_dyck.task.splits()["iid"].tokens[:6])
    mlp = model.blocks[1].mlp
    never = torch.zeros(mlp.W_in.shape[1], dtype=torch.bool)
    never[::3] = True  # these latents "never fired on the fitting data"
    hook = _mlp_transcoder(model, train_active=~never, W_dec=0.5 * mlp.W_out.detach())
    values = _transcoder_signals(model, hook, tokens)
    # By hand from the clean activations: codes = relu(x W_in + b_in), T(x) = codes (W_out / 2) + b_out.
    _, cache = model.run_with_cache(tokens)
    x, y = cache["blocks.1.ln2.hook_normalized"], cache["blocks.1.hook_mlp_out"]
    codes = (x @ mlp.W_in + mlp.b_in).relu()
    missed = (y - (codes @ (0.5 * mlp.W_out) + mlp.b_out)).norm(dim=-1) / y.norm(dim=-1)
    torch.testing.assert_close(values["recon_error"], missed, atol=1e-5, rtol=1e-4)
    assert values["recon_error"].min() > 0.01
    unseen = codes[..., never].sum(-1)
    torch.testing.assert_close(values["new_latents"], unseen, atol=1e-5, rtol=1e-4)
    assert (unseen > 0).any()


def test_transcoder_signals_reach_the_table_csv_and_json(tiny_dyck):
    from illusions.analyses.run import rows_to_csv
    from illusions.analyses.summary import to_json
    from illusions.simplifiers.base import Proxy

    model, task = _relu_model(tiny_dyck), tiny_dyck.task
    mlp = model.blocks[1].mlp
    hook = _mlp_transcoder(model, train_active=torch.arange(mlp.W_in.shape[1]) % 2 == 0,
                           W_dec=0.3 * mlp.W_out.detach())
    proxy = Proxy("transcoder", {"width": hook.d_sae}, (hook,))
    result = analyze(model, task.splits(), [proxy], candidates=task.candidates, fit_n=30, max_seqs=15,
                     eval_splits=["iid", "unseen_depth"])
    assert set(result.proxies[0].info[THRESHOLDS]) == {"recon_error", "new_latents"}
    rows = [r for r in summarize(result, n_boot=30) if r["group_by"] == WARNING_GROUP]
    assert {(r["split"], r["group"], r["metric"]) for r in rows} == {
        (s, g, m) for s in ("iid", "unseen_depth", POOLED) for g in ("recon_error", "new_latents")
        for m in WARNING_METRICS}
    csv = rows_to_csv(rows)
    assert csv.count(",recon_error,") == csv.count(",new_latents,") == 3 * len(WARNING_METRICS)
    doc = to_json(rows, task="dyck", model="tiny", proxies=[{"label": result.labels[0], "simplifier": "transcoder",
                                                            "params": proxy.params}])
    assert set(doc["warnings"]["unseen_depth"]) == {"recon_error", "new_latents"}
