"""`hil deploy`: placeholder until implemented."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `deploy` subcommand(s) to the CLI."""
