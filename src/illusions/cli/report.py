"""`illusions report RUN_DIR`: rebuild a run's HTML report from its saved results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from illusions.cli.app import AUTO_THREADS_HELP, command, set_threads


@command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `analyze` or `sweep`.")],
    threads: Annotated[int | None, typer.Option("--threads", help=AUTO_THREADS_HELP)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a report.html or fig_*.png there that illusions did not write.")] = False,
) -> None:
    """Rebuild report.html (and its fig_*.png) from a run directory."""
    from illusions.reports.build import check_report_dir

    # Checked before torch is imported, so that a typo or a damaged run fails at once.
    check_report_dir(run_dir, overwrite=overwrite, overwrite_option="--overwrite")
    set_threads(threads)
    from illusions.reports import rebuild_report

    path = rebuild_report(run_dir, overwrite=overwrite)
    typer.echo(f"wrote {path}")
