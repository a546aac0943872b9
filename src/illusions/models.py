"""The one module that builds TransformerLens models, and saves/loads them without pickle.

All TransformerLens construction lives here so that a later move to TransformerLens 4.x (which
removes ``HookedTransformer``/``HookedTransformerConfig``) touches one file.

A checkpoint is a directory with two fixed files:
    config.json        {"format": ..., "model": ModelConfig fields, "meta": {...}}
    model.safetensors  the model's state dict
and the manifest every directory illusions writes gets (``manifest.json``, the sha256 of each file),
which :func:`load_model` checks, so a damaged or altered checkpoint is refused rather than run.

``--model`` also takes a Hugging Face model folder (what ``save_pretrained`` writes: ``config.json``
+ ``model.safetensors``, a tokenizer optionally) of an architecture in :data:`HF_CONVERSIONS`:
:func:`inspect_model_folder` reads either kind of folder from its config alone, and
:func:`load_model_folder` loads the weights, converting a Hugging Face model with TransformerLens'
own per-architecture weight conversion. Nothing here touches the network: every ``transformers``
call is ``local_files_only``, and weights load from safetensors only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from illusions.config import Config, read_json
from illusions.errors import IllusionsError
from illusions.io import MANIFEST_FILE, OutputKind, atomic_write_json, changed_files, staged_dir

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
    with staged_dir(directory, kind=CHECKPOINT) as stage:
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
    if isinstance(data, dict) and "format" not in data and ("model_type" in data or "architectures" in data):
        raise IllusionsError(f"{path} is a Hugging Face model config, not an illusions checkpoint; "
                             "Hugging Face models are analysed with task 'custom' on data you bring")
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
    check_checkpoint_files(directory, (CONFIG_FILE, WEIGHTS_FILE))
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


# --- Any --model folder: an illusions checkpoint or a Hugging Face model folder ---------------------

ILLUSIONS = "illusions"
HUGGINGFACE = "huggingface"
# Hugging Face architecture (config.json "architectures"[0]) -> TransformerLens' weight conversion in
# transformer_lens.pretrained.weight_conversions that turns a locally loaded model into its state dict.
HF_CONVERSIONS = {
    "GPT2LMHeadModel": "convert_gpt2_weights",
    "GPTNeoXForCausalLM": "convert_neox_weights",
    "LlamaForCausalLM": "convert_llama_weights",
}
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# TransformerLens keeps an n_ctx x n_ctx causal mask per layer, so rotary models (whose context is
# only a limit, not a table of weights) are loaded with at most this context.
ROTARY_MAX_CTX = 4096
EXPECTED_MODEL = ("an illusions checkpoint (config.json + model.safetensors written by illusions) or a "
                  "Hugging Face model folder (config.json + model.safetensors, as save_pretrained writes)")


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    """A ``--model`` folder as read from its config alone, before any weight is loaded.

    Attributes:
        path: the folder.
        kind: ``illusions`` (a checkpoint written by :func:`save_model`) or ``huggingface``.
        d_vocab: vocabulary size (token ids are ``0..d_vocab-1``).
        n_ctx: the longest sequence the model takes.
        architecture: the Hugging Face architecture, or ``illusions``.
        meta: an illusions checkpoint's meta; for a Hugging Face folder its model type and
            architecture.
        has_tokenizer: the folder holds tokenizer files (Hugging Face folders only).
        hooked: the ``HookedTransformerConfig`` of a Hugging Face folder (None for a checkpoint).
    """

    path: Path
    kind: str
    d_vocab: int
    n_ctx: int
    architecture: str
    meta: dict[str, Any]
    has_tokenizer: bool = False
    hooked: Any = dataclasses.field(default=None, repr=False, compare=False)


def inspect_model_folder(path: Path | str, *, device: str | torch.device = "cpu") -> ModelFolder:
    """What a ``--model`` folder is, read from its ``config.json`` without loading weights.

    Raises:
        IllusionsError: one line naming what was expected, for a folder that is neither an illusions
            checkpoint nor a Hugging Face folder of a supported architecture with safetensors weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise IllusionsError(f"model {path} does not exist or is not a directory; expected {EXPECTED_MODEL}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise IllusionsError(f"model {path} has no {CONFIG_FILE}; expected {EXPECTED_MODEL}")
    data = read_json(config_path)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        cfg, meta = read_checkpoint_config(path)
        if not (path / WEIGHTS_FILE).is_file():
            raise IllusionsError(f"model {path} has no {WEIGHTS_FILE}; expected {EXPECTED_MODEL}")
        return ModelFolder(path, ILLUSIONS, cfg.d_vocab, cfg.n_ctx, ILLUSIONS, meta)
    if isinstance(data, dict) and ("model_type" in data or "architectures" in data):
        return _inspect_hf(path, data, device)
    raise IllusionsError(f"{config_path} is neither an illusions model config (format {FORMAT!r}) nor a "
                         f"Hugging Face config (model_type); expected {EXPECTED_MODEL}")


def _inspect_hf(path: Path, data: dict[str, Any], device: str | torch.device) -> ModelFolder:
    files = {p.name for p in path.iterdir()}
    if not files & set(HF_WEIGHTS):
        if files & set(_PICKLE_WEIGHTS) or any(f.endswith(".bin") for f in files):
            raise IllusionsError(
                f"model {path} holds its weights only as pytorch_model.bin (pickle), which illusions does not "
                "load; convert it to safetensors (transformers: AutoModelForCausalLM.from_pretrained(folder)"
                ".save_pretrained(folder) writes model.safetensors)")
        raise IllusionsError(f"model {path} has a Hugging Face {CONFIG_FILE} but no model.safetensors; "
                             f"expected {EXPECTED_MODEL}")
    archs = data.get("architectures") or []
    arch = str(archs[0]) if isinstance(archs, list) and archs else ""
    if arch not in HF_CONVERSIONS:
        raise IllusionsError(
            f"model {path} is a {arch or data.get('model_type') or 'Hugging Face'} model; illusions converts "
            f"{', '.join(HF_CONVERSIONS)} (the architectures TransformerLens converts offline)")
    hooked = hf_hooked_config(_hf_auto_config(path), device=device)
    has_tokenizer = bool(files & set(_TOKENIZER_FILES))
    meta = {"huggingface": {"architecture": arch, "model_type": data.get("model_type", "")}}
    return ModelFolder(path, HUGGINGFACE, hooked.d_vocab, hooked.n_ctx, arch, meta, has_tokenizer, hooked)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hf_auto_config(path: Path) -> Any:
    """The folder's ``transformers`` config (defaults filled in), read offline."""
    from transformers import AutoConfig

    with _quiet_transformers():
        try:
            return AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IllusionsError(f"{path / CONFIG_FILE} is not a readable Hugging Face config "
                                 f"({_first_line(exc)})") from None


def hf_hooked_config(hf: Any, *, device: str | torch.device = "cpu") -> Any:
    """The ``HookedTransformerConfig`` of a Hugging Face config of an architecture in
    :data:`HF_CONVERSIONS`: the one place where a Hugging Face config becomes a TransformerLens one.

    The fields follow TransformerLens' own ``convert_hf_model_config`` for the architecture, read from
    the local config instead of the Hub's. Variants the conversion would get wrong (rope scaling,
    Llama biases, NeoX without attention biases, GPT-2 cross-attention) are refused. Weights are
    loaded unprocessed (no LayerNorm folding or centring), so the model computes what the Hugging
    Face model computes.
    """
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS
    from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config

    arch = hf.architectures[0]

    def refuse(what: str) -> IllusionsError:
        return IllusionsError(f"this {arch} model has {what}, which TransformerLens' conversion does not handle")

    def rope_theta() -> float:
        params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        kind = params.get("rope_type") or params.get("type") or "default"
        if kind != "default":
            raise refuse(f"rope scaling {kind!r}")
        theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
        return float(theta if theta is not None else 10000.0)

    if arch == "GPT2LMHeadModel":
        if getattr(hf, "add_cross_attention", False):
            raise refuse("cross-attention")
        kw: dict[str, Any] = {
            "d_model": hf.n_embd, "n_heads": hf.n_head, "d_head": hf.n_embd // hf.n_head,
            "d_mlp": hf.n_inner or 4 * hf.n_embd, "n_layers": hf.n_layer, "n_ctx": hf.n_positions,
            "eps": hf.layer_norm_epsilon, "d_vocab": hf.vocab_size, "act_fn": hf.activation_function,
            "use_attn_scale": getattr(hf, "scale_attn_weights", True),
            "scale_attn_by_inverse_layer_idx": getattr(hf, "scale_attn_by_inverse_layer_idx", False),
            "normalization_type": "LN",
        }
    elif arch == "GPTNeoXForCausalLM":
        if not getattr(hf, "attention_bias", True):
            raise refuse("no attention biases")
        d_head = hf.hidden_size // hf.num_attention_heads
        kw = {
            "d_model": hf.hidden_size, "n_heads": hf.num_attention_heads, "d_head": d_head,
            "d_mlp": hf.intermediate_size, "n_layers": hf.num_hidden_layers,
            "n_ctx": min(hf.max_position_embeddings, ROTARY_MAX_CTX), "eps": hf.layer_norm_eps,
            "d_vocab": hf.vocab_size, "act_fn": hf.hidden_act,
            "parallel_attn_mlp": getattr(hf, "use_parallel_residual", True),
            "positional_embedding_type": "rotary", "rotary_adjacent_pairs": False,
            "rotary_dim": round(get_rotary_pct_from_config(hf) * d_head), "rotary_base": rope_theta(),
            "normalization_type": "LN",
        }
    elif arch == "LlamaForCausalLM":
        if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
            raise refuse("attention or MLP biases")
        d_head = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        n_kv = getattr(hf, "num_key_value_heads", None)
        kw = {
            "d_model": hf.hidden_size, "n_heads": hf.num_attention_heads, "d_head": d_head,
            "d_mlp": hf.intermediate_size, "n_layers": hf.num_hidden_layers,
            "n_ctx": min(hf.max_position_embeddings, ROTARY_MAX_CTX), "eps": hf.rms_norm_eps,
            "d_vocab": hf.vocab_size, "act_fn": hf.hidden_act,
            "n_key_value_heads": n_kv if n_kv not in (None, hf.num_attention_heads) else None,
            "normalization_type": "RMS", "positional_embedding_type": "rotary", "rotary_adjacent_pairs": False,
            "rotary_dim": d_head, "rotary_base": rope_theta(), "final_rms": True, "gated_mlp": True,
            # Grouped-query attention ungrouped: hook_k/hook_v carry one key per query head, the shape
            # every simplifier expects (the same computation: each group's keys repeated).
            "ungroup_grouped_query_attention": n_kv not in (None, hf.num_attention_heads),
        }
    else:  # inspect_model_folder admits only HF_CONVERSIONS
        raise IllusionsError(f"no TransformerLens conversion for {arch}; supported: {', '.join(HF_CONVERSIONS)}")
    if kw["act_fn"] not in SUPPORTED_ACTIVATIONS:
        raise refuse(f"activation {kw['act_fn']!r}")
    return HookedTransformerConfig(**kw, original_architecture=arch, default_prepend_bos=False,
                                   device=str(device))


def load_model_folder(folder: ModelFolder, *, device: str | torch.device = "cpu") -> HookedTransformer:
    """The ``HookedTransformer`` of a folder read by :func:`inspect_model_folder` (eval mode).

    A Hugging Face model is loaded with ``transformers`` from the folder alone (safetensors, local
    files only), converted by TransformerLens' weight conversion for its architecture, and loaded
    strictly: every parameter comes from the checkpoint except those the conversion leaves out and
    TransformerLens fills with its defaults (GPT-2's zero unembedding bias) and the fixed buffers.
    """
    if folder.kind == ILLUSIONS:
        model, _ = load_model(folder.path, device=device)
        return model
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained import weight_conversions
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        try:
            # Mismatched shapes come back in the loading info (transformers' own error points at a
            # report that its silenced logging never printed) and are refused below, naming the tensor.
            hf, info = AutoModelForCausalLM.from_pretrained(str(folder.path), local_files_only=True,
                                                            use_safetensors=True, dtype=torch.float32,
                                                            ignore_mismatched_sizes=True, output_loading_info=True)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            text = _first_line(exc)
            if "above report" in text:  # a conversion error, detailed only in that unprinted report
                text = "transformers could not convert them to the architecture config.json names"
            raise IllusionsError(f"the weights in {folder.path} could not be loaded ({text})") from None
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, saved, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more tensor(s))" if len(mismatched) > 1 else ""
        raise IllusionsError(f"tensor {name} in {folder.path} has shape {list(saved)}, but its config.json makes it "
                             f"{list(wanted)}{more}")
    hf.eval()
    convert = getattr(weight_conversions, HF_CONVERSIONS[folder.architecture])
    with torch.no_grad():
        state = convert(hf, folder.hooked)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = HookedTransformer(folder.hooked)
    unexpected = sorted(set(state) - set(model.state_dict()))
    if unexpected:
        raise IllusionsError(f"converting {folder.path} gave weights the model does not have: {', '.join(unexpected[:3])}")
    try:
        state = model.fill_missing_keys(state)
        model.load_state_dict({k: v.detach().to(device) for k, v in state.items()}, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise IllusionsError(f"the weights in {folder.path} do not fit its config ({_first_line(exc)})") from None
    del hf
    model.eval()
    return model


def load_tokenizer(folder: ModelFolder) -> Any | None:
    """The tokenizer saved in a Hugging Face folder (loaded offline), or None when it has none."""
    if folder.kind != HUGGINGFACE or not folder.has_tokenizer:
        return None
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(str(folder.path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IllusionsError(f"the tokenizer in {folder.path} could not be loaded ({_first_line(exc)})") from None


@dataclasses.dataclass(frozen=True)
class FolderTokens:
    """What a model folder says about its tokens, for data given as text or shown as tokens.

    Attributes:
        encode: text -> token ids with the folder's tokenizer (None: the folder has none).
        tokens: readable form of ids ``0..d_vocab-1`` (None: unknown; shown as ``<id>``).
        pad_id: the id to right-pad rows with; bos_id: the beginning-of-sequence id.
    """

    encode: Callable[[str], list[int]] | None
    tokens: list[str] | None
    pad_id: int = 0
    bos_id: int = 0


def folder_tokens(folder: ModelFolder) -> FolderTokens:
    """The tokenizer of a Hugging Face folder (offline), or an illusions checkpoint's saved vocabulary."""
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        task_meta = folder.meta.get("task")
        saved = task_meta.get("vocab") if isinstance(task_meta, dict) else None
        if isinstance(saved, list) and len(saved) == folder.d_vocab:
            return FolderTokens(None, [str(t) for t in saved], int(task_meta.get("pad_id", 0)),
                                int(task_meta.get("bos_id", 0)))
        return FolderTokens(None, None)

    def encode(text: str) -> list[int]:
        return [int(t) for t in tokenizer(text)["input_ids"]]

    n = min(len(tokenizer), folder.d_vocab)
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(n)))]
    tokens += [f"<{i}>" for i in range(n, folder.d_vocab)]

    def valid(i: Any) -> bool:
        return isinstance(i, int) and 0 <= i < folder.d_vocab

    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    pad_id = next((int(i) for i in ids if valid(i)), 0)
    bos_id = int(tokenizer.bos_token_id) if valid(tokenizer.bos_token_id) else pad_id
    return FolderTokens(encode, tokens, pad_id, bos_id)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence ``transformers``' info logging and progress bars for one call, then restore them."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
