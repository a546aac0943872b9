"""The metrics an analysis reports: one row each, and the only list of them.

Every place that names, formats, bounds or selects metrics reads :data:`METRICS`: the engine (which
metrics a split gets, in which order: :data:`POSITION_METRICS`, :data:`DICTIONARY_METRICS`), the
over-training summary (:data:`OVER_TRAINING_METRICS`), the console tables, report.html and its figures,
and the seed aggregation of the reproduction (:func:`bounds`). Adding a metric is one :class:`Metric`
row here plus its function: a per-position value in
:meth:`illusions.analyses.faithfulness.Records.per_position` (``source`` ``predictions`` or
``distributions``), a per-split statistic in :meth:`illusions.analyses.sparse.SparseStats.values`
(``source`` ``dictionary``), a per-split statistic in
:func:`illusions.analyses.sparse.downstream_estimates` (``source`` ``downstream``) or a per-signal statistic in
:func:`illusions.analyses.warning_signals.warning_rows` (``source`` ``warnings``);
``tests/test_metric_table.py`` checks that they agree.

How each surface names a metric (so one row serves all of them):

    ``key``           the ``metric`` column of metrics.csv, the key in metrics.json
    ``label``         figures (:attr:`Metric.axis_label` adds the unit / scope), legends, prose
    ``short``         table columns: the console's wide table; with the unit (:attr:`Metric.header`)
                      in report.html and RESULTS.md
    ``tiny``          narrow console tables (the compact summary, the sparse dictionary table)

This module is pure Python (rank 1 of the layers): no numpy, no torch.
"""

from __future__ import annotations

import dataclasses
import math

# How a metric is computed (``Metric.source``).
PREDICTIONS = "predictions"  # per scored position, from the argmax predictions (and the targets)
DISTRIBUTIONS = "distributions"  # per scored position, from next-token or attention distributions
DICTIONARY = "dictionary"  # per split, from a sparse dictionary's reconstruction over all token positions
WARNINGS = "warnings"  # per split and warning signal, from the signal and the disagreements (analyses/warning_signals)
DOWNSTREAM = "downstream"  # per split, from next-token losses at the scored positions against a zero ablation
# Which proxies have it (``Metric.proxies``).
ALL = "all"
ATTENTION = "attention"  # only proxies that change an attention pattern directly (NaN for the others)
DICTIONARIES = "dictionaries"  # only sparse dictionary proxies (sae, transcoder): no rows for the others
SIGNALS = "signals"  # only proxies whose hooks declare warning signals: no rows for the others

_INF = math.inf


@dataclasses.dataclass(frozen=True)
class Metric:
    """One metric: what it is called where, how it prints, its range and which proxies have it.

    Attributes:
        key: name in metrics.csv (``metric`` column) and metrics.json.
        label: full name (figure axes and legends).
        short: table column header.
        tiny: header in narrow console tables.
        unit: ``bits``, ``nats`` or ``""`` (a share, a count).
        decimals: places a value (and its interval) prints with.
        bounds: the range of the value.
        gap_bounds: the range of its gap between two splits.
        better: ``higher``, ``lower``, ``zero`` (closer to 0 is better) or ``""`` (neither).
        source: :data:`PREDICTIONS`, :data:`DISTRIBUTIONS`, :data:`DICTIONARY`, :data:`DOWNSTREAM` or
            :data:`WARNINGS`.
        proxies: :data:`ALL`, :data:`ATTENTION`, :data:`DICTIONARIES` or :data:`SIGNALS`.
        over_training: kept by the summary over training checkpoints.
        in_summary: a column of the per-split summary tables (console, report.html).
        console_decimals: places in the console's narrow tables, where fewer than ``decimals``.
        skips_first: a dictionary statistic over every token position but each sequence's first (the
            BOS token or first token: the attention sink, whose norm on real models dwarfs the rest).
    """

    key: str
    label: str
    short: str
    tiny: str
    unit: str
    decimals: int
    bounds: tuple[float, float]
    gap_bounds: tuple[float, float]
    better: str
    source: str
    proxies: str
    over_training: bool = False
    in_summary: bool = False
    console_decimals: int | None = None
    skips_first: bool = False

    @property
    def header(self) -> str:
        """Table header with its unit: ``attn JSD (bits)``."""
        return f"{self.short} ({self.unit})" if self.unit else self.short

    @property
    def axis_label(self) -> str:
        """Figure axis label with its unit, or the positions it covers when not only the scored ones:
        ``attention JSD (bits)``, ``explained variance (positions after the first)``."""
        scope = "positions after the first" if self.skips_first else "all positions"
        note = self.unit or (scope if self.source == DICTIONARY else "")
        return f"{self.label} ({note})" if note else self.label

    @property
    def console_places(self) -> int:
        """Decimal places in the console's narrow tables."""
        return self.decimals if self.console_decimals is None else self.console_decimals


