"""The `hil` command line: a thin layer of argument parsing over library calls.

Each subcommand lives in its own `hil/cli_*.py` module exposing `register(app)`; the command
body parses arguments and calls one library function (which tests call directly).
"""

from __future__ import annotations

import typer

from hil import cli_calibrate, cli_deploy, cli_eval, cli_fit, cli_measure

app = typer.Typer(
    name="hil",
    help="romer-hil: measure an analog CIM chip, fit its noise model, calibrate MoE LLMs with ROMER, deploy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

for _module in (cli_measure, cli_fit, cli_eval, cli_calibrate, cli_deploy):
    _module.register(app)


def main() -> None:  # pragma: no cover - console entry
    app()
