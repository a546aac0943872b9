"""What every simplifier shares: targets, the fitted-hook base class, the proxy and its file format.

A *simplifier* is a frozen configuration (``SVD(rank=4)``); ``fit`` turns it and a dict of collected
activations into a :class:`Proxy`, a bundle of :class:`FittedHook` objects, each a frozen callable
``(activation, hook) -> activation`` that TransformerLens runs at one hook point:

    proxy = fit_proxy(model, SVD(rank=4), tokens, lengths)
    logits = model.run_with_hooks(tokens, fwd_hooks=proxy.fwd_hooks)

A proxy is saved as a directory with two fixed files, ``proxy.json`` (simplifier name, parameters,
hook descriptions) and ``proxy.safetensors`` (the fitted tensors); nothing is pickled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, runtime_checkable

from illusions.activations import hook_layer
from illusions.config import Config, read_json
from illusions.errors import IllusionsError, InvalidOption
from illusions.io import MANIFEST_FILE, OutputKind, atomic_write_json, changed_files, staged_dir

if TYPE_CHECKING:
    from torch import Tensor

    from illusions.backends import LensModel

PROXY_CONFIG_FILE = "proxy.json"
PROXY_WEIGHTS_FILE = "proxy.safetensors"
PROXY_FORMAT = "illusions-proxy/1"
PROXY_DIR = OutputKind("proxy", "a fitted proxy", legacy_required=(PROXY_CONFIG_FILE, PROXY_WEIGHTS_FILE),
                       legacy_files=(PROXY_CONFIG_FILE, PROXY_WEIGHTS_FILE),
                       legacy_marker=(PROXY_CONFIG_FILE, "format", PROXY_FORMAT))

QK_CHOICES = ("q", "k", "qk")
RESID_CHOICES = ("resid_pre", "resid_mid", "resid_post")


def _int_tuple(value: Any, what: str, *, negative: bool = False) -> tuple[int, ...] | str:
    """Normalise a layers/heads value: "all", an int, or a sequence of non-negative ints (with
    ``negative``, layers counted from the end as well: -1 is the last)."""
    if isinstance(value, str):
        if value == "all":
            return value
        raise IllusionsError(f"{what} must be a list of integers or 'all', got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise IllusionsError(f"{what} must be a list of integers or 'all', got {value!r}") from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or (item < 0 and not negative):
            kind = "integers (negative: counted from the end)" if negative else "non-negative integers"
            raise IllusionsError(f"{what} must be {kind} or 'all', got {value!r}")
    if len(set(items)) != len(items):
        raise IllusionsError(f"{what} lists a value twice: {list(items)}")
    return tuple(sorted(items))


def resolve_layers(layers: Sequence[int], n_layers: int) -> tuple[int, ...]:
    """``layers`` as indices ``0..n_layers-1``: a negative one counts from the end (``-1`` is the
    last layer, ``-n_layers`` the first), as Python indexes a list. Sorted; the one place a layer
    given from the end becomes an index (:meth:`Targets.resolve_shape`, the analysis spec).

    Raises:
        IllusionsError: a layer outside ``-n_layers..n_layers-1``, naming the valid range, or two
            spellings of one layer (``-1`` and ``n_layers - 1``).
    """
    out = []
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise IllusionsError(f"layer {layer} does not exist; this model has {n_layers} layer"
                                 f"{'s' if n_layers != 1 else ''}: 0..{n_layers - 1}, or -{n_layers}..-1 "
                                 "counting from the end")
        out.append(layer + n_layers if layer < 0 else layer)
    if len(set(out)) != len(out):
        raise IllusionsError(f"layers {list(layers)} name one layer twice (on this model of {n_layers} layers "
                             f"they are {out})")
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class ResolvedTargets:
    """Targets checked against one model: explicit layers, heads and q/k sides."""

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    qk: tuple[str, ...]  # ("q",), ("k",) or ("q", "k")
    resid: str


@dataclasses.dataclass(frozen=True)
class Targets(Config):
    """Where a simplifier acts.

    Attributes:
        layers: block indices (negative ones count from the end: ``-1`` is the last layer);
            ``()`` means the last layer, ``"all"`` every layer.
        heads: head indices within each targeted layer; ``()`` or ``"all"`` means every head.
        qk: for query/key methods, which side is simplified: ``"q"``, ``"k"`` or ``"qk"`` (both).
        resid: for residual methods, the hook: ``resid_pre``, ``resid_mid`` or ``resid_post``.
    """

    layers: tuple[int, ...] | str = ()
    heads: tuple[int, ...] | str = ()
    qk: str = "qk"
    resid: str = "resid_pre"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _int_tuple(self.layers, "layers", negative=True))
        object.__setattr__(self, "heads", _int_tuple(self.heads, "heads"))
        if self.qk not in QK_CHOICES:
            raise IllusionsError(f"qk must be one of {', '.join(QK_CHOICES)}, got {self.qk!r}")
        if self.resid not in RESID_CHOICES:
            raise IllusionsError(f"resid must be one of {', '.join(RESID_CHOICES)}, got {self.resid!r}")

    def resolve(self, model: LensModel) -> ResolvedTargets:
        """Explicit layers and heads for ``model``; out-of-range values raise with the valid range."""
        return self.resolve_shape(model.cfg.n_layers, model.cfg.n_heads)

    def resolve_shape(self, n_layers: int, n_heads: int) -> ResolvedTargets:
        """:meth:`resolve` for a model of ``n_layers`` blocks of ``n_heads`` heads: the one place
        where "no layers" means the last layer and "no heads" every head."""
        if self.layers == "all":
            layers = tuple(range(n_layers))
        elif self.layers == ():
            layers = (n_layers - 1,)
        else:
            layers = resolve_layers(self.layers, n_layers)
        heads = tuple(range(n_heads)) if self.heads in ("all", ()) else self.heads
        for head in heads:
            if head >= n_heads:
                raise IllusionsError(f"head {head} does not exist; this model has heads 0..{n_heads - 1}")
        qk = ("q", "k") if self.qk == "qk" else (self.qk,)
        return ResolvedTargets(layers=layers, heads=heads, qk=qk, resid=self.resid)


class SimplifierConfig(Config):
    """Base of the simplifier dataclasses: a nested :class:`Targets` given as a dict is accepted."""

    name: ClassVar[str]
    data_free: ClassVar[bool]
    # The parameter a sweep varies ("rank", "k"; "" for none) and the Targets keys the method reads;
    # the analysis spec, labels and summaries read these instead of guessing from field names.
    sweep_param: ClassVar[str] = ""
    target_keys: ClassVar[tuple[str, ...]] = ("layers", "heads")
    # The model dimension that bounds the swept parameter ("d_head" for a rank of queries and keys,
    # "d_model" for a rank of the residual stream; "" when nothing does), so a sweep written for one
    # model can be cut to what a narrower model allows (illusions.reproduction.plan).
    sweep_limit: ClassVar[str] = ""

    def __post_init__(self) -> None:
        targets = getattr(self, "targets", None)
        if isinstance(targets, Mapping):
            targets = Targets.from_dict(dict(targets))
            object.__setattr__(self, "targets", targets)
        elif not isinstance(targets, Targets):
            raise IllusionsError(f"{self.name} targets must be a Targets or a table of them, got {targets!r}")
        default = Targets()
        unread = [key for key in ("layers", "heads", "qk", "resid")
                  if key not in self.target_keys and getattr(targets, key) != getattr(default, key)]
        if unread:
            raise IllusionsError(f"{self.name} does not take {', '.join(unread)} ({targets_read(self.target_keys)})")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> Self:
        data = dict(data)
        if isinstance(data.get("targets"), Mapping):
            data["targets"] = Targets.from_dict(dict(data["targets"]), source=source)
        return super().from_dict(data, source=source)

    def resolved_params(self, targets: ResolvedTargets) -> dict[str, Any]:
        """JSON parameters with the targets written out for the model they were resolved on."""
        params = self.to_dict()
        params["targets"] = {
            "layers": list(targets.layers),
            "heads": list(targets.heads),
            "qk": "".join(targets.qk),
            "resid": targets.resid,
        }
        return params


def targets_read(keys: tuple[str, ...]) -> str:
    """What a message says a simplifier targets, from its ``target_keys``: ``it targets layers, heads``,
    or for a method that reads none (circuit names whole components instead) a sentence that is not empty."""
    return f"it targets {', '.join(keys)}" if keys else "it targets no layers, heads, queries/keys or residual hook"


def check_positive(value: int, what: str, upper: int | None = None, upper_is: str = "", hint: str = "") -> None:
    """Raise unless ``1 <= value`` (and ``value <= upper`` when given), stating the valid range
    (and what the upper end is, ``upper_is``), then ``hint`` when it is out of range.

    The error is an :class:`InvalidOption` naming ``what``, the parameter, so that the analysis spec
    and the CLI can name the option or flag the user set.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOption(what, f"must be an integer, got {value!r}")
    if value < 1 or (upper is not None and value > upper):
        valid = f"be in 1..{upper}{f' ({upper_is})' if upper_is else ''}" if upper is not None else "be at least 1"
        raise InvalidOption(what, f"must {valid}, got {value}{hint}")


