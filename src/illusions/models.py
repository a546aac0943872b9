"""The one module that builds TransformerLens models, and saves/loads them without pickle.

All TransformerLens construction lives here so that a later move to TransformerLens 4.x (which
removes ``HookedTransformer``/``HookedTransformerConfig``) touches one file.

A checkpoint is a directory with two fixed files:
    config.json        {"format": ..., "model": ModelConfig fields, "meta": {...}}
    model.safetensors  the model's state dict
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from illusions.config import Config, read_json
from illusions.errors import IllusionsError
from illusions.io import atomic_write_json, staged_dir

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "illusions-model/1"

_NORMALIZATIONS = {"LN": "LN", "LNPre": "LNPre", "RMS": "RMS", "RMSPre": "RMSPre", "none": None}
_POSITIONAL = ("standard", "rotary", "shortformer")
_ACT_FNS = ("relu", "gelu", "gelu_new", "silu", "solu_ln")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    """Architecture of a decoder-only transformer.

    ``d_mlp = 0`` makes an attention-only model. ``normalization`` is one of LN, LNPre, RMS, RMSPre,
    none. ``positional_embedding`` is standard (learned absolute), rotary or shortformer.
    """

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = 128
    d_vocab: int = 43
    act_fn: str = "gelu"
    normalization: str = "LN"
    positional_embedding: str = "standard"

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_head", "n_ctx", "d_vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_mlp < 0:
            raise ValueError(f"d_mlp must be 0 (attention-only) or positive, got {self.d_mlp}")
        if self.normalization not in _NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(_NORMALIZATIONS)}, got {self.normalization!r}")
        if self.positional_embedding not in _POSITIONAL:
            raise ValueError(
                f"positional_embedding must be one of {', '.join(_POSITIONAL)}, got {self.positional_embedding!r}"
            )
        if self.act_fn not in _ACT_FNS:
            raise ValueError(f"act_fn must be one of {', '.join(_ACT_FNS)}, got {self.act_fn!r}")

    @property
    def attn_only(self) -> bool:
        return self.d_mlp == 0


def hooked_config(cfg: ModelConfig, device: str | torch.device = "cpu") -> Any:
    """Convert to a ``HookedTransformerConfig`` on an explicit device (never with ``seed=``)."""
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_head=cfg.d_head,
        d_mlp=None if cfg.attn_only else cfg.d_mlp,
        attn_only=cfg.attn_only,
        n_ctx=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        act_fn=None if cfg.attn_only else cfg.act_fn,
        normalization_type=_NORMALIZATIONS[cfg.normalization],
        positional_embedding_type=cfg.positional_embedding,
        default_prepend_bos=False,
        device=str(device),
    )


def build_model(cfg: ModelConfig, *, seed: int = 0, device: str | torch.device = "cpu") -> HookedTransformer:
    """A freshly initialised ``HookedTransformer`` whose weights depend only on ``cfg`` and ``seed``.

    TransformerLens initialises from torch's global generator; we run that inside ``fork_rng`` so the
    caller's global RNG state is restored afterwards (no global seeding leaks out of the library).
    """
    import torch
    from transformer_lens import HookedTransformer

    htc = hooked_config(cfg, device)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.manual_seed(seed)
        model = HookedTransformer(htc)
    model.eval()
    return model


def model_config_of(model: HookedTransformer) -> ModelConfig:
    """Recover the :class:`ModelConfig` of a model built by :func:`build_model`."""
    c = model.cfg
    norm = {v: k for k, v in _NORMALIZATIONS.items()}[c.normalization_type]
    return ModelConfig(
        n_layers=c.n_layers,
        d_model=c.d_model,
        n_heads=c.n_heads,
        d_head=c.d_head,
        d_mlp=0 if c.attn_only else c.d_mlp,
        n_ctx=c.n_ctx,
        d_vocab=c.d_vocab,
        act_fn=c.act_fn if c.act_fn is not None else "gelu",
        normalization=norm,
        positional_embedding=c.positional_embedding_type,
    )


def save_model(model: HookedTransformer, directory: Path, *, meta: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``directory`` atomically.

    ``meta`` holds JSON data that travels with the weights (task name and config, vocabulary,
    training recipe, recorded metrics).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    cfg = model_config_of(model)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with staged_dir(directory) as stage:
        save_file(state, str(stage / WEIGHTS_FILE), metadata={"format": FORMAT})
        atomic_write_json(stage / CONFIG_FILE, {"format": FORMAT, "model": cfg.to_dict(), "meta": meta or {}})
    return directory


def read_checkpoint_config(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read and validate a checkpoint's ``config.json``: its :class:`ModelConfig` and ``meta``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IllusionsError(f"model directory {directory} does not exist or is not a directory")
    path = directory / CONFIG_FILE
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT or "model" not in data:
        raise IllusionsError(f"{path} is not an illusions model config (expected format {FORMAT!r})")
    unknown = sorted(set(data) - {"format", "model", "meta"})
    if unknown:
        raise IllusionsError(f"unknown key(s) {', '.join(unknown)} in {path}")
    cfg = ModelConfig.from_dict(data["model"], source=str(path))
    return cfg, dict(data.get("meta") or {})


def load_model(directory: Path, *, device: str | torch.device = "cpu") -> tuple[HookedTransformer, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_model`: ``(model, meta)``. No pickle is involved."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg, meta = read_checkpoint_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise IllusionsError(f"{weights} does not exist")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise IllusionsError(f"{weights} is not a readable safetensors file ({exc})") from None
    model = build_model(cfg, device=device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise IllusionsError(f"{weights} does not match {directory / CONFIG_FILE}: {detail}") from None
    model.eval()
    return model, meta


def describe(model: HookedTransformer) -> str:
    """One line naming the architecture, for tables and logs."""
    c = model.cfg
    mlp = "attn-only" if c.attn_only else f"d_mlp={c.d_mlp}"
    return (
        f"{c.n_layers}L d_model={c.d_model} {c.n_heads}x{c.d_head} heads {mlp} "
        f"n_ctx={c.n_ctx} vocab={c.d_vocab}"
    )
