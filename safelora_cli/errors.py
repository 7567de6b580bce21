"""The error types of the library and their exit codes (DESIGN §6).

Every failure the user can fix is a :class:`SafeLoraError`: a one-line ``message`` naming the
file or weight, and an optional one-line ``hint`` saying what to do. The CLI maps these, and only
these, to clean messages; anything else is a bug and shows a traceback under
``SAFELORA_DEBUG=1``.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE = 3


class SafeLoraError(Exception):
    """An error in the inputs or the run (exit code 1).

    ``message`` says what is wrong and where (a path or weight name); ``hint`` says what to do.
    """

    exit_code: int = EXIT_ERROR

    def __init__(self, message: str, *, hint: str | None = None, path: str | Path | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.path = str(path) if path is not None else None

    def lines(self) -> list[str]:
        """The message as shown to the user: one or two lines."""
        out = [
            self.message
            if self.path is None or self.path in self.message
            else f"{self.message} ({self.path})"
        ]
        if self.hint:
            out.append(self.hint)
        return out

    def __str__(self) -> str:
        return " ".join(self.lines())


class CheckpointError(SafeLoraError):
    """A model checkpoint (base or aligned) is missing, malformed or inconsistent."""


class SourceError(SafeLoraError):
    """A path or Hub id cannot be resolved (missing, not cached offline, gated, not found)."""


class FetchError(SourceError):
    """A transfer from the Hub failed after its retries (connection dropped, server errors).

    Transient: a projection cache keeps the entries finished before it, and the same command
    resumes (fetching only what is missing).
    """


class AdapterError(SafeLoraError):
    """A PEFT adapter directory is missing files, malformed or does not fit the model."""


class CacheError(SafeLoraError):
    """A projection cache is corrupt, incomplete for the request, or built from other weights."""


class OutputError(SafeLoraError):
    """The output cannot be written (exists, equals an input, not writable, disk full)."""


class UsageError(SafeLoraError):
    """Contradictory or out-of-range arguments (exit code 2)."""

    exit_code = EXIT_USAGE


class GateError(SafeLoraError):
    """``inspect --fail-below`` tripped (exit code 3)."""

    exit_code = EXIT_GATE
