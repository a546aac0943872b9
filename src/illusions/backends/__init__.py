"""Which TransformerLens runs the models, and the small model protocol the engine is typed against.

TransformerLens 3.9 builds a ``HookedTransformer``; TransformerLens 4 removed it for the
``TransformerBridge`` (:mod:`illusions.backends.tl4`). Both satisfy :class:`LensModel`, which names
exactly what the engine calls: ``cfg`` fields, ``hook_dict``, ``run_with_hooks``, ``run_with_cache``,
``hooks()``, a plain call, and the per-head attention weights of ``blocks[L].attn``. The backend is
chosen by what the installed TransformerLens offers (:func:`uses_bridge`), and the one optional
capability, running from a layer's residual (``start_at_layer``), is probed on the model itself
(:func:`runs_from_layer`), never read from a version string.

Importing this package is cheap: TransformerLens is imported inside the functions.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

# The installs that give each backend (pyproject extras), for messages.
TL3_EXTRA = "illusions[tl3]"
TL4_EXTRA = "illusions[tl4]"


class LensConfig(Protocol):
    """The ``model.cfg`` fields the engine reads (``HookedTransformerConfig`` and
    ``TransformerBridgeConfig`` both have them)."""

    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    d_mlp: int | None
    d_vocab: int
    n_ctx: int
    attn_only: bool
    act_fn: str | None
    normalization_type: str | None
    positional_embedding_type: str
    device: Any


class LensModel(Protocol):
    """What the engine calls on a model: a ``HookedTransformer`` (TransformerLens 3.9) or a
    ``TransformerBridge`` (TransformerLens 4, or 3.9's own bridge) in compatibility hook names.

    ``blocks[L].attn`` carries ``W_Q``/``b_Q``/``W_K``/``b_K`` per head (``[head, d_model, d_head]``),
    which the weight-space simplifier reads. ``start_at_layer`` is optional (see
    :func:`runs_from_layer`); ``stop_at_layer`` is not.
    """

    @property
    def cfg(self) -> LensConfig: ...

    @property
    def hook_dict(self) -> Mapping[str, Any]: ...

    @property
    def blocks(self) -> Sequence[Any]: ...

    def __call__(self, input: Any, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_hooks(self, input: Any, *args: Any, fwd_hooks: Any = ..., **kwargs: Any) -> Any: ...

    def run_with_cache(self, input: Any, *args: Any, names_filter: Callable[[str], bool] | None = ...,
                       **kwargs: Any) -> tuple[Any, Any]: ...

    def hooks(self, fwd_hooks: Any = ..., *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self, recurse: bool = ...) -> Iterator[Any]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...


@functools.cache
def uses_bridge() -> bool:
    """True when the installed TransformerLens has no ``HookedTransformer`` (4.x), so models are
    ``TransformerBridge``s built by :mod:`illusions.backends.tl4`."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return True
    return False


def backend_name() -> str:
    """``tl4`` (TransformerBridge) or ``tl3`` (HookedTransformer), for logs and docs."""
    return "tl4" if uses_bridge() else "tl3"


_FROM_LAYER: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def runs_from_layer(model: LensModel) -> bool:
    """Whether ``model.run_with_hooks(resid, start_at_layer=L)`` works on this model.

    ``HookedTransformer`` and TransformerLens 4's bridge take it; TransformerLens 3.9's bridge raises
    ``NotImplementedError``. Probed once per model on a one-position zero residual through the last
    block (no hook is added, nothing is kept), so a future bridge that gains it is used as soon as it
    does. Callers that get False run the whole forward pass instead, which computes the same prefix.
    """
    try:
        return _FROM_LAYER[model]
    except (KeyError, TypeError):
        pass
    import torch

    probe = torch.zeros(1, 1, model.cfg.d_model, device=model.cfg.device)
    try:
        with torch.inference_mode():
            model.run_with_hooks(probe, start_at_layer=model.cfg.n_layers - 1, fwd_hooks=[])
        ok = True
    except (NotImplementedError, TypeError):
        ok = False
    try:
        _FROM_LAYER[model] = ok
    except TypeError:  # not weak-referenceable: probe again next time
        pass
    return ok


def unembeds_rows(model: LensModel) -> bool:
    """Whether the engine may stop ``model``'s forward pass at the final residual
    (``stop_at_layer=n_layers``) and apply the final norm and unembedding to chosen rows only
    (:func:`unembed_rows`).

    True for a ``HookedTransformer``, whose ``forward`` ends with exactly those two modules (and the
    logit soft cap); False for a ``TransformerBridge``, whose output head is the wrapped Hugging Face
    module, so the engine computes its logits everywhere and gathers them.
    """
    if uses_bridge():
        return False
    from transformer_lens import HookedTransformer

    return isinstance(model, HookedTransformer)


def unembed_rows(model: LensModel, resid: Any) -> Any:
    """``[n, d_vocab_out]`` logits of ``[n, d_model]`` final-residual rows: what
    ``HookedTransformer.forward`` computes at those positions after its last block (final norm,
    unembedding, soft cap), row by row, so a logit is the same whether or not the other positions
    were unembedded too (only when :func:`unembeds_rows`)."""
    from transformer_lens.utilities import apply_softcap

    x = resid[None]  # [1, n, d_model]: the [batch, pos, d_model] shape the modules take
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)  # type: ignore[attr-defined]
    logits = apply_softcap(model.unembed(x), model.cfg.output_logits_soft_cap)  # type: ignore[attr-defined]
    return logits[0]


def scored_logits(model: LensModel, out: Any, scored: Any, stop: int | None) -> Any:
    """``[n, d_vocab_out]`` logits at the scored positions of a forward pass's output ``out``: given
    ``stop`` (``n_layers``, where :func:`unembeds_rows`), ``out`` is the final residual
    (``stop_at_layer=stop``) and only those rows go through the final norm and unembedding; else ``out``
    is the logits, gathered there. A logit is the same either way (tests/test_analyses.py)."""
    from illusions.scoring import gather_scored

    return gather_scored(out, scored) if stop is None else unembed_rows(model, gather_scored(out, scored))


def unembed_stop(model: LensModel) -> int | None:
    """The ``stop_at_layer`` that ends a pass at the final residual for :func:`scored_logits` (None: the
    backend computes its logits everywhere), for passes whose hooks all lie inside the blocks."""
    return model.cfg.n_layers if unembeds_rows(model) else None


def stop_at(stop: int | None) -> dict[str, int]:
    """The keyword arguments of a forward pass that ends before block ``stop`` (none for a whole pass)."""
    return {} if stop is None else {"stop_at_layer": stop}