def qk_hook_name(layer: int, side: str) -> str:
    """The hook of one layer's queries (``side="q"``) or keys (``"k"``): ``blocks.L.attn.hook_<side>``."""
    return f"blocks.{layer}.attn.hook_{side}"


def require(activations: dict[str, Tensor], name: str, simplifier: str) -> Tensor:
    """The collected activations at ``name``, or a clear error saying they are missing."""
    if name not in activations:
        have = ", ".join(sorted(activations)) or "none"
        raise IllusionsError(
            f"{simplifier} needs activations at {name} (collect simplifier.hook_names(model)); got {have}"
        )
    return activations[name]


@runtime_checkable
class Simplifier(Protocol):
    """A frozen configuration that fits a :class:`Proxy` from collected activations."""

    name: ClassVar[str]
    data_free: ClassVar[bool]
    sweep_param: ClassVar[str]
    target_keys: ClassVar[tuple[str, ...]]

    def hook_names(self, model: LensModel) -> list[str]:
        """Validated hook points whose activations :meth:`fit` needs (``[]`` when data-free)."""
        ...

    def fit(self, model: LensModel, activations: dict[str, Tensor]) -> Proxy:
        """The fitted proxy; ``activations = collect(model, tokens, self.hook_names(model), mask)``."""
        ...


