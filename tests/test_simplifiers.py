"""Simplifiers as hook functions: invariances first, then golden values on hand-built data."""

from __future__ import annotations

import pytest
import torch

from illusions.activations import collect, mask_from_lengths
from illusions.analyses.faithfulness import hook_names_of, start_layer
from illusions.simplifiers import (
    SVD,
    KMeans,
    OneHot,
    Proxy,
    ResidKMeans,
    ResidSVD,
    Targets,
    WeightSVD,
    fit_proxy,
)
from illusions.simplifiers.kmeans import CentroidHook, fit_centroids
from illusions.simplifiers.onehot import OneHotPatternHook, hard_attention
from illusions.simplifiers.svd import ProjectionHook, pca

LENGTHS = torch.tensor([16, 10, 12, 5, 16, 8])
EXACT = {"atol": 1e-5, "rtol": 0.0}  # "logits equal within 1e-5"

# One of each method, small enough to fit in milliseconds on the tiny model.
EACH = [
    SVD(rank=3),
    SVD(rank=2, basis="joint", centered=False, targets=Targets(layers=(0,), heads=(1, 3), qk="k")),
    KMeans(k=5, seed=0),
    OneHot(targets=Targets(heads=(0, 2))),
    ResidSVD(rank=6, targets=Targets(resid="resid_mid")),
    ResidKMeans(k=4, targets=Targets(layers=(0,), resid="resid_post")),
    WeightSVD(rank=2, targets=Targets(layers="all", qk="q")),
]
IDS = [f"{s.name}-{i}" for i, s in enumerate(EACH)]


def _no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp._forward_hooks for hp in model.hook_dict.values())


def _fit(model, tokens, simplifier) -> Proxy:
    return fit_proxy(model, simplifier, tokens, LENGTHS)


# ---------------------------------------------------------------- invariances


def test_no_hook_gives_identical_logits_and_upstream_is_untouched(tiny_model, tiny_tokens):
    clean = tiny_model(tiny_tokens)
    assert torch.equal(tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=[]), clean)
    proxy = _fit(tiny_model, tiny_tokens, SVD(rank=1))  # acts in layer 1 only
    _, clean_cache = tiny_model.run_with_cache(tiny_tokens)
    with tiny_model.hooks(fwd_hooks=proxy.fwd_hooks):
        _, cache = tiny_model.run_with_cache(tiny_tokens)
    assert torch.equal(cache["blocks.1.hook_resid_pre"], clean_cache["blocks.1.hook_resid_pre"])
    assert torch.equal(cache["blocks.1.attn.hook_v"], clean_cache["blocks.1.attn.hook_v"])
    assert not torch.allclose(cache["blocks.1.attn.hook_q"], clean_cache["blocks.1.attn.hook_q"])


@pytest.mark.parametrize(
    "simplifier",
    [
        SVD(rank=8),
        SVD(rank=8, basis="joint"),
        SVD(rank=8, centered=False, targets=Targets(layers="all")),
        SVD(rank=8, targets=Targets(layers=(0,), heads=(2,), qk="q")),
        ResidSVD(rank=32, targets=Targets(layers="all", resid="resid_pre")),
        ResidSVD(rank=32, targets=Targets(resid="resid_mid")),
        ResidSVD(rank=32, targets=Targets(layers=(0,), resid="resid_post")),
        WeightSVD(rank=8, targets=Targets(layers="all")),
        WeightSVD(rank=8, targets=Targets(qk="k")),
    ],
    ids=lambda s: f"{s.name}",
)
def test_full_rank_is_the_identity(tiny_model, tiny_tokens, simplifier):
    clean = tiny_model(tiny_tokens)
    proxy = _fit(tiny_model, tiny_tokens, simplifier)
    torch.testing.assert_close(tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=proxy.fwd_hooks), clean, **EXACT)


def test_lower_rank_changes_the_logits(tiny_model, tiny_tokens):
    clean = tiny_model(tiny_tokens)
    for simplifier in (SVD(rank=1), ResidSVD(rank=2), WeightSVD(rank=1)):
        proxy = _fit(tiny_model, tiny_tokens, simplifier)
        out = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=proxy.fwd_hooks)
        assert (out - clean).abs().max() > 1e-3, simplifier


