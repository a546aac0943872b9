"""The engine: fit, evaluate and summarise, one function for every caller.

:func:`measure` is what ``illusions analyze`` / ``sweep`` (through
:func:`illusions.analyses.run.run_analysis`, which builds the model, task and simplifiers from a spec),
the reproduction (which runs those specs) and the Python API (:func:`illusions.evaluate`, which
builds them from objects in memory) all call, so there is one path from proxies and splits to the
tidy rows of ``metrics.csv``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from illusions.analyses.faithfulness import AnalysisResult, Progress, analyze
from illusions.analyses.spec import BREAKDOWNS
from illusions.analyses.summary import DEFAULT_MATCH, DISCRETE, summarize

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from illusions.tasks.base import PositionGroup, Split


@dataclasses.dataclass
class Measurement:
    """What :func:`measure` returns: the engine's result and its tidy rows.

    Attributes:
        result: fitted proxies, labels, evaluated rows and per-position records.
        rows: tidy rows, the columns of ``metrics.csv`` (:data:`illusions.analyses.summary.ROW_FIELDS`).
        reference: the split gaps are measured against (None: no gaps).
    """

    result: AnalysisResult
    rows: list[dict[str, Any]]
    reference: str | None


def measure(
    model: HookedTransformer,
    splits: Mapping[str, Split],
    proxies: Sequence[Any],
    *,
    candidates: np.ndarray | None,
    reference: str | None = "iid",
    fit_split: str = "train",
    fit_n: int = 1000,
    eval_splits: Sequence[str] | None = None,
    max_seqs: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    token_budget: int | None = None,
    breakdowns: Sequence[str] = BREAKDOWNS,
    n_boot: int = 1000,
    group_names: Mapping[str, Sequence[str]] | None = None,
    discrete: Sequence[str] = DISCRETE,
    position_groups: Mapping[str, PositionGroup] | None = None,
    match: Sequence[str] = DEFAULT_MATCH,
    labels: Sequence[str | None] | None = None,
    progress: Progress | None = None,
    evaluated: Callable[[AnalysisResult], None] | None = None,
) -> Measurement:
    """Fit the simplifiers among ``proxies``, evaluate every proxy on every split, summarise.

    Args:
        model: the original model.
        splits: named splits (:class:`illusions.tasks.Split`).
        proxies: simplifiers to fit on ``fit_split`` and proxies ready to run (see
            :func:`illusions.analyses.faithfulness.analyze`).
        candidates: token ids the prediction argmax ranges over (None: whole vocabulary).
        reference: the split gaps are measured against; it must be among the evaluated splits
            (None: no gaps).
        fit_split, fit_n, eval_splits, max_seqs, seed, batch_size, token_budget, progress: as for
            :func:`~illusions.analyses.faithfulness.analyze`.
        breakdowns, n_boot, group_names, discrete, position_groups, match: as for
            :func:`~illusions.analyses.summary.summarize`.
        labels: one name per proxy (None: named from its simplifier, e.g. ``svd(rank=4)``).
        evaluated: called with the engine's result once every split is evaluated, before the summary
            (the CLI freezes the garbage collector there).

    Returns:
        The :class:`Measurement`.
    """
    result = analyze(model, splits, proxies, candidates=candidates, fit_split=fit_split, fit_n=fit_n,
                     eval_splits=eval_splits, max_seqs=max_seqs, seed=seed, batch_size=batch_size,
                     token_budget=token_budget, progress=progress, reference=reference, labels=labels)
    if evaluated is not None:
        evaluated(result)
    rows = summarize(result, reference=reference if reference is not None else "", breakdowns=breakdowns,
                     n_boot=n_boot, seed=seed, group_names=group_names, discrete=discrete,
                     position_groups=position_groups, match=match)
    return Measurement(result, rows, reference)