class FittedHook:
    """Base of fitted hooks: frozen dataclasses called as ``hook(activation, hook=hook_point)``.

    Subclasses are frozen dataclasses with a ``hook_name`` field; tensor fields are declared with
    ``repr=False`` because TransformerLens names a hook by its repr, which must stay short and cheap.
    Fields that are tensors go to safetensors when saved, the others to JSON.
    """

    hook_name: str
    # Whether what the hook returns at a position reads the activations at that position and earlier
    # ones only, so that the evaluation may run a row up to its last scored position and no further
    # (:func:`causal`). Every fitted hook of the package sets it; a subclass that mixes in later
    # positions (a mean over the sequence) keeps False and gets whole rows.
    causal: ClassVar[bool] = False

    def __call__(self, activation: Tensor, hook: Any = None) -> Tensor:
        raise NotImplementedError

    @property
    def width(self) -> int | None:
        """Width of the vectors this hook replaces (None when it does not replace vectors)."""
        return None

    @property
    def layer(self) -> int:
        layer = hook_layer(self.hook_name)
        if layer is None:
            raise ValueError(f"{self.hook_name} is not inside a block")
        return layer

    def signal_sites(self) -> list[tuple[str, Callable[[Tensor], dict[str, Tensor]]]]:
        """The hook's unsupervised warning signals: ``[(hook point, fn)]``, where ``fn`` maps the
        activation arriving at that point (before any replacement) to ``{signal name: [batch, pos]}``
        values, higher meaning "further from what the proxy was fitted on". They need the model's
        activations only, no labels and no comparison with the original model
        (:mod:`illusions.analyses.warnings` runs them during the evaluation pass). ``[]`` (the
        default): the hook declares none."""
        return []

    def tensors(self) -> dict[str, Tensor]:
        import torch

        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def json_fields(self) -> dict[str, Any]:
        import torch

        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to(self, device: Any) -> Self:
        """A copy whose tensors live on ``device``."""
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})  # type: ignore[type-var]

    def __repr__(self) -> str:
        bits = [repr(self.hook_name)]
        for key, value in self.json_fields().items():
            if key != "hook_name":
                bits.append(f"{key}={value}")
        for key, value in self.tensors().items():
            bits.append(f"{key}{list(value.shape)}")
        return f"{type(self).__name__}({', '.join(bits)})"


def signal_site(hook_name: str) -> str:
    """What a hook point is called in a warning signal's name: ``q``, ``k``, ``z``, ``resid``, ``mlp``."""
    leaf = hook_name.rsplit(".", 1)[-1].removeprefix("hook_")
    return "resid" if leaf.startswith("resid") else "mlp" if leaf.startswith("mlp") else leaf


def off_share(x: Tensor, kept: Tensor) -> Tensor:
    """``|x - kept| / |x|`` along the last axis (0 where ``x`` is 0): the share of ``x``'s norm a
    replacement ``kept`` does not keep; 0 for the identity, 1 when nothing of ``x`` is kept."""
    norm = x.norm(dim=-1)
    return (x - kept).norm(dim=-1) / norm.clamp_min(1e-30) * (norm > 0)


