"""`illusions report RUN_DIR`: rebuild a run's HTML report from its saved results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from illusions.cli.app import command, set_threads


@command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `analyze` or `sweep`.")],
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for torch.")] = 2,
) -> None:
    """Rebuild report.html (and its fig_*.png) from a run directory."""
    from illusions.analyses.run import RESULT_FILES
    from illusions.errors import IllusionsError

    missing = [f for f in RESULT_FILES if not (run_dir / f).is_file()]
    if not run_dir.is_dir() or missing:
        # Checked here too so that a typo fails before torch is imported.
        what = "is not a directory" if not run_dir.is_dir() else f"is not an analysis run directory (missing {', '.join(missing)})"
        raise IllusionsError(f"{run_dir} {what}")
    set_threads(threads)
    from illusions.reports import rebuild_report

    path = rebuild_report(run_dir)
    typer.echo(f"wrote {path}")
