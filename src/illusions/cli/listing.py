"""`illusions list`: the registered tasks and simplifiers, and the bundled models by name."""

from __future__ import annotations

from typing import Any

from illusions.cli.app import command


@command("list")
def list_registered() -> None:
    """List the registered tasks and simplifiers, and the bundled models (names for --model)."""
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
    console.print(bundled_table())


def bundled_table() -> Any:
    """The bundled models: name (for ``--model``), task, size, and recorded accuracy per split."""
    from rich.table import Table

    from illusions.bundled import catalogue
    from illusions.errors import IllusionsError

    out = Table(title="bundled models (pass a name as --model NAME; a folder of that name wins)",
                title_justify="left")
    out.add_column("name", style="bold", no_wrap=True)
    out.add_column("task")
    out.add_column("parameters", justify="right")
    out.add_column("MB", justify="right")
    out.add_column("accuracy on the full splits (metrics.json)")
    models = catalogue()
    for model in models.values():
        try:
            params, size = model.size()
            metrics = model.metrics()
            task = model.task()
        except IllusionsError as exc:  # a damaged asset is listed, not fatal
            out.add_row(model.name, "?", "?", "?", f"unreadable: {exc}")
            continue
        accuracies = metrics.get("accuracies") if isinstance(metrics, dict) else None
        text = " · ".join(f"{split} {entry['accuracy']:.3f}" for split, entry in (accuracies or {}).items()
                          if isinstance(entry, dict) and isinstance(entry.get("accuracy"), int | float))
        out.add_row(model.name, task, f"{params:,}", f"{size / 2**20:.2f}", text or "not recorded")
    if not models:
        out.add_row("-", "", "", "", "no model is bundled")
    return out
