"""`illusions reproduce`: every analysis recipe on every training seed, then docs/RESULTS.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from illusions.cli.app import command, fail, set_threads
from illusions.cli.scale import (
    CpusOpt,
    DeviceOpt,
    EngineOpt,
    GpusOpt,
    JobDisplay,
    PartitionOpt,
    RetriesOpt,
    SlurmLogsOpt,
    SlurmOptOpt,
    TF32Opt,
    TimeOpt,
    make_engine,
)

EXIT_MISSING = 1


@command("reproduce")
def reproduce(
    recipes: Annotated[Path, typer.Option("--recipes", help="Folder of analysis recipes (*.toml).")] = Path("analyses"),
    out: Annotated[Path, typer.Option("--out", help="Where the runs go: <out>/<recipe>/seed<N>/.")] = Path("runs/reproduce"),
    results: Annotated[Path, typer.Option("--results", help="The Markdown document to write (figures go beside it).")] = Path("docs/RESULTS.md"),
    seeds: Annotated[str | None, typer.Option("--seeds", help="Comma-separated training seeds (default: every shipped checkpoint).")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", help="Only recipes of this task (repeatable).")] = None,
    family: Annotated[list[str] | None, typer.Option("--family", help="Only this bundled model family, e.g. dyck or dyck-paperlike (repeatable; default: every family of each recipe's task).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute runs even when an identical one exists.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write report.html into each seed-0 run.")] = True,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for torch (per worker with --jobs, per job with Slurm).")] = 2,
    jobs: Annotated[int, typer.Option("--jobs", help="Runs in parallel, each in its own process (e.g. --jobs 2 --threads 1 on 2 cores).")] = 1,
    device: DeviceOpt = "cpu",
    allow_tf32: TF32Opt = False,
    engine: EngineOpt = "local",
    partition: PartitionOpt = None,
    time: TimeOpt = None,
    cpus_per_task: CpusOpt = None,
    gpus_per_task: GpusOpt = None,
    slurm_opt: SlurmOptOpt = None,
    retries: RetriesOpt = 1,
    slurm_logs: SlurmLogsOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace earlier runs that would be recomputed (another spec or version).")] = False,
) -> None:
    """Run all analysis recipes on every training seed and write the results document.

    With --engine slurm each run is its own Slurm job; the command waits for them, resubmits a
    failed one up to --retries times, and exits 1 naming the runs still missing (run it again to
    compute only those).
    """
    from illusions.io import check_name
    from illusions.reproduction.document import write_document
    from illusions.reproduction.outputs import check_outputs
    from illusions.reproduction.plan import load_recipes, plan

    seed_list = _seed_list(seeds)
    for name in family or ():
        check_name(name, "--family")
    all_recipes = load_recipes(recipes)
    planned = plan(all_recipes, out, seeds=seed_list, tasks=task, families=family)
    if not planned:
        # plan refuses a task no recipe is for: here no shipped checkpoint fits the recipes it kept.
        of_task = f" for --task {', '.join(task)}" if task else ""
        fail(f"the recipes in {recipes}{of_task} give no run on the shipped checkpoints")
    if jobs < 1:
        fail(f"--jobs must be at least 1, got {jobs}")
    check_outputs(planned, out, results, force=force, overwrite=overwrite,
                  names={"out": "--out", "results": "--results", "overwrite": "--overwrite"})
    set_threads(threads)
    runner, device = make_engine(engine, threads=threads, logs=slurm_logs or out / "slurm-logs",
                                 partition=partition, time=time, cpus_per_task=cpus_per_task,
                                 gpus_per_task=gpus_per_task, slurm_opt=slurm_opt, retries=retries,
                                 device=device, workers=jobs, logs_given=slurm_logs is not None)
    manifest = _run(planned, out, runner, force=force, report=report, workers=jobs, threads=threads,
                    device=device, allow_tf32=allow_tf32)
    n_figures = write_document(all_recipes, planned, out, results, manifest)
    typer.echo(f"{len(planned)} runs in {out}/ ({manifest['total_seconds']:.0f} s); wrote {results} and "
               f"{n_figures} figures in {results.parent / 'figures'}/")


def _seed_list(seeds: str | None) -> list[int] | None:
    """``--seeds`` as integers (None: every shipped seed)."""
    if seeds is None:
        return None
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds must be comma-separated integers, got {seeds!r}")
    if not seed_list:
        fail("--seeds needs at least one seed")
    return seed_list


def _run(planned: list[Any], out: Path, runner: Any, **options: Any) -> dict[str, Any]:
    """Run the jobs with a progress display; exit 1 naming the runs still missing when some failed."""
    from illusions.engines import JobsFailed
    from illusions.reproduction.run import run_all

    with JobDisplay(len(planned)) as display:
        try:
            return run_all(planned, out, engine=runner, progress=lambda job, *rest: display.show(job.key, *rest),
                           **options)
        except JobsFailed as exc:
            display.console.print(f"error: {exc}", soft_wrap=True, highlight=False, markup=False)
            logs = f" (job logs in {runner.folder}/)" if getattr(runner, "folder", None) else ""
            display.console.print(f"{len(planned) - len(exc.missing)} of {len(planned)} runs are in {out}/; "
                                  f"run the same command again to compute the missing ones{logs}",
                                  soft_wrap=True, highlight=False, markup=False)
            raise typer.Exit(EXIT_MISSING) from None
