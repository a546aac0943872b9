"""Run the reproduction's jobs (in this process, a pool of worker processes or on Slurm) and record them.

:func:`run_all` runs the :class:`~illusions.reproduction.plan.Job` s into their folders (the files of
:func:`illusions.analyses.run.write_run`, and a report for seed 0), skipping a run whose directory
already holds the same spec computed by the same package version (:func:`is_current`), and records
the wall time of each run in ``<out>/reproduce.json``.

This package sits above the analyses and the reports: it orchestrates runs and writes each run's
files and report; neither layer below imports it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from illusions import __version__
from illusions.reproduction.plan import Job

MANIFEST = "reproduce.json"


def job_kind(job: Job) -> Any:
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
    previous = read_manifest(out)
    t_start = time.perf_counter()
    entries, todo = _reused(jobs, previous, force)
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
    manifest = _manifest(runs, total, engine.describe(), device, outcome.missing, previous)
    atomic_write_json(out / MANIFEST, manifest)
    if outcome.missing:
        raise JobsFailed(outcome.missing, getattr(engine, "retries", 0))
    return manifest


def _reused(jobs: Sequence[Job], previous: dict[str, Any], force: bool) -> tuple[dict[str, Any], list[Job]]:
    """The manifest entries of the jobs whose finished runs are reused, and the jobs still to compute."""
    entries: dict[str, Any] = {}
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
    return entries, todo


def _manifest(runs: dict[str, Any], total: float, engine: dict[str, Any], device: str,
              missing: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """``reproduce.json``: the version, this invocation's time and engine, each run's entry, and the
    whole reproduction's record (``full_run``) when one invocation computed every run."""
    manifest = {
        "illusions_version": __version__,
        "total_seconds": total,
        **engine,
        "device": device,
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }
    if missing:
        manifest["missing"] = dict(missing)
    elif not any(e["reused"] for e in runs.values()):
        # Every run computed by this invocation: the wall time of a whole reproduction.
        manifest["full_run"] = _full_run_of(manifest)
    elif set(runs) == set(previous.get("runs", {})):
        manifest_full = previous.get("full_run") or _full_run_of(previous)
        if manifest_full:
            manifest["full_run"] = manifest_full  # the same jobs, computed whole by an earlier invocation
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


def read_manifest(out: Path) -> dict[str, Any]:
    """``<out>/reproduce.json`` as written by :func:`run_all` (empty when missing or unreadable)."""
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
    from illusions.analyses.run import run_analysis
    from illusions.reports import write_run_with_report

    t0, c0 = time.perf_counter(), time.process_time()
    if job.spec.checkpoints:
        _run_over_training(job, report, device, allow_tf32)
        return time.perf_counter() - t0, time.process_time() - c0
    run = run_analysis(job.spec, device=device, allow_tf32=allow_tf32)
    # check_outputs has allowed the replacement; a folder that is not a run of ours is still refused.
    write_run_with_report(run, job.out, report=report and job.seed == 0, overwrite=True)
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
    from illusions.analyses.run import RunSummary, run_analysis
    from illusions.reports import write_run_with_report

    run = run_analysis(spec, device=device, allow_tf32=allow_tf32)
    write_run_with_report(run, Path(out), report=report, overwrite=overwrite)
    return RunSummary(run.spec, run.model_description, run.model_source, run.rows, run.document)
