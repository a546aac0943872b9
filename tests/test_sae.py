"""Sparse dictionary proxies (``sae``, ``transcoder``): exactness without sparsity, hand-checked
per-split metrics, save/load round trips (ours and SAELens' format), options and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from illusions.activations import collect
from illusions.analyses.faithfulness import hook_names_of, proxy_label, start_layer
from illusions.analyses.sparse import SPARSE_METRICS, SparseStats, stats_of
from illusions.errors import IllusionsError
from illusions.metrics import Resampler
from illusions.models import ModelConfig, build_model
from illusions.registry import make_simplifier
from illusions.simplifiers import SAE, Proxy, Targets, Transcoder, fit_proxy
from illusions.simplifiers.sae import SAEHook, TranscoderHook

pytestmark = pytest.mark.sae
sae_lens = pytest.importorskip("sae_lens", reason="the sae/transcoder simplifiers need sae-lens (pip install '.[sae]')")

# Enough steps for a no-sparsity dictionary to become (almost) the identity on the tiny model.
EXACT = {"architecture": "standard", "l1": 0.0, "sae_steps": 1500, "sae_batch": 1024, "sae_lr": 3e-3}
QUICK = {"sae_steps": 30, "sae_batch": 256}


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=24, d_vocab=13),
                       seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 13, (64, 16), generator=torch.Generator().manual_seed(0))


LENGTHS = torch.full((64,), 16)


def _agreement(model, tokens, proxy) -> float:
    clean = model(tokens).argmax(-1)
    return float((model.run_with_hooks(tokens, fwd_hooks=proxy.fwd_hooks).argmax(-1) == clean).float().mean())


# ---------------------------------------------------------------- invariances


@pytest.mark.slow
@pytest.mark.parametrize("site", ["resid", "z"])
def test_wide_dictionary_without_sparsity_reconstructs_almost_exactly(model, tokens, site):
    proxy = fit_proxy(model, SAE(width=64, site=site, **EXACT), tokens, LENGTHS)  # width 64 >= d = 32
    fit = next(iter(proxy.info["fit"].values()))
    assert fit["explained_variance"] > 0.9999
    assert _agreement(model, tokens, proxy) >= 0.99


def test_sparse_dictionary_changes_the_model_and_leaves_upstream_alone(model, tokens):
    proxy = fit_proxy(model, SAE(width=16, top_k=2, **QUICK), tokens, LENGTHS)  # resid_pre of layer 1
    assert proxy_label(proxy) == "sae(width=16)" and start_layer(model, hook_names_of(proxy)) == 1
    assert proxy.heads == [(1, h) for h in range(4)]
    _, clean = model.run_with_cache(tokens)
    with model.hooks(fwd_hooks=proxy.fwd_hooks):
        logits, cache = model.run_with_cache(tokens)
    assert torch.equal(cache["blocks.0.hook_resid_post"], clean["blocks.0.hook_resid_post"])
    assert not torch.allclose(cache["blocks.1.hook_resid_pre"], clean["blocks.1.hook_resid_pre"])
    assert (cache["blocks.1.hook_resid_pre"] - proxy.hooks[0].forward(clean["blocks.1.hook_resid_pre"])[0]).abs().max() < 1e-5
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_z_site_replaces_only_the_targeted_heads(model, tokens):
    proxy = fit_proxy(model, SAE(width=8, site="z", top_k=2, targets=Targets(heads=(1, 3)), **QUICK), tokens, LENGTHS)
    hook = proxy.hooks[0]
    assert hook.hook_name == "blocks.1.attn.hook_z" and hook.width == 16  # 2 heads x d_head 8
    assert proxy.heads == []  # the last layer's attention output: no later attention layer reads it
    _, cache = model.run_with_cache(tokens)
    z = cache["blocks.1.attn.hook_z"]
    new = hook(z)
    assert torch.equal(new[:, :, [0, 2]], z[:, :, [0, 2]])
    assert not torch.allclose(new[:, :, [1, 3]], z[:, :, [1, 3]])


def test_transcoder_with_the_mlps_own_weights_is_exact(tokens):
    """A ReLU MLP is a standard transcoder: W_enc = W_in, W_dec = W_out; splicing it in changes nothing."""
    relu = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=24, d_vocab=13,
                                   act_fn="relu"), seed=1)
    mlp = relu.blocks[1].mlp
    hook = TranscoderHook(hook_name="blocks.1.hook_mlp_out", heads=None, input_name="blocks.1.ln2.hook_normalized",
                          architecture="standard", top_k=0, normalize="none", subtract_b_dec=False,
                          W_enc=mlp.W_in.detach(), b_enc=mlp.b_in.detach(), W_dec=mlp.W_out.detach(),
                          b_dec=mlp.b_out.detach(), train_active=torch.ones(64, dtype=torch.bool))
    proxy = Proxy("transcoder", {"width": 64}, (hook,))
    assert [name for name, _ in proxy.fwd_hooks] == ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    torch.testing.assert_close(relu.run_with_hooks(tokens, fwd_hooks=proxy.fwd_hooks), relu(tokens),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(IllusionsError, match="without its input hook"):
        relu.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", hook)])


@pytest.mark.slow
def test_trained_transcoder_predicts_the_mlp(model, tokens):
    proxy = fit_proxy(model, Transcoder(width=128, **{**EXACT, "sae_steps": 600}), tokens, LENGTHS)
    assert [h.hook_name for h in proxy.hooks] == ["blocks.1.hook_mlp_out"]
    assert proxy.hooks[0].input_name == "blocks.1.ln2.hook_normalized"
    assert proxy.info["fit"]["blocks.1.hook_mlp_out"]["explained_variance"] > 0.9
    assert proxy.heads == []  # layer 1 is the last: nothing reads its MLP output but the unembedding


def test_same_seed_same_dictionary_and_global_rng_untouched(model, tokens):
    state = torch.get_rng_state()
    a = fit_proxy(model, SAE(width=16, seed=3, **QUICK), tokens, LENGTHS)
    assert torch.equal(torch.get_rng_state(), state)
    b = fit_proxy(model, SAE(width=16, seed=3, **QUICK), tokens, LENGTHS)
    c = fit_proxy(model, SAE(width=16, seed=4, **QUICK), tokens, LENGTHS)
    for key, value in a.hooks[0].tensors().items():
        assert torch.equal(value, b.hooks[0].tensors()[key]), key
    assert not torch.equal(a.hooks[0].W_enc, c.hooks[0].W_enc)


# ---------------------------------------------------------------- per-split metrics, by hand


def _hand_hook(train_active=(True, False, False)) -> SAEHook:
    # codes = relu(x W_enc + b_enc): latent 0 = relu(x1), latent 1 = relu(x2), latent 2 never fires;
    # x_hat = (relu(x1), relu(x2) / 2).
    return SAEHook(hook_name="blocks.0.hook_resid_pre", heads=None, architecture="standard", top_k=0,
                   normalize="none", subtract_b_dec=False,
                   W_enc=torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), b_enc=torch.tensor([0.0, 0.0, -1.0]),
                   W_dec=torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.0, 0.0]]), b_dec=torch.zeros(2),
                   train_active=torch.tensor(train_active))


def test_reconstruction_metrics_match_hand_computation():
    # Sequence 0: x = (1, 2), (2, 0); sequence 1: x = (-1, 4).
    acts = {"blocks.0.hook_resid_pre": torch.tensor([[1.0, 2.0], [2.0, 0.0], [-1.0, 4.0]])}
    stats = stats_of([_hand_hook()], acts, np.array([2, 1]))
    # x_hat = (1, 1), (2, 0), (0, 2): squared errors 1, 0, 1 + 4.
    np.testing.assert_array_equal(stats.err, [1.0, 5.0])
    np.testing.assert_array_equal(stats.sq, [9.0, 17.0])
    np.testing.assert_array_equal(stats.l0, [3.0, 1.0])  # codes (1, 2, 0), (2, 0, 0), (0, 4, 0)
    np.testing.assert_array_equal(stats.active, [[True, True, False], [False, True, False]])
    point = {k: float(v[0]) for k, v in stats.values(np.ones((1, 2))).items()}
    # mean x = (2/3, 2); sum |x - mean|^2 = 26 - 3 * (4/9 + 4) = 38/3
    assert point["explained_variance_pooled"] == pytest.approx(1 - 6 / (38 / 3))
    assert point["normalized_mse_pooled"] == pytest.approx(6 / 26)
    # Each sequence's first position left out: only (2, 0) is left, reconstructed exactly.
    assert point["normalized_mse"] == 0.0 and point["mse"] == 0.0
    assert point["l0"] == pytest.approx(4 / 3)
    assert point["dead_fraction"] == pytest.approx(1 / 3)  # latent 2
    assert point["new_latent_fraction"] == pytest.approx(1 / 3)  # latent 1: active here, never in training
    # A bootstrap replicate drawing sequence 0 twice: x = (1, 2), (2, 0) twice each.
    rep = {k: float(v[0]) for k, v in stats.values(np.array([[2.0, 0.0]])).items()}
    assert rep["explained_variance_pooled"] == pytest.approx(1 - 2 / (18 - (36 + 16) / 4))
    assert rep["normalized_mse_pooled"] == pytest.approx(2 / 18)
    assert rep["l0"] == pytest.approx(6 / 4)
    assert rep["dead_fraction"] == pytest.approx(1 / 3) and rep["new_latent_fraction"] == pytest.approx(1 / 3)
    sampler = Resampler.draw(2, np.random.default_rng(0), n_boot=50)
    from illusions.analyses.sparse import estimates

    est = estimates(stats, sampler)
    assert set(est) == set(SPARSE_METRICS)
    assert est["normalized_mse_pooled"][0] == pytest.approx(6 / 26)
    assert est["normalized_mse_pooled"][1] <= est["normalized_mse_pooled"][0] <= est["normalized_mse_pooled"][2]


def test_first_position_is_left_out_by_hand():
    # Sequence 0: x = (1, 2), (2, 0), (0, 1); sequence 1: x = (-1, 4), (3, 3); x_hat = (relu(x1), relu(x2) / 2).
    acts = {"blocks.0.hook_resid_pre": torch.tensor([[1.0, 2.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 4.0], [3.0, 3.0]])}
    stats = stats_of([_hand_hook()], acts, np.array([3, 2]))
    np.testing.assert_array_equal(stats.err_first, [1.0, 5.0])
    np.testing.assert_array_equal(stats.sq_first, [5.0, 17.0])
    np.testing.assert_array_equal(stats.x_first, [[1.0, 2.0], [-1.0, 4.0]])
    point = {k: float(v[0]) for k, v in stats.values(np.ones((1, 2))).items()}
    # Left: (2, 0), (0, 1), (3, 3); squared errors 0, 0.25, 2.25; mean (5/3, 4/3); sum |x - mean|^2 = 23 - 41/3.
    assert point["explained_variance"] == pytest.approx(1 - 2.5 / (23 - 41 / 3))
    assert point["normalized_mse"] == pytest.approx(2.5 / 23)
    assert point["mse"] == pytest.approx(2.5 / 3)
    assert stats.n_positions("explained_variance") == 3 and stats.n_positions("explained_variance_pooled") == 5
    assert stats.n_positions("l0") == 5


def _scaling_hook(scale: float) -> SAEHook:
    """A dictionary that reproduces dimension 0 of a positive x and returns dimension 1 times ``scale``."""
    return SAEHook(hook_name="blocks.0.hook_resid_pre", heads=None, architecture="standard", top_k=0,
                   normalize="none", subtract_b_dec=False, W_enc=torch.eye(2), b_enc=torch.zeros(2),
                   W_dec=torch.tensor([[1.0, 0.0], [0.0, scale]]), b_dec=torch.zeros(2),
                   train_active=torch.tensor((True, True)))


def test_explained_variance_moves_with_reconstruction_when_position_0_is_huge():
    """A real model's first position (BOS / attention sink) has ~100x the norm of the others: pooled in,
    it holds nearly all the variance, so the pooled explained variance sits at ~1 however badly the
    other positions are reconstructed; without it the metric follows the reconstruction."""
    gen = torch.Generator().manual_seed(0)
    lengths = np.array([16] * 8)
    x = 0.5 + torch.rand(int(lengths.sum()), 2, generator=gen)  # positive: relu passes it, the scale decides
    starts = np.cumsum(lengths) - lengths
    x[starts] = torch.tensor([2000.0, 0.0]) + 100 * torch.rand(len(starts), 2, generator=gen)
    acts = {"blocks.0.hook_resid_pre": x}
    ev, pooled, nmse = [], [], []
    for scale in (1.0, 0.9, 0.5, 0.0):
        point = {k: float(v[0]) for k, v in stats_of([_scaling_hook(scale)], acts, lengths).values(
            np.ones((1, len(lengths)))).items()}
        ev.append(point["explained_variance"])
        pooled.append(point["explained_variance_pooled"])
        nmse.append(point["normalized_mse"])
    assert ev[0] == pytest.approx(1.0) and ev[1] > ev[2] > ev[3]
    assert ev[3] < 0.6  # dimension 1 lost entirely: half the variance (and its mean) gone
    assert min(pooled) > 0.99  # the pooled figure cannot tell a perfect dictionary from one that drops a dimension
    assert nmse[0] == pytest.approx(0.0, abs=1e-12) and nmse[1] < nmse[2] < nmse[3]


def test_stats_arrays_round_trip():
    acts = {"blocks.0.hook_resid_pre": torch.tensor([[1.0, 2.0], [2.0, 0.0], [-1.0, 4.0]])}
    stats = stats_of([_hand_hook(), _hand_hook((True, True, True))], acts, np.array([2, 1]))
    assert stats.active.shape == (2, 6) and stats.x_sum.shape == (2, 4)  # two dictionaries pooled
    again = SparseStats.from_arrays(stats.arrays())
    for key, value in stats.arrays().items():
        np.testing.assert_array_equal(getattr(again, key), value)


# ---------------------------------------------------------------- saving and loading


def test_saved_proxy_gives_identical_hooks(model, tokens, tmp_path):
    for simplifier in (SAE(width=16, architecture="jumprelu", l1=0.1, **QUICK),
                       SAE(width=16, site="z", **{**QUICK, "sae_steps": 5}),
                       Transcoder(width=16, architecture="standard", **{**QUICK, "sae_steps": 5})):
        proxy = fit_proxy(model, simplifier, tokens, LENGTHS)
        loaded = Proxy.load(proxy.save(tmp_path / simplifier.name / simplifier.architecture))
        assert loaded.params == proxy.params and proxy_label(loaded) == proxy_label(proxy)
        for key, value in proxy.hooks[0].tensors().items():
            assert torch.equal(value, loaded.hooks[0].tensors()[key]), key
        assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=loaded.fwd_hooks),
                           model.run_with_hooks(tokens, fwd_hooks=proxy.fwd_hooks))


def _lens_sae(kind: str, d_in: int, d_sae: int, hook_name: str, seed: int = 0, **cfg):
    """A SAELens inference dictionary with random weights (positive thresholds)."""
    classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
               "transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
               "skip_transcoder": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig),
               "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig)}
    cls, cfg_cls = classes[kind]
    extra = {"d_out": d_in, "apply_b_dec_to_input": False} if "transcoder" in kind else {}
    config = cfg_cls(d_in=d_in, d_sae=d_sae, **extra, **cfg)
    config.metadata.hook_name = hook_name
    lens = cls(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lens.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (0.05 if name == "threshold" else 0.3))
            if name == "threshold":
                param.abs_()
    return lens


@pytest.mark.parametrize("kind, cfg", [
    ("standard", {}),
    ("standard", {"normalize_activations": "layer_norm"}),
    ("topk", {"k": 4, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}),
])
def test_sae_saved_by_sae_lens_loads_and_matches_its_forward(model, tokens, tmp_path, kind, cfg):
    name = "blocks.1.hook_resid_pre"
    lens = _lens_sae(kind, 32, 48, name, **cfg)
    lens.save_model(tmp_path / "saved")
    proxy = fit_proxy(model, SAE(sae_from=str(tmp_path / "saved")), tokens, LENGTHS)
    assert proxy_label(proxy) == "sae(width=48)" and proxy.info["loaded_from"] == str(tmp_path / "saved")
    x = collect(model, tokens, [name], LENGTHS)[name]
    with torch.no_grad():
        torch.testing.assert_close(proxy.hooks[0](x), lens(x), atol=1e-5, rtol=1e-5)
    loaded = Proxy.load(proxy.save(tmp_path / "ours"))
    assert torch.equal(loaded.hooks[0](x), proxy.hooks[0](x))


@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder", "jumprelu_transcoder"])
def test_transcoder_saved_by_sae_lens_loads_and_matches_its_forward(model, tokens, tmp_path, kind):
    lens = _lens_sae(kind, 32, 40, "blocks.1.ln2.hook_normalized")
    lens.cfg.metadata.hook_name_out = "blocks.1.hook_mlp_out"
    lens.save_model(tmp_path / "saved")
    proxy = fit_proxy(model, Transcoder(sae_from=str(tmp_path / "saved")), tokens, LENGTHS)
    _, cache = model.run_with_cache(tokens)
    with model.hooks(fwd_hooks=proxy.fwd_hooks):
        _, patched = model.run_with_cache(tokens)
    with torch.no_grad():
        expected = lens(cache["blocks.1.ln2.hook_normalized"])
    torch.testing.assert_close(patched["blocks.1.hook_mlp_out"], expected, atol=1e-5, rtol=1e-5)


def test_loading_refuses_a_dictionary_of_another_hook_or_kind(model, tokens, tmp_path):
    _lens_sae("standard", 32, 8, "blocks.0.hook_resid_pre").save_model(tmp_path / "l0")
    with pytest.raises(IllusionsError, match="trained on blocks.0.hook_resid_pre"):
        fit_proxy(model, SAE(sae_from=str(tmp_path / "l0")), tokens, LENGTHS)
    with pytest.raises(IllusionsError, match="use the sae simplifier"):
        fit_proxy(model, Transcoder(sae_from=str(tmp_path / "l0")), tokens, LENGTHS)
    _lens_sae("standard", 16, 8, "blocks.1.attn.hook_z").save_model(tmp_path / "z")
    with pytest.raises(IllusionsError, match="16-wide vectors, but blocks.1.attn.hook_z gives 32-wide"):
        fit_proxy(model, SAE(site="z", sae_from=str(tmp_path / "z")), tokens, LENGTHS)
    with pytest.raises(IllusionsError, match="no cfg.json"):
        SAE(sae_from=str(tmp_path / "missing"))
    with pytest.raises(IllusionsError, match="drop width=64"):
        SAE(width=64, sae_from=str(tmp_path / "l0"))


# ---------------------------------------------------------------- options and errors


@pytest.mark.parametrize("kwargs, message", [
    ({"architecture": "gated"}, "architecture must be one of standard, topk, jumprelu"),
    ({"width": 8}, r"top_k must be in 1\.\.8"),
    ({"architecture": "standard", "top_k": 4}, "top_k applies to the topk architecture"),
    ({"l1": 2.0}, "topk's sparsity is top_k"),
    ({"site": "mlp"}, "site must be one of resid, z"),
    ({"heads": (0,)}, "heads apply to the attention-output site"),
    ({"width": 0}, "width must be at least 1"),
    ({"architecture": "standard", "l1": -1.0}, "l1 must be at least 0"),
])
def test_bad_options_are_one_clear_error(kwargs, message):
    with pytest.raises(IllusionsError, match=message):
        make_simplifier("sae", **kwargs)


def test_top_k_and_kmeans_k_are_not_confused():
    from illusions.analyses.spec import AnalysisSpec, build_simplifiers
    from illusions.errors import InvalidOption

    assert make_simplifier("kmeans", k=5).k == 5
    assert make_simplifier("sae", top_k=4, width=32).top_k == 4
    with pytest.raises(IllusionsError, match="unknown SAE key"):
        make_simplifier("sae", k=5)
    with pytest.raises(IllusionsError, match="unknown KMeans key"):
        make_simplifier("kmeans", top_k=4)
    # In a spec, clusters are kmeans' k and top_k the SAE's; neither reaches the other method.
    (sae,) = build_simplifiers(AnalysisSpec(simplifier="sae", widths=(32,), top_k=4))
    assert (sae.width, sae.top_k) == (32, 4)
    (kmeans,) = build_simplifiers(AnalysisSpec(simplifier="kmeans", clusters=(4,)))
    assert kmeans.k == 4 and not hasattr(kmeans, "top_k")
    with pytest.raises(InvalidOption, match="does not apply to sae"):
        AnalysisSpec(simplifier="sae", clusters=(4,))
    with pytest.raises(InvalidOption, match="does not apply to kmeans"):
        AnalysisSpec(simplifier="kmeans", clusters=(4,), top_k=4)


def test_spec_records_sparse_options_only_for_dictionaries():
    from illusions.analyses.spec import SPARSE_FIELDS, AnalysisSpec

    svd = AnalysisSpec(simplifier="svd", ranks=(4,)).to_dict()
    assert not set(SPARSE_FIELDS) & set(svd) and "widths" not in svd  # as before these fields existed
    sae = AnalysisSpec(simplifier="sae", widths=(64,)).to_dict()
    assert {k: sae[k] for k in ("widths", "site", "architecture", "top_k")} == {
        "widths": [64], "site": "resid", "architecture": "topk", "top_k": 16}
    assert AnalysisSpec.from_dict(sae) == AnalysisSpec(simplifier="sae", widths=(64,))
    assert "site" not in AnalysisSpec(simplifier="transcoder").to_dict()  # the transcoder has no site


def test_transcoder_needs_an_mlp(tokens):
    attn_only = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=0, n_ctx=24,
                                        d_vocab=13), seed=0)
    with pytest.raises(IllusionsError, match="attention-only"):
        fit_proxy(attn_only, Transcoder(width=8, top_k=4, **QUICK), tokens, LENGTHS)


def test_spec_defaults_are_the_simplifiers():
    from illusions.analyses.run import AnalysisSpec

    spec = AnalysisSpec()
    for cls in (SAE, Transcoder):
        config = cls()
        for key in ("architecture", "top_k", "l1", "sae_steps", "sae_from"):
            assert getattr(spec, key) == getattr(config, key), (cls.name, key)
    assert spec.site == SAE().site
    assert SAE.sweep_param == Transcoder.sweep_param == "width"


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def dyck_env(tiny_dyck):
    return tiny_dyck.task, tiny_dyck.root


@pytest.mark.slow
def test_cli_reports_dictionary_metrics_per_split_and_rebuilds_the_report(dyck_env, tmp_path):
    from illusions.cli import app

    _, root = dyck_env
    runner = CliRunner()
    common = ["--model", str(root / "model"), "--fit-n", "50", "--n-boot", "20", "--threads", "1"]
    out = tmp_path / "run"
    result = runner.invoke(app, ["analyze", "dyck", "--simplify", "sae", "--layer", "1", "--width", "32",
                                 "--k", "4", "--sae-steps", "20", *common, "--out", str(out)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "explained var" in result.stdout and "new latents" in result.stdout and "sae(width=32)" in result.stdout
    doc = json.loads((out / "metrics.json").read_text())
    for entry in doc["splits"].values():
        for metric in SPARSE_METRICS:
            value, (low, high) = entry[metric]["value"], entry[metric]["ci"]
            assert low <= value <= high, metric
        assert 0 <= entry["dead_fraction"]["value"] <= 1 and entry["l0"]["value"] <= 4
    csv = (out / "metrics.csv").read_text()
    assert ",explained_variance," in csv and ",new_latent_fraction," in csv
    html = (out / "report.html").read_bytes()
    assert b"Sparse dictionary on each split" in html
    rebuilt = runner.invoke(app, ["report", str(out)], catch_exceptions=False)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (out / "report.html").read_bytes() == html

    sweep = runner.invoke(app, ["sweep", "dyck", "--simplify", "sae", "--widths", "8,16", "--site", "z",
                                "--sae-steps", "5", "--k", "4", *common, "--no-report", "--out", str(tmp_path / "sw"),
                                "--json"], catch_exceptions=False)
    assert sweep.exit_code == 0, sweep.output
    labels = [p["label"] for p in json.loads(sweep.stdout)["proxies"]]
    assert labels == ["sae(width=8)", "sae(width=16)"]

    bad = runner.invoke(app, ["analyze", "dyck", "--simplify", "sae", "--width", "4", *common,
                              "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--top-k must be in 1..4 (the dictionary width), got 16" in bad.output
    assert not (tmp_path / "bad").exists()


def test_other_proxies_rows_do_not_change_beside_a_dictionary(dyck_env):
    from illusions.analyses.faithfulness import METRICS, analyze
    from illusions.analyses.summary import summarize

    task, root = dyck_env
    from illusions.models import load_model

    model, _ = load_model(root / "model")
    kw = {"candidates": task.candidates, "fit_n": 60, "eval_splits": ["iid", "unseen_depth"], "max_seqs": 30}
    svd = make_simplifier("svd", rank=2)
    alone = summarize(analyze(model, task.splits(), [svd], **kw), n_boot=20)
    mixed = summarize(analyze(model, task.splits(), [svd, SAE(width=8, top_k=2, **QUICK)], **kw), n_boot=20)
    from illusions.analyses.warning_signals import WARNING_GROUP
    from illusions.metric_table import WARNING_METRICS

    assert {r["metric"] for r in alone if r["group_by"] != WARNING_GROUP} == set(METRICS)
    assert {r["metric"] for r in alone if r["group_by"] == WARNING_GROUP} == set(WARNING_METRICS)
    from illusions.analyses.run import rows_to_csv

    assert rows_to_csv([r for r in mixed if r["simplifier"] == "svd"]) == rows_to_csv(alone)  # NaN-safe
    sparse = {(r["split"], r["metric"]) for r in mixed if r["simplifier"] == "sae" and r["metric"] in SPARSE_METRICS}
    assert sparse == {(s, m) for s in ("iid", "unseen_depth") for m in SPARSE_METRICS}


def test_a_dictionary_whose_weights_do_not_fit_its_cfg_is_one_line(model, tokens, tmp_path):
    _lens_sae("standard", 32, 8, "blocks.1.hook_resid_pre").save_model(tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "cfg.json").read_text())
    cfg["d_sae"] = 12  # the weights hold 8 latents
    (tmp_path / "saved" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(IllusionsError, match="SAELens could not load it") as caught:
        fit_proxy(model, SAE(sae_from=str(tmp_path / "saved")), tokens, LENGTHS)
    assert "\n" not in str(caught.value) and "size mismatch" in str(caught.value)


@pytest.mark.parametrize("kind, tensor, value, simplifier", [
    ("standard", "W_dec", float("nan"), SAE),
    ("jumprelu_transcoder", "threshold", float("inf"), Transcoder),
])
def test_a_dictionary_with_non_finite_weights_is_refused(model, tokens, tmp_path, kind, tensor, value, simplifier):
    # Once a weight is NaN every reconstruction is NaN, and the metrics looked like a weak but real proxy.
    from safetensors.torch import load_file, save_file

    lens = _lens_sae(kind, 32, 8, "blocks.1.hook_resid_pre" if simplifier is SAE else "blocks.1.ln2.hook_normalized")
    if simplifier is Transcoder:
        lens.cfg.metadata.hook_name_out = "blocks.1.hook_mlp_out"
    lens.save_model(tmp_path / "saved")
    weights = tmp_path / "saved" / "sae_weights.safetensors"
    state = load_file(weights)
    state[tensor].view(-1)[0] = value
    save_file(state, weights)
    with pytest.raises(IllusionsError, match=f"tensor {tensor} holds 1 NaN or infinite value.*a dictionary with "
                                             "non-finite weights") as caught:
        fit_proxy(model, simplifier(sae_from=str(tmp_path / "saved")), tokens, LENGTHS)
    assert "\n" not in str(caught.value)
