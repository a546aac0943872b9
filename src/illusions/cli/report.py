"""`illusions report RUN_DIR`: rebuild a run's HTML report from its saved results."""

from __future__ import annotations

from illusions.cli.app import command, not_built


@command("report")
def report(run_dir: str) -> None:
    """Rebuild report.html from a run directory."""
    not_built("`illusions report`", 7)
