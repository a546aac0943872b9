"""The module that builds TransformerLens models, and saves/loads them without pickle.

All TransformerLens construction lives here and in :mod:`illusions.model_folders`. Under
TransformerLens 4 (no ``HookedTransformer``) each entry point hands over to
:mod:`illusions.backends.tl4`, which builds ``TransformerBridge``s from the same files;
:func:`illusions.backends.uses_bridge` decides, from what the installed TransformerLens offers.

A checkpoint is a directory with two fixed files:
    config.json        {"format": ..., "model": ModelConfig fields, "meta": {...}}
    model.safetensors  the model's state dict
and the manifest every directory illusions writes gets (``manifest.json``, the sha256 of each file),
which :func:`load_model` checks, so a damaged or altered checkpoint is refused rather than run.

``--model`` also takes a Hugging Face model folder: :mod:`illusions.model_folders` reads either kind
of folder (a checkpoint or a Hugging Face folder) and loads it.

Every parameter of a loaded model comes from its file: before any weight is read, the tensors a
safetensors header declares are compared with those the config's architecture has (names, shapes,
floating-point dtypes) and the model's size with the machine's memory; after reading, non-finite
weights are refused, each naming the tensor. The sha256 of the weight files a model was loaded from
is kept so a run can record it and a report refuse a model whose bytes changed since. The checks
themselves live in :mod:`illusions.weights`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from illusions.config import Config, read_json
from illusions.errors import IllusionsError
from illusions.io import MANIFEST_FILE, OutputKind, atomic_write_json, changed_files, staged_dir
from illusions.weights import (  # noqa: F401  (weights_sha256: part of this module's API)
    check_finite,
    check_model_size,
    check_tensors,
    check_values_fit,
    read_safetensors_header,
    read_weights,
    remember_sha256,
    tensors_of,
    weights_sha256,
)

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "illusions-model/1"

CHECKPOINT = OutputKind(
    "model", "a model checkpoint", legacy_required=(CONFIG_FILE, WEIGHTS_FILE),
    legacy_files=(CONFIG_FILE, WEIGHTS_FILE, "recipe.toml", "metrics.json", "training_log.json"),
    legacy_marker=(CONFIG_FILE, "format", FORMAT),
)

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

    from illusions import backends

    if backends.uses_bridge():
        from illusions.backends import tl4

        return tl4.build_model(cfg, seed=seed, device=device)
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
    from illusions import backends

    cfg = model_config_of(model)
    if backends.uses_bridge():  # saved as a HookedTransformer state dict, loadable under either
        from illusions.backends import tl4

        state = {k: v.cpu().contiguous().clone() for k, v in tl4.tl_state_dict(model).items()}
    else:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with staged_dir(directory, kind=CHECKPOINT) as stage:
        save_file(state, str(stage / WEIGHTS_FILE), metadata={"format": FORMAT})
        atomic_write_json(stage / CONFIG_FILE, {"format": FORMAT, "model": cfg.to_dict(), "meta": meta or {}})
    return directory


def read_checkpoint_config(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read and validate a checkpoint's ``config.json``: its :class:`ModelConfig` and ``meta``.

    A model too large for this machine's memory is refused here (:func:`check_model_size`), before
    anything is allocated.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise IllusionsError(f"model directory {directory} does not exist or is not a directory")
    path = directory / CONFIG_FILE
    data = read_json(path)
    if isinstance(data, dict) and "format" not in data and ("model_type" in data or "architectures" in data):
        raise IllusionsError(f"{path} is a Hugging Face model config, not an illusions checkpoint; "
                             "Hugging Face models are analysed with task 'custom' on data you bring")
    if not isinstance(data, dict) or data.get("format") != FORMAT or "model" not in data:
        raise IllusionsError(f"{path} is not an illusions model config (expected format {FORMAT!r})")
    unknown = sorted(set(data) - {"format", "model", "meta"})
    if unknown:
        raise IllusionsError(f"unknown key(s) {', '.join(unknown)} in {path}")
    cfg = ModelConfig.from_dict(data["model"], source=str(path))
    check_model_size(cfg, what=f"the model of {path}")
    return cfg, dict(data.get("meta") or {})


def load_model(directory: Path, *, device: str | torch.device = "cpu") -> tuple[HookedTransformer, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_model`: ``(model, meta)``. No pickle is involved.

    Every tensor of the model must be in the file with its shape, as a float where the model has a
    float, and finite; the sha256 of the bytes loaded is kept (:func:`weights_sha256`).
    """
    directory = Path(directory)
    cfg, meta = read_checkpoint_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise IllusionsError(f"{weights} does not exist")
    check_checkpoint_files(directory, (CONFIG_FILE, WEIGHTS_FILE))
    data, digest = read_weights(weights)
    found = read_safetensors_header(weights, data)
    what = f"the model of {directory / CONFIG_FILE}"
    check_values_fit(weights, found, cfg, what)
    from illusions import backends

    bridge = backends.uses_bridge()  # TransformerLens 4: checked in TL format, converted by backends.tl4
    model = build_model(cfg, device=device)
    if bridge:
        from illusions.backends import tl4

        reference = tl4.tl_state_dict(model)
        parameters = [k for k in reference if not k.endswith(("IGNORE", ".mask"))]
    else:
        reference = model.state_dict()
        parameters = list(dict(model.named_parameters()))
    expected = {k: (tuple(v.shape), v.is_floating_point()) for k, v in reference.items()}
    check_tensors(weights, found, expected, model=what)
    import torch

    state = tensors_of(weights, data)
    check_finite(weights, state, parameters)
    # Fixed buffers (the attention's IGNORE value, rotary tables) are not learned: they must be the
    # values the config gives, or the model would compute something else than the one trained.
    learned = set(parameters)
    for name, buffer in reference.items():
        if name not in learned and not torch.equal(state[name].to(buffer.device), buffer):
            raise IllusionsError(f"{weights}: the fixed buffer {name} differs from the value its config gives; "
                                 "the file was changed")
    if bridge:
        model = tl4.load_state(cfg, state, device=device, source=str(weights))
        remember_sha256(model, {WEIGHTS_FILE: digest})
        return model, meta
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise IllusionsError(f"{weights} does not match {directory / CONFIG_FILE}: "
                             f"{' '.join(str(exc).split())[:300]}") from None
    model.eval()
    remember_sha256(model, {WEIGHTS_FILE: digest})
    return model, meta


