"""`hil fit`: fit a noise model to a measurement dump (thin layer over `noise_fit.fit.fit_dump`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the `fit` subcommand to the CLI."""

    @app.command("fit")
    def fit(
        dump: Path = typer.Argument(..., help="HDF5 measurement dump written by `hil measure`"),
        out: Path = typer.Option(Path("noise.json"), "--out", "-o", help="where to write the fitted noise model"),
        report: Path | None = typer.Option(None, "--report", help="write a PNG fit report here"),
        as_json: bool = typer.Option(False, "--json", help="print the fitted model as JSON instead of a table"),
        t0: float = typer.Option(20.0, help="drift reference time t0 (s)"),
        n_boot: int = typer.Option(50, help="bootstrap replicates for confidence intervals"),
        seed: int = typer.Option(0, help="seed of the bootstrap generator"),
        name: str | None = typer.Option(None, help="name of the fitted model"),
    ) -> None:
        """Fit programming noise, drift, read noise and stuck cells from DUMP."""
        from rich.console import Console

        from noise_fit.fit import DumpError, FitConfig, fit_dump
        from noise_fit.report import plot_report, summary_table

        err = Console(stderr=True)
        try:
            cfg = FitConfig(t0=t0, n_boot=n_boot, seed=seed, name=name)
            result = fit_dump(dump, cfg)
        except (DumpError, ValueError) as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        try:
            result.model.to_json(out)
            if report is not None:
                plot_report(result, report)
        except OSError as e:
            err.print(f"[red]error:[/red] cannot write output: {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        for w in result.warnings:
            err.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)
        if as_json:
            typer.echo(json.dumps(result.model.to_dict(), default=str))
        else:
            Console().print(summary_table(result))
            typer.echo(f"wrote {out}" + (f" and {report}" if report else ""))
