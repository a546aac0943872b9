"""Queries and keys of the simplified heads in two dimensions, in and out of distribution.

For each simplified head the principal plane is fitted on *all* non-PAD query (key) vectors of the
in-distribution sequences, i.e. the data a simplifier is fitted on; the points drawn are the queries
at scored positions (coloured by the ``depth`` column) and the keys at the attended position
``key_pos`` (coloured by ``key_depth``), from the fitting split and from one out-of-distribution
split, projected on that plane. Tasks without those columns fall back to positions (and say so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from illusions.reports.plots import ScatterPanel

if TYPE_CHECKING:
    from illusions.backends import LensModel
    from illusions.tasks.base import Split


def _principal_plane(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean ``[d]``, top-2 directions ``[d, 2]`` (largest loading made positive) and their variance share."""
    mean = x.mean(axis=0)
    centred = x - mean  # [n, d]
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2].T.copy()  # [d, 2]
    if comps.shape[1] < 2:
        comps = np.pad(comps, ((0, 0), (0, 2 - comps.shape[1])))
    # Singular vectors are defined up to sign; fix it so reruns draw the same picture.
    for j in range(comps.shape[1]):
        if comps[np.argmax(np.abs(comps[:, j])), j] < 0:
            comps[:, j] *= -1
    power = s.astype(np.float64) ** 2
    explained = float(power[:2].sum() / power.sum()) if power.sum() > 0 else 1.0
    return mean, comps, explained


def _points(split: Split, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(seq, pos, colour, colour label)`` of the query or key points of a split's scored positions."""
    sc = split.scored
    if side == "q":
        if "depth" in sc.meta:
            return sc.seq, sc.pos, np.asarray(sc.meta["depth"]), "depth (query)"
        return sc.seq, sc.pos, sc.pos, "query position"
    if "key_pos" not in sc.meta:
        return sc.seq, sc.pos, sc.pos, "position"
    key_pos = np.asarray(sc.meta["key_pos"])
    color_col = sc.meta.get("key_depth")
    pairs, first = np.unique(np.stack([sc.seq, key_pos], axis=1), axis=0, return_index=True)
    if color_col is None:
        return pairs[:, 0], pairs[:, 1], pairs[:, 1], "key position"
    return pairs[:, 0], pairs[:, 1], np.asarray(color_col)[first], "key depth"


def _subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= limit else np.sort(rng.choice(n, size=limit, replace=False))


def qk_panels(
    model: LensModel,
    fit: Split,
    ood: Split,
    heads: Sequence[tuple[int, int]],
    *,
    max_points: int = 200,
    seed: int = 0,
    batch_size: int = 64,
) -> list[ScatterPanel]:
    """Two scatter panels (queries, keys) per head: in-distribution and OOD points on the fit plane.

    Args:
        model: the original model.
        fit: the in-distribution sequences (already cut to the few hundred to use).
        ood: the out-of-distribution sequences (likewise).
        heads: ``(layer, head)`` pairs to draw.
        max_points: points drawn per head, side and split (subsampled with ``seed``).
        seed: seeds the subsampling.
        batch_size: sequences per forward pass while collecting.

    Returns:
        ``[q panel, k panel]`` for each head, in order.
    """
    from illusions.activations import collect

    layers = sorted({layer for layer, _ in heads})
    names = [f"blocks.{layer}.attn.hook_{side}" for layer in layers for side in ("q", "k")]
    acts: dict[str, dict[str, np.ndarray]] = {}
    offsets: dict[str, np.ndarray] = {}
    for tag, split in (("id", fit), ("ood", ood)):
        got = collect(model, split.tokens, names, split.lengths, batch_size=batch_size, max_positions=4096)
        # collect flattens kept positions row-major: sequence b's position p sits at offset[b] + p.
        acts[tag] = {k: v.float().cpu().numpy() for k, v in got.items()}  # [n, head_index, d_head]
        offsets[tag] = np.concatenate([[0], np.cumsum(split.lengths)[:-1]]).astype(np.int64)

    panels = []
    for layer, head in heads:
        for side, noun in (("q", "queries"), ("k", "keys")):
            name = f"blocks.{layer}.attn.hook_{side}"
            mean, comps, explained = _principal_plane(acts["id"][name][:, head].astype(np.float64))
            xy_parts, color_parts, in_parts = [], [], []
            label = ""
            for tag, split in (("id", fit), ("ood", ood)):
                seq, pos, color, label = _points(split, side)
                rng = np.random.default_rng([seed, layer, head, side == "k", tag == "ood"])
                keep = _subsample(seq.shape[0], max_points, rng)
                vectors = acts[tag][name][offsets[tag][seq[keep]] + pos[keep], head]  # [m, d_head]
                xy_parts.append((vectors.astype(np.float64) - mean) @ comps)  # [m, 2]
                color_parts.append(np.asarray(color[keep], dtype=np.float64))
                in_parts.append(np.full(keep.shape[0], tag == "id"))
            panels.append(ScatterPanel(
                title=f"L{layer}H{head} {noun}",
                xy=np.concatenate(xy_parts),
                color=np.concatenate(color_parts),
                color_label=label,
                in_dist=np.concatenate(in_parts),
                explained=explained,
            ))
    return panels


def sample_rows(split: Split, rows: np.ndarray, n: int) -> Split:
    """The first ``n`` of ``rows`` (already a seeded draw) as a split of their own."""
    return split.rows(np.asarray(rows[:n], dtype=np.int64))


def pick_ood_split(agreement: dict[str, float], reference: str = "iid") -> str | None:
    """The evaluated split other than ``reference`` where the proxy agrees least (first on ties)."""
    candidates = [(v, i, s) for i, (s, v) in enumerate(agreement.items()) if s != reference]
    if not candidates:
        return next(iter(agreement), None)
    return min(candidates, key=lambda t: (t[0] if np.isfinite(t[0]) else np.inf, t[1]))[2]
