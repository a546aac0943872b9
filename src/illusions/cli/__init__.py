"""The Typer command-line interface.

``app`` lives in :mod:`illusions.cli.app`; each command group is its own module, which keeps every
command a thin layer: load a recipe, call one library function, write artifacts, print their paths.
Heavy libraries (torch, transformer_lens, sklearn, circuitsvis) are imported inside command bodies so
``illusions --help`` stays fast.
"""

from illusions.cli import analyze, data, listing, report, reproduce, train  # noqa: F401  (register commands)
from illusions.cli.app import app

__all__ = ["app", "run"]


def run() -> None:
    """Process entry point (console script, ``python -m illusions``, ``cli.py``): run ``app``, then freeze the heap.

    After a command, the objects torch and transformer_lens created are still alive; at interpreter exit Python's
    final collections would traverse all of them (about 2.4 s of the main job's 20 s on these machines).
    ``gc.freeze()`` moves them out of the collector's reach, so the process ends as soon as the command does.
    Only whole processes use this: ``app`` itself, as in-process callers and CliRunner use it, frees normally.
    """
    import gc

    try:
        app(prog_name="illusions")
    finally:
        gc.freeze()
