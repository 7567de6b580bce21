"""``safelora compute-projections``: parse, call :mod:`safelora_cli.compute`, render."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from safelora_cli.options import (
    Device,
    Download,
    Quiet,
    Representation,
    RevisionAligned,
    RevisionBase,
)


def command(
    base: Annotated[
        str,
        typer.Argument(metavar="BASE", help="Base (unaligned) model: directory, file or Hub id."),
    ],
    aligned: Annotated[
        str, typer.Argument(metavar="ALIGNED", help="Aligned model: directory, file or Hub id.")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Cache directory to create or extend.")
    ],
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter", "-a", help="Adapter whose LoRA modules choose the targets (repeatable)."
        ),
    ] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            "--targets",
            help="Module-name suffixes (q_proj,v_proj), or a regex searched in module paths "
            "(re:PATTERN, or any pattern with regex metacharacters); 2-D weights only.",
        ),
    ] = None,
    device: Device = "auto",
    revision_base: RevisionBase = None,
    revision_aligned: RevisionAligned = None,
    representation: Representation = "auto",
    download: Download = "ranged",
    quiet: Quiet = False,
) -> None:
    """Stream BASE and ALIGNED one weight pair at a time and cache one projector per target.

    Under accelerate launch (or torchrun) with several processes, the weights are split across
    them (docs/scale-out.md).
    """
    from safelora_cli.compute import compute_projections
    from safelora_cli.render import RichProgress, status

    dist = _dist(device)
    main = dist is None or dist.is_main
    with _quiet_on_other_ranks(dist):
        summary = compute_projections(
            base,
            aligned,
            output,
            adapters=tuple(adapter or ()),
            targets=targets,
            device=device,
            revision_base=revision_base,
            revision_aligned=revision_aligned,
            progress=RichProgress(quiet=quiet or not main),
            dist=dist,
            representation=representation,
            download=download,
        )
    if main:
        status(summary.line(), quiet=quiet)


def _dist(device: str) -> Any:
    """The multi-process context under a launcher; None (nothing imported) otherwise."""
    from safelora_cli.distributed import current, launched

    return current(device) if launched() else None


@contextlib.contextmanager
def _quiet_on_other_ranks(dist: Any) -> Iterator[None]:
    """A failure shared by every rank is printed by rank 0 only; the others exit alike."""
    try:
        yield
    except Exception as exc:
        if dist is None:
            raise
        from safelora_cli.distributed import quiet_exit_code

        code = quiet_exit_code(exc)
        if code is None:
            raise
        raise typer.Exit(code) from None
    finally:
        if dist is not None:
            dist.close()
