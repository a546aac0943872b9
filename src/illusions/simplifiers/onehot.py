"""``onehot``: hard attention on the highest-scoring allowed key (data-free).

At ``blocks.L.attn.hook_pattern`` (``[batch, head_index, query_pos, key_pos]``) each targeted
head's attention row ``a`` (a softmax over the allowed, causal keys; masked keys are exactly 0) is
replaced by

    a' = e_{j*},   j* = argmax_j a_j

The softmax is monotone, so ``j*`` is also the highest-scoring allowed key. **Ties go to the earliest
key** (``torch.max`` returns the first maximum), e.g. a row attending equally to keys 0 and 2
becomes one-hot on key 0. A row that is all zeros (every key masked) stays all zeros. A one-hot
pattern is a fixed point: applying the hook to it changes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from illusions.simplifiers.base import (
    FittedHook,
    Proxy,
    SimplifierConfig,
    Targets,
    head_rows,
    register_hook_kind,
    replace_heads,
)

if TYPE_CHECKING:
    from illusions.backends import LensModel


def hard_attention(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
) -> Float[Tensor, "batch head_index query_pos key_pos"]:
    """One-hot on the argmax key of every row (earliest key on ties; all-zero rows kept)."""
    top, index = pattern.max(dim=-1, keepdim=True)  # [batch heads query_pos 1], first maximum
    return torch.zeros_like(pattern).scatter_(-1, index, (top > 0).to(pattern.dtype))


@register_hook_kind
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class OneHotPatternHook(FittedHook):
    """Hard attention for ``heads`` at one ``hook_pattern``; other heads pass through."""

    causal: ClassVar[bool] = True  # a query row attends to earlier keys only (FittedHook.causal)

    hook_name: str
    heads: tuple[int, ...]

    def __call__(self, activation: Tensor, hook: Any = None) -> Tensor:
        rows = head_rows(self.heads, activation.shape[1])
        return replace_heads(activation, rows, hard_attention(activation[:, rows]), axis=1)

    def signal_sites(self) -> list[tuple[str, Any]]:
        """``offargmax_mass``: the attention mass the hard proxy throws away, ``1 - max_j a_j``,
        the largest over the targeted heads (0 for a one-hot row, near 1 for a flat one)."""
        return [(self.hook_name, self.offargmax)]

    def offargmax(self, pattern: Tensor) -> dict[str, Tensor]:
        rows = pattern[:, head_rows(self.heads, pattern.shape[1])]  # [batch heads query_pos key_pos]
        return {"offargmax_mass": (1 - rows.amax(-1)).amax(1)}  # [batch query_pos]


@dataclasses.dataclass(frozen=True)
class OneHot(SimplifierConfig):
    """Hard attention on the targeted heads (maths and tie rule in the module docstring).

    Attributes:
        targets: layers and heads; ``qk`` and ``resid`` play no part.
    """

    name: ClassVar[str] = "onehot"
    data_free: ClassVar[bool] = True
    sweep_param: ClassVar[str] = ""
    target_keys: ClassVar[tuple[str, ...]] = ("layers", "heads")

    targets: Targets = Targets()

    def hook_names(self, model: LensModel) -> list[str]:
        self.targets.resolve(model)
        return []

    def fit(self, model: LensModel, activations: dict[str, Tensor] | None = None) -> Proxy:
        targets = self.targets.resolve(model)
        hooks = tuple(
            OneHotPatternHook(hook_name=f"blocks.{layer}.attn.hook_pattern", heads=targets.heads)
            for layer in targets.layers
        )
        return Proxy(
            simplifier=self.name,
            sweep_param=self.sweep_param,
            params=self.resolved_params(targets),
            hooks=hooks,
            attention_heads=tuple((layer, head) for layer in targets.layers for head in targets.heads),
        )
