"""Any ``--model`` folder: an illusions checkpoint or a Hugging Face model folder, read from its
config alone and then loaded.

``--model`` takes an illusions checkpoint (:mod:`illusions.models`) or a Hugging Face model folder
(what ``save_pretrained`` writes: ``config.json`` + ``model.safetensors``, a tokenizer optionally) of
an architecture in :data:`HF_ARCHITECTURES`: :func:`inspect_model_folder` reads either kind of folder
from its config alone, and :func:`load_model_folder` loads the weights, converting a Hugging Face
model with TransformerLens' own per-architecture weight conversion. Nothing here touches the network
or runs code from a model folder: a folder is read only as JSON (its configs; one with an ``auto_map``
is refused) and safetensors (its weights), ``transformers`` builds its configs and models from its
own classes, and its one file-reading call (the tokenizer) passes ``trust_remote_code=False`` and
``local_files_only``. The checks of the weights live in :mod:`illusions.weights`, as for a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from illusions.config import read_json
from illusions.errors import IllusionsError
from illusions.models import CONFIG_FILE, FORMAT, WEIGHTS_FILE, load_model, read_checkpoint_config
from illusions.weights import (
    TensorEntry,
    check_finite,
    check_model_size,
    check_tensors,
    check_values_fit,
    read_safetensors_header,
    read_weights,
    remember_sha256,
    tensors_of,
)

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer


ILLUSIONS = "illusions"
HUGGINGFACE = "huggingface"


@dataclasses.dataclass(frozen=True)
class HFArchitecture:
    """What illusions knows of one Hugging Face architecture it reads (a row of :data:`HF_ARCHITECTURES`).

    Attributes:
        model_type: the ``model_type`` its ``config.json`` must state.
        config_class: the ``transformers`` config class built from that JSON alone (transformers never
            opens the folder).
        conversion: TransformerLens' weight conversion in ``transformer_lens.pretrained.weight_conversions``
            that turns a locally loaded model into its state dict.
        sizes: the sizes its config gives, which must be whole numbers >= 1 (the second tuple: or null).
        fields: the ``HookedTransformerConfig`` fields of its ``transformers`` config
            (``fields(hf, architecture)``), read by :func:`hf_hooked_config`.
    """

    model_type: str
    config_class: str
    conversion: str
    sizes: tuple[tuple[str, ...], tuple[str, ...]]
    fields: Callable[[Any, str], dict[str, Any]]


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
HF_INDEX = "model.safetensors.index.json"
# The one tokenizer file read (JSON, by the tokenizers library); other tokenizer formats are not read.
TOKENIZER_FILE = "tokenizer.json"
_TOKENIZER_CONFIG = "tokenizer_config.json"
_SHARD = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors$")
# TransformerLens keeps rotary sine/cosine tables of n_ctx rows per layer, so rotary models (whose
# context is only a limit, not a table of weights) are loaded with at most this context.
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
        has_tokenizer: the folder holds a ``tokenizer.json`` (Hugging Face folders only).
        hooked: the ``HookedTransformerConfig`` of a Hugging Face folder (None for a checkpoint).
        hf_config: the ``transformers`` config of a Hugging Face folder, built from its JSON.
    """

    path: Path
    kind: str
    d_vocab: int
    n_ctx: int
    architecture: str
    meta: dict[str, Any]
    has_tokenizer: bool = False
    hooked: Any = dataclasses.field(default=None, repr=False, compare=False)
    hf_config: Any = dataclasses.field(default=None, repr=False, compare=False)


