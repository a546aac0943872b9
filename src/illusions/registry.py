"""Explicit registries: name -> class for tasks and simplifiers.

Plain dicts filled by explicit ``register_*`` lines in :func:`_fill`. Lookups of unknown names raise
an :class:`IllusionsError` listing the known ones; registering a name twice raises. Entries are stored
as ``"module:attr"`` strings so that listing names (``illusions list``, CLI choices) imports nothing
heavy; :func:`get_task` / :func:`get_simplifier` import the class on demand.
"""

from __future__ import annotations

import importlib
from typing import Any

from illusions.errors import IllusionsError

TASKS: dict[str, str] = {}
SIMPLIFIERS: dict[str, str] = {}
# One line of description per entry, shown by `illusions list`.
DESCRIPTIONS: dict[tuple[str, str], str] = {}


def _register(table: dict[str, str], kind: str, name: str, target: str, description: str) -> None:
    if name in table:
        raise ValueError(f"{kind} {name!r} is registered twice ({table[name]} and {target})")
    table[name] = target
    DESCRIPTIONS[(kind, name)] = description


def register_task(name: str, target: str, description: str) -> None:
    _register(TASKS, "task", name, target, description)


def register_simplifier(name: str, target: str, description: str) -> None:
    _register(SIMPLIFIERS, "simplifier", name, target, description)


def _load(table: dict[str, str], kind: str, name: str) -> Any:
    if name not in table:
        known = ", ".join(sorted(table)) or "none registered"
        raise IllusionsError(f"unknown {kind} {name!r}; known {kind}s: {known}")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)


def get_task(name: str) -> Any:
    """The task class registered under ``name``."""
    return _load(TASKS, "task", name)


def get_simplifier(name: str) -> Any:
    """The simplifier class registered under ``name``."""
    return _load(SIMPLIFIERS, "simplifier", name)


def make_simplifier(name: str, **params: Any) -> Any:
    """The simplifier registered as ``name``, built from its fields plus flat target keys.

    ``make_simplifier("svd", rank=4, layers=(1,), heads=(0,), qk="q")`` is
    ``SVD(rank=4, targets=Targets(layers=(1,), heads=(0,), qk="q"))``. Values are typed (no string
    parsing); an unknown key, or a target key the method does not read, raises naming the known ones.
    """
    from illusions.simplifiers.base import Targets

    cls = get_simplifier(name)
    targets = params.pop("targets", None)
    targets = dict(targets.to_dict() if isinstance(targets, Targets) else targets or {})
    targets.update({key: params.pop(key) for key in ("layers", "heads", "qk", "resid") if key in params})
    return cls.from_dict({**params, "targets": Targets.from_dict(targets)})


def _fill() -> None:
    register_task("dyck", "illusions.tasks.dyck:DyckTask",
                  "Dyck-(20,10) brackets; splits: iid, seen/unseen structures, unseen depths")
    register_task("code", "illusions.tasks.code:CodeTask",
                  "character-level code completion; splits: held-out Python, other languages, deep nesting")
    register_task("custom", "illusions.tasks.custom:CustomTask",
                  "your own JSONL splits (train.jsonl + NAME.jsonl) on your model or a Hugging Face one")
    register_simplifier("svd", "illusions.simplifiers.svd:SVD",
                        "queries/keys projected onto their top-r principal directions, per head")
    register_simplifier("kmeans", "illusions.simplifiers.kmeans:KMeans",
                        "queries/keys replaced by the nearest of k centroids, per head")
    register_simplifier("onehot", "illusions.simplifiers.onehot:OneHot",
                        "hard attention on the highest-scoring key (data-free)")
    register_simplifier("resid-svd", "illusions.simplifiers.resid:ResidSVD",
                        "residual stream projected onto its top-r principal directions")
    register_simplifier("resid-kmeans", "illusions.simplifiers.resid:ResidKMeans",
                        "residual stream replaced by the nearest of k centroids")
    register_simplifier("weight-svd", "illusions.simplifiers.weight_svd:WeightSVD",
                        "each head's query-key bilinear form truncated to rank r (data-free)")
    register_simplifier("sae", "illusions.simplifiers.sae:SAE",
                        "residual stream or attention output through a sparse autoencoder")
    register_simplifier("transcoder", "illusions.simplifiers.sae:Transcoder",
                        "an MLP replaced by a sparse transcoder of its input")
    register_simplifier("circuit", "illusions.simplifiers.circuit:Circuit",
                        "keep named heads and MLPs (--keep, or --find-circuit), ablate the others")


_fill()
