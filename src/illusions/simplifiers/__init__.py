"""Simplified proxies as TransformerLens hook functions.

A simplifier is a frozen configuration (``SVD(rank=4)``, ``KMeans(k=8)``, ``OneHot()``, ...);
``fit`` on collected activations (or on the weights alone, for data-free methods) returns a
:class:`Proxy` whose ``fwd_hooks`` go straight into ``model.run_with_hooks`` or ``model.hooks``:

    from illusions.simplifiers import SVD, Targets, fit_proxy
    proxy = fit_proxy(model, SVD(rank=4, targets=Targets(layers=(1,), heads=(0,))), tokens, lengths)
    logits = model.run_with_hooks(tokens, fwd_hooks=proxy.fwd_hooks)

Registry names (``illusions list``): svd, kmeans, onehot, resid-svd, resid-kmeans, weight-svd,
sae, transcoder (the last two need SAELens: ``pip install 'illusions[sae]'``);
``illusions.registry.make_simplifier(name, **params)`` builds one by name. This package imports
every method module (which registers its hook classes for :meth:`Proxy.load`) and never the registry.
"""

from illusions.simplifiers.base import (
    FittedHook,
    Proxy,
    Simplifier,
    Targets,
    fit_proxy,
)
from illusions.simplifiers.kmeans import KMeans
from illusions.simplifiers.onehot import OneHot
from illusions.simplifiers.resid import ResidKMeans, ResidSVD
from illusions.simplifiers.sae import SAE, Transcoder
from illusions.simplifiers.svd import SVD
from illusions.simplifiers.weight_svd import WeightSVD

__all__ = [
    "SAE",
    "SVD",
    "FittedHook",
    "KMeans",
    "OneHot",
    "Proxy",
    "ResidKMeans",
    "ResidSVD",
    "Simplifier",
    "Targets",
    "Transcoder",
    "WeightSVD",
    "fit_proxy",
]