def head_rows(heads: tuple[int, ...] | None, n_heads: int) -> slice | list[int]:
    """An index for the ``head_index`` axis: a full slice when every head is targeted."""
    if heads is None or tuple(heads) == tuple(range(n_heads)):
        return slice(None)
    return list(heads)


def replace_heads(activation: Tensor, heads: slice | list[int], new: Tensor, axis: int) -> Tensor:
    """``activation`` with the heads at ``heads`` along ``axis`` replaced by ``new`` (out of place)."""
    if isinstance(heads, slice):
        return new
    out = activation.clone()
    index = [slice(None)] * activation.ndim
    index[axis] = heads
    out[tuple(index)] = new
    return out


# Filled by the modules that define hooks, so that Proxy.load can rebuild them by class name.
HOOK_KINDS: dict[str, type] = {}


def register_hook_kind(cls: type) -> type:
    """Class decorator: make a fitted-hook class loadable by :meth:`Proxy.load`."""
    HOOK_KINDS[cls.__name__] = cls
    return cls


def causal(proxy: Any) -> bool:
    """Whether every forward hook of ``proxy`` declares itself causal (a ``causal = True`` attribute, as
    :attr:`FittedHook.causal`): its output at a position reads that position and earlier ones only. Then
    the evaluation runs each row up to its last scored position; hook functions of your own are not
    assumed to be causal (one that flips or averages over positions would see a shorter row), so a
    proxy with any of them runs whole rows, unless the callable carries ``causal = True``."""
    return all(getattr(getattr(fn, "__self__", fn), "causal", False) is True for _, fn in proxy.fwd_hooks)


