"""``safelora inspect``: parse, call :mod:`safelora_cli.inspection`, render."""

from __future__ import annotations

from typing import Annotated

import typer

from safelora_cli.errors import SafeLoraError
from safelora_cli.options import (
    AlignedOpt,
    BaseOpt,
    Device,
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
    adapters: Annotated[
        list[str] | None, typer.Argument(help="Adapter directories or Hub ids (optional).")
    ] = None,
    projections: Projections = None,
    base: BaseOpt = None,
    aligned: AlignedOpt = None,
    num_layers: NumLayers = None,
    threshold: Threshold = None,
    fraction: Fraction = None,
    json_out: Json = False,
    sort: Annotated[str, typer.Option("--sort", help="Row order: layer or cosine.")] = "layer",
    fail_below: Annotated[
        float | None,
        typer.Option("--fail-below", help="Exit 3 when any defined cosine is below T (CI gate)."),
    ] = None,
    device: Device = "auto",
    revision_base: RevisionBase = None,
    revision_aligned: RevisionAligned = None,
    quiet: Quiet = False,
) -> None:
    """Per-module similarity tables, or summaries of a cache or an adapter."""
    raise SafeLoraError("inspect is not implemented yet.", hint="See issue 5.")
