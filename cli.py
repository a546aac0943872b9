"""Shim so `python cli.py ...` runs the same Typer app as the `illusions` command."""
from illusions.cli import app

if __name__ == "__main__":
    app()
