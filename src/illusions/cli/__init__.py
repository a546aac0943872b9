"""The Typer command-line interface.

``app`` lives in :mod:`illusions.cli.app`; each command group is its own module, which keeps every
command a thin layer: load a recipe, call one library function, write artifacts, print their paths.
Heavy libraries (torch, transformer_lens, sklearn, circuitsvis) are imported inside command bodies so
``illusions --help`` stays fast.
"""

from illusions.cli import analyze, data, listing, report, reproduce, train  # noqa: F401  (register commands)
from illusions.cli.app import app

__all__ = ["app"]
