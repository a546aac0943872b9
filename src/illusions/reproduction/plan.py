"""Which runs the reproduction makes: every analysis recipe on every training seed of every model family.

:func:`plan` pairs each recipe of a folder (``analyses/*.toml``, :func:`load_recipes`) with each
checkpoint of every bundled model *family* of its task (:func:`task_families`): the task's reference
family (``assets/<task>/``, training seed 0, and ``assets/seeds/<task>-seed<N>/``) and any other family
trained on the same task (``dyck-paperlike``). Each pair is a :class:`Job` whose run goes to
:func:`run_folder`: ``<out>/<recipe>/seed<N>/`` for the reference family, ``<out>/<recipe>/<family>-seed<N>/``
for another. A recipe with ``over_training = true`` runs on the step checkpoints shipped for each family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from illusions.analyses.run import AnalysisRecipe, load_analysis_recipe, resolve_spec_layers
from illusions.bundled import ASSETS, bundled_model_dir, catalogue, family_checkpoints, family_seeds
from illusions.errors import IllusionsError


def seed_models(task: str, assets: Path = ASSETS) -> dict[int, Path]:
    """Checkpoints of a bundled model family by training seed, from the catalogue
    (:func:`illusions.bundled.catalogue`): 0 is ``assets/<task>/``, then ``seeds/<task>-seed<N>``.
    ``task`` is the family's name (a task's reference family is named after the task)."""
    if Path(assets) == ASSETS:
        bundled_model_dir(task)  # the package's own assets must hold the task's reference model
    return dict(sorted(family_seeds(task, assets).items()))


def _model_reference(family: str, seed: int, task: str, folder: Path, names: dict[tuple[str, int], str]) -> str:
    """How a job's spec names a bundled checkpoint: ``""`` for the task's reference model, else its
    catalogue name (``dyck:seed1``, ``dyck-paperlike``; ``names``: by family and seed), so a run's spec
    does not depend on where the package lies and runs stay reusable from another checkout or install;
    a folder outside the package's own assets (tests pass their own; ``names`` empty) by its path."""
    if not names:
        return str(folder)
    return "" if seed == 0 and family == task else names[family, seed]


def task_families(task: str, assets: Path = ASSETS) -> list[str]:
    """The bundled model families trained on ``task``: its reference family (named after the task)
    first, then the others by name (``dyck-paperlike``), read from each family's seed-0 checkpoint."""
    others = sorted({m.family for m in catalogue(assets).values()
                     if m.seed == 0 and m.family != task and m.task() == task})
    return [task, *others]


def fit_sweep_to_model(spec: Any, model_dir: Path) -> Any:
    """``spec`` with its swept values cut to what the model in ``model_dir`` allows (a rank above its
    ``d_head`` or ``d_model``, as the simplifier's ``sweep_limit`` says), so a recipe written for the
    reference models also runs on a narrower family; ``None`` when no value is left."""
    from illusions import registry
    from illusions.analyses.spec import SWEEP_FIELDS
    from illusions.models import list_checkpoints, read_checkpoint_config

    limit_name = registry.get_simplifier(spec.simplifier).sweep_limit
    param, values = spec.sweep_values()
    if not limit_name or not values:
        return spec
    steps = list_checkpoints(model_dir)
    cfg, _ = read_checkpoint_config(steps[0][1] if steps else model_dir)
    limit = getattr(cfg, limit_name)
    kept = tuple(v for v in values if v <= limit)
    if kept == tuple(values):
        return spec
    return dataclasses.replace(spec, **{SWEEP_FIELDS[param]: kept}) if kept else None


def run_folder(recipe: str, family: str, seed: int, task: str) -> str:
    """A run's path below the reproduction folder: ``<recipe>/seed<N>`` for the task's reference
    family (the layout before families existed, so earlier runs are reused), else
    ``<recipe>/<family>-seed<N>``."""
    return f"{recipe}/seed{seed}" if family == task else f"{recipe}/{family}-seed{seed}"


@dataclasses.dataclass(frozen=True)
class Job:
    """One recipe on one training seed's checkpoint of one model family."""

    recipe: AnalysisRecipe
    seed: int
    spec: Any  # AnalysisSpec with ``model`` pointing at the seed's checkpoint
    out: Path
    family: str = ""  # the bundled family; "" for the recipe's task's reference family

    @property
    def family_name(self) -> str:
        """The family, the task's reference family (named after the task) when none was given."""
        return self.family or self.recipe.spec.task

    @property
    def key(self) -> str:
        return run_folder(self.recipe.name, self.family_name, self.seed, self.recipe.spec.task)


