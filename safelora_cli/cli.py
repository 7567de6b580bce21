"""The ``safelora`` command line: parse, call the library, render. Nothing more."""

from __future__ import annotations

import typer

from safelora_cli import __version__

app = typer.Typer(
    name="safelora",
    help="Safe LoRA for PEFT adapters: project LoRA updates onto the alignment subspace.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safelora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Safe LoRA for PEFT adapters."""


def main() -> None:
    """Console-script entry point."""
    app()
