"""`illusions list`: the registered tasks and simplifiers."""

from __future__ import annotations

from illusions.cli.app import command


@command("list")
def list_registered() -> None:
    """List the registered tasks and simplifiers."""
    from rich.console import Console
    from rich.table import Table

    from illusions import registry

    console = Console()
    for kind, table in (("task", registry.TASKS), ("simplifier", registry.SIMPLIFIERS)):
        out = Table(title=f"{kind}s", title_justify="left")
        out.add_column("name", style="bold")
        out.add_column("description")
        for name in sorted(table):
            out.add_row(name, registry.DESCRIPTIONS[(kind, name)])
        if not table:
            out.add_row("-", f"no {kind}s registered yet")
        console.print(out)
