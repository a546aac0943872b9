"""Where queries and keys sit relative to what the proxy keeps, on the fitting data and on every split.

The paper's point is that out-of-distribution queries and keys leave the subspace (or the clusters)
fitted on training data. For each vector-replacing hook of the proxy (``svd``, ``resid-svd``:
a projection; ``weight-svd``: a linear map; ``kmeans``, ``resid-kmeans``: the nearest centroid) and
each simplified head, every drawn vector ``x`` gets three numbers:

    kept 1, kept 2   coordinates of the proxy's output ``h(x)`` on the top two principal directions
                     of the proxy's outputs on the fitting data (for a projection: its kept subspace;
                     for k-means: the plane of its centroids)
    removed          |x - h(x)|, what the proxy throws away: the off-subspace residual norm of a
                     projection, the distance to the nearest centroid for k-means

Points are queries at scored positions and keys at the attended position (``key_pos``) for query/key
hooks, the residual stream at scored positions for residual hooks, each coloured by split; the fitting
data (grey) comes first. Per panel and split the median ``removed`` norm is reported, and its ratio to
the fitting data's. Hooks that replace no vector (one-hot patterns, sparse dictionaries, which have
their own section) give no panel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from illusions.backends import LensModel
    from illusions.tasks.base import Split

# Hook classes with a geometry, and what their ``removed`` norm is called.
_KINDS = {"ProjectionHook": "subspace", "LinearMapHook": "subspace", "CentroidHook": "centroid"}
# Panels drawn at most (heads x sides), and points per panel and split.
MAX_PANELS = 8
MAX_POINTS = 250
# A group's drawn sequences stop once they hold this many scored positions (at least twice the points
# drawn): the forward passes collecting their vectors are most of this section's time, and a longer
# split (unseen_depth: ~12 scored positions per sequence) reaches it in a fifth of the sequences.
ENOUGH_POSITIONS = 2 * MAX_POINTS
# The head word of a panel's sampling seed for a hook on whole vectors (resid-svd, resid-kmeans): numpy's
# SeedSequence takes non-negative words only, and no head index reaches this one.
_NO_HEAD = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class GeometryPanel:
    """One head and side (or one residual hook), every split's points.

    Attributes:
        title: e.g. ``L1H0 keys``.
        kind: ``subspace`` or ``centroid``.
        points: split -> ``[[kept1, kept2, removed, row, pos, colour], ...]`` (rounded).
        colour_label: the meta column in ``colour`` (depth, key depth or position).
        median_removed: split -> median ``removed`` norm over the split's drawn points.
        explained: share of the fitting vectors' variance about their mean the two drawn directions
            carry after the proxy (NaN when undefined).
    """

    title: str
    kind: str
    points: dict[str, list[list[float]]]
    colour_label: str
    median_removed: dict[str, float]
    explained: float


def supported(proxy: Any) -> bool:
    """Whether the proxy has a hook this module can draw."""
    return any(type(h).__name__ in _KINDS for h in proxy.hooks)


def _points(split: Split, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(seq, pos, colour, colour label)`` of the query (or residual) or key points of a split."""
    sc = split.scored
    if side != "k":
        if "depth" in sc.meta:
            return sc.seq, sc.pos, np.asarray(sc.meta["depth"]), "depth"
        return sc.seq, sc.pos, sc.pos, "position"
    if "key_pos" not in sc.meta:
        return sc.seq, sc.pos, sc.pos, "position"
    key_pos = np.asarray(sc.meta["key_pos"])
    pairs, first = np.unique(np.stack([sc.seq, key_pos], axis=1), axis=0, return_index=True)
    if "key_depth" not in sc.meta:
        return pairs[:, 0], pairs[:, 1], pairs[:, 1], "key position"
    return pairs[:, 0], pairs[:, 1], np.asarray(sc.meta["key_depth"])[first], "key depth"