@pytest.mark.parametrize("simplifier", EACH, ids=IDS)
def test_every_hook_is_idempotent(tiny_model, tiny_tokens, simplifier):
    """Projections, centroid maps and hard attention: applying twice is applying once."""
    proxy = _fit(tiny_model, tiny_tokens, simplifier)
    once = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=proxy.fwd_hooks)
    doubled = [pair for pair in proxy.fwd_hooks for _ in range(2)]
    twice = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=doubled)
    torch.testing.assert_close(twice, once, atol=1e-5, rtol=1e-5)
    assert _no_hooks_left(tiny_model)


def test_projection_hook_is_idempotent_on_collected_vectors(tiny_model, tiny_tokens):
    proxy = _fit(tiny_model, tiny_tokens, SVD(rank=3, targets=Targets(heads=(0, 3))))
    _, cache = tiny_model.run_with_cache(tiny_tokens)
    hook = proxy.hooks[0]
    x = cache[hook.hook_name]
    once = hook(x)
    torch.testing.assert_close(hook(once), once)
    assert torch.equal(once[:, :, [1, 2]], x[:, :, [1, 2]])  # untargeted heads pass through bit for bit
    assert not torch.allclose(once[:, :, 0], x[:, :, 0])


def test_kmeans_with_as_many_clusters_as_distinct_points_is_exact(tiny_model, tiny_tokens):
    # Layer-0 queries depend only on (token, position): few distinct vectors, known exactly.
    name = "blocks.0.attn.hook_q"
    acts = collect(tiny_model, tiny_tokens, [name], LENGTHS)[name]
    distinct = {torch.unique(acts[:, h], dim=0).shape[0] for h in range(acts.shape[1])}
    assert len(distinct) == 1
    k = distinct.pop()
    clean = tiny_model(tiny_tokens)
    proxy = _fit(tiny_model, tiny_tokens, KMeans(k=k, targets=Targets(layers=(0,), qk="q")))
    out = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=proxy.fwd_hooks)
    mask = mask_from_lengths(LENGTHS, tiny_tokens.shape[1])
    torch.testing.assert_close(out[mask], clean[mask], **EXACT)
    fewer = _fit(tiny_model, tiny_tokens, KMeans(k=k // 2, targets=Targets(layers=(0,), qk="q")))
    out = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=fewer.fwd_hooks)
    assert (out[mask] - clean[mask]).abs().max() > 1e-3


def test_resid_kmeans_is_exact_on_the_embedding(tiny_model, tiny_tokens):
    name = "blocks.0.hook_resid_pre"
    acts = collect(tiny_model, tiny_tokens, [name], LENGTHS)[name]
    k = torch.unique(acts, dim=0).shape[0]
    proxy = _fit(tiny_model, tiny_tokens, ResidKMeans(k=k, targets=Targets(layers=(0,))))
    out = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=proxy.fwd_hooks)
    mask = mask_from_lengths(LENGTHS, tiny_tokens.shape[1])
    torch.testing.assert_close(out[mask], tiny_model(tiny_tokens)[mask], **EXACT)


def test_onehot_pattern_is_hard_on_the_top_key_and_fixed_on_one_hot_input(tiny_model, tiny_tokens):
    proxy = OneHot(targets=Targets(heads=(0, 2))).fit(tiny_model, {})
    assert proxy.fwd_hooks[0][0] == "blocks.1.attn.hook_pattern"
    _, clean = tiny_model.run_with_cache(tiny_tokens, names_filter="blocks.1.attn.hook_pattern")
    with tiny_model.hooks(fwd_hooks=proxy.fwd_hooks):
        _, cache = tiny_model.run_with_cache(tiny_tokens, names_filter="blocks.1.attn.hook_pattern")
    soft, hard = clean["blocks.1.attn.hook_pattern"], cache["blocks.1.attn.hook_pattern"]
    expected = torch.nn.functional.one_hot(soft[:, [0, 2]].argmax(-1), soft.shape[-1]).float()
    assert torch.equal(hard[:, [0, 2]], expected)
    assert torch.equal(hard[:, [1, 3]], soft[:, [1, 3]])
    # causal: the chosen key never lies in the future
    assert torch.equal(hard.triu(diagonal=1), torch.zeros_like(hard))
    assert torch.equal(proxy.hooks[0](hard), hard)


