"""``weight-svd`` (beyond the paper, data-free): each head's query-key bilinear form truncated to rank r.

For one head, with ``x`` a row of the attention input (the output of ``ln1``), queries and keys are
``q = x W_Q + b_Q`` and ``k = x W_K + b_K``, and the attention score is ``q . k / attn_scale``.
**Biases** are folded in with a constant coordinate: ``x~ = [x, 1]``, ``W~_Q = [W_Q; b_Q]``,
``W~_K = [W_K; b_K]`` (``[d_model + 1, d_head]``), so ``q . k' = x~ W~_QK x~'^T`` with the bilinear
form ``W~_QK = W~_Q W~_K^T`` of rank at most d_head; the bias terms are truncated together with the
rest. Its rank-r truncation ``U_r S_r V_r^T`` (an SVD of ``W~_QK``) replaces it.

This is done without touching the weights: write ``W~_Q = Q_q R_q`` and ``W~_K = Q_k R_k`` with
orthonormal ``Q`` (from thin SVDs), and ``C = R_q R_k^T = u s v^T`` (so ``W~_QK = (Q_q u) s
(Q_k v)^T``). Then

    q -> q P_q,   P_q = R_q^+ u_r u_r^T R_q      (targets.qk = "q")
    k -> k P_k,   P_k = R_k^+ v_r v_r^T R_k      (targets.qk = "k")

each alone, or both together (``"qk"``, the default), give attention scores ``x~ U_r S_r V_r^T
x~'^T / attn_scale``: exactly those of the rank-r form. At full rank ``P = I``. Rotary models have no
position-free bilinear form and are refused.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from illusions.errors import IllusionsError
from illusions.simplifiers.base import (
    FittedHook,
    Proxy,
    SimplifierConfig,
    Targets,
    check_positive,
    head_rows,
    off_share,
    qk_hook_name,
    register_hook_kind,
    replace_heads,
    signal_site,
)

if TYPE_CHECKING:
    from illusions.backends import LensModel


@dataclasses.dataclass(frozen=True)
class QKFactors:
    """The pieces of one head's augmented form ``W~_QK = Q_q R_q R_k^T Q_k^T`` (float64)."""

    r_q: Float[Tensor, "d_head d_head"]
    r_k: Float[Tensor, "d_head d_head"]
    u: Float[Tensor, "d_head d_head"]
    s: Float[Tensor, " d_head"]
    v: Float[Tensor, "d_head d_head"]

    def query_map(self, rank: int) -> Float[Tensor, "d_head d_head"]:
        u_r = self.u[:, :rank]
        return torch.linalg.pinv(self.r_q) @ u_r @ u_r.T @ self.r_q

    def key_map(self, rank: int) -> Float[Tensor, "d_head d_head"]:
        v_r = self.v[:, :rank]
        return torch.linalg.pinv(self.r_k) @ v_r @ v_r.T @ self.r_k


def augmented(weight: Float[Tensor, "d_model d_head"], bias: Float[Tensor, " d_head"]) -> Float[Tensor, "d_model_plus_1 d_head"]:
    """``[W; b]``: the map from ``[x, 1]`` to ``x W + b`` (float64, on the CPU for MPS weights)."""
    from illusions.devices import float64_device

    return torch.cat([weight, bias[None]], dim=0).to(float64_device(weight.device), torch.float64)


def qk_factors(w_q: Tensor, b_q: Tensor, w_k: Tensor, b_k: Tensor) -> QKFactors:
    """Factor one head's augmented query-key form (see the module docstring)."""

    def triangle(w: Tensor) -> Tensor:
        # w = U S Vh with orthonormal U, so R = S Vh carries everything the form needs.
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        return s[:, None] * vh  # [d_head d_head]

    r_q = triangle(augmented(w_q, b_q))
    r_k = triangle(augmented(w_k, b_k))
    u, s, vh = torch.linalg.svd(r_q @ r_k.T)
    return QKFactors(r_q=r_q, r_k=r_k, u=u, s=s, v=vh.T)


