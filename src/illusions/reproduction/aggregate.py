"""Seed aggregation: the reproduction's run directories read back and combined across training seeds.

Inputs are the runs written by :func:`illusions.reproduction.run.run_all` (``<runs>/<recipe>/seed<N>/``
for a task's reference family, ``<runs>/<recipe>/<family>-seed<N>/`` for another). Each recipe's
metrics are combined across training seeds (:class:`RecipeRuns`): the mean over seeds with a 95%
t-interval (``mean +- t_{0.975, n-1} * sd / sqrt(n)``, :class:`SeedStat`); the within-run bootstrap
intervals decide whether a gap is *significant in a seed* (its 95% interval excludes 0,
:meth:`RecipeRuns.signs`). A sweep is reported at its smallest parameter whose ``iid`` agreement is
at least :data:`FAITHFUL_IID` in every seed (the simplest proxy a researcher would accept), never at a
parameter where the proxy is the model itself (agreement 1 on every split in every seed), or at its
largest other parameter when none qualifies (:meth:`RecipeRuns.selected`); and, so that no single
parameter decides, at matched iid agreement (:meth:`RecipeRuns.at_iid`, :data:`MATCHED_IID`).

A proxy is *gated* (:meth:`RecipeRuns.gated`) when its iid agreement is at least :data:`FAITHFUL_IID`
in every seed: only gated proxies get a direction call. Every out-of-distribution split is judged
whole and on each position group its task declares (:meth:`RecipeRuns.cells`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from illusions.analyses.run import AnalysisRecipe, read_rows
from illusions.analyses.summary import POSITION_GROUP
from illusions.errors import IllusionsError
from illusions.reproduction.metrics import bounds_of

FAITHFUL_IID = 0.95
REFERENCE = "iid"
# The iid agreements at which each sweep's out-of-distribution agreement is read off (interpolated).
MATCHED_IID = (0.95, 0.98, 0.99)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One place a claim is judged: a whole out-of-distribution split or a position group of it."""

    split: str
    group_by: str = "all"
    group: str = "all"

    @property
    def name(self) -> str:
        return self.split if self.group_by == "all" else f"{self.split} ({self.group})"

    @property
    def where(self) -> dict[str, str]:
        return {"group_by": self.group_by, "group": self.group}


@dataclasses.dataclass(frozen=True)
class SeedStat:
    """One quantity over training seeds: the per-seed values, their mean and 95% t-interval."""

    values: tuple[float, ...]
    bounds: tuple[float, float] = (-math.inf, math.inf)  # the quantity's range; intervals are clipped to it

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def half_width(self) -> float:
        if self.n < 2:
            return float("nan")
        from scipy.stats import t as student_t

        t = float(student_t.ppf(0.975, self.n - 1))
        return t * float(np.std(self.values, ddof=1)) / math.sqrt(self.n)

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% t-interval, clipped to the quantity's range (accuracies stay within [0, 1])."""
        lo, hi = self.mean - self.half_width, self.mean + self.half_width
        return max(lo, self.bounds[0]), min(hi, self.bounds[1])

    def errors(self) -> tuple[float, float]:
        """Distances below and above the mean, for error bars (0 with a single seed)."""
        if self.n < 2:
            return 0.0, 0.0
        lo, hi = self.interval
        return self.mean - lo, hi - self.mean

    def fmt(self, digits: int = 3, signed: bool = False) -> str:
        if not self.values:
            return "n/a"
        sign = "+" if signed else ""
        if self.n < 2:
            return f"{self.mean:{sign}.{digits}f}"
        lo, hi = self.interval
        return f"{self.mean:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


