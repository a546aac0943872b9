"""The analysis engine on a tiny random model, with proxies written here against the Proxy interface."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from illusions.analyses.faithfulness import analyze, evaluate_split
from illusions.analyses.summary import overall, summarize, to_json
from illusions.backends import uses_bridge
from illusions.errors import IllusionsError
from illusions.tasks.base import Scored, Split


def make_split(name: str, rng: np.random.Generator, n: int = 12, width: int = 16, vocab: int = 13) -> Split:
    lengths = rng.integers(6, width + 1, size=n)
    tokens = rng.integers(1, vocab, size=(n, width))
    tokens[np.arange(width)[None, :] >= lengths[:, None]] = 0
    seq, pos = zip(*[(i, p) for i in range(n) for p in range(1, int(lengths[i]) - 1)], strict=True)
    seq, pos = np.array(seq), np.array(pos)
    scored = Scored(seq, pos, tokens[seq, pos + 1], {"depth": pos % 3, "length": lengths[seq],
                                                      "distance": pos})
    return Split(name, tokens, lengths, scored)


@dataclasses.dataclass(frozen=True)
class QueryScale:
    """Multiplies one layer's queries by ``scale`` (1 = identity); a stand-in proxy."""

    scale: float
    layer: int = 1
    hook_name: str = "blocks.1.attn.hook_q"
    causal = True  # position by position: the evaluation may cut rows (illusions.simplifiers.base.causal)

    def __call__(self, activation: torch.Tensor, hook: Any) -> torch.Tensor:
        return activation * self.scale


@dataclasses.dataclass(frozen=True)
class FakeProxy:
    scale: float
    simplifier: str = "scale"
    sweep_param: str = "rank"

    @property
    def params(self) -> dict[str, Any]:
        return {"rank": self.scale}

    @property
    def fwd_hooks(self):
        return [("blocks.1.attn.hook_q", QueryScale(self.scale))]

    heads: tuple = ((1, 0), (1, 1), (1, 2), (1, 3))


@dataclasses.dataclass(frozen=True)
class FakeSimplifier:
    scale: float
    name: ClassVar[str] = "scale"
    data_free: ClassVar[bool] = True

    def hook_names(self, model) -> list[str]:
        return []

    def fit(self, model, activations) -> FakeProxy:
        return FakeProxy(self.scale)


@pytest.fixture
def splits(rng):
    return {name: make_split(name, rng) for name in ("train", "iid", "ood")}


def test_identity_proxy_is_perfectly_faithful(tiny_model, splits):
    result = analyze(tiny_model, splits, [FakeSimplifier(1.0)], candidates=None, fit_n=4, seed=0)
    for split in ("iid", "ood"):
        rec = result.records[(split, 0)]
        assert len(rec) == len(splits[split].scored)
        np.testing.assert_array_equal(rec.original_pred, rec.proxy_pred)
        assert np.abs(rec.kl).max() < 1e-9
        assert np.abs(rec.attention_jsd).max() < 1e-9
    rows = overall(summarize(result, n_boot=50))
    by = {(r["split"], r["metric"]): r for r in rows}
    assert by[("ood", "agreement")]["value"] == 1.0
    assert by[("ood", "agreement")]["gap_vs_ref"] == 0.0
    assert by[("ood", "proxy_accuracy")]["value"] == by[("ood", "original_accuracy")]["value"]


def test_proxy_from_start_at_layer_matches_a_full_hooked_run(tiny_model, splits):
    split = splits["ood"]
    proxy = FakeProxy(0.0)  # uniform attention in layer 1
    (rec,) = evaluate_split(tiny_model, split, np.arange(len(split)), [proxy], candidates=None, batch_size=5)
    with torch.no_grad():
        logits = tiny_model.run_with_hooks(torch.as_tensor(split.tokens), fwd_hooks=proxy.fwd_hooks)
        clean = tiny_model(torch.as_tensor(split.tokens))
    order = np.lexsort((rec.pos, rec.rows))
    want = logits[split.scored.seq, split.scored.pos].argmax(-1).numpy()
    want_clean = clean[split.scored.seq, split.scored.pos].argmax(-1).numpy()
    ref = np.lexsort((split.scored.pos, split.scored.seq))
    np.testing.assert_array_equal(rec.proxy_pred[order], want[ref])
    np.testing.assert_array_equal(rec.original_pred[order], want_clean[ref])
    assert np.nanmean(rec.attention_jsd) > 0.01
    assert rec.kl.mean() > 0


