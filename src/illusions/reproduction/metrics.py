"""The reproduction's lists of metrics: their ranges, table columns and headers, decimals and figure labels.

The lists the document's tables and figures iterate over live here, by the metric names of the rows'
``metric`` column (written by :mod:`illusions.analyses.summary`): :mod:`.aggregate` clips across-seed
intervals to :func:`bounds_of`, :mod:`.document` takes its per-split and sparse-dictionary columns and
:mod:`.figures` its sweep panels from here. A rule or table that reads one named metric (agreement,
accuracy change) names it where it reads it (:mod:`.judges`, :mod:`.document`).
"""

from __future__ import annotations

import math


def bounds_of(metric: str, field: str = "value") -> tuple[float, float]:
    """The range of a metric (``field == "value"``) or of its gaps."""
    if metric in ("original_accuracy", "proxy_accuracy", "agreement"):
        return (0.0, 1.0) if field == "value" else (-1.0, 1.0)
    if metric == "accuracy_change":
        return (-1.0, 1.0) if field == "value" else (-2.0, 2.0)
    if metric == "attention_jsd" and field == "value":
        return (0.0, 1.0)  # bits
    if metric == "kl" and field == "value":
        return (0.0, math.inf)
    if field == "value" and metric in ("dead_fraction", "new_latent_fraction"):
        return (0.0, 1.0)
    if field == "value" and metric in ("normalized_mse", "l0"):
        return (0.0, math.inf)
    if field == "value" and metric == "explained_variance":
        return (-math.inf, 1.0)
    return (-math.inf, math.inf)


# A recipe's table at its reported proxy: the metrics shown per split (mean [95% across seeds]), with headers.
SELECTED_COLUMNS = (("original_accuracy", "original acc"), ("proxy_accuracy", "proxy acc"),
                    ("agreement", "agreement"), ("attention_jsd", "attn JSD (bits)"))

# A sparse dictionary's table in the document: (metric, column header, decimals).
SPARSE_COLUMNS = (("explained_variance", "explained variance", 3), ("normalized_mse", "normalised MSE", 3),
                  ("l0", "L0", 2), ("dead_fraction", "dead latents", 3),
                  ("new_latent_fraction", "latents new vs training", 3))

# The metrics a sweep's figure draws over the swept parameter (explained variance only for sparse
# dictionaries, attention JSD only where a head changes directly), with their axis labels.
SWEEP_FIGURE_METRICS = {"agreement": "agreement", "attention_jsd": "attention JSD (bits)",
                        "explained_variance": "explained variance (all positions)"}
