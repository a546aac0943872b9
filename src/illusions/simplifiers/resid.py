"""``resid-svd`` and ``resid-kmeans``: the svd and kmeans maths on a residual-stream hook.

The hook is ``blocks.L.hook_resid_pre``, ``hook_resid_mid`` or ``hook_resid_post`` (``targets.resid``)
of every targeted layer; vectors are whole (``[batch, pos, d_model]``), so ``targets.heads`` and
``targets.qk`` play no part.

    resid-svd:     x -> mu + (x - mu) V_r V_r^T   (V_r: top-r right singular vectors of X - mu)
    resid-kmeans:  x -> c_{j*},  j* = argmin_j |x - c_j|^2

See :mod:`illusions.simplifiers.svd` and :mod:`illusions.simplifiers.kmeans` for the details.
``Proxy.heads`` lists every head of the first attention layer that reads the simplified stream:
layer L for ``resid_pre`` of layer L, layer L+1 for ``resid_mid``/``resid_post`` (none after the
last layer).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from illusions.errors import IllusionsError
from illusions.simplifiers.base import (
    Proxy,
    ResolvedTargets,
    SimplifierConfig,
    Targets,
    check_positive,
    require,
)
from illusions.simplifiers.kmeans import (
    MINIBATCH_ABOVE,
    CentroidHook,
    CentroidsStream,
    Clusters,
    Group,
    check_kmeans_fields,
    fit_groups,
)
from illusions.simplifiers.svd import PCAFit, ProjectionHook, ScatterStats, pca

if TYPE_CHECKING:
    from illusions.backends import LensModel


def resid_hook_names(model: LensModel, targets: ResolvedTargets) -> list[str]:
    """``blocks.L.hook_<resid>`` for each targeted layer, checked against ``model.hook_dict``."""
    names = [f"blocks.{layer}.hook_{targets.resid}" for layer in targets.layers]
    for name in names:
        if name not in model.hook_dict:
            have = sorted({n.split(".", 2)[2] for n in model.hook_dict if n.startswith("blocks.0.hook_resid")})
            valid = ", ".join(h.removeprefix("hook_") for h in have)
            raise IllusionsError(f"this model has no {name} (an attention-only model has no resid_mid); "
                                 f"valid resid values: {valid}")
    return names


def resid_heads(model: LensModel, targets: ResolvedTargets) -> tuple[tuple[int, int], ...]:
    """Heads of the first attention layer reading each simplified stream (see module docstring)."""
    first = {layer if targets.resid == "resid_pre" else layer + 1 for layer in targets.layers}
    return tuple((layer, head) for layer in sorted(first) if layer < model.cfg.n_layers
                 for head in range(model.cfg.n_heads))


def _params(config: SimplifierConfig, targets: ResolvedTargets) -> dict:
    params = config.to_dict()
    params["targets"] = {"layers": list(targets.layers), "resid": targets.resid}
    return params


@dataclasses.dataclass(frozen=True)
class ResidSVD(SimplifierConfig):
    """Residual stream projected onto its top-``rank`` principal directions.

    Attributes:
        rank: directions kept, 1..d_model.
        centered: subtract the fitted mean first (PCA).
        targets: layers and ``resid`` (resid_pre, resid_mid or resid_post).
    """

    name: ClassVar[str] = "resid-svd"
    data_free: ClassVar[bool] = False
    sweep_param: ClassVar[str] = "rank"
    sweep_limit: ClassVar[str] = "d_model"
    target_keys: ClassVar[tuple[str, ...]] = ("layers", "resid")

    rank: int = 4
    centered: bool = True
    targets: Targets = Targets()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.rank, "rank")

    def hook_names(self, model: LensModel) -> list[str]:
        check_positive(self.rank, "rank", model.cfg.d_model)
        return resid_hook_names(model, self.targets.resolve(model))

    def fit(self, model: LensModel, activations: dict[str, Tensor]) -> Proxy:
        return self.fit_sweep(model, activations, [self.rank])[self.rank]

    def fit_sweep(
        self, model: LensModel, activations: dict[str, Tensor], ranks: list[int]
    ) -> dict[int, Proxy]:
        """One proxy per rank from a single decomposition per hook (for sweeps).

        Args:
            model: the model the activations came from.
            activations: ``collect(model, tokens, self.hook_names(model), mask)``.
            ranks: ranks to build, each in 1..d_model.

        Returns:
            ``{rank: proxy}``.
        """
        ranks = list(dict.fromkeys(ranks))
        self._check_ranks(model, ranks)
        names = resid_hook_names(model, self.targets.resolve(model))
        fits: dict[str, PCAFit] = {
            name: pca(require(activations, name, self.name), centered=self.centered) for name in names
        }
        return self._proxies(model, fits, ranks)

    def stream(self, model: LensModel) -> ResidSVDStream:
        """A :class:`ResidSVDStream` that fits this simplifier from activations given batch by batch."""
        return ResidSVDStream(self, model)

    def _check_ranks(self, model: LensModel, ranks: list[int]) -> None:
        for rank in ranks:
            check_positive(rank, "rank", model.cfg.d_model)

    def _proxies(self, model: LensModel, fits: dict[str, PCAFit], ranks: list[int]) -> dict[int, Proxy]:
        """``{rank: proxy}`` from the decomposition at each hook."""
        targets = self.targets.resolve(model)
        names = resid_hook_names(model, targets)
        out = {}
        for rank in ranks:
            hooks = tuple(
                ProjectionHook(hook_name=name, heads=None, mean=fits[name].mean,
                               basis=fits[name].basis(rank).contiguous())
                for name in names
            )
            out[rank] = Proxy(
                simplifier=self.name,
                sweep_param=self.sweep_param,
                params=_params(self.replace(rank=rank), targets),
                hooks=hooks,
                attention_heads=resid_heads(model, targets),
                info={"n_fitted": fits[names[0]].n,
                      "explained_variance": {name: fits[name].explained(rank) for name in names}},
            )
        return out


class ResidSVDStream:
    """:meth:`ResidSVD.fit_sweep` from activations given batch by batch (:meth:`add`, each batch in
    ``collect``'s layout), holding one :class:`~illusions.simplifiers.svd.ScatterStats` (a ``d_model``
    square float64 matrix) per hook instead of the activations; equal to the held fit up to float64
    rounding, as :class:`~illusions.simplifiers.svd.SVDStream`."""

    def __init__(self, config: ResidSVD, model: LensModel) -> None:
        self.config = config
        self.model = model
        self.names = resid_hook_names(model, config.targets.resolve(model))
        self.stats = {name: ScatterStats(centered=config.centered) for name in self.names}

    def add(self, activations: dict[str, Tensor]) -> None:
        for name in self.names:
            self.stats[name].add(require(activations, name, self.config.name))

    def fit_sweep(self, ranks: list[int]) -> dict[int, Proxy]:
        ranks = list(dict.fromkeys(ranks))
        self.config._check_ranks(self.model, ranks)
        return self.config._proxies(self.model, {name: self.stats[name].fit() for name in self.names}, ranks)


@dataclasses.dataclass(frozen=True)
class ResidKMeans(SimplifierConfig):
    """Residual stream replaced by the nearest of ``k`` centroids.

    Attributes:
        k: clusters, 1..(distinct fitted vectors).
        seed, n_init, max_iter, minibatch_above: as for :class:`~illusions.simplifiers.kmeans.KMeans`.
        targets: layers and ``resid``.
    """

    name: ClassVar[str] = "resid-kmeans"
    data_free: ClassVar[bool] = False
    sweep_param: ClassVar[str] = "k"
    target_keys: ClassVar[tuple[str, ...]] = ("layers", "resid")

    k: int = 8
    seed: int = 0
    n_init: int = 1
    max_iter: int = 300
    minibatch_above: int = MINIBATCH_ABOVE
    targets: Targets = Targets()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_kmeans_fields(self)

    def hook_names(self, model: LensModel) -> list[str]:
        return resid_hook_names(model, self.targets.resolve(model))

    def groups(self, model: LensModel) -> list[Group]:
        """Each targeted hook, whole (head None)."""
        return [(name, None) for name in self.hook_names(model)]

    def fit(self, model: LensModel, activations: dict[str, Tensor]) -> Proxy:
        return self._proxy(model, fit_groups(self, activations, self.groups(model)))

    def stream(self, model: LensModel) -> CentroidsStream:
        """A :class:`~illusions.simplifiers.kmeans.CentroidsStream` that fits this simplifier from
        activations given batch by batch."""
        return CentroidsStream(self, model, self.groups(model))

    def _proxy(self, model: LensModel, fits: dict[Group, Clusters]) -> Proxy:
        """The proxy of each hook's centroids and cluster spreads."""
        targets = self.targets.resolve(model)
        hooks = []
        inertia = {}
        fit = None
        for name in resid_hook_names(model, targets):
            clusters = fits[(name, None)]
            fit = clusters.fit
            hooks.append(CentroidHook(hook_name=name, heads=None, centroids=fit.centroids, spread=clusters.spread))
            inertia[name] = fit.inertia
        assert fit is not None
        return Proxy(
            simplifier=self.name,
            sweep_param=self.sweep_param,
            params=_params(self, targets),
            hooks=tuple(hooks),
            attention_heads=resid_heads(model, targets),
            info={"n_fitted": fit.n, "inertia": inertia, "algorithm": fit.algorithm},
        )

