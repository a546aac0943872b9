"""``svd``: queries and keys projected onto their top-r principal directions, per head.

For one head with fitted vectors ``X`` (``[n, d_head]``, PAD positions dropped), mean ``mu`` (zero
when ``centered=False``) and ``V_r`` the top-r right singular vectors of ``X - mu``:

    x  ->  mu + (x - mu) V_r V_r^T

an (affine) orthogonal projection: full rank is the identity, and applying it twice is applying it
once. ``basis="separate"`` fits queries and keys each their own ``mu``/``V_r``; ``basis="joint"``
fits one ``mu``/``V_r`` per head on the queries and keys stacked together (``[2n, d_head]``) and
uses it for both. The SVD is computed as the eigendecomposition of the ``d x d`` scatter matrix in
float64, accumulated in chunks, so 10^6 vectors take well under a second; :meth:`SVD.fit_sweep`
reuses one decomposition for a whole list of ranks.
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
    require,
    signal_site,
)

if TYPE_CHECKING:
    from illusions.backends import LensModel

BASES = ("separate", "joint")
# Rows per chunk when accumulating the scatter matrix: bounds the float64 copy to ~16 MB at d=32.
_CHUNK = 1 << 16
# Elements per chunk of a streamed fit (:class:`ScatterStats`): 2^20 float64 numbers, 8 MB.
_STREAM_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class PCAFit:
    """Principal directions of ``[n, d]`` data.

    Attributes:
        mean: ``[d]`` the centre (zeros when fitted uncentred).
        singular_values: ``[d]`` singular values of the centred data, descending.
        components: ``[d, d]``; column ``j`` is the j-th right singular vector.
        n: number of fitted vectors.
    """

    mean: Float[Tensor, " d"]
    singular_values: Float[Tensor, " d"]
    components: Float[Tensor, "d d"]
    n: int

    def basis(self, rank: int) -> Float[Tensor, "d rank"]:
        return self.components[:, :rank]

    def explained(self, rank: int) -> float:
        """Fraction of the (centred) sum of squares the top ``rank`` directions keep."""
        power = self.singular_values.cpu().double() ** 2  # [d], a few numbers: no need for the device
        total = float(power.sum())
        return float(power[:rank].sum()) / total if total > 0 else 1.0


def pca(x: Float[Tensor, "n d"], *, centered: bool = True) -> PCAFit:
    """Mean and right singular vectors of ``x`` (centred first unless ``centered=False``).

    Computed from the float64 scatter matrix ``(x - mu)^T (x - mu)`` by ``eigh``; its eigenvectors
    are the right singular vectors and the square roots of its eigenvalues the singular values.
    Returned tensors are float32.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise IllusionsError(f"cannot fit on {tuple(x.shape)} activations: need at least one vector")
    from illusions.devices import float64_device

    n, d = x.shape
    # On x's device (the CPU for MPS, which has no float64); the fit comes back on x's device.
    device = float64_device(x.device)
    mean = _mean(x, device, _CHUNK, centered)
    scatter = torch.zeros(d, d, dtype=torch.float64, device=device)
    for start in range(0, n, _CHUNK):
        chunk = x[start : start + _CHUNK].to(device, torch.float64) - mean
        scatter += chunk.T @ chunk
    return _decompose(scatter, mean, n, x)


