"""Proxies from Python: built-in simplifiers by name, your own hook functions, SAELens SAEs.

A *proxy* is what :func:`illusions.evaluate` runs in place of the original model. It is one of

* a built-in simplifier, configured here and fitted by ``evaluate`` (:func:`svd`, :func:`kmeans`,
  :func:`onehot`, :func:`sae`, ... or :func:`simplifier` by registry name);
* a list of ``(hook_name, fn)`` pairs: any TransformerLens hook functions (``fn(activation, hook)``
  returning the replacement, or editing it in place and returning None), at any hook point of the
  model, ``hook_embed``, ``hook_pos_embed`` and ``ln_final.*`` included (:class:`HookProxy`);
* a SAELens ``SAE`` object, spliced in at its own hook point (its reconstruction replaces the
  activation);
* a fitted :class:`illusions.simplifiers.Proxy` (e.g. ``Proxy.load(folder)``).

:func:`as_proxies` turns what a user passes into a list of these with labels: a list whose items are
``(name, fn)`` pairs is *one* proxy, a list of proxies is several, a dict names them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from illusions.errors import IllusionsError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

HookPair = tuple[str, Callable[..., Any]]

# Hook leaves of block L after which layer L's own attention pattern is already computed: a change
# there reaches attention only in block L + 1.
_BEFORE_ATTENTION = ("hook_resid_pre", "hook_q_input", "hook_k_input", "attn.hook_q", "attn.hook_k",
                     "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern")
_BEFORE_BLOCKS = ("hook_embed", "hook_pos_embed", "hook_tokens")


def _isolated(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` called on a copy of its activation, so an in-place edit reaches no tensor that anything
    else holds (the clean run's cache, another proxy's input); TransformerLens' convention that a hook
    returning None keeps its (edited) input is kept."""

    def hook(activation: Any, hook: Any) -> Any:
        mine = activation.clone()
        out = fn(mine, hook=hook)
        return mine if out is None else out

    hook.__name__ = getattr(fn, "__name__", "hook")
    hook.__qualname__ = getattr(fn, "__qualname__", hook.__name__)
    return hook


@dataclasses.dataclass(frozen=True)
class HookProxy:
    """A proxy made of your own hook functions: ``[(hook_name, fn), ...]`` run together.

    Each ``fn`` is called as TransformerLens calls a hook, ``fn(activation, hook)``, on a copy of the
    activation (so editing it in place is safe) and returns the replacement (or None to keep its
    edited copy). Hook names are checked against the model's ``hook_dict`` when evaluated, with the
    nearest valid names suggested; a hook that never runs in a forward pass is an error.

    Attributes:
        pairs: the ``(hook_name, fn)`` pairs as given.
        name: the label of this proxy in tables (default ``hooks``).
        n_heads: heads per layer of the model it was checked on (for :attr:`heads`), set by
            :func:`illusions.evaluate`.
        n_layers: layers of that model.
    """

    pairs: tuple[HookPair, ...]
    name: str = "hooks"
    n_heads: int = 0
    n_layers: int = 0
    simplifier: str = dataclasses.field(default="hooks", init=False)
    params: dict[str, Any] = dataclasses.field(default_factory=dict, init=False)
    sweep_param: str = dataclasses.field(default="", init=False)

    def __post_init__(self) -> None:
        pairs = tuple(self.pairs)
        if not pairs:
            raise IllusionsError("a proxy of hooks needs at least one (hook_name, function) pair")
        for pair in pairs:
            if not is_hook_pair(pair):
                raise IllusionsError(f"expected (hook_name, function) pairs, got {_short(pair)}")
        object.__setattr__(self, "pairs", pairs)
        object.__setattr__(self, "params", {"hooks": [name for name, _ in pairs]})

    @property
    def fwd_hooks(self) -> list[HookPair]:
        """``[(hook_name, hook)]`` for ``model.run_with_hooks``; each hook sees a copy of its activation."""
        return [(name, _isolated(fn)) for name, fn in self.pairs]

    @property
    def heads(self) -> list[tuple[int, int]]:
        """Every head of the first layer whose attention pattern reads something the hooks change
        (the layer of a hook before or inside attention, the next layer for one after it, layer 0 for
        the embeddings); none when the hooks act only after the last attention layer."""
        layers = [layer for layer in (_attention_layer(name) for name, _ in self.pairs) if layer is not None]
        layers = [layer for layer in layers if layer < self.n_layers]
        if not layers or not self.n_heads:
            return []
        first = min(layers)
        return [(first, head) for head in range(self.n_heads)]

    def for_model(self, model: HookedTransformer) -> HookProxy:
        """This proxy with the model's shape recorded (for :attr:`heads`)."""
        return dataclasses.replace(self, n_heads=int(model.cfg.n_heads), n_layers=int(model.cfg.n_layers))

    def save(self, directory: Any) -> Any:
        """Write ``proxy.json`` naming the hook points and functions (functions cannot be saved, so
        this proxy cannot be loaded back; the run's metrics and report are complete without it)."""
        from pathlib import Path

        from illusions.io import atomic_write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / "proxy.json", {
            "format": "illusions-hook-proxy/1", "simplifier": self.simplifier, "name": self.name,
            "hooks": [{"hook_name": n, "function": getattr(f, "__qualname__", type(f).__name__)}
                      for n, f in self.pairs]})
        return directory

    def __repr__(self) -> str:
        return f"HookProxy({self.name!r}: {', '.join(n for n, _ in self.pairs)})"


