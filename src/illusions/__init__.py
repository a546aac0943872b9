"""illusions: does a simplified explanation of a transformer still describe it out of distribution?

The pipeline (see docs/ARCHITECTURE.md): a task makes token splits and scored positions; a model is a
TransformerLens ``HookedTransformer`` trained on it; a simplifier is fitted on activations at a hook
point and becomes a hook function; an analysis compares the clean model with the proxy on every split.

Importing this package is cheap: torch and transformer_lens are imported by the modules that need
them, so ``illusions --help`` stays fast.

Glossary of tensor dimensions (TransformerLens names, plus ours):
    batch       sequences in a batch
    pos         token positions (query positions where two appear)
    key_pos     key positions of an attention pattern
    head_index  attention heads of one layer
    d_model     residual stream width
    d_head      width of one head's query/key/value vectors
    d_vocab     vocabulary size
    n           flattened samples (e.g. all non-PAD positions of many sequences)
    rank        number of kept SVD/PCA directions
    k           number of k-means clusters

The public API (lazy: each name imports its module on first use, so ``import illusions`` stays cheap)::

    import illusions as il
    res = il.evaluate(model, [("blocks.0.attn.hook_k", my_hook)], splits, reference="iid")

``docs/api.md`` lists every name of :data:`__all__`.
"""

from __future__ import annotations

import importlib
from typing import Any

from illusions.errors import IllusionsError

__version__ = "0.1.0"

# Public name -> the module that defines it (imported on first access).
_LAZY = {
    **{name: "illusions.api" for name in (
        "evaluate", "Evaluation", "HookProxy", "simplifier", "svd", "kmeans", "onehot", "resid_svd",
        "resid_kmeans", "weight_svd", "sae", "transcoder")},
    "Split": "illusions.tasks.base",
    "Scored": "illusions.tasks.base",
    "Proxy": "illusions.simplifiers.base",
}

__all__ = ["IllusionsError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'illusions' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