@dataclasses.dataclass(frozen=True)
class Proxy:
    """A fitted simplifier: hooks to run the simplified model with, and how they were made.

    Attributes:
        simplifier: registry name (``svd``, ``kmeans``, ...).
        params: JSON parameters of the simplifier, targets resolved for the fitted model.
        hooks: the fitted hooks, each with its ``hook_name``.
        attention_heads: ``(layer, head)`` pairs whose attention the proxy changes directly (see
            :attr:`heads`).
        info: JSON diagnostics of the fit (number of fitted vectors, explained variance, inertia).
        sweep_param: the parameter its simplifier sweeps (the class's ``sweep_param``: ``rank``,
            ``k``, ``width``; ``""`` for none), set by ``fit``; its value is :attr:`sweep_value`.
            Labels and summaries read it here. It is not written to ``proxy.json`` (whose format
            stays as it was), so a loaded proxy has ``""``.
    """

    simplifier: str
    params: dict[str, Any]
    hooks: tuple[Any, ...]
    attention_heads: tuple[tuple[int, int], ...] = ()
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    sweep_param: str = ""

    @property
    def sweep_value(self) -> Any:
        """The value of :attr:`sweep_param` this proxy was fitted with (``""`` when it sweeps nothing)."""
        return self.params.get(self.sweep_param, "") if self.sweep_param else ""

    @property
    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        """``[(hook_name, hook)]`` for ``model.run_with_hooks(..., fwd_hooks=...)``/``model.hooks``.

        A hook that acts at more than one point (a transcoder reads the MLP's input and replaces its
        output) lists its pairs in ``hook_pairs()``."""
        return [pair for h in self.hooks
                for pair in (h.hook_pairs() if hasattr(h, "hook_pairs") else [(h.hook_name, h)])]

    @property
    def heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` pairs whose attention the proxy changes directly.

        Query/key methods, one-hot and weight-svd: the targeted heads. Residual methods: every head
        of the first attention layer that reads the simplified stream, i.e. layer L for
        ``resid_pre`` of layer L, and layer L+1 for ``resid_mid``/``resid_post`` of layer L (none
        when L is the last layer); likewise layer L+1 for an SAE on layer L's attention output and
        a transcoder of layer L's MLP. Later layers change too, through their inputs.
        """
        return [tuple(p) for p in self.attention_heads]  # type: ignore[misc]

    def to(self, device: Any) -> Proxy:
        """A copy whose hook tensors live on ``device``."""
        return dataclasses.replace(self, hooks=tuple(h.to(device) for h in self.hooks))

    def check(self, model: LensModel) -> None:
        """Raise :class:`IllusionsError` unless ``model`` has every hook point, head and width the
        proxy was fitted for (e.g. before running a loaded proxy on a model)."""
        from illusions.activations import check_hook_names

        check_hook_names(model, [h.hook_name for h in self.hooks])
        cfg = model.cfg
        for hook in self.hooks:
            heads = getattr(hook, "heads", None)
            if heads and max(heads) >= cfg.n_heads:
                raise IllusionsError(f"this proxy acts on head {max(heads)} at {hook.hook_name}, but the model "
                                     f"has heads 0..{cfg.n_heads - 1}")
            leaf = hook.hook_name.rsplit(".", 1)[-1]
            expected = cfg.d_model if leaf.startswith("hook_resid") else cfg.d_head if leaf in ("hook_q", "hook_k") else None
            if expected is not None and hook.width is not None and hook.width != expected:
                raise IllusionsError(f"this proxy was fitted on {hook.width}-wide vectors at {hook.hook_name}, "
                                     f"but the model's are {expected}-wide")

    def save(self, directory: Path) -> Path:
        """Write ``proxy.json`` + ``proxy.safetensors`` into ``directory`` atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        tensors = {}
        described = []
        for i, hook in enumerate(self.hooks):
            for key, value in hook.tensors().items():
                tensors[f"{i}.{key}"] = value.detach().cpu().contiguous()
            described.append({"kind": type(hook).__name__, **hook.json_fields()})
        data = {
            "format": PROXY_FORMAT,
            "simplifier": self.simplifier,
            "params": self.params,
            "attention_heads": [list(p) for p in self.attention_heads],
            "info": self.info,
            "hooks": described,
        }
        if self.sweep_param:  # what it sweeps travels with it (absent for methods that sweep nothing)
            data["sweep_param"] = self.sweep_param
        with staged_dir(directory, kind=PROXY_DIR) as stage:
            save_file(tensors, str(stage / PROXY_WEIGHTS_FILE), metadata={"format": PROXY_FORMAT})
            atomic_write_json(stage / PROXY_CONFIG_FILE, data)
        return directory

    @classmethod
    def load(cls, directory: Path) -> Proxy:
        """Read a proxy written by :meth:`save`; a missing or foreign file raises one clear error."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        # Every hook class is registered by the time this runs: importing this module imports the
        # package, whose __init__ imports each method module.
        directory = Path(directory)
        path = directory / PROXY_CONFIG_FILE
        bad = changed_files(directory, (PROXY_CONFIG_FILE, PROXY_WEIGHTS_FILE))
        if bad:
            raise IllusionsError(f"{directory / bad[0]} does not match the sha256 recorded in "
                                 f"{directory / MANIFEST_FILE}: the file is damaged or was changed")
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != PROXY_FORMAT or not {"simplifier", "params"} <= set(data):
            raise IllusionsError(f"{path} is not an illusions proxy (expected format {PROXY_FORMAT!r})")
        weights = directory / PROXY_WEIGHTS_FILE
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise IllusionsError(f"{weights} is not a readable safetensors file ({exc})") from None
        hooks = []
        for i, entry in enumerate(data.get("hooks", [])):
            entry = dict(entry)
            kind = HOOK_KINDS.get(entry.pop("kind", None))
            if kind is None:
                raise IllusionsError(f"{path} names an unknown hook kind; known: {', '.join(sorted(HOOK_KINDS))}")
            kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
            prefix = f"{i}."
            kwargs.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            try:
                hooks.append(kind(**kwargs))
            except TypeError as exc:
                raise IllusionsError(f"{path} does not match {weights}: {exc}") from None
        return cls(
            simplifier=data["simplifier"],
            params=data["params"],
            hooks=tuple(hooks),
            attention_heads=tuple(tuple(p) for p in data.get("attention_heads", [])),
            info=data.get("info", {}),
            sweep_param=str(data.get("sweep_param", "")),
        )


def fit_proxy(
    model: LensModel,
    simplifier: Simplifier,
    tokens: Any,
    lengths_or_mask: Any,
    *,
    batch_size: int = 64,
) -> Proxy:
    """Collect the activations ``simplifier`` needs on ``tokens`` and fit it: one call.

    Args:
        model: the model to simplify.
        simplifier: a configured simplifier, e.g. ``SVD(rank=4)``.
        tokens: ``[batch, pos]`` right-padded token ids (torch or numpy).
        lengths_or_mask: ``[batch]`` true lengths, or a ``[batch, pos]`` mask of positions to fit on.
        batch_size: sequences per forward pass while collecting.

    Returns:
        The fitted :class:`Proxy`.
    """
    from illusions.activations import collect

    names = simplifier.hook_names(model)
    activations = collect(model, tokens, names, lengths_or_mask, batch_size=batch_size) if names else {}
    return simplifier.fit(model, activations)
