"""Collect activations at named hook points, in batches, with padding positions dropped.

The layout of what :func:`collect` returns, one entry per hook name:

    ``blocks.L.attn.hook_q`` / ``hook_k`` (and any other per-head hook ``[batch, pos, head_index, x]``)
        -> ``[n, head_index, d_head]``: every head at once; a simplifier picks its heads by indexing
        the middle axis, so one collection serves any choice of heads.
    ``blocks.L.hook_resid_pre|mid|post`` (and any other ``[batch, pos, x]`` hook)
        -> ``[n, d_model]``.

``n`` runs over the kept (non-PAD) positions in row-major order: all kept positions of sequence 0
in position order, then those of sequence 1, and so on. Attention patterns
(``[batch, head_index, query_pos, key_pos]``) have no single position axis and are refused.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from illusions.errors import IllusionsError

if TYPE_CHECKING:
    import numpy as np
    from jaxtyping import Bool, Int
    from torch import Tensor

    from illusions.backends import LensModel

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Hooks that run before block 0: collecting only these needs the embedding and nothing else.
_BEFORE_BLOCKS = ("hook_embed", "hook_pos_embed", "hook_tokens")
# [batch, head_index, query_pos, key_pos] hooks: no per-position vector to gather.
_PATTERN_HOOKS = ("hook_attn_scores", "hook_pattern")


def hook_layer(name: str) -> int | None:
    """The block index a hook name belongs to (``blocks.3.attn.hook_q`` -> 3), None outside blocks."""
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else None


def check_hook_names(model: LensModel, names: list[str] | tuple[str, ...]) -> None:
    """Raise :class:`IllusionsError` unless every name is a hook point of ``model``.

    The message names the closest valid hooks, so ``blocks.1.attn.hook_query`` points at
    ``blocks.1.attn.hook_q``.
    """
    import difflib

    for name in names:
        if name in model.hook_dict:
            continue
        close = difflib.get_close_matches(name, list(model.hook_dict), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise IllusionsError(
            f"unknown hook {name!r} for this {model.cfg.n_layers}-layer model (layers 0.."
            f"{model.cfg.n_layers - 1}){hint}"
        )


def mask_from_lengths(lengths: Any, width: int) -> Bool[Tensor, "batch pos"]:
    """``mask[b, p] = p < lengths[b]``: the non-PAD positions of right-padded sequences."""
    import torch

    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if lengths.ndim != 1:
        raise IllusionsError(f"lengths must be one number per sequence, got shape {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > width):
        raise IllusionsError(f"lengths must lie in 0..{width} (the padded width), got {int(lengths.min())}.."
                             f"{int(lengths.max())}")
    return torch.arange(width)[None, :] < lengths[:, None]


def as_mask(tokens: Int[Tensor, "batch pos"], lengths_or_mask: Any) -> Bool[Tensor, "batch pos"]:
    """A boolean ``[batch, pos]`` mask from either per-sequence lengths ``[batch]`` or a mask."""
    import torch

    value = torch.as_tensor(lengths_or_mask)
    if value.ndim == 1:
        mask = mask_from_lengths(value, tokens.shape[1])
    elif value.ndim == 2:
        mask = value.bool()
    else:
        raise IllusionsError(f"expected lengths [batch] or a mask [batch, pos], got shape {tuple(value.shape)}")
    if tuple(mask.shape) != tuple(tokens.shape):
        raise IllusionsError(
            f"the mask covers {tuple(mask.shape)} positions but the tokens are {tuple(tokens.shape)}"
        )
    return mask


def stop_layer(model: LensModel, names: list[str] | tuple[str, ...]) -> int | None:
    """One past the deepest block any of ``names`` lives in (None: the whole model must run)."""
    deepest = -1
    for name in names:
        layer = hook_layer(name)
        if layer is None:
            if name.split(".")[0] not in _BEFORE_BLOCKS:
                return None
        else:
            deepest = max(deepest, layer)
    return deepest + 1


def _batches(order: Tensor, widths: Tensor, batch_size: int, max_positions: int | None) -> list[Tensor]:
    """``order`` (rows by ascending width ``widths``) cut into runs of at most ``batch_size`` rows and
    ``max_positions`` padded positions (a row wider than that goes alone)."""
    if max_positions is None:
        return [order[start : start + batch_size] for start in range(0, int(order.shape[0]), batch_size)]
    out: list[Tensor] = []
    start = 0
    n = int(order.shape[0])
    for end in range(1, n + 1):
        # rows start..end-1 are batched; the next one would make the batch too long or too wide
        if end == n or end - start == batch_size or (end + 1 - start) * int(widths[end]) > max_positions:
            out.append(order[start:end])
            start = end
    return out


class _AllCaptured(Exception):
    """Raised by the last capturing hook of a batch: what follows in the forward pass is not needed."""


def collect(
    model: LensModel,
    tokens: Int[Tensor, "batch pos"] | np.ndarray,
    hook_names: list[str] | tuple[str, ...],
    mask: Bool[Tensor, "batch pos"] | Any,
    *,
    batch_size: int = 64,
    max_positions: int | None = None,
) -> dict[str, Tensor]:
    """Activations of ``model`` at ``hook_names`` on ``tokens``, PAD positions dropped.

    Runs under ``torch.no_grad`` in batches of ``batch_size`` sequences taken shortest first, each
    batch trimmed to its longest kept position (right padding, causal attention: trimming never
    changes a kept position) and, given ``max_positions``, cut further to at most that many padded
    positions, and ends each forward pass as soon as every requested hook has fired
    (collecting ``blocks.1.attn.hook_k`` skips that block's attention and MLP). The result is in the
    order of ``tokens`` whatever order the batches ran in.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` (:class:`illusions.backends.LensModel`); its hooks are left exactly as they were.
        tokens: ``[batch, pos]`` token ids (a numpy array is accepted).
        hook_names: hook points, spelled out (``blocks.1.attn.hook_q``); validated against
            ``model.hook_dict``.
        mask: ``[batch, pos]`` true at positions to keep, or ``[batch]`` lengths of right-padded rows.
        batch_size: sequences per forward pass.
        max_positions: padded positions per forward pass at most (None: no limit). Attention scores
            grow with the square of the width: 64 rows of 128 positions make 16 MB tensors that the
            allocator returns to the system after every batch, and taking them again costs page
            faults (a third of a small collection's time on a busy machine). A different batching
            can change the float rounding of the results in the last bits; the fit passes the
            analysis' token budget, which the bundled tasks' batches (64 rows of at most 128
            tokens) never reach, so their recorded numbers keep the plain ``batch_size`` batches.

    Returns:
        ``{hook_name: tensor}`` on the model's device (``model.cfg.device``), so that fitting
        runs there too: ``[n, head_index, d_head]`` for per-head hooks such as
        ``hook_q``/``hook_k``, ``[n, d_model]`` for residual hooks; ``n = mask.sum()`` in row-major
        order.
    """
    import torch

    names = list(dict.fromkeys(hook_names))
    if not names:
        return {}
    _check_collect(model, names, batch_size=batch_size, max_positions=max_positions)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.ndim != 2:
        raise IllusionsError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    mask = as_mask(tokens, mask)
    if not bool(mask.any()):
        raise IllusionsError("the mask keeps no positions, so there is nothing to collect")
    # Shortest rows first (by last kept position), so a batch is padded only to its own longest row.
    width_of = torch.where(mask, torch.arange(1, mask.shape[1] + 1), 0).amax(dim=1)  # [batch]
    order = torch.argsort(width_of, stable=True)
    batches = _batches(order, width_of[order], batch_size, max_positions)
    out = _collect_batches(model, tokens, mask, names, batches, width_of)
    return _in_row_order(out, mask, order, model.cfg.device)


def _check_collect(model: LensModel, names: list[str], *, batch_size: int, max_positions: int | None) -> None:
    """Refuse hook names the model lacks or that have no single position axis, and bad batch sizes."""
    check_hook_names(model, names)
    for name in names:
        if name.rsplit(".", 1)[-1] in _PATTERN_HOOKS:
            raise IllusionsError(f"cannot collect {name!r}: attention patterns have no single position axis")
    if batch_size < 1:
        raise IllusionsError(f"batch_size must be at least 1, got {batch_size}")
    if max_positions is not None and max_positions < 1:
        raise IllusionsError(f"max_positions must be at least 1, got {max_positions}")


def _collect_batches(
    model: LensModel,
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"],
    names: list[str],
    batches: list[Tensor],
    width_of: Int[Tensor, " batch"],
) -> dict[str, Tensor]:
    """The kept activations at ``names``, batch after batch in the order ``batches`` gives the rows, each
    forward pass trimmed to its batch's width and stopped once every hook has fired."""
    import torch

    device = model.cfg.device
    stop = stop_layer(model, names)
    captured: dict[str, Tensor] = {}
    keep = mask

    def capture(name: str) -> Any:
        # Keyed by the name asked for, not ``hook.name``: a TransformerBridge fires an aliased hook
        # (``blocks.1.attn.hook_q``) under its own name (``blocks.1.attn.q.hook_out``).
        def hook_fn(activation: Tensor, hook: Any) -> None:
            # [batch, pos, ...] indexed by a [batch, pos] mask -> [n_batch, ...], row-major
            captured[name] = activation.detach()[keep]  # stays on the model's device
            if len(captured) == len(names):
                raise _AllCaptured

        return hook_fn

    parts: dict[str, list[Tensor]] = {name: [] for name in names}
    with torch.no_grad():
        for rows in batches:
            width = int(width_of[rows].max())
            if width == 0:
                continue
            keep = mask[rows, :width].to(device)
            captured.clear()
            try:
                with model.hooks(fwd_hooks=[(name, capture(name)) for name in names]):
                    model(tokens[rows, :width].to(device), stop_at_layer=stop)
            except _AllCaptured:
                pass
            missing = [name for name in names if name not in captured]
            if missing:
                raise IllusionsError(f"hook(s) {', '.join(missing)} did not run in this model's forward pass")
            for name in names:
                parts[name].append(captured[name])
    return {name: torch.cat(parts[name]) for name in names}


def _in_row_order(
    out: dict[str, Tensor], mask: Bool[Tensor, "batch pos"], order: Int[Tensor, " batch"], device: Any
) -> dict[str, Tensor]:
    """``out``, collected with the rows in ``order``, back in the callers' row-major order."""
    import torch

    if bool((order[1:] < order[:-1]).any()):
        # Back to the callers' row order: row r's kept positions sit at start[rank of r] in `out`.
        counts = mask.sum(dim=1)  # [batch]
        sorted_start = torch.cumsum(counts[order], 0) - counts[order]  # [batch], in run order
        start_of = torch.empty_like(sorted_start)
        start_of[order] = sorted_start
        index = torch.repeat_interleave(start_of - (torch.cumsum(counts, 0) - counts), counts)
        index += torch.arange(int(counts.sum()))  # [n]: position in `out` of each row-major entry
        index = index.to(device)  # worked out on the CPU, where the mask is
        out = {name: value[index] for name, value in out.items()}
    return out