def inspect_model_folder(path: Path | str, *, device: str | torch.device = "cpu") -> ModelFolder:
    """What a ``--model`` folder is, read from its ``config.json`` and its weights' safetensors
    header, without loading weights.

    A Hugging Face folder is refused when its config names code to run (``auto_map``), its
    ``model_type`` is not its architecture's, a size is not a whole number, the model cannot fit in
    memory, or its weight file's tensors are not exactly those of the architecture (names, shapes,
    floating-point dtypes).

    Raises:
        IllusionsError: one line naming what was expected, for a folder that is neither an illusions
            checkpoint nor a Hugging Face folder of a supported architecture with safetensors weights.
    """
    path = Path(path)
    if not path.is_dir():
        what = ("is a symbolic link to nothing" if path.is_symlink() and not path.exists() else
                "is a file, not a directory" if path.exists() else "does not exist or is not a directory")
        raise IllusionsError(f"model {path} {what}; expected {EXPECTED_MODEL}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise IllusionsError(f"model {path} has no {CONFIG_FILE}; expected {EXPECTED_MODEL}")
    data = read_json(config_path)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        cfg, meta = read_checkpoint_config(path)
        if not (path / WEIGHTS_FILE).is_file():
            raise IllusionsError(f"model {path} has no {WEIGHTS_FILE}; expected {EXPECTED_MODEL}")
        found = read_safetensors_header(path / WEIGHTS_FILE)
        check_values_fit(path / WEIGHTS_FILE, found, cfg, f"the model of {config_path}")
        return ModelFolder(path, ILLUSIONS, cfg.d_vocab, cfg.n_ctx, ILLUSIONS, meta)
    if isinstance(data, dict) and ("model_type" in data or "architectures" in data):
        return _inspect_hf(path, data, device)
    raise IllusionsError(f"{config_path} is neither an illusions model config (format {FORMAT!r}) nor a "
                         f"Hugging Face config (model_type); expected {EXPECTED_MODEL}")


def _inspect_hf(path: Path, data: dict[str, Any], device: str | torch.device) -> ModelFolder:
    files = {p.name for p in path.iterdir()}
    _refuse_code(path, data, files)
    archs = data.get("architectures")
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) else ""
    model_type = data.get("model_type")
    if arch not in HF_ARCHITECTURES:
        named = arch or (str(archs)[:60] if archs else "") or (str(model_type)[:40] if model_type else "Hugging Face")
        raise IllusionsError(
            f"model {path} is a {named} model; illusions converts "
            f"{', '.join(HF_ARCHITECTURES)} (the architectures TransformerLens converts offline)")
    if model_type != HF_ARCHITECTURES[arch].model_type:
        said = f"model_type {str(model_type)[:40]!r}" if model_type is not None else "no model_type"
        raise IllusionsError(f"{path / CONFIG_FILE} gives {said} for architecture {arch}, whose model_type is "
                             f"{HF_ARCHITECTURES[arch].model_type!r}; a config whose two disagree is not read")
    if not files & set(HF_WEIGHTS):
        other = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
        if other:
            raise IllusionsError(
                f"model {path} holds its weights only as {', '.join(other[:3])}{' ...' if len(other) > 3 else ''}, "
                "not safetensors; illusions never loads pickle (torch.save) files: convert it to safetensors "
                "(transformers: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder) writes "
                "model.safetensors)")
        raise IllusionsError(f"model {path} has a Hugging Face {CONFIG_FILE} but no model.safetensors; "
                             f"expected {EXPECTED_MODEL}")
    hf = _hf_config(path, data, arch)
    hooked = hf_hooked_config(hf, device=device)
    check_model_size(hooked, what=f"model {path}")
    model = f"the {arch} of {path / CONFIG_FILE}"
    found: dict[str, TensorEntry] = {}
    for name in _hf_weight_files(path, files):
        found.update(_shard_header(path, name, found))
    where = path / (WEIGHTS_FILE if WEIGHTS_FILE in files else HF_INDEX)
    check_values_fit(where, found, hooked, model)
    skeleton, expected, tied = _hf_skeleton(arch, hf, path)
    found = _as_model_names(where, found, _file_names(skeleton))
    check_tensors(where, found, expected, model=model, optional=tuple(tied))
    meta = {"huggingface": {"architecture": arch, "model_type": model_type}}
    return ModelFolder(path, HUGGINGFACE, hooked.d_vocab, hooked.n_ctx, arch, meta, TOKENIZER_FILE in files, hooked,
                       hf)


