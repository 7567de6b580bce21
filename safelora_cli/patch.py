"""``patch``: project the selected LoRA modules of one or many adapters, write new adapters.

:func:`patch_adapters` is the library entry point (the CLI only parses and renders). Contract:

- Projectors come from exactly one place (:mod:`safelora_cli.projector_source`): a projection
  cache or ``base`` + ``aligned`` checkpoints, streamed, nothing cached unless
  ``save_projections`` is given.
- Scoring is batched (:func:`safelora_cli.scoring.score_adapters`): every projector is read or
  computed once and applied to every adapter that has that module.
- Output: with one adapter ``output`` is the new adapter directory; with several it is a
  parent and each adapter lands in ``output/<name>``, ``<name>`` being the input directory's
  name (a Hub adapter's repository name); two inputs with one name are a UsageError. ``output``
  (and every target) may not equal, lie inside or contain an input. An existing ``output`` is
  refused unless ``force``; with ``force`` an existing target must be a directory that looks
  like an adapter (it has ``adapter_config.json`` or ``safelora_report.json``) or is empty, so
  ``--force`` never wipes an unrelated directory.
- Writes are **all-or-nothing** (:mod:`safelora_cli.output`: staging beside each target,
  renames only when everything is staged, rollback on failure, stale clean-up): every adapter
  is read, matched, scored and checked before the first byte is written. A killed run leaves
  at most a hidden ``.<name>.safelora-tmp-*`` directory beside the target, never a partial
  adapter.
- The new adapter directory: every file of the input directory is copied byte for byte
  (recursively; ``.git`` and ``.cache`` are not copied: they describe the input's download,
  not the new adapter), ``adapter_config.json`` included, unchanged, except ``README.md``:
  it is the model card :func:`safelora_cli.modelcard.adapter_card` writes (the input's card,
  if any, with its text and keys kept, safelora's tags and a section on what was done).
  The weights file is rewritten as ``adapter_model.safetensors`` with the same keys,
  dtypes, shapes and tensor order; tensors other than the projected ``lora_B`` are copied
  as their stored bytes. Its ``__metadata__`` keeps the input's entries
  (``{"format": "pt"}``) and adds :data:`META_PREFIX`-keys (JSON strings): ``version``,
  ``sources``, ``selection``, ``projected``. A legacy ``adapter_model.bin`` input is written as
  ``adapter_model.safetensors`` (the ``.bin`` is not copied, so PEFT cannot load the unpatched
  weights by mistake; likewise a stale ``.bin`` beside a ``.safetensors`` input is dropped);
  tensors keep their dtype and values.
- ``safelora_report.json`` (:meth:`AdapterReport.to_json`, indented) sits beside it. There is
  no timestamp anywhere: the same inputs give byte-identical output directories.
- ``dry_run``: everything up to the writes (including the output checks); nothing written.

- Several processes (``dist=``, under ``accelerate launch`` / ``torchrun``; docs/scale-out.md):
  every rank applies the output rules to every adapter; the adapters are split by
  :func:`_adapter_cost`; each rank scores its own (reading only their projectors); any failure
  fails every rank before a byte is written; :func:`safelora_cli.output.write_distributed`
  publishes them. Outputs
  are byte-identical to a single-process run.

Returns one :class:`~safelora_cli.scoring.AdapterReport` per adapter, in argument order
(:class:`~safelora_cli.projector_source.AdapterReports`: with one process it also says what was
fetched from the Hub by byte ranges).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safelora_cli import __version__
from safelora_cli.adapter import load_adapters
from safelora_cli.errors import AdapterError, UsageError
from safelora_cli.fsio import fsync_dir
from safelora_cli.modelcard import CARD_NAME, adapter_card
from safelora_cli.output import (
    REPORT_NAME,
    OutputInput,
    OutputPlan,
    copy_tree,
    name_failed_output,
    other_inputs,
    write_distributed,
    write_text,
)
from safelora_cli.output import check_links as _check_links_in
from safelora_cli.output import plan_outputs as _plan
from safelora_cli.output import write_outputs as _write_all
from safelora_cli.projector_source import (
    AdapterReports,
    check_flags,
    open_projector_source,
    source_transfer,
)
from safelora_cli.scoring import AdapterReport, ScoredAdapter, score_adapters
from safelora_cli.selection import Selection

if TYPE_CHECKING:
    from safelora_cli.adapter import Adapter
    from safelora_cli.distributed import Dist
    from safelora_cli.progress import Progress

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
META_PREFIX = "safelora."


# ----------------------------------------------------------------------------- entry point


def patch_adapters(
    adapters: Sequence[str],
    output: Path,
    *,
    projections: Path | None = None,
    base: str | None = None,
    aligned: str | None = None,
    selection: Selection | None = None,
    device: str = "auto",
    dry_run: bool = False,
    force: bool = False,
    revision_base: str | None = None,
    revision_aligned: str | None = None,
    save_projections: Path | None = None,
    progress: Progress | None = None,
    dist: Dist | None = None,
    representation: str = "auto",
    allow_unchanged: bool = False,
    download: str = "ranged",
) -> list[AdapterReport]:
    """Patch ``adapters`` into ``output`` (see the module docstring for every rule).

    Raises UsageError (bad flag combination, duplicate names), SourceError/AdapterError/
    CheckpointError/CacheError (inputs), OutputError (output rules); nothing is written then.
    An adapter with no module that can be scored (all untrained, all DoRA, no alignment
    signal...) is an AdapterError (:func:`check_something_to_project`) unless
    ``allow_unchanged``, which writes its unchanged copy.
    ``dist`` (:func:`safelora_cli.distributed.current`): split the adapters across the ranks
    of a multi-process launch (:func:`_patch_distributed`); every rank returns every report.
    """
    selection = selection or Selection.from_flags(None, None, None)
    if dist is not None and dist.world_size > 1:
        return _patch_distributed(
            adapters,
            Path(output),
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
            progress=progress,
            dist=dist,
            representation=representation,
            allow_unchanged=allow_unchanged,
            download=download,
        )
    check_flags(
        adapters,
        projections,
        base,
        aligned,
        revision_base,
        revision_aligned,
        save_projections,
        dry_run,
    )
    loaded = load_adapters(adapters)
    try:
        plan = plan_outputs(
            loaded,
            Path(output),
            force=force,
            others=_other_inputs(projections, base, aligned, save_projections),
        )
        with open_projector_source(
            loaded,
            adapters,
            projections=projections,
            base=base,
            aligned=aligned,
            device=device,
            revision_base=revision_base,
            revision_aligned=revision_aligned,
            save_projections=save_projections,
            representation=representation,
            download=download,
            progress=progress,
        ) as (source, weight_for, sources):
            scored = score_adapters(
                loaded, source, selection, weight_for=weight_for, progress=progress
            )
            if not allow_unchanged:
                check_something_to_project(scored)
            for s, target in zip(scored, plan.targets, strict=True):
                s.report.output = str(target)
                s.report.sources = sources
                s.report.dry_run = dry_run
            if not dry_run:
                # Inside the source's context: a failed write also undoes --save-projections.
                try:
                    write_outputs(scored, plan)
                except OSError as e:
                    named = name_failed_output(e, plan)
                    if named is e:
                        raise
                    raise named from e
        return AdapterReports((s.report for s in scored), source_transfer(source))
    finally:
        for ad in loaded:
            ad.close()


def check_something_to_project(scored: Sequence[ScoredAdapter]) -> None:
    """AdapterError for the first adapter none of whose modules has a cosine.

    Such an adapter (every LoRA module untrained or without alignment signal, or no LoRA module
    safelora can project at all: DoRA, embedding LoRA...) would be written as an unchanged
    copy that looks "safe"; the user asks for that copy with ``allow_unchanged``.
    """
    for s in scored:
        rep = s.report
        if any(m.cosine is not None for m in rep.modules):
            continue
        why: dict[str, int] = {}
        for reason in [m.reason or "no cosine" for m in rep.modules] + [
            sk.reason for sk in rep.skipped
        ]:
            short = reason.split(":", 1)[0].strip()
            why[short] = why.get(short, 0) + 1
        parts = [f"{r}: {n} module{'s' if n != 1 else ''}" for r, n in why.items()]
        parts = parts or ["the adapter holds no LoRA module"]
        raise AdapterError(
            f"adapter {rep.adapter}: nothing to project: no module can be scored "
            f"({'; '.join(parts)}).",
            hint="Check that this is the trained adapter and the model pair it was made for; "
            "pass --allow-unchanged to write an unchanged copy anyway.",
            path=rep.path,
        )


# ----------------------------------------------------------------------------- writing


def _tensor_bytes(t: Any) -> bytes:
    """Little-endian bytes of a CPU tensor (the safetensors data layout)."""
    import sys

    import torch

    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8)
    if sys.byteorder == "big" and t.element_size() > 1:  # pragma: no cover - big-endian hosts
        raw = raw.reshape(-1, t.element_size()).flip(1).reshape(-1)
    return raw.numpy().tobytes()


def provenance_metadata(s: ScoredAdapter) -> dict[str, str]:
    """The ``safelora.*`` metadata entries (JSON strings: safetensors metadata is str -> str)."""
    rep = s.report
    sel = {
        **rep.selection.to_json(),
        "threshold": rep.decision.threshold,
        "k": rep.decision.k,
        "ties": rep.decision.ties,
    }
    dumps = lambda o: json.dumps(o, sort_keys=True, separators=(",", ":"))  # noqa: E731
    return {
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}sources": dumps(rep.sources),
        f"{META_PREFIX}selection": dumps(sel),
        f"{META_PREFIX}projected": dumps([m.name for m in rep.modules if m.projected]),
    }


def _write_safetensors(s: ScoredAdapter, dest: Path) -> None:
    """The new weights file: same keys/dtypes/shapes/order; projected lora_B replaced."""
    ad = s.adapter
    if ad.is_legacy_bin:
        names = ad.tensor_names()
        metadata: dict[str, str] = {"format": "pt"}
    else:
        assert ad.reader is not None
        names = sorted(ad.reader.names(), key=lambda n: ad.reader.info(n).start)
        metadata = dict(ad.metadata())
        metadata.setdefault("format", "pt")
    metadata.update(provenance_metadata(s))

    def payload(name: str) -> tuple[str, list[int], Callable[[], bytes]]:
        if name in s.tensors:
            t = s.tensors[name]
            return ad.dtype(name), list(ad.shape(name)), lambda: _tensor_bytes(t)
        if ad.is_legacy_bin:
            return ad.dtype(name), list(ad.shape(name)), lambda: _tensor_bytes(ad.load(name))
        info = ad.reader.info(name)
        return info.dtype, list(info.shape), lambda: ad.reader.read_bytes(name)

    header: dict[str, Any] = {"__metadata__": metadata}
    parts: list[Callable[[], bytes]] = []
    offset = 0
    for name in names:
        dtype, shape, data = payload(name)
        if name in s.tensors:
            t = s.tensors[name]
            if list(t.shape) != shape:
                raise AdapterError(f"internal: projected {name} has shape {list(t.shape)}")
        nbytes = _nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        parts.append(data)
        offset += nbytes
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += b" " * (-len(hb) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(dest, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, data in zip(names, parts, strict=True):
            chunk = data()
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if len(chunk) != want:
                raise AdapterError(
                    f"adapter {ad.weights_path}: {name} has {len(chunk)} bytes, expected {want}",
                    hint="The adapter file changed while it was being patched; run again.",
                    path=ad.weights_path,
                )
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    from safelora_cli.reader import DTYPE_SIZES

    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


def write_adapter_dir(s: ScoredAdapter, dest: Path) -> None:
    """Fill the (empty, existing) directory ``dest`` with the patched adapter."""
    ad = s.adapter
    src = ad.path
    copy_tree(src, dest, {ad.weights_path.name, WEIGHTS_NAME, LEGACY_NAME, REPORT_NAME, CARD_NAME})
    _write_safetensors(s, dest / WEIGHTS_NAME)
    card = src / CARD_NAME
    text = adapter_card(_read_card(card), s.report, ad.config, source=str(card))
    write_text(dest / CARD_NAME, text)
    write_text(dest / REPORT_NAME, json.dumps(s.report.to_json(), indent=2, allow_nan=False) + "\n")
    fsync_dir(dest)


# A model card is text for people; anything larger is refused rather than held in memory.
CARD_LIMIT = 16 * 1024 * 1024


def _read_card(path: Path) -> str | None:
    """The input adapter's README.md text (None without one, or when it is not a regular
    file); AdapterError if it is not UTF-8 or larger than :data:`CARD_LIMIT`."""
    from safelora_cli.fsio import read_regular

    if not path.is_file():
        return None
    try:
        return read_regular(path, CARD_LIMIT).decode("utf-8")
    except ValueError as e:
        if not isinstance(e, UnicodeDecodeError):
            raise AdapterError(
                f"{path} {e}: too large for a model card.",
                hint="Shorten README.md (or remove it), then run again.",
                path=path,
            ) from None
        raise AdapterError(
            f"{path} is not UTF-8 text: its model card cannot be updated.",
            hint="Save README.md as UTF-8 (or remove it), then run again.",
            path=path,
        ) from None


# ----------------------------------------------------------------------------- output plan


def _output_name(ad: Adapter) -> str:
    src = ad.source
    if src is not None and getattr(src, "kind", None) == "hub" and src.repo_id:
        return str(src.repo_id).rsplit("/", 1)[-1]
    return ad.path.resolve().name


def _other_inputs(
    projections: Path | None,
    base: str | None,
    aligned: str | None,
    save_projections: Path | None,
) -> list[tuple[str, Path]]:
    """The non-adapter inputs (and the --save-projections cache) the output must stay out of."""
    out = other_inputs(
        [("projection cache", projections), ("base model", base), ("aligned model", aligned)]
    )
    if save_projections is not None:
        out.append(("--save-projections cache", Path(os.path.abspath(save_projections)).resolve()))
    return out


def check_links(src: Path) -> None:
    """AdapterError for links the copy must not follow (:func:`safelora_cli.output.check_links`);
    the config and weights are read as the adapter itself and may link anywhere."""
    _check_links_in(src, own=(CONFIG_NAME, WEIGHTS_NAME, LEGACY_NAME), label="adapter")


def plan_outputs(
    loaded: Sequence[Adapter],
    output: Path,
    *,
    force: bool,
    others: Sequence[tuple[str, Path]] = (),
) -> OutputPlan:
    """The adapter output rules (:func:`safelora_cli.output.plan_outputs`): batch names from
    each adapter's directory (a Hub adapter's repository name); ``--force`` replaces only a
    directory holding ``adapter_config.json`` or ``safelora_report.json`` (or an empty one)."""
    inputs = [OutputInput(_output_name(ad), ad.path, "input adapter") for ad in loaded]
    plan = _plan(
        inputs,
        output,
        force=force,
        others=others,
        markers=(CONFIG_NAME, REPORT_NAME),
        what="adapter",
        check_input=check_links,
    )
    return plan


def write_outputs(scored: Sequence[ScoredAdapter], plan: OutputPlan) -> None:
    """Stage every adapter, then move them all into place; all-or-nothing (safelora_cli.output)."""
    _write_all(scored, plan, _write_adapter)


def _write_adapter(s: ScoredAdapter, dest: Path) -> None:
    # Looked up at call time, so a test (or a wrapper) replacing write_adapter_dir is honoured.
    write_adapter_dir(s, dest)


# ----------------------------------------------------------------------------- multi-process


def _adapter_cost(ad: Adapter) -> float:
    """Estimated seconds to patch ``ad``: its weights read and written, plus every ``C B``."""
    from safelora_cli.compute import FLOPS_PER_S, READ_BYTES_PER_S

    try:
        nbytes = ad.weights_path.stat().st_size
    except OSError:
        nbytes = 0
    flops = sum(2.0 * m.d_out * m.d_out * m.rank for m in ad.modules)
    return 2 * nbytes / READ_BYTES_PER_S + flops / FLOPS_PER_S["cpu"]


def _patch_distributed(
    adapters: Sequence[str],
    output: Path,
    *,
    projections: Path | None,
    base: str | None,
    aligned: str | None,
    selection: Selection,
    device: str,
    dry_run: bool,
    force: bool,
    revision_base: str | None,
    revision_aligned: str | None,
    save_projections: Path | None,
    progress: Progress | None,
    dist: Dist,
    representation: str = "auto",
    allow_unchanged: bool = False,
    download: str = "ranged",
) -> list[AdapterReport]:
    """patch as one rank of several (docs/scale-out.md).

    Every rank reads every adapter's header and applies the output rules (cheap, identical on
    all); the adapters are split by :func:`_adapter_cost`; each rank scores its own, reading
    only the projectors they need; :meth:`Dist.agree` makes a failure anywhere fail every rank
    before anything is written. Then :func:`safelora_cli.output.write_distributed`. Reports are
    gathered in
    argument order.
    """
    from safelora_cli.distributed import balance, rank_device

    loaded: list[Adapter] = []
    scored: list[ScoredAdapter] = []
    mine: list[int] = []
    plan: OutputPlan | None = None
    err: Exception | None = None
    try:
        try:
            check_flags(
                adapters,
                projections,
                base,
                aligned,
                revision_base,
                revision_aligned,
                save_projections,
                dry_run,
            )
            if save_projections is not None:
                raise UsageError(
                    "--save-projections runs in one process only (several would write one cache).",
                    hint="Build the cache with compute-projections (it scales out too), then "
                    "patch -p CACHE.",
                )
            loaded = load_adapters(adapters)
            others = _other_inputs(projections, base, aligned, save_projections)
            plan = plan_outputs(loaded, output, force=force, others=others)
            mine = balance([_adapter_cost(ad) for ad in loaded], dist.world_size)[dist.rank]
            if mine:
                subset = [loaded[i] for i in mine]
                with open_projector_source(
                    subset,
                    adapters,
                    projections=projections,
                    base=base,
                    aligned=aligned,
                    device=rank_device(device, dist),
                    revision_base=revision_base,
                    revision_aligned=revision_aligned,
                    save_projections=None,
                    representation=representation,
                    download=download,
                ) as (source, weight_for, sources):
                    scored = score_adapters(
                        subset,
                        source,
                        selection,
                        weight_for=weight_for,
                        progress=progress if dist.is_main else None,
                    )
                if not allow_unchanged:
                    check_something_to_project(scored)
                for sa, i in zip(scored, mine, strict=True):
                    sa.report.output = str(plan.targets[i])
                    sa.report.sources = sources
                    sa.report.dry_run = dry_run
        except Exception as e:
            err = e
        dist.agree(err)
        assert plan is not None
        if not dry_run:
            write_distributed(scored, mine, plan, dist, _write_adapter)
        parts = dist.all_gather([(i, sa.report) for i, sa in zip(mine, scored, strict=True)])
        reports: list[Any] = [None] * len(loaded)
        for part in parts:
            for i, report in part:
                reports[i] = report
        return reports
    finally:
        for ad in loaded:
            ad.close()
