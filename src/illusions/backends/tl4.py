"""TransformerLens 4: every model is a ``TransformerBridge`` with the legacy hook names.

- illusions checkpoints and bundled models (``config.json`` + ``model.safetensors`` holding a
  ``HookedTransformer`` state dict): :func:`load_state` boots a TL-native bridge from the
  :class:`~illusions.models.ModelConfig` (``TransformerBridge.boot_native``, no weights initialised)
  and loads the state dict through TransformerLens' own ``convert_tl_checkpoint``, strictly. The
  native model computes what ``HookedTransformer`` computes: on the bundled models every logit and
  hook value is bit-identical (docs/transformerlens4.md).
- :func:`tl_state_dict` converts back, so checkpoints written under TransformerLens 4 load under 3.9
  and the other way round (the ``HookedTransformer`` keys and per-head shapes, with its two buffers).
- Hugging Face folders: :func:`load_hf` loads the model with ``transformers`` from the folder alone
  (local files, safetensors, ``trust_remote_code=False``), hands it to
  ``TransformerBridge.boot_transformers(hf_model=...)`` with a tokenizer from the folder or one built
  in memory (so nothing is looked up), and turns on compatibility mode without weight processing
  (legacy hook names, raw weights: what the 3.9 path loads, unfolded and uncentred).

Not offered by the native bridge, and refused here in one line: shortformer and rotary illusions
models (the native rotary pairs adjacent dimensions where ``HookedTransformer`` pairs halves).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from illusions.backends import TL3_EXTRA
from illusions.errors import IllusionsError

if TYPE_CHECKING:
    import torch

# HookedTransformer's attention buffers, which its state dict (and so every saved checkpoint) holds.
_HT_BUFFERS = ("mask", "IGNORE")


def _check_supported(cfg: Any) -> None:
    if cfg.positional_embedding != "standard":
        raise IllusionsError(
            f"positional_embedding {cfg.positional_embedding!r} is not offered by TransformerLens 4's native "
            f"bridge in the form HookedTransformer computes it; install {TL3_EXTRA} (TransformerLens 3.9) "
            "for this model")


def bridge_config(cfg: Any, *, device: str | torch.device = "cpu", seed: int | None = None) -> Any:
    """The ``TransformerBridgeConfig`` of a :class:`~illusions.models.ModelConfig` (the same fields
    :func:`illusions.models.hooked_config` gives ``HookedTransformerConfig``)."""
    from transformer_lens.config import TransformerBridgeConfig

    _check_supported(cfg)
    norm = None if cfg.normalization == "none" else cfg.normalization
    return TransformerBridgeConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head,
        d_mlp=None if cfg.attn_only else cfg.d_mlp, attn_only=cfg.attn_only, n_ctx=cfg.n_ctx,
        d_vocab=cfg.d_vocab, act_fn=None if cfg.attn_only else cfg.act_fn, normalization_type=norm,
        positional_embedding_type=cfg.positional_embedding, default_prepend_bos=False,
        device=str(device), init_weights=seed is not None, seed=seed,
    )


def _boot(cfg: Any, device: str | torch.device, seed: int | None) -> Any:
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    # Without a seed the native model takes torch's default initialisation from the global RNG (the
    # weights are then replaced); the fork keeps the caller's RNG state as it was.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        bridge = TransformerBridge.boot_native(bridge_config(cfg, device=device, seed=seed), device=str(device))
        _train_unembed_bias(bridge)
    return bridge


def _train_unembed_bias(bridge: Any) -> None:
    """Make the unembedding bias a parameter, as ``HookedTransformer``'s ``b_U`` is (the native bridge
    keeps it as a zero buffer), so training updates the same weights under either TransformerLens."""
    import torch

    head = bridge.unembed._original_component
    bias = head._buffers.pop("bias", None)
    if bias is not None:
        head.bias = torch.nn.Parameter(bias.clone())


def build_model(cfg: Any, *, seed: int, device: str | torch.device = "cpu") -> Any:
    """A freshly initialised native bridge; its weights depend only on ``cfg`` and ``seed`` (the
    bridge initialises under a forked RNG). TransformerLens 4 initialises differently from 3.9, so the
    same seed gives different weights on the two."""
    model = _boot(cfg, device, seed)
    model.eval()
    return model


def load_state(cfg: Any, state: dict[str, torch.Tensor], *, device: str | torch.device = "cpu",
               source: str = "the checkpoint") -> Any:
    """A native bridge holding a ``HookedTransformer`` state dict (eval mode), loaded strictly.

    Raises:
        IllusionsError: when the state dict does not fit ``cfg`` (a missing, extra or misshapen tensor).
    """
    model = _boot(cfg, device, None)
    load_weights(model, state, source=source)
    model.eval()
    return model


def load_weights(model: Any, state: dict[str, torch.Tensor], *, source: str = "the checkpoint") -> None:
    """Load a ``HookedTransformer`` state dict into a native bridge in place, strictly (TransformerLens'
    ``convert_tl_checkpoint``; the two attention buffers HookedTransformer saves are not weights)."""
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    device = next(model.parameters()).device
    weights = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in _HT_BUFFERS}
    try:
        converted = convert_tl_checkpoint(weights, model.cfg)
        model.load_state_dict({k: v.to(device) for k, v in converted.items()}, strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in lines[:3])
        raise IllusionsError(f"{source} does not match its config: {detail}") from None


def tl_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The bridge's weights as a ``HookedTransformer`` state dict (keys, per-head shapes, buffers), so a
    checkpoint saved here loads under TransformerLens 3.9 too."""
    import einops
    import torch

    c = model.cfg
    n = c.n_heads
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        v = value.detach()
        stem, _, leaf = key.rpartition(".")
        owner, _, part = stem.rpartition(".")
        if part in ("q", "k", "v") and owner.endswith(".attn"):
            name = part.upper()
            out[f"{owner}.{'W' if leaf == 'weight' else 'b'}_{name}"] = (
                einops.rearrange(v, "(n h) m -> n m h", n=n) if leaf == "weight"
                else einops.rearrange(v, "(n h) -> n h", n=n))
        elif part == "o" and owner.endswith(".attn"):
            out[f"{owner}.W_O" if leaf == "weight" else f"{owner}.b_O"] = (
                einops.rearrange(v, "m (n h) -> n h m", n=n) if leaf == "weight" else v)
        elif part in ("in", "out") and owner.endswith(".mlp"):
            out[f"{owner}.{'W' if leaf == 'weight' else 'b'}_{part}"] = v.T if leaf == "weight" else v
        elif stem in ("embed", "pos_embed", "unembed"):
            name = {"embed": "W_E", "pos_embed": "W_pos", "unembed": "W_U"}[stem]
            if leaf == "weight":
                out[f"{stem}.{name}"] = v.T if stem == "unembed" else v
            else:
                out[f"{stem}.b_U"] = v
        elif leaf in ("weight", "bias"):  # LayerNorms: ln1, ln2, ln_final
            out[f"{stem}.{'w' if leaf == 'weight' else 'b'}"] = v
        else:
            raise IllusionsError(f"no HookedTransformer name for the bridge weight {key!r}")
    for layer in range(c.n_layers):
        out[f"blocks.{layer}.attn.mask"] = torch.empty((0, 0), dtype=torch.bool)
        out[f"blocks.{layer}.attn.IGNORE"] = torch.tensor(-torch.inf)
    return out


