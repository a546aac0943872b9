"""`illusions train TASK|RECIPE`: train a HookedTransformer on a task."""

from __future__ import annotations

from illusions.cli.app import command, not_built


@command("train")
def train(task: str) -> None:
    """Train a model on a task or a TOML recipe."""
    not_built("`illusions train`", 4)
