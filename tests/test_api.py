"""The public API (``import illusions as il``): evaluate any model, hypothesis and splits, and its guards.

Each guard of issue 26 has a test here that fails without it: hooks never see a tensor another proxy
or the clean run reuses, the first layer comes from the hook names, a hook that never fires is an
error, a missing reference split is an error, hook names are checked with suggestions.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import illusions as il
from illusions.errors import IllusionsError
from illusions.models import ModelConfig, build_model

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(), seed=0)


@pytest.fixture(scope="module")
def splits(model):
    g = torch.Generator().manual_seed(0)
    v = model.cfg.d_vocab
    return {"train": torch.randint(0, v, (48, 16), generator=g), "iid": torch.randint(0, v, (24, 16), generator=g),
            "long": torch.randint(0, v, (24, 40), generator=g)}


def _overall(res, label, split, metric="agreement"):
    return res._row(label, split, metric)["value"]


def _identity(act, hook):
    return act


def _zero_in_place(act, hook):
    act.zero_()  # edits its input and returns None (TransformerLens keeps the edited tensor)


def test_in_place_hook_does_not_reach_the_next_proxy(model, splits):
    # Issue 26: an identity proxy agreed 0.139 after an in-place zeroing proxy (1.000 when run first).
    name = "blocks.1.hook_resid_pre"
    res = il.evaluate(model, {"zero": [(name, _zero_in_place)], "same": [(name, _identity)]}, splits,
                      n_boot=20, progress=False)
    assert _overall(res, "zero", "long") < 0.9  # the zeroing proxy does change predictions
    for split in ("iid", "long"):
        assert _overall(res, "same", split) == 1.0
        assert _overall(res, "same", split, "kl") == pytest.approx(0.0, abs=1e-9)
    first = il.evaluate(model, {"same": [(name, _identity)], "zero": [(name, _zero_in_place)]}, splits,
                        n_boot=20, progress=False)
    assert _overall(first, "zero", "long") == _overall(res, "zero", "long")  # independent of proxy order


def test_in_place_hook_on_embeddings_leaves_the_model_alone(model, splits):
    before = model(splits["iid"][:2]).detach().clone()
    il.evaluate(model, [("hook_pos_embed", _zero_in_place)], splits, n_boot=10, progress=False)
    assert torch.equal(model(splits["iid"][:2]), before)


class _WrongFirstLayer:
    """A proxy object as a user might build one: hooks in block 0, a stale first_layer of 1."""

    first_layer = 1
    heads: list = []  # noqa: RUF012
    simplifier = "mine"
    params: dict = {}  # noqa: RUF012

    def __init__(self, pairs):
        self.fwd_hooks = pairs


def _direct_agreement(model, tokens, pairs):
    clean = model(tokens).argmax(-1)[:, :-1]
    with torch.inference_mode():
        hooked = model.run_with_hooks(tokens, fwd_hooks=pairs).argmax(-1)[:, :-1]
    return float((clean == hooked).float().mean())


def _shuffle_keys(k, hook):
    return k.flip(1)


def test_first_layer_comes_from_the_hook_names(model, splits):
    # A stale first_layer used to start the pass after the hook: it never fired, agreement 1.000.
    pairs = [("blocks.0.attn.hook_k", _shuffle_keys)]
    res = il.evaluate(model, _WrongFirstLayer(pairs), splits, n_boot=10, progress=False)
    assert _overall(res, "mine", "iid") == pytest.approx(_direct_agreement(model, splits["iid"], pairs))
    assert _overall(res, "mine", "iid") < 1.0


def _double(x, hook):
    return 2 * x


@pytest.mark.parametrize("hook_name", ["hook_embed", "hook_pos_embed", "ln_final.hook_normalized"])
def test_hooks_outside_the_blocks_run_a_full_forward_pass(model, splits, hook_name):
    pairs = [(hook_name, _double if hook_name != "hook_pos_embed" else _shuffle_pos)]
    res = il.evaluate(model, pairs, splits, n_boot=10, progress=False)
    assert _overall(res, "hooks", "iid") == pytest.approx(_direct_agreement(model, splits["iid"], pairs))


def _shuffle_pos(x, hook):
    return x.flip(1)


@pytest.mark.tl3  # TransformerLens 4's bridge refuses such a hook itself when it is added
def test_a_hook_that_never_fires_is_an_error(model, splits):
    # hook_result exists in hook_dict but runs only with use_attn_result: agreement would be 1.000.
    assert "blocks.0.attn.hook_result" in model.hook_dict
    with pytest.raises(IllusionsError, match=r"never ran in a forward pass"):
        il.evaluate(model, [("blocks.0.attn.hook_result", _double)], splits, n_boot=10, progress=False)


def test_a_missing_reference_split_is_an_error(model, splits):
    renamed = {"train": splits["train"], "in_dist": splits["iid"], "long": splits["long"]}
    with pytest.raises(IllusionsError, match=r"reference split 'iid' is not among the evaluated splits \(in_dist, long\)"):
        il.evaluate(model, il.onehot(), renamed, n_boot=10, progress=False)
    res = il.evaluate(model, il.onehot(), renamed, reference="in_dist", n_boot=10, progress=False)
    assert np.isfinite(res._row("onehot", "long", "agreement")["gap_vs_ref"])


def test_the_engine_refuses_a_missing_reference(model, splits):
    from illusions.analyses.engine import measure
    from illusions.api.data import as_splits

    data, _ = as_splits({"train": splits["train"], "long": splits["long"]}, model)
    with pytest.raises(IllusionsError, match="reference split 'iid'"):
        measure(model, data, [il.onehot()], candidates=None, reference="iid", n_boot=10)


def test_hook_names_are_checked_with_suggestions(model, splits):
    with pytest.raises(IllusionsError, match=r"unknown hook 'blocks.0.attn.hook_key'.*did you mean blocks.0.attn.hook_k"):
        il.evaluate(model, [("blocks.0.attn.hook_key", _double)], splits, n_boot=10, progress=False)


def test_data_free_proxies_need_no_fitting_split(model, splits):
    res = il.evaluate(model, [il.onehot(layers=[0]), il.weight_svd(rank=2)], {"iid": splits["iid"], "long": splits["long"]},
                      n_boot=10, progress=False)
    assert res.labels == ["onehot@L0H0+L0H1+L0H2+L0H3", "weight-svd(rank=2)@L1H0+L1H1+L1H2+L1H3"]
    with pytest.raises(IllusionsError, match=r"fit split 'train' not found \(the data svd is fitted on\)"):
        il.evaluate(model, il.svd(rank=2), {"iid": splits["iid"], "long": splits["long"]}, progress=False)


def test_several_proxies_in_one_table_and_a_sweep(model, splits):
    res = il.evaluate(model, [[("blocks.0.attn.hook_k", _shuffle_keys)], il.svd(rank=[1, 4], layers=[1])], splits,
                      n_boot=10, progress=False)
    assert res.labels == ["hooks", "svd(rank=1)", "svd(rank=4)"]
    frame = res.to_pandas()
    from illusions.analyses.summary import ROW_FIELDS

    assert list(frame.columns) == list(ROW_FIELDS)
    assert set(frame["proxy"]) == set(res.labels)
    wide = res.table()
    assert wide.loc[("svd(rank=1)", "long"), "agreement"] == _overall(res, "svd(rank=1)", "long")
    # The hand-written proxy changes layer 0's keys: the JSD covers layer 0's heads.
    assert [tuple(h) for h in res.proxies[0].heads] == [(0, h) for h in range(4)]
    assert np.isfinite(_overall(res, "hooks", "long", "attention_jsd"))


def test_fit_data_given_apart(model, splits):
    res = il.evaluate(model, il.svd(rank=2, layers=[1]), {"iid": splits["iid"], "long": splits["long"]},
                      fit=splits["train"], n_boot=10, progress=False)
    same = il.evaluate(model, il.svd(rank=2, layers=[1]), splits, n_boot=10, progress=False)
    assert res.to_pandas().equals(same.to_pandas())


def test_split_forms_and_scoring(model):
    v = model.cfg.d_vocab
    rng = np.random.default_rng(0)
    ragged = [rng.integers(1, v, int(n)).tolist() for n in rng.integers(3, 12, 20)]
    padded = np.zeros((20, 12), dtype=np.int64)
    lengths = np.array([len(r) for r in ragged])
    for i, r in enumerate(ragged):
        padded[i, : len(r)] = r
    res = il.evaluate(model, il.onehot(), {"iid": ragged, "long": (padded, lengths)}, n_boot=10, progress=False)
    assert res.to_pandas().equals(il.evaluate(model, il.onehot(), {"iid": ragged, "long": ragged}, n_boot=10,
                                              progress=False).to_pandas())
    n_scored = int((lengths - 1).sum())
    assert res._row("onehot", "long", "agreement")["n_positions"] == n_scored
    # pad=: rows end at their last non-pad token; score/targets restrict and set the answers.
    res = il.evaluate(model, il.onehot(), {"iid": padded, "long": padded}, pad=0, n_boot=10, progress=False,
                      score=lambda ids: [len(ids) - 1], targets=lambda ids, pos: [5] * len(pos),
                      candidates=[5, 6, 7])
    row = res._row("onehot", "long", "original_accuracy")
    assert row["n_positions"] == 20
    rec = res.records[("long", 0)]
    assert set(rec.target) == {5} and set(rec.original_pred) <= {5, 6, 7}
    assert list(rec.pos) == sorted(lengths - 1) or sorted(rec.pos) == sorted(lengths - 1)


@pytest.mark.parametrize(("splits_", "kwargs", "message"), [
    ({"iid": [[1, 2, 99]]}, {}, r"token id|tokens"),
    ({"iid": [[1, 2, 3]]}, {"score": {"iid": [[2]]}}, r"score position 2 is out of range 0..1"),
    ({"iid": [[1, 2, 3]]}, {"score": {"long": [[0]]}}, r"score names split\(s\) long"),
    ({"iid": np.ones((2, 3), dtype=np.float32)}, {}, r"tokens must be integers"),
    ({"iid": [[1, 2, 3]]}, {"candidates": [1, 1]}, r"candidates lists a token id twice"),
    ({"iid": [[1, 2, 3]]}, {"fit": "nope"}, r"fit names split 'nope'"),
])
def test_bad_splits_are_one_clear_error(model, splits_, kwargs, message):
    with pytest.raises(IllusionsError, match=message):
        il.evaluate(model, il.onehot(), splits_, reference=None, progress=False, **kwargs)


def test_jsonl_splits_use_the_custom_tasks_reader(model, tmp_path):
    lines = [{"tokens": [1, 2, 3, 4], "meta": {"kind": ["a", "b", "a"]}}, {"tokens": [4, 3, 2], "meta": {"kind": ["b", "b"]}}]
    for name in ("iid", "long"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = il.evaluate(model, il.onehot(), {"iid": tmp_path / "iid.jsonl", "long": str(tmp_path / "long.jsonl")},
                      n_boot=10, progress=False)
    assert set(res.by("kind")["group"]) == {"a", "b"}
    (tmp_path / "bad.jsonl").write_text('{"tokens": [1, 2, 999]}\n')
    with pytest.raises(IllusionsError, match=r"bad.jsonl:1: token id 999 is outside the vocabulary"):
        il.evaluate(model, il.onehot(), {"iid": tmp_path / "bad.jsonl"}, reference=None, progress=False)


def test_evaluation_views(model, splits):
    res = il.evaluate(model, {"flip": [("blocks.0.attn.hook_k", _shuffle_keys)]}, splits, n_boot=20, progress=False)
    text = repr(res)
    assert len(text) < 2000 and "flip" in text and "long" in text
    page = res._repr_html_()
    assert "<table>" in page and "agreement gap vs iid" in page
    agree = res._row("flip", "long", "agreement")
    significant = agree["gap_vs_ref_low"] > 0 or agree["gap_vs_ref_high"] < 0
    assert ("*</b>" in page) == significant
    dis = res.disagreements("long")
    assert len(dis) == round((1 - agree["value"]) * agree["n_positions"])
    assert (dis["original"] != dis["proxy"]).all() and list(dis["kl"]) == sorted(dis["kl"], reverse=True)
    assert set(res.by("position")["split"]) == {"iid", "long"}
    with pytest.raises(IllusionsError, match="no breakdown by 'depth'; this evaluation has length, position"):
        res.by("depth")
    view = res.show("long", row=int(dis["seq"][0]))
    assert "L0H0 original" in str(view) and "L0H0 proxy" in str(view)
    with pytest.raises(IllusionsError, match="split 'train' is the fitting data"):
        res.disagreements("train")


def test_save_writes_a_run_directory_under_the_clis_guards(model, splits, tmp_path):
    res = il.evaluate(model, il.svd(rank=2, layers=[1]), splits, n_boot=10, progress=False)
    out = res.save(tmp_path / "run")
    assert {"config.json", "metrics.csv", "metrics.json", "records.npz", "report.html"} <= {p.name for p in out.iterdir()}
    from illusions.analyses.run import read_rows

    assert [r["value"] for r in read_rows(out)] == pytest.approx([r["value"] for r in res.rows], nan_ok=True)
    with pytest.raises(IllusionsError, match="overwrite=True"):
        res.save(out)
    res.save(out, overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(IllusionsError):
        res.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    from illusions.bundled import ASSETS

    with pytest.raises(IllusionsError, match="bundled models"):
        res.save(ASSETS / "run")


def test_a_saelens_sae_is_spliced_at_its_hook(model, splits):
    sae_lens = pytest.importorskip("sae_lens")
    HookedSAETransformer, StandardSAE, StandardSAEConfig = (sae_lens.HookedSAETransformer, sae_lens.StandardSAE,
                                                            sae_lens.StandardSAEConfig)

    hooked = HookedSAETransformer(model.cfg)
    hooked.load_state_dict(model.state_dict())
    cfg = StandardSAEConfig(d_in=model.cfg.d_model, d_sae=32)
    cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
    sae = StandardSAE(cfg)
    res = il.evaluate(hooked, sae, splits, n_boot=10, progress=False)
    assert res.labels == ["sae(blocks.1.hook_resid_pre)"]
    with torch.no_grad():
        pairs = [("blocks.1.hook_resid_pre", lambda x, hook: sae(x))]
        assert _overall(res, res.labels[0], "iid") == pytest.approx(_direct_agreement(hooked, splits["iid"], pairs))


def test_the_cli_runs_the_same_engine(monkeypatch):
    import illusions.analyses.engine as engine
    from illusions.analyses.run import AnalysisSpec, run_analysis

    class Called(Exception):
        pass

    def spy(*args, **kwargs):
        raise Called

    monkeypatch.setattr(engine, "measure", spy)
    with pytest.raises(Called):
        run_analysis(AnalysisSpec(task="dyck", ranks=(4,), max_seqs=2, fit_n=2))


def test_import_stays_lazy():
    code = ("import sys, illusions as il; assert 'torch' not in sys.modules and 'pandas' not in sys.modules; "
            "il.evaluate; assert 'torch' not in sys.modules; print(il.svd.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "illusions.api.proxies"


def test_every_public_name_is_documented():
    text = DOCS.read_text()
    documented = set(re.findall(r"^#+ `(?:il\.)?([A-Za-z_]+)", text, flags=re.M))
    for name in il.__all__:
        if name == "__version__":
            continue
        assert name in documented, f"docs/api.md has no section for il.{name}"
        obj = getattr(il, name)
        assert (obj.__doc__ or "").strip(), f"il.{name} has no docstring"
        if callable(obj) and not isinstance(obj, type) and "(" in str(obj.__doc__):
            pass
    for name in ("evaluate", "svd", "simplifier"):
        doc = getattr(il, name).__doc__
        assert "Args:" in doc, f"il.{name}'s docstring lists no arguments"