def test_weight_svd_scores_equal_the_explicit_rank_r_form(tiny_model, tiny_tokens, torch_gen):
    layer, heads, rank = 1, (0, 2), 2
    attn = tiny_model.blocks[layer].attn
    with torch.no_grad():  # TransformerLens initialises biases to zero; trained ones are not
        if hasattr(attn, "q"):  # a TransformerBridge: b_Q/b_K are per-head copies of q.bias/k.bias
            attn.q.bias.normal_(generator=torch_gen)
            attn.k.bias.normal_(generator=torch_gen)
        else:
            attn.b_Q.normal_(generator=torch_gen)
            attn.b_K.normal_(generator=torch_gen)
    names = [f"blocks.{layer}.ln1.hook_normalized", f"blocks.{layer}.attn.hook_attn_scores"]

    def run_with_scores() -> dict[str, torch.Tensor]:
        if not hasattr(attn, "q"):
            return tiny_model.run_with_cache(tiny_tokens, names_filter=names)[1]
        # TransformerLens 4.3's native bridge fires hook_attn_scores with the pattern, so the scores
        # are worked out from the queries and keys the (hooked) model computed.
        qk_names = [f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"]
        _, got = tiny_model.run_with_cache(tiny_tokens, names_filter=[names[0], *qk_names])
        scores = torch.einsum("bqhd,bkhd->bhqk", got[qk_names[0]], got[qk_names[1]]) / tiny_model.cfg.d_head**0.5
        return {names[0]: got[names[0]], names[1]: scores}

    clean = run_with_scores()
    x = clean[names[0]]  # [batch pos d_model], the attention input
    x1 = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1).double()  # [batch pos d_model+1]
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    scale = getattr(attn, "attn_scale", None) or tiny_model.cfg.d_head**0.5  # a TransformerBridge has no attn_scale
    for qk in ("q", "k", "qk"):
        proxy = WeightSVD(rank=rank, targets=Targets(layers=(layer,), heads=heads, qk=qk)).fit(tiny_model)
        with tiny_model.hooks(fwd_hooks=proxy.fwd_hooks):
            cache = run_with_scores()
        scores = cache[names[1]]
        for h in range(tiny_model.cfg.n_heads):
            if h not in heads:
                assert torch.equal(scores[:, h], clean[names[1]][:, h])
                continue
            w_q = torch.cat([attn.W_Q[h], attn.b_Q[h][None]]).double()
            w_k = torch.cat([attn.W_K[h], attn.b_K[h][None]]).double()
            u, s, vh = torch.linalg.svd(w_q @ w_k.T)  # the (d_model+1)^2 bilinear form
            form = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
            explicit = x1 @ form @ x1.transpose(1, 2) / scale  # [batch pos pos]
            torch.testing.assert_close(scores[:, h][:, causal], explicit[:, causal].float(), atol=1e-4, rtol=1e-4)
            full = x1 @ w_q @ w_k.T @ x1.transpose(1, 2) / scale
            assert (full - explicit)[:, causal].abs().max() > 1e-2  # the truncation did something


@pytest.mark.parametrize("simplifier", EACH, ids=IDS)
def test_save_load_round_trip_gives_identical_logits(tiny_model, tiny_tokens, simplifier, tmp_path):
    proxy = _fit(tiny_model, tiny_tokens, simplifier)
    proxy.save(tmp_path / "proxy")
    loaded = Proxy.load(tmp_path / "proxy")
    assert loaded.simplifier == proxy.simplifier and loaded.params == proxy.params
    assert loaded.heads == proxy.heads
    assert start_layer(tiny_model, hook_names_of(loaded)) == start_layer(tiny_model, hook_names_of(proxy))
    assert loaded.info == proxy.info
    assert [repr(h) for h in loaded.hooks] == [repr(h) for h in proxy.hooks]
    a = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=proxy.fwd_hooks)
    b = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=loaded.fwd_hooks)
    assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "proxy").iterdir()) == ["manifest.json", "proxy.json",
                                                                      "proxy.safetensors"]


@pytest.mark.parametrize("simplifier", EACH, ids=IDS)
def test_no_hook_is_left_behind_and_reprs_are_short(tiny_model, tiny_tokens, simplifier):
    clean = tiny_model(tiny_tokens)
    proxy = _fit(tiny_model, tiny_tokens, simplifier)
    tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=proxy.fwd_hooks)
    assert _no_hooks_left(tiny_model)
    assert torch.equal(tiny_model(tiny_tokens), clean)
    assert proxy.hooks
    for hook in proxy.hooks:
        text = repr(hook)
        assert len(text) < 120 and "tensor" not in text, text
        assert hook.hook_name in tiny_model.hook_dict