@dataclasses.dataclass
class RecipeRuns:
    """The rows of one recipe's runs, by training seed, and the task configuration they ran on."""

    recipe: AnalysisRecipe
    rows: dict[int, list[dict[str, Any]]]
    task_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {
            seed: {(r["proxy"], r["split"], r["group_by"], r["group"], r["metric"]): r for r in rows}
            for seed, rows in self.rows.items()
        }

    @property
    def seeds(self) -> list[int]:
        return sorted(self.rows)

    @property
    def name(self) -> str:
        return self.recipe.name

    def proxies(self) -> list[str]:
        """Proxy labels in run order (sweep order)."""
        first = self.rows[self.seeds[0]]
        return list(dict.fromkeys(r["proxy"] for r in first))

    def param_of(self, proxy: str) -> Any:
        first = self.rows[self.seeds[0]]
        return next(r["param_value"] for r in first if r["proxy"] == proxy)

    def param_name(self) -> str:
        return self.rows[self.seeds[0]][0]["param"]

    def splits(self) -> list[str]:
        """The evaluated splits (those with whole-split rows; warning rows pooled over splits are not one)."""
        first = self.rows[self.seeds[0]]
        return list(dict.fromkeys(r["split"] for r in first if r["group_by"] == "all"))

    def row(self, seed: int, proxy: str, split: str, metric: str, group_by: str = "all",
            group: str = "all") -> dict[str, Any] | None:
        return self._index[seed].get((proxy, split, group_by, group, metric))

    def stat(self, proxy: str, split: str, metric: str, field: str = "value", group_by: str = "all",
             group: str = "all") -> SeedStat:
        values = []
        for seed in self.seeds:
            r = self.row(seed, proxy, split, metric, group_by, group)
            if r is not None and np.isfinite(r[field]):
                values.append(float(r[field]))
        return SeedStat(tuple(values), bounds_of(metric, field))

    def signs(self, proxy: str, split: str, metric: str, gap: str, group_by: str = "all",
              group: str = "all") -> list[int]:
        """Per seed: -1 / +1 when the gap's bootstrap interval lies below / above 0, else 0."""
        out = []
        for seed in self.seeds:
            r = self.row(seed, proxy, split, metric, group_by, group)
            lo, hi = (r[f"{gap}_low"], r[f"{gap}_high"]) if r is not None else (float("nan"),) * 2
            out.append(-1 if hi < 0 else 1 if lo > 0 else 0)
        return out

    def groups(self, proxy: str, split: str, group_by: str) -> list[str]:
        first = self.rows[self.seeds[0]]
        return list(dict.fromkeys(r["group"] for r in first
                                  if r["proxy"] == proxy and r["split"] == split and r["group_by"] == group_by))

    def cells(self, proxy: str) -> list[Cell]:
        """The out-of-distribution splits, each followed by its declared position groups."""
        out = []
        for split in ood_splits(self):
            out.append(Cell(split))
            out += [Cell(split, POSITION_GROUP, g) for g in self.groups(proxy, split, POSITION_GROUP)]
        return out

    def gated(self, proxy: str) -> bool:
        """Iid agreement at least FAITHFUL_IID in every seed: a faithful proxy in distribution."""
        values = [self.row(s, proxy, REFERENCE, "agreement") for s in self.seeds]
        return bool(values) and all(r is not None and r["value"] >= FAITHFUL_IID for r in values)

    def is_model(self, proxy: str) -> bool:
        """Agreement 1 on every split in every seed: at full capacity the proxy is the model itself."""
        rows = [self.row(s, proxy, split, "agreement") for s in self.seeds for split in self.splits()]
        return all(r is not None and r["value"] == 1.0 for r in rows)

    def has_control(self) -> bool:
        """The runs carry the strict matched control (the recipe's ``match``), ``gap_vs_control``."""
        return any("gap_vs_control" in r for r in self.rows[self.seeds[0]])

    def selected(self) -> str:
        """The sweep's reported proxy: the smallest parameter with iid agreement >= FAITHFUL_IID in every
        seed that is not the model itself, else the largest that is not."""
        proxies = [p for p in self.proxies() if not self.is_model(p)] or self.proxies()
        for proxy in proxies:
            if self.gated(proxy):
                return proxy
        return proxies[-1]

    def at_iid(self, level: float, cell: Cell, metric: str = "agreement") -> SeedStat:
        """Per seed, ``metric`` on ``cell`` where the sweep's iid agreement first reaches ``level``,
        interpolated linearly between the two parameters around it; seeds whose sweep starts above
        ``level`` or never reaches it are left out."""
        values = []
        for seed in self.seeds:
            pairs = [(self.row(seed, p, REFERENCE, "agreement"), self.row(seed, p, cell.split, metric, **cell.where))
                     for p in self.proxies()]
            pts = [(a["value"], b["value"]) for a, b in pairs
                   if a is not None and b is not None and np.isfinite(a["value"]) and np.isfinite(b["value"])]
            for (x0, y0), (x1, y1) in itertools.pairwise(pts):
                if x0 < level <= x1:
                    values.append(y0 + (y1 - y0) * (level - x0) / (x1 - x0))
                    break
        return SeedStat(tuple(values), bounds_of(metric))