def _unembedded_rows(model, monkeypatch) -> list[tuple[int, ...]]:
    """The shapes the model's unembedding is called on, recorded as they come."""
    shapes: list[tuple[int, ...]] = []
    forward = model.unembed.forward

    def record(residual):
        shapes.append(tuple(residual.shape))
        return forward(residual)

    monkeypatch.setattr(model.unembed, "forward", record)
    return shapes


@pytest.mark.skipif(uses_bridge(), reason="HookedTransformer's path: a TransformerBridge keeps its whole output "
                    "head (backends.unembed_rows), and its modules' forward cannot be patched this way")
def test_only_scored_positions_are_unembedded_and_no_number_moves(tiny_model, splits, monkeypatch):
    import illusions.backends

    split = splits["ood"]
    proxies = [FakeProxy(0.0), FakeProxy(0.5)]
    illusions.backends.runs_from_layer(tiny_model)  # its one-position probe, before counting
    shapes = _unembedded_rows(tiny_model, monkeypatch)
    got = evaluate_split(tiny_model, split, np.arange(len(split)), proxies, candidates=None, batch_size=5)
    # One [1, n_scored] call per pass (clean + two proxies), never [batch, pos]: 3 x the scored positions.
    assert all(s[0] == 1 for s in shapes)
    assert sum(s[1] for s in shapes) == 3 * len(split.scored)
    shapes.clear()
    monkeypatch.setattr(illusions.backends, "unembeds_rows", lambda model: False)  # the full-logits path
    want = evaluate_split(tiny_model, split, np.arange(len(split)), proxies, candidates=None, batch_size=5)
    assert any(s[0] > 1 for s in shapes)  # that path unembeds whole [batch, pos] batches
    for a, b in zip(got, want, strict=True):
        for field in ("rows", "pos", "original_pred", "proxy_pred", "kl", "attention_jsd"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


@pytest.mark.skipif(uses_bridge(), reason="HookedTransformer's path: a TransformerBridge keeps its whole output "
                    "head (backends.unembed_rows), and its modules' forward cannot be patched this way")
def test_a_hook_after_the_blocks_gets_the_whole_output_head(tiny_model, splits, monkeypatch):
    split = splits["ood"]

    @dataclasses.dataclass(frozen=True)
    class FinalNormProxy(FakeProxy):
        @property
        def fwd_hooks(self):
            return [("ln_final.hook_normalized", QueryScale(self.scale))]

        heads: tuple = ()

    proxy = FinalNormProxy(-1.0)
    shapes = _unembedded_rows(tiny_model, monkeypatch)
    (rec,) = evaluate_split(tiny_model, split, np.arange(len(split)), [proxy], candidates=None, batch_size=50)
    # the proxy's full pass (rows run up to their last scored position)
    assert (len(split), int(split.scored.pos.max()) + 1) in [s[:2] for s in shapes]
    with torch.no_grad():
        logits = tiny_model.run_with_hooks(torch.as_tensor(split.tokens), fwd_hooks=proxy.fwd_hooks)
    order = np.lexsort((rec.pos, rec.rows))
    ref = np.lexsort((split.scored.pos, split.scored.seq))
    want = logits[split.scored.seq, split.scored.pos].argmax(-1).numpy()
    np.testing.assert_array_equal(rec.proxy_pred[order], want[ref])
    assert (rec.proxy_pred != rec.original_pred).any()


def _random_sae(hook_name: str, d: int, width: int = 16, seed: int = 0):
    from illusions.simplifiers.base import Proxy
    from illusions.simplifiers.sae_hooks import SAEHook

    gen = torch.Generator().manual_seed(seed)
    hook = SAEHook(hook_name=hook_name, heads=None, architecture="standard", top_k=0, normalize="none",
                   subtract_b_dec=False, W_enc=torch.randn(d, width, generator=gen) / d**0.5,
                   b_enc=-0.3 * torch.ones(width), W_dec=torch.randn(width, d, generator=gen) / width**0.5,
                   b_dec=torch.zeros(d), train_active=torch.arange(width) % 3 > 0)
    return Proxy("sae", {"width": width}, (hook,))


def test_dictionary_statistics_come_from_the_clean_pass_without_a_second_one(tiny_model, splits, monkeypatch):
    import illusions.backends
    from illusions.analyses.faithfulness import batch_tokens
    from illusions.analyses.sparse import sparse_stats
    from illusions.scoring import iter_batches

    proxies = [FakeProxy(0.5), _random_sae("blocks.1.hook_resid_pre", 32),
               _random_sae("blocks.0.hook_resid_post", 32, seed=1)]
    evaluated = {name: splits[name] for name in ("iid", "ood")}
    illusions.backends.runs_from_layer(tiny_model)  # its one-position probe, before counting
    passes = []
    forward = tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward", lambda *a, **k: passes.append(1) or forward(*a, **k))
    result = analyze(tiny_model, evaluated, proxies, candidates=None, batch_size=5, reference=None)
    n_batches = sum(len(list(iter_batches(split, 5, max_tokens=batch_tokens(tiny_model))))
                    for split in evaluated.values())
    # One clean pass a batch, one per proxy and one zero ablation per dictionary (its downstream loss): no other.
    assert len(passes) == n_batches * (1 + len(proxies) + 2)
    monkeypatch.undo()
    for name, split in evaluated.items():
        rows = np.arange(len(split))[::-1].copy()  # not in batch order
        got = evaluate_split(tiny_model, split, rows, proxies, candidates=None, batch_size=5)
        want = sparse_stats(tiny_model, split, rows, proxies, batch_size=5)  # a clean pass of its own
        assert got[0].sparse is None and want[0] is None and result.records[(name, 0)].sparse is None
        for j in (1, 2):
            assert got[j].sparse.n_tokens.sum() == split.lengths.sum()
            for key, value in want[j].arrays().items():
                np.testing.assert_array_equal(got[j].sparse.arrays()[key], value, err_msg=key)
                np.testing.assert_array_equal(result.records[(name, j)].sparse.arrays()[key],
                                              want[j].arrays()[key] if key == "train_active"
                                              else value[::-1], err_msg=key)


def test_large_svd_fits_stream_their_activations_and_agree_with_the_held_fit(tiny_model, rng, monkeypatch):
    import illusions.activations
    from illusions.analyses import faithfulness
    from illusions.registry import make_simplifier

    split = make_split("train", rng, n=40)
    rows = np.arange(len(split))
    simplifiers = [make_simplifier("svd", rank=2), make_simplifier("svd", rank=5),
                   make_simplifier("svd", rank=3, basis="joint"), make_simplifier("resid-svd", rank=3),
                   make_simplifier("resid-svd", rank=7, layers=[0, 1]), make_simplifier("kmeans", k=4)]
    calls = []
    collect = illusions.activations.collect
    monkeypatch.setattr(illusions.activations, "collect",
                        lambda model, tokens, *a, **k: calls.append(len(tokens)) or collect(model, tokens, *a, **k))
    held = faithfulness.fit_proxies(tiny_model, split, rows, simplifiers, batch_size=8)
    assert max(calls) == len(rows)  # one collection of every fitting row
    calls.clear()
    monkeypatch.setattr(faithfulness, "STREAM_FIT_BYTES", 0)
    kept = []
    streamed_collect = faithfulness._collect_streamed
    monkeypatch.setattr(faithfulness, "_collect_streamed",
                        lambda *a: kept.append(a[4]) or streamed_collect(*a))
    streamed = faithfulness.fit_proxies(tiny_model, split, rows, simplifiers, batch_size=8)
    assert max(calls) == 8  # batch by batch (and the one-row size probe)
    assert kept == [[]]  # every one of them streams: no activations are held
    for a, b in zip(held[:5], streamed[:5], strict=True):
        assert a.params == b.params and a.info["n_fitted"] == b.info["n_fitted"]
        assert len(a.hooks) == len(b.hooks) > 0
        for ha, hb in zip(a.hooks, b.hooks, strict=True):
            torch.testing.assert_close(hb.mean, ha.mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(hb._proj, ha._proj, rtol=0.0, atol=1e-5)  # V V^T: signs cancel
    # k-means streams, but fewer vectors than its seeding sample are still all there and fitted as
    # held: the same bits as the held path's (the one-pass fit itself: tests/test_streaming.py).
    for key, value in held[5].hooks[0].tensors().items():
        assert torch.equal(streamed[5].hooks[0].tensors()[key], value), key


def test_the_token_budget_bounds_every_forward_pass_fit_calibration_and_evaluation(tiny_model, rng, monkeypatch):
    """The fit's collection and the warnings' calibration take the analysis' token budget, as the
    evaluation does: no forward pass holds more than ``token_budget`` padded positions (a row longer than
    it goes alone)."""
    from illusions.registry import make_simplifier

    splits = {"train": make_split("train", rng, n=12), "ood": make_split("ood", rng, n=12)}
    shapes = []
    forward = tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward",
                        lambda x, *a, **k: shapes.append(tuple(x.shape[:2])) or forward(x, *a, **k))
    result = analyze(tiny_model, splits, [make_simplifier("svd", rank=2, layers=(1,))], candidates=None,
                     fit_n=12, batch_size=64, token_budget=20)
    assert result.proxies[0].info.get("warning_thresholds")  # calibrated: its passes are among those seen
    assert len(shapes) > 6
    assert all(rows * width <= 20 or rows == 1 for rows, width in shapes), shapes


def test_evaluation_runs_rows_only_up_to_their_last_scored_position_and_no_number_moves(tiny_model, rng, monkeypatch):
    """Rows without a scored position are not run and the others stop after their last scored position
    (a causal model's outputs there cannot depend on later tokens): the same predictions, the values to
    float32 rounding, and the records in the order of the rows, whatever the batches."""
    import illusions.analyses.faithfulness as faithfulness

    split = make_split("ood", rng, n=12)
    keep = (split.scored.pos < 4) & (split.scored.seq % 3 != 0)  # rows 0, 3, 6, 9: nothing scored
    split = dataclasses.replace(split, scored=split.scored.subset(np.flatnonzero(keep)))
    proxies = [FakeProxy(0.5)]
    shapes = []
    forward = tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward",
                        lambda x, *a, **k: shapes.append(tuple(x.shape[:2])) or forward(x, *a, **k))
    got = evaluate_split(tiny_model, split, np.arange(len(split)), proxies, candidates=None, batch_size=64)
    assert shapes and all(width <= 4 for _, width in shapes)  # scored positions end at 3
    assert max(rows for rows, _ in shapes) == 8  # the 8 rows with something to score, in one batch
    # A hook function not declared causal (it might flip or average over positions) gets whole rows.
    @dataclasses.dataclass(frozen=True)
    class PlainHookProxy(FakeProxy):
        @property
        def fwd_hooks(self):
            return [("blocks.1.attn.hook_q", lambda x, hook: x * self.scale)]

    shapes.clear()
    evaluate_split(tiny_model, split, np.arange(len(split)), [PlainHookProxy(0.5)], candidates=None, batch_size=64)
    assert (len(split), int(split.lengths.max())) in shapes
    whole = faithfulness.iter_batches
    monkeypatch.setattr(faithfulness, "iter_batches", lambda *a, **k: whole(*a, **{**k, "scored_only": False}))
    for budget in (None, 20):
        want = evaluate_split(tiny_model, split, np.arange(len(split)), proxies, candidates=None, batch_size=64,
                              token_budget=budget)
        for a, b in zip(got, want, strict=True):
            order = np.lexsort((a.pos, a.seq))
            np.testing.assert_array_equal(order, np.arange(len(order)))  # rows, then positions
            for field in ("rows", "pos", "target", "original_pred", "proxy_pred"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            for field in ("kl", "attention_jsd"):
                np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-6)


