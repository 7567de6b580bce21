"""The ``safelora`` command line: parse, call the library, render. Nothing more.

Subcommands live in ``safelora_cli/commands/``; each is wrapped by :func:`cli_errors`, the one
place where library errors become messages and exit codes (DESIGN §6).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from typer.core import TyperCommand

from safelora_cli import __version__, interrupts
from safelora_cli.errors import EXIT_ERROR, SafeLoraError

F = TypeVar("F", bound=Callable[..., Any])


class _Command(TyperCommand):
    """Usage lines name the arguments as the docs do (``BASE ALIGNED``, ``ADAPTER...``), not as
    typer 0.26-0.28 writes required ones (``{base} {aligned}``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if getattr(param, "param_type_name", "") == "argument":
                pieces.append(param.make_metavar(ctx))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


app = typer.Typer(
    name="safelora",
    help="Safe LoRA for PEFT adapters: project LoRA updates onto the alignment subspace.",
    no_args_is_help=True,
    add_completion=True,
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
        interrupts.running()
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except SafeLoraError as exc:
            if debug_enabled():
                raise
            print_error(exc.lines())
            raise typer.Exit(exc.exit_code) from None
        except (interrupts.Interrupted, KeyboardInterrupt) as exc:
            # Ctrl-C / SIGTERM / SIGHUP (interrupts.install): the clean-up already ran on the
            # way here (every writer cleans up in ``except BaseException``); one line, 128 + N.
            if debug_enabled():
                raise
            print_error([interrupts.line(exc)])
            raise typer.Exit(interrupts.exit_code(exc)) from None
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
        except BrokenPipeError:
            # The reader of stdout went away (``safelora inspect ... | head``): stop quietly,
            # as a command killed by SIGPIPE would, instead of reporting an error.
            _silence_stdout()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except OSError as exc:
            if debug_enabled():
                raise
            print_error(os_error_lines(exc))
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


# What a shell reports for a command killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141

_OS_HINTS: dict[int, str] = {
    errno.ENOSPC: "Free some disk space (or write to another disk with -o) and run it again.",
    errno.EDQUOT: "The disk quota is exhausted: free some space or write elsewhere (-o).",
    errno.EACCES: "Choose a location you can write to (-o), or fix the permissions.",
    errno.EPERM: "Choose a location you can write to (-o), or fix the permissions.",
    errno.EROFS: "The file system is read-only: choose another location (-o).",
    errno.ENOTDIR: "A component of the path is a file, not a directory: choose another path.",
    errno.EEXIST: "Something already exists there: remove it or choose another path.",
    errno.ENAMETOOLONG: "The path is too long (or loops through symlinks): use a shorter one.",
    errno.ELOOP: "The path loops through symlinks: fix the links or use another path.",
    errno.EMFILE: "Too many open files: raise the limit (ulimit -n) and run it again.",
    errno.EIO: "The disk reported an I/O error: check the device, then run it again.",
}


def os_error_lines(exc: OSError) -> list[str]:
    """An operating-system failure that no library error explained, as two lines."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f": {exc.filename}" if exc.filename else ""
    if exc.filename2:
        where += f" -> {exc.filename2}"
    hint = _OS_HINTS.get(exc.errno or 0, "Check the paths given and free disk space, then retry.")
    return [f"{what}{where}", hint]


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


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

    for name, mod in (("compute-projections", compute), ("patch", patch), ("inspect", inspect)):
        app.command(name, no_args_is_help=True, cls=_Command)(cli_errors(mod.command))


_register()


def main() -> None:
    """Console-script entry point (``safelora_cli.__main__.main`` calls it after installing the
    signal handlers before this module's imports; installing again here is harmless)."""
    interrupts.install()
    # Set before torch (and its OpenMP runtime) loads: with a prefetch or writer thread beside
    # the main one, spinning OpenMP workers made each small torch call 10-100x slower on 2 cores
    # (bench/patch_bench.py). A user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app(prog_name="safelora")
    finally:
        # Flush here, not at interpreter exit, so a closed pipe ends quietly (no "Exception
        # ignored" noise on stderr).
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
            sys.exit(EXIT_BROKEN_PIPE)
        except (OSError, ValueError):
            pass
    sys.exit(0)