def load_runs(recipes: Sequence[AnalysisRecipe], runs_dir: Path, family: str | None = None) -> dict[str, RecipeRuns]:
    """Every recipe with at least one finished run under ``runs_dir``: the runs of its task's reference
    family (``<recipe>/seed<N>/``), or with ``family`` another bundled family's
    (``<recipe>/<family>-seed<N>/``, the layout of :func:`illusions.reproduction.plan.run_folder`)."""
    out = {}
    for recipe in recipes:
        found = _run_dirs(runs_dir, recipe, family, "metrics.csv")
        if found:
            rows = {seed: read_rows(run_dir) for seed, run_dir in found}
            out[recipe.name] = RecipeRuns(recipe, rows, _task_config(found[0][1]))
    return out


def _run_dirs(runs_dir: Path, recipe: AnalysisRecipe, family: str | None, marker: str) -> list[tuple[int, Path]]:
    """``(seed, folder)`` of a recipe's finished runs (those holding ``marker``) for the reference family
    (``seed<N>``) or ``family`` (``<family>-seed<N>``), by seed."""
    folder = Path(runs_dir) / recipe.name
    prefix = "seed" if family in (None, recipe.spec.task) else f"{family}-seed"
    found = []
    for run_dir in folder.glob(f"{prefix}*") if folder.is_dir() else []:
        suffix = run_dir.name.removeprefix(prefix)
        if suffix.isdigit() and (run_dir / marker).is_file():
            found.append((int(suffix), run_dir))
    return sorted(found)


@dataclasses.dataclass(frozen=True)
class Training:
    """An ``over_training`` recipe's analysis over one training run's step checkpoints."""

    recipe: AnalysisRecipe
    seed: int
    sweep: Any  # illusions.analyses.checkpoints.CheckpointSweep
    # Each step checkpoint's own run rows (length-matched and strict gaps), keyed by step as seeds are
    # elsewhere: ``per_step.row(step, ...)``; None when the step runs cannot be read.
    per_step: RecipeRuns | None = None

    @property
    def name(self) -> str:
        return self.recipe.name


def load_training(recipes: Sequence[AnalysisRecipe], runs_dir: Path, family: str | None = None) -> dict[str, Training]:
    """The finished analyses over checkpoints of the ``over_training`` recipes (the lowest seed's when
    several were run), for the reference family or ``family``."""
    from illusions.analyses.checkpoints import SUMMARY_CSV, read_sweep

    out = {}
    for recipe in recipes:
        found = _run_dirs(runs_dir, recipe, family, SUMMARY_CSV) if recipe.over_training else []
        if found:
            seed, run_dir = found[0]
            sweep = read_sweep(run_dir)
            try:
                per_step = RecipeRuns(recipe, {step: read_rows(run_dir / f"step{step}") for step in sweep.steps})
            except IllusionsError:
                per_step = None
            out[recipe.name] = Training(recipe, seed, sweep, per_step)
    return out


def _task_config(run_dir: Path) -> dict[str, Any]:
    """The task configuration a run recorded in its ``config.json`` (empty when unreadable)."""
    import json

    try:
        config = json.loads((run_dir / "config.json").read_text())["task"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return config if isinstance(config, dict) else {}


def ood_splits(runs: RecipeRuns) -> list[str]:
    return [s for s in runs.splits() if s != REFERENCE]


def has_sparse(runs: RecipeRuns) -> bool:
    """The recipe's proxies are sparse dictionaries (their rows carry reconstruction metrics)."""
    first = runs.proxies()[0]
    return runs.row(runs.seeds[0], first, REFERENCE, "explained_variance") is not None


def param_text(runs: RecipeRuns, proxy: str) -> str:
    name, value = runs.param_name(), runs.param_of(proxy)
    return f"{name} {value}" if name else "no parameter"


def n_positions(runs: RecipeRuns, proxy: str, split: str, group_by: str = "all", group: str = "all") -> str:
    """The scored positions of a split (or group) at ``proxy``: one number, or ``min-max`` over seeds."""
    values = [runs.row(s, proxy, split, "agreement", group_by, group) for s in runs.seeds]
    values = [int(r["n_positions"]) for r in values if r is not None]
    return str(values[0]) if len(set(values)) == 1 else f"{min(values)}-{max(values)}"