def test_summary_rows_breakdowns_and_json(tiny_model, splits):
    result = analyze(tiny_model, splits, [FakeSimplifier(1.0), FakeSimplifier(0.0)], candidates=None,
                     fit_n=4, seed=0)
    rows = summarize(result, n_boot=50)
    assert {r["proxy"] for r in rows} == {"scale(rank=1.0)", "scale(rank=0.0)"}
    depth_rows = [r for r in rows if r["group_by"] == "depth" and r["metric"] == "agreement"]
    assert {r["group"] for r in depth_rows} == {"0", "1", "2"}
    total = sum(r["n_positions"] for r in depth_rows if r["split"] == "ood" and r["proxy"] == "scale(rank=0.0)")
    assert total == len(splits["ood"].scored)
    doc = to_json(rows, task="toy", model="tiny",
                  proxies=[{"label": p, "simplifier": "scale", "params": {}} for p in result.labels])
    ood = doc["splits"]["ood"]
    assert set(ood) >= {"n_positions", "original_accuracy", "proxy_accuracy", "agreement", "attention_jsd", "kl"}
    assert ood["agreement"]["value"] == 1.0 and len(ood["agreement"]["ci"]) == 2
    assert "vs_length_matched_iid" in ood["gaps"]["agreement"]
    assert len(doc["proxies"]) == 2