@pytest.mark.parametrize("simplifier", EACH, ids=IDS)
def test_start_at_layer_on_the_clean_residual_matches_the_full_run(tiny_model, tiny_tokens, simplifier):
    proxy = _fit(tiny_model, tiny_tokens, simplifier)
    start = start_layer(tiny_model, hook_names_of(proxy))
    assert start is not None
    full = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=proxy.fwd_hooks)
    _, cache = tiny_model.run_with_cache(tiny_tokens, names_filter=f"blocks.{start}.hook_resid_pre")
    resid = cache[f"blocks.{start}.hook_resid_pre"]
    partial = tiny_model.run_with_hooks(resid, start_at_layer=start, fwd_hooks=proxy.fwd_hooks)
    torch.testing.assert_close(partial, full)


def test_heads_and_start_layer(tiny_model, tiny_tokens):
    assert _fit(tiny_model, tiny_tokens, EACH[1]).heads == [(0, 1), (0, 3)]
    assert start_layer(tiny_model, hook_names_of(_fit(tiny_model, tiny_tokens, EACH[1]))) == 0
    assert _fit(tiny_model, tiny_tokens, EACH[3]).heads == [(1, 0), (1, 2)]
    every = [(1, h) for h in range(4)]
    assert _fit(tiny_model, tiny_tokens, ResidSVD(rank=2)).heads == every  # resid_pre of layer 1
    assert _fit(tiny_model, tiny_tokens, EACH[5]).heads == every  # resid_post of layer 0 feeds layer 1
    assert _fit(tiny_model, tiny_tokens, EACH[4]).heads == []  # resid_mid of the last layer
    assert start_layer(tiny_model, hook_names_of(_fit(tiny_model, tiny_tokens, EACH[6]))) == 0


@pytest.mark.parametrize("simplifier", EACH, ids=IDS)
def test_a_fitted_proxy_carries_what_its_simplifier_sweeps(tiny_model, tiny_tokens, simplifier):
    proxy = _fit(tiny_model, tiny_tokens, simplifier)
    param = type(simplifier).sweep_param
    assert proxy.sweep_param == param
    assert proxy.sweep_value == (getattr(simplifier, param) if param else "")
    assert proxy.to("cpu").sweep_param == param


def test_fit_sweep_equals_separate_fits(tiny_model, tiny_tokens):
    for simplifier in (SVD(basis="joint"), ResidSVD()):
        acts = collect(tiny_model, tiny_tokens, simplifier.hook_names(tiny_model), LENGTHS)
        many = simplifier.fit_sweep(tiny_model, acts, [1, 3, 5])
        for rank, proxy in many.items():
            one = simplifier.replace(rank=rank).fit(tiny_model, acts)
            assert proxy.params == one.params and proxy.params["rank"] == rank
            assert proxy.sweep_param == one.sweep_param == "rank" and proxy.sweep_value == rank
            for a, b in zip(proxy.hooks, one.hooks, strict=True):
                assert torch.equal(a.basis, b.basis) and torch.equal(a.mean, b.mean)
                assert a.basis.shape[-1] == rank


def test_joint_basis_is_shared_by_queries_and_keys(tiny_model, tiny_tokens):
    simplifier = SVD(rank=3, basis="joint", targets=Targets(heads=(1,)))
    acts = collect(tiny_model, tiny_tokens, simplifier.hook_names(tiny_model), LENGTHS)
    proxy = simplifier.fit(tiny_model, acts)
    q_hook, k_hook = proxy.hooks
    assert torch.equal(q_hook.basis, k_hook.basis)
    both = torch.cat([acts["blocks.1.attn.hook_q"][:, 1], acts["blocks.1.attn.hook_k"][:, 1]])
    torch.testing.assert_close(q_hook.mean[0], both.mean(0))
    separate = SVD(rank=3, targets=Targets(heads=(1,))).fit(tiny_model, acts)
    assert not torch.allclose(separate.hooks[0].basis, separate.hooks[1].basis)


def test_kmeans_is_deterministic_given_the_seed(tiny_model, tiny_tokens):
    a = _fit(tiny_model, tiny_tokens, KMeans(k=6, seed=3))
    b = _fit(tiny_model, tiny_tokens, KMeans(k=6, seed=3))
    assert len(a.hooks) == 2
    for x, y in zip(a.hooks, b.hooks, strict=True):
        assert torch.equal(x.centroids, y.centroids)
    c = _fit(tiny_model, tiny_tokens, KMeans(k=6, seed=4))
    assert not all(torch.equal(x.centroids, z.centroids) for x, z in zip(a.hooks, c.hooks, strict=True))