def load_recipes(folder: Path | str) -> list[AnalysisRecipe]:
    """Every ``*.toml`` recipe of ``folder``, by name; duplicate names are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IllusionsError(f"recipe folder {folder} does not exist")
    recipes = [load_analysis_recipe(p) for p in sorted(folder.glob("*.toml"))]
    if not recipes:
        raise IllusionsError(f"no analysis recipes (*.toml) in {folder}")
    seen: dict[str, str] = {}
    for r in recipes:
        if r.name in seen:
            raise IllusionsError(f"recipes {seen[r.name]} and {r.source} share the name {r.name!r}")
        seen[r.name] = r.source
    return recipes


def plan(
    recipes: Sequence[AnalysisRecipe],
    out: Path,
    *,
    seeds: Sequence[int] | None = None,
    tasks: Sequence[str] | None = None,
    families: Sequence[str] | None = None,
    assets: Path = ASSETS,
) -> list[Job]:
    """The jobs: each recipe (of ``tasks``, default all) on each seed (``seeds``, default all shipped)
    of each bundled family of its task (``families``, default all; see :func:`task_families`).

    A recipe that names its own ``model`` runs on that model only, as seed 0 of its task's family.

    Raises:
        IllusionsError: a task no recipe is for, a seed or family that no recipe's task ships, or a
            checkpoints recipe.
    """
    chosen = [r for r in recipes if not tasks or r.spec.task in tasks]
    if not chosen:
        raise IllusionsError(f"no recipe is for task {', '.join(map(repr, tasks))}; the recipes' tasks: "
                             f"{', '.join(sorted({r.spec.task for r in recipes}))}")
    jobs = []
    models: dict[str, dict[int, Path]] = {}
    # The package's own checkpoints go into specs by catalogue name (read once here).
    bundled_names = {(m.family, m.seed): m.name for m in catalogue(assets).values()} if Path(assets) == ASSETS else {}
    matched_families: set[str] = set()
    for recipe in chosen:
        spec = recipe.spec
        if spec.checkpoints:
            raise IllusionsError(f"recipe {recipe.source} analyses training checkpoints ({spec.checkpoints}); "
                                 f"run it with `illusions sweep {recipe.source}`, or set over_training = true "
                                 "to run it on the step checkpoints shipped for each family")
        names = [spec.task] if spec.model else task_families(spec.task, assets)
        for family in names:
            if families and family not in families:
                continue
            matched_families.add(family)
            if recipe.over_training:
                # The step checkpoints shipped for this family (usually one training seed's); none, no job.
                for seed, folder in family_checkpoints(family, assets).items():
                    fitted = fit_sweep_to_model(spec, folder)
                    if (seeds is None or seed in seeds) and fitted is not None:
                        jobs.append(Job(recipe, seed, dataclasses.replace(fitted, checkpoints=str(folder)),
                                        Path(out) / run_folder(recipe.name, family, seed, spec.task), family))
                continue
            if spec.model:
                available = {0: Path(spec.model)}
            else:
                if family not in models:
                    models[family] = seed_models(family, assets)
                available = models[family]
            wanted = sorted(available) if seeds is None else [s for s in seeds if s in available]
            if seeds is not None and not wanted:
                if family != spec.task:
                    continue  # another family without these seeds: the reference family's seeds decide
                have = ", ".join(str(s) for s in available)
                raise IllusionsError(f"no checkpoint of task {spec.task!r} for seed(s) "
                                     f"{', '.join(str(s) for s in seeds)}; shipped seeds: {have}")
            for seed in wanted:
                model = spec.model if spec.model else _model_reference(family, seed, spec.task, available[seed], bundled_names)
                # A recipe's own model is taken as it is (a rank it cannot take is an error there).
                fitted = spec if spec.model else fit_sweep_to_model(spec, available[seed])
                if fitted is None:
                    continue
                job_spec = dataclasses.replace(fitted, model=model)
                if any(layer < 0 for layer in job_spec.layers):
                    # Layers from the end (-1) become this checkpoint's indices, as the run records
                    # them, so a finished run of the recipe counts as current.
                    job_spec = resolve_spec_layers(job_spec)
                jobs.append(Job(recipe, seed, job_spec,
                                Path(out) / run_folder(recipe.name, family, seed, spec.task), family))
    unknown = [f for f in families or () if f not in matched_families]
    if unknown:
        known = sorted({f for r in chosen
                        for f in ([r.spec.task] if r.spec.model else task_families(r.spec.task, assets))})
        raise IllusionsError(f"no bundled model family {', '.join(map(repr, unknown))} for these recipes; "
                             f"families: {', '.join(known)}")
    return jobs
