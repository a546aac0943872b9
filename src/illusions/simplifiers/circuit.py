"""``circuit``: keep a named set of components, ablate every other head output and MLP output.

A circuit claim says "this behaviour is carried by these heads and MLPs". As a proxy: the model runs
with every component *outside* the circuit ablated, and is then compared with the original on every
split like any other proxy.

**Components.** A head ``L<l>H<h>`` is read at ``blocks.l.attn.hook_z`` (``[batch, pos, head_index,
d_head]``, the head's value-weighted mix before ``W_O``); its output is ``z_h W_O^h``, linear in
``z_h``, so replacing ``z_h`` by a vector ``c`` replaces the head's contribution to the residual
stream by ``c W_O^h`` (``b_O`` is shared by the heads and kept). An MLP ``mlp<l>`` is
``blocks.l.hook_mlp_out`` (``[batch, pos, d_model]``); attention-only models have none.

**Ablations** of a component with activation ``a(x, p)`` at position ``p`` of sequence ``x``:

    mean      a(x, p)  ->  mu = mean of a over the fitting positions (PAD dropped)
    zero      a(x, p)  ->  0
    resample  a(x, p)  ->  a(x', p') for a fitting position (x', p') drawn with the analysis seed:
              R = n_ctx fitting positions are drawn without replacement once, at fit time, and position
              p of every sequence takes draw p (so the result does not depend on batching).
              The whole ``[heads, d_head]`` (or ``d_model``) vector of one draw is used, so ablated
              heads of one layer keep their joint statistics.

Keeping every component is the identity (no activation changes); keeping none is the fully ablated
model.

**Finding a circuit** (``find_circuit = t``, e.g. 0.95): a greedy pruning on the fitting sequences
(the analysis' fitting rows of the fit split, the ones every proxy is fitted on). Starting from
``keep`` (every component when not given), components are tried one at a time in a fixed order:
from the last layer to the first, in each layer its MLP first, then its heads from the highest index
to the lowest (the output end first). A component is removed (ablated) for good when the circuit
without it still agrees with the original model's prediction (argmax over the task's candidates) on
at least a share ``t`` of the fitting sequences' scored positions. One pass, no randomness: the same
model, data and ``t`` give the same circuit. The circuit found is the proxy's ``keep`` parameter;
the search (order, agreement after each try) is in ``proxy.info["circuit_search"]``. The search can
fail to reach ``t``: when the circuit it starts from agrees less and removing any one of its
components does not bring it to ``t``, nothing is removed and the proxy is the starting circuit;
``circuit_search["reached"]`` (final agreement >= ``t``) is then false, and the CLI says so. The fitting
activations are collected once, by the fit: with ``find_circuit`` the fitted proxy ablates every
component (its hooks hold every component's ablation), and the search (``refine``) reads the
ablations back from those hooks instead of running the fitting sequences through the model again.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from illusions.errors import IllusionsError
from illusions.simplifiers.base import (
    FittedHook,
    Proxy,
    SimplifierConfig,
    Targets,
    head_rows,
    register_hook_kind,
    replace_heads,
    require,
)

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from illusions.tasks.base import Split

ABLATIONS = ("mean", "resample", "zero")
ALL = "all"  # keep every component
NONE = "none"  # keep no component
_HEAD = re.compile(r"L(\d+)H(\d+)")
_MLP = re.compile(r"mlp(\d+)")


def components(model: HookedTransformer) -> list[str]:
    """Every component of ``model`` in model order: per layer its heads, then its MLP (if any)."""
    cfg = model.cfg
    out = []
    for layer in range(cfg.n_layers):
        out += [f"L{layer}H{head}" for head in range(cfg.n_heads)]
        if not cfg.attn_only:
            out.append(f"mlp{layer}")
    return out


def search_order(model: HookedTransformer) -> list[str]:
    """The order the greedy search tries components in: last layer first, in a layer its MLP first,
    then its heads from the highest index down."""
    order = []
    for layer in reversed(range(model.cfg.n_layers)):
        if not model.cfg.attn_only:
            order.append(f"mlp{layer}")
        order += [f"L{layer}H{head}" for head in reversed(range(model.cfg.n_heads))]
    return order


def parse_component(name: str) -> tuple[str, int, int | None]:
    """``("head", layer, head)`` for ``L1H0``, ``("mlp", layer, None)`` for ``mlp0``."""
    if m := _HEAD.fullmatch(name):
        return "head", int(m.group(1)), int(m.group(2))
    if m := _MLP.fullmatch(name):
        return "mlp", int(m.group(1)), None
    raise IllusionsError(f"unknown component {name!r}: name heads L<layer>H<head> (L1H0) and MLPs mlp<layer> "
                         f"(mlp0), or give '{ALL}' or '{NONE}'")


@register_hook_kind
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class AblationHook(FittedHook):
    """Replace the ablated components at one hook point (maths in the module docstring).

    ``heads`` (``hook_z``, ``[batch, pos, head_index, d_head]``): the ablated heads, ``value``
    ``[len(heads), d_head]`` and, for resample, ``bank`` ``[n_ctx, len(heads), d_head]``; other heads
    pass through, and no heads means the hook changes nothing. ``heads=None`` (``hook_mlp_out``,
    ``[batch, pos, d_model]``): the whole output, ``value`` ``[d_model]``, ``bank`` ``[n_ctx, d_model]``.
    """

    causal: ClassVar[bool] = True  # position by position (FittedHook.causal)

    hook_name: str
    heads: tuple[int, ...] | None
    ablation: str
    value: Tensor = dataclasses.field(repr=False)
    bank: Tensor | None = dataclasses.field(default=None, repr=False)

    @property
    def width(self) -> int:
        return int(self.value.shape[-1])

    def replacement(self, activation: Tensor) -> Tensor:
        """The ablated values for ``activation``'s positions: ``[pos, ...]`` (resample) or ``[...]``."""
        if self.ablation == "resample":
            assert self.bank is not None
            return self.bank[: activation.shape[1]].to(device=activation.device, dtype=activation.dtype)
        return self.value.to(device=activation.device, dtype=activation.dtype)

    def __call__(self, activation: Tensor, hook: Any = None) -> Tensor:
        if self.heads == ():
            return activation
        new = self.replacement(activation)
        if self.heads is None:
            return new.expand_as(activation).clone()
        rows = head_rows(self.heads, activation.shape[2])
        batch, pos = activation.shape[:2]
        shape = (batch, pos, len(self.heads), activation.shape[-1])
        return replace_heads(activation, rows, new.expand(shape).clone(), axis=2)