def _plane(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean ``[d]`` and top-2 principal directions ``[d, 2]`` (sign fixed) of ``y``, their variance share."""
    mean = y.mean(axis=0)
    _, s, vt = np.linalg.svd(y - mean, full_matrices=False)
    comps = vt[:2].T.copy()
    if comps.shape[1] < 2:
        comps = np.pad(comps, ((0, 0), (0, 2 - comps.shape[1])))
    for j in range(2):  # singular vectors are defined up to sign; reruns draw the same picture
        if comps[np.argmax(np.abs(comps[:, j])), j] < 0:
            comps[:, j] *= -1
    power = s.astype(np.float64) ** 2
    return mean, comps, float(power[:2].sum() / power.sum()) if power.sum() > 0 else float("nan")


def _apply(hook: Any, x: np.ndarray, head: int | None) -> np.ndarray:
    """``h(x)`` for vectors ``x`` ``[n, d]`` of one head (or a residual hook), float64."""
    import torch

    with torch.inference_mode():
        t = torch.as_tensor(x, dtype=torch.float32)
        if head is None:
            out = hook(t[None])[0]  # [n, d]
        else:
            full = torch.zeros(1, t.shape[0], max(hook.heads) + 1, t.shape[1])  # [1, n, head_index, d]
            full[0, :, head] = t
            out = hook(full)[0, :, head]
    return out.double().cpu().numpy()


def panels(
    model: LensModel,
    proxy: Any,
    fit: Split,
    splits: Mapping[str, Split],
    *,
    fit_name: str = "train",
    row_ids: Mapping[str, np.ndarray] | None = None,
    max_points: int = MAX_POINTS,
    seed: int = 0,
    batch_size: int = 64,
) -> list[GeometryPanel]:
    """The panels of ``proxy`` (see the module docstring), fitting data first, then each split.

    Args:
        model: the original model.
        proxy: the fitted proxy.
        fit: the fitting sequences to draw (already cut to a few hundred).
        splits: split name -> the sequences to draw of it (likewise).
        fit_name: how the fitting data is named in ``points``.
        row_ids: group name -> the original split row of each drawn sequence (default: their index).
        max_points: points per panel and split (subsampled with ``seed``).
        seed: seeds the subsampling.
        batch_size: sequences per forward pass while collecting.
    """
    from illusions.activations import collect

    hooks = [h for h in proxy.hooks if type(h).__name__ in _KINDS]
    if not hooks:
        return []
    names = list(dict.fromkeys(h.hook_name for h in hooks))
    groups = {fit_name: fit, **{k: v for k, v in splits.items() if k != fit_name}}
    acts: dict[str, dict[str, np.ndarray]] = {}
    offsets: dict[str, np.ndarray] = {}
    for tag, split in groups.items():
        got = collect(model, split.tokens, names, split.lengths, batch_size=batch_size, max_positions=4096)
        # collect flattens kept positions row-major: sequence b's position p sits at offset[b] + p.
        acts[tag] = {k: v.float().cpu().numpy() for k, v in got.items()}
        offsets[tag] = np.concatenate([[0], np.cumsum(split.lengths)[:-1]]).astype(np.int64)

    out: list[GeometryPanel] = []
    for hook in hooks:
        side = hook.hook_name.rsplit("_", 1)[-1] if ".attn.hook_" in hook.hook_name else "resid"
        noun = {"q": "queries", "k": "keys"}.get(side, hook.hook_name.rsplit(".", 1)[-1].removeprefix("hook_"))
        heads = list(hook.heads) if getattr(hook, "heads", None) is not None else [None]
        for head in heads:
            if len(out) >= MAX_PANELS:
                return out
            layer = hook.layer
            title = f"L{layer}H{head} {noun}" if head is not None else f"L{layer} {noun}"

            def vectors(tag: str, idx: np.ndarray, name: str = hook.hook_name, h: int | None = head) -> np.ndarray:
                a = acts[tag][name][idx]
                return (a[:, h] if h is not None else a).astype(np.float64)

            fit_all = vectors(fit_name, np.arange(acts[fit_name][hook.hook_name].shape[0]))
            mean, comps, explained = _plane(_apply(hook, fit_all, head))
            points, medians, label = {}, {}, ""
            for tag, split in groups.items():
                seq, pos, colour, label = _points(split, side)
                rng = np.random.default_rng([seed, layer, _NO_HEAD if head is None else head, len(out), len(points)])
                keep = np.arange(seq.shape[0]) if seq.shape[0] <= max_points else np.sort(
                    rng.choice(seq.shape[0], size=max_points, replace=False))
                x = vectors(tag, offsets[tag][seq[keep]] + pos[keep])  # [m, d]
                ids = np.asarray(row_ids[tag])[seq[keep]] if row_ids and tag in row_ids else seq[keep]
                hx = _apply(hook, x, head)
                kept = (hx - mean) @ comps  # [m, 2]
                removed = np.linalg.norm(x - hx, axis=1)  # [m]
                points[tag] = [[round(float(a), 3), round(float(b), 3), round(float(r), 3), int(row), int(p),
                                int(c) if float(c).is_integer() else round(float(c), 3)]
                               for a, b, r, row, p, c in zip(kept[:, 0], kept[:, 1], removed, ids, pos[keep],
                                                             np.asarray(colour)[keep], strict=True)]
                medians[tag] = float(np.median(removed)) if removed.size else float("nan")
            out.append(GeometryPanel(title=title, kind=_KINDS[type(hook).__name__], points=points,
                                     colour_label=label, median_removed=medians, explained=explained))
    return out


def rows_needed(split: Split, enough: int = ENOUGH_POSITIONS) -> int:
    """How many leading rows of ``split`` hold ``enough`` scored positions (all rows if they never do)."""
    per_row = np.bincount(np.asarray(split.scored.seq, dtype=np.int64), minlength=len(split))
    reached = np.flatnonzero(np.cumsum(per_row) >= enough)
    return int(reached[0]) + 1 if reached.size else len(split)


def sample_rows(split: Split, rows: np.ndarray, n: int) -> Split:
    """The first ``n`` of ``rows`` (already a seeded draw) as a split of their own."""
    return split.rows(np.asarray(rows[:n], dtype=np.int64))


def panel_payload(found: Sequence[GeometryPanel], order: Sequence[str]) -> list[dict[str, Any]]:
    """The panels as JSON for the page's scatter script (splits in ``order``)."""
    return [{"title": p.title, "kind": p.kind, "colour": p.colour_label,
             "splits": [s for s in order if s in p.points], "points": [p.points[s] for s in order if s in p.points]}
            for p in found]
