"""``safelora inspect``: parse, call :mod:`safelora_cli.inspection`, render.

Three modes, chosen by the arguments:

- ``inspect ADAPTER... (-p CACHE | --base B --aligned A)``: one row per LoRA module with its
  cosine and whether the selection projects it; ``--json`` prints ``patch --json``'s schema;
  ``--fail-below T`` is the CI gate (exit 3).
- ``inspect -p CACHE``: what a projection cache holds.
- ``inspect ADAPTER...``: what an adapter holds and what patch would do with each tensor.

Tables go to stdout. Off a terminal they are plain text (no colour, no box drawing, fixed
columns); on a terminal they are rich tables.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from safelora_cli import render
from safelora_cli.errors import GateError, UsageError
from safelora_cli.options import (
    AlignedOpt,
    BaseOpt,
    Device,
    Download,
    Fraction,
    Json,
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

# ----------------------------------------------------------------------------- table output


@dataclass(frozen=True)
class Col:
    header: str
    right: bool = False


def _plain_table(cols: Sequence[Col], groups: Sequence[Sequence[Sequence[str]]]) -> list[str]:
    """Fixed-width columns, two spaces apart, a dashed rule under the header, a blank line
    between groups. Pure ASCII: safe in CI logs, diffs and golden files."""
    widths = [len(c.header) for c in cols]
    for group in groups:
        for row in group:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = [
            cell.rjust(widths[i]) if cols[i].right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(out).rstrip()

    lines = [line([c.header for c in cols]), line(["-" * w for w in widths])]
    for gi, group in enumerate(groups):
        if gi:
            lines.append("")
        lines.extend(line(row) for row in group)
    return lines


def _emit_table(
    cols: Sequence[Col],
    groups: Sequence[Sequence[Sequence[str]]],
    styles: Sequence[Sequence[str | None]] | None = None,
) -> None:
    """Print a table on stdout: plain text off a terminal, a rich table on one.

    On a terminal too narrow for every column at full width, the rows are stacked instead
    (:func:`_stacked_lines`): a cell is never cut and a column never dropped.
    """
    # Names come from the inputs: escape control characters before measuring widths.
    groups = [[[render.safe_text(cell) for cell in row] for row in group] for group in groups]
    if render.is_plain():
        for ln in _plain_table(cols, groups):
            sys.stdout.write(ln + "\n")
        sys.stdout.flush()
        return
    from rich import box
    from rich.table import Table
    from rich.text import Text

    console = render.out_console()
    widths = [len(c.header) for c in cols]
    for group in groups:
        for row in group:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))
    if sum(widths) + 2 * (len(cols) - 1) > console.width:
        for line in _stacked_lines(cols, groups, styles, console.width):
            console.print(line, soft_wrap=True)  # an over-long name wraps, never is cut
        return
    # One padding space plus the box's blank divider: two spaces between columns, as in plain
    # output, so a table that fits 80 columns in a pipe fits an 80-column terminal too.
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        header_style="bold",
    )
    for c in cols:
        table.add_column(c.header, justify="right" if c.right else "left", no_wrap=True)
    row_no = 0
    for group in groups:
        for i, row in enumerate(group):
            style = styles[row_no] if styles is not None else None
            row_no += 1
            # Text, not markup: cells such as a note marker "[1]" must print as they are.
            cells = [
                Text(cell, style=s or "")
                for cell, s in zip(row, style or [None] * len(row), strict=False)
            ]
            table.add_row(*cells, end_section=i == len(group) - 1)
    console.print(table)


def _stacked_lines(
    cols: Sequence[Col],
    groups: Sequence[Sequence[Sequence[str]]],
    styles: Sequence[Sequence[str | None]] | None,
    width: int,
) -> list[Any]:
    """The compact layout for narrow terminals: one block per row.

    The block's first line is the first two cells (``layer 3  self_attn.q_proj``); then every
    other column as ``header value``, two spaces apart, wrapped at ``width`` between pairs
    (never inside one), indented by 2. A blank line between groups (layers).
    """
    from rich.text import Text

    out: list[Any] = []
    row_no = 0
    for gi, group in enumerate(groups):
        if gi:
            out.append(Text(""))
        for row in group:
            style = list(styles[row_no]) if styles is not None else [None] * len(row)
            style += [None] * (len(row) - len(style))
            row_no += 1
            head = Text(f"{cols[0].header} {row[0].strip()}", style="bold")
            if len(cols) > 1:
                head.append(f"  {row[1]}", style=style[1] or "bold")
            out.append(head)
            line = Text("  ")
            for i in range(2, len(cols)):
                pair = Text(f"{cols[i].header} ")
                pair.append(row[i], style=style[i] or "")
                if len(line) > 2 and len(line) + 2 + len(pair) > width:
                    out.append(line)
                    line = Text("  ")
                if len(line) > 2:
                    line.append("  ")
                line.append_text(pair)
            if len(line) > 2:
                out.append(line)
    return out


def _emit_lines(lines: Sequence[str]) -> None:
    for ln in lines:
        sys.stdout.write(render.safe_text(ln) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- formatting


def _num(x: float | None, fmt: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(float(x), fmt)


def _norm(x: float | None) -> str:
    """A norm in at most 8 characters (the column stays narrow enough for 80 columns)."""
    if x is None or not math.isfinite(x):
        return "-"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.1e}"
    return f"{x:.4g}"


def _cos(c: float | None) -> str:
    from safelora_cli.selection import round_cosine

    return "-" if c is None else f"{round_cosine(c):.5f}"


def _layer(layer: int | None) -> str:
    return "-" if layer is None else str(layer)


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    for unit, f in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12)):
        if n < f * 1000 or unit == "TB":
            return f"{n / f:.1f} {unit}"
    return f"{n} B"


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _source_text(spec: Any) -> str:
    if not isinstance(spec, dict):
        return str(spec)
    if spec.get("kind") == "hub" or spec.get("repo_id"):
        text = f"{spec.get('repo_id') or spec.get('arg')}@{spec.get('revision') or 'main'}"
        return text + (f" (commit {spec['commit']})" if spec.get("commit") else "")
    return str(spec.get("path") or spec.get("arg"))


# ----------------------------------------------------------------------------- similarity tables


SCORE_COLS = (
    Col("layer", right=True),
    Col("module"),
    Col("shape"),
    Col("rank", right=True),
    Col("scale", right=True),
    Col("||dW||_F", right=True),
    Col("cosine", right=True),
    Col("projected"),
)


def _score_row(m: Any, gate_t: float | None = None) -> list[str]:
    from safelora_cli.inspection import short_reason, split_name

    layer, short = split_name(m.name)
    shape = f"{m.d_out}x{m.d_in}" if m.d_out and m.d_in else "-"
    return [
        _layer(layer),
        short,
        shape,
        "-" if m.rank is None else str(m.rank),
        _num(m.scale, ".3g"),
        _norm(m.norm_dw),
        _cos(m.cosine),
        short_reason(m) if gate_t is None else _gate_cell(m, gate_t),
    ]


def _gate_cell(m: Any, t: float) -> str:
    """The gate's verdict on one module, decided by :func:`safelora_cli.inspection.gate` itself
    (fails closed: ``C B A = 0`` fails; ``B A = 0`` and ``V = 0`` pass as "no cosine")."""
    from types import SimpleNamespace

    from safelora_cli.inspection import gate

    passed = gate([SimpleNamespace(adapter="", modules=[m])], t).passed
    if m.cosine is None:
        return "no cosine" if passed else "FAIL: CBA = 0"
    return "pass" if passed else f"FAIL: < {t:g}"


def _selection_lines(report: Any, defined: int) -> list[str]:
    """How the selection chose: the flag, the threshold it implies, and ties (<= 80 columns)."""
    sel = report.selection
    d = report.decision
    mode, value = sel.mode, sel.value
    t = "-" if d.threshold is None else f"{d.threshold:.5f}"
    if mode == "threshold":
        return [f"selection: --threshold {value:g}", f"threshold t = {t}: project cos <= t"]
    k = int(d.k) if d.k is not None else int(value)
    first = f"selection: --num-layers {int(value)}"
    if mode == "fraction":
        first = f"selection: --fraction {value:g} -> K = {k} of {defined}"
    if d.threshold is None:
        return [first, "threshold: none (no module has a cosine); nothing projected"]
    if k >= defined:
        return [first, f"threshold t = {t} (highest cosine): all {defined} with a cosine projected"]
    kth = "lowest" if k == 1 else f"{_ordinal(k)} lowest"
    lines = [first, f"threshold t = {t} ({kth} cosine): project cos <= t"]
    if d.ties:
        more = "1 more module" if d.ties == 1 else f"{d.ties} more modules"
        lines.append(f"ties: {more} projected, tied with the {kth} at {t}")
    return lines


def _summary_lines(report: Any, gate_t: float | None = None) -> list[str]:
    defined = sum(1 for m in report.modules if m.cosine is not None)
    undefined = len(report.modules) - defined
    if gate_t is not None:
        from safelora_cli.inspection import gate

        res = gate([report], gate_t)
        orth = sum(1 for f in res.failures if f.cosine is None)
        below = len(res.failures) - orth
        first = (
            f"gate --fail-below {gate_t:g}: {below} of {res.checked} modules have a cosine "
            f"below {gate_t:g}"
        )
        if orth:
            first += f", {orth} fail with C B A = 0"
        if undefined - orth:
            first += f" ({undefined - orth} without a cosine, not gated)"
        sel = report.selection
        return [
            first,
            f"(patch's default --num-layers {int(sel.value)} would project "
            f"{report.projected} of {report.total}; Pdst {_num(report.pdst, '.5f')})",
        ]
    first = f"projected {report.projected} of {report.total} modules"
    if undefined:
        first += f" ({undefined} without a cosine, never projected)"
    if getattr(report, "kind", "adapter") == "model":  # Pdst is a LoRA figure
        return [first, *_selection_lines(report, defined)]
    return [first, *_selection_lines(report, defined), f"Pdst {_num(report.pdst, '.5f')}"]


def _render_reports(
    reports: Sequence[Any], sort: str, top: int | None, gate_t: float | None = None
) -> None:
    """Per-adapter tables and summaries. ``gate_t``: ``--fail-below`` without a selection
    flag: the last column is the gate's verdict, not the default selection's."""
    from safelora_cli.inspection import order_modules, split_name

    cols = SCORE_COLS if gate_t is None else (*SCORE_COLS[:-1], Col("gate"))
    for i, rep in enumerate(reports):
        if i:
            _emit_lines([""])
        _emit_lines([f"{getattr(rep, 'kind', 'adapter')}: {rep.adapter}"])
        rows, hidden = order_modules(rep.modules, sort, top)  # type: ignore[arg-type]
        if sort == "layer":
            groups: list[list[list[str]]] = []
            last: object = object()
            for m in rows:
                layer, _ = split_name(m.name)
                if layer != last or not groups:
                    groups.append([])
                    last = layer
                groups[-1].append(_score_row(m, gate_t))
        else:
            groups = [[_score_row(m, gate_t) for m in rows]]
        # Colour only on a terminal: projected (or failing) rows stand out; plain has none.
        if gate_t is None:
            styles = [
                [None] * 6 + (["red", "bold green"] if m.projected else [None, "dim"]) for m in rows
            ]
        else:
            styles = [
                [None] * 6
                + (
                    ["red", "bold red"]
                    if _gate_cell(m, gate_t).startswith("FAIL")
                    else [None, "green" if m.cosine is not None else "dim"]
                )
                for m in rows
            ]
        _emit_table(cols, groups, styles)
        lines = []
        if hidden:
            lines.append(
                f"({hidden} more rows not shown: --top {top} lists the {top} lowest cosines)"
            )
        lines.extend(_summary_lines(rep, gate_t))
        lines.extend(_skipped_lines(rep.skipped))
        _emit_lines(lines)


def _skipped_lines(skipped: Sequence[Any]) -> list[str]:
    """Adapter entries that are not LoRA modules patch can project, grouped by reason.

    One reason line (ending in ``:``, indented 2) then its module names (indented 4), both
    wrapped at 80 columns, so 224 DoRA modules read as one reason and a list, not 224 copies.
    """
    if not skipped:
        return []
    from safelora_cli.naming import natural_key

    by_reason: dict[str, list[str]] = {}
    for sk in sorted(skipped, key=lambda x: natural_key(x.name)):
        by_reason.setdefault(sk.reason, []).append(sk.name)
    lines = [f"{len(skipped)} not projectable, carried over unchanged by patch:"]
    for reason, names in by_reason.items():
        lines.extend(_wrap(f"{reason}:", "  "))
        lines.extend(_wrap(", ".join(names), "    "))
    return lines


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        text,
        width=80,
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


# ----------------------------------------------------------------------------- adapter alone


ADAPTER_COLS = (
    Col("layer", right=True),
    Col("module"),
    Col("shape"),
    Col("rank", right=True),
    Col("alpha", right=True),
    Col("scale", right=True),
    Col("dtype"),
    Col("note"),
)


def _render_adapter(s: Any) -> None:
    from safelora_cli.inspection import split_name

    targets = s.target_modules
    if isinstance(targets, list | tuple):
        targets = ",".join(str(t) for t in targets)
    head = [
        f"adapter: {s.adapter}",
        f"weights: {s.weights_file}; base model: {s.base_model or '-'}",
        f"r {_num(s.r, 'g')}, lora_alpha {_num(s.lora_alpha, 'g')}, "
        f"rslora {'yes' if s.use_rslora else 'no'}, targets {targets or '-'}",
    ]
    _emit_lines(head)
    notes: dict[str, int] = {}
    groups: list[list[list[str]]] = []
    last: object = object()
    for m in s.modules:
        layer, short = split_name(m.name)
        if layer != last or not groups:
            groups.append([])
            last = layer
        groups[-1].append(
            [
                _layer(layer),
                short,
                f"{m.d_out}x{m.d_in}",
                str(m.rank),
                _num(m.alpha, "g"),
                _num(m.scale),
                m.dtype,
                f"[{notes.setdefault(m.note, len(notes) + 1)}]" if m.note else "",
            ]
        )
    if groups:
        cols: Sequence[Col] = ADAPTER_COLS
        if not notes:
            # No module carries a note: drop the empty column rather than print a bare header.
            cols = ADAPTER_COLS[:-1]
            groups = [[row[:-1] for row in g] for g in groups]
        _emit_table(cols, groups)
    lines = [
        f"{len(s.modules)} LoRA modules can be projected"
        + (f" (lora_B dtype {', '.join(s.dtypes)})" if s.dtypes else "")
    ]
    # Notes are free text: numbered markers in the table, the text once below, so a note shared
    # by 224 modules costs one line and the table keeps its 80 columns.
    for note, i in notes.items():
        count = sum(1 for m in s.modules if m.note == note)
        lines.extend(_wrap(f"[{i}] {note} ({count} module{'s' if count != 1 else ''})", ""))
    lines.extend(_skipped_lines(s.skipped) or ["nothing skipped"])
    _emit_lines(lines)


# ----------------------------------------------------------------------------- cache alone


CACHE_COLS = (
    Col("layer", right=True),
    Col("weight"),
    Col("shape"),
    Col("repr"),
    Col("||V||_F", right=True),
    Col("stable rank", right=True),
)


def _render_cache(c: Any) -> None:
    from safelora_cli.inspection import split_name

    state = "complete" if c.complete else "incomplete (resume: rerun compute-projections)"
    head = [
        f"cache: {c.path}",
        f"tool version: safelora {c.tool_version or 'unknown'}, format {c.format_version}, "
        f"dtype {c.dtype}, {state}",
    ]
    for role, spec in c.sources.items():
        head.append(f"{role}: {_source_text(spec)}")
    head.append(f"{len(c.weights)} weights, {_size(c.size_bytes)} on disk")
    _emit_lines(head)
    groups: list[list[list[str]]] = []
    last: object = object()
    for w in c.weights:
        layer, short = split_name(w.weight.removesuffix(".weight"))
        if layer != last or not groups:
            groups.append([])
            last = layer
        groups[-1].append(
            [
                _layer(layer),
                short,
                f"{w.d_out}x{w.d_in}",
                w.kind,
                _num(w.norm_v),
                _num(w.stable_rank, ".2f"),
            ]
        )
    if groups:
        _emit_table(CACHE_COLS, groups)


# ----------------------------------------------------------------------------- command


def command(
    adapters: Annotated[
        list[str] | None,
        typer.Argument(metavar="[ADAPTER]...", help="Adapter directories or Hub ids (optional)."),
    ] = None,
    projections: Projections = None,
    base: BaseOpt = None,
    aligned: AlignedOpt = None,
    num_layers: NumLayers = None,
    threshold: Threshold = None,
    fraction: Fraction = None,
    json_out: Json = False,
    sort: Annotated[
        str | None,
        typer.Option(
            "--sort",
            help="Row order: layer or cosine (lowest first). [default: layer; cosine with --top]",
        ),
    ] = None,
    top: Annotated[
        int | None,
        typer.Option(
            "--top", help="Show only the N modules with the lowest cosine (summary covers all)."
        ),
    ] = None,
    fail_below: Annotated[
        float | None,
        typer.Option("--fail-below", help="Exit 3 when any defined cosine is below T (CI gate)."),
    ] = None,
    device: Device = "auto",
    revision_base: RevisionBase = None,
    revision_aligned: RevisionAligned = None,
    quiet: Quiet = False,
    targets: TargetsOpt = None,
    revision: Revision = None,
    download: Download = "ranged",
    representation: Representation = "auto",
) -> None:
    """Per-module similarity tables, or summaries of a cache or an adapter.

    A fully fine-tuned model (FINETUNED --aligned ALIGNED with -p CACHE or --base BASE) gets
    the same table, JSON and --fail-below gate, one row per weight (docs/patch-model.md).
    """
    from safelora_cli.inspection import validate_sort

    # --top lists the lowest cosines, so it reads lowest first unless --sort says otherwise.
    sort_key = validate_sort(sort) or ("cosine" if top is not None else "layer")
    if top is not None and top < 1:
        raise UsageError(f"--top must be at least 1, got {top}.", hint="E.g. --top 20.")
    if fail_below is not None and (math.isnan(fail_below) or not -1.0 <= fail_below <= 1.0):
        raise UsageError(
            f"--fail-below must lie in [-1, 1], got {fail_below}.",
            hint="E.g. --fail-below 0.3 fails when any module's cosine is below 0.3.",
        )
    has_models = base is not None or aligned is not None
    scoring_only = [
        name
        for name, v in (
            ("--num-layers", num_layers),
            ("--threshold", threshold),
            ("--fraction", fraction),
            ("--sort", sort),
            ("--top", top),
            ("--fail-below", fail_below),
        )
        if v is not None
    ]

    from safelora_cli.inspection import is_full_model_request

    if adapters and is_full_model_request(adapters, projections=projections, aligned=aligned):
        _inspect_model(
            adapters,
            projections=projections,
            base=base,
            aligned=aligned,
            selection_flags=(num_layers, threshold, fraction),
            targets=targets,
            device=device,
            revision=revision,
            revision_base=revision_base,
            revision_aligned=revision_aligned,
            json_out=json_out,
            sort_key=sort_key,
            top=top,
            fail_below=fail_below,
            quiet=quiet,
            download=download,
            representation=representation,
        )
        return
    if targets is not None or revision is not None:
        raise UsageError(
            "--targets and --revision apply to a fully fine-tuned model "
            "(inspect FINETUNED --aligned ALIGNED ...).",
            hint="Drop them for adapters and caches; an adapter's modules are its targets.",
        )

    if not adapters:
        if projections is None:
            raise UsageError(
                "nothing to inspect.",
                hint="Give ADAPTER (with -p CACHE or --base/--aligned for cosines), "
                "or -p CACHE alone.",
            )
        if has_models or scoring_only:
            given = ["--base/--aligned"] if has_models else []
            raise UsageError(
                f"{', '.join(given + scoring_only)} need an ADAPTER.",
                hint="`safelora inspect -p CACHE` alone summarises the cache.",
            )
        _inspect_cache(projections, json_out=json_out, quiet=quiet)
        return

    if projections is None and not has_models:
        if scoring_only:
            raise UsageError(
                f"{', '.join(scoring_only)} need projectors to compute cosines.",
                hint="Add -p CACHE, or --base BASE --aligned ALIGNED.",
            )
        _inspect_adapters_alone(adapters, json_out=json_out)
        return

    from safelora_cli.inspection import gate, score
    from safelora_cli.selection import Selection

    selection = Selection.from_flags(num_layers, threshold, fraction)
    reports = score(
        adapters,
        selection,
        projections=projections,
        base=base,
        aligned=aligned,
        device=device,
        revision_base=revision_base,
        revision_aligned=revision_aligned,
        progress=render.RichProgress(quiet=quiet, label="scoring"),
        download=download,
        representation=representation,
    )
    if json_out:
        _emit_lines([json.dumps(r.to_json(), allow_nan=False) for r in reports])
    else:
        # A gate without a selection flag: the table shows the gate's verdict, not what the
        # default --num-layers 10 would project (which says nothing about the gate).
        no_selection = num_layers is None and threshold is None and fraction is None
        _render_reports(reports, sort_key, top, fail_below if no_selection else None)
        _fetched_status(reports, quiet)
    if fail_below is not None:
        result = gate(reports, fail_below)
        if not result.passed:
            raise GateError(
                f"gate --fail-below {fail_below:g}: {result.message()}",
                hint="These updates left the alignment subspace: "
                "patch the adapter with safelora patch, or review it.",
            )


def _inspect_cache(projections: Any, *, json_out: bool, quiet: bool) -> None:
    from safelora_cli.inspection import summarize_cache

    summary = summarize_cache(projections, progress=render.RichProgress(quiet=quiet))
    if json_out:
        _emit_lines([json.dumps(summary.to_json(), allow_nan=False)])
    else:
        _render_cache(summary)


def _inspect_adapters_alone(adapters: Sequence[str], *, json_out: bool) -> None:
    from safelora_cli.inspection import summarize_adapter

    summaries = [summarize_adapter(a) for a in adapters]
    if json_out:
        _emit_lines([json.dumps(s.to_json(), allow_nan=False) for s in summaries])
        return
    for i, s in enumerate(summaries):
        if i:
            _emit_lines([""])
        _render_adapter(s)


# ----------------------------------------------------------------------------- full model


def _fetched_status(result: Any, quiet: bool) -> None:
    """``fetched X of Y (the shards' total) from the Hub`` on stderr (the table is stdout's
    data) when ``result`` (reports or a model report) says models were read by byte ranges."""
    from safelora_cli.progress import fetched_line

    if getattr(result, "shards_bytes", 0):
        render.status(fetched_line(result.fetched, result.shards_bytes), quiet=quiet)


def _gate(reports: Sequence[Any], fail_below: float | None, fix: str) -> None:
    """GateError (exit 3) when ``--fail-below`` trips; ``fix`` completes the hint."""
    from safelora_cli.inspection import gate

    if fail_below is None:
        return
    result = gate(reports, fail_below)
    if not result.passed:
        raise GateError(
            f"gate --fail-below {fail_below:g}: {result.message()}",
            hint=f"These updates left the alignment subspace: {fix}",
        )


def _inspect_model(
    args: Sequence[str],
    *,
    projections: Any,
    base: str | None,
    aligned: str | None,
    selection_flags: tuple[Any, Any, Any],
    targets: str | None,
    device: str,
    revision: str | None,
    revision_base: str | None,
    revision_aligned: str | None,
    json_out: bool,
    sort_key: str,
    top: int | None,
    fail_below: float | None,
    quiet: bool,
    download: str = "ranged",
    representation: str = "auto",
) -> None:
    """``inspect FINETUNED --aligned ALIGNED (-p CACHE | --base BASE)``: one row per weight."""
    from safelora_cli.model_patch import score_model
    from safelora_cli.selection import Selection

    if len(args) != 1:
        raise UsageError(
            f"inspect takes one fine-tuned model, got {len(args)} arguments.",
            hint="Inspect each fine-tuned model in its own run.",
        )
    selection = Selection.from_flags(*selection_flags)
    report = score_model(
        args[0],
        selection,
        aligned=aligned,
        projections=projections,
        base=base,
        targets=targets,
        device=device,
        revision=revision,
        revision_aligned=revision_aligned,
        revision_base=revision_base,
        progress=render.RichProgress(quiet=quiet),
        download=download,
        representation=representation,
    )
    if json_out:
        _emit_lines([json.dumps(report.to_json(), allow_nan=False)])
    else:
        _render_reports([report], sort_key, top)
        _fetched_status(report, quiet)
    _gate([report], fail_below, "patch the model with safelora patch-model, or review it.")
