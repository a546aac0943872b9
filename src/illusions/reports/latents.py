"""Which latents of a sparse dictionary proxy (``sae``, ``transcoder``) carry the failure.

For each dictionary of the proxy, on the fitting sequences drawn and on each split's (clean model
activations, as the dictionary was fitted on):

    frequency        share of token positions where the latent is active
    new              the latent never fired on the data the dictionary was fitted on (its
                     ``train_active`` record, over all fitting positions)
    OOD score        the largest increase of frequency from the fitting data to a split other than the
                     reference (``iid``) one: a latent that fires out of distribution but not in it

The latents with the highest OOD score (new latents first) get their top activating contexts (the
positions of those splits where the latent's code is largest, with the tokens before them) and their
top promoted tokens: the direct effect of its decoder direction on the logits, ``W_dec[i] @ W_U``
(through ``W_O`` for a dictionary of attention outputs ``hook_z``; the final layer norm is ignored).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from illusions.tasks.base import Split

# Latents listed in the table at most, latents detailed, contexts and tokens per detailed latent.
MAX_ROWS = 200
TOP_LATENTS = 6
CONTEXTS = 5
PROMOTED = 5
# Tokens shown before (and after) an activating position.
BEFORE, AFTER = 12, 2


@dataclasses.dataclass(frozen=True)
class Latent:
    """One latent of one dictionary.

    Attributes:
        name: ``<hook>#<index>``.
        index: its index in the dictionary.
        new: never active on the fitting data.
        frequency: group -> share of positions active (fitting data first, then each split).
        ood_score: largest frequency increase to a split other than the reference.
        contexts: top activating contexts: ``(split, row, pos, activation, before, token, after)``.
        promoted: top promoted tokens: ``(token, logit effect)``.
    """

    name: str
    index: int
    new: bool
    frequency: dict[str, float]
    ood_score: float
    contexts: tuple[tuple[str, int, int, float, str, str, str], ...] = ()
    promoted: tuple[tuple[str, float], ...] = ()


def _output_to_resid(model: HookedTransformer, hook: Any, w_dec: Any) -> Any:
    """Decoder rows ``[d_sae, d_out]`` as residual-stream directions ``[d_sae, d_model]``."""
    if getattr(hook, "heads", None) is not None and hook.hook_name.endswith("hook_z"):
        w_o = model.blocks[hook.layer].attn.W_O  # [head_index, d_head, d_model]
        heads = list(hook.heads)
        parts = w_dec.reshape(w_dec.shape[0], len(heads), -1)  # [d_sae, heads, d_head]
        return sum(parts[:, i] @ w_o[h].to(w_dec) for i, h in enumerate(heads))
    return w_dec


def latents(
    model: HookedTransformer,
    proxy: Any,
    fit: Split,
    splits: Mapping[str, Split],
    vocab_tokens: Sequence[str],
    *,
    fit_name: str = "train",
    reference: str = "iid",
    row_ids: Mapping[str, np.ndarray] | None = None,
    batch_size: int = 64,
) -> list[Latent]:
    """The latents of ``proxy``'s dictionaries, highest OOD score first (at most :data:`MAX_ROWS`);
    the first :data:`TOP_LATENTS` carry contexts and promoted tokens. Empty for other proxies."""
    import torch

    from illusions.activations import collect
    from illusions.analyses.sparse import dictionary_hooks

    hooks = dictionary_hooks(proxy)
    if not hooks:
        return []
    groups = {fit_name: fit, **{k: v for k, v in splits.items() if k != fit_name}}
    names = sorted({n for h in hooks for n in h.stat_names})
    codes: dict[str, list[np.ndarray]] = {}
    where: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for tag, split in groups.items():
        acts = collect(model, split.tokens, names, split.lengths, batch_size=batch_size, max_positions=4096)
        per_hook = []
        with torch.inference_mode():
            for hook in hooks:
                x, _ = hook.input_and_target(acts)
                per_hook.append(hook.forward(x)[1].float().cpu().numpy())  # [n, d_sae]
        codes[tag] = per_hook
        seq = np.repeat(np.arange(len(split.lengths)), split.lengths)
        pos = np.concatenate([np.arange(n) for n in split.lengths]) if len(split.lengths) else seq
        where[tag] = (seq, pos)
    ood = [t for t in groups if t not in (fit_name, reference)] or [t for t in groups if t != fit_name]
    found: list[Latent] = []
    for k, hook in enumerate(hooks):
        trained = hook.train_active.bool().cpu().numpy()
        freq = {tag: (codes[tag][k] != 0).mean(axis=0) if codes[tag][k].shape[0] else
                np.zeros(hook.d_sae) for tag in groups}
        score = np.max([freq[t] - freq[fit_name] for t in ood], axis=0)
        stem = hook.hook_name
        for i in range(hook.d_sae):
            found.append(Latent(name=f"{stem}#{i}", index=i, new=not bool(trained[i]),
                                frequency={t: float(freq[t][i]) for t in groups}, ood_score=float(score[i])))
    # New latents that fire out of distribution first, then by OOD score; stable on the name.
    order = sorted(range(len(found)), key=lambda j: (-(found[j].new and found[j].ood_score > 0),
                                                      -found[j].ood_score, j))
    found = [found[j] for j in order[:MAX_ROWS]]
    w_u = model.W_U.detach().float().cpu()  # [d_model, d_vocab]
    detailed = []
    for lat in found[:TOP_LATENTS]:
        k = next(k for k, h in enumerate(hooks) if lat.name.startswith(h.hook_name + "#"))
        hook = hooks[k]
        contexts = _contexts(lat, [codes[tag][k] for tag in ood], ood, where, groups, vocab_tokens, row_ids)
        with torch.inference_mode():
            direction = _output_to_resid(model, hook, hook.W_dec[lat.index:lat.index + 1].float().cpu())
            effect = (direction @ w_u)[0].numpy()  # [d_vocab]
        top = np.argsort(-effect, kind="stable")[:PROMOTED]
        promoted = tuple((str(vocab_tokens[int(t)]), round(float(effect[t]), 3)) for t in top)
        detailed.append(dataclasses.replace(lat, contexts=tuple(contexts), promoted=promoted))
    return detailed + found[TOP_LATENTS:]


def _contexts(lat: Latent, ood_codes: Sequence[np.ndarray], ood: Sequence[str],
              where: Mapping[str, tuple[np.ndarray, np.ndarray]], groups: Mapping[str, Split],
              vocab_tokens: Sequence[str], row_ids: Mapping[str, np.ndarray] | None) -> list[tuple[Any, ...]]:
    """The :data:`CONTEXTS` positions of the ``ood`` splits (codes ``ood_codes``) where latent ``lat``'s
    code is largest: ``(split, row, position, value, tokens before, token, tokens after)``."""
    cands = []
    for tag, tag_codes in zip(ood, ood_codes, strict=True):
        values = tag_codes[:, lat.index]
        for n in np.argsort(-values, kind="stable")[:CONTEXTS]:
            if values[n] > 0:
                cands.append((float(values[n]), tag, int(n)))
    cands.sort(key=lambda c: (-c[0], ood.index(c[1]), c[2]))
    contexts = []
    for value, tag, n in cands[:CONTEXTS]:
        seq, pos = where[tag]
        split = groups[tag]
        row_tokens = split.tokens[seq[n], : int(split.lengths[seq[n]])]
        p = int(pos[n])
        text = [str(vocab_tokens[int(t)]) for t in row_tokens]
        row = int(np.asarray(row_ids[tag])[seq[n]]) if row_ids and tag in row_ids else int(seq[n])
        contexts.append((tag, row, p, round(value, 4), " ".join(text[max(0, p - BEFORE):p]), text[p],
                         " ".join(text[p + 1:p + 1 + AFTER])))
    return contexts
