"""The ``safelora`` command line: parse, call the library, render. Nothing more.

Subcommands live in ``safelora_cli/commands/``; each is wrapped by :func:`cli_errors`, the one
place where library errors become messages and exit codes (DESIGN §6).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from safelora_cli import __version__
from safelora_cli.errors import EXIT_ERROR, SafeLoraError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="safelora",
    help="Safe LoRA for PEFT adapters: project LoRA updates onto the alignment subspace.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def debug_enabled() -> bool:
    """``SAFELORA_DEBUG=1`` shows tracebacks instead of one-line errors."""
    return os.environ.get("SAFELORA_DEBUG", "") not in ("", "0")


def cli_errors(fn: F) -> F:
    """Map library errors to one or two lines on stderr and the DESIGN §6 exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from safelora_cli.render import print_error, reset_consoles

        reset_consoles()
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except SafeLoraError as exc:
            if debug_enabled():
                raise
            print_error(exc.lines())
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            print_error(["interrupted; nothing was written."])
            raise typer.Exit(130) from None
        except MemoryError:
            if debug_enabled():
                raise
            print_error(
                [
                    "out of memory.",
                    "Use a machine with more RAM, or --device cuda for compute-projections.",
                ]
            )
            raise typer.Exit(EXIT_ERROR) from None
        except OSError as exc:
            if debug_enabled():
                raise
            where = f": {exc.filename}" if exc.filename else ""
            print_error([f"{exc.strerror or exc}{where}", "Check the path and free disk space."])
            raise typer.Exit(EXIT_ERROR) from None
        except Exception as exc:
            if debug_enabled():
                raise
            print_error(
                [
                    f"internal error: {type(exc).__name__}: {exc}",
                    "A bug in safelora: rerun with SAFELORA_DEBUG=1 and report the traceback.",
                ]
            )
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper  # type: ignore[return-value]


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
    """Safe LoRA for PEFT adapters: project LoRA updates onto the alignment subspace."""


def _register() -> None:
    from safelora_cli.commands import compute, inspect, patch

    app.command("compute-projections", no_args_is_help=True)(cli_errors(compute.command))
    app.command("patch", no_args_is_help=True)(cli_errors(patch.command))
    app.command("inspect", no_args_is_help=True)(cli_errors(inspect.command))


_register()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="safelora")
    sys.exit(0)
