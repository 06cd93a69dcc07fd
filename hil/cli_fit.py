"""`hil fit`: placeholder until implemented."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `fit` subcommand(s) to the CLI."""