def _refuse_code(path: Path, data: dict[str, Any], files: set[str]) -> None:
    """Refuse a folder whose configs name Python code of its own (``auto_map``): it is never run."""
    configs = [(CONFIG_FILE, data)]
    if _TOKENIZER_CONFIG in files:
        configs.append((_TOKENIZER_CONFIG, read_json(path / _TOKENIZER_CONFIG)))
    for name, config in configs:
        if isinstance(config, dict) and "auto_map" in config:
            raise IllusionsError(f"model {path}: {name} names code of the folder's own to run (auto_map); "
                                 "illusions never runs code from a model folder, it reads "
                                 f"{', '.join(HF_ARCHITECTURES)} from JSON and safetensors only")


def _hf_config(path: Path, data: dict[str, Any], arch: str) -> Any:
    """The ``transformers`` config of ``arch`` built from the JSON already read (no file is opened)."""
    import transformers

    required, optional = HF_ARCHITECTURES[arch].sizes
    for key in (*required, *optional):
        value = data.get(key)
        if key not in data or (value is None and key in optional):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise IllusionsError(f"{path / CONFIG_FILE}: {key} must be a whole number of at least 1, got "
                                 f"{str(value)[:40]}")
    errors: list[type[BaseException]] = [ValueError, TypeError, KeyError, AttributeError, AssertionError]
    try:
        from huggingface_hub.errors import StrictDataclassError

        errors.append(StrictDataclassError)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    with _quiet_transformers():
        try:
            return getattr(transformers, HF_ARCHITECTURES[arch].config_class).from_dict(data)
        except tuple(errors) as exc:
            raise IllusionsError(f"{path / CONFIG_FILE} is not a readable {arch} config "
                                 f"({' '.join(str(exc).split())[:200]})") from None


