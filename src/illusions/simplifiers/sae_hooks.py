"""The fitted hooks of the ``sae`` and ``transcoder`` simplifiers: encode and decode through a sparse
dictionary, pure torch (no SAELens), registered for :meth:`~illusions.simplifiers.base.Proxy.load`.

The maths is in :mod:`illusions.simplifiers.sae`, which fits them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from illusions.errors import IllusionsError
from illusions.simplifiers.base import (
    FittedHook,
    head_rows,
    off_share,
    register_hook_kind,
    replace_heads,
)

ARCHITECTURES = ("standard", "topk", "jumprelu")
# SAELens applies these input normalisations at run time; the others are folded in after training.
RUNTIME_NORMALIZE = ("layer_norm", "constant_norm_rescale")
_LN_EPS = 1e-5  # SAELens' layer_norm epsilon
_CHUNK = 8192  # rows per pass when encoding many vectors (bounds the [rows, d_sae] codes)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class DictionaryHook(FittedHook):
    """Encode-decode through a sparse dictionary (maths in :mod:`illusions.simplifiers.sae`).

    ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``;
    ``threshold [d_sae]`` for jumprelu, ``W_skip [d_in, d_out]`` for skip transcoders;
    ``train_active [d_sae]`` (bool): the latents that fired on the fitting activations.
    ``normalize``: ``none`` or one of SAELens' run-time input normalisations.
    """

    causal: ClassVar[bool] = True  # position by position (FittedHook.causal)

    hook_name: str
    heads: tuple[int, ...] | None
    architecture: str
    top_k: int
    normalize: str
    subtract_b_dec: bool
    W_enc: Tensor = dataclasses.field(repr=False)
    b_enc: Tensor = dataclasses.field(repr=False)
    W_dec: Tensor = dataclasses.field(repr=False)
    b_dec: Tensor = dataclasses.field(repr=False)
    train_active: Tensor = dataclasses.field(repr=False)
    threshold: Tensor | None = dataclasses.field(default=None, repr=False)
    W_skip: Tensor | None = dataclasses.field(default=None, repr=False)

    # SAEs map normalised outputs back; SAELens' transcoders do not (their output is another space).
    denormalize_output: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise IllusionsError(f"unknown dictionary architecture {self.architecture!r}; "
                                 f"known: {', '.join(ARCHITECTURES)}")
        if self.architecture == "jumprelu" and self.threshold is None:
            raise IllusionsError(f"the jumprelu dictionary at {self.hook_name} has no threshold")
        if self.architecture == "topk" and not 1 <= self.top_k <= self.d_sae:
            raise IllusionsError(f"top_k={self.top_k} must be in 1..{self.d_sae} (the width)")
        if self.normalize not in ("none", *RUNTIME_NORMALIZE):
            raise IllusionsError(f"unknown input normalisation {self.normalize!r}")

    @property
    def width(self) -> int:
        """Width of the vectors read (``d_in``)."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def forward(self, x: Float[Tensor, "... d_in"]) -> tuple[Float[Tensor, "... d_out"], Float[Tensor, "... d_sae"]]:
        """``(output, codes)`` for input vectors ``x``."""
        like = {"device": x.device, "dtype": x.dtype}
        raw = x
        mean = std = scale = None
        if self.normalize == "layer_norm":
            mean = x.mean(-1, keepdim=True)
            x = x - mean
            std = x.std(-1, keepdim=True)
            x = x / (std + _LN_EPS)
        elif self.normalize == "constant_norm_rescale":
            scale = math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True)
            x = x * scale
        b_dec = self.b_dec.to(**like)
        if self.subtract_b_dec:
            x = x - b_dec
        pre = x @ self.W_enc.to(**like) + self.b_enc.to(**like)  # [... d_sae]
        if self.architecture == "standard":
            codes = pre.relu()
        elif self.architecture == "topk":
            values, index = torch.topk(pre, k=self.top_k, dim=-1, sorted=False)
            codes = torch.zeros_like(pre).scatter_(-1, index, values.relu())
        else:
            assert self.threshold is not None
            codes = pre.relu() * (pre > self.threshold.to(**like))
        out = codes @ self.W_dec.to(**like) + b_dec
        if self.W_skip is not None:
            out = out + raw @ self.W_skip.to(**like)
        if self.denormalize_output:
            if std is not None and mean is not None:
                out = out * std + mean
            if scale is not None:
                out = out / scale
        return out, codes

    def flatten(self, collected: Tensor) -> Float[Tensor, "n d_in"]:
        """Collected activations (``collect``'s layout) as the dictionary's input vectors."""
        if self.heads is None:
            return collected
        return collected[:, list(self.heads)].reshape(collected.shape[0], -1)  # [n, heads * d_head]

    @property
    def stat_names(self) -> list[str]:
        """Hook points whose clean activations give the dictionary's input and its target."""
        return [self.hook_name]

    def input_and_target(self, collected: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(input [n, d_in], target [n, d_out])`` from activations collected at :attr:`stat_names`."""
        x = self.flatten(collected[self.hook_name])
        return x, x

    def new_latent_activation(self, codes: Tensor) -> Tensor:
        """The summed activation of the latents that never fired on the fitting data, per vector
        (``sum_{j not in A} f_j(x)``, ``A`` = ``train_active``): 0 on every fitting vector."""
        never = (~self.train_active.to(codes.device)).to(codes.dtype)  # [d_sae]
        return codes @ never

    def dictionary_input(self, activation: Tensor) -> Tensor:
        """The dictionary's input vectors ``[batch, pos, d_in]`` at its hook point (heads flattened)."""
        if self.heads is None:
            return activation
        x = activation[:, :, head_rows(self.heads, activation.shape[2])]  # [batch pos heads d_head]
        return x.reshape(x.shape[0], x.shape[1], -1)


@register_hook_kind
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class SAEHook(DictionaryHook):
    """Replace the activation at ``hook_name`` by the SAE's reconstruction.

    With ``heads`` (``hook_z``, ``[batch, pos, head_index, d_head]``) the targeted heads are read
    flattened, ``[batch, pos, len(heads) * d_head]``, and replaced; other heads pass through. With
    ``heads=None`` the whole ``[batch, pos, d]`` vector is.
    """

    def __call__(self, activation: Tensor, hook: Any = None) -> Tensor:
        if self.heads is None:
            return self.forward(activation)[0]
        rows = head_rows(self.heads, activation.shape[2])
        x = activation[:, :, rows]  # [batch pos heads d_head]
        batch, pos, heads, d = x.shape
        new = self.forward(x.reshape(batch, pos, heads * d))[0].view(batch, pos, heads, d)
        return replace_heads(activation, rows, new, axis=2)

    def signal_sites(self) -> list[tuple[str, Any]]:
        """Two signals from the activation ``x`` the SAE reads: ``recon_error``, the share of ``x``
        the reconstruction misses, ``|x - x_hat| / |x|``, and ``new_latents``, the summed activation
        of latents never active on the fitting data (:meth:`new_latent_activation`)."""
        return [(self.hook_name, self.signals)]

    def signals(self, activation: Tensor) -> dict[str, Tensor]:
        x = self.dictionary_input(activation)
        out, codes = self.forward(x)
        return {"recon_error": off_share(x, out), "new_latents": self.new_latent_activation(codes)}


@register_hook_kind
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class TranscoderHook(DictionaryHook):
    """Replace ``blocks.L.hook_mlp_out`` by the transcoder's prediction from ``input_name``.

    It acts at two hook points, so :attr:`hook_pairs` gives both: one that reads the MLP's input
    and computes the prediction (leaving the input unchanged), and ``hook_name``, which returns it.

    Its warning signals (:meth:`signal_sites`), per position, with ``x`` the MLP's input, ``y`` the
    MLP's output in the same pass and ``T(x)`` the transcoder's prediction:

        recon_error   |y - T(x)| / |y|          (0 where y = 0): the share of the MLP's output the
                      transcoder misses; 0 for a transcoder that reproduces the MLP, 1 for one that
                      predicts nothing. (Its square, |y - T(x)|^2 / |y|^2, ranks and thresholds the
                      positions the same way.)
        new_latents   sum_{j not in A} f_j(x)   (A = ``train_active``): the summed activation of the
                      latents that never fired on the fitting data; 0 on every fitting position.
    """

    input_name: str = ""

    denormalize_output: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.input_name:
            raise IllusionsError(f"the transcoder at {self.hook_name} names no input hook")
        # The prediction made at the input hook, waiting for the output hook of the same pass (one for
        # the replacement, one for the warning signals, which run before the replacement at each point).
        object.__setattr__(self, "_pending", {})
        object.__setattr__(self, "_signal_pending", {})

    def hook_pairs(self) -> list[tuple[str, Any]]:
        return [(self.input_name, self.read_input), (self.hook_name, self)]

    def signal_sites(self) -> list[tuple[str, Any]]:
        """``new_latents`` at the MLP's input, ``recon_error`` at its output, before the transcoder
        replaces it (maths in the class docstring). Neither needs a label or the original model: the
        MLP's output ``y`` is the activation the proxy is about to replace, as for the SAE's ``x``."""
        return [(self.input_name, self.input_signals), (self.hook_name, self.output_signals)]

    def input_signals(self, x: Tensor) -> dict[str, Tensor]:
        """``new_latents`` of the MLP's input ``x``; keeps ``T(x)`` for :meth:`output_signals`."""
        out, codes = self.forward(x)
        self._signal_pending["out"] = out
        return {"new_latents": self.new_latent_activation(codes)}

    def output_signals(self, y: Tensor) -> dict[str, Tensor]:
        """``recon_error`` of the MLP's output ``y`` against ``T(x)`` from :meth:`input_signals`."""
        out = self._signal_pending.pop("out", None)
        if out is None or out.shape != y.shape:
            raise IllusionsError(f"the transcoder's signal at {self.hook_name} ran without its input signal at "
                                 f"{self.input_name} (attach every site of signal_sites())")
        return {"recon_error": off_share(y, out.to(y.dtype))}

    def read_input(self, activation: Tensor, hook: Any = None) -> Tensor:
        self._pending["out"] = self.forward(activation)[0]
        return activation

    def __call__(self, activation: Tensor, hook: Any = None) -> Tensor:
        out = self._pending.pop("out", None)
        if out is None or out.shape != activation.shape:
            raise IllusionsError(f"the transcoder at {self.hook_name} ran without its input hook "
                                 f"{self.input_name} (attach proxy.fwd_hooks, which hold both)")
        return out.to(activation.dtype)

    @property
    def stat_names(self) -> list[str]:
        return [self.input_name, self.hook_name]

    def input_and_target(self, collected: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return collected[self.input_name], collected[self.hook_name]


def encode_all(hook: DictionaryHook, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(output [n, d_out], active [n, d_sae] bool)`` for many input vectors, in chunks."""
    outs, active = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], _CHUNK):
            out, codes = hook.forward(x[start : start + _CHUNK])
            outs.append(out)
            active.append(codes != 0)
    return torch.cat(outs), torch.cat(active)
