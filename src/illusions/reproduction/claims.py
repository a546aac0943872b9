"""The paper's claims (and our own questions beyond it), each one entry of :data:`CLAIMS`.

An entry names the recipes it reads and the rule that judges them (:class:`Claim`); :func:`judge`
gathers the runs of those recipes that were run and applies the rule. A new claim is one entry plus,
if no rule fits, one rule: a function of :class:`Evidence` returning ``(verdict, what was measured)``,
usually a thin wrapper over a judge of :mod:`illusions.reproduction.judges`. The document numbers the
claims in table order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from illusions.reproduction.aggregate import RecipeRuns, Training
from illusions.reproduction.judges import (
    WARNING_AUROC,
    judge_circuit,
    judge_code_sources,
    judge_direction,
    judge_gap,
    judge_gap_dictionaries,
    judge_key_depth,
    judge_length,
    judge_original,
    judge_over_training,
    judge_sae_direction,
    judge_sae_predicts,
    judge_warnings,
)

# The sparse dictionary recipes, read by four claims: each SAE at an overcomplete width from three SAE
# training seeds (the -s1 / -s2 recipes), and a transcoder.
SAE_RECIPES = tuple(f"{stem}{seed}" for stem in ("dyck-sae-resid-L1", "dyck-sae-z-L1", "code-sae-resid-L1")
                    for seed in ("", "-s1", "-s2")) + ("dyck-transcoder-L1",)
# The family trained to fail on unseen depths as the paper's models did (tasks/dyck-paperlike.toml),
# on which the document reads the claim about the paper's own models ("original").
PAPERLIKE = "dyck-paperlike"


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What a claim is judged on, for one model family.

    Attributes:
        runs: the runs of the claim's recipes that were run, in the claim's order.
        family: every run of the family, by recipe (a rule may compare with recipes it does not name).
        training: the analyses over training checkpoints of the claim's recipes that were run.
    """

    runs: list[RecipeRuns]
    family: dict[str, RecipeRuns]
    training: list[Training]


Rule = Callable[[Evidence], tuple[str, str]]

# How several recipes' gap verdicts combine: the best one.
_ORDER = ("reproduced", "partly", "not reproduced")


def gap_in_each(e: Evidence) -> tuple[str, str]:
    """'Matches iid, diverges out of distribution', judged on each recipe; the best verdict counts."""
    results = [judge_gap(r) for r in e.runs]
    verdict = min((v for v, _ in results), key=_ORDER.index)
    return verdict, "; ".join(t for _, t in results)


def gap_in_every_dictionary(e: Evidence) -> tuple[str, str]:
    """The sparse dictionaries: a site holds only when every dictionary seed of it does; the best site counts."""
    return judge_gap_dictionaries(e.runs)


def both_directions(e: Evidence) -> tuple[str, str]:
    """The per-head recipes (every proxy) and every whole-layer Dyck recipe (its reported proxy)."""
    layers = [r for r in e.family.values() if not r.recipe.spec.per_head and r.recipe.spec.task == "dyck"]
    return judge_direction(e.runs, layers)


def key_depth(e: Evidence) -> tuple[str, str]:
    return judge_key_depth(e.runs)


def original_accuracy(e: Evidence) -> tuple[str, str]:
    return judge_original(e.runs[0])


def code_sources(e: Evidence) -> tuple[str, str]:
    return judge_code_sources(e.runs)


def length_control(e: Evidence) -> tuple[str, str]:
    return judge_length(e.runs)


def sae_predicts(e: Evidence) -> tuple[str, str]:
    return judge_sae_predicts(e.runs)


def sae_direction(e: Evidence) -> tuple[str, str]:
    return judge_sae_direction(e.runs)


def changes_over_training(e: Evidence) -> tuple[str, str]:
    return judge_over_training(e.training)


def warnings_flag(e: Evidence) -> tuple[str, str]:
    return judge_warnings(e.runs)