def test_same_seed_same_rows(tiny_model, splits):
    a = summarize(analyze(tiny_model, splits, [FakeSimplifier(0.5)], candidates=None, fit_n=4, max_seqs=8, seed=3), n_boot=50, seed=3)
    b = summarize(analyze(tiny_model, splits, [FakeSimplifier(0.5)], candidates=None, fit_n=4, max_seqs=8, seed=3), n_boot=50, seed=3)
    def same(rows_a, rows_b):
        return len(rows_a) == len(rows_b) and all(
            (x == y) or (isinstance(x, float) and np.isnan(x) and np.isnan(y))
            for ra, rb in zip(rows_a, rows_b, strict=True) for x, y in zip(ra.values(), rb.values(), strict=True)
        )

    assert a and same(a, b)
    c = summarize(analyze(tiny_model, splits, [FakeSimplifier(0.5)], candidates=None, fit_n=4, max_seqs=8, seed=4), n_boot=50, seed=4)
    assert not same(a, c)  # another seed draws other sequences and other bootstrap resamples


def test_unknown_split_is_a_clear_error(tiny_model, splits):
    with pytest.raises(IllusionsError, match="unknown split"):
        analyze(tiny_model, splits, [FakeSimplifier(1.0)], candidates=None, eval_splits=["nope"])


