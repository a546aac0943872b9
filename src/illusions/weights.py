"""Model weights as files: how much memory a model of a given shape needs, what a safetensors file
holds (read from its header, every offset checked), whether its tensors are exactly a model's, and
the sha256 of the bytes a model was loaded from.

Nothing here builds a model (that is :mod:`illusions.models`); torch and safetensors are imported
inside the functions that need them, so the sizes can be checked by any layer (a training recipe, a
checkpoint's config) before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import weakref
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from illusions.errors import IllusionsError

if TYPE_CHECKING:
    import torch


# --- Sizes: refuse a model that cannot fit in memory, before allocating it ----------------------------


def _dims(cfg: Any) -> dict[str, Any]:
    """The sizes of a :class:`ModelConfig` or a ``HookedTransformerConfig`` (the same names)."""
    n_heads = cfg.n_heads
    d_head = cfg.d_head
    positional = getattr(cfg, "positional_embedding", None) or getattr(cfg, "positional_embedding_type", "standard")
    rotary = positional == "rotary"
    return {
        "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": n_heads, "d_head": d_head,
        "n_kv": getattr(cfg, "n_key_value_heads", None) or n_heads, "d_mlp": cfg.d_mlp or 0,
        "gated": bool(getattr(cfg, "gated_mlp", False)), "n_ctx": cfg.n_ctx, "d_vocab": cfg.d_vocab,
        "table": not rotary, "rotary_dim": (getattr(cfg, "rotary_dim", None) or d_head) if rotary else 0,
    }


def _parameter_parts(cfg: Any) -> dict[str, int]:
    """:func:`min_parameters` by part, named for a message."""
    d = _dims(cfg)
    attention = d["d_model"] * d["d_head"] * (2 * d["n_heads"] + 2 * d["n_kv"])
    mlp = d["d_model"] * d["d_mlp"] * (3 if d["gated"] else 2)
    return {"the blocks": d["n_layers"] * (attention + mlp), "the token embedding": d["d_vocab"] * d["d_model"],
            "the positional embedding": d["n_ctx"] * d["d_model"] if d["table"] else 0}


def min_parameters(cfg: Any) -> int:
    """A lower bound of the values a model of this shape stores: its attention and MLP matrices, the
    token embedding and the position table (not biases, norms or a tied unembedding), so a weight file
    holding fewer values cannot hold the model. Exact integer arithmetic: any size is safe to pass."""
    return sum(_parameter_parts(cfg).values())


def memory_needed(cfg: Any, *, training: bool = False) -> int:
    """Bytes a model of this shape needs in float32: its parameters (with ``training``, four copies:
    weights, gradients and Adam's two moments), its rotary tables, and the attention scores, pattern
    and causal mask of one sequence as long as its context."""
    d = _dims(cfg)
    params = min_parameters(cfg) + d["d_model"] * d["d_vocab"]
    tables = d["n_layers"] * d["n_ctx"] * d["rotary_dim"] * 2
    attention = d["n_heads"] * d["n_ctx"] ** 2 * 8 + d["n_ctx"] ** 2
    return 4 * params * (4 if training else 1) + 4 * tables + attention


def memory_available() -> int:
    """This machine's physical memory in bytes (or its cgroup's limit, when lower): the one reading of
    it, :func:`illusions.devices.memory_bytes`; 1 TiB where the platform does not say."""
    from illusions.devices import memory_bytes

    total = memory_bytes("cpu")
    return (1 << 40) if total is None else total


def check_model_size(cfg: Any, *, what: str = "this model", training: bool = False, device: Any = "cpu",
                     remedy: str = "") -> None:
    """Refuse, before anything is allocated, a model whose parameters (and attention over one
    full-context sequence) cannot fit in the memory of ``device`` (this machine's for the CPU, a
    GPU's own): the one size check for checkpoints, Hugging Face configs and training recipes.

    Args:
        cfg: a :class:`ModelConfig` or a ``HookedTransformerConfig``.
        what: how the message names the model (``model runs/x``, ``the recipe's model``).
        training: count gradients and AdamW's two moments too (four float32 copies of each parameter).
        device: where the model would live.
        remedy: what the message ends with (``make the recipe's [model] smaller``).

    Raises:
        IllusionsError: one line with the sizes, the part holding most parameters, the bytes needed
            and the memory there is.
    """
    from illusions.devices import memory_bytes

    cpu = str(device).split(":")[0] == "cpu"
    need, have = memory_needed(cfg, training=training), memory_available() if cpu else memory_bytes(device)
    if have is None or need <= have:
        return
    d = _dims(cfg)
    shape = ", ".join(f"{k}={_count(d[k])}" for k in ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "d_vocab"))
    parts = _parameter_parts(cfg)
    part, most = max(parts.items(), key=lambda item: item[1])
    state = " and their training state (weight, gradient and AdamW's two moments)" if training else ""
    where = "this machine's" if cpu else f"device {device}'s"
    raise IllusionsError(
        f"{what} ({shape}) needs about {_bytes(need)} for its {_count(sum(parts.values()))}+ parameters ({_count(most)} "
        f"in {part}){state} and the attention of one {_count(d['n_ctx'])}-token sequence, more than {where} "
        f"{_bytes(have)} of memory" + (f"; {remedy}" if remedy else ""))


def _count(n: int) -> str:
    """An integer for a message, any size (Python refuses to print ints of over 4300 digits)."""
    if abs(n) < 10**15:
        return f"{n:,}"
    return f"~10^{int(n.bit_length() * math.log10(2))}"


def _bytes(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**60 else f"~10^{int(n.bit_length() * math.log10(2))} bytes"


# --- Weights: safetensors only, every parameter from the file ---------------------------------------

# Bytes per element of each safetensors dtype; the floating-point ones are those a weight may have.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_DTYPE_NAMES = {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32",
                "U16": "uint16", "U8": "uint8", "BOOL": "bool"}
# safetensors' own limit on the JSON header.
MAX_HEADER_BYTES = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """A tensor as a safetensors header declares it: its dtype (``F32``, ``I8``, ...) and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path, data: bytes | None = None) -> dict[str, TensorEntry]:
    """The tensors a safetensors file declares, from its header alone (``data``: the file's bytes when
    already read), every offset checked against the file's size.

    Raises:
        IllusionsError: one line naming the file: empty, truncated, a header longer than the file or
            than safetensors allows, a header that is not the JSON table safetensors writes.
    """
    path = Path(path)
    try:
        if data is None:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                head = fh.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                raw = fh.read(n) if 0 <= n <= min(MAX_HEADER_BYTES, size - 8) else b""
        else:
            size = len(data)
            n = struct.unpack("<Q", data[:8])[0] if size >= 8 else -1
            raw = data[8 : 8 + n] if 0 <= n <= min(MAX_HEADER_BYTES, size - 8) else b""
    except OSError as exc:
        raise IllusionsError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise IllusionsError(f"{path} is empty (0 bytes), not a safetensors file")
    if n < 0:
        raise IllusionsError(f"{path} is truncated ({size} bytes), not a safetensors file")
    if n > size - 8:
        raise IllusionsError(f"{path} is truncated or not a safetensors file: its header claims {_count(n)} bytes "
                             f"but the file holds {size:,}")
    if n > MAX_HEADER_BYTES:
        raise IllusionsError(f"{path} has a header of {n:,} bytes, more than safetensors allows "
                             f"({MAX_HEADER_BYTES:,}); it is not a weight file illusions reads")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise IllusionsError(f"{path} is not a readable safetensors file (its header is not a JSON table)")
    end_of_data = size - 8 - n
    found = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        found[name] = _header_entry(path, name, entry, end_of_data)
    return found


def _header_entry(path: Path, name: str, entry: Any, end_of_data: int) -> TensorEntry:
    def bad(what: str) -> IllusionsError:
        return IllusionsError(f"{path} is not a readable safetensors file: tensor {name} {what}")

    if not isinstance(entry, dict):
        raise bad("has no dtype, shape and offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        raise bad(f"has dtype {str(dtype)[:20]!r}, which illusions does not read")
    ints = (isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in [*(shape or []), *(offsets or [])])
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2 or not all(ints):
        raise bad("has a malformed shape or offsets")
    begin, end = offsets
    if end > end_of_data:
        raise bad(f"ends at byte {_count(end)} of the data, past the file's end ({end_of_data:,}): it is truncated")
    if end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
        raise bad(f"of shape {shape} does not fill its {end - begin} bytes")
    return TensorEntry(dtype, tuple(shape))


def check_tensors(path: Path, found: dict[str, TensorEntry], expected: dict[str, tuple[tuple[int, ...], bool]],
                  *, model: str, optional: tuple[str, ...] = ()) -> None:
    """Refuse a weight file whose tensors are not exactly those ``model`` has.

    Args:
        found: the file's tensors (:func:`read_safetensors_header`).
        expected: ``name -> (shape, floating)`` of every tensor the model stores; a floating one must
            be stored as a float, any other as the model has it.
        model: how the message names the model (``the GPT2LMHeadModel of config.json``).
        optional: tensors the file may leave out (a tied unembedding).

    Raises:
        IllusionsError: one line naming the first missing, unexpected, misshapen or non-float tensor.
    """
    def more(names: list[str]) -> str:
        return f" (and {len(names) - 1} more)" if len(names) > 1 else ""

    missing = [n for n in expected if n not in found and n not in optional]
    if missing:
        raise IllusionsError(f"{path} lacks tensor {missing[0]}{more(missing)} that {model} has; every parameter "
                             "must come from the file")
    unexpected = [n for n in found if n not in expected]
    if unexpected:
        raise IllusionsError(f"{path} holds tensor {unexpected[0]}{more(unexpected)}, which {model} does not have")
    for name, entry in found.items():
        shape, floating = expected[name]
        if entry.shape != tuple(shape):
            raise IllusionsError(f"{path}: tensor {name} has shape {list(entry.shape)}, but {model} needs "
                                 f"{list(shape)}")
        if floating and entry.dtype not in _FLOAT_DTYPES:
            raise IllusionsError(f"{path}: tensor {name} is {_DTYPE_NAMES.get(entry.dtype, entry.dtype)}, not a "
                                 "floating-point type; illusions does not load quantised or integer weights")


def check_finite(path: Path, state: dict[str, torch.Tensor], parameters: Collection[str] | None = None, *,
                 what: str = "a model") -> None:
    """Refuse weights holding NaN or infinite values, naming the first such tensor (of ``parameters``
    only, when given: a fixed buffer such as TransformerLens' ``IGNORE`` is -inf by design). ``what``
    names the weights' owner in the message (``"a dictionary"`` for one saved by SAELens)."""
    import torch

    for name, tensor in state.items():
        if tensor.is_floating_point() and (parameters is None or name in parameters):
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise IllusionsError(f"{path}: tensor {name} holds {bad:,} NaN or infinite value(s) of "
                                     f"{tensor.numel():,}; {what} with non-finite weights gives meaningless results")


def read_weights(path: Path) -> tuple[bytes, str]:
    """A weight file's bytes and their sha256, read once (so the digest is that of what loads)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise IllusionsError(f"{path} cannot be read ({exc.strerror or exc})") from None
    return data, hashlib.sha256(data).hexdigest()


def tensors_of(path: Path, data: bytes, *, dtype: Any = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state = load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise IllusionsError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state


def check_values_fit(path: Path, found: dict[str, TensorEntry], cfg: Any, model: str) -> None:
    """Refuse, before building anything, a file that holds fewer values than the config's model stores
    (a config of 100,000 layers over a small file)."""
    held, least = sum(e.numel for e in found.values()), min_parameters(cfg)
    if held < least:
        raise IllusionsError(f"{path} holds {held:,} values but {model} stores at least {_count(least)}; "
                             "the config does not describe these weights")


# The sha256 of the weight files each loaded model came from (``file name -> hex digest``).
_WEIGHTS_SHA256: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()


def remember_sha256(model: Any, digests: dict[str, str]) -> None:
    """Keep ``{file: sha256}`` of the weight files ``model`` was just loaded from."""
    _WEIGHTS_SHA256[model] = dict(digests)


def weights_sha256(model: Any) -> dict[str, str] | None:
    """``{file: sha256}`` of the weight files ``model`` was loaded from by
    :func:`illusions.models.load_model` or :func:`illusions.model_folders.load_model_folder` (None for a
    model built or trained in this process)."""
    try:
        found = _WEIGHTS_SHA256.get(model)
    except TypeError:
        return None
    return dict(found) if found is not None else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
