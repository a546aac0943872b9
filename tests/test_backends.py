"""The engine on either model kind (issue 30): a HookedTransformer (TransformerLens 3.9) or a
TransformerBridge (TransformerLens 4, or 3.9's own bridge), with or without ``start_at_layer``."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
import torch

from conftest import TINY
from illusions import backends
from illusions.analyses.faithfulness import evaluate_split
from illusions.backends import tl4
from illusions.models import build_model, load_model, save_model
from test_analyses import FakeProxy, make_split


class NoStartAtLayer:
    """A model as TransformerLens 3.9's bridge offers it: everything but ``start_at_layer``."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._model(*args, **kwargs)

    def run_with_hooks(self, *args: Any, start_at_layer: int | None = None, **kwargs: Any) -> Any:
        if start_at_layer is not None:
            raise NotImplementedError("start_at_layer is not supported in TransformerBridge")
        return self._model.run_with_hooks(*args, **kwargs)


def test_without_start_at_layer_the_whole_forward_pass_gives_the_same_records(tiny_model, rng):
    split = make_split("ood", rng)
    proxies = [FakeProxy(0.0), FakeProxy(0.5)]
    rows = np.arange(len(split))
    plain = NoStartAtLayer(tiny_model)
    assert backends.runs_from_layer(tiny_model) and not backends.runs_from_layer(plain)
    want = evaluate_split(tiny_model, split, rows, proxies, candidates=None, batch_size=5)
    got = evaluate_split(plain, split, rows, proxies, candidates=None, batch_size=5)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a.proxy_pred, b.proxy_pred)
        np.testing.assert_array_equal(a.original_pred, b.original_pred)
        np.testing.assert_allclose(a.kl, b.kl, atol=1e-9)
        np.testing.assert_allclose(a.attention_jsd, b.attention_jsd, atol=1e-9)
    assert got[0].kl.mean() > 0  # the proxy acted


@pytest.mark.skipif(backends.uses_bridge(), reason="compares with HookedTransformer (TransformerLens 3.9)")
def test_transformerlens_39_bridge_gives_the_hookedtransformer_records(rng):
    """A bridge in memory (3.9's own: no start_at_layer, hooks fire under their own names) runs the
    engine and agrees with the HookedTransformer holding its weights."""
    from transformer_lens.model_bridge import TransformerBridge

    from illusions.activations import collect

    bridge = TransformerBridge.boot_native(tl4.bridge_config(TINY, seed=3))
    bridge.eval()
    assert not backends.runs_from_layer(bridge)
    hooked = build_model(TINY, seed=0)
    hooked.load_state_dict(tl4.tl_state_dict(bridge), strict=True)
    split = make_split("ood", rng)
    rows = np.arange(len(split))
    names = ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k"]
    mask = torch.as_tensor(np.arange(split.tokens.shape[1])[None, :] < split.lengths[:, None])
    got, want = collect(bridge, split.tokens, names, mask), collect(hooked, split.tokens, names, mask)
    for name in names:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)
    proxies = [FakeProxy(0.0)]
    (b,) = evaluate_split(bridge, split, rows, proxies, candidates=None, batch_size=5)
    (h,) = evaluate_split(hooked, split, rows, proxies, candidates=None, batch_size=5)
    np.testing.assert_array_equal(b.proxy_pred, h.proxy_pred)
    np.testing.assert_array_equal(b.original_pred, h.original_pred)
    np.testing.assert_allclose(b.kl, h.kl, atol=1e-5)


def test_checkpoint_round_trip_keeps_the_hookedtransformer_state_dict(tmp_path):
    """Under either TransformerLens a checkpoint holds HookedTransformer keys and shapes, so it loads
    under the other; save -> load -> save is exact."""
    model = build_model(TINY, seed=1)
    save_model(model, tmp_path / "a")
    loaded, _ = load_model(tmp_path / "a")
    save_model(loaded, tmp_path / "b")
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert sorted(a) == sorted(b) and "blocks.0.attn.W_Q" in a and "unembed.W_U" in a
    assert a["blocks.0.attn.W_Q"].shape == (TINY.n_heads, TINY.d_model, TINY.d_head)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    tokens = torch.randint(0, TINY.d_vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), loaded(tokens), atol=0, rtol=0)


def test_sae_on_transformerlens_4_says_so_in_one_line(tmp_path, monkeypatch):
    """SAELens 6 cannot import next to TransformerLens 4: `analyze --simplify sae` says so in one line
    with exit code 2, before any activation is collected, and writes nothing."""
    from typer.testing import CliRunner

    from conftest import small_dyck
    from illusions.cli import app

    task, cfg = small_dyck(tmp_path, monkeypatch)
    save_model(build_model(cfg, seed=0), tmp_path / "model", meta={"task": task.meta()})
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # import sae_lens raises ImportError
    real = backends.uses_bridge
    # TransformerLens 4 as the sae simplifier sees it; the model still loads with the installed one.
    monkeypatch.setattr(backends, "uses_bridge",
                        lambda: sys._getframe(1).f_code.co_name == "require_sae_lens" or real())
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["analyze", "dyck", "--simplify", "sae", "--width", "32", "--model",
                                      str(tmp_path / "model"), "--threads", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().count("\n") == 0
    assert "TransformerLens 4" in result.stderr and "illusions[sae]" in result.stderr
    assert "collecting" not in result.output and not out.exists()