def _hf_weight_files(path: Path, files: set[str]) -> list[str]:
    """The safetensors files holding a Hugging Face folder's weights: ``model.safetensors``, else the
    shards its index names (plain file names in the folder)."""
    if WEIGHTS_FILE in files:
        return [WEIGHTS_FILE]
    index = read_json(path / HF_INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise IllusionsError(f"{path / HF_INDEX} has no weight_map of tensor names to files")
    shards = sorted({str(v) for v in weight_map.values()})
    for shard in shards:
        if not _SHARD.match(shard) or not (path / shard).is_file():
            raise IllusionsError(f"{path / HF_INDEX} names {shard[:80]!r}, which is not a .safetensors file in "
                                 f"{path}")
    return shards


def _shard_header(path: Path, name: str, seen: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    found = read_safetensors_header(path / name)
    twice = [t for t in found if t in seen]
    if twice:
        raise IllusionsError(f"{path / name} holds tensor {twice[0]}, which another shard holds too")
    return found


def _hf_skeleton(arch: str, hf: Any, path: Path) -> tuple[Any, dict[str, tuple[tuple[int, ...], bool]], dict[str, str]]:
    """The architecture's ``transformers`` model on the meta device (no memory, no weights): the model,
    ``name -> (shape, floating)`` of every tensor it stores, and its tied tensors (``target -> source``)."""
    import torch
    import transformers

    with torch.device("meta"), warnings.catch_warnings(), _quiet_transformers():
        warnings.simplefilter("ignore")
        try:
            model = getattr(transformers, arch)(hf)
        except (ValueError, TypeError, KeyError, AttributeError, AssertionError, RuntimeError) as exc:
            raise IllusionsError(f"{path / CONFIG_FILE} does not describe a {arch} transformers can build "
                                 f"({_first_line(exc)})") from None
    expected = {k: (tuple(v.shape), v.is_floating_point()) for k, v in model.state_dict().items()}
    tied = dict(model.get_expanded_tied_weights_keys()) if hasattr(model, "get_expanded_tied_weights_keys") else {}
    return model, expected, {k: v for k, v in tied.items() if k in expected and v in expected}


def _file_names(model: Any) -> Callable[[str], str]:
    """How ``transformers`` renames a file's tensor names to its model's when loading (GPT-NeoX files
    hold ``embed_out.weight`` for the model's ``lm_head.weight``): its pure renamings, applied in order."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # older transformers: file names are the model's own
        return lambda name: name
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]

    def rename(name: str) -> str:
        for renaming in renamings:
            name, _ = renaming.rename_source_key(name)
        return name

    return rename


def _as_model_names(where: Path, found: dict[str, Any], rename: Callable[[str], str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in found.items():
        key = rename(name)
        if key in out:
            raise IllusionsError(f"{where} holds two tensors for {key}")
        out[key] = value
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def hf_hooked_config(hf: Any, *, device: str | torch.device = "cpu") -> Any:
    """The ``HookedTransformerConfig`` of a Hugging Face config of an architecture in
    :data:`HF_ARCHITECTURES`: the one place where a Hugging Face config becomes a TransformerLens one.

    The fields follow TransformerLens' own ``convert_hf_model_config`` for the architecture, read from
    the local config instead of the Hub's, plus what TransformerLens' presets leave out but the config
    says (Qwen2's and Gemma 2's sliding-window layers, Gemma 2's query scale). Variants the conversion
    would get wrong (rope scaling, Llama/Gemma biases, bidirectional attention, NeoX without
    attention biases, GPT-2 cross-attention, heads that do not divide the width, a rotary width that is
    not an even whole number) are refused. Weights are loaded
    unprocessed (no LayerNorm folding or centring), so the model computes what the Hugging Face
    model computes.
    """
    try:
        from transformer_lens import HookedTransformerConfig
    except ImportError:  # TransformerLens 4
        HookedTransformerConfig = None  # noqa: N806
    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

    arch = hf.architectures[0]
    if arch not in HF_ARCHITECTURES:  # inspect_model_folder admits only these
        raise IllusionsError(f"no TransformerLens conversion for {arch}; supported: {', '.join(HF_ARCHITECTURES)}")
    kw = HF_ARCHITECTURES[arch].fields(hf, arch)
    if kw["act_fn"] not in SUPPORTED_ACTIVATIONS:
        raise _unconvertible(arch, f"activation {kw['act_fn']!r}")
    if HookedTransformerConfig is None:  # TransformerLens 4: the same fields, read by backends.tl4
        return types.SimpleNamespace(**kw, original_architecture=arch, device=str(device))
    try:
        return HookedTransformerConfig(**kw, original_architecture=arch, default_prepend_bos=False,
                                       device=str(device))
    except (ValueError, TypeError, AssertionError) as exc:
        raise IllusionsError(f"this {arch} config does not make a TransformerLens model ({_first_line(exc)})") from None


def _unconvertible(arch: str, what: str) -> IllusionsError:
    return IllusionsError(f"this {arch} model has {what}, which TransformerLens' conversion does not handle")


def _rope_theta(hf: Any, arch: str) -> float:
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind != "default":
        raise _unconvertible(arch, f"rope scaling {kind!r}")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _head_width(arch: str, width: int, heads: int) -> int:
    if width % heads:
        raise _unconvertible(arch, f"a width of {width} that its {heads} heads do not divide")
    return width // heads


def _gpt2_fields(hf: Any, arch: str) -> dict[str, Any]:
    """The ``HookedTransformerConfig`` fields of a GPT-2 config."""
    if getattr(hf, "add_cross_attention", False):
        raise _unconvertible(arch, "cross-attention")
    return {
        "d_model": hf.n_embd, "n_heads": hf.n_head, "d_head": _head_width(arch, hf.n_embd, hf.n_head),
        "d_mlp": hf.n_inner or 4 * hf.n_embd, "n_layers": hf.n_layer, "n_ctx": hf.n_positions,
        "eps": hf.layer_norm_epsilon, "d_vocab": hf.vocab_size, "act_fn": hf.activation_function,
        "use_attn_scale": getattr(hf, "scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": getattr(hf, "scale_attn_by_inverse_layer_idx", False),
        "normalization_type": "LN",
    }


def _rotary_fields(hf: Any, arch: str, d_head: int, rotary_dim: int, eps: float, act_fn: str | None = None
                   ) -> dict[str, Any]:
    """The fields every rotary config gives alike (GPT-NeoX, Llama-style): sizes, context (capped at
    :data:`ROTARY_MAX_CTX`), activation and rotary positions (halves, not adjacent pairs)."""
    return {
        "d_model": hf.hidden_size, "n_heads": hf.num_attention_heads, "d_head": d_head,
        "d_mlp": hf.intermediate_size, "n_layers": hf.num_hidden_layers,
        "n_ctx": min(hf.max_position_embeddings, ROTARY_MAX_CTX), "eps": eps,
        "d_vocab": hf.vocab_size, "act_fn": act_fn or hf.hidden_act,
        "positional_embedding_type": "rotary", "rotary_adjacent_pairs": False,
        "rotary_dim": rotary_dim, "rotary_base": _rope_theta(hf, arch),
    }


def _neox_fields(hf: Any, arch: str) -> dict[str, Any]:
    """The ``HookedTransformerConfig`` fields of a GPT-NeoX config."""
    from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config

    if not getattr(hf, "attention_bias", True):
        raise _unconvertible(arch, "no attention biases")
    d_head = _head_width(arch, hf.hidden_size, hf.num_attention_heads)
    rotary = get_rotary_pct_from_config(hf) * d_head
    if not (isinstance(rotary, int | float) and rotary >= 2 and float(rotary).is_integer() and int(rotary) % 2 == 0):
        raise _unconvertible(arch, f"a rotary width of {rotary} (rotary_pct x head width), not an even whole number")
    return {
        **_rotary_fields(hf, arch, d_head, int(rotary), hf.layer_norm_eps),
        "parallel_attn_mlp": getattr(hf, "use_parallel_residual", True),
        "normalization_type": "LN",
    }


def _gated_rms_fields(hf: Any, arch: str, *, act_fn: str | None = None,
                      grouped_keys: bool = False) -> dict[str, Any]:
    """The fields Llama, Mistral, Qwen2 and Gemma configs give alike: rotary positions over the whole
    head, RMSNorm, a gated MLP and grouped-query attention. ``grouped_keys``: the architecture's
    conversion always writes grouped key/value weights, so ``n_key_value_heads`` is set even when
    every query head has its own."""
    d_head = getattr(hf, "head_dim", None) or _head_width(arch, hf.hidden_size, hf.num_attention_heads)
    n_heads = hf.num_attention_heads
    n_kv = getattr(hf, "num_key_value_heads", None)
    if n_kv is not None and n_heads % n_kv:
        raise _unconvertible(arch, f"{n_heads} query heads that its {n_kv} key/value heads do not divide")
    grouped = n_kv not in (None, n_heads)
    return {
        **_rotary_fields(hf, arch, d_head, d_head, hf.rms_norm_eps, act_fn),
        "n_key_value_heads": (n_kv or n_heads) if grouped or grouped_keys else None,
        "normalization_type": "RMS", "final_rms": True, "gated_mlp": True,
        # Grouped-query attention ungrouped: hook_k/hook_v carry one key per query head, the shape
        # every simplifier expects (the same computation: each group's keys repeated).
        "ungroup_grouped_query_attention": grouped,
    }


def _window_fields(hf: Any, arch: str, layer_types: list[str] | None) -> dict[str, Any]:
    """Sliding-window attention: each layer whose type is ``sliding_attention`` attends to its last
    ``sliding_window`` positions (itself included), TransformerLens' ``local`` attention; no fields
    when no layer slides."""
    window = getattr(hf, "sliding_window", None)
    layer_types = list(layer_types or ["full_attention"] * hf.num_hidden_layers)
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown or len(layer_types) != hf.num_hidden_layers:
        raise _unconvertible(arch, f"layer types {str(unknown or layer_types)[:60]}")
    if window is None or "sliding_attention" not in layer_types:
        return {}
    return {"use_local_attn": True, "window_size": window,
            "attn_types": ["local" if t == "sliding_attention" else "global" for t in layer_types]}


def _refuse_variants(hf: Any, arch: str) -> None:
    """Refuse biases where the conversion writes zeros, and attention that is not causal."""
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise _unconvertible(arch, "attention or MLP biases")
    if getattr(hf, "use_bidirectional_attention", False):
        raise _unconvertible(arch, "bidirectional attention")


def _llama_fields(hf: Any, arch: str) -> dict[str, Any]:
    """The ``HookedTransformerConfig`` fields of a Llama config."""
    _refuse_variants(hf, arch)
    return _gated_rms_fields(hf, arch)


def _mistral_fields(hf: Any, arch: str) -> dict[str, Any]:
    """The fields of a Mistral config: Llama's, with every layer's attention in a sliding window when
    the config gives one (its attention and MLP never have biases)."""
    slides = ["sliding_attention"] * hf.num_hidden_layers
    return {**_gated_rms_fields(hf, arch, grouped_keys=True), **_window_fields(hf, arch, slides)}


def _qwen2_fields(hf: Any, arch: str) -> dict[str, Any]:
    """The fields of a Qwen2 config: Llama's with query/key/value biases (which TransformerLens'
    attention always has), and the sliding-window layers its ``layer_types`` name."""
    return {**_gated_rms_fields(hf, arch, grouped_keys=True),
            **_window_fields(hf, arch, getattr(hf, "layer_types", None))}


def _gemma_fields(hf: Any, arch: str) -> dict[str, Any]:
    """The fields of a Gemma config: Llama's, with keys always grouped. The conversion itself scales the
    embedding by sqrt(d_model) and turns each ``(1 + weight)`` RMSNorm into a plain one."""
    _refuse_variants(hf, arch)
    return _gated_rms_fields(hf, arch, grouped_keys=True)


def _gemma2_fields(hf: Any, arch: str) -> dict[str, Any]:
    """The fields of a Gemma 2 config: Gemma's (the same conversion) with norms after attention and MLP,
    soft caps on attention scores and logits, a query scale of its own and sliding-window layers."""
    _refuse_variants(hf, arch)
    fields = _gated_rms_fields(hf, arch, act_fn=hf.hidden_activation, grouped_keys=True)
    return {
        **fields, **_window_fields(hf, arch, hf.layer_types),
        "use_normalization_before_and_after": True,
        "attn_scale": float(hf.query_pre_attn_scalar) ** 0.5,
        "attn_scores_soft_cap": float(hf.attn_logit_softcapping or -1.0),
        "output_logits_soft_cap": float(hf.final_logit_softcapping or -1.0),
    }


# The sizes of a Llama-style config (GPT-NeoX's required ones are the same; Mistral, Qwen2 and Gemma 2 add
# optional ones).
_LLAMA_SIZES = (("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                 "max_position_embeddings", "vocab_size"), ("num_key_value_heads", "head_dim"))
# Mistral, Qwen2 and Gemma 2 also read their sliding window.
_WINDOWED_SIZES = (_LLAMA_SIZES[0], (*_LLAMA_SIZES[1], "sliding_window"))
# The Hugging Face architectures illusions reads (config.json "architectures"[0]), each with all it needs
# of it, in the order messages list them.
HF_ARCHITECTURES: dict[str, HFArchitecture] = {
    "GPT2LMHeadModel": HFArchitecture(
        "gpt2", "GPT2Config", "convert_gpt2_weights",
        (("n_embd", "n_head", "n_layer", "n_positions", "vocab_size"), ("n_inner",)), _gpt2_fields),
    "GPTNeoXForCausalLM": HFArchitecture(
        "gpt_neox", "GPTNeoXConfig", "convert_neox_weights",
        (_LLAMA_SIZES[0], ()), _neox_fields),
    "LlamaForCausalLM": HFArchitecture("llama", "LlamaConfig", "convert_llama_weights", _LLAMA_SIZES, _llama_fields),
    "MistralForCausalLM": HFArchitecture(
        "mistral", "MistralConfig", "convert_mistral_weights",
        _WINDOWED_SIZES, _mistral_fields),
    "Qwen2ForCausalLM": HFArchitecture(
        "qwen2", "Qwen2Config", "convert_qwen2_weights",
        _WINDOWED_SIZES, _qwen2_fields),
    "GemmaForCausalLM": HFArchitecture("gemma", "GemmaConfig", "convert_gemma_weights", _LLAMA_SIZES, _gemma_fields),
    "Gemma2ForCausalLM": HFArchitecture(
        "gemma2", "Gemma2Config", "convert_gemma_weights",
        (_WINDOWED_SIZES[0], (*_WINDOWED_SIZES[1], "query_pre_attn_scalar")), _gemma2_fields),
}


def load_model_folder(folder: ModelFolder, *, device: str | torch.device = "cpu") -> HookedTransformer:
    """The ``HookedTransformer`` of a folder read by :func:`inspect_model_folder` (eval mode).

    A Hugging Face model's weights are read from its safetensors file(s) alone, checked again against
    the architecture (every tensor present, none extra, shapes, float dtypes) and for non-finite
    values, placed into the architecture's ``transformers`` model built on the meta device, converted
    by TransformerLens' weight conversion for the architecture and loaded strictly: every parameter
    comes from the file except those the conversion leaves out and TransformerLens fills with its
    defaults (GPT-2's zero unembedding bias) and the fixed buffers. The sha256 of the files read is
    kept (:func:`weights_sha256`).
    """
    if folder.kind == ILLUSIONS:
        model, _ = load_model(folder.path, device=device)
        return model
    import torch

    path, arch = folder.path, folder.architecture
    files = {p.name for p in path.iterdir()}
    names = _hf_weight_files(path, files)
    digests: dict[str, str] = {}
    if names != [WEIGHTS_FILE]:
        digests[HF_INDEX] = read_weights(path / HF_INDEX)[1]
    raw: dict[str, bytes] = {}
    found: dict[str, TensorEntry] = {}
    for name in names:
        raw[name], digests[name] = read_weights(path / name)
        entries = read_safetensors_header(path / name, raw[name])
        twice = [t for t in entries if t in found]
        if twice:
            raise IllusionsError(f"{path / name} holds tensor {twice[0]}, which another shard holds too")
        found.update(entries)
    where = path / (WEIGHTS_FILE if names == [WEIGHTS_FILE] else HF_INDEX)
    model_name = f"the {arch} of {path / CONFIG_FILE}"
    check_values_fit(where, found, folder.hooked, model_name)
    hf, expected, tied = _hf_skeleton(arch, folder.hf_config, path)
    rename = _file_names(hf)
    check_tensors(where, _as_model_names(where, found, rename), expected, model=model_name, optional=tuple(tied))
    state: dict[str, torch.Tensor] = {}
    for name in names:
        tensors = _as_model_names(where, tensors_of(path / name, raw.pop(name), dtype=torch.float32), rename)
        check_finite(path / name, tensors)
        state.update(tensors)
    for target, source in tied.items():
        if target in state and not torch.equal(state[target], state[source]):
            raise IllusionsError(f"{where} holds {target} and {source}, which its config ties "
                                 "(tie_word_embeddings), with different values")
        state[target] = state[source]
    try:
        hf.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, ValueError) as exc:
        raise IllusionsError(f"the weights in {path} do not fit its config ({_first_line(exc)})") from None
    from illusions import backends

    if backends.uses_bridge():  # TransformerLens 4: the checked folder, loaded whole by transformers
        return _load_hf_bridge(folder, digests, device=device)
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained import weight_conversions

    convert = getattr(weight_conversions, HF_ARCHITECTURES[arch].conversion)
    with torch.no_grad():
        converted = convert(hf, folder.hooked)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = HookedTransformer(folder.hooked)
    unexpected = sorted(set(converted) - set(model.state_dict()))
    if unexpected:
        raise IllusionsError(f"converting {path} gave weights the model does not have: {', '.join(unexpected[:3])}")
    try:
        converted = model.fill_missing_keys(converted)
        model.load_state_dict({k: v.detach().to(device) for k, v in converted.items()}, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise IllusionsError(f"the weights in {path} do not fit its config ({_first_line(exc)})") from None
    del hf, state, converted
    model.eval()
    remember_sha256(model, digests)
    return model


def _load_hf_bridge(folder: ModelFolder, digests: dict[str, str], *, device: str | torch.device) -> Any:
    """A Hugging Face folder as a TransformerLens 4 bridge, after :func:`load_model_folder` checked every
    tensor of it: ``transformers`` loads it offline from safetensors (no code of the folder's own:
    ``trust_remote_code=False``; ``auto_map`` folders were refused before), then the bridge wraps it."""
    import torch
    from transformers import AutoModelForCausalLM

    from illusions.backends import tl4

    with _quiet_transformers():
        try:
            hf = AutoModelForCausalLM.from_pretrained(str(folder.path), local_files_only=True, use_safetensors=True,
                                                      dtype=torch.float32, trust_remote_code=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise IllusionsError(f"the weights in {folder.path} could not be loaded ({_first_line(exc)})") from None
    hf.eval()
    model = tl4.load_hf(folder.path, hf, architecture=folder.architecture, d_vocab=folder.d_vocab,
                        tokenizer=load_tokenizer(folder), device=device)
    remember_sha256(model, digests)
    return model


def load_tokenizer(folder: ModelFolder) -> Any | None:
    """The ``tokenizer.json`` of a Hugging Face folder (read by the tokenizers library, offline, no
    code of the folder's own), or None when it has none."""
    if folder.kind != HUGGINGFACE or not folder.has_tokenizer:
        return None
    from transformers import PreTrainedTokenizerFast

    with _quiet_transformers():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(folder.path), local_files_only=True,
                                                           trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed file
            raise IllusionsError(f"the tokenizer in {folder.path} could not be loaded ({_first_line(exc)})") from None


@dataclasses.dataclass(frozen=True)
class FolderTokens:
    """What a model folder says about its tokens, for data given as text or shown as tokens.

    Attributes:
        encode: text -> token ids with the folder's tokenizer (None: the folder has none).
        tokens: readable form of ids ``0..d_vocab-1`` (None: unknown; shown as ``<id>``).
        pad_id: the id to right-pad rows with; bos_id: the beginning-of-sequence id.
        encode_parts: text -> ``(prefix, text_ids, suffix)``: the special tokens the tokenizer puts in
            front (a BOS, as its ``add_special_tokens`` behaviour says) and after (an EOS) and the
            text's own ids between; ``prefix + text_ids + suffix == encode(text)``.
    """

    encode: Callable[[str], list[int]] | None
    tokens: list[str] | None
    pad_id: int = 0
    bos_id: int = 0
    encode_parts: Callable[[str], tuple[list[int], list[int], list[int]]] | None = None


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

    def encode_parts(text: str) -> tuple[list[int], list[int], list[int]]:
        return split_special(encode(text), [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]])

    n = min(len(tokenizer), folder.d_vocab)
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(n)))]
    tokens += [f"<{i}>" for i in range(n, folder.d_vocab)]

    def valid(i: Any) -> bool:
        return isinstance(i, int) and 0 <= i < folder.d_vocab

    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    pad_id = next((int(i) for i in ids if valid(i)), 0)
    bos_id = int(tokenizer.bos_token_id) if valid(tokenizer.bos_token_id) else pad_id
    return FolderTokens(encode, tokens, pad_id, bos_id, encode_parts)


def split_special(full: list[int], plain: list[int]) -> tuple[list[int], list[int], list[int]]:
    """``(prefix, plain, suffix)`` of a text encoded with special tokens (``full``) and without them
    (``plain``): where ``plain`` sits inside ``full``. A tokenizer whose special tokens change the text's
    own ids (``plain`` not found whole in ``full``) gives ``([], full, [])``: no prefix to repeat."""
    if not plain:
        return [], full, []
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return full[:start], plain, full[start + len(plain):]
    return [], full, []


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
