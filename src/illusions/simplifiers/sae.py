"""``sae`` and ``transcoder``: sparse dictionaries trained with SAELens, spliced in with no error term.

**SAE.** At one hook point, with activations ``x`` in R^d (a residual-stream vector, ``d = d_model``,
or the attention outputs ``hook_z`` of the targeted heads flattened, ``d = len(heads) * d_head``):

    f(x) = sigma((x - b_dec) W_enc + b_enc)         (codes, [d_sae] = width latents)
    x  ->  x_hat = f(x) W_dec + b_dec

with ``sigma`` the architecture's activation: ReLU (``standard``), ReLU of the ``top_k`` largest
pre-activations and 0 elsewhere (``topk``), or ``h * [h > theta]`` with a learned threshold per latent
(``jumprelu``). The proxy replaces ``x`` by ``x_hat`` with **no error term**, so everything downstream
reads the dictionary's reconstruction.

**Transcoder.** For the MLP of layer L, the same encoder reads the MLP's input ``u``
(``blocks.L.ln2.hook_normalized``; ``blocks.L.hook_resid_mid`` in a model without normalization) and
the decoder predicts the MLP's output, which it replaces:

    blocks.L.hook_mlp_out  ->  f(u) W_dec + b_dec,   f(u) = sigma(u W_enc + b_enc)

SAELens 6 ships transcoders for inference only (``Transcoder``, ``SkipTranscoder``,
``JumpReLUTranscoder``, loaded from disk); its trainer always reconstructs its own input. So the
transcoder here is SAELens' training SAE of the chosen architecture with the MLP output as target:
each training batch holds ``[u, y]`` side by side, the encoder reads ``u``, and the MSE (and TopK's
auxiliary loss) compares the decoder's output with ``y``, still inside SAELens' ``SAETrainer``.

**Training** (both): SAELens' ``SAETrainer`` and SAELens' losses (standard: MSE + ``l1`` times the L1
norm of the decoder-norm-weighted codes; topk: MSE + the auxiliary loss that makes dead latents
predict the residual; jumprelu: MSE + ``l1`` times the straight-through L0), Adam, gradient norm
clipped at 1. Data: an iterator over the collected training activations, a fresh permutation per
epoch from a generator seeded by ``seed``, ``sae_batch`` vectors per step for ``sae_steps`` steps;
learning rate ``sae_lr``, constant, then decayed linearly to 0 over the last fifth of the steps. The
weights are initialised by SAELens from ``seed`` (inside a forked RNG, so the caller's global RNG is
left as it was). While training, inputs are scaled to a mean norm of sqrt(d), the scale SAELens'
hyperparameters assume (a transcoder's input and output each by its own factor); afterwards the
scales, and TopK's decoder norms, are folded into the weights, so the saved tensors act on raw
activations. Fits too large to hold train the same way on a seeded uniform sample of at most 256 MiB
of the fitting positions (:class:`DictionaryStream`).

``sae_from`` loads a dictionary trained elsewhere and saved by SAELens (``cfg.json`` +
``sae_weights.safetensors``, read with ``SAE.load_from_disk``) instead of training one. SAEs:
standard, topk, jumprelu; transcoders: transcoder, skip_transcoder (``+ u W_skip^T``),
jumprelu_transcoder, jumprelu_skip_transcoder. SAELens' run-time input normalisations
(``layer_norm``, ``constant_norm_rescale``) are applied as SAELens applies them.

Every fitted dictionary also records which latents fired on its training activations, for the
per-split latent statistics of :mod:`illusions.analyses.sparse`.

The fitted hooks live in :mod:`illusions.simplifiers.sae_hooks` (pure torch); training with SAELens
and loading what it saved, in :mod:`illusions.simplifiers.sae_training`; this module holds the
simplifiers' options and ``fit``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from illusions.errors import IllusionsError
from illusions.simplifiers import streaming
from illusions.simplifiers.base import (
    Proxy,
    ResolvedTargets,
    SimplifierConfig,
    Targets,
    check_positive,
    require,
)
from illusions.simplifiers.resid import resid_heads, resid_hook_names

# The hooks and the SAELens side live in modules of their own; their names are re-exported here,
# where callers have always imported them from.
from illusions.simplifiers.sae_hooks import (
    ARCHITECTURES,
    DictionaryHook,
    SAEHook,
    TranscoderHook,
    encode_all,
)
from illusions.simplifiers.sae_hooks import RUNTIME_NORMALIZE as RUNTIME_NORMALIZE
from illusions.simplifiers.sae_training import (
    SAVED_SAES,
    SAVED_TRANSCODERS,
    check_dictionary_fits,
    load_saved,
    require_sae_lens,
    saved_metadata,
    train_dictionary,
)
from illusions.simplifiers.sae_training import dictionary_bytes as dictionary_bytes

if TYPE_CHECKING:
    from illusions.backends import LensModel

SITES = ("resid", "z")


def _fit_summary(hook: DictionaryHook, x: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
    """The latents that fire on the fitting data, and the fit's reconstruction figures."""
    out, active = encode_all(hook, x)
    out, active, target = out.cpu().double(), active.cpu(), target.cpu().double()  # float64: not on MPS
    err = float((out - target).pow(2).sum())
    var = float((target - target.mean(0)).pow(2).sum())
    fired = active.any(0)
    return fired, {
        "explained_variance": 1.0 - err / var if var > 0 else float("nan"),
        "l0": float(active.sum(1).double().mean()),
        "dead_fraction": float((~fired).double().mean()),
    }