def _attention_layer(name: str) -> int | None:
    from illusions.activations import hook_layer

    layer = hook_layer(name)
    if layer is None:
        return 0 if name.split(".")[0] in _BEFORE_BLOCKS else None
    leaf = name.split(".", 2)[2]
    return layer if leaf in _BEFORE_ATTENTION or leaf.startswith("ln1.") else layer + 1


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def is_hook_pair(item: Any) -> bool:
    """``(hook_name, fn)``: a two-item tuple or list of a string and a callable."""
    return (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)
            and callable(item[1]))


def is_saelens_sae(item: Any) -> bool:
    """A SAELens SAE object (it has a config naming its hook and ``encode``/``decode``)."""
    return hasattr(item, "encode") and hasattr(item, "decode") and sae_hook_name(item) is not None


def sae_hook_name(sae: Any) -> str | None:
    """The hook point a SAELens SAE reads (``cfg.metadata.hook_name``, or ``cfg.hook_name`` in
    older SAELens)."""
    cfg = getattr(sae, "cfg", None)
    for owner in (getattr(cfg, "metadata", None), cfg):
        name = getattr(owner, "hook_name", None)
        if isinstance(name, str) and name:
            return name
    return None


def sae_proxy(sae: Any, name: str | None = None) -> HookProxy:
    """A SAELens SAE spliced in at its own hook point: the activation is replaced by the SAE's
    reconstruction (per-head ``hook_z`` activations are flattened to ``n_heads * d_head`` and back)."""
    import torch

    hook_name = sae_hook_name(sae)

    def splice(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        flat = activation.flatten(-2) if activation.ndim == 4 else activation
        out = sae(flat.to(sae.dtype if hasattr(sae, "dtype") else flat.dtype)).to(activation.dtype)
        return out.reshape(activation.shape)

    splice.__qualname__ = f"sae_reconstruction[{hook_name}]"
    return HookProxy(((hook_name, splice),), name=name or f"sae({hook_name})")  # type: ignore[arg-type]


def as_proxies(proxy: Any) -> tuple[list[Any], list[str | None]]:
    """The proxies a user passed, and the label given to each (None: the engine names it).

    A dict maps labels to proxies; a list whose items are ``(hook_name, fn)`` pairs is one proxy; any
    other list is several proxies (a nested list of simplifiers, e.g. a sweep, is flattened).
    """
    if isinstance(proxy, Mapping):
        items: list[Any] = []
        names: list[str | None] = []
        for label, value in proxy.items():
            found, _ = as_proxies(value)
            if len(found) != 1:
                raise IllusionsError(f"proxy {label!r} names {len(found)} proxies; give one proxy per name")
            items += found
            names.append(str(label))
        return items, names
    if _is_one(proxy):
        return [_one(proxy)], [None]
    if isinstance(proxy, list | tuple):
        if not proxy:
            raise IllusionsError("no proxy given (an empty list)")
        items = []
        for item in proxy:
            if _is_one(item):
                items.append(_one(item))
            elif isinstance(item, list | tuple) and item and not any(is_hook_pair(p) for p in item):
                items += as_proxies(item)[0]  # a sweep: several simplifiers
            else:
                raise IllusionsError(f"not a proxy: {_short(item)}; expected a simplifier (il.svd(...)), a list of "
                                     "(hook_name, function) pairs, a SAELens SAE or a fitted Proxy")
        return items, [None] * len(items)
    raise IllusionsError(f"not a proxy: {_short(proxy)}; expected a simplifier (il.svd(...)), a list of "
                         "(hook_name, function) pairs, a SAELens SAE or a fitted Proxy")


def _is_one(item: Any) -> bool:
    from illusions.analyses.faithfulness import is_fitted

    if isinstance(item, list | tuple):
        return bool(item) and all(is_hook_pair(p) for p in item)
    return is_fitted(item) or is_saelens_sae(item) or _is_simplifier(item)


def _is_simplifier(item: Any) -> bool:
    return hasattr(item, "fit") and hasattr(item, "hook_names") and hasattr(item, "data_free")


def _one(item: Any) -> Any:
    if isinstance(item, list | tuple):
        return HookProxy(tuple(tuple(p) for p in item))  # type: ignore[arg-type]
    if is_saelens_sae(item):
        return sae_proxy(item)
    return item


# --- built-in simplifiers --------------------------------------------------------------------------

def simplifier(name: str, **params: Any) -> Any:
    """A built-in simplifier by registry name, fitted by :func:`illusions.evaluate`.

    Args:
        name: a name of ``illusions list`` (``svd``, ``kmeans``, ``onehot``, ``resid-svd``,
            ``resid-kmeans``, ``weight-svd``, ``sae``, ``transcoder``).
        **params: its parameters and targets: ``layers`` (default: the last layer; ``-1`` counts from
            the end), ``heads``
            (default: every head), ``qk`` (``q``, ``k`` or ``qk``), ``resid`` (``resid_pre``,
            ``resid_mid``, ``resid_post``) where the method reads them. A list or tuple as the value
            of the method's swept parameter (``rank=[1, 2, 4]``) gives one simplifier per value.

    Returns:
        The configured simplifier, or a list of them for a sweep.

    Raises:
        IllusionsError: an unknown name or parameter, or a value out of range.
    """
    from illusions.registry import get_simplifier, make_simplifier

    cls = get_simplifier(name)
    for key in ("layers", "heads"):
        if isinstance(params.get(key), list):
            params[key] = tuple(params[key])
    swept = getattr(cls, "sweep_param", "")
    values = params.get(swept) if swept else None
    if isinstance(values, list | tuple | range):
        return [make_simplifier(name, **{**params, swept: v}) for v in values]
    return make_simplifier(name, **params)


def svd(rank: int | Sequence[int] = 4, **params: Any) -> Any:
    """Queries and/or keys of each targeted head projected onto their top-``rank`` principal
    directions, fitted on the fitting data.

    Args:
        rank: kept directions (a list: one proxy per rank).
        **params: ``layers``, ``heads``, ``qk``, ``centered``, ``basis`` (see :func:`simplifier`).
    """
    return simplifier("svd", rank=rank, **params)


def kmeans(k: int | Sequence[int] = 16, **params: Any) -> Any:
    """Queries and/or keys of each targeted head replaced by the nearest of ``k`` centroids.

    Args:
        k: clusters (a list: one proxy per value).
        **params: ``layers``, ``heads``, ``qk`` (see :func:`simplifier`).
    """
    return simplifier("kmeans", k=k, **params)


def onehot(**params: Any) -> Any:
    """Hard attention: each targeted head attends only to its highest-scoring key (data-free).

    Args:
        **params: ``layers``, ``heads`` (see :func:`simplifier`).
    """
    return simplifier("onehot", **params)


def resid_svd(rank: int | Sequence[int] = 4, **params: Any) -> Any:
    """The residual stream projected onto its top-``rank`` principal directions.

    Args:
        rank: kept directions (a list: one proxy per rank).
        **params: ``layers``, ``resid`` (see :func:`simplifier`).
    """
    return simplifier("resid-svd", rank=rank, **params)


def resid_kmeans(k: int | Sequence[int] = 16, **params: Any) -> Any:
    """The residual stream replaced by the nearest of ``k`` centroids.

    Args:
        k: clusters (a list: one proxy per value).
        **params: ``layers``, ``resid`` (see :func:`simplifier`).
    """
    return simplifier("resid-kmeans", k=k, **params)


def weight_svd(rank: int | Sequence[int] = 4, **params: Any) -> Any:
    """Each head's query-key bilinear form truncated to rank ``rank`` (data-free).

    Args:
        rank: kept rank (a list: one proxy per rank).
        **params: ``layers``, ``heads`` (see :func:`simplifier`).
    """
    return simplifier("weight-svd", rank=rank, **params)


def sae(width: int | Sequence[int] = 256, **params: Any) -> Any:
    """A sparse autoencoder of ``width`` latents trained (SAELens) on the fitting data and spliced in.

    To splice in an SAE you already have, pass the SAELens ``SAE`` object itself as the proxy.

    Args:
        width: latents (a list: one proxy per width).
        **params: ``layers``, ``resid``, ``site`` (``resid`` or ``z``), ``architecture``,
            ``top_k``, ``l1``, ``sae_steps`` and the other fields of :class:`illusions.simplifiers.sae.SAE`.
    """
    return simplifier("sae", width=width, **params)


def transcoder(width: int | Sequence[int] = 256, **params: Any) -> Any:
    """An MLP replaced by a sparse transcoder of ``width`` latents trained on the fitting data.

    Args:
        width: latents (a list: one proxy per width).
        **params: ``layers`` and the fields of :class:`illusions.simplifiers.sae.Transcoder`.
    """
    return simplifier("transcoder", width=width, **params)