class ScatterStats:
    """:func:`pca` streamed: the float64 sum and scatter matrix of ``[n, d]`` vectors given batch by
    batch, so the vectors need never be held together.

    The sums are taken about a shift ``c`` (the first batch's mean): with ``y = x - c``,
    ``mu = c + sum(y) / n`` and the centred scatter ``sum (x - mu)(x - mu)^T = sum y y^T - n (mu - c)(mu - c)^T``,
    which keeps the cancellation small while ``c`` is near the mean. The result equals :func:`pca`'s
    up to float64 rounding (the sums are grouped differently), not bit for bit; the engine streams
    only fits too large to hold (:data:`illusions.analyses.faithfulness.STREAM_FIT_BYTES`).
    """

    def __init__(self, *, centered: bool = True) -> None:
        self.centered = centered
        self.n = 0
        self.shift: Tensor | None = None
        self.total: Tensor | None = None
        self.scatter: Tensor | None = None
        self.like: Tensor | None = None

    def add(self, x: Float[Tensor, "n d"]) -> None:
        from illusions.devices import float64_device

        if x.ndim != 2 or x.shape[0] == 0:
            return
        device = float64_device(x.device)
        d = x.shape[1]
        rows = max(1, _STREAM_CHUNK // d)  # a float64 chunk of at most 8 MB whatever the width
        if self.shift is None:
            self.shift = _mean(x, device, rows, self.centered)
            self.total = torch.zeros(d, dtype=torch.float64, device=device)
            self.scatter = torch.zeros(d, d, dtype=torch.float64, device=device)
            self.like = x.new_zeros(0)  # its device only: a view (x[:0]) would keep the whole batch alive
        for start in range(0, x.shape[0], rows):
            chunk = x[start : start + rows].to(device, torch.float64) - self.shift
            self.total += chunk.sum(0)
            self.scatter += chunk.T @ chunk
        self.n += int(x.shape[0])

    def fit(self) -> PCAFit:
        """The :class:`PCAFit` of every vector added so far."""
        if self.n == 0 or self.scatter is None:
            raise IllusionsError("cannot fit on 0 activations: need at least one vector")
        offset = self.total / self.n  # [d] mu - c
        scatter = self.scatter - self.n * torch.outer(offset, offset) if self.centered else self.scatter
        return _decompose(scatter, self.shift + offset if self.centered else self.shift, self.n, self.like)


def _mean(x: Float[Tensor, "n d"], device: torch.device, rows: int, centered: bool = True) -> Float[Tensor, " d"]:
    """The float64 mean of the rows of ``x`` on ``device``, summed ``rows`` rows at a time (a float64 copy
    of one chunk at most); zeros when not ``centered``."""
    mean = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    if not centered:
        return mean
    for start in range(0, x.shape[0], rows):
        mean += x[start : start + rows].to(device, torch.float64).sum(0)
    mean /= x.shape[0]
    return mean


def _decompose(scatter: Tensor, mean: Tensor, n: int, like: Tensor) -> PCAFit:
    """The :class:`PCAFit` of a float64 scatter matrix and mean, float32 on ``like``'s device."""
    d = scatter.shape[0]
    eigvals, eigvecs = torch.linalg.eigh(scatter)  # ascending
    order = torch.arange(d - 1, -1, -1, device=scatter.device)
    singular = eigvals[order].clamp_min(0).sqrt()
    return PCAFit(
        mean=mean.to(like.device, torch.float32),
        singular_values=singular.to(like.device, torch.float32),
        components=eigvecs[:, order].to(like.device, torch.float32).contiguous(),
        n=int(n),
    )


@register_hook_kind
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ProjectionHook(FittedHook):
    """``x -> mean + (x - mean) basis basis^T`` at one hook point.

    With ``heads`` (``hook_q``/``hook_k``, ``[batch, pos, head_index, d_head]``): ``mean`` is
    ``[len(heads), d_head]`` and ``basis`` ``[len(heads), d_head, rank]``; other heads pass through.
    With ``heads=None`` (a residual hook, ``[batch, pos, d_model]``): ``mean`` ``[d_model]`` and
    ``basis`` ``[d_model, rank]``.
    """

    causal: ClassVar[bool] = True  # position by position (FittedHook.causal)

    hook_name: str
    heads: tuple[int, ...] | None
    mean: Tensor = dataclasses.field(repr=False)
    basis: Tensor = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        # x -> x P + (mu - mu P) with P = V V^T: one product per call whatever the rank (derived
        # from the fields, so kept out of them and out of the saved file).
        proj = self.basis @ self.basis.transpose(-1, -2)  # [heads d d] or [d d]
        offset = self.mean - (self.mean.unsqueeze(-2) @ proj).squeeze(-2)  # [heads d] or [d]
        object.__setattr__(self, "_proj", proj)
        object.__setattr__(self, "_offset", offset)

    @property
    def width(self) -> int:
        return int(self.mean.shape[-1])

    def __call__(self, activation: Tensor, hook: Any = None) -> Tensor:
        proj = self._proj.to(device=activation.device, dtype=activation.dtype)
        offset = self._offset.to(device=activation.device, dtype=activation.dtype)
        if self.heads is None:
            return activation @ proj + offset
        rows = head_rows(self.heads, activation.shape[2])
        new = torch.einsum("bphd,hde->bphe", activation[:, :, rows], proj) + offset
        return replace_heads(activation, rows, new, axis=2)

    def signal_sites(self) -> list[tuple[str, Any]]:
        """``offspace_<site>`` (``offspace_q``, ``offspace_k``, ``offspace_resid``): the share of the
        centred activation outside the kept subspace,

            s(x) = |(x - mean)(I - V V^T)| / |x - mean|   in [0, 1],

        the largest over the targeted heads; 0 at full rank (the projection keeps everything)."""
        return [(self.hook_name, self.offspace)]

    def offspace(self, activation: Tensor) -> dict[str, Tensor]:
        proj = self._proj.to(device=activation.device, dtype=activation.dtype)
        mean = self.mean.to(device=activation.device, dtype=activation.dtype)
        name = f"offspace_{signal_site(self.hook_name)}"
        if self.heads is None:
            centred = activation - mean  # [batch pos d_model]
            return {name: off_share(centred, centred @ proj)}
        centred = activation[:, :, head_rows(self.heads, activation.shape[2])] - mean  # [batch pos heads d_head]
        share = off_share(centred, torch.einsum("bphd,hde->bphe", centred, proj))  # [batch pos heads]
        return {name: share.amax(-1)}


@dataclasses.dataclass(frozen=True)
class SVD(SimplifierConfig):
    """Queries/keys projected onto their top-``rank`` principal directions, per head.

    Maths in the module docstring. Attributes:
        rank: directions kept, 1..d_head.
        centered: subtract the fitted mean first (PCA); ``False`` projects through the origin.
        basis: ``separate`` (queries and keys each their own) or ``joint`` (one per head on both).
        targets: layers, heads and which of q/k are replaced.
    """

    name: ClassVar[str] = "svd"
    data_free: ClassVar[bool] = False
    sweep_param: ClassVar[str] = "rank"
    sweep_limit: ClassVar[str] = "d_head"
    target_keys: ClassVar[tuple[str, ...]] = ("layers", "heads", "qk")

    rank: int = 4
    centered: bool = True
    basis: str = "separate"
    targets: Targets = Targets()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.rank, "rank")
        if self.basis not in BASES:
            raise IllusionsError(f"basis must be one of {', '.join(BASES)}, got {self.basis!r}")

    def _check_rank(self, model: LensModel, ranks: list[int]) -> None:
        for rank in ranks:
            check_positive(rank, "rank", model.cfg.d_head)

    def hook_names(self, model: LensModel) -> list[str]:
        self._check_rank(model, [self.rank])
        targets = self.targets.resolve(model)
        sides = ("q", "k") if self.basis == "joint" else targets.qk
        return [qk_hook_name(layer, side) for layer in targets.layers for side in sides]

    def fit(self, model: LensModel, activations: dict[str, Tensor]) -> Proxy:
        return self.fit_sweep(model, activations, [self.rank])[self.rank]

    def fit_sweep(
        self, model: LensModel, activations: dict[str, Tensor], ranks: list[int]
    ) -> dict[int, Proxy]:
        """One proxy per rank from a single decomposition per head (for sweeps).

        Args:
            model: the model the activations came from.
            activations: ``collect(model, tokens, self.hook_names(model), mask)``.
            ranks: ranks to build, each in 1..d_head.

        Returns:
            ``{rank: proxy}``; each proxy equals ``self.replace(rank=rank).fit(...)``.
        """
        ranks = list(dict.fromkeys(ranks))
        self._check_rank(model, ranks)
        targets = self.targets.resolve(model)
        fits: dict[tuple[str, int], PCAFit] = {}
        for layer in targets.layers:
            for head in targets.heads:
                if self.basis == "joint":
                    q = require(activations, qk_hook_name(layer, "q"), self.name)[:, head]
                    k = require(activations, qk_hook_name(layer, "k"), self.name)[:, head]
                    joint = pca(torch.cat([q, k]), centered=self.centered)  # [2n, d_head]
                    for side in targets.qk:
                        fits[(qk_hook_name(layer, side), head)] = joint
                else:
                    for side in targets.qk:
                        name = qk_hook_name(layer, side)
                        fits[(name, head)] = pca(require(activations, name, self.name)[:, head],
                                                 centered=self.centered)
        return self._proxies(model, fits, ranks)

    def stream(self, model: LensModel) -> SVDStream:
        """A :class:`SVDStream` that fits this simplifier from activations given batch by batch."""
        return SVDStream(self, model)

    def _proxies(self, model: LensModel, fits: dict[tuple[str, int], PCAFit], ranks: list[int]) -> dict[int, Proxy]:
        """``{rank: proxy}`` from the decomposition of each (hook, head)."""
        targets = self.targets.resolve(model)
        names = [qk_hook_name(layer, side) for layer in targets.layers for side in targets.qk]
        heads = [(layer, head) for layer in targets.layers for head in targets.heads]
        out = {}
        for rank in ranks:
            hooks = []
            explained = {}
            for name in names:
                per_head = [fits[(name, head)] for head in targets.heads]
                hooks.append(ProjectionHook(
                    hook_name=name,
                    heads=targets.heads,
                    mean=torch.stack([f.mean for f in per_head]),  # [heads d_head]
                    basis=torch.stack([f.basis(rank) for f in per_head]).contiguous(),  # [heads d_head rank]
                ))
                explained[name] = [f.explained(rank) for f in per_head]
            config = self.replace(rank=rank)
            out[rank] = Proxy(
                simplifier=self.name,
                sweep_param=self.sweep_param,
                params=config.resolved_params(targets),
                hooks=tuple(hooks),
                attention_heads=tuple(heads),
                info={"n_fitted": fits[(names[0], targets.heads[0])].n, "explained_variance": explained},
            )
        return out