def circuit_stays(e: Evidence) -> tuple[str, str]:
    return judge_circuit(e.runs)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One row of the document's claims table.

    Attributes:
        key: a short name (``svd``).
        text: the claim as the document states it.
        recipes: the analysis recipes it is judged on (by name, ``analyses/<name>.toml``).
        rule: the function judging them (:class:`Evidence` -> ``(verdict, measured text)``).
        beyond: a question of ours beyond the paper (its verdicts read *holds* / *does not hold*).
        over_training: judged on the recipes' analyses over training checkpoints, not on their runs.
    """

    key: str
    text: str
    recipes: tuple[str, ...]
    rule: Rule
    beyond: bool = False
    over_training: bool = False


CLAIMS = (
    Claim("svd", "A low-rank (SVD/PCA) proxy of attention queries and keys, fitted on training data, matches "
          "the model in distribution yet diverges out of distribution.", ("dyck-svd-L1", "dyck-svd-L0"),
          gap_in_each),
    Claim("kmeans", "The same holds for a k-means (cluster centroid) proxy of queries and keys.",
          ("dyck-kmeans-L1", "dyck-kmeans-L0"), gap_in_each),
    Claim("onehot", "Even a data-free simplification, one-hot attention, shows the gap.", ("dyck-onehot-L1",),
          gap_in_each),
    Claim("direction", "Both directions occur: a proxy can under-state the model's generalization (the model "
          "generalizes, the proxy fails) or over-state it (the proxy generalizes better). Judged on every "
          "one-head proxy and every whole-layer Dyck proxy at its reported parameter, on whole splits and declared "
          "groups, only for proxies with iid agreement >= 0.95 in every seed.",
          ("dyck-heads-svd", "dyck-heads-kmeans", "dyck-heads-onehot"), both_directions),
    Claim("key_depth", "Agreement broken down by the depth of the attended bracket diverges beyond the training "
          "depth (10).", ("dyck-svd-L1", "dyck-kmeans-L1", "dyck-onehot-L1"), key_depth),
    Claim("original", "The original Dyck models reach roughly 80% accuracy on the unseen-depth split "
          "(read off a figure; likely).", ("dyck-svd-L1",), original_accuracy),
    Claim("code", "On code completion, proxies fitted on the training language diverge on other languages "
          "and on deeper nesting.", ("code-svd-L1", "code-onehot-L1", "code-kmeans-L1"), gap_in_each),
    Claim("code_sources", "The largest code gaps are tied to nesting depth and to copying a word seen earlier "
          "in context (induction).", ("code-svd-L1", "code-onehot-L1", "code-kmeans-L1"), code_sources),
    Claim("length", "Do the gaps survive a length-matched in-distribution control, and the strict one matched on what "
          "differs (Dyck: length x distance x key depth; code: length x nesting depth x character category)?",
          ("dyck-svd-L1", "dyck-svd-L0", "dyck-kmeans-L1", "dyck-kmeans-L0", "dyck-onehot-L1",
           "code-svd-L1", "code-onehot-L1", "code-kmeans-L1"), length_control, beyond=True),
    Claim("data_free_svd", "A data-free low-rank proxy (SVD of each head's query-key weights, layer 1) "
          "shows the same in- vs out-of-distribution gap.", ("dyck-weight-svd-L1",), gap_in_each, beyond=True),
    Claim("resid", "A low-rank (PCA) proxy of the residual stream entering layer 1 shows the same gap.",
          ("dyck-resid-svd",), gap_in_each, beyond=True),
    Claim("sae", "A sparse autoencoder (SAELens TopK, 16 active latents, no error term, overcomplete: 512 latents, 4x "
          "the reference models' width) in place of the residual stream entering layer 1 or of layer 1's attention "
          "output, or a transcoder in place of layer 1's MLP, trained on training activations, matches the model "
          "in distribution yet diverges out of distribution; likewise on code. Judged per dictionary: a site holds only "
          "when it holds for every dictionary (SAE training seed) of it.", SAE_RECIPES,
          gap_in_every_dictionary, beyond=True),
    Claim("sae_predicts", "In-distribution reconstruction quality predicts out-of-distribution faithfulness at "
          "fixed width: across dictionaries of one width (SAE training seeds), a dictionary's iid explained variance "
          "rank-orders its agreement on each other split (Spearman rho, centred per width and training seed, "
          "pooled; *holds* when its 95% interval lies above 0 on every split, *partly* on some).", SAE_RECIPES,
          sae_predicts, beyond=True),
    Claim("sae_direction", "Where does the SAE proxy under- or over-state the model's generalization (accuracy "
          "change vs length-matched iid, at each sweep's reported width)?", SAE_RECIPES, sae_direction,
          beyond=True),
    Claim("sae_length", "Do the SAE proxies' gaps survive a length-matched in-distribution control?", SAE_RECIPES,
          length_control, beyond=True),
    Claim("over_training", "Over training: does an illusion (a proxy's accuracy change on a split differing from "
          "length-matched iid's, 95% bootstrap interval excluding 0) appear, vanish or flip as the model learns? "
          "Judged on the step checkpoints of one training seed per family, only at checkpoints where the proxy's "
          "iid agreement is >= 0.95 (*holds* when some proxy x split or group keeps one state at its first two such "
          "checkpoints and another at its last two).",
          ("dyck-svd-L1-over-training",), changes_over_training, beyond=True, over_training=True),
    Claim("warnings", "Can the activations alone say where a simplified explanation will fail? Each unsupervised "
          "warning signal (the share of a query or key outside the kept subspace, the distance to the nearest "
          "centroid over its cluster's spread, the attention mass one-hot drops) flags the positions where the "
          f"proxy disagrees with the model: AUROC >= {WARNING_AUROC} in every seed, pooled over the splits, at "
          "each recipe's reported proxy.",
          ("dyck-warnings-L1", "code-warnings-L1", "dyck-kmeans-L1", "dyck-onehot-L1"), warnings_flag, beyond=True),
    Claim("circuit", "Does a circuit found faithful in distribution (greedy pruning of heads and MLPs on training "
          "data, agreement >= 0.95, the others mean-ablated; iid agreement >= 0.95 in every seed) stay faithful on the "
          "out-of-distribution splits and their declared groups, against the length-matched and the strict matched "
          "control (a drop counts when significant in every seed against both)?", ("dyck-circuit", "code-circuit"), circuit_stays, beyond=True),
)


def claim_number(key: str) -> int:
    """A claim's number in the document (its place in :data:`CLAIMS`, from 1)."""
    return next(i for i, c in enumerate(CLAIMS, 1) if c.key == key)


def judge(claim: Claim, runs: dict[str, RecipeRuns],
          training: dict[str, Training] | None = None) -> tuple[str, str]:
    """``(verdict, what was measured)`` of ``claim`` on one family's ``runs`` (and analyses over training);
    *not run* when none of its recipes has a run."""
    evidence = Evidence([runs[name] for name in claim.recipes if name in runs], runs,
                        [training[name] for name in claim.recipes if name in (training or {})])
    if not claim.over_training and not evidence.runs:
        return "not run", "recipes " + ", ".join(f"`{r}`" for r in claim.recipes) + " were not run"
    return claim.rule(evidence)