_SHARE = (0.0, 1.0)
_SHARE_GAP = (-1.0, 1.0)
_OPEN = (-_INF, _INF)

METRICS: tuple[Metric, ...] = (
    Metric("original_accuracy", "original accuracy", "original acc", "orig", "", 3, _SHARE, _SHARE_GAP,
           "higher", PREDICTIONS, ALL, over_training=True, in_summary=True),
    Metric("proxy_accuracy", "proxy accuracy", "proxy acc", "proxy", "", 3, _SHARE, _SHARE_GAP,
           "higher", PREDICTIONS, ALL, over_training=True, in_summary=True),
    Metric("agreement", "agreement", "agreement", "agree", "", 3, _SHARE, _SHARE_GAP,
           "higher", PREDICTIONS, ALL, over_training=True, in_summary=True),
    # Proxy minus original accuracy on the same positions: its gap to iid below 0 means the proxy
    # under-states the model's generalization, above 0 that it over-states it.
    Metric("accuracy_change", "accuracy change (proxy - original)", "Δ acc", "Δacc", "", 3, _SHARE_GAP,
           (-2.0, 2.0), "zero", PREDICTIONS, ALL, over_training=True),
    Metric("attention_jsd", "attention JSD", "attn JSD", "JSD", "bits", 3, _SHARE, _OPEN,
           "lower", DISTRIBUTIONS, ATTENTION, in_summary=True),
    Metric("kl", "KL", "KL", "KL", "nats", 4, (0.0, _INF), _OPEN, "lower", DISTRIBUTIONS, ALL,
           in_summary=True),
    # Reconstruction of the replaced activation over every position but each sequence's first (the
    # BOS / attention sink, ~100x the norm of the rest on real models: pooled in, one direction holds
    # nearly all the variance and explained variance reads 1.000 whatever the dictionary does), and
    # the same over all positions (``_pooled``, the figure before this split) beside it.
    Metric("explained_variance", "explained variance", "explained variance", "explained var", "", 3,
           (-_INF, 1.0), _OPEN, "higher", DICTIONARY, DICTIONARIES, skips_first=True),
    Metric("explained_variance_pooled", "explained variance, first position pooled in",
           "explained variance (pooled)", "EV pooled", "", 3, (-_INF, 1.0), _OPEN, "higher", DICTIONARY,
           DICTIONARIES),
    Metric("normalized_mse", "normalised MSE", "normalised MSE", "norm. MSE", "", 4, (0.0, _INF), _OPEN,
           "lower", DICTIONARY, DICTIONARIES, console_decimals=3, skips_first=True),
    Metric("normalized_mse_pooled", "normalised MSE, first position pooled in", "normalised MSE (pooled)",
           "nMSE pooled", "", 4, (0.0, _INF), _OPEN, "lower", DICTIONARY, DICTIONARIES, console_decimals=3),
    Metric("mse", "MSE per token", "MSE per token", "MSE/token", "", 4, (0.0, _INF), _OPEN, "lower",
           DICTIONARY, DICTIONARIES, skips_first=True),
    Metric("l0", "L0 (active latents)", "L0 (active latents)", "L0", "", 2, (0.0, _INF), _OPEN,
           "", DICTIONARY, DICTIONARIES, console_decimals=1),
    Metric("dead_fraction", "dead latents", "dead latents", "dead latents", "", 3, _SHARE, _OPEN,
           "lower", DICTIONARY, DICTIONARIES),
    Metric("new_latent_fraction", "latents new vs fit data", "latents new vs fit data", "new latents", "", 3,
           _SHARE, _OPEN, "lower", DICTIONARY, DICTIONARIES),
    # Downstream loss of a sparse dictionary spliced in, as SAELens' evals report it (analyses/sparse.py,
    # downstream_estimates): next-token cross-entropy of the target at the scored positions under the
    # original, the proxy and the replaced activation zero-ablated, and the shares of the ablation's
    # cross-entropy increase and KL the dictionary recovers (1: as the model, 0: no better than zeros).
    Metric("ce_loss_original", "cross-entropy, original model", "CE original", "CE orig", "nats", 4,
           (0.0, _INF), _OPEN, "lower", DOWNSTREAM, DICTIONARIES),
    Metric("ce_loss_proxy", "cross-entropy, proxy", "CE proxy", "CE proxy", "nats", 4, (0.0, _INF), _OPEN,
           "lower", DOWNSTREAM, DICTIONARIES),
    Metric("ce_loss_ablation", "cross-entropy, activation zero-ablated", "CE ablated", "CE abl", "nats", 4,
           (0.0, _INF), _OPEN, "lower", DOWNSTREAM, DICTIONARIES),
    Metric("loss_recovered", "loss recovered (CE score)", "loss recovered", "loss rec", "", 3, _OPEN, _OPEN,
           "higher", DOWNSTREAM, DICTIONARIES),
    Metric("kl_ablation", "KL, activation zero-ablated", "KL ablated", "KL abl", "nats", 4, (0.0, _INF), _OPEN,
           "lower", DOWNSTREAM, DICTIONARIES),
    Metric("kl_div_score", "KL score (KL recovered)", "KL score", "KL score", "", 3, (-_INF, 1.0), _OPEN,
           "higher", DOWNSTREAM, DICTIONARIES),
    # Unsupervised warning signals (analyses/warning_signals.py), one row set per signal: how well the
    # signal ranks the positions where the proxy disagrees with the model (0.5 = chance), and the
    # agreement / share of the positions it flags above its training 99th percentile.
    Metric("warning_auroc", "warning AUROC (signal vs disagreement)", "warning AUROC", "AUROC", "", 3,
           _SHARE, _SHARE_GAP, "higher", WARNINGS, SIGNALS),
    Metric("warning_flagged_agreement", "agreement where the signal flags", "flagged agreement", "flag agree",
           "", 3, _SHARE, _SHARE_GAP, "", WARNINGS, SIGNALS),
    Metric("warning_flagged_share", "share of positions flagged", "flagged share", "flagged", "", 3,
           _SHARE, _SHARE_GAP, "", WARNINGS, SIGNALS),
)
"""Every metric, in the order rows, tables and figures list them."""

