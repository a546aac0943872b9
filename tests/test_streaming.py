"""Fits that stream their activations (above ``faithfulness.STREAM_FIT_BYTES``): the seeded sample
they share (``streaming.Reservoir``), one-pass k-means (``kmeans.CentroidsStream``) and sparse
dictionaries trained on a sample. The SVD streams are tested beside the engine (test_analyses.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from illusions.errors import IllusionsError
from illusions.simplifiers import kmeans, streaming
from illusions.simplifiers.kmeans import KMeans, OnePassKMeans, fit_centroids, nearest_index


def _feed(reservoir, x, sizes):
    start = 0
    for size in sizes:
        reservoir.add({"x": x[start : start + size], "y": -x[start : start + size]})
        start += size
    assert start == len(x)


def test_reservoir_is_seeded_bounded_aligned_and_uniform():
    x = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 4)  # row i is i everywhere
    budget = 100 * 2 * 4 * 4  # 100 rows of x and y
    a, b, c = (streaming.Reservoir(budget, seed) for seed in (0, 0, 1))
    _feed(a, x, [7, 93, 300, 600])
    _feed(b, x, [7, 93, 300, 600])
    _feed(c, x, [7, 93, 300, 600])
    sa, sb, sc = a.sample(), b.sample(), c.sample()
    assert a.capacity == a.size == 100 and a.seen == 1000 and sa["x"].shape == (100, 4)
    assert torch.equal(sa["x"], sb["x"]) and not torch.equal(sa["x"], sc["x"])
    assert torch.equal(sa["y"], -sa["x"])  # the names keep the same positions
    assert len(torch.unique(sa["x"][:, 0])) == 100  # without replacement
    assert float(sa["x"][:, 0].min()) >= 0 and float(sa["x"][:, 0].max()) < 1000
    # Uniform over all rows: over many seeds each row is kept with probability 100/1000.
    counts = torch.zeros(1000)
    for seed in range(200):
        r = streaming.Reservoir(budget, seed)
        _feed(r, x, [250, 250, 500])
        counts[r.sample()["x"][:, 0].long()] += 1
    assert abs(float(counts[:500].mean()) - 20) < 1.5 and abs(float(counts[500:].mean()) - 20) < 1.5
    assert float(counts[:100].mean()) < 25  # the first rows are not over-kept
    small = streaming.Reservoir(budget, 0)
    _feed(small, x[:30], [10, 20])
    assert torch.equal(small.sample()["x"], x[:30])  # fewer rows than it holds: all of them, in order


def _blobs(n: int = 6000, d: int = 6, centres: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, d, generator=gen) * 4
    return (means[torch.randint(0, centres, (n,), generator=gen)] + torch.randn(n, d, generator=gen)).float()


def _inertia(x: torch.Tensor, centroids: torch.Tensor) -> float:
    return float(((x - centroids[nearest_index(x, centroids)]) ** 2).sum())


def _one_pass(x, config, sizes, monkeypatch, seen=None):
    monkeypatch.setattr(kmeans, "MINIBATCH_SIZE", 256)
    monkeypatch.setattr(kmeans, "STREAM_INIT", 768)
    fit = OnePassKMeans(config, "test")
    start = 0
    for size in sizes:
        fit.add(x[start : start + size])
        start += size
        if seen is not None:
            seen.append(fit.n_pending)
    return fit


def test_one_pass_kmeans_is_seeded_bounded_and_close_to_the_held_fit(monkeypatch):
    x = _blobs()
    config = KMeans(k=8, seed=0)
    sizes = [100] * 60
    pending = []
    a = _one_pass(x, config, sizes, monkeypatch, pending)
    assert max(pending) < 768 and max(pending[8:]) < 256  # never more than the seeding sample or a batch
    clusters = a.fit(x[::7])
    fa, spread = clusters.fit, clusters.spread
    fb = _one_pass(x, config, sizes, monkeypatch).fit(x[::7]).fit
    fc = _one_pass(x, KMeans(k=8, seed=1), sizes, monkeypatch).fit(x[::7]).fit
    assert fa.algorithm == "minibatch-stream" and fa.n == len(x)
    assert torch.equal(fa.centroids, fb.centroids) and not torch.equal(fa.centroids, fc.centroids)
    assert spread.shape == (8,) and bool((spread > 0).all())
    held = fit_centroids(x, 8, seed=0)
    assert held.algorithm == "kmeans"
    assert _inertia(x, fa.centroids) <= 1.05 * held.inertia  # one pass, yet about as good
    assert abs(fa.inertia / _inertia(x, fa.centroids) - 1) < 0.2  # estimated on every 7th vector


def test_one_pass_kmeans_below_its_seeding_sample_is_the_held_fit(monkeypatch):
    x = _blobs(n=500)
    fit = _one_pass(x, KMeans(k=5, seed=0), [200, 300], monkeypatch).fit(x[:10]).fit
    held = fit_centroids(x, 5, seed=0)
    assert torch.equal(fit.centroids, held.centroids) and fit.inertia == held.inertia and fit.n == 500


def test_one_pass_kmeans_refuses_k_above_the_distinct_seeding_vectors(monkeypatch):
    x = torch.cat([torch.zeros(800, 3), _blobs(n=400, d=3)])  # the first 768 are one point
    with pytest.raises(IllusionsError, match="k=4 exceeds the 1 distinct vectors among the first 768"):
        _one_pass(x, KMeans(k=4, seed=0), [400, 400, 400], monkeypatch)


@pytest.mark.parametrize("name", ["kmeans", "resid-kmeans"])
def test_streamed_kmeans_through_the_engine(tiny_model, rng, monkeypatch, name):
    from illusions.analyses import faithfulness
    from illusions.registry import make_simplifier
    from test_analyses import make_split

    split = make_split("train", rng, n=60)
    rows = np.arange(len(split))
    simplifier = make_simplifier(name, k=4)
    held = faithfulness.fit_proxies(tiny_model, split, rows, [simplifier], batch_size=8)[0]
    monkeypatch.setattr(faithfulness, "STREAM_FIT_BYTES", 0)
    monkeypatch.setattr(kmeans, "MINIBATCH_SIZE", 32)
    monkeypatch.setattr(kmeans, "STREAM_INIT", 96)
    monkeypatch.setattr(kmeans, "STREAM_SAMPLE_ROWS", 200)
    a = faithfulness.fit_proxies(tiny_model, split, rows, [simplifier], batch_size=8)[0]
    b = faithfulness.fit_proxies(tiny_model, split, rows, [simplifier], batch_size=8)[0]
    n = int(split.lengths.sum())
    assert a.info["streamed"] == {"positions": n, "sample": 200, "init": 96}
    assert a.info["n_fitted"] == held.info["n_fitted"] == n
    assert a.info["algorithm"] in ("minibatch-stream", ["minibatch-stream"])
    assert a.params == held.params and [h.hook_name for h in a.hooks] == [h.hook_name for h in held.hooks]
    for ha, hb, hh in zip(a.hooks, b.hooks, held.hooks, strict=True):
        for key, value in ha.tensors().items():
            assert torch.equal(value, hb.tensors()[key]), key  # deterministic
            assert value.shape == hh.tensors()[key].shape, key
        assert not torch.equal(ha.centroids, hh.centroids)  # a fit of its own, not the held one
    inertia = [np.sum(a.info["inertia"][k]) / np.sum(held.info["inertia"][k]) for k in held.info["inertia"]]
    assert max(inertia) < 1.5, inertia


# ---------------------------------------------------------------- sparse dictionaries


def _dictionary_stream(model, config, tokens, batch: int = 8):
    from illusions.activations import collect

    stream = config.stream(model)
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    names = config.hook_names(model)
    for start in range(0, len(tokens), batch):
        stream.add(collect(model, tokens[start : start + batch], names, mask[start : start + batch]))
    return stream


def _tiny_model_and_tokens(seed: int):
    """A 2-layer, 32-wide model and 48 token rows of 16 drawn with ``seed``."""
    from illusions.models import ModelConfig, build_model

    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=24,
                                    d_vocab=13), seed=0)
    return model, torch.randint(0, 13, (48, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.sae
def test_streamed_dictionary_trains_on_a_seeded_sample_and_is_the_held_fit_when_all_fits(monkeypatch):
    pytest.importorskip("sae_lens")
    from illusions.activations import collect
    from illusions.simplifiers import SAE

    model, tokens = _tiny_model_and_tokens(0)
    config = SAE(width=16, sae_steps=20, sae_batch=128, seed=3)
    everything = collect(model, tokens, config.hook_names(model), torch.ones(tokens.shape, dtype=torch.bool))
    held = config.fit(model, everything)
    # A sample that holds every position keeps them all in order: the held fit, bit for bit.
    whole = _dictionary_stream(model, config, tokens).fit_sweep([16])[16]
    assert whole.info["streamed"] == {"positions": 48 * 16, "sample": 48 * 16}
    for key, value in held.hooks[0].tensors().items():
        assert torch.equal(whole.hooks[0].tensors()[key], value), key
    # A smaller budget: 200 positions, drawn by the seed; the same seed gives the same dictionary.
    monkeypatch.setattr(streaming, "SAMPLE_BYTES", 200 * 32 * 4)
    a, b = (_dictionary_stream(model, config, tokens) for _ in range(2))
    pa, pb = a.fit_sweep([16])[16], b.fit_sweep([16])[16]
    assert pa.info["streamed"] == {"positions": 768, "sample": 200} and pa.info["n_fitted"] == 200
    assert set(pa.info["fit"]) == set(held.info["fit"])
    for key, value in pa.hooks[0].tensors().items():
        assert torch.equal(pb.hooks[0].tensors()[key], value), key
    assert not torch.equal(pa.hooks[0].W_enc, held.hooks[0].W_enc)
    other = _dictionary_stream(model, SAE(width=16, sae_steps=20, sae_batch=128, seed=4), tokens)
    assert not torch.equal(other.sample.sample()[config.hook_names(model)[0]],
                           a.sample.sample()[config.hook_names(model)[0]])
    with pytest.raises(IllusionsError, match="fits width=16"):
        a.fit_sweep([32])


@pytest.mark.sae
def test_streamed_transcoder_keeps_its_input_and_target_aligned(monkeypatch):
    pytest.importorskip("sae_lens")
    from illusions.simplifiers import Transcoder

    model, tokens = _tiny_model_and_tokens(1)
    monkeypatch.setattr(streaming, "SAMPLE_BYTES", 150 * 2 * 32 * 4)  # 150 positions of input and target
    config = Transcoder(width=16, sae_steps=20, sae_batch=64)
    stream = _dictionary_stream(model, config, tokens)
    sample = stream.sample.sample()
    inp, out = config.hook_names(model)
    assert (inp, out) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    assert sample[inp].shape == sample[out].shape == (150, 32)
    with torch.no_grad():  # each kept target is the MLP of the input kept beside it
        torch.testing.assert_close(model.blocks[1].mlp(sample[inp][:, None])[:, 0], sample[out])
    proxy = stream.fit_sweep([16])[16]
    assert proxy.info["n_fitted"] == 150 and [h.hook_name for h in proxy.hooks] == [out]


def test_only_held_activations_are_checked_against_memory(tiny_model, rng, monkeypatch):
    from illusions import devices
    from illusions.analyses import faithfulness
    from illusions.registry import make_simplifier
    from test_analyses import make_split

    split = make_split("train", rng, n=40)
    rows = np.arange(len(split))
    monkeypatch.setattr(devices, "memory_bytes", lambda device="cpu": 20_000)  # less than any fit here
    streams = [make_simplifier("kmeans", k=3), make_simplifier("resid-svd", rank=2)]
    with pytest.raises(IllusionsError, match="fitting on 40 sequences"):
        faithfulness.fit_proxies(tiny_model, split, rows, streams, batch_size=8)  # held: refused
    monkeypatch.setattr(faithfulness, "STREAM_FIT_BYTES", 0)
    assert len(faithfulness.fit_proxies(tiny_model, split, rows, streams, batch_size=8)) == 2  # streamed: nothing held
    circuit = make_simplifier("circuit", keep="L0H0")
    with pytest.raises(IllusionsError) as error:
        faithfulness.fit_proxies(tiny_model, split, rows, [*streams, circuit], batch_size=8)
    message = str(error.value)
    assert "\n" not in message and "blocks.0.attn.hook_z" in message  # the circuit's activations are held
    assert "hook_q" not in message and "hook_resid" not in message  # the streamed ones are not counted


@pytest.mark.sae
def test_engine_streams_a_dictionary_above_the_threshold(tiny_model, rng, monkeypatch):
    pytest.importorskip("sae_lens")
    from illusions.analyses import faithfulness
    from illusions.registry import make_simplifier
    from test_analyses import make_split

    split = make_split("train", rng, n=40)
    rows = np.arange(len(split))
    sae = make_simplifier("sae", width=16, sae_steps=10, sae_batch=64)
    held = faithfulness.fit_proxies(tiny_model, split, rows, [sae], batch_size=8)[0]
    assert "streamed" not in held.info
    monkeypatch.setattr(faithfulness, "STREAM_FIT_BYTES", 0)
    monkeypatch.setattr(streaming, "SAMPLE_BYTES", 100 * 32 * 4)
    proxy = faithfulness.fit_proxies(tiny_model, split, rows, [sae], batch_size=8)[0]
    assert proxy.info["streamed"] == {"positions": int(split.lengths.sum()), "sample": 100}
    assert proxy.info["n_fitted"] == 100 and proxy.params == held.params
