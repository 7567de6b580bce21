"""Ctrl-C, SIGTERM and SIGHUP as one clean failure (DESIGN §8; docs/security.md).

Standard library only, so the command line installs it before anything heavy (typer, torch) is
imported. :func:`install` makes each of these signals raise :class:`Interrupted` in the main
thread. It derives from ``BaseException``, not ``Exception``: no library ``except Exception``
swallows it, click does not turn it into "Aborted!", and every ``except BaseException`` /
``finally`` clean-up (staging directories, locks, temporary files) runs exactly as for any other
failure. The CLI then prints one line and exits ``128 + signal`` (130 for SIGINT, 143 for
SIGTERM, 129 for SIGHUP), as a shell reports a command killed by that signal.

Once one signal has been received, further ones are ignored until the process exits: a second
Ctrl-C must not cut the clean-up of the first short. (``kill -9`` still ends the process at
once; the outputs are atomic against that too.)
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

NAMES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"}


class Interrupted(BaseException):
    """A signal asked the process to stop; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(NAMES.get(signal.Signals(self.signum), f"signal {self.signum}"))

    def line(self) -> str:
        """The one line the CLI prints (after ``error: ``)."""
        what = NAMES.get(signal.Signals(self.signum), f"stopped by signal {self.signum}")
        return (
            f"{what} ({signal.Signals(self.signum).name}): stopped cleanly, nothing half-written "
            "is left (an interrupted compute-projections resumes when rerun)"
        )


_fired: list[int] = []
_running: list[bool] = []  # set once a command's body runs (there is something to clean up)
_reported: list[bool] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    if _fired:
        return  # already stopping: let the clean-up of the first signal finish
    _fired.append(signum)
    if not _running:
        # Start-up (imports, argument parsing): nothing to clean up yet, and an exception
        # raised here can land in an import-machinery callback that only prints "Exception
        # ignored" and carries on. Leave at once.
        _report_and_exit(signum)
    raise Interrupted(signum)


def _report_and_exit(signum: int) -> None:
    import os
    import sys

    try:
        sys.stderr.write(f"error: {Interrupted(signum).line()}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(128 + signum)


def running() -> None:
    """A command's body starts: from now on a signal raises :class:`Interrupted` so the
    clean-up runs (before, it exits at once)."""
    _running.append(True)


def pending() -> int | None:
    """The signal received but never reported (its exception was swallowed), else None."""
    return _fired[0] if _fired and not _reported else None


def install() -> None:
    """Route SIGINT, SIGTERM and SIGHUP to :class:`Interrupted` (main thread only; no-op
    elsewhere). A signal the parent process set to be ignored (``nohup``, ``trap '' INT``)
    stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in NAMES:
        try:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue
            signal.signal(sig, _handler)
        except (OSError, ValueError):  # pragma: no cover - platforms without the signal
            pass


def exit_code(exc: BaseException) -> int:
    """The exit status for an interruption: ``128 + signum``, 130 for a plain Ctrl-C."""
    _reported.append(True)
    return exc.exit_code if isinstance(exc, Interrupted) else 130


def line(exc: BaseException) -> str:
    """The one line to print for an interruption (Interrupted or a plain KeyboardInterrupt)."""
    return exc.line() if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT).line()