@register_hook_kind
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class LinearMapHook(FittedHook):
    """``x -> x M`` per head at a ``[batch, pos, head_index, d_head]`` hook; ``matrix`` is
    ``[len(heads), d_head, d_head]`` and other heads pass through."""

    causal: ClassVar[bool] = True  # position by position (FittedHook.causal)

    hook_name: str
    heads: tuple[int, ...]
    matrix: Tensor = dataclasses.field(repr=False)

    @property
    def width(self) -> int:
        return int(self.matrix.shape[-1])

    def __call__(self, activation: Tensor, hook: Any = None) -> Tensor:
        matrix = self.matrix.to(device=activation.device, dtype=activation.dtype)
        rows = head_rows(self.heads, activation.shape[2])
        new = torch.einsum("bphd,hde->bphe", activation[:, :, rows], matrix)
        return replace_heads(activation, rows, new, axis=2)

    def signal_sites(self) -> list[tuple[str, Any]]:
        """``offspace_<site>``: the share of the activation the rank-r map does not keep,
        ``s(x) = |x - x M| / |x|``, the largest over the targeted heads (0 where ``M`` is the identity)."""
        return [(self.hook_name, self.offspace)]

    def offspace(self, activation: Tensor) -> dict[str, Tensor]:
        x = activation[:, :, head_rows(self.heads, activation.shape[2])]  # [batch pos heads d_head]
        kept = torch.einsum("bphd,hde->bphe", x, self.matrix.to(device=x.device, dtype=x.dtype))
        return {f"offspace_{signal_site(self.hook_name)}": off_share(x, kept).amax(-1)}


@dataclasses.dataclass(frozen=True)
class WeightSVD(SimplifierConfig):
    """Each targeted head's query-key bilinear form truncated to rank ``rank`` (data-free).

    Maths and bias handling in the module docstring. Attributes:
        rank: kept singular directions of the form, 1..d_head.
        targets: layers, heads, and which of q/k carries the projection (scores are the same).
    """

    name: ClassVar[str] = "weight-svd"
    data_free: ClassVar[bool] = True
    sweep_param: ClassVar[str] = "rank"
    sweep_limit: ClassVar[str] = "d_head"
    target_keys: ClassVar[tuple[str, ...]] = ("layers", "heads", "qk")

    rank: int = 4
    targets: Targets = Targets()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.rank, "rank")

    def hook_names(self, model: LensModel) -> list[str]:
        self._check(model)
        self.targets.resolve(model)
        return []

    def _check(self, model: LensModel) -> None:
        check_positive(self.rank, "rank", model.cfg.d_head)
        if model.cfg.positional_embedding_type == "rotary":
            raise IllusionsError("weight-svd needs a model without rotary embeddings: rotary queries and "
                                 "keys have no position-free bilinear form")

    def fit(self, model: LensModel, activations: dict[str, Tensor] | None = None) -> Proxy:
        self._check(model)
        targets = self.targets.resolve(model)
        hooks = []
        singular = {}
        with torch.no_grad():
            for layer in targets.layers:
                attn = model.blocks[layer].attn
                factors = [
                    qk_factors(attn.W_Q[h], attn.b_Q[h], attn.W_K[h], attn.b_K[h]) for h in targets.heads
                ]
                singular[str(layer)] = [f.s.tolist() for f in factors]
                for side in targets.qk:
                    maps = [f.query_map(self.rank) if side == "q" else f.key_map(self.rank) for f in factors]
                    hooks.append(LinearMapHook(
                        hook_name=qk_hook_name(layer, side),
                        heads=targets.heads,
                        matrix=torch.stack(maps).float().contiguous(),  # [heads d_head d_head]
                    ))
        return Proxy(
            simplifier=self.name,
            sweep_param=self.sweep_param,
            params=self.resolved_params(targets),
            hooks=tuple(hooks),
            attention_heads=tuple((layer, head) for layer in targets.layers for head in targets.heads),
            info={"singular_values": singular},
        )
