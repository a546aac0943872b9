"""Run every analysis recipe on every training seed of its task: the reproduction's runs.

:func:`plan` pairs each recipe of a folder (``analyses/*.toml``) with each checkpoint of every bundled
model *family* of its task: the task's reference family (``assets/<task>/``, training seed 0, and
``assets/seeds/<task>-seed<N>/``) and any other family trained on the same task (``dyck-paperlike``).
:func:`run_all` runs the pairs into ``<out>/<recipe>/seed<N>/`` for the reference family and
``<out>/<recipe>/<family>-seed<N>/`` for another (the files of
:func:`illusions.analyses.run.write_run`), skipping a run
whose directory already holds the same spec computed by the same package version, and records the
wall time of each run in ``<out>/reproduce.json``. :mod:`illusions.reports.results` turns the run
directories into ``docs/RESULTS.md``. :func:`check_outputs` says, before any work, whether every
output may be written: an earlier run is replaced only when asked (``overwrite`` or ``force``) and
nothing illusions did not write is ever replaced.

This module sits above the analyses and the reports: it orchestrates runs (in this process or a pool of
worker processes) and writes each run's files and report; neither layer below imports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from illusions import __version__
from illusions.analyses.run import AnalysisRecipe, load_analysis_recipe
from illusions.bundled import ASSETS, bundled_model_dir, catalogue, family_checkpoints, family_seeds
from illusions.errors import IllusionsError

MANIFEST = "reproduce.json"


def seed_models(task: str, assets: Path = ASSETS) -> dict[int, Path]:
    """Checkpoints of a bundled model family by training seed, from the catalogue
    (:func:`illusions.bundled.catalogue`): 0 is ``assets/<task>/``, then ``seeds/<task>-seed<N>``.
    ``task`` is the family's name (a task's reference family is named after the task)."""
    if Path(assets) == ASSETS:
        bundled_model_dir(task)  # the package's own assets must hold the task's reference model
    return dict(sorted(family_seeds(task, assets).items()))


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
        IllusionsError: a seed or family that no recipe's task ships, or a checkpoints recipe.
    """
    jobs = []
    models: dict[str, dict[int, Path]] = {}
    matched_families: set[str] = set()
    for recipe in recipes:
        spec = recipe.spec
        if tasks and spec.task not in tasks:
            continue
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
                bundled = seed == 0 and Path(assets) == ASSETS and family == spec.task
                model = spec.model if spec.model else ("" if bundled else str(available[seed]))
                # A recipe's own model is taken as it is (a rank it cannot take is an error there).
                fitted = spec if spec.model else fit_sweep_to_model(spec, available[seed])
                if fitted is None:
                    continue
                jobs.append(Job(recipe, seed, dataclasses.replace(fitted, model=model),
                                Path(out) / run_folder(recipe.name, family, seed, spec.task), family))
    unknown = [f for f in families or () if f not in matched_families]
    if unknown:
        known = sorted({f for r in recipes if not tasks or r.spec.task in tasks
                        for f in ([r.spec.task] if r.spec.model else task_families(r.spec.task, assets))})
        raise IllusionsError(f"no bundled model family {', '.join(map(repr, unknown))} for these recipes; "
                             f"families: {', '.join(known)}")
    return jobs


def _kind(job: Job) -> Any:
    """What the job writes: an analysis run, or (``over_training``) an analysis over checkpoints."""
    if job.spec.checkpoints:
        from illusions.analyses.checkpoints import CHECKPOINT_SWEEP

        return CHECKPOINT_SWEEP
    from illusions.analyses.run import ANALYSIS_RUN

    return ANALYSIS_RUN


def is_current(job: Job) -> bool:
    """The job's directory holds a finished run of the same spec by this package version."""
    config = job.out / "config.json"
    if job.spec.checkpoints:
        from illusions.analyses.checkpoints import SUMMARY_CSV, SUMMARY_JSON

        files = ("config.json", SUMMARY_CSV, SUMMARY_JSON)
    else:
        files = ("config.json", "metrics.csv", "metrics.json")
    if not all((job.out / name).is_file() for name in files):
        return False
    try:
        saved = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    expected = json.loads(json.dumps(job.spec.to_dict()))
    return saved.get("illusions_version") == __version__ and saved.get("spec") == expected


