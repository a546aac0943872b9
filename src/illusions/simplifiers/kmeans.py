"""``kmeans``: each query/key replaced by the nearest of k centroids, per head.

For one head with fitted vectors ``X`` (``[n, d_head]``, PAD positions dropped), k-means finds
centroids ``c_1..c_k`` minimising ``sum_i min_j |x_i - c_j|^2``; the hook maps

    x  ->  c_{j*},   j* = argmin_j |x - c_j|^2 = argmin_j (|c_j|^2 - 2 x . c_j)

(the second form drops ``|x|^2``, constant in j, and is one matrix product in torch; ties go to
the lowest centroid index). With at least as many clusters as distinct fitted points every fitted
vector is its own centroid, so the proxy is exact on the fitting data; asking for more clusters than
distinct fitted vectors is an error.

Fitting uses scikit-learn, seeded through ``random_state=seed`` (the same seed for every head),
with ``init="k-means++"``: up to ``minibatch_above`` vectors (default 100,000) ``KMeans`` (Lloyd)
with ``n_init=1`` (k-means++ seeding is already close to a good solution; more restarts multiply
the time, and sweeps over k matter more than restarts), above it ``MiniBatchKMeans`` with batches
of 4,096 vectors, which fits 10^6 vectors of width 32 with k=64 in seconds. Fits too large to hold
stream instead (:class:`CentroidsStream`: one ``partial_fit`` pass seeded on the first 12,288 vectors).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from illusions.errors import IllusionsError
from illusions.simplifiers import streaming
from illusions.simplifiers.base import (
    FittedHook,
    Proxy,
    SimplifierConfig,
    Targets,
    check_positive,
    head_rows,
    qk_hook_name,
    register_hook_kind,
    replace_heads,
    require,
    signal_site,
)

if TYPE_CHECKING:
    from illusions.backends import LensModel

MINIBATCH_ABOVE = 100_000
MINIBATCH_SIZE = 4096


def distinct_rows(x: Float[Tensor, "n d"], enough: int) -> int:
    """The number of distinct rows of ``x``, or a lower bound once it reaches ``enough``.

    A strided subsample is counted first: when it already has ``enough`` distinct rows the full
    sort of ``x`` is skipped (any subset's count is a lower bound of the whole's).
    """
    n = x.shape[0]
    sample = max(16 * enough, 8192)
    if n > sample:
        found = torch.unique(x[:: n // sample], dim=0).shape[0]
        if found >= enough:
            return found
    return torch.unique(x, dim=0).shape[0]


@dataclasses.dataclass(frozen=True)
class CentroidFit:
    """k-means result on ``[n, d]`` data: ``centroids [k, d]`` (float32) and its inertia."""

    centroids: Float[Tensor, "k d"]
    inertia: float
    algorithm: str
    n: int


def fit_centroids(
    x: Float[Tensor, "n d"],
    k: int,
    *,
    seed: int,
    n_init: int = 1,
    max_iter: int = 300,
    minibatch_above: int = MINIBATCH_ABOVE,
    where: str = "the fitted data",
) -> CentroidFit:
    """k-means centroids of ``x`` (maths and algorithm choice in the module docstring).

    Raises:
        IllusionsError: when ``k`` exceeds the number of distinct rows of ``x``.
    """
    import numpy as np
    from sklearn.cluster import KMeans as SkKMeans
    from sklearn.cluster import MiniBatchKMeans

    n = x.shape[0]
    distinct = distinct_rows(x, k)
    if k > distinct:
        raise IllusionsError(
            f"k={k} exceeds the {distinct} distinct vectors fitted at {where}; k must be in 1..{distinct}"
        )
    data = np.ascontiguousarray(x.detach().cpu().float().numpy())
    if n <= minibatch_above:
        algorithm = "kmeans"
        model = SkKMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=max_iter, random_state=seed)
    else:
        algorithm = "minibatch"
        model = MiniBatchKMeans(
            n_clusters=k,
            init="k-means++",
            n_init=n_init,
            batch_size=MINIBATCH_SIZE,
            random_state=seed,
        )
    model.fit(data)
    # On the activations' device (scikit-learn ran on the CPU), so the spread is measured there too.
    centroids = torch.as_tensor(model.cluster_centers_, dtype=torch.float32, device=x.device)
    inertia = float(getattr(model, "inertia_", float("nan")))
    return CentroidFit(centroids=centroids, inertia=inertia, algorithm=algorithm, n=int(n))


def nearest(
    x: Float[Tensor, "h n d"], centroids: Float[Tensor, "h k d"], sq_norms: Float[Tensor, "h k"] | None = None
) -> Float[Tensor, "h n d"]:
    """Each row of ``x`` replaced by its nearest centroid (per leading ``h``; lowest index on ties)."""
    if sq_norms is None:
        sq_norms = (centroids * centroids).sum(-1)
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; the first term is the same for every c.
    scores = torch.baddbmm(sq_norms[:, None, :], x, centroids.transpose(1, 2), alpha=-2)  # [h n k]
    index = scores.argmin(dim=-1)  # [h n]
    return centroids[torch.arange(centroids.shape[0], device=x.device)[:, None], index]


@register_hook_kind
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class CentroidHook(FittedHook):
    """Replace each vector at one hook point by its nearest centroid.

    With ``heads`` (``[batch, pos, head_index, d_head]`` hooks) ``centroids`` is
    ``[len(heads), k, d_head]`` and other heads pass through; with ``heads=None`` (residual hooks,
    ``[batch, pos, d_model]``) it is ``[k, d_model]``.
    """

    causal: ClassVar[bool] = True  # position by position (FittedHook.causal)

    hook_name: str
    heads: tuple[int, ...] | None
    centroids: Tensor = dataclasses.field(repr=False)
    # [heads k] or [k]: each cluster's training spread (:func:`cluster_spread`), for the warning signal;
    # None in proxies saved before it existed (the signal is then the plain distance).
    spread: Tensor | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_sq_norms", (self.centroids * self.centroids).sum(-1))  # [heads k] or [k]

    @property
    def width(self) -> int:
        return int(self.centroids.shape[-1])

    def __call__(self, activation: Tensor, hook: Any = None) -> Tensor:
        centroids = self.centroids.to(device=activation.device, dtype=activation.dtype)
        sq_norms = self._sq_norms.to(device=activation.device, dtype=activation.dtype)
        if self.heads is None:
            flat = activation.reshape(1, -1, activation.shape[-1])  # [1 batch*pos d_model]
            return nearest(flat, centroids[None], sq_norms[None]).reshape(activation.shape)
        rows = head_rows(self.heads, activation.shape[2])
        x = activation[:, :, rows]  # [batch pos heads d_head]
        batch, pos, heads, d = x.shape
        flat = x.permute(2, 0, 1, 3).reshape(heads, batch * pos, d)  # [heads batch*pos d_head]
        new = nearest(flat, centroids, sq_norms).view(heads, batch, pos, d).permute(1, 2, 0, 3)  # [batch pos heads d_head]
        return replace_heads(activation, rows, new, axis=2)

    def signal_sites(self) -> list[tuple[str, Any]]:
        """``centroid_distance_<site>``: the distance to the nearest centroid relative to that
        cluster's training spread,

            s(x) = |x - c_{j*}| / sigma_{j*},   sigma_j = sqrt(mean_{i in cluster j} |x_i - c_j|^2),

        the largest over the targeted heads (about 1 for a typical fitting vector, 0 on a centroid)."""
        return [(self.hook_name, self.distance)]

    def distance(self, activation: Tensor) -> dict[str, Tensor]:
        like = {"device": activation.device, "dtype": activation.dtype}
        centroids = self.centroids.to(**like)
        x = activation if self.heads is None else activation[:, :, head_rows(self.heads, activation.shape[2])]
        if self.heads is None:
            x, centroids = x[:, :, None], centroids[None]  # one "head": [batch pos 1 d], [1 k d]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, without a [batch pos heads k d] difference.
        sq = ((x * x).sum(-1, keepdim=True) - 2 * torch.einsum("bphd,hkd->bphk", x, centroids)
              + (centroids * centroids).sum(-1))  # [batch pos heads k]
        best, index = sq.min(-1)  # [batch pos heads]
        dist = best.clamp_min(0).sqrt()
        if self.spread is not None:
            spread = self.spread.to(**like).reshape(centroids.shape[0], -1)  # [heads k]
            dist = dist / spread[torch.arange(spread.shape[0], device=x.device), index]
        return {f"centroid_distance_{signal_site(self.hook_name)}": dist.amax(-1)}


def nearest_squares(x: Float[Tensor, "n d"], centroids: Float[Tensor, "k d"]) -> tuple[Tensor, Tensor]:
    """``(index, sq)``: each row's nearest centroid and its float64 squared distance to it."""
    index = nearest_index(x, centroids)
    return index, ((x - centroids[index]) ** 2).sum(-1).double()


