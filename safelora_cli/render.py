"""Terminal rendering for the CLI: consoles, progress bars, error lines. No library logic.

Human output (progress, summaries, errors) goes to stderr; results (tables, JSON) to stdout.
When a stream is not a terminal, output turns plain: no colour, no box drawing, no bar.
"""

from __future__ import annotations

import os
import sys
import time
import unicodedata
from functools import cache
from typing import TYPE_CHECKING, Any

from safelora_cli.progress import size_text

if TYPE_CHECKING:
    from rich.console import Console


# Unicode categories that move the cursor, change direction or hide text: controls (C0, DEL,
# C1), format characters (bidi overrides/isolates, zero-width joiners), line/paragraph
# separators, lone surrogates (undecodable bytes of a file name) and unassigned/private code
# points, which a terminal may treat as anything.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


@cache
def _escape_char(ch: str) -> str:
    o = ord(ch)
    if o < 0x80 and (o >= 0x20 and o != 0x7F):
        return ch
    if o >= 0x80 and unicodedata.category(ch) not in _UNSAFE_CATEGORIES:
        return ch
    if o <= 0xFF:
        return f"\\x{o:02x}"
    if o <= 0xFFFF:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def safe_text(text: object) -> str:
    """``text`` with every character that could drive a terminal escaped as ``\\xNN`` /
    ``\\uNNNN`` (ESC, BEL, CR, newline, tab, other C0/C1 controls, bidi overrides, zero-width
    and other format characters, lone surrogates).

    The one place where names from inputs (tensor keys, shard names, metadata, paths, config
    strings) are made safe to show: every message, table cell and progress line goes through
    it, so an input cannot move the cursor, recolour or hide text, or forge an ``error:`` line
    (a newline in a name stays on its line as ``\\x0a``). Printable text, including
    non-ASCII letters, is unchanged; rich markup is not interpreted anywhere it is used.
    """
    s = str(text)
    if s.isascii() and s.isprintable():
        return s  # the common case, without a per-character pass
    return "".join(_escape_char(ch) for ch in s)


@cache
def _console(stderr: bool) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    # Plain output off a terminal: pipes and CI logs get no colour codes and a fixed width,
    # so wrapped tables stay readable and golden tests are stable.
    return Console(
        file=stream,
        stderr=stderr,
        force_terminal=None if tty else False,
        no_color=not tty or "NO_COLOR" in os.environ,
        highlight=False,
        soft_wrap=False,
        width=None if tty else 100,
    )


def err_console() -> Console:
    """Rich console on stderr (progress, summaries, errors)."""
    return _console(True)


def out_console() -> Console:
    """Rich console on stdout (tables)."""
    return _console(False)


def reset_consoles() -> None:
    """Forget cached consoles (CliRunner swaps sys.stdout/sys.stderr between invocations)."""
    _console.cache_clear()


def is_plain(stderr: bool = False) -> bool:
    """True when the stream is not a terminal: no colour, no boxes, no bars."""
    stream = sys.stderr if stderr else sys.stdout
    return not stream.isatty()


def say(message: str, *, stderr: bool = True) -> None:
    """One human line through rich (markup in ``message`` is not interpreted, text is
    :func:`safe_text`-escaped), long lines kept whole."""
    from rich.text import Text

    con = err_console() if stderr else out_console()
    con.print(Text(safe_text(message)), soft_wrap=True)


def print_error(lines: list[str]) -> None:
    """Write an error as ``error: <what>`` plus an indented hint line, on stderr."""
    first, *rest = lines
    sys.stderr.write(f"error: {safe_text(first)}\n")
    for line in rest:
        sys.stderr.write(f"  {safe_text(line)}\n")
    sys.stderr.flush()


def status(message: str, *, quiet: bool = False) -> None:
    """One human line on stderr, unless ``quiet``."""
    if not quiet:
        sys.stderr.write(safe_text(message) + "\n")
        sys.stderr.flush()