def test_explained_variance_is_monotone_and_full_at_full_rank(tiny_model, tiny_tokens):
    acts = collect(tiny_model, tiny_tokens, SVD().hook_names(tiny_model), LENGTHS)
    proxies = SVD().fit_sweep(tiny_model, acts, list(range(1, 9)))
    kept = [proxies[r].info["explained_variance"]["blocks.1.attn.hook_q"][0] for r in range(1, 9)]
    assert all(a <= b + 1e-12 for a, b in zip(kept, kept[1:], strict=False))
    assert kept[-1] == pytest.approx(1.0) and kept[0] < 1.0


# ---------------------------------------------------------------- golden values on hand-built data


def test_pca_golden():
    # Centred: mean (5, 5); the spread is 16 along x and 4 along y, so rank 1 keeps x.
    x = torch.tensor([[3.0, 5.0], [7.0, 5.0], [5.0, 6.0], [5.0, 4.0]])
    fit = pca(x)
    torch.testing.assert_close(fit.mean, torch.tensor([5.0, 5.0]))
    torch.testing.assert_close(fit.singular_values, torch.tensor([8.0, 2.0]).sqrt())
    hook = ProjectionHook("blocks.0.hook_resid_pre", None, fit.mean, fit.basis(1))
    torch.testing.assert_close(hook(torch.tensor([[[7.0, 6.0], [1.0, -3.0]]])),
                               torch.tensor([[[7.0, 5.0], [1.0, 5.0]]]))
    assert fit.explained(1) == pytest.approx(0.8)
    # Uncentred: X^T X = diag(20, 1) -> rank 1 keeps x and sends y to 0.
    raw = pca(torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0]]), centered=False)
    hook = ProjectionHook("blocks.0.hook_resid_pre", None, raw.mean, raw.basis(1))
    torch.testing.assert_close(hook(torch.tensor([[[7.0, 6.0]]])), torch.tensor([[[7.0, 0.0]]]))


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_streamed_scatter_equals_the_held_pca(torch_gen, centered, offset):
    from illusions.simplifiers.svd import ScatterStats

    # Uneven directions (singular values well apart) and a mean far from the origin.
    x = torch.randn(3000, 8, generator=torch_gen) * torch.linspace(0.2, 3.0, 8) + offset
    held = pca(x, centered=centered)
    stats = ScatterStats(centered=centered)
    for part in x.split(257):  # batches of uneven size
        stats.add(part)
    streamed = stats.fit()
    assert streamed.n == held.n == 3000
    torch.testing.assert_close(streamed.mean, held.mean, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(streamed.singular_values, held.singular_values, rtol=1e-5, atol=1e-5)
    for rank in (1, 4, 8):
        p_held = held.basis(rank) @ held.basis(rank).T  # the projection: eigenvector signs may differ
        p_streamed = streamed.basis(rank) @ streamed.basis(rank).T
        torch.testing.assert_close(p_streamed, p_held, rtol=0.0, atol=1e-5)
        assert streamed.explained(rank) == pytest.approx(held.explained(rank), rel=1e-6)


def test_kmeans_golden():
    a = torch.tensor([[0.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 2.0]])
    x = torch.cat([a, a + 10])  # two squares, centres (1, 1) and (11, 11)
    fit = fit_centroids(x, 2, seed=0)
    order = fit.centroids[:, 0].argsort()
    torch.testing.assert_close(fit.centroids[order], torch.tensor([[1.0, 1.0], [11.0, 11.0]]))
    assert fit.inertia == pytest.approx(16.0)
    hook = CentroidHook("blocks.0.attn.hook_q", (1,), fit.centroids[None])
    acts = torch.tensor([[3.0, 4.0], [9.0, 8.0]])[None, :, None].expand(1, 2, 2, 2)  # [batch pos head d]
    out = hook(acts)
    torch.testing.assert_close(out[0, :, 1], torch.tensor([[1.0, 1.0], [11.0, 11.0]]))
    assert torch.equal(out[0, :, 0], acts[0, :, 0])


def test_onehot_golden_ties_go_to_the_earliest_key():
    pattern = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.4, 0.2, 0.4]])
    expected = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.equal(hard_attention(pattern[None, None])[0, 0], expected)
    assert torch.equal(hard_attention(torch.zeros(1, 1, 2, 3)), torch.zeros(1, 1, 2, 3))
    hook = OneHotPatternHook("blocks.0.attn.hook_pattern", (1,))
    both = torch.stack([pattern, pattern])[None]  # [batch=1, head_index=2, 4, 3]
    out = hook(both)
    assert torch.equal(out[0, 0], pattern) and torch.equal(out[0, 1], expected)