def mlp_input_name(model: LensModel, layer: int) -> str:
    """The MLP's input in block ``layer``: after its LayerNorm when there is one."""
    name = f"blocks.{layer}.ln2.hook_normalized"
    return name if name in model.hook_dict else f"blocks.{layer}.hook_resid_mid"


@dataclasses.dataclass(frozen=True)
class _Dictionary(SimplifierConfig):
    """Options shared by :class:`SAE` and :class:`Transcoder` (see their docstrings)."""

    data_free: ClassVar[bool] = False
    sweep_param: ClassVar[str] = "width"

    width: int = 256
    architecture: str = "topk"
    top_k: int = 16
    l1: float = 1.0
    sae_steps: int = 1000
    sae_batch: int = 1024
    sae_lr: float = 1e-3
    seed: int = 0
    sae_from: str = ""
    targets: Targets = Targets()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("width", "sae_steps", "sae_batch"):
            check_positive(getattr(self, name), name)
        if self.architecture not in ARCHITECTURES:
            raise IllusionsError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        check_positive(self.top_k, "top_k")
        for name in ("l1", "sae_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise IllusionsError(f"{name} must be a number, got {value!r}")
        if self.l1 < 0:
            raise IllusionsError(f"l1 must be at least 0, got {self.l1}")
        if self.sae_lr <= 0:
            raise IllusionsError(f"sae_lr must be positive, got {self.sae_lr}")
        defaults = {f.name: f.default for f in dataclasses.fields(_Dictionary)}
        if self.sae_from:
            given = [f"{k}={getattr(self, k)!r}" for k in ("width", "architecture", "top_k", "l1", "sae_steps",
                                                          "sae_batch", "sae_lr")
                     if getattr(self, k) != defaults[k]]
            if given:
                raise IllusionsError(f"sae_from loads a trained dictionary, whose cfg.json fixes its width and "
                                     f"architecture and which is not trained again; drop {', '.join(given)}")
            self._check_saved_kind()  # fail before any work when there is nothing (fitting) to load
            return
        if self.architecture == "topk":
            # Nothing tells the default from the same value given: say it may be the default.
            default = (f" (its default); set it to at most {self.width}, or make the dictionary at least "
                       f"{self.top_k} wide") if self.top_k == defaults["top_k"] else ""
            check_positive(self.top_k, "top_k", self.width, "the dictionary width", hint=default)
            if self.l1 != defaults["l1"]:
                raise IllusionsError(f"l1 is the sparsity coefficient of standard and jumprelu; topk's sparsity is "
                                     f"top_k (got l1={self.l1})")
        elif self.top_k != defaults["top_k"]:
            raise IllusionsError(f"top_k applies to the topk architecture, not {self.architecture} "
                                 f"(got top_k={self.top_k}); its sparsity is l1")

    def _check_saved_kind(self) -> None:
        """Refuse a saved dictionary of the other family (an SAE for a transcoder) or of no known kind."""
        arch = saved_metadata(self.sae_from).get("architecture")
        mine, other = ((SAVED_TRANSCODERS, SAVED_SAES) if isinstance(self, Transcoder) else
                       (SAVED_SAES, SAVED_TRANSCODERS))
        if arch in other:
            use = "sae" if isinstance(self, Transcoder) else "transcoder"
            raise IllusionsError(f"sae_from {self.sae_from} holds a {arch!r} dictionary (use the {use} simplifier); "
                                 f"{self.name} reads {', '.join(mine)}")
        if arch is not None and arch not in mine:
            raise IllusionsError(f"sae_from {self.sae_from} holds a {arch!r} dictionary; {self.name} reads "
                                 f"{', '.join(mine)}")

    # Subclasses: where the dictionary acts in each targeted layer.
    def _sites(self, model: LensModel, targets: ResolvedTargets) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _attention_heads(self, model: LensModel, targets: ResolvedTargets) -> tuple[tuple[int, int], ...]:
        """Heads of the first attention layer that reads what the dictionary replaced."""
        after = {layer + 1 for layer in targets.layers}
        return tuple((layer, head) for layer in sorted(after) if layer < model.cfg.n_layers
                     for head in range(model.cfg.n_heads))

    def _params(self, targets: ResolvedTargets, width: int) -> dict[str, Any]:
        raise NotImplementedError

    def hook_names(self, model: LensModel) -> list[str]:
        require_sae_lens()  # before any activation is collected
        targets = self.targets.resolve(model)
        return list(dict.fromkeys(name for site in self._sites(model, targets) for name in site["collect"]))

    def fit(self, model: LensModel, activations: dict[str, Tensor]) -> Proxy:
        targets = self.targets.resolve(model)
        sites = self._sites(model, targets)
        if self.sae_from and len(sites) > 1:
            raise IllusionsError(f"sae_from loads one dictionary, but {len(sites)} layers are targeted; give one layer")
        transcoder = isinstance(self, Transcoder)
        hooks: list[DictionaryHook] = []
        fits: dict[str, dict[str, float]] = {}
        n_fitted = 0
        for site in sites:
            x = site["flatten"](require(activations, site["input"], self.name))  # [n, d_in]
            y = require(activations, site["hook"], self.name) if transcoder else None  # [n, d_out]
            n_fitted = int(x.shape[0])
            if self.sae_from:
                weights = load_saved(self.sae_from, transcoder=transcoder)
                self._check_saved(site, weights, int(x.shape[1]))
            else:
                check_dictionary_fits(int(x.shape[1]), self.width, min(self.sae_batch, n_fitted), n_fitted, x.device)
                weights = train_dictionary(
                    x, y, architecture=self.architecture, width=self.width, top_k=self.top_k, l1=self.l1,
                    steps=self.sae_steps, batch=self.sae_batch, lr=self.sae_lr, seed=self.seed)
            tensors = {k: weights[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
            config = {k: weights[k] for k in ("architecture", "top_k", "normalize", "subtract_b_dec")}
            if transcoder:
                hook: DictionaryHook = TranscoderHook(
                    hook_name=site["hook"], heads=None, input_name=site["input"], **config, **tensors,
                    W_skip=weights.get("W_skip"), train_active=torch.zeros(weights["W_enc"].shape[1], dtype=torch.bool))
            else:
                hook = SAEHook(hook_name=site["hook"], heads=site["heads"], **config, **tensors,
                               train_active=torch.zeros(weights["W_enc"].shape[1], dtype=torch.bool))
            fired, summary = _fit_summary(hook, x, y if transcoder else x)
            hooks.append(dataclasses.replace(hook, train_active=fired))
            fits[site["hook"]] = summary
        widths = {h.d_sae for h in hooks}
        if len(widths) != 1:
            raise IllusionsError(f"the dictionaries of one proxy must have one width, got {sorted(widths)}")
        info: dict[str, Any] = {"n_fitted": n_fitted, "fit": fits, "sae_lens_version": require_sae_lens().__version__}
        if self.sae_from:
            info["loaded_from"] = self.sae_from
            info["architecture"] = hooks[0].architecture
        return Proxy(
            simplifier=self.name,
            sweep_param=self.sweep_param,
            params=self._params(targets, widths.pop()),
            hooks=tuple(hooks),
            attention_heads=self._attention_heads(model, targets),
            info=info,
        )

    def stream(self, model: LensModel) -> DictionaryStream:
        """A :class:`DictionaryStream`: this dictionary fitted on a seeded sample of activations
        given batch by batch."""
        return DictionaryStream(self, model)

    def _check_saved(self, site: dict[str, Any], weights: dict[str, Any], width: int) -> None:
        """Refuse a loaded dictionary that was trained on another hook point or shape."""
        where = f"sae_from {self.sae_from}"
        d_in = int(weights["W_enc"].shape[0])
        if d_in != width:
            raise IllusionsError(f"{where} reads {d_in}-wide vectors, but {site['input']} gives {width}-wide ones"
                                 + (" (the flattened targeted heads)" if site["heads"] else ""))
        if int(weights["W_dec"].shape[1]) != int(site["out_width"]):
            raise IllusionsError(f"{where} writes {weights['W_dec'].shape[1]}-wide vectors, but {site['hook']} "
                                 f"is {site['out_width']}-wide")
        trained_on, out = weights.get("hook_name"), weights.get("hook_name_out")
        if isinstance(self, Transcoder):
            if out and out != site["hook"]:
                raise IllusionsError(f"{where} predicts {out}, but this analysis replaces {site['hook']}")
            return  # its input hook was taken from its cfg.json by _sites
        if trained_on and trained_on != site["hook"]:
            raise IllusionsError(f"{where} was trained on {trained_on}, but this analysis replaces {site['hook']} "
                                 "(choose the layer and site it was trained on)")
        head = weights.get("hook_head_index")
        if head is not None and site["heads"] != (int(head),):
            raise IllusionsError(f"{where} was trained on head {head} alone; target that head (heads={head})")


@dataclasses.dataclass(frozen=True)
class SAE(_Dictionary):
    """A sparse autoencoder on the residual stream or on the attention output, per targeted layer.

    Maths, training and loading in the module docstring. Attributes:
        width: latents (dictionary size).
        architecture: ``standard``, ``topk`` or ``jumprelu`` (SAELens' training architectures).
        top_k: active latents per vector (topk only).
        l1: sparsity coefficient (standard: L1; jumprelu: L0; not used by topk).
        sae_steps, sae_batch, sae_lr: optimisation steps, vectors per step, learning rate.
        seed: SAELens' initialisation and the order of the training batches.
        site: ``resid`` (``blocks.L.hook_<targets.resid>``) or ``z`` (``blocks.L.attn.hook_z`` of the
            targeted heads, flattened).
        sae_from: a directory holding a dictionary saved by SAELens, used instead of training one.
        targets: layers, ``resid`` (site resid) and heads (site z).
    """

    name: ClassVar[str] = "sae"
    target_keys: ClassVar[tuple[str, ...]] = ("layers", "heads", "resid")

    site: str = "resid"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.site not in SITES:
            raise IllusionsError(f"site must be one of {', '.join(SITES)}, got {self.site!r}")
        if self.site == "resid" and self.targets.heads not in ((), "all"):
            raise IllusionsError("heads apply to the attention-output site (site z); a residual-stream SAE "
                                 "reads whole vectors")

    def _sites(self, model: LensModel, targets: ResolvedTargets) -> list[dict[str, Any]]:
        if self.site == "resid":
            names = resid_hook_names(model, targets)
            return [{"layer": layer, "hook": name, "input": name, "collect": [name], "heads": None, "flatten": lambda a: a, "out_width": model.cfg.d_model}
                    for layer, name in zip(targets.layers, names, strict=True)]
        heads = targets.heads
        out = []
        for layer in targets.layers:
            name = f"blocks.{layer}.attn.hook_z"
            if name not in model.hook_dict:
                raise IllusionsError(f"this model has no {name}")
            out.append({"layer": layer, "hook": name, "input": name, "collect": [name], "heads": heads, "out_width": len(heads) * model.cfg.d_head,
                        "flatten": lambda a, h=heads: a[:, list(h)].reshape(a.shape[0], -1)})
        return out

    def _attention_heads(self, model: LensModel, targets: ResolvedTargets) -> tuple[tuple[int, int], ...]:
        if self.site == "resid":
            return resid_heads(model, targets)
        return super()._attention_heads(model, targets)

    def _params(self, targets: ResolvedTargets, width: int) -> dict[str, Any]:
        params = {**self.to_dict(), "width": width}
        params["targets"] = ({"layers": list(targets.layers), "resid": targets.resid} if self.site == "resid"
                             else {"layers": list(targets.layers), "heads": list(targets.heads)})
        return params


@dataclasses.dataclass(frozen=True)
class Transcoder(_Dictionary):
    """A sparse transcoder in place of each targeted layer's MLP (module docstring).

    Attributes as for :class:`SAE` (no ``site``; heads and ``resid`` play no part).
    """

    name: ClassVar[str] = "transcoder"
    target_keys: ClassVar[tuple[str, ...]] = ("layers",)

    def _sites(self, model: LensModel, targets: ResolvedTargets) -> list[dict[str, Any]]:
        if model.cfg.attn_only or not model.cfg.d_mlp:
            raise IllusionsError("this model is attention-only: there is no MLP for a transcoder to replace")
        saved = saved_metadata(self.sae_from).get("hook_name") if self.sae_from else None
        out = []
        for layer in targets.layers:
            name, inp = f"blocks.{layer}.hook_mlp_out", mlp_input_name(model, layer)
            if saved and saved != inp:
                # A transcoder trained elsewhere may read another point of the block (e.g. hook_resid_mid).
                if saved not in model.hook_dict or not saved.startswith(f"blocks.{layer}."):
                    raise IllusionsError(f"sae_from {self.sae_from} reads {saved}, which is not a hook of block "
                                         f"{layer} of this model")
                inp = saved
            out.append({"layer": layer, "hook": name, "input": inp, "collect": [inp, name], "heads": None,
                        "flatten": lambda a: a, "out_width": model.cfg.d_model})
        return out

    def _params(self, targets: ResolvedTargets, width: int) -> dict[str, Any]:
        params = {**self.to_dict(), "width": width}
        params["targets"] = {"layers": list(targets.layers)}
        return params


class DictionaryStream:
    """An ``sae`` or ``transcoder`` fit from activations given batch by batch (:meth:`add`, each
    batch in ``collect``'s layout), for fits too large to hold
    (:data:`illusions.analyses.faithfulness.STREAM_FIT_BYTES`).

    It keeps a uniform random sample of the fitting positions (PAD dropped): Vitter's reservoir
    (:class:`~illusions.simplifiers.streaming.Reservoir`) seeded by the dictionary's ``seed``, of at
    most :data:`~illusions.simplifiers.streaming.SAMPLE_BYTES` (256 MiB) of activations at all the
    dictionary's hook points together: ``SAMPLE_BYTES // (bytes of one position at them)`` positions,
    every position kept with the same probability, each kept position's vectors at every hook point
    together (a transcoder's input beside its target). :meth:`fit_sweep` then fits exactly as the held
    path does (:meth:`_Dictionary.fit`) on the sample instead of on every position: the same
    ``sae_steps x sae_batch`` vectors drawn in seeded epochs, the input scale and the fit summary
    (explained variance, L0, dead latents, the latents that fired) read from the sample;
    ``n_fitted`` is the sample's size and ``info["streamed"]`` gives it beside the positions seen.

    What differs from the held fit: the training vectors are drawn from the sample, not from every
    position (when ``sae_steps x sae_batch`` exceeds the sample, its vectors come round again as
    epochs). SAELens' ``ActivationsStore`` instead reruns the model over fresh text whenever its
    mixing buffer runs low (half the buffer served after a shuffle, half kept to mix with the next
    activations), so it never trains twice on one position; here the fitting sequences are a fixed
    set collected once, and a uniform sample of them is what a bounded memory can train on.
    """

    def __init__(self, config: _Dictionary, model: LensModel) -> None:
        self.config = config
        self.model = model
        self.names = config.hook_names(model)
        self.sample = streaming.Reservoir(streaming.SAMPLE_BYTES, config.seed)

    def add(self, activations: dict[str, Tensor]) -> None:
        self.sample.add({name: require(activations, name, self.config.name) for name in self.names})

    def fit_sweep(self, values: list[int]) -> dict[int, Proxy]:
        return streaming.fit_own_value(self.config, values, self.sample,
                                       lambda sample: self.config.fit(self.model, sample))