class RichProgress:
    """A :class:`safelora_cli.progress.Progress` drawn as a rich bar on stderr.

    Shows what it does (``label``, or the library's description), units done, MB/s, time
    elapsed and time left (both labelled) and the weight being worked on (``item``). Disabled
    (a no-op) with ``quiet`` or when stderr is not a terminal.
    """

    def __init__(self, *, quiet: bool = False, label: str | None = None) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self.label = label
        self._bar = None
        self._task = None
        self._bytes = 0
        self._fetched: tuple[int, int] | None = None
        self._t0 = time.perf_counter()

    def start(self, total: int, description: str) -> None:
        self._t0 = time.perf_counter()
        self._bytes = 0
        self._fetched = None
        if not self.enabled:
            return
        from rich.markup import escape as markup_escape
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.table import Column

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            # The weight name goes last and is the one cell cut (with an ellipsis) when the
            # terminal is narrow: the figures before it stay whole.
            TextColumn(
                "{task.fields[item]}",
                table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1),
            ),
            console=err_console(),
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(
            markup_escape(safe_text(self.label or description)), total=total, rate="", item=""
        )

    def item(self, name: str) -> None:
        """The weight now being worked on (shown at the end of the bar; names come from the
        inputs, so control characters and markup are escaped)."""
        if self._bar is not None:
            from rich.markup import escape as markup_escape

            self._bar.update(self._task, item=markup_escape(safe_text(name)))

    def fetched(self, nbytes: int, total: int) -> None:
        """Bytes received from the Hub so far by ranged reads, of ``total`` (the shards' size):
        the rate column then shows them and the download rate instead of the read rate."""
        if self._fetched is None:
            self._fetched = (nbytes, nbytes)  # (at start, now): the rate counts this run only
        else:
            self._fetched = (self._fetched[0], nbytes)
        self._fetched_total = total
        self.advance(0)

    def advance(self, units: int = 1, nbytes: int = 0) -> None:
        self._bytes += nbytes
        if self._bar is None:
            return
        dt = max(time.perf_counter() - self._t0, 1e-9)
        if self._fetched is not None:
            first, now = self._fetched
            rate = (
                f"fetched {size_text(now)} of {size_text(self._fetched_total)} "
                f"{(now - first) / dt / 1e6:6.1f} MB/s"
            )
        else:
            rate = f"{self._bytes / dt / 1e6:7.1f} MB/s"
        self._bar.update(self._task, advance=units, rate=rate)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def selection_rule(rep: Any) -> str:
    """A report's selection as one phrase: the flag, the threshold it gave, boundary ties.

    ``rep``: a patch or patch-model report (``selection``, ``threshold``, ``ties``).
    """
    sel = rep.selection.to_json()
    flag = {"num_layers": "--num-layers", "threshold": "--threshold"}.get(sel["mode"], "--fraction")
    rule = f"{flag} {sel['value']}"
    if sel["mode"] != "threshold" and rep.threshold is not None:
        rule += f" -> cosine <= {rep.threshold:.5f}"
    if rep.ties:
        rule += f" ({rep.ties} more tied at the boundary)"
    return rule


# Modules named in the summary: every projected one up to this many (the rest are counted and
# listed in the report), then the lowest cosines that were not projected (the margin).
SHOW_PROJECTED = 10
SHOW_KEPT = 3


def module_lines(rep: Any) -> list[str]:
    """The summary's module lists: projected ones (lowest cosine first, the first
    :data:`SHOW_PROJECTED` then ``+N more``), then the lowest cosines left as they were."""
    from rich.markup import escape

    ranked = rep.lowest(len(rep.modules))
    chosen = [m for m in ranked if m.projected]
    kept = [m for m in ranked if not m.projected]
    where = "--json lists all" if rep.dry_run else "safelora_report.json"
    lines: list[str] = []
    if chosen:
        lines.append("  would project:" if rep.dry_run else "  projected:")
        lines.extend(f"    {m.rounded:.5f}  {escape(m.name)}" for m in chosen[:SHOW_PROJECTED])
        if len(chosen) > SHOW_PROJECTED:
            lines.append(f"    +{len(chosen) - SHOW_PROJECTED} more ({where})")
    if kept:
        lines.append("  not projected, lowest cosines:")
        lines.extend(f"    {m.rounded:.5f}  {escape(m.name)}" for m in kept[:SHOW_KEPT])
        if len(kept) > SHOW_KEPT:
            lines.append(f"    +{len(kept) - SHOW_KEPT} more ({where})")
    return lines