def _ungroup(hf: Any) -> Any:
    """A grouped-query model (Llama-style) with each key/value head repeated for the query heads it
    serves (the same computation; Qwen2's key/value biases with them), so ``hook_k``/``hook_v`` carry
    one head per query head as every simplifier expects (what TransformerLens 3.9's
    ``ungroup_grouped_query_attention`` gives)."""
    import torch

    cfg = hf.config
    n_kv = getattr(cfg, "num_key_value_heads", None)
    n_heads = cfg.num_attention_heads
    if n_kv in (None, n_heads):
        return hf
    groups = n_heads // n_kv
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    state = hf.state_dict()
    for key in list(state):
        if key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_proj.bias",
                         "self_attn.v_proj.bias")):
            w = state[key]  # [n_kv * d_head, d_model] or [n_kv * d_head]
            wide_w = w.view(n_kv, d_head, -1).repeat_interleave(groups, dim=0)
            state[key] = wide_w.reshape(n_heads * d_head, *w.shape[1:])
    wide = copy.deepcopy(cfg)
    wide.num_key_value_heads = n_heads
    with torch.random.fork_rng(devices=[]):
        out = type(hf)(wide)
    out.load_state_dict(state, strict=True)
    return out.to(torch.float32).eval()


def _id_tokenizer(d_vocab: int) -> Any:
    """A tokenizer whose tokens are ``<0>``..``<d_vocab-1>``, built in memory: the bridge needs one,
    and a folder without its own must not make TransformerLens look one up."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"<{i}>": i for i in range(d_vocab)}, unk_token="<0>")))


def load_hf(path: Path, hf: Any, *, architecture: str, d_vocab: int, tokenizer: Any | None,
            device: str | torch.device = "cpu") -> Any:
    """The bridge of a Hugging Face model ``hf`` already loaded from ``path`` (offline, safetensors),
    in compatibility mode without weight processing, eval mode."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = _ungroup(hf)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        bridge = TransformerBridge.boot_transformers(
            str(path), hf_model=hf, device=str(device), trust_remote_code=False,
            tokenizer=tokenizer if tokenizer is not None else _id_tokenizer(d_vocab))
        bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    bridge.cfg.original_architecture = architecture  # as HookedTransformerConfig names it
    bridge.eval()
    return bridge