BY_KEY: dict[str, Metric] = {m.key: m for m in METRICS}

POSITION_METRICS: tuple[str, ...] = tuple(m.key for m in METRICS if m.source in (PREDICTIONS, DISTRIBUTIONS))
"""Means over scored positions, every proxy, every breakdown (``Records.per_position``)."""
DICTIONARY_METRICS: tuple[str, ...] = tuple(m.key for m in METRICS if m.source == DICTIONARY)
"""Sparse dictionary statistics over the token positions of a split (``SparseStats.values``)."""
DOWNSTREAM_METRICS: tuple[str, ...] = tuple(m.key for m in METRICS if m.source == DOWNSTREAM)
"""Per split of a sparse dictionary proxy, from losses at the scored positions (``sparse.downstream_estimates``)."""
DOWNSTREAM_TABLE: tuple[str, ...] = (*DOWNSTREAM_METRICS[:4], "kl", *DOWNSTREAM_METRICS[4:])
"""The columns of the downstream tables (console, report.html): the proxy's KL beside the ablation's."""
FIRST_SKIPPED_METRICS: tuple[str, ...] = tuple(m.key for m in METRICS if m.skips_first)
"""Dictionary statistics that leave out each sequence's first position."""
WARNING_METRICS: tuple[str, ...] = tuple(m.key for m in METRICS if m.source == WARNINGS)
"""Per warning signal and split (``analyses.warning_signals.warning_rows``)."""
SUMMARY_METRICS: tuple[str, ...] = tuple(m.key for m in METRICS if m.in_summary)
"""The columns of the per-split summary tables, in order."""
OVER_TRAINING_METRICS: tuple[str, ...] = tuple(m.key for m in METRICS if m.over_training)
"""What the summary over training checkpoints keeps."""


def metric(key: str) -> Metric:
    """The row of ``key``; an unknown key raises ``KeyError`` naming the known ones."""
    try:
        return BY_KEY[key]
    except KeyError:
        raise KeyError(f"unknown metric {key!r}; known: {', '.join(BY_KEY)}") from None


def bounds(key: str, field: str = "value") -> tuple[float, float]:
    """The range of a metric's value (``field == "value"``) or of its gaps (any other field, e.g.
    ``gap_vs_ref``); unbounded for a metric not in the table."""
    row = BY_KEY.get(key)
    if row is None:
        return _OPEN
    return row.bounds if field == "value" else row.gap_bounds