# Recognises a results document written by this command (its first lines say so).
GENERATED_MARK = "Generated by `illusions reproduce`"
# How check_outputs' messages name its inputs; the CLI passes its flags.
OUTPUT_NAMES = {"out": "runs folder", "results": "results document", "overwrite": "overwrite=True"}


def check_outputs(jobs: Sequence[Job], out: Path, results: Path, *, force: bool = False,
                  overwrite: bool = False, names: dict[str, str] | None = None) -> None:
    """Fail before any work unless every output of these jobs may be written.

    ``out`` must be new, empty or a reproduction tree of ours; each job's folder new, empty or an
    analysis run (an earlier run that would be recomputed, having another spec or package version or
    with ``force``, is replaced only with ``overwrite`` or ``force``); ``results`` new or a document
    this command wrote, its ``figures/`` folder beside it likewise; all locations writable.

    Raises:
        IllusionsError: naming the first output in the way.
    """
    from illusions.io import check_creatable, check_inside, ownership, recover_dir, refuse_foreign

    name = {**OUTPUT_NAMES, **(names or {})}
    out, results = Path(out), Path(results)
    if out.exists() and not out.is_dir():
        raise IllusionsError(f"{name['out']} {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_tree(out):
        raise IllusionsError(f"{name['out']} {out} is not empty and holds no reproduction written by illusions "
                             f"(no {MANIFEST}); choose a new or empty folder")
    stale = []
    for job in jobs:
        check_inside(job.out, out, "run folder")  # behind the recipe name rule (load_analysis_recipe)
        recover_dir(job.out)
        kind = _kind(job)
        own = ownership(job.out, kind)
        refuse_foreign(own, kind, str(job.out), foreign_advice="move it away", other_advice="move it away")
        if own.state == "ours" and (force or not is_current(job)):
            if own.changed:
                raise IllusionsError(f"{job.out / own.changed[0]} was changed after illusions wrote it; move it "
                                     f"away before {job.out} is recomputed")
            stale.append(job)
    if stale and not (overwrite or force):
        raise IllusionsError(f"{len(stale)} earlier run(s) under {out} hold another spec or package version "
                             f"and would be recomputed (e.g. {stale[0].out}); pass {name['overwrite']} to "
                             "replace them")
    if results.exists():
        if not results.is_file() or not _is_ours(results):
            raise IllusionsError(f"{name['results']} {results} exists and was not written by illusions reproduce; "
                                 "choose another")
    elif (results.parent / "figures").is_dir() and any((results.parent / "figures").iterdir()):
        raise IllusionsError(f"{results.parent / 'figures'} already holds files but {results} does not exist; "
                             "choose another folder for the results document")
    check_creatable(out)
    check_creatable(results.parent, target=results)


def _is_ours(results: Path) -> bool:
    try:
        with open(results, encoding="utf-8", errors="replace") as fh:
            head = fh.read(2000)
    except OSError:
        return False
    return GENERATED_MARK in head


def _is_tree(out: Path) -> bool:
    """``out`` holds an earlier reproduction: its manifest, or only recipe folders of analysis runs
    (or of analyses over checkpoints)."""
    from illusions.analyses.checkpoints import CHECKPOINT_SWEEP
    from illusions.analyses.run import ANALYSIS_RUN
    from illusions.io import ownership

    if _read_manifest(out).get("illusions_version"):
        return True
    for entry in out.iterdir():
        if entry.name.startswith("."):
            continue  # staging leftovers of an interrupted run
        if not entry.is_dir() or entry.is_symlink():
            return False
        for seed_dir in entry.iterdir():
            if seed_dir.name.startswith("."):
                continue
            if not _RUN_FOLDER.match(seed_dir.name) or not any(
                    ownership(seed_dir, kind).state == "ours" for kind in (ANALYSIS_RUN, CHECKPOINT_SWEEP)):
                return False
    return True


# A run folder below a recipe's folder: seed<N> (reference family) or <family>-seed<N>.
_RUN_FOLDER = re.compile(r"^(?:.+-)?seed[0-9]+$")


def run_all(
    jobs: Sequence[Job],
    out: Path,
    *,
    force: bool = False,
    report: bool = True,
    progress: Callable[[Job, int, int, str, str], None] | None = None,
    workers: int = 1,
    threads: int = 1,
    device: str = "cpu",
    allow_tf32: bool = False,
    engine: Any = None,
) -> dict[str, Any]:
    """Run (or reuse) every job; returns and writes the manifest ``<out>/reproduce.json``.

    Reports are written for seed 0 only (the other seeds' runs feed the across-seed intervals).
    The jobs still to compute go to ``engine`` (:mod:`illusions.engines`); without one, a
    :class:`~illusions.engines.LocalEngine` of ``workers`` processes of ``threads`` torch
    threads each (on small models, two 1-thread processes use two cores better than one 2-thread
    process). Every run is independent and seeded, so its files do not depend on the engine.
    ``device`` and ``allow_tf32`` go to :func:`illusions.analyses.run.run_analysis` in whichever
    process runs the job (so ``auto`` is resolved on the machine that runs it).

    ``progress(job, finished, n, event, detail)`` is called as the engine reports, with ``finished``
    of the ``n`` jobs finished (reused ones included): ``event`` is ``"start"`` as a job starts in
    this process, ``"submitted"`` as it is queued on Slurm, ``"done"`` as it finishes (counted in
    ``finished``), ``"retry"`` as a failed Slurm job is submitted again and ``"failed"`` as one is
    given up on (counted too); ``detail`` says why, or names the Slurm job.

    Raises:
        JobsFailed: some jobs are missing: a run raised (locally), or failed after the engine's retries
            (Slurm). The other runs go on; the manifest is still written, with the runs that finished
            (and their times) and a ``missing`` table, and a rerun computes only the missing ones (the
            finished ones are reused).
    """
    from illusions.engines import JobsFailed, LocalEngine
    from illusions.io import atomic_write_json

    out = Path(out)
    engine = engine if engine is not None else LocalEngine(workers=workers, threads=threads)
    previous = _read_manifest(out)
    entries: dict[str, Any] = {}
    t_start = time.perf_counter()
    todo = []
    for job in jobs:
        if not force and is_current(job):
            # A reused run keeps the times it was computed in.
            before = previous.get("runs", {}).get(job.key, {})
            entries[job.key] = {"recipe": job.recipe.name, "family": job.family_name, "seed": job.seed,
                                "reused": True,
                                "seconds": before.get("seconds"), "cpu_seconds": before.get("cpu_seconds")}
        else:
            todo.append(job)
    done = len(jobs) - len(todo)
    by_key = {job.key: job for job in todo}

    def on_event(event: Any) -> None:
        if progress is not None:
            progress(by_key[event.key], done + event.finished, len(jobs), event.kind, event.detail)

    try:
        for job in todo:
            engine.submit(job.key, run_job, job, report, device, allow_tf32)
        outcome = engine.wait(on_event)
    except BaseException:
        engine.cancel()
        raise
    for key, times in outcome.results.items():
        entries[key] = _entry(by_key[key], times)
    total = round(time.perf_counter() - t_start, 1)
    runs = {job.key: entries[job.key] for job in jobs if job.key in entries}
    manifest = {
        "illusions_version": __version__,
        "total_seconds": total,
        **engine.describe(),
        "device": device,
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }
    if outcome.missing:
        manifest["missing"] = dict(outcome.missing)
    elif not any(e["reused"] for e in runs.values()):
        # Every run computed by this invocation: the wall time of a whole reproduction.
        manifest["full_run"] = _full_run_of(manifest)
    elif set(runs) == set(previous.get("runs", {})):
        manifest_full = previous.get("full_run") or _full_run_of(previous)
        if manifest_full:
            manifest["full_run"] = manifest_full  # the same jobs, computed whole by an earlier invocation
    atomic_write_json(out / MANIFEST, manifest)
    if outcome.missing:
        raise JobsFailed(outcome.missing, getattr(engine, "retries", 0))
    return manifest


def _full_run_of(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The whole-reproduction record of a manifest whose invocation computed every run, else None."""
    runs = manifest.get("runs") or {}
    if not runs or any(e.get("reused") for e in runs.values()) or "total_seconds" not in manifest:
        return None
    cpu = [e.get("cpu_seconds") for e in runs.values()]
    return {"seconds": manifest["total_seconds"], "engine": manifest.get("engine", "local"),
            "workers": manifest.get("workers", 1), "threads": manifest.get("threads", 1),
            "device": manifest.get("device", "cpu"), "runs": len(runs),
            "cpu_seconds": round(sum(cpu), 1) if all(c is not None for c in cpu) else None,
            "cpu_count": manifest.get("cpu_count")}


def _read_manifest(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _entry(job: Job, times: tuple[float, float]) -> dict[str, Any]:
    return {"recipe": job.recipe.name, "family": job.family_name, "seed": job.seed,
            "reused": False, "seconds": round(times[0], 2), "cpu_seconds": round(times[1], 2)}


def run_job(job: Job, report: bool = True, device: str = "cpu", allow_tf32: bool = False) -> tuple[float, float]:
    """Run one job into its directory; returns its wall and CPU seconds (this process, all threads)."""
    from illusions.analyses.run import run_analysis, write_run

    t0, c0 = time.perf_counter(), time.process_time()
    if job.spec.checkpoints:
        _run_over_training(job, report, device, allow_tf32)
        return time.perf_counter() - t0, time.process_time() - c0
    run = run_analysis(job.spec, device=device, allow_tf32=allow_tf32)
    extra = None
    if report and job.seed == 0:
        from illusions.reports import write_report_files

        def extra(stage: Path) -> None:
            write_report_files(run, stage)

    # check_outputs has allowed the replacement; a folder that is not a run of ours is still refused.
    write_run(run, job.out, extra_files=extra, overwrite=True)
    return time.perf_counter() - t0, time.process_time() - c0


def _run_over_training(job: Job, report: bool, device: str, allow_tf32: bool) -> None:
    """An ``over_training`` job: the analysis on each step checkpoint, with the report over steps."""
    from illusions.analyses.checkpoints import run_over_checkpoints
    from illusions.reports.checkpoints import report_writers

    run_files, sweep_files = report_writers() if report else (None, None)
    run_over_checkpoints(job.spec, job.out, overwrite=True, run_files=run_files, sweep_files=sweep_files,
                         device=device, allow_tf32=allow_tf32)


def analyze_into(spec: Any, out: str, report: bool = True, device: str = "cpu", allow_tf32: bool = False,
                 overwrite: bool = False) -> Any:
    """:func:`~illusions.analyses.run.run_analysis` and :func:`~illusions.analyses.run.write_run`
    (with the report when ``report``) in one call, for a process of its own (``sweep --engine
    slurm``); returns the run's :class:`~illusions.analyses.run.RunSummary`. ``overwrite`` replaces
    an earlier run of ours in ``out`` (the caller checked the location first)."""
    from illusions.analyses.run import RunSummary, run_analysis, write_run

    run = run_analysis(spec, device=device, allow_tf32=allow_tf32)
    extra = None
    if report:
        from illusions.reports import write_report_files

        def extra(stage: Path) -> None:
            write_report_files(run, stage)

    write_run(run, Path(out), extra_files=extra, overwrite=overwrite)
    return RunSummary(run.spec, run.model_description, run.model_source, run.rows, run.document)
