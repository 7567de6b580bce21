"""Progress reporting without terminal knowledge.

Long-running library calls take a :class:`Progress`; the CLI passes one that draws a rich bar
on stderr, batch scripts pass nothing (:class:`NullProgress`) or their own object with these
methods (a callback: docs/batch.md).

``item(name)`` is optional: a progress object without it still works; the library calls it
through :func:`announce` with the weight it is working on, so a bar can name it. So is
``fetched(nbytes, total)`` (:func:`report_fetched`): bytes received from the Hub by ranged
reads so far, and the total size of the shards they come from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from safelora_cli.reader import CheckpointReader


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

    def item(self, name: str) -> None:
        pass

    def finish(self) -> None:
        pass


def size_text(n: int) -> str:
    """A byte count for people (decimal units): kB below 0.1 MB, GB from 1 GB."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def fetched_line(fetched: int, total: int) -> str:
    """``fetched X of Y (the shards' total) from the Hub``: what ranged reads cost (``total``:
    the size of the shards read by byte ranges)."""
    return f"fetched {size_text(fetched)} of {size_text(total)} (the shards' total) from the Hub"


def hub_transfer(*readers: CheckpointReader) -> tuple[int, int]:
    """(bytes fetched, total size of the files read by byte ranges) over ``readers``; (0, 0)
    when none reads by ranges. Valid after the readers are closed."""
    fetched = sum(r.bytes_fetched for r in readers)
    total = sum(r.file_size(f) for r in readers for f in r.remote_files)
    return fetched, total


def report_fetched(progress: object | None, fetched: int, total: int) -> None:
    """Tell ``progress`` how many bytes came from the Hub so far (``total``: the size of the
    files read by byte ranges), if it has a ``fetched(nbytes, total)`` method."""
    fn = getattr(progress, "fetched", None)
    if callable(fn):
        fn(fetched, total)


def announce(progress: object | None, name: str) -> None:
    """Tell ``progress`` which weight is being worked on, if it has an ``item(name)`` method."""
    item = getattr(progress, "item", None)
    if callable(item):
        item(name)