class SVDStream:
    """:meth:`SVD.fit_sweep` from activations given batch by batch (:meth:`add`, each batch in
    ``collect``'s layout), holding one :class:`ScatterStats` per head and hook instead of the
    activations; :meth:`fit_sweep` then decomposes. Equal to the held fit up to float64 rounding."""

    def __init__(self, config: SVD, model: LensModel) -> None:
        self.config = config
        self.model = model
        targets = config.targets.resolve(model)
        self.keys = [(layer, head, side) for layer in targets.layers for head in targets.heads
                     for side in (("joint",) if config.basis == "joint" else targets.qk)]
        self.stats = {key: ScatterStats(centered=config.centered) for key in self.keys}

    def add(self, activations: dict[str, Tensor]) -> None:
        for layer, head, side in self.keys:
            if side == "joint":  # queries then keys of the batch, as the held fit stacks them
                for part in ("q", "k"):
                    self.stats[(layer, head, side)].add(
                        require(activations, qk_hook_name(layer, part), self.config.name)[:, head])
            else:
                self.stats[(layer, head, side)].add(
                    require(activations, qk_hook_name(layer, side), self.config.name)[:, head])

    def fit_sweep(self, ranks: list[int]) -> dict[int, Proxy]:
        ranks = list(dict.fromkeys(ranks))
        self.config._check_rank(self.model, ranks)
        targets = self.config.targets.resolve(self.model)
        fits: dict[tuple[str, int], PCAFit] = {}
        for layer, head, side in self.keys:
            fit = self.stats[(layer, head, side)].fit()
            for s in (targets.qk if side == "joint" else (side,)):
                fits[(qk_hook_name(layer, s), head)] = fit
        return self.config._proxies(self.model, fits, ranks)