def cluster_spread(x: Float[Tensor, "n d"], centroids: Float[Tensor, "k d"],
                   nearest: tuple[Tensor, Tensor] | None = None) -> Float[Tensor, " k"]:
    """Each cluster's RMS distance of its fitted vectors to its centroid; a cluster with none (or
    all on its centroid) gets the RMS over all clusters (1 if that is 0 too), so no spread is 0.
    ``nearest``: :func:`nearest_squares` of ``x``, when the caller has it already."""
    index, sq = nearest if nearest is not None else nearest_squares(x, centroids)  # [n], [n]
    k = centroids.shape[0]
    total = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, index, sq)
    count = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, index, torch.ones_like(sq))
    overall = float((sq.mean()).sqrt()) if sq.numel() else 0.0
    spread = (total / count.clamp_min(1)).sqrt()
    return spread.where(spread > 0, torch.tensor(overall or 1.0, dtype=torch.float64)).float()


def nearest_index(x: Float[Tensor, "n d"], centroids: Float[Tensor, "k d"]) -> Tensor:
    """The index of each row's nearest centroid (lowest index on ties), in chunks."""
    sq_norms = (centroids * centroids).sum(-1)
    out = []
    for start in range(0, x.shape[0], 1 << 15):
        chunk = x[start : start + (1 << 15)]
        out.append((sq_norms[None] - 2 * chunk @ centroids.T).argmin(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


# The k-means settings every centroid simplifier (kmeans, resid-kmeans) has, each an integer >= 1.
KMEANS_FIELDS = ("k", "n_init", "max_iter", "minibatch_above")


def check_kmeans_fields(config: Any) -> None:
    """Refuse a centroid simplifier whose :data:`KMEANS_FIELDS` are not integers >= 1, in that order."""
    for name in KMEANS_FIELDS:
        check_positive(getattr(config, name), name)


def centroids_for(config: Any, x: Float[Tensor, "n d"], where: str) -> CentroidFit:
    """:func:`fit_centroids` with a centroid simplifier's settings (``k``, ``seed`` and :data:`KMEANS_FIELDS`)."""
    return fit_centroids(
        x, config.k, seed=config.seed, n_init=config.n_init, max_iter=config.max_iter,
        minibatch_above=config.minibatch_above, where=where,
    )


# A centroid simplifier fits one set of clusters per group: (hook, head), head None for a residual hook.
Group = tuple[str, int | None]


def group_vectors(data: Tensor, head: int | None) -> Tensor:
    """A group's vectors in its hook's ``[n, ...]`` activations: one head's ``[n, d_head]``, or all of a residual's."""
    return data if head is None else data[:, head]


def group_where(name: str, head: int | None) -> str:
    """A group as error messages name it."""
    return name if head is None else f"{name} head {head}"


@dataclasses.dataclass(frozen=True)
class Clusters:
    """One group's fitted clusters: the k-means fit and each cluster's spread (:func:`cluster_spread`)."""

    fit: CentroidFit
    spread: Float[Tensor, " k"]


def held_clusters(config: Any, x: Float[Tensor, "n d"], where: str) -> Clusters:
    """A centroid simplifier's fit of one group's held vectors ``x``, its spread measured on all of them."""
    fit = centroids_for(config, x, where)
    return Clusters(fit, cluster_spread(x, fit.centroids))


def fit_groups(config: Any, activations: dict[str, Tensor], groups: list[Group]) -> dict[Group, Clusters]:
    """:func:`held_clusters` of each group, from ``collect``'s activations at the groups' hooks."""
    return {(name, head): held_clusters(config, group_vectors(require(activations, name, config.name), head),
                                        group_where(name, head))
            for name, head in groups}


@dataclasses.dataclass(frozen=True)
class KMeans(SimplifierConfig):
    """Queries/keys replaced by the nearest of ``k`` centroids, per head.

    Maths and fitting choices in the module docstring. Attributes:
        k: clusters per head and side, 1..(distinct fitted vectors).
        seed: ``random_state`` of scikit-learn.
        n_init: k-means++ restarts (best inertia kept).
        max_iter: Lloyd iterations of the exact algorithm.
        minibatch_above: fitted vectors above which MiniBatchKMeans is used.
        targets: layers, heads and which of q/k are replaced.
    """

    name: ClassVar[str] = "kmeans"
    data_free: ClassVar[bool] = False
    sweep_param: ClassVar[str] = "k"
    target_keys: ClassVar[tuple[str, ...]] = ("layers", "heads", "qk")

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
        targets = self.targets.resolve(model)
        return [qk_hook_name(layer, side) for layer in targets.layers for side in targets.qk]

    def groups(self, model: LensModel) -> list[Group]:
        """Each targeted (hook, head), hook by hook."""
        heads = self.targets.resolve(model).heads
        return [(name, head) for name in self.hook_names(model) for head in heads]

    def fit(self, model: LensModel, activations: dict[str, Tensor]) -> Proxy:
        return self._proxy(model, fit_groups(self, activations, self.groups(model)))

    def stream(self, model: LensModel) -> CentroidsStream:
        """A :class:`CentroidsStream` that fits this simplifier from activations given batch by batch."""
        return CentroidsStream(self, model, self.groups(model))

    def _proxy(self, model: LensModel, fits: dict[Group, Clusters]) -> Proxy:
        """The proxy of each (hook, head)'s centroids and cluster spreads."""
        targets = self.targets.resolve(model)
        hooks = []
        inertia: dict[str, list[float]] = {}
        algorithms = set()
        n_fitted = 0
        for name in self.hook_names(model):
            clusters = [fits[(name, head)] for head in targets.heads]
            fits_here = [c.fit for c in clusters]
            hooks.append(CentroidHook(
                hook_name=name,
                heads=targets.heads,
                centroids=torch.stack([f.centroids for f in fits_here]).contiguous(),  # [heads k d_head]
                spread=torch.stack([c.spread for c in clusters]),  # [heads k]
            ))
            inertia[name] = [f.inertia for f in fits_here]
            algorithms.update(f.algorithm for f in fits_here)
            n_fitted = fits_here[0].n
        return Proxy(
            simplifier=self.name,
            sweep_param=self.sweep_param,
            params=self.resolved_params(targets),
            hooks=tuple(hooks),
            attention_heads=tuple((layer, head) for layer in targets.layers for head in targets.heads),
            info={"n_fitted": n_fitted, "inertia": inertia, "algorithm": sorted(algorithms)},
        )



# A streamed fit (:class:`CentroidsStream`) seeds k-means++ on the first this many vectors (sklearn's
# default init_size for MiniBatchKMeans, 3 batches), and measures spread and inertia on a seeded
# sample of at most STREAM_SAMPLE_ROWS positions.
STREAM_INIT = 3 * MINIBATCH_SIZE
STREAM_SAMPLE_ROWS = 1 << 14


class OnePassKMeans:
    """k-means of the vectors given to :meth:`add` batch by batch, in one pass (rule in
    :class:`CentroidsStream`); holds at most ``max(init_size, MINIBATCH_SIZE)`` vectors beside the
    batch being added."""

    def __init__(self, config: Any, where: str) -> None:
        self.config = config
        self.where = where
        self.init_size = max(STREAM_INIT, 3 * config.k)
        self.pending: list[Any] = []  # float32 numpy arrays not yet fitted, in order
        self.n_pending = 0
        self.n = 0
        self.model: Any = None  # the MiniBatchKMeans, once seeded

    def add(self, x: Float[Tensor, "n d"]) -> None:
        if x.shape[0] == 0:
            return
        self.pending.append(x.detach().to("cpu", torch.float32, copy=True).numpy())  # one copy, not a view of the batch
        self.n_pending += int(x.shape[0])
        self.n += int(x.shape[0])
        self._steps(final=False)

    def _steps(self, *, final: bool) -> None:
        import numpy as np
        from sklearn.cluster import MiniBatchKMeans

        if self.model is None:
            if self.n_pending < self.init_size:
                return
        elif self.n_pending < MINIBATCH_SIZE and not (final and self.n_pending):
            return
        data = np.concatenate(self.pending)
        done = 0  # rows of ``data`` fitted
        if self.model is None:
            first = data[: self.init_size]
            distinct = distinct_rows(torch.from_numpy(first), self.config.k)
            if self.config.k > distinct:
                raise IllusionsError(
                    f"k={self.config.k} exceeds the {distinct} distinct vectors among the first {len(first):,} "
                    f"fitted at {self.where} (a streamed k-means seeds on them); k must be in 1..{distinct}")
            self.model = MiniBatchKMeans(n_clusters=self.config.k, init="k-means++", n_init=1,
                                         batch_size=MINIBATCH_SIZE, random_state=self.config.seed,
                                         compute_labels=False)
            self.model.partial_fit(first)
            done = self.init_size
        rest = len(data) - done
        cut = done + (rest if final else rest - rest % MINIBATCH_SIZE)
        for start in range(done, cut, MINIBATCH_SIZE):
            self.model.partial_fit(data[start : min(start + MINIBATCH_SIZE, cut)])
        self.pending = [data[cut:].copy()]  # not a view keeping ``data`` alive
        self.n_pending = len(data) - cut

    def fit(self, sample: Float[Tensor, "m d"]) -> Clusters:
        """The centroids and each cluster's spread (:func:`cluster_spread`); ``sample`` is a uniform
        sample of the vectors added, on which spread and inertia are measured once streamed."""
        import numpy as np

        if self.model is None:  # never reached init_size: every vector is still here, fit as if held
            x = torch.from_numpy(np.concatenate(self.pending)) if self.pending else torch.zeros(0, 1)
            return held_clusters(self.config, x, self.where)
        self._steps(final=True)
        centroids = torch.as_tensor(self.model.cluster_centers_, dtype=torch.float32)
        x = sample.detach().cpu().float()
        nearest = nearest_squares(x, centroids)
        inertia = float(nearest[1].sum()) * self.n / max(1, int(x.shape[0]))  # the sample's, scaled to every vector
        return Clusters(CentroidFit(centroids=centroids, inertia=inertia, algorithm="minibatch-stream", n=self.n),
                        cluster_spread(x, centroids, nearest))


class CentroidsStream:
    """A centroid simplifier's fit (``kmeans``, ``resid-kmeans``) from activations given batch by
    batch (:meth:`add`, each batch in ``collect``'s layout), in one pass, for fits too large to hold.

    For each (hook, head) (``head`` None for a residual hook): scikit-learn's ``MiniBatchKMeans``
    (``random_state=seed``, batches of :data:`MINIBATCH_SIZE`) is seeded by k-means++ on the first
    ``max(3 x MINIBATCH_SIZE, 3 k)`` vectors it receives, in collection order (the fitting sequences
    shortest first), with one mini-batch step on them; then every following ``MINIBATCH_SIZE``
    vectors make one ``partial_fit`` step, the last (partial) batch one more. One pass, no restarts:
    ``n_init``, ``max_iter`` and ``minibatch_above`` do not apply. Each cluster's spread and the
    inertia (scaled by ``n / m``) are measured at the final centroids on a uniform sample of ``m``
    positions (:class:`~illusions.simplifiers.streaming.Reservoir`, seeded by ``seed``, at most
    :data:`STREAM_SAMPLE_ROWS` positions and :data:`~illusions.simplifiers.streaming.SAMPLE_BYTES`).
    The same batches in the same order give the same centroids. When fewer vectors than the seeding
    sample come, they are all still held and fitted as the held path fits them (the same centroids).
    Memory: the sample, and per (hook, head) at most ``max(init, MINIBATCH_SIZE)`` pending vectors.
    """

    def __init__(self, config: Any, model: LensModel, keys: list[Group]) -> None:
        self.config = config
        self.model = model
        self.keys = keys
        self.names = list(dict.fromkeys(name for name, _ in keys))
        self.fits = {(name, head): OnePassKMeans(config, group_where(name, head)) for name, head in keys}
        self.sample = streaming.Reservoir(streaming.SAMPLE_BYTES, config.seed, max_rows=STREAM_SAMPLE_ROWS)

    def add(self, activations: dict[str, Tensor]) -> None:
        batch = {name: require(activations, name, self.config.name) for name in self.names}
        self.sample.add(batch)
        for name, head in self.keys:
            self.fits[(name, head)].add(group_vectors(batch[name], head))

    def fit_sweep(self, values: list[int]) -> dict[int, Proxy]:
        return streaming.fit_own_value(self.config, values, self.sample, self._fit_sample,
                                       init=self.fits[self.keys[0]].init_size)

    def _fit_sample(self, sample: dict[str, Tensor]) -> Proxy:
        """The proxy of every group's one-pass centroids, spread and inertia measured on ``sample``."""
        fits = {(name, head): self.fits[(name, head)].fit(group_vectors(sample[name], head))
                for name, head in self.keys}
        return self.config._proxy(self.model, fits)