def test_rows_hold_plain_python_values(tiny_model, splits):
    rows = summarize(analyze(tiny_model, splits, [FakeSimplifier(0.5)], candidates=None, fit_n=4), n_boot=20)
    assert rows
    for row in rows:
        for value in row.values():
            assert type(value) in (str, int, float), (row, value)


def test_coded_groups_get_their_names(tiny_model, rng):
    split = make_split("iid", rng)
    sc = split.scored
    coded = Scored(sc.seq, sc.pos, sc.target, {**sc.meta, "category": sc.pos % 2})
    splits = {"train": split, "iid": Split("iid", split.tokens, split.lengths, coded)}
    result = analyze(tiny_model, splits, [FakeSimplifier(1.0)], candidates=None, fit_n=4)
    rows = summarize(result, n_boot=20, group_names={"category": ["even", "odd"]})
    assert {r["group"] for r in rows if r["group_by"] == "category"} == {"even", "odd"}


def _records(agree: np.ndarray, length: np.ndarray):
    from illusions.analyses.faithfulness import Records

    n = agree.shape[0]
    seq = np.arange(n)
    zeros = np.zeros(n, dtype=np.int64)
    return Records(rows=seq, seq=seq, pos=zeros, target=zeros, original_pred=zeros,
                   proxy_pred=np.where(agree, 0, 1), attention_jsd=np.zeros(n), kl=np.zeros(n),
                   meta={"length": length})


