"""Shim so `python cli.py ...` runs the same Typer app as the `illusions` command."""
from illusions.cli import run

if __name__ == "__main__":
    run()
