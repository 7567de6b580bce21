"""``safelora patch-model``: parse, call :mod:`safelora_cli.model_patch`, render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from safelora_cli.options import (
    AlignedOpt,
    BaseOpt,
    Device,
    Download,
    DryRun,
    Force,
    Fraction,
    ModelJson,
    NumLayers,
    Projections,
    Quiet,
    Representation,
    Revision,
    RevisionAligned,
    RevisionBase,
    TargetsOpt,
    Threshold,
)


def command(
    finetuned: Annotated[
        str,
        typer.Argument(
            metavar="FINETUNED",
            help="Fully fine-tuned model: directory, .safetensors file or Hub id.",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output model directory.")],
    aligned: AlignedOpt = None,
    projections: Projections = None,
    base: BaseOpt = None,
    num_layers: NumLayers = None,
    threshold: Threshold = None,
    fraction: Fraction = None,
    targets: TargetsOpt = None,
    device: Device = "auto",
    dry_run: DryRun = False,
    force: Force = False,
    json_out: ModelJson = False,
    quiet: Quiet = False,
    revision: Revision = None,
    revision_aligned: RevisionAligned = None,
    revision_base: RevisionBase = None,
    download: Download = "ranged",
    representation: Representation = "auto",
) -> None:
    """Project the selected weights of a fully fine-tuned model: W_aligned + C (W_ft - W_aligned).

    Needs --aligned (the model FINETUNED was fine-tuned from) and projectors: -p CACHE (from
    compute-projections BASE ALIGNED --targets ...) or --base BASE. OUT gets every file of
    FINETUNED's directory, the same shards and index, and safelora_report.json. Under
    accelerate launch with several processes the shards are split across them.
    """
    import json
    import sys

    from safelora_cli.commands.compute import _dist, _quiet_on_other_ranks
    from safelora_cli.model_patch import patch_model
    from safelora_cli.render import RichProgress
    from safelora_cli.selection import Selection

    dist = _dist(device)
    main = dist is None or dist.is_main
    with _quiet_on_other_ranks(dist):
        from safelora_cli.distributed import agreed

        selection = agreed(dist, lambda: Selection.from_flags(num_layers, threshold, fraction))
        report = patch_model(
            finetuned,
            output,
            aligned=aligned,
            projections=projections,
            base=base,
            selection=selection,
            targets=targets,
            device=device,
            dry_run=dry_run,
            force=force,
            revision=revision,
            revision_aligned=revision_aligned,
            revision_base=revision_base,
            progress=RichProgress(quiet=quiet or not main),
            dist=dist,
            download=download,
            representation=representation,
        )
    if not main:
        return
    if json_out:
        sys.stdout.write(json.dumps(report.to_json(), allow_nan=False) + "\n")
        sys.stdout.flush()
    elif not quiet:
        _summary(report)


def _summary(rep: Any) -> None:
    """A few human lines on stderr: projected N of M, the rule, the projected weights (the
    first ten, then ``+N more``), the lowest cosines left alone, where; then, when ALIGNED or
    BASE was read from the Hub by byte ranges, what was fetched."""
    from rich.markup import escape

    from safelora_cli.progress import fetched_line
    from safelora_cli.render import err_console, module_lines, safe_text, selection_rule

    con = err_console()

    def say(line: str) -> None:
        # Names are markup-escaped where inserted; safe_text then escapes control characters
        # (a weight name in a checkpoint header is input, like an adapter key).
        con.print(safe_text(line), soft_wrap=True)

    head = "would project" if rep.dry_run else "projected"
    say(f"[bold]{escape(rep.model)}[/bold]: {head} {rep.projected} of {rep.total} weights")
    say(f"  selection: {selection_rule(rep)}")
    for line in module_lines(rep):
        say(line)
    undefined = [m for m in rep.modules if m.cosine is None]
    if undefined:
        say(f"  no cosine (never projected): {len(undefined)}; see the report")
    where = "would be written to" if rep.dry_run else "written to"
    say(f"  {where} {escape(str(rep.output))}")
    if rep.shards_bytes:
        say(fetched_line(rep.fetched, rep.shards_bytes))