def check_checkpoint_files(directory: Path, names: tuple[str, ...]) -> None:
    """Refuse a checkpoint whose files differ from the sha256 its manifest recorded.

    Raises:
        IllusionsError: naming the first damaged (or edited) file.
    """
    bad = changed_files(directory, names)
    if bad:
        raise IllusionsError(
            f"{Path(directory) / bad[0]} does not match the sha256 recorded in {Path(directory) / MANIFEST_FILE} "
            "when illusions wrote it: the file is damaged or was changed; restore it or train the model again"
        )


# Where ``illusions train --save-every`` puts the checkpoints it saves along training: one loadable
# checkpoint (config.json + model.safetensors, no optimizer state) per ``step<k>/`` folder.
CHECKPOINTS_DIR = "checkpoints"
_STEP_FOLDER = re.compile(r"^step([0-9]+)$")


def list_checkpoints(directory: Path | str) -> list[tuple[int, Path]]:
    """The step checkpoints under a training run (``<run>/checkpoints/step<k>/``) or in a folder of
    ``step<k>/`` checkpoints itself, as ``(step, folder)`` sorted by step. Folders without both
    checkpoint files are skipped; a missing directory gives an empty list."""
    directory = Path(directory)
    if (directory / CHECKPOINTS_DIR).is_dir():
        directory = directory / CHECKPOINTS_DIR
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _STEP_FOLDER.match(entry.name)
        if match and (entry / CONFIG_FILE).is_file() and (entry / WEIGHTS_FILE).is_file():
            found.append((int(match[1]), entry))
    return sorted(found)


def describe(model: HookedTransformer) -> str:
    """One line naming the architecture, for tables and logs."""
    c = model.cfg
    mlp = "attn-only" if c.attn_only else f"d_mlp={c.d_mlp}"
    arch = f"{c.original_architecture} " if c.original_architecture else ""
    return (
        f"{arch}{c.n_layers}L d_model={c.d_model} {c.n_heads}x{c.d_head} heads {mlp} "
        f"n_ctx={c.n_ctx} vocab={c.d_vocab}"
    )
