"""`illusions analyze` and `illusions sweep`: faithfulness of a simplified proxy per split."""

from __future__ import annotations

from illusions.cli.app import command, not_built


@command("analyze")
def analyze(task: str) -> None:
    """Fit a simplifier and measure its faithfulness on every split."""
    not_built("`illusions analyze`", 6)


@command("sweep")
def sweep(task: str) -> None:
    """Run a simplifier over a range of ranks or cluster counts."""
    not_built("`illusions sweep`", 6)