def test_length_matched_control_reweights_reference_strata():
    from illusions.analyses.summary import METRICS, _gaps, _matrix, _reference, _Strata
    from illusions.metrics import Resampler

    # Reference: short strings (bin 0) never agree, long ones (bin 1) always; 30 short, 10 long.
    ref_rec = _records(np.r_[np.zeros(30, bool), np.ones(10, bool)], np.r_[np.full(30, 5), np.full(10, 15)])
    edges = np.array([0, 10, 20])
    strata = _Strata(("length",), (), {"length": edges})
    ref = _reference(ref_rec, Resampler.draw(40, np.random.default_rng(0), n_boot=200), strata)
    # The split: a quarter short, three quarters long, always agreeing.
    rec = _records(np.ones(20, bool), np.r_[np.full(5, 5), np.full(15, 15)])
    sampler = Resampler.draw(20, np.random.default_rng(1), n_boot=200)
    points, reps = sampler.grouped(_matrix(rec), rec.seq, np.zeros(20, np.int64), 1)
    gaps = _gaps(points[0], reps[:, 0], ref, ref.ids(strata.codes(rec)), sampler, _matrix(rec), rec.seq)
    k = METRICS.index("agreement")
    assert gaps["gap_vs_ref"][k] == pytest.approx(1.0 - 0.25)  # raw reference mean is 10/40
    # Re-weighted to the split's 25/75 lengths the control is 0.75, exact in every replicate.
    assert gaps["gap_vs_matched"][k] == pytest.approx(0.25)
    assert (gaps["gap_vs_matched_low"][k], gaps["gap_vs_matched_high"][k]) == pytest.approx((0.25, 0.25))
    assert gaps["matched_coverage"] == 1.0


def test_length_matched_gap_leaves_uncovered_bins_out_of_both_sides():
    from illusions.analyses.summary import (
        METRICS,
        _gaps,
        _matrix,
        _reference,
        _Strata,
        excluded_share,
        to_json,
    )
    from illusions.metrics import Resampler

    # The reference has only short strings (bin 0), all agreeing. The split: 10 short ones, all
    # agreeing, and 10 long ones (bin 1, absent from the reference), none agreeing.
    ref_rec = _records(np.ones(30, bool), np.full(30, 5))
    edges = np.array([0, 10, 20])
    strata = _Strata(("length",), (), {"length": edges})
    ref = _reference(ref_rec, Resampler.draw(30, np.random.default_rng(0), n_boot=200), strata)
    rec = _records(np.r_[np.ones(10, bool), np.zeros(10, bool)], np.r_[np.full(10, 5), np.full(10, 15)])
    sampler = Resampler.draw(20, np.random.default_rng(1), n_boot=200)
    points, reps = sampler.grouped(_matrix(rec), rec.seq, np.zeros(20, np.int64), 1)
    gaps = _gaps(points[0], reps[:, 0], ref, ref.ids(strata.codes(rec)), sampler, _matrix(rec), rec.seq)
    k = METRICS.index("agreement")
    assert gaps["gap_vs_ref"][k] == pytest.approx(-0.5)  # raw: the long half pulls the split down
    # Matched: short against short on both sides, so no gap (it was -0.5 when the split's side kept
    # the long strings the control had dropped).
    assert gaps["gap_vs_matched"][k] == pytest.approx(0.0)
    assert (gaps["gap_vs_matched_low"][k], gaps["gap_vs_matched_high"][k]) == pytest.approx((0.0, 0.0))
    assert gaps["matched_coverage"] == pytest.approx(0.5)
    row = {"matched_coverage": gaps["matched_coverage"]}
    assert excluded_share(row) == pytest.approx(0.5)
    rows = [{"proxy": "p", "split": "s", "group_by": "all", "group": "all", "metric": "agreement",
             "n_positions": 20, "n_sequences": 20, "value": 0.5, "ci_low": 0.4, "ci_high": 0.6,
             "gap_vs_ref": -0.5, "gap_vs_ref_low": -0.6, "gap_vs_ref_high": -0.4, "gap_vs_matched": 0.0,
             "gap_vs_matched_low": 0.0, "gap_vs_matched_high": 0.0, "matched_coverage": 0.5}]
    doc = to_json(rows, task="t", model="m", proxies=[{"label": "p", "simplifier": "svd", "params": {}}])
    assert doc["splits"]["s"]["gaps"]["agreement"]["vs_length_matched_iid"]["excluded_share"] == 0.5


