"""`illusions data TASK`: generate and inspect a task's splits."""

from __future__ import annotations

from illusions.cli.app import command, not_built


@command("data")
def data(task: str) -> None:
    """Generate a task's splits and print their statistics."""
    not_built("`illusions data`", 3)
