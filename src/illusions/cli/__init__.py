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

    OpenMP threads idle between operations sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, unless the
    environment sets it; read when torch loads, which no command has done yet): a spinning thread on a core
    another process holds makes every operation wait for the scheduler. With two busy cores, the main job with
    ``--threads 2`` took 130 s wall and 46.7 CPU seconds spinning, 38.7 s and 14.0 CPU seconds passive.
    """
    import gc
    import os

    from illusions.cli.app import mark_process_start

    mark_process_start()  # what other processes use from now on sets the default thread count
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app(prog_name="illusions")
    finally:
        gc.freeze()
