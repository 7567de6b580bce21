"""Shared ``Annotated`` option aliases: every subcommand spells a flag the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Projections = Annotated[
    Path | None,
    typer.Option("--projections", "-p", help="Projection cache built by compute-projections."),
]
BaseOpt = Annotated[
    str | None,
    typer.Option("--base", help="Base (unaligned) model: directory, .safetensors file or Hub id."),
]
AlignedOpt = Annotated[
    str | None,
    typer.Option("--aligned", help="Aligned model: directory, .safetensors file or Hub id."),
]
RevisionBase = Annotated[
    str | None, typer.Option("--revision-base", help="Hub revision of the base model.")
]
RevisionAligned = Annotated[
    str | None, typer.Option("--revision-aligned", help="Hub revision of the aligned model.")
]
TargetsOpt = Annotated[
    str | None,
    typer.Option(
        "--targets",
        help="Weights to consider: module-name suffixes (q_proj,v_proj) or a regex (re:...). "
        "[default: every linear weight of the repeated blocks]",
    ),
]
Revision = Annotated[
    str | None, typer.Option("--revision", help="Hub revision of the fine-tuned model.")
]
ModelJson = Annotated[
    bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")
]
Device = Annotated[
    str,
    typer.Option("--device", help="auto, cpu, cuda or cuda:N. auto uses CUDA when available."),
]
Representation = Annotated[
    str,
    typer.Option(
        "--representation",
        help="How each projector is stored: auto (per weight, by estimated time and bytes; "
        "docs/algorithm.md), gram (C = V V^T / ||V||_F) or factor (F = V / sqrt(||V||_F)).",
    ),
]
Download = Annotated[
    str,
    typer.Option(
        "--download",
        help="Hub models: ranged (fetch only the needed tensors' bytes; shards already in the "
        "Hugging Face cache are read from disk) or full (download the needed shards whole into "
        "the Hugging Face cache, as hf download does).",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
Json = Annotated[
    bool, typer.Option("--json", help="Print one JSON object per adapter per line on stdout.")
]
NumLayers = Annotated[
    int | None,
    typer.Option(
        "--num-layers", "-k", help="Project the K modules with the lowest cosine [default: 10]."
    ),
]
Threshold = Annotated[
    float | None,
    typer.Option("--threshold", "-t", help="Project every module whose cosine is <= T."),
]
Fraction = Annotated[
    float | None,
    typer.Option("--fraction", "-f", help="Project ceil(F * N) modules with the lowest cosine."),
]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Report what would happen; write nothing.")]
