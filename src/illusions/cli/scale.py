"""Options shared by the commands that scale out: ``--device`` and ``--engine local|slurm`` with the
Slurm job options, and the progress display while Slurm jobs run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from illusions.cli.app import fail

DeviceOpt = Annotated[str, typer.Option(
    "--device", help="Where the model, activations, proxies and metrics live: cpu, cuda, cuda:N, mps or auto "
                     "(CUDA when present). CPU results are exact; GPU ones agree to float rounding.")]
TF32Opt = Annotated[bool, typer.Option(
    "--allow-tf32", help="Let CUDA run float32 matmuls in TF32 (faster, ~1e-3 relative error; off by default).")]
EngineOpt = Annotated[str, typer.Option(
    "--engine", help="local (this machine) or slurm (each run a Slurm job, via submitit: pip install 'illusions\\[slurm]').")]
PartitionOpt = Annotated[str | None, typer.Option("--partition", help="slurm: partition (default: the cluster's).")]
TimeOpt = Annotated[str | None, typer.Option(
    "--time", help="slurm: time limit per job, as Slurm writes it (60, 2:00:00, 1-00:00; default 60 minutes).")]
CpusOpt = Annotated[int | None, typer.Option("--cpus-per-task", help="slurm: CPUs per job (default: --threads).")]
GpusOpt = Annotated[int | None, typer.Option("--gpus-per-task", help="slurm: GPUs per job (use with --device cuda).")]
SlurmOptOpt = Annotated[list[str] | None, typer.Option(
    "--slurm-opt", help="slurm: another sbatch option as KEY=VALUE, e.g. mem=8G or account=mylab (repeatable).")]
RetriesOpt = Annotated[int, typer.Option(
    "--retries", help="slurm: times a failed, cancelled or timed-out job is resubmitted before its run counts as missing.")]
SlurmLogsOpt = Annotated[Path | None, typer.Option(
    "--slurm-logs", help="slurm: folder for submitit's job files and logs, on a file system the nodes share "
                         "(default: slurm-logs/ beside the runs).")]

ENGINES = ("local", "slurm")


def local_device(name: str) -> str:
    """The device for work in this process (checked now: one that is not here exits 2)."""
    from illusions.devices import resolve_device

    return str(resolve_device(name))


def make_engine(engine: str, *, threads: int, logs: Path, partition: str | None, time: str | None,
                cpus_per_task: int | None, gpus_per_task: int | None, slurm_opt: list[str] | None,
                retries: int, device: str, workers: int = 1, logs_given: bool = False) -> tuple[Any, str]:
    """``(engine, device)`` for the options; the device is resolved here for ``local`` and only
    spelled-checked for ``slurm`` (it must exist on the nodes, not on the submitting machine)."""
    from illusions.devices import check_device_name
    from illusions.engines import LocalEngine, SlurmEngine

    if engine not in ENGINES:
        fail(f"--engine must be local or slurm, got {engine!r}")
    if threads < 1:
        fail(f"--threads must be at least 1, got {threads}")
    if engine == "local":
        given = [flag for flag, value in (("--partition", partition), ("--time", time),
                                          ("--cpus-per-task", cpus_per_task), ("--gpus-per-task", gpus_per_task),
                                          ("--slurm-opt", slurm_opt), ("--slurm-logs", logs_given))
                 if value]
        if retries != 1:
            given.append("--retries")
        if given:
            fail(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only for --engine slurm")
        return LocalEngine(workers=workers, threads=threads), local_device(device)
    if workers != 1:
        fail("--jobs is for --engine local; with --engine slurm every run is its own job")
    from illusions.engines import parse_slurm_options

    device = check_device_name(device)
    if gpus_per_task and device == "cpu":
        typer.echo("note: --gpus-per-task without --device cuda (or auto): the jobs will run on the CPU",
                   err=True)
    return SlurmEngine(logs, partition=partition, time=time if time is not None else "60",
                       cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task,
                       options=parse_slurm_options(slurm_opt), retries=retries, threads=threads), device


class JobDisplay:
    """Lines for each event on stderr, and a progress bar of finished jobs when it is a terminal."""

    def __init__(self, total: int, what: str = "runs") -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=self.console,
                            transient=True, disable=not self.console.is_terminal)
        self.task = self.bar.add_task(what, total=total, note="")
        self.retried = 0

    def __enter__(self) -> JobDisplay:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def show(self, key: str, finished: int, total: int, kind: str, detail: str = "") -> None:
        if kind == "start":
            self.console.print(f"[dim][{finished + 1}/{total}] {key}[/]")
        elif kind == "submitted":
            self.console.print(f"[dim]{key}: submitted as Slurm {detail}[/]")
        elif kind == "done":
            self.console.print(f"[dim][{finished}/{total}] {key} done{f' ({detail})' if detail else ''}[/]")
        elif kind == "retry":
            self.retried += 1
            self.console.print(f"[yellow]{key}: {detail}[/]", soft_wrap=True)
        elif kind == "failed":
            self.console.print(f"[red]{key}: given up: {detail}[/]", soft_wrap=True)
        self.bar.update(self.task, completed=finished,
                        note=f"{self.retried} resubmitted" if self.retried else "")
