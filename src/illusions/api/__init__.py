"""The public Python API: ``import illusions as il`` and every name here is ``il.<name>``.

    res = il.evaluate(model, proxy, splits, reference="iid")   # -> il.Evaluation

Modules: :mod:`.evaluate` (:func:`evaluate`, :class:`Evaluation`), :mod:`.proxies` (the built-in
simplifiers by name, :class:`HookProxy` for your own hooks, SAELens SAEs), :mod:`.data` (models and
splits from Python objects). The layer above reports: it reads analyses (the engine), reports (a
saved run's report.html) and everything below. ``docs/api.md`` documents each name.
"""

from illusions.api.evaluate import Evaluation, evaluate
from illusions.api.proxies import (
    HookProxy,
    kmeans,
    onehot,
    resid_kmeans,
    resid_svd,
    sae,
    simplifier,
    svd,
    transcoder,
    weight_svd,
)

__all__ = ["Evaluation", "HookProxy", "evaluate", "kmeans", "onehot", "resid_kmeans", "resid_svd", "sae",
           "simplifier", "svd", "transcoder", "weight_svd"]
