"""``safelora compute-projections``: parse, call :mod:`safelora_cli.compute`, render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safelora_cli.options import Device, Quiet, RevisionAligned, RevisionBase


def command(
    base: Annotated[str, typer.Argument(help="Base (unaligned) model: directory, file or Hub id.")],
    aligned: Annotated[str, typer.Argument(help="Aligned model: directory, file or Hub id.")],
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
    quiet: Quiet = False,
) -> None:
    """Stream BASE and ALIGNED one weight pair at a time and cache one projector per target."""
    from safelora_cli.compute import compute_projections
    from safelora_cli.render import RichProgress, status

    summary = compute_projections(
        base,
        aligned,
        output,
        adapters=tuple(adapter or ()),
        targets=targets,
        device=device,
        revision_base=revision_base,
        revision_aligned=revision_aligned,
        progress=RichProgress(quiet=quiet),
    )
    status(summary.line(), quiet=quiet)
