"""illusions: does a simplified explanation of a transformer still describe it out of distribution?

The pipeline (see DESIGN.md): a task makes token splits and scored positions; a model is a
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
"""

from illusions.errors import IllusionsError

__version__ = "0.1.0"

__all__ = ["IllusionsError", "__version__"]
