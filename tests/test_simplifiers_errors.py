"""Bad simplifier input: one IllusionsError each, stating the valid range; building by registry name."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from illusions.errors import IllusionsError
from illusions.models import build_model
from illusions.registry import make_simplifier
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

LENGTHS = torch.tensor([16, 10, 12, 5, 16, 8])


@pytest.mark.parametrize(
    ("simplifier", "message"),
    [
        (SVD(rank=9), r"rank must be in 1\.\.8, got 9"),
        (WeightSVD(rank=9), r"rank must be in 1\.\.8, got 9"),
        (ResidSVD(rank=33), r"rank must be in 1\.\.32, got 33"),
        (SVD(targets=Targets(layers=(2,))), r"layer 2 does not exist; this model has 2 layers: 0\.\.1, or -2\.\.-1"),
        (SVD(targets=Targets(layers=(-3,))), r"layer -3 does not exist; this model has 2 layers: 0\.\.1, or -2\.\.-1"),
        (KMeans(targets=Targets(heads=(0, 4))), r"head 4 does not exist; this model has heads 0\.\.3"),
        (OneHot(targets=Targets(layers=(5,))), r"layers: 0\.\.1"),
    ],
    ids=lambda v: v.name if hasattr(v, "name") else "",
)
def test_out_of_range_against_the_model(tiny_model, simplifier, message):
    with pytest.raises(IllusionsError, match=message):
        simplifier.hook_names(tiny_model)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SVD(rank=0), r"rank must be at least 1, got 0"),
        (lambda: KMeans(k=0), r"k must be at least 1, got 0"),
        (lambda: SVD(basis="shared"), r"basis must be one of separate, joint"),
        (lambda: Targets(qk="v"), r"qk must be one of q, k, qk, got 'v'"),
        (lambda: Targets(resid="resid_final"), r"resid must be one of resid_pre, resid_mid, resid_post"),
        (lambda: Targets(heads=(-1,)), r"heads must be non-negative integers or 'all'"),
        (lambda: Targets(layers="last"), r"layers must be a list of integers or 'all'"),
        (lambda: Targets(heads=(1, 1)), r"heads lists a value twice"),
        (lambda: SVD(targets=42), r"targets must be a Targets"),
    ],
)
def test_bad_values_raise_at_construction(build, message):
    with pytest.raises(IllusionsError, match=message):
        build()


def test_more_clusters_than_distinct_points(tiny_model, tiny_tokens):
    # Layer-0 queries depend only on (token, position): count the distinct ones, ask for one more.
    from illusions.activations import collect

    name = "blocks.0.attn.hook_q"
    acts = collect(tiny_model, tiny_tokens, [name], LENGTHS)[name]
    distinct = torch.unique(acts[:, 0], dim=0).shape[0]
    assert distinct < int(LENGTHS.sum())
    with pytest.raises(IllusionsError, match=rf"k={distinct + 1} exceeds the {distinct} distinct .* 1\.\.{distinct}"):
        fit_proxy(tiny_model, KMeans(k=distinct + 1, targets=Targets(layers=(0,), heads=(0,), qk="q")),
                  tiny_tokens, LENGTHS)
    with pytest.raises(IllusionsError, match=r"k=1000 exceeds"):
        fit_proxy(tiny_model, ResidKMeans(k=1000), tiny_tokens, LENGTHS)


def test_resid_mid_on_an_attention_only_model(tiny_config):
    model = build_model(tiny_config.replace(d_mlp=0), seed=0)
    with pytest.raises(IllusionsError, match=r"no blocks.1.hook_resid_mid.*valid resid values: resid_post, resid_pre"):
        ResidSVD(targets=Targets(resid="resid_mid")).hook_names(model)


@pytest.mark.tl3  # TransformerLens 4's native bridge builds no rotary illusions model (backends/tl4.py)
def test_weight_svd_refuses_rotary(tiny_config):
    model = build_model(tiny_config.replace(positional_embedding="rotary"), seed=0)
    with pytest.raises(IllusionsError, match="rotary"):
        WeightSVD(rank=2).fit(model)


def test_fit_without_the_needed_activations(tiny_model):
    with pytest.raises(IllusionsError, match=r"svd needs activations at blocks.1.attn.hook_q"):
        SVD().fit(tiny_model, {})


def test_make_simplifier_by_name():
    s = make_simplifier("svd", rank=4, centered=False, layers=(0, 1), heads="all", qk="q")
    assert s == SVD(rank=4, centered=False, targets=Targets(layers=(0, 1), heads="all", qk="q"))
    assert make_simplifier("kmeans", k=16, seed=3, heads=[2, 0]) == KMeans(k=16, seed=3, targets=Targets(heads=(0, 2)))
    assert make_simplifier("onehot", targets={"heads": [1]}) == OneHot(targets=Targets(heads=(1,)))
    assert make_simplifier("onehot", targets=Targets(heads=(1,)), layers=(0,)) == OneHot(targets=Targets(layers=(0,), heads=(1,)))
    assert make_simplifier("resid-svd", rank=8, resid="resid_post").targets.resid == "resid_post"
    assert make_simplifier("weight-svd").data_free


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("pca", {}, r"unknown simplifier 'pca'; known simplifiers: circuit, kmeans, onehot, resid-kmeans, resid-svd, sae, svd, transcoder, weight-svd"),
        ("svd", {"ranks": 4}, r"unknown SVD key\(s\) ranks; known keys: rank, centered, basis, targets"),
        ("svd", {"rank": "four"}, r"SVD.rank must be an integer, got 'four'"),
        ("svd", {"centered": "maybe"}, r"SVD.centered must be true or false"),
        ("svd", {"layers": "0,x"}, r"layers must be a list of integers or 'all'"),
        ("kmeans", {"k": 2.5}, r"KMeans.k must be an integer"),
        ("svd", {"targets": {"head": [1]}}, r"unknown Targets key\(s\) head"),
        ("kmeans", {"centered": False}, r"unknown KMeans key\(s\) centered"),
        ("onehot", {"rank": 3}, r"unknown OneHot key\(s\) rank; known keys: targets"),
        ("onehot", {"qk": "q"}, r"onehot does not take qk \(it targets layers, heads\)"),
        ("resid-svd", {"heads": (1,)}, r"resid-svd does not take heads \(it targets layers, resid\)"),
        ("circuit", {"layers": (0,), "keep": ("L1H0",)},
         r"circuit does not take layers \(it targets no layers, heads, queries/keys or residual hook\)"),
    ],
)
def test_make_simplifier_errors(name, params, message):
    with pytest.raises(IllusionsError, match=message):
        make_simplifier(name, **params)


def test_every_method_declares_its_sweep_and_targets():
    from illusions.registry import SIMPLIFIERS, get_simplifier

    declared = {name: (get_simplifier(name).sweep_param, get_simplifier(name).target_keys) for name in SIMPLIFIERS}
    assert declared == {
        "svd": ("rank", ("layers", "heads", "qk")),
        "kmeans": ("k", ("layers", "heads", "qk")),
        "onehot": ("", ("layers", "heads")),
        "resid-svd": ("rank", ("layers", "resid")),
        "resid-kmeans": ("k", ("layers", "resid")),
        "weight-svd": ("rank", ("layers", "heads", "qk")),
        "sae": ("width", ("layers", "heads", "resid")),
        "transcoder": ("width", ("layers",)),
        "circuit": ("", ()),
    }
    for name, (param, _) in declared.items():
        fields = {f.name for f in dataclasses.fields(get_simplifier(name))}
        assert param == "" or param in fields, name


def test_the_simplifiers_package_never_imports_the_registry():
    """Layers point one way: the registry knows the simplifiers, not the other way round."""
    import ast
    from pathlib import Path

    import illusions.simplifiers as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "illusions.registry" and "registry" not in [a.name for a in node.names], path


def test_params_round_trip_through_from_dict(tiny_model, tiny_tokens):
    proxy = fit_proxy(tiny_model, SVD(rank=2, targets=Targets(heads=(1, 3))), tiny_tokens, LENGTHS)
    params = json.loads(json.dumps(proxy.params))
    assert params["targets"] == {"layers": [1], "heads": [1, 3], "qk": "qk", "resid": "resid_pre"}
    rebuilt = SVD.from_dict(params)
    assert rebuilt == SVD(rank=2, targets=Targets(layers=(1,), heads=(1, 3)))
    refit = fit_proxy(tiny_model, rebuilt, tiny_tokens, LENGTHS)
    a = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=proxy.fwd_hooks)
    assert torch.equal(a, tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=refit.fwd_hooks))


def test_loading_something_that_is_not_a_proxy(tmp_path, tiny_model):
    with pytest.raises(IllusionsError, match="does not exist"):
        Proxy.load(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "proxy.json").write_text('{"format": "something-else"}')
    with pytest.raises(IllusionsError, match="is not an illusions proxy"):
        Proxy.load(tmp_path / "bad")
    OneHot().fit(tiny_model).save(tmp_path / "ok")
    (tmp_path / "ok" / "proxy.safetensors").write_bytes(b"garbage")
    with pytest.raises(IllusionsError, match="proxy.safetensors does not match the sha256 recorded"):
        Proxy.load(tmp_path / "ok")
    (tmp_path / "ok" / "manifest.json").unlink()  # a proxy saved before manifests: safetensors' own check
    with pytest.raises(IllusionsError, match="not a readable safetensors file"):
        Proxy.load(tmp_path / "ok")


def test_a_proxy_checks_the_model_it_runs_on(tiny_model, tiny_tokens, tiny_config):
    for simplifier in (SVD(rank=2), ResidSVD(rank=2), KMeans(k=3), WeightSVD(rank=2), OneHot()):
        proxy = fit_proxy(tiny_model, simplifier, tiny_tokens, LENGTHS)
        proxy.check(tiny_model)
    narrow = build_model(tiny_config.replace(d_head=4), seed=0)
    with pytest.raises(IllusionsError, match=r"fitted on 8-wide vectors at blocks.1.attn.hook_q, but the model's are 4-wide"):
        fit_proxy(tiny_model, SVD(rank=2), tiny_tokens, LENGTHS).check(narrow)
    with pytest.raises(IllusionsError, match=r"fitted on 32-wide vectors"):
        fit_proxy(tiny_model, ResidSVD(rank=2), tiny_tokens, LENGTHS).check(build_model(tiny_config.replace(d_model=16), seed=0))
    two_heads = build_model(tiny_config.replace(n_heads=2, d_model=16), seed=0)
    with pytest.raises(IllusionsError, match=r"acts on head 3 at blocks.1.attn.hook_pattern.*heads 0\.\.1"):
        OneHot().fit(tiny_model).check(two_heads)
    one_layer = build_model(tiny_config.replace(n_layers=1), seed=0)
    with pytest.raises(IllusionsError, match=r"unknown hook 'blocks.1.attn.hook_q'.*layers 0\.\.0"):
        fit_proxy(tiny_model, SVD(rank=2), tiny_tokens, LENGTHS).check(one_layer)


def test_every_method_satisfies_the_protocol():
    from illusions.registry import SIMPLIFIERS, get_simplifier
    from illusions.simplifiers import Simplifier

    for name in SIMPLIFIERS:
        cls = get_simplifier(name)
        made = cls(keep=("all",)) if name == "circuit" else cls()  # a circuit names what it keeps
        assert cls.name == name and isinstance(made, Simplifier)
        assert cls.data_free == (name in ("onehot", "weight-svd"))