def test_accuracy_change_is_proxy_minus_original_accuracy_per_position():
    from illusions.analyses.faithfulness import METRICS, Records

    target = np.array([1, 2, 3, 4])
    rec = Records(rows=np.arange(4), seq=np.arange(4), pos=np.arange(4), target=target,
                  original_pred=np.array([1, 2, 0, 0]), proxy_pred=np.array([1, 0, 3, 0]),
                  attention_jsd=np.zeros(4), kl=np.zeros(4), meta={})
    per = rec.per_position()
    np.testing.assert_array_equal(per["accuracy_change"], [0.0, -1.0, 1.0, 0.0])
    assert set(per) == set(METRICS)


def test_labels_name_the_head_only_when_proxies_differ_in_heads():
    from illusions.analyses.faithfulness import proxy_labels

    @dataclasses.dataclass
    class Fake:
        simplifier: str
        params: dict
        heads: list
        sweep_param: str = ""

    # The label reads what the proxy says it sweeps (no registry lookup by name).
    same = [Fake("svd", {"rank": r}, [(1, 0)], "rank") for r in (2, 4)]
    assert proxy_labels(same) == ["svd(rank=2)", "svd(rank=4)"]
    assert proxy_labels([Fake("svd", {"rank": 2}, [(1, 0)])]) == ["svd"]
    per_head = [Fake("onehot", {}, [(0, h)]) for h in (0, 1)] + [Fake("onehot", {}, [(1, 0), (1, 1)])]
    assert proxy_labels(per_head) == ["onehot@L0H0", "onehot@L0H1", "onehot@L1H0+L1H1"]


def test_per_head_spec_builds_one_simplifier_per_layer_and_head(monkeypatch):
    from illusions import registry
    from illusions.analyses.run import AnalysisSpec, per_head_simplifiers

    built_by_name = []
    make = registry.make_simplifier
    monkeypatch.setattr(registry, "make_simplifier", lambda *a, **k: built_by_name.append(a) or make(*a, **k))
    spec = AnalysisSpec(simplifier="svd", ranks=(2, 4), layers=(0, 1), per_head=True)
    built = per_head_simplifiers(spec, 2, 3)
    assert len(built) == 2 * 2 * 3
    assert [(s.rank, s.targets.layers, s.targets.heads) for s in built[:4]] == [
        (2, (0,), (0,)), (2, (0,), (1,)), (2, (0,), (2,)), (2, (1,), (0,))]
    # Placed from the simplifiers the spec built once (one per rank), not built again per head.
    assert len(built_by_name) == 2 and spec.simplifiers is spec.simplifiers
    assert built[5] == make("svd", rank=2, layers=(1,), heads=(2,))
    whole = dataclasses.replace(spec, per_head=False)
    assert per_head_simplifiers(whole, 2, 3) == list(whole.simplifiers)
    assert [(s.targets.layers, s.targets.heads) for s in whole.simplifiers] == [((0, 1), ()), ((0, 1), ())]