@dataclasses.dataclass(frozen=True)
class Circuit(SimplifierConfig):
    """Keep the components in ``keep``, ablate the others (maths in the module docstring).

    Attributes:
        keep: components kept (``L1H0``, ``mlp0``), or ``("all",)`` / ``("none",)``; with
            ``find_circuit``, where the search starts (default: every component).
        ablation: ``mean`` (default), ``resample`` or ``zero``.
        find_circuit: 0 (no search) or the agreement in (0, 1] on the fitting sequences the greedy
            pruning keeps.
        seed: draws the resample bank.
    """

    name: ClassVar[str] = "circuit"
    data_free: ClassVar[bool] = False
    sweep_param: ClassVar[str] = ""
    target_keys: ClassVar[tuple[str, ...]] = ()

    keep: tuple[str, ...] = ()
    ablation: str = "mean"
    find_circuit: float = 0.0
    seed: int = 0
    targets: Targets = Targets()

    def __post_init__(self) -> None:
        super().__post_init__()
        keep = self.keep
        if isinstance(keep, str):
            keep = tuple(k.strip() for k in keep.split(",") if k.strip())
        if not isinstance(keep, tuple | list) or not all(isinstance(k, str) for k in keep):
            raise IllusionsError(f"keep must be a list of component names, got {self.keep!r}")
        keep = tuple(keep)
        object.__setattr__(self, "keep", keep)
        if len(set(keep)) != len(keep):
            raise IllusionsError(f"keep lists a component twice: {', '.join(keep)}")
        if (ALL in keep or NONE in keep) and len(keep) > 1:
            raise IllusionsError(f"keep '{ALL}' or '{NONE}' stands alone, got {', '.join(keep)}")
        for name in keep:
            if name not in (ALL, NONE):
                parse_component(name)
        if self.ablation not in ABLATIONS:
            raise IllusionsError(f"ablation must be one of {', '.join(ABLATIONS)}, got {self.ablation!r}")
        if isinstance(self.find_circuit, bool) or not isinstance(self.find_circuit, int | float) \
                or not 0 <= self.find_circuit <= 1:
            raise IllusionsError(f"find_circuit must be an agreement in (0, 1] (0: no search), got {self.find_circuit!r}")
        if not keep and not self.find_circuit:
            raise IllusionsError("circuit needs the components to keep (keep, --keep: e.g. L1H0,L0H2,mlp0, or "
                                 "all / none) or a circuit search (find_circuit, --find-circuit: e.g. 0.95)")

    def kept(self, model: HookedTransformer) -> list[str]:
        """The kept components checked against ``model``, in model order."""
        every = components(model)
        if not self.keep or self.keep == (ALL,):
            return every
        if self.keep == (NONE,):
            return []
        for name in self.keep:
            kind, layer, head = parse_component(name)
            if name not in every:
                cfg = model.cfg
                what = ("this model is attention-only (no MLPs)" if kind == "mlp" and cfg.attn_only
                        else f"this model has layers 0..{cfg.n_layers - 1} and heads 0..{cfg.n_heads - 1}")
                raise IllusionsError(f"component {name} does not exist; {what}")
        return [c for c in every if c in self.keep]

    def hook_names(self, model: HookedTransformer) -> list[str]:
        self.kept(model)
        if self.ablation == "zero":
            return []
        cfg = model.cfg
        names = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]
        return names + ([f"blocks.{layer}.hook_mlp_out" for layer in range(cfg.n_layers)] if not cfg.attn_only else [])

    def fit(self, model: HookedTransformer, activations: dict[str, Tensor]) -> Proxy:
        """The circuit keeping ``keep``; with ``find_circuit``, the circuit keeping nothing, whose hooks
        hold every component's ablation for :meth:`refine`'s search (which starts from ``keep``)."""
        kept = self.kept(model)
        return self.proxy(model, self.ablations(model, activations), [] if self.find_circuit else kept)

    def ablations(self, model: HookedTransformer, activations: dict[str, Tensor]) -> dict[str, AblationHook]:
        """Every component ablated: ``{hook name: AblationHook}`` over all heads (and every MLP)."""
        cfg = model.cfg
        heads = tuple(range(cfg.n_heads))
        sites = [(f"blocks.{layer}.attn.hook_z", heads, (cfg.n_heads, cfg.d_head)) for layer in range(cfg.n_layers)]
        if not cfg.attn_only:
            sites += [(f"blocks.{layer}.hook_mlp_out", None, (cfg.d_model,)) for layer in range(cfg.n_layers)]
        gen = torch.Generator().manual_seed(self.seed)
        out = {}
        for name, site_heads, shape in sites:
            bank = None
            if self.ablation == "zero":
                value = torch.zeros(shape, device=cfg.device)
            else:
                acts = require(activations, name, self.name)  # [n, heads, d_head] or [n, d_model]
                value = acts.double().mean(0).float()
                if self.ablation == "resample":
                    draws = torch.randperm(acts.shape[0], generator=gen)[: cfg.n_ctx]
                    # Fewer fitting positions than n_ctx: draws repeat, cycling in the drawn order.
                    bank = acts[draws.repeat(-(-cfg.n_ctx // draws.shape[0]))[: cfg.n_ctx].to(acts.device)]
            out[name] = AblationHook(hook_name=name, heads=site_heads, ablation=self.ablation, value=value, bank=bank)
        return out

    def proxy(self, model: HookedTransformer, every: dict[str, AblationHook], kept: list[str],
              info: dict[str, Any] | None = None) -> Proxy:
        """The proxy keeping ``kept``: each layer's ``hook_z`` hook ablating its other heads (none
        when it keeps all, so the proxy still has a hook to start at), each ablated MLP's hook."""
        hooks = []
        for layer in range(model.cfg.n_layers):
            z = every[f"blocks.{layer}.attn.hook_z"]
            ablated = [h for h in range(model.cfg.n_heads) if f"L{layer}H{h}" not in kept]
            bank = None if z.bank is None else z.bank[:, ablated]
            hooks.append(dataclasses.replace(z, heads=tuple(ablated), value=z.value[ablated], bank=bank))
            if not model.cfg.attn_only and f"mlp{layer}" not in kept:
                hooks.append(every[f"blocks.{layer}.hook_mlp_out"])
        params = self.replace(keep=tuple(kept) if kept else (NONE,)).resolved_params(self.targets.resolve(model))
        del params["targets"]
        ablated = [c for c in components(model) if c not in kept]
        return Proxy(simplifier=self.name, sweep_param=self.sweep_param, params=params, hooks=tuple(hooks),
                     info={"kept": list(kept), "ablated": ablated, **(info or {})})

    def refine(self, model: HookedTransformer, proxy: Proxy, split: Split, rows: np.ndarray, *,
               candidates: np.ndarray | None, batch_size: int = 64, max_tokens: int | None = None) -> Proxy:
        """With ``find_circuit``: the circuit the greedy search (module docstring) keeps on the
        fitting ``rows`` of ``split``; otherwise ``proxy`` unchanged."""
        if not self.find_circuit:
            return proxy
        every = ablations_of(model, proxy)
        kept, steps, final = greedy_search(model, self, every, split, rows, candidates=candidates,
                                           batch_size=batch_size, max_tokens=max_tokens)
        # Below the threshold only when nothing was removed (each removal keeps it): the start is short of it.
        search = {"threshold": self.find_circuit, "order": search_order(model), "steps": steps,
                  "agreement": final, "reached": final >= self.find_circuit,
                  "data": f"{len(rows)} fitting sequences of the fit split"}
        return self.proxy(model, every, kept, info={"circuit_search": search})


def ablations_of(model: HookedTransformer, proxy: Proxy) -> dict[str, AblationHook]:
    """Every component's ablation (:meth:`Circuit.ablations`) read back from a fitted proxy that keeps
    no component (what :meth:`Circuit.fit` returns with ``find_circuit``), without new activations."""
    every = {hook.hook_name: hook for hook in proxy.hooks if isinstance(hook, AblationHook)}
    cfg = model.cfg
    want = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]
    want += [] if cfg.attn_only else [f"blocks.{layer}.hook_mlp_out" for layer in range(cfg.n_layers)]
    whole = set(every) == set(want) and all(
        every[f"blocks.{layer}.attn.hook_z"].heads == tuple(range(cfg.n_heads)) for layer in range(cfg.n_layers))
    if not whole:
        raise IllusionsError("the circuit search needs the proxy Circuit.fit returns with find_circuit "
                             "(every component ablated); this one keeps some")
    return every


def greedy_search(model: HookedTransformer, circuit: Circuit, every: dict[str, AblationHook], split: Split,
                  rows: np.ndarray, *, candidates: np.ndarray | None, batch_size: int = 64,
                  max_tokens: int | None = None) -> tuple[list[str], list[dict[str, Any]], float]:
    """``(kept, steps, agreement)``: the greedy pruning of the module docstring. ``steps`` lists
    each component tried, the agreement without it and whether it was removed."""
    from illusions.backends import scored_logits, stop_at, unembed_stop
    from illusions.scoring import iter_batches, restricted_argmax

    device = torch.device(model.cfg.device)
    # The ablations' hooks lie inside the blocks: each pass ends at the final residual and only the
    # scored rows are unembedded; rows run up to their last scored position.
    stop = unembed_stop(model)
    until = stop_at(stop)
    batches = []
    with torch.inference_mode():
        for batch in iter_batches(split, batch_size, rows=rows, max_tokens=max_tokens, scored_only=True):
            tokens = torch.as_tensor(batch.tokens, device=device)
            clean = restricted_argmax(scored_logits(model, model(tokens, **until), batch.scored, stop), candidates)
            batches.append((tokens, batch.scored, clean))
    n = sum(len(sc) for _, sc, _ in batches)
    if n == 0:
        raise IllusionsError("the circuit search found no scored positions in the fitting sequences")

    def agreement(kept: list[str]) -> float:
        proxy = circuit.proxy(model, every, kept)
        same = 0
        with torch.inference_mode():
            for tokens, sc, clean in batches:
                out = model.run_with_hooks(tokens, fwd_hooks=proxy.fwd_hooks, **until)
                same += int((restricted_argmax(scored_logits(model, out, sc, stop), candidates) == clean).sum())
        return same / n

    kept = circuit.kept(model)
    steps = []
    for component in search_order(model):
        if component not in kept:
            continue
        trial = [c for c in kept if c != component]
        agree = agreement(trial)
        removed = agree >= circuit.find_circuit
        steps.append({"component": component, "agreement": agree, "removed": removed})
        if removed:
            kept = trial
    return kept, steps, agreement(kept)
