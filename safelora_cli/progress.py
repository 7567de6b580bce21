"""Progress reporting without terminal knowledge.

Long-running library calls take a :class:`Progress`; the CLI passes one that draws a rich bar
on stderr, batch scripts pass nothing (:class:`NullProgress`).
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives progress events from a long-running library call."""

    def start(self, total: int, description: str) -> None:
        """``total`` units of work (weights, adapters) are about to be processed."""

    def advance(self, units: int = 1, nbytes: int = 0) -> None:
        """``units`` more are done; ``nbytes`` bytes were read from disk for them."""

    def finish(self) -> None:
        """The work is complete (or abandoned)."""


class NullProgress:
    """A :class:`Progress` that ignores everything."""

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, units: int = 1, nbytes: int = 0) -> None:
        pass

    def finish(self) -> None:
        pass
