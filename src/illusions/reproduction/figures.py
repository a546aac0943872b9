"""The document's figures (PNG, written next to it): each recipe's sweep, its agreement by key depth,
the per-head bars and the figures over training steps, every point a mean over training seeds with
its 95% across-seed interval."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from illusions.reproduction.aggregate import RecipeRuns, SeedStat, Training, has_sparse, ood_splits
from illusions.reproduction.metrics import SWEEP_FIGURE_METRICS


def _yerr(stats: Sequence[SeedStat]) -> np.ndarray:
    """``[2, n]`` asymmetric error bars of clipped across-seed intervals."""
    return np.array([s.errors() for s in stats], dtype=np.float64).T.reshape(2, len(stats))


def _relative(path: Path, relative_to: Path) -> str:
    return Path(path).resolve().relative_to(Path(relative_to).resolve()).as_posix()


def write_training_figures(training: dict[str, Training], folder: Path, *, relative_to: Path,
                           stem_prefix: str = "") -> dict[str, str]:
    """The figure over training steps of each analysis over checkpoints (the one its report shows),
    keyed ``training:<recipe>``."""
    from illusions.io import atomic_write_bytes
    from illusions.reports.checkpoints import checkpoint_figure

    out = {}
    for name, t in training.items():
        path = Path(folder) / f"{stem_prefix}{name}.png"
        atomic_write_bytes(path, checkpoint_figure(t.sweep).png)
        out[f"training:{name}"] = _relative(path, relative_to)
    return out


def write_figures(runs: dict[str, RecipeRuns], folder: Path, *, relative_to: Path,
                  stem_prefix: str = "") -> dict[str, str]:
    """Draw the sweep, key-depth and per-head figures into ``folder``; keys -> paths relative to
    ``relative_to`` (the document's folder). ``stem_prefix`` starts each file name (another family's
    figures: ``dyck-paperlike-``); the keys stay the same."""
    from illusions.io import atomic_write_bytes

    folder = Path(folder)
    out: dict[str, str] = {}

    def save(fig: Any, key: str, stem: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        path = folder / f"{stem_prefix}{stem}.png"
        atomic_write_bytes(path, buf.getvalue())
        out[key] = _relative(path, relative_to)

    for name, r in runs.items():
        if len(r.proxies()) > 1 and not r.recipe.spec.per_head:
            save(sweep_figure(name, r), f"sweep:{name}", name)
        if r.recipe.spec.task == "dyck" and not r.recipe.spec.per_head and any(
                r.groups(r.selected(), s, "key_depth") for s in r.splits()):
            save(key_depth_figure(name, r), f"depth:{name}", f"{name}-key-depth")
        if r.recipe.spec.per_head:
            save(heads_figure(name, r), f"heads:{name}", name)
    return out


def sweep_figure(name: str, r: RecipeRuns) -> Any:
    """Agreement, attention JSD (where a head changes directly) and, for sparse dictionaries, explained
    variance over the swept parameter, a line per split."""
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no backend switch

    proxies, splits = r.proxies(), r.splits()
    x = [r.param_of(p) for p in proxies]
    metrics = ("agreement", "attention_jsd") + (("explained_variance",) if has_sparse(r) else ())
    if not any(r.stat(p, s, "attention_jsd").values for p in proxies for s in splits):
        metrics = tuple(m for m in metrics if m != "attention_jsd")  # no head changes directly
    labels = tuple(SWEEP_FIGURE_METRICS[m] for m in metrics)
    fig = Figure(figsize=(5 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for split in splits:
        for ax, metric in zip(axes, metrics, strict=True):
            stats = [r.stat(p, split, metric) for p in proxies]
            ax.errorbar(x, [s.mean for s in stats], yerr=_yerr(stats),
                        marker="o", ms=3, capsize=2, label=split)
    for ax, label in zip(axes, labels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(r.param_name())
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: mean over {len(r.seeds)} training seeds, 95% across-seed intervals", fontsize=9)
    return fig


def key_depth_figure(name: str, r: RecipeRuns) -> Any:
    """Agreement by key depth at the reported proxy, a line per split, the training depth marked."""
    from matplotlib.figure import Figure

    proxy = r.selected()
    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    for split in r.splits():
        groups = sorted(int(g) for g in r.groups(proxy, split, "key_depth") if g.lstrip("-").isdigit())
        stats = [r.stat(proxy, split, "agreement", group_by="key_depth", group=str(g)) for g in groups]
        ax.errorbar(groups, [s.mean for s in stats], yerr=_yerr(stats),
                    marker="o", ms=3, capsize=2, label=split)
    max_depth = r.task_config.get("max_depth")
    if isinstance(max_depth, int):
        ax.axvline(max_depth + 0.5, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("key depth (depth of the attended opener)"
                  + (f"; training max {max_depth}" if isinstance(max_depth, int) else ""))
    ax.set_ylabel("agreement")
    ax.set_title(f"{name} at {proxy}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def heads_figure(name: str, r: RecipeRuns) -> Any:
    """Per head: the accuracy change's gap vs length-matched iid on each out-of-distribution split."""
    from matplotlib.figure import Figure

    proxies = r.proxies()
    ood = ood_splits(r)
    fig = Figure(figsize=(max(6, 0.9 * len(proxies)), 3.4))
    ax = fig.subplots()
    width = 0.8 / max(len(ood), 1)
    for i, split in enumerate(ood):
        stats = [r.stat(p, split, "accuracy_change", "gap_vs_matched") for p in proxies]
        pos = np.arange(len(proxies)) + (i - (len(ood) - 1) / 2) * width
        ax.bar(pos, [s.mean for s in stats], width, yerr=_yerr(stats),
               capsize=2, label=split)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(np.arange(len(proxies)), [p.split("@")[-1] for p in proxies], fontsize=7)
    ax.set_ylabel("Δ(proxy − original acc)\nvs length-matched iid")
    ax.set_title(f"{name}: below 0 under-states, above 0 over-states generalization", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return fig
