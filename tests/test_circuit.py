"""The circuit simplifier (illusions.simplifiers.circuit): invariances first, then the search.

Keeping everything is the identity; keeping nothing is the mean-ablated model (every head output and
MLP output replaced by its fitting mean, checked against a hand-written ablation); the greedy search
is deterministic and keeps the agreement it promises on the fitting data, or says it could not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from illusions.analyses.faithfulness import analyze, fit_proxies
from illusions.errors import IllusionsError, InvalidOption
from illusions.simplifiers.base import Proxy
from illusions.simplifiers.circuit import Circuit, components, search_order


@pytest.fixture(scope="module")
def fitted(tiny_dyck):
    splits = tiny_dyck.task.splits()
    rows = np.arange(40)
    return tiny_dyck.model, splits, rows


def _tokens(splits, n=8):
    return torch.as_tensor(splits["iid"].tokens[:n])


def test_keeping_every_component_is_the_identity(fitted):
    model, splits, rows = fitted
    proxy = fit_proxies(model, splits["train"], rows, [Circuit(keep=("all",))])[0]
    tokens = _tokens(splits)
    assert torch.equal(model(tokens), model.run_with_hooks(tokens, fwd_hooks=proxy.fwd_hooks))
    assert proxy.info["ablated"] == [] and proxy.info["kept"] == components(model)


def test_keeping_nothing_is_the_mean_ablated_model(fitted):
    from illusions.activations import collect

    model, splits, rows = fitted
    proxy = fit_proxies(model, splits["train"], rows, [Circuit(keep=("none",))])[0]
    split = splits["train"]
    tokens = torch.as_tensor(split.tokens[rows, : int(split.lengths[rows].max())])
    mask = torch.as_tensor(np.arange(tokens.shape[1])[None, :] < split.lengths[rows][:, None])
    names = [n for layer in range(model.cfg.n_layers) for n in (f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out")]
    means = {n: a.double().mean(0).float() for n, a in collect(model, tokens, names, mask).items()}

    def ablate(name):
        return lambda act, hook: means[name].expand_as(act).clone()

    x = _tokens(splits)
    by_hand = model.run_with_hooks(x, fwd_hooks=[(n, ablate(n)) for n in names])
    assert torch.allclose(model.run_with_hooks(x, fwd_hooks=proxy.fwd_hooks), by_hand, atol=1e-5)
    assert proxy.info["kept"] == [] and proxy.params["keep"] == ["none"]


def test_a_kept_head_passes_through_and_zero_ablation_zeroes_the_rest(fitted):
    model, splits, rows = fitted
    proxy = Circuit(keep=("L1H0", "mlp1"), ablation="zero").fit(model, {})
    seen = {}

    def grab(name):
        def hook(act, hook):  # keyed by the name asked for (a TransformerLens 4 bridge names hooks its own way)
            seen[name] = act.clone()
        return hook

    x = _tokens(splits)
    model.run_with_hooks(x, fwd_hooks=[*proxy.fwd_hooks, ("blocks.1.attn.hook_z", grab("blocks.1.attn.hook_z")),
                                       ("blocks.0.hook_mlp_out", grab("blocks.0.hook_mlp_out"))])
    clean_z = model.run_with_cache(x, names_filter="blocks.1.attn.hook_z")[1]["blocks.1.attn.hook_z"]
    z = seen["blocks.1.attn.hook_z"]
    assert torch.all(z[:, :, 1] == 0) and torch.all(seen["blocks.0.hook_mlp_out"] == 0)
    # the kept head is not replaced: it is what layer 1 computes from the (ablated) layer 0 below it
    assert z[:, :, 0].abs().sum() > 0 and clean_z.shape == z.shape
    assert proxy.info["ablated"] == ["L0H0", "L0H1", "mlp0", "L1H1"]


def test_resample_is_deterministic_and_draws_fitting_activations(fitted):
    model, splits, rows = fitted
    a, b = (fit_proxies(model, splits["train"], rows, [Circuit(keep=("none",), ablation="resample", seed=3)])[0]
            for _ in range(2))
    c = fit_proxies(model, splits["train"], rows, [Circuit(keep=("none",), ablation="resample", seed=4)])[0]
    x = _tokens(splits)
    out_a, out_b = (model.run_with_hooks(x, fwd_hooks=p.fwd_hooks) for p in (a, b))
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, model.run_with_hooks(x, fwd_hooks=c.fwd_hooks))
    # batching does not matter: the first sequences alone give the same output
    assert torch.allclose(model.run_with_hooks(x[:3], fwd_hooks=a.fwd_hooks), out_a[:3], atol=1e-5)


def test_saved_circuit_loads_identically(fitted, tmp_path):
    model, splits, rows = fitted
    proxy = fit_proxies(model, splits["train"], rows, [Circuit(keep=("L0H1", "mlp0"), ablation="resample")])[0]
    loaded = Proxy.load(proxy.save(tmp_path / "circuit"))
    x = _tokens(splits)
    assert torch.equal(model.run_with_hooks(x, fwd_hooks=proxy.fwd_hooks),
                       model.run_with_hooks(x, fwd_hooks=loaded.fwd_hooks))


def test_search_is_deterministic_keeps_its_threshold_and_is_what_it_reports(fitted, tiny_dyck):
    model, splits, _ = fitted
    kw = {"candidates": tiny_dyck.task.candidates, "fit_n": 40, "eval_splits": ["iid"], "max_seqs": 10}
    runs = [analyze(model, splits, [Circuit(find_circuit=0.9)], **kw) for _ in range(2)]
    proxy = runs[0].proxies[0]
    assert proxy.params == runs[1].proxies[0].params
    search = proxy.info["circuit_search"]
    assert search["agreement"] >= 0.9 and search["reached"] and search["order"] == search_order(model)
    assert [s["component"] for s in search["steps"]] == search_order(model)
    removed = {s["component"] for s in search["steps"] if s["removed"]}
    assert set(proxy.info["ablated"]) == removed
    assert proxy.params["keep"] == (proxy.info["kept"] or ["none"]) and proxy.params["find_circuit"] == 0.9
    # the order of the model's components is the search's reversed, layer by layer
    assert search_order(model)[0] == f"mlp{model.cfg.n_layers - 1}"


def test_the_search_collects_the_fitting_activations_once_and_finds_what_a_fresh_collection_finds(
        fitted, tiny_dyck, monkeypatch):
    """The fit's collection is the only pass that collects activations over the fitting sequences; the
    circuit, its search and every metric are those of a search on activations collected afresh (the
    way the search ran when it collected them a second time)."""
    import illusions.activations as activations
    from illusions.analyses.run import rows_to_csv
    from illusions.analyses.summary import summarize
    from illusions.simplifiers.circuit import greedy_search

    model, splits, _ = fitted
    real, collected = activations.collect, []

    def counting(model, tokens, names, mask, **kw):
        collected.append((int(tokens.shape[0]), tuple(names)))
        return real(model, tokens, names, mask, **kw)

    monkeypatch.setattr(activations, "collect", counting)
    kw = {"candidates": tiny_dyck.task.candidates, "fit_n": 40, "eval_splits": ["iid"], "max_seqs": 10}
    circuit = Circuit(find_circuit=0.5, ablation="resample", seed=1)  # removes L1H1, L1H0
    result = analyze(model, splits, [circuit], **kw)
    monkeypatch.undo()
    # One collection of the 40 fitting sequences (beside the memory check's one-sequence probe).
    assert [c for c in collected if c[0] > 1] == [(40, tuple(sorted(circuit.hook_names(model))))]
    # The search as it ran on a second collection of the same fitting sequences.
    split, rows = splits["train"], result.fit_rows
    order = rows[np.argsort(split.lengths[rows], kind="stable")]
    tokens = torch.as_tensor(split.tokens[order, : int(split.lengths[order].max())])
    mask = torch.as_tensor(np.arange(tokens.shape[1])[None, :] < split.lengths[order][:, None])
    every = circuit.ablations(model, real(model, tokens, circuit.hook_names(model), mask))
    kept, steps, final = greedy_search(model, circuit, every, split, rows, candidates=tiny_dyck.task.candidates)
    search = result.proxies[0].info["circuit_search"]
    assert result.proxies[0].info["kept"] == kept and search["steps"] == steps and search["agreement"] == final
    assert 0 < len(kept) < len(components(model)), "a search that removes some components, not all"
    fresh = analyze(model, splits, [circuit.proxy(model, every, kept)], **kw)
    assert rows_to_csv(summarize(fresh, n_boot=30)) == rows_to_csv(summarize(result, n_boot=30))


def test_the_search_unembeds_only_the_scored_rows_of_rows_with_any_and_finds_what_full_logits_find(
        fitted, tiny_dyck, monkeypatch):
    """Each pass of the search ends at the final residual and unembeds the scored positions only (never a
    ``[batch, pos, vocabulary]`` block), on rows cut after their last scored position; the steps and the
    circuit are those of whole passes with full logits."""
    import illusions.backends
    import illusions.scoring
    from illusions.backends import uses_bridge
    from illusions.simplifiers.circuit import greedy_search

    if uses_bridge():
        pytest.skip("a TransformerBridge computes its logits everywhere (backends.unembeds_rows)")
    model, splits, _ = fitted
    split, rows = splits["train"], np.arange(40)
    circuit = Circuit(find_circuit=0.5, ablation="resample", seed=1)
    every = {h.hook_name: h for h in fit_proxies(model, split, rows, [circuit])[0].hooks}
    shapes = []
    forward = model.unembed.forward
    monkeypatch.setattr(model.unembed, "forward", lambda x: shapes.append(tuple(x.shape)) or forward(x))
    got = greedy_search(model, circuit, every, split, rows, candidates=tiny_dyck.task.candidates)
    assert shapes and all(s[0] == 1 for s in shapes), shapes  # [1, n_scored, d_model] rows only
    n_scored = int(np.isin(split.scored.seq, rows).sum())
    passes = 1 + len(got[1]) + 1  # the clean pass, one per component tried, the final agreement
    assert sum(s[1] for s in shapes) == passes * n_scored
    # The whole-pass path: full logits of whole rows, gathered afterwards.
    whole = illusions.scoring.iter_batches
    monkeypatch.setattr(illusions.backends, "unembeds_rows", lambda model: False)
    monkeypatch.setattr(illusions.scoring, "iter_batches", lambda *a, **k: whole(*a, **{**k, "scored_only": False}))
    want = greedy_search(model, circuit, every, split, rows, candidates=tiny_dyck.task.candidates)
    assert got == want and 0 < len(got[0]) < len(components(model))


def test_a_search_needs_the_fitted_proxy_that_ablates_everything(fitted, tiny_dyck):
    model, splits, rows = fitted
    partial = fit_proxies(model, splits["train"], rows, [Circuit(keep=("L1H0",))])[0]
    with pytest.raises(IllusionsError, match="every component ablated"):
        Circuit(find_circuit=0.9).refine(model, partial, splits["train"], rows, candidates=tiny_dyck.task.candidates)


def test_the_search_at_threshold_one_of_an_exact_model_removes_only_what_changes_nothing(fitted, tiny_dyck):
    model, splits, _ = fitted
    kw = {"candidates": tiny_dyck.task.candidates, "fit_n": 20, "eval_splits": ["iid"], "max_seqs": 5}
    proxy = analyze(model, splits, [Circuit(find_circuit=1.0)], **kw).proxies[0]
    assert all(s["agreement"] == 1.0 for s in proxy.info["circuit_search"]["steps"] if s["removed"])


@pytest.mark.parametrize("kwargs, message", [
    ({}, "circuit needs the components to keep"),
    ({"keep": ("L1H0", "all")}, "stands alone"),
    ({"keep": ("head3",)}, "unknown component 'head3'"),
    ({"keep": ("L1H0", "L1H0")}, "twice"),
    ({"keep": ("all",), "ablation": "median"}, "ablation must be one of mean, resample, zero"),
    ({"find_circuit": 1.5}, "find_circuit must be an agreement"),
])
def test_bad_circuit_options_are_refused(kwargs, message):
    with pytest.raises(IllusionsError, match=message):
        Circuit(**kwargs)


def test_components_the_model_lacks_are_refused(fitted):
    model, _, _ = fitted
    with pytest.raises(IllusionsError, match="component L5H0 does not exist; this model has layers 0..1"):
        Circuit(keep=("L5H0",)).hook_names(model)


def test_spec_passes_circuit_options_and_refuses_them_elsewhere():
    from illusions.analyses.spec import AnalysisSpec

    spec = AnalysisSpec(simplifier="circuit", keep=["L1H0", "mlp0"], ablation="resample", seed=2)
    assert spec.simplifiers[0] == Circuit(keep=("L1H0", "mlp0"), ablation="resample", seed=2)
    assert spec.to_dict()["keep"] == ["L1H0", "mlp0"]
    assert "keep" not in AnalysisSpec().to_dict() and "find_circuit" not in AnalysisSpec().to_dict()
    with pytest.raises(InvalidOption, match="does not apply to svd"):
        AnalysisSpec(simplifier="svd", keep=("L1H0",))
    with pytest.raises(InvalidOption, match="circuit needs"):
        AnalysisSpec(simplifier="circuit")


@pytest.mark.parametrize("args, message", [
    (["--simplify", "circuit"], "error: circuit needs the components to keep"),
    (["--simplify", "circuit", "--keep", "L9H0"], "error: component L9H0 does not exist; this model has layers 0..1"),
    (["--simplify", "circuit", "--keep", "all", "--ablation", "median"], "ablation must be one of mean, resample, zero"),
    (["--simplify", "svd", "--keep", "L1H0"], "error: --keep does not apply to svd"),
])
def test_cli_refuses_bad_circuit_options_in_one_line(tiny_dyck, tmp_path, args, message):
    from typer.testing import CliRunner

    from illusions.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["analyze", "dyck", "--model", str(tiny_dyck.root / "model"), *args,
                                      "--out", str(out), "--threads", "1", "--max-seqs", "5", "--fit-n", "10"])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_prints_the_found_circuit_and_its_table(tiny_dyck, tmp_path):
    import json

    from typer.testing import CliRunner

    from illusions.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["analyze", "dyck", "--model", str(tiny_dyck.root / "model"), "--simplify",
                                      "circuit", "--find-circuit", "0.9", "--out", str(out), "--threads", "1",
                                      "--max-seqs", "5", "--fit-n", "20", "--no-report", "--split", "iid"])
    assert result.exit_code == 0, result.output
    keep = json.loads((out / "metrics.json").read_text())["params"]["keep"]
    assert f"circuit: keeps {0 if keep == ['none'] else len(keep)} of 6 components" in result.output
    assert "found by greedy pruning" in result.output and "iid" in result.output


def test_a_search_that_cannot_reach_its_target_says_so(tiny_dyck, tmp_path):
    """Starting from a circuit below the target, nothing can be pruned: the proxy is the starting circuit,
    recorded as short of the target, and the CLI says it did not reach it (it printed '0.055 >= 1.0')."""
    import json

    from typer.testing import CliRunner

    from illusions.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["analyze", "dyck", "--model", str(tiny_dyck.root / "model"), "--simplify",
                                      "circuit", "--keep", "none", "--find-circuit", "1.0", "--out", str(out),
                                      "--threads", "1", "--max-seqs", "5", "--fit-n", "20", "--no-report",
                                      "--split", "iid"])
    assert result.exit_code == 0, result.output
    search = json.loads((out / "proxies" / "00" / "proxy.json").read_text())["info"]["circuit_search"]
    assert search["agreement"] < 1.0 and search["reached"] is False and search["steps"] == []
    said = " ".join(result.output.split())
    assert "found by greedy pruning" not in said and ">= 1.0" not in said
    assert (f"did not reach agreement 1.0: the circuit it starts from (--keep) agrees {search['agreement']:.3f} "
            "with the model and it has no component to remove") in said


def test_an_agreement_is_printed_on_its_side_of_the_target():
    from illusions.cli.tables import _beside

    assert _beside(0.8996, 0.9) == "0.8996" and _beside(0.064, 0.9) == "0.064" and _beside(0.9, 0.9) == "0.900"
    assert _beside(0.90004, 0.90001) == "0.90004"  # 0.900 would print it short of the target it reached
