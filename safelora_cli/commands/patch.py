"""``safelora patch``: parse, call :mod:`safelora_cli.patch`, render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safelora_cli.options import (
    AlignedOpt,
    BaseOpt,
    Device,
    Download,
    DryRun,
    Force,
    Fraction,
    Json,
    NumLayers,
    Projections,
    Quiet,
    Representation,
    RevisionAligned,
    RevisionBase,
    Threshold,
)


def command(
    adapters: Annotated[
        list[str], typer.Argument(metavar="ADAPTER...", help="Adapter directories or Hub ids.")
    ],
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
    representation: Representation = "auto",
    download: Download = "ranged",
    save_projections: Annotated[
        Path | None,
        typer.Option(
            "--save-projections",
            help="With --base/--aligned: also write the computed projectors to this cache "
            "directory (reusable with -p).",
        ),
    ] = None,
    allow_unchanged: Annotated[
        bool,
        typer.Option(
            "--allow-unchanged",
            help="Write an adapter even when none of its modules can be scored (all untrained, "
            "DoRA, no alignment signal): an unchanged copy. Without it that is an error.",
        ),
    ] = False,
) -> None:
    """Project the selected LoRA modules of one or many adapters and write new adapters.

    With one ADAPTER, OUT is the new adapter directory; with several, OUT is a parent and each
    lands in OUT/<adapter directory name>. Nothing is written unless every adapter succeeds.
    Under accelerate launch with several processes the adapters are split across them.
    """
    import json
    import sys

    from safelora_cli.commands.compute import _dist, _quiet_on_other_ranks
    from safelora_cli.patch import patch_adapters
    from safelora_cli.render import RichProgress
    from safelora_cli.selection import Selection

    dist = _dist(device)
    main = dist is None or dist.is_main
    with _quiet_on_other_ranks(dist):
        from safelora_cli.distributed import agreed

        selection = agreed(dist, lambda: Selection.from_flags(num_layers, threshold, fraction))
        reports = patch_adapters(
            adapters,
            output,
            projections=projections,
            base=base,
            aligned=aligned,
            selection=selection,
            device=device,
            dry_run=dry_run,
            force=force,
            revision_base=revision_base,
            revision_aligned=revision_aligned,
            save_projections=save_projections,
            progress=RichProgress(quiet=quiet or not main),
            dist=dist,
            representation=representation,
            allow_unchanged=allow_unchanged,
            download=download,
        )
    if not main:
        return  # rank 0 prints every adapter's result, in argument order
    if json_out:
        for rep in reports:
            sys.stdout.write(json.dumps(rep.to_json(), allow_nan=False) + "\n")
        sys.stdout.flush()
    elif not quiet:
        _summary(reports)


def _fmt(x: float | None, spec: str = ".5f") -> str:
    return "n/a" if x is None else format(x, spec)


def _summary(reports: list) -> None:
    """A few human lines per adapter on stderr: projected N of M, Pdst, lowest cosines, where;
    then, when models were read from the Hub by byte ranges, what was fetched (one line)."""
    from rich.markup import escape

    from safelora_cli.progress import fetched_line
    from safelora_cli.render import err_console, module_lines, safe_text, selection_rule

    con = err_console()

    def say(line: str) -> None:
        # Names are markup-escaped where they are inserted; safe_text then escapes control
        # characters (it never adds a "[", so the markup stays as written).
        con.print(safe_text(line), soft_wrap=True)  # long paths stay on one line

    for rep in reports:
        head = "would project" if rep.dry_run else "projected"
        say(
            f"[bold]{escape(rep.adapter)}[/bold]: {head} {rep.projected} of {rep.total} "
            f"modules; Pdst {_fmt(rep.pdst, '.4f')}"
        )
        say(f"  selection: {selection_rule(rep)}")
        for line in module_lines(rep):
            say(line)
        undefined = [m for m in rep.modules if m.cosine is None]
        if undefined:
            say(f"  no cosine (never projected): {len(undefined)}; see the report")
        if rep.skipped:
            say(f"  carried over unchanged: {len(rep.skipped)} (embedding/DoRA/...)")
        where = "would be written to" if rep.dry_run else "written to"
        say(f"  {where} {escape(str(rep.output))}")
    # Once per run: the adapters' projectors came from one pair of models.
    if getattr(reports, "shards_bytes", 0):
        say(fetched_line(reports.fetched, reports.shards_bytes))  # type: ignore[attr-defined]
