"""Which metrics the reproduction's document and figures show, read from the one metric table.

Every name, header, range and number of decimals comes from :mod:`illusions.metric_table`; this module
only chooses which metrics each table and figure of the document lists. :mod:`.aggregate` clips
across-seed intervals to :func:`bounds_of`, :mod:`.document` takes its per-split and sparse-dictionary
columns and :mod:`.figures` its sweep panels from here. A rule or table that reads one named metric
(agreement, accuracy change) names it where it reads it (:mod:`.judges`, :mod:`.document`).
"""

from __future__ import annotations

from illusions.metric_table import DICTIONARY_METRICS, bounds, metric

bounds_of = bounds
"""The range of a metric (``field == "value"``) or of its gaps (the metric table's bounds)."""

# A recipe's table at its reported proxy: the metrics shown per split (mean [95% across seeds]), with headers.
SELECTED_COLUMNS = tuple((key, metric(key).header)
                         for key in ("original_accuracy", "proxy_accuracy", "agreement", "attention_jsd"))

# A sparse dictionary's table in the document: (metric, column header, decimals).
SPARSE_COLUMNS = tuple((key, metric(key).label, metric(key).decimals) for key in DICTIONARY_METRICS)

# The metrics a sweep's figure draws over the swept parameter (explained variance only for sparse
# dictionaries, attention JSD only where a head changes directly), with their axis labels.
SWEEP_FIGURE_METRICS = {key: metric(key).axis_label
                        for key in ("agreement", "attention_jsd", "explained_variance")}
