"""``safelora patch``: parse, call :mod:`safelora_cli.patch`, render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safelora_cli.errors import SafeLoraError
from safelora_cli.options import (
    AlignedOpt,
    BaseOpt,
    Device,
    DryRun,
    Force,
    Fraction,
    Json,
    NumLayers,
    Projections,
    Quiet,
    RevisionAligned,
    RevisionBase,
    Threshold,
)


def command(
    adapters: Annotated[list[str], typer.Argument(help="Adapter directories or Hub ids.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output adapter (or parent) directory.")
    ],
    projections: Projections = None,
    base: BaseOpt = None,
    aligned: AlignedOpt = None,
    num_layers: NumLayers = None,
    threshold: Threshold = None,
    fraction: Fraction = None,
    device: Device = "auto",
    dry_run: DryRun = False,
    force: Force = False,
    json_out: Json = False,
    revision_base: RevisionBase = None,
    revision_aligned: RevisionAligned = None,
    quiet: Quiet = False,
) -> None:
    """Project the selected LoRA modules of one or many adapters and write new adapters."""
    raise SafeLoraError("patch is not implemented yet.", hint="See issue 4.")
