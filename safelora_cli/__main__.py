"""``python -m safelora_cli`` (and the ``safelora`` console script) run the command line.

Signal handling is installed before anything heavy is imported (typer, torch): a Ctrl-C or
SIGTERM during start-up ends as cleanly as one during the run (one line, exit 130 / 143).
"""

import sys

from safelora_cli import interrupts


def main() -> None:
    """Console-script entry point: signals first, then the CLI."""
    interrupts.install()
    try:
        from safelora_cli.cli import main as cli_main

        cli_main()
    except (interrupts.Interrupted, KeyboardInterrupt) as exc:
        # Outside a command (start-up, argument parsing, the final flush): same line and
        # code as inside one (cli.cli_errors).
        try:
            sys.stderr.write(f"error: {interrupts.line(exc)}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        sys.exit(interrupts.exit_code(exc))
    finally:
        # A signal whose exception something swallowed (an "Exception ignored" callback) still
        # ends the run as that signal: never exit 0 after a SIGTERM.
        signum = interrupts.pending()
        if signum is not None:
            sys.stderr.write(f"error: {interrupts.Interrupted(signum).line()}\n")
            sys.stderr.flush()
            sys.exit(128 + signum)


if __name__ == "__main__":
    main()
