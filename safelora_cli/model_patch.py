"""``patch-model``: Safe LoRA for full fine-tunes, streamed shard by shard (DESIGN §1 "Full
fine-tunes", §6; docs/patch-model.md).

Contract:

- Inputs (:func:`patch_model`, :func:`score_model`): FINETUNED and ALIGNED, and either a
  projection cache (``projections``, from ``compute-projections BASE ALIGNED --targets ...``)
  or BASE (projectors computed on the fly, nothing cached). Each is a local directory
  (``model.safetensors`` or ``model.safetensors.index.json`` + shards), a single
  ``.safetensors`` file or a Hub id, read through :func:`safelora_cli.sources.open_model`
  (ALIGNED and BASE with ``want=``: only the shards holding targets are fetched). ``aligned``
  is required in both forms (``ΔW`` needs it): CheckpointError otherwise.
- Refused before anything is written (CheckpointError/CacheError, exit 1): a PEFT adapter as
  FINETUNED; FINETUNED and ALIGNED the same files; a target missing from ALIGNED (or BASE) or
  with another shape (the first mismatch is named); a cache lacking a target (the hint is the
  ``compute-projections`` command that adds it) or built from another ALIGNED.
- Targets (:func:`model_targets`): ``*.weight`` tensors, 2-D, floating point, inside the
  repeated blocks (a ``layers.N`` / ``h.N`` / ``blocks.N`` / ``layer.N`` / ``block.N``
  component): never embeddings, ``lm_head`` or norms. ``targets`` (``--targets``) narrows them
  with :func:`safelora_cli.targets.parse_targets` (module-name suffixes at a dot, or a regex),
  exactly as ``compute-projections --targets`` chooses, so a cache built with the same value
  holds every target. GPT-2 ``Conv1D`` weights (``config.json`` ``model_type``,
  :func:`safelora_cli.targets.is_conv1d`) are transposed to linear orientation.
- Per target: ``ΔW = W_ft - W_aligned`` (float32 before subtracting,
  :func:`safelora_cli.projector.alignment_delta`), ``C ΔW`` scale-safe in float64, a block of
  columns at a time (:func:`safelora_cli.projector.update_sums`), the cosine
  (:func:`safelora_cli.scoring.update_cosine`). ``ΔW == 0`` or ``V == 0``: no cosine, never
  projected. Selection over the model's targets by :func:`safelora_cli.selection.select`,
  exactly as ``patch`` selects LoRA modules.
- Output: a directory with every file of FINETUNED's directory (a single-file FINETUNED: that
  file only), the same shard names and index (copied byte for byte), in each shard the same
  tensor names, order, dtypes and shapes; every tensor byte-identical to FINETUNED's except the
  projected ones, ``W_aligned + C ΔW`` (:func:`safelora_cli.projector.projected_weight`: float64
  sum, cast once to FINETUNED's dtype, stored orientation). Each shard's ``__metadata__`` is the
  input's plus ``safelora.*`` provenance; ``safelora_report.json`` at the top. Planned and
  written with :mod:`safelora_cli.output` (atomic, ``--force`` replaces only a directory with
  ``safelora_report.json``, an earlier output, or an empty one: never a model directory that
  safelora did not write). ``dry_run`` writes nothing.
- Streaming: pass 1 scores one target at a time (a few weight triples resident); pass 2 writes
  shard by shard, non-target tensors copied as raw bytes (``CheckpointReader.load_into`` into a
  byte buffer), the selected weights read and projected again (so they are read twice).
- Several processes (``dist=``): the shards are split (:func:`safelora_cli.distributed.balance`
  by bytes and flops); each rank scores the targets of its shards; the scores are gathered so
  every rank takes the same decision; each rank writes its shards into the one staging
  directory rank 0 stages with :func:`safelora_cli.output.write_outputs`. Byte-identical to one
  process. Any failure fails every rank before the output is published.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safelora_cli import __version__
from safelora_cli.errors import CacheError, CheckpointError, SafeLoraError, UsageError
from safelora_cli.naming import layer_index, natural_key
from safelora_cli.output import (
    REPORT_NAME,
    OutputInput,
    OutputPlan,
    check_links,
    copy_tree,
    name_failed_output,
    other_inputs,
    plan_outputs,
    write_outputs,
    write_text,
)
from safelora_cli.progress import hub_transfer, report_fetched
from safelora_cli.selection import Decision, Selection, round_cosine, select

if TYPE_CHECKING:
    import torch

    from safelora_cli.distributed import Dist
    from safelora_cli.progress import Progress
    from safelora_cli.reader import CheckpointReader

META_PREFIX = "safelora."
ADAPTER_CONFIG = "adapter_config.json"
FT_LABEL = "fine-tuned model"
# A component naming a repeated block, followed by its index: layers.3, h.0, blocks.12, ...
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.\d+\.")
_NOT_TARGETS = ("embed", "lm_head", "norm", "wte", "wpe", "ln_")


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class ModelTarget:
    """One weight of the fine-tuned model that may be projected.

    ``weight``: tensor name; ``name``: module path (``weight`` without ``.weight``);
    ``d_out x d_in``: linear orientation; ``fan_in_fan_out``: stored ``[in, out]`` (Conv1D);
    ``dtype``: FINETUNED's safetensors dtype code; ``shard``: FINETUNED's file holding it.
    """

    weight: str
    name: str
    fan_in_fan_out: bool
    d_out: int
    d_in: int
    dtype: str
    shard: Path


def is_block_weight(name: str) -> bool:
    """A ``*.weight`` inside a repeated block and not an embedding, lm_head or norm."""
    if not name.endswith(".weight") or not _BLOCK.search(name):
        return False
    last = name.removesuffix(".weight").rsplit(".", 1)[-1].lower()
    return not any(last.startswith(p) or p in last for p in _NOT_TARGETS)


def candidate_names(names: Sequence[str], targets: str | None) -> list[str]:
    """Target names from tensor names alone (no shapes): for choosing Hub shards to fetch."""
    from safelora_cli.targets import parse_targets

    pred = parse_targets(targets) if targets is not None else None
    return [n for n in names if is_block_weight(n) and (pred is None or pred(n))]


def _where(reader: CheckpointReader) -> Path:
    files = reader.files
    return reader.index_path or (files[0] if len(files) == 1 else reader.root)


def model_targets(
    ft: CheckpointReader,
    aligned: CheckpointReader,
    *,
    targets: str | None = None,
    config: dict[str, Any] | None = None,
) -> list[ModelTarget]:
    """The targets of ``ft`` (module docstring), natural order, checked against ``aligned``.

    CheckpointError naming the first target missing from ALIGNED or shaped differently there;
    UsageError when ``targets`` matches nothing; CheckpointError when a Conv1D-looking weight
    has no ``config.json`` to tell its orientation.
    """
    from safelora_cli.targets import FLOAT_CODES, is_conv1d

    out: list[ModelTarget] = []
    for n in candidate_names(ft.names(), targets):
        ti = ft.info(n)
        if len(ti.shape) != 2 or ti.dtype not in FLOAT_CODES:
            continue
        if n not in aligned:
            raise CheckpointError(
                f"{n} of the fine-tuned model ({ti.path}) is missing from the aligned model "
                f"({_where(aligned)})",
                hint="FINETUNED must be a fine-tune of ALIGNED: the same architecture and "
                "weight names",
                path=_where(aligned),
            )
        ta = aligned.info(n)
        if ta.shape != ti.shape:
            raise CheckpointError(
                f"{n} has shape {list(ti.shape)} in the fine-tuned model ({ti.path}) but "
                f"{list(ta.shape)} in the aligned model ({ta.path})",
                hint="FINETUNED must be a fine-tune of ALIGNED: the same architecture and size",
                path=ta.path,
            )
        if ta.dtype not in FLOAT_CODES:
            raise CheckpointError(
                f"{n} in {ta.path} is {ta.dtype}, not a float tensor",
                hint="quantised checkpoints are not supported; use the unquantised weights",
                path=ta.path,
            )
        conv = is_conv1d(n, config)
        if conv is None:
            raise CheckpointError(
                f"{n} looks like a GPT-2 Conv1D weight but the fine-tuned model has no "
                "config.json to tell its orientation",
                hint="put the model's config.json next to its weights",
                path=ti.path,
            )
        d_out, d_in = (ti.shape[1], ti.shape[0]) if conv else (ti.shape[0], ti.shape[1])
        out.append(ModelTarget(n, n.removesuffix(".weight"), conv, d_out, d_in, ti.dtype, ti.path))
    if not out:
        what = f"--targets {targets!r} matches" if targets is not None else "there is"
        raise UsageError(
            f"{what} no 2-D weight inside the repeated blocks of the fine-tuned model "
            f"({_where(ft)})",
            hint="targets are linear weights of layers.N / h.N / blocks.N (e.g. --targets "
            "q_proj,v_proj); embeddings, lm_head and norms are never projected",
        )
    return out


# ----------------------------------------------------------------------------- reports


@dataclass
class ModelModuleScore:
    """One target weight's outcome (``to_json``: the ``--json`` ``modules`` entries).

    ``rank``/``scale`` are None (no LoRA) so inspect's table shows ``-`` there; ``norm_dw`` is
    ``||W_ft - W_aligned||_F`` and ``norm_v`` ``||W_aligned - W_base||_F``.
    """

    name: str
    weight: str
    layer: int | None
    d_out: int
    d_in: int
    dtype: str
    fan_in_fan_out: bool
    cosine: float | None
    norm_dw: float
    norm_v: float
    projected: bool = False
    reason: str | None = None
    degenerate: str | None = None
    rank: int | None = None
    scale: float | None = None

    @property
    def rounded(self) -> float | None:
        """The cosine as the selection sees it (5 decimals)."""
        return None if self.cosine is None else round_cosine(self.cosine)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weight": self.weight,
            "layer": self.layer,
            "cosine": self.cosine,
            "projected": self.projected,
            "reason": self.reason,
            "d_out": self.d_out,
            "d_in": self.d_in,
            "dtype": self.dtype,
            "fan_in_fan_out": self.fan_in_fan_out,
            "norm_dw": self.norm_dw,
            "norm_v": self.norm_v,
        }


@dataclass
class ModelReport:
    """A full model's outcome (``to_json``: DESIGN §6's ``patch-model --json`` object)."""

    model: str
    path: str
    selection: Selection
    decision: Decision
    modules: list[ModelModuleScore]
    output: str | None = None
    sources: dict[str, Any] | None = None
    dry_run: bool = False
    kind: str = "model"
    pdst: float | None = None  # a LoRA figure; not defined for full fine-tunes
    # Hub models read by byte ranges (ALIGNED, BASE): bytes received and the total size of the
    # shards read by ranges; both 0 when none was. Not in to_json: the report file is the same
    # for the same inputs, whatever was already downloaded.
    fetched: int = 0
    shards_bytes: int = 0

    @property
    def adapter(self) -> str:
        """The label inspect's table and ``--fail-below`` gate show (the FINETUNED argument)."""
        return self.model

    @property
    def projected(self) -> int:
        return sum(1 for m in self.modules if m.projected)

    @property
    def total(self) -> int:
        return len(self.modules)

    @property
    def threshold(self) -> float | None:
        return self.decision.threshold

    @property
    def ties(self) -> int:
        return self.decision.ties

    @property
    def skipped(self) -> list[Any]:
        return []

    def lowest(self, n: int = 5) -> list[ModelModuleScore]:
        """The ``n`` weights with the lowest defined cosine (ties in natural name order)."""
        defined = [m for m in self.modules if m.cosine is not None]
        defined.sort(key=lambda m: (m.rounded, natural_key(m.name)))
        return defined[:n]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "path": self.path,
            "output": self.output,
            "dry_run": self.dry_run,
            "selection": self.selection.to_json(),
            "projected": self.projected,
            "total": self.total,
            "threshold": self.decision.threshold,
            "k": self.decision.k,
            "ties": self.decision.ties,
            "sources": self.sources,
            "modules": [m.to_json() for m in self.modules],
        }


def decide(
    model: str, path: str, scores: list[ModelModuleScore], selection: Selection
) -> ModelReport:
    """Apply ``selection`` to ``scores`` (natural order kept) and fill in reasons."""
    from safelora_cli.scoring import REASON_ABOVE, REASON_NONE_SELECTED

    decision = select({m.name: m.cosine for m in scores}, selection)
    for m in scores:
        m.projected = m.name in decision.projected
        if m.projected:
            m.reason = None
        elif m.degenerate is not None:
            m.reason = m.degenerate
        elif decision.threshold is None:
            m.reason = REASON_NONE_SELECTED
        else:
            m.reason = REASON_ABOVE.format(cos=round_cosine(m.cosine or 0.0), t=decision.threshold)
    return ModelReport(model, path, selection, decision, scores)


# ----------------------------------------------------------------------------- flags, inputs


def check_model_flags(
    finetuned: str | None,
    aligned: str | None,
    projections: Path | None,
    base: str | None,
    revision_base: str | None = None,
    representation: str = "auto",
) -> None:
    """UsageError for a bad source combination (``representation`` other than ``auto`` with a
    cache included); CheckpointError when ``aligned`` is missing."""
    from safelora_cli.projector_source import source_representation

    if not finetuned:
        raise UsageError("no fine-tuned model given.", hint="Pass FINETUNED (a model directory).")
    if projections is not None and base is not None:
        raise UsageError(
            "-p/--projections and --base are mutually exclusive.",
            hint="Use a projection cache (-p CACHE) or compute on the fly (--base BASE).",
        )
    if projections is None and base is None:
        raise UsageError(
            "no projector source given.",
            hint="Pass -p CACHE (from safelora compute-projections BASE ALIGNED --targets ...) "
            "or --base BASE.",
        )
    if projections is not None and revision_base:
        raise UsageError(
            "--revision-base applies to --base, not to -p.",
            hint="The cache records the revision it was built from; drop the flag.",
        )
    source_representation(representation, projections)
    if aligned is None:
        raise CheckpointError(
            f"fine-tuned model {finetuned}: the aligned model is missing "
            "(dW = W_ft - W_aligned needs it).",
            hint="Pass --aligned ALIGNED, the model FINETUNED was fine-tuned from.",
        )


def is_adapter_dir(arg: str | Path) -> bool:
    """A local PEFT adapter directory (or a file of one): ``adapter_config.json`` beside it."""
    p = Path(arg).expanduser()
    if p.is_file():
        return p.name.startswith("adapter_model") or (p.parent / ADAPTER_CONFIG).is_file()
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def is_local_model(arg: str | Path) -> bool:
    """A local full-model checkpoint (directory with safetensors weights, no adapter config)."""
    from safelora_cli.reader import INDEX_NAME, SINGLE_NAME

    p = Path(arg).expanduser()
    if is_adapter_dir(p):
        return False
    if p.is_file():
        return p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json")
    return p.is_dir() and ((p / SINGLE_NAME).is_file() or (p / INDEX_NAME).is_file())


def _refuse_adapter(arg: str, reader: CheckpointReader | None = None) -> None:
    lora = reader is not None and any(".lora_A." in n or ".lora_B." in n for n in reader.names())
    if is_adapter_dir(arg) or lora:
        raise CheckpointError(
            f"fine-tuned model {arg} is a PEFT LoRA adapter, not a full model.",
            hint="Patch adapters with safelora patch ADAPTER (-p CACHE | --base B --aligned A) "
            "-o OUT; patch-model is for fully fine-tuned models.",
            path=arg,
        )


def _present(wanted: Sequence[str], names: Sequence[str]) -> list[str]:
    have = set(names)
    return [n for n in wanted if n in have]


@dataclass
class _Inputs:
    ft: CheckpointReader
    ft_spec: Any
    aligned: CheckpointReader
    aligned_spec: Any
    targets: list[ModelTarget]
    single_file: bool


@contextlib.contextmanager
def _open_inputs(
    finetuned: str,
    aligned: str,
    *,
    targets: str | None,
    revision: str | None,
    revision_aligned: str | None,
    download: str = "ranged",
    aligned_reads: int = 2,
) -> Iterator[_Inputs]:
    """FINETUNED (every shard) and ALIGNED (only the shards holding targets), checked.

    ``aligned_reads``: how often a target of ALIGNED may be read at most (see
    :func:`open_read_often`).
    """
    from safelora_cli.sources import open_model

    _refuse_adapter(finetuned)
    # Every byte of FINETUNED is read (and its targets twice): whole shards cost least.
    ft, ft_spec = open_model(finetuned, revision=revision, label=FT_LABEL, download="full")
    try:
        _refuse_adapter(finetuned, ft)
        wanted = candidate_names(ft.names(), targets)
        al, al_spec = open_read_often(
            aligned,
            revision=revision_aligned,
            label="aligned model",
            names=wanted,
            download=download,
            reads=aligned_reads,
        )
        try:
            if {f.resolve() for f in ft.files} & {f.resolve() for f in al.files}:
                raise CheckpointError(
                    f"the fine-tuned model {finetuned} and the aligned model {aligned} are the "
                    "same checkpoint: dW would be zero everywhere.",
                    hint="Pass the fine-tuned model as FINETUNED and the model it was "
                    "fine-tuned from as --aligned.",
                    path=finetuned,
                )
            config = ft_spec.config or al_spec.config
            tl = model_targets(ft, al, targets=targets, config=config)
            p = Path(finetuned).expanduser()
            # One weights file: only it is written. An index file stands for its directory.
            single = p.is_file() and not p.name.endswith(".safetensors.index.json")
            yield _Inputs(ft, ft_spec, al, al_spec, tl, single)
        finally:
            al.close()
    finally:
        ft.close()


def open_read_often(
    arg: str,
    *,
    revision: str | None,
    label: str,
    names: Sequence[str],
    download: str,
    reads: int,
) -> tuple[CheckpointReader, Any]:
    """:func:`safelora_cli.sources.open_model` for a model whose tensors ``names`` may each be
    read up to ``reads`` times (patch-model reads ALIGNED's targets to score them and again to
    write the selected ones).

    Ranged bytes are never kept, so each read of a Hub model fetches them again: when ``reads``
    times the targets' bytes would exceed the shards holding them, the shards are downloaded
    whole (``download="full"``) instead. ``download="ranged"`` therefore never fetches more than
    ``full`` would; ``full`` is kept as asked.
    """
    from safelora_cli.progress import hub_transfer
    from safelora_cli.sources import open_model

    def want(all_names: list[str]) -> list[str]:
        return _present(names, all_names)

    reader, spec = open_model(arg, revision=revision, label=label, want=want, download=download)
    if download != "ranged" or not reader.remote_files:
        return reader, spec
    need = sum(reader.info(n).nbytes for n in _present(names, reader.names()))
    if need * reads <= hub_transfer(reader)[1]:
        return reader, spec
    reader.close()
    return open_model(arg, revision=revision, label=label, want=want, download="full")


def _compute_hint(cache: Any, targets: str | None, missing: Sequence[str]) -> str:
    import shlex

    src = cache.sources
    parts = ["safelora", "compute-projections"]
    for side in ("base", "aligned"):
        s = src.get(side) or {}
        parts.append(shlex.quote(str(s.get("arg") or s.get("path") or side.upper())))
    parts += ["-o", shlex.quote(str(cache.path))]
    spec = targets
    if spec is None:
        spec = ",".join(
            dict.fromkeys(w.removesuffix(".weight").rsplit(".", 1)[-1] for w in missing)
        )
    parts += ["--targets", shlex.quote(spec)]
    return " ".join(parts)


@contextlib.contextmanager
def open_model_source(
    inputs: _Inputs,
    targets: Sequence[ModelTarget],
    *,
    projections: Path | None,
    base: str | None,
    target_spec: str | None,
    device: str,
    revision_base: str | None,
    download: str = "ranged",
    representation: str = "auto",
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """``(ProjectorSource, provenance)`` for ``targets``, every one checked before yielding.

    A cache must hold each target with the same orientation and be built from this ALIGNED
    (its recorded fingerprint); BASE must hold each target with ALIGNED's shape.
    """
    from safelora_cli.compute import StreamingProjectorSource, parse_device
    from safelora_cli.projector_source import provenance

    dev = parse_device(device)
    requests = [(t.weight, t.fan_in_fan_out) for t in targets]
    sources: dict[str, Any] = {
        "finetuned": provenance(inputs.ft_spec),
        "aligned": provenance(inputs.aligned_spec),
    }
    if projections is not None:
        from safelora_cli.cache import ProjectionCache

        cache = ProjectionCache.open(projections, device=dev)
        try:
            missing = [w for w, _ in requests if not cache.has(w)]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise CacheError(
                    f"projection cache {cache.path} has no projector for {missing[0]}{more}",
                    hint=f"add them: {_compute_hint(cache, target_spec, missing)}",
                    path=cache.path,
                )
            cache.require(requests)
            if "aligned" in cache.sources:
                cache.check_source(
                    "aligned", inputs.aligned_spec, inputs.aligned, [w for w, _ in requests]
                )
            sources["cache"] = str(Path(projections).resolve())
            if "base" in cache.sources:
                sources["base"] = provenance(cache.sources["base"])
            yield cache, sources
        finally:
            cache.close()
        return
    assert base is not None
    # BASE: each target once while scoring, the selected ones again while writing.
    br, bspec = open_read_often(
        base,
        revision=revision_base,
        label="base model",
        names=[t.weight for t in targets],
        download=download,
        reads=2,
    )
    try:
        source = StreamingProjectorSource(
            br, inputs.aligned, device=dev, representation=representation, full_update=True
        )
        source.require(requests)
        sources["base"] = provenance(bspec)
        yield source, sources
    finally:
        br.close()


# ----------------------------------------------------------------------------- scoring


def _delta(inputs: _Inputs, t: ModelTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_aligned as stored, dW = W_ft - W_aligned in linear orientation, float32)``."""
    from safelora_cli.projector import alignment_delta

    w_ft = inputs.ft.load(t.weight)
    w_al = inputs.aligned.load(t.weight)
    return w_al, alignment_delta(w_al, w_ft, fan_in_fan_out=t.fan_in_fan_out)


def _non_finite(inputs: _Inputs, t: ModelTarget) -> CheckpointError:
    return CheckpointError(
        f"{t.weight}: W_ft - W_aligned contains NaN or Inf ({t.shard} vs "
        f"{inputs.aligned.info(t.weight).path})",
        hint="one of the checkpoints is corrupt or overflowed; re-download or re-save it",
        path=t.shard,
    )


def _does_not_fit(t: ModelTarget) -> CheckpointError:
    import torch

    from safelora_cli.reader import torch_dtype

    dt = torch_dtype(t.dtype)
    return CheckpointError(
        f"{t.weight}: the projected weight W_aligned + C dW does not fit {t.dtype} (largest "
        f"finite value {torch.finfo(dt).max:g}); nothing was written ({t.shard})",
        hint="leave this weight out (--targets, or a higher --threshold / fewer --num-layers), "
        "or convert the fine-tuned model to bfloat16 or float32 first",
        path=t.shard,
    )


def _score_one(inputs: _Inputs, t: ModelTarget, proj: Any) -> ModelModuleScore:
    from safelora_cli.projector import update_sums
    from safelora_cli.scoring import (
        REASON_NO_SIGNAL,
        REASON_NOT_FINETUNED,
        REASON_UPDATE_ORTHOGONAL,
        update_cosine,
        update_norm,
    )

    _, dw = _delta(inputs, t)
    try:
        sums = update_sums(proj, dw)
        cos = update_cosine(sums)
    except ValueError:
        raise _non_finite(inputs, t) from None
    degenerate = None
    if sums.scale == 0.0:
        degenerate, cos = REASON_NOT_FINETUNED.format(weight=t.weight), None
    elif proj.degenerate:
        degenerate, cos = REASON_NO_SIGNAL.format(weight=t.weight), None
    elif cos is None:
        degenerate = REASON_UPDATE_ORTHOGONAL
    return ModelModuleScore(
        name=t.name,
        weight=t.weight,
        layer=layer_index(t.name),
        d_out=t.d_out,
        d_in=t.d_in,
        dtype=t.dtype,
        fan_in_fan_out=t.fan_in_fan_out,
        cosine=cos,
        norm_dw=update_norm(sums),
        norm_v=float(proj.norm_v),
        degenerate=degenerate,
    )


def _ranged(inputs: _Inputs, source: Any) -> list[CheckpointReader]:
    """The readers that may read by byte ranges: ALIGNED, and BASE when projectors are
    computed on the fly (FINETUNED is always read whole)."""
    readers = [inputs.aligned, *getattr(source, "readers", ())]
    return list({id(r): r for r in readers}.values())  # ALIGNED is the stream's too


def _fetched(inputs: _Inputs, source: Any, progress: Progress | None) -> None:
    """Tell ``progress`` the bytes fetched from the Hub so far, when anything is read by ranges
    (:func:`safelora_cli.progress.report_fetched`)."""
    readers = _ranged(inputs, source)
    if any(r.remote_files for r in readers):
        report_fetched(progress, *hub_transfer(*readers))


def _note_transfer(report: ModelReport, inputs: _Inputs, source: Any) -> None:
    """Record on ``report`` what ranged reads fetched so far, of the shards' total."""
    report.fetched, report.shards_bytes = hub_transfer(*_ranged(inputs, source))


def _score_targets(
    inputs: _Inputs,
    source: Any,
    targets: Sequence[ModelTarget],
    progress: Progress | None,
) -> list[ModelModuleScore]:
    """One score per target, in order; the projector stream prefetches the next one."""
    requests = [(t.weight, t.fan_in_fan_out) for t in targets]
    if progress is not None:
        progress.start(len(targets), "scoring")
        _fetched(inputs, source, progress)
    stream: Any = None
    out: list[ModelModuleScore] = []
    try:
        stream = iter(source.projectors(requests))
        for t in targets:
            proj = next(stream)
            if proj.weight != t.weight:  # pragma: no cover - a source bug
                raise RuntimeError(f"projector source yielded {proj.weight!r} for {t.weight!r}")
            out.append(_score_one(inputs, t, proj))
            del proj
            if progress is not None:
                _fetched(inputs, source, progress)
                progress.advance(1, inputs.ft.info(t.weight).nbytes)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        if progress is not None:
            progress.finish()
    return out


# ----------------------------------------------------------------------------- writing


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a CPU tensor (the safetensors data layout)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8)
    if sys.byteorder == "big" and t.element_size() > 1:  # pragma: no cover - big-endian hosts
        raw = raw.reshape(-1, t.element_size()).flip(1).reshape(-1)
    return raw.numpy().tobytes()


def write_safetensors(
    dest: Path,
    entries: Sequence[tuple[str, str, Sequence[int], int, Callable[[], Any]]],
    metadata: dict[str, str],
) -> None:
    """A safetensors file of ``(name, dtype, shape, nbytes, data)`` entries, in that order.

    ``data()`` returns the entry's bytes (any bytes-like object: ``bytes``, a ``uint8`` array)
    and is called once per entry, as it is written, so one tensor's bytes are in memory at a
    time. CheckpointError when a chunk has another length. fsynced.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes, _ in entries:
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += b" " * (-len(hb) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(dest, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, _, _, nbytes, data in entries:
            chunk = data()
            view = memoryview(chunk).cast("B")
            if view.nbytes != nbytes:
                raise CheckpointError(
                    f"{name}: {view.nbytes} bytes to write, expected {nbytes}",
                    hint="An input file changed while it was being patched; run again.",
                    path=dest,
                )
            f.write(view)
            del view, chunk
        f.flush()
        os.fsync(f.fileno())


def provenance_metadata(report: ModelReport) -> dict[str, str]:
    """The ``safelora.*`` metadata entries (JSON strings: safetensors metadata is str -> str)."""
    sel = {
        **report.selection.to_json(),
        "threshold": report.decision.threshold,
        "k": report.decision.k,
        "ties": report.decision.ties,
    }

    def dumps(o: Any) -> str:
        return json.dumps(o, sort_keys=True, separators=(",", ":"))

    return {
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}kind": "patch-model",
        f"{META_PREFIX}sources": dumps(report.sources),
        f"{META_PREFIX}selection": dumps(sel),
        f"{META_PREFIX}projected": dumps([m.name for m in report.modules if m.projected]),
    }


def _shard_rel(inputs: _Inputs, shard: Path) -> str:
    return str(shard.relative_to(inputs.ft.root)) if not inputs.single_file else shard.name


def _write_shards(
    inputs: _Inputs,
    shards: Sequence[Path],
    source: Any,
    report: ModelReport,
    by_weight: dict[str, ModelTarget],
    staging: Path,
    progress: Progress | None = None,
) -> None:
    """Write ``shards`` of FINETUNED into ``staging`` (projected weights replaced)."""
    import torch

    from safelora_cli.projector import projected_weight
    from safelora_cli.reader import torch_dtype

    ft = inputs.ft
    chosen = {m.weight for m in report.modules if m.projected}
    meta_extra = provenance_metadata(report)
    per_shard: list[tuple[Path, list[str]]] = []
    for shard in shards:
        names = sorted(
            (n for n in ft.names() if ft.info(n).path == shard), key=lambda n: ft.info(n).start
        )
        per_shard.append((shard, names))
    requests = [
        (n, by_weight[n].fan_in_fan_out) for _, names in per_shard for n in names if n in chosen
    ]
    stream: Any = iter(source.projectors(requests)) if requests else iter(())
    if progress is not None:
        progress.start(len(per_shard), "writing")
        _fetched(inputs, source, progress)
    try:
        for shard, names in per_shard:
            entries = []
            for n in names:
                ti = ft.info(n)
                if n in chosen:
                    t = by_weight[n]

                    def data(t: ModelTarget = t) -> bytes:
                        proj = next(stream)
                        w_al, dw = _delta(inputs, t)
                        try:
                            w = projected_weight(
                                proj,
                                w_al,
                                dw,
                                fan_in_fan_out=t.fan_in_fan_out,
                                dtype=torch_dtype(t.dtype),
                            )
                        except ValueError:
                            raise _non_finite(inputs, t) from None
                        except OverflowError:
                            raise _does_not_fit(t) from None
                        del proj, w_al, dw
                        _fetched(inputs, source, progress)
                        return tensor_bytes(w)

                else:
                    # Through a byte buffer (never a tensor of its dtype, never a second copy),
                    # freed once written: a buffer reused across tensors would keep the largest
                    # (an embedding) resident while the projected weights are computed.

                    def data(n: str = n, nbytes: int = ti.nbytes) -> Any:
                        buf = torch.empty(nbytes, dtype=torch.uint8)
                        ft.load_into(n, buf)  # the stored bytes, as they are
                        return buf.numpy()

                entries.append((n, ti.dtype, ti.shape, ti.nbytes, data))
            metadata = dict(ft.metadata(shard))
            metadata.update(meta_extra)
            dest = staging / _shard_rel(inputs, shard)
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(dest, entries, metadata)
            if progress is not None:
                progress.advance(1, sum(e[3] for e in entries))
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        if progress is not None:
            progress.finish()


_OTHER_WEIGHTS = re.compile(
    r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.bin\.index\.json|\.pt|\.pth|\.ckpt"
    r"|\.h5|\.msgpack|\.gguf)$"
)


def _other_weights(name: str) -> bool:
    """A weights file name (other formats of the same model) that is not copied."""
    if name == "training_args.bin":
        return False
    return _OTHER_WEIGHTS.search(name) is not None


CARD_LIMIT = 16 * 1024 * 1024  # a model card is text for people


def model_section(report: ModelReport) -> str:
    """Markdown saying what patch-model did (the model card's safelora section)."""
    sel = report.selection.to_json()
    flag = {"num_layers": "--num-layers", "threshold": "--threshold"}.get(sel["mode"], "--fraction")
    rule = f"`{flag} {sel['value']}`"
    if sel["mode"] != "threshold" and report.threshold is not None:
        rule += f" (weights with cosine <= {report.threshold:.5f})"
    src = report.sources or {}
    lines = [
        "## Safe LoRA",
        "",
        f"This model was patched with safelora {__version__} (patch-model), which applies Safe "
        "LoRA (Hsu et al., NeurIPS 2024, arXiv 2405.16833) to a full fine-tune: each selected "
        "weight was replaced by `W_aligned + C (W_ft - W_aligned)` (`C = V V^T / ||V||_F`, "
        "`V = W_aligned - W_base`); every other tensor is unchanged.",
        "",
        f"- Selection: {rule}",
        f"- Projected: {report.projected} of {report.total} weights",
    ]
    for key, what in (("aligned", "Aligned model"), ("base", "Base (unaligned) model")):
        if key in src:
            spec = src[key] or {}
            lines.append(f"- {what}: {spec.get('repo_id') or spec.get('arg') or spec.get('path')}")
    lines += ["", "| weight | cosine | projected |", "| --- | ---: | --- |"]
    for m in report.modules:
        cos = "-" if m.cosine is None else f"{round_cosine(m.cosine):.5f}"
        verdict = "yes" if m.projected else "no"
        lines.append(f"| `{m.name}` | {cos} | {verdict} |")
    lines += ["", "Per-weight details (norms, reasons, sources) are in `safelora_report.json`."]
    return "\n".join(lines) + "\n"


def _card(inputs: _Inputs, report: ModelReport) -> str:
    """README.md of the output: the input's card (if any) with safelora's keys and section."""
    from safelora_cli.fsio import read_regular
    from safelora_cli.modelcard import CARD_NAME, render_card

    path = inputs.ft.root / CARD_NAME
    existing = None
    if path.is_file():
        try:
            existing = read_regular(path, CARD_LIMIT).decode("utf-8")
        except ValueError:
            raise CheckpointError(
                f"{path} is not UTF-8 text or is too large for a model card.",
                hint="Fix or remove README.md, then run again.",
                path=path,
            ) from None
    aligned = (report.sources or {}).get("aligned") or {}
    return render_card(
        existing,
        base_model=aligned.get("repo_id"),
        library_name="transformers",
        section=model_section(report),
        source=str(path),
    )


def _write_rest(inputs: _Inputs, report: ModelReport, staging: Path) -> None:
    """Every other file of FINETUNED's directory, the model card, the report (rank 0's share)."""
    from safelora_cli.fsio import fsync_dir
    from safelora_cli.modelcard import CARD_NAME

    if not inputs.single_file:
        root = inputs.ft.root
        skip = {_shard_rel(inputs, f).split("/", 1)[0] for f in inputs.ft.files}
        # Weight files that are not this checkpoint's (a stray model.safetensors beside an
        # index, pytorch_model*.bin, ...) would hold unpatched weights a loader might prefer.
        index = inputs.ft.index_path.name if inputs.ft.index_path is not None else None
        skip |= {
            p.name
            for p in root.iterdir()
            if p.name != index and p.is_file() and _other_weights(p.name)
        }
        copy_tree(root, staging, skip | {REPORT_NAME, CARD_NAME})
        write_text(staging / CARD_NAME, _card(inputs, report))
    text = json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n"
    write_text(staging / REPORT_NAME, text)
    fsync_dir(staging)


def _plan(inputs: _Inputs, output: Path, force: bool, others: list[tuple[str, Path]]) -> OutputPlan:
    ft = inputs.ft
    src = Path(inputs.ft_spec.path)
    own = [_shard_rel(inputs, f) for f in ft.files]
    if ft.index_path is not None:
        own.append(ft.index_path.name)

    def check(p: Path) -> None:
        if p.is_dir():
            check_links(p, own=own, label=FT_LABEL, error=CheckpointError)

    name = src.name if inputs.ft_spec.kind == "local" else str(inputs.ft_spec.repo_id)
    return plan_outputs(
        [OutputInput(name.rsplit("/", 1)[-1], src, FT_LABEL)],
        output,
        force=force,
        others=others,
        # Only an earlier patch-model output (or an empty directory): a model directory with
        # just a config.json is someone's model, and --force must not wipe it.
        markers=(REPORT_NAME,),
        what="patch-model output",
        check_input=check,
    )


def _shard_cost(inputs: _Inputs, shard: Path) -> float:
    from safelora_cli.compute import FLOPS_PER_S, READ_BYTES_PER_S

    nbytes = sum(
        inputs.ft.info(n).nbytes for n in inputs.ft.names() if inputs.ft.info(n).path == shard
    )
    flops = sum(4.0 * t.d_out * t.d_out * t.d_in for t in inputs.targets if t.shard == shard)
    return 2 * nbytes / READ_BYTES_PER_S + flops / FLOPS_PER_S["cpu"]


# ----------------------------------------------------------------------------- entry points


def score_model(
    finetuned: str,
    selection: Selection | None = None,
    *,
    aligned: str | None,
    projections: Path | None = None,
    base: str | None = None,
    targets: str | None = None,
    device: str = "auto",
    revision: str | None = None,
    revision_aligned: str | None = None,
    revision_base: str | None = None,
    progress: Progress | None = None,
    download: str = "ranged",
    representation: str = "auto",
) -> ModelReport:
    """What ``patch-model --dry-run`` computes (``inspect FINETUNED --aligned ...``); nothing is
    written. ``output`` is None in the report."""
    from safelora_cli.compute import limit_heap_retention

    selection = selection or Selection.from_flags(None, None, None)
    if finetuned and aligned is None and (projections is not None or base is not None):
        # inspect MODEL -p CACHE: a model where an adapter was expected, or a full fine-tune
        # scored without the model it was fine-tuned from. Name the kind, then both ways on.
        raise CheckpointError(
            f"{finetuned} is a model checkpoint, not a LoRA adapter; scoring it as a full "
            "fine-tune needs --aligned ALIGNED (dW = W_ft - W_aligned).",
            hint="Pass --aligned with the model it was fine-tuned from; to build projectors "
            "from it, pass it as BASE or ALIGNED to safelora compute-projections.",
            path=finetuned,
        )
    check_model_flags(finetuned, aligned, projections, base, revision_base, representation)
    assert aligned is not None
    limit_heap_retention()  # weight-sized buffers go back to the OS when freed
    with (
        _open_inputs(
            finetuned,
            aligned,
            targets=targets,
            revision=revision,
            revision_aligned=revision_aligned,
            download=download,
            aligned_reads=2 if base else 1,
        ) as inputs,
        open_model_source(
            inputs,
            inputs.targets,
            projections=projections,
            base=base,
            target_spec=targets,
            device=device,
            revision_base=revision_base,
            download=download,
            representation=representation,
        ) as (source, sources),
    ):
        scores = _score_targets(inputs, source, inputs.targets, progress)
        report = decide(finetuned, inputs.ft_spec.path, scores, selection)
        report.sources = sources
        _note_transfer(report, inputs, source)
        return report


def patch_model(
    finetuned: str,
    output: Path,
    *,
    aligned: str | None,
    projections: Path | None = None,
    base: str | None = None,
    selection: Selection | None = None,
    targets: str | None = None,
    device: str = "auto",
    dry_run: bool = False,
    force: bool = False,
    revision: str | None = None,
    revision_aligned: str | None = None,
    revision_base: str | None = None,
    progress: Progress | None = None,
    dist: Dist | None = None,
    download: str = "ranged",
    representation: str = "auto",
) -> ModelReport:
    """Patch the fine-tuned model ``finetuned`` into ``output`` (module docstring).

    Raises UsageError (flags), CheckpointError/CacheError/SourceError (inputs), OutputError
    (output rules); nothing is written then. ``dist``: split the shards across the ranks of a
    multi-process launch; every rank returns the same report.
    """
    selection = selection or Selection.from_flags(None, None, None)
    if dist is not None and dist.world_size > 1:
        return _patch_model_distributed(
            finetuned,
            Path(output),
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
            progress=progress,
            dist=dist,
            download=download,
            representation=representation,
        )
    from safelora_cli.compute import limit_heap_retention

    check_model_flags(finetuned, aligned, projections, base, revision_base, representation)
    assert aligned is not None
    limit_heap_retention()  # weight-sized buffers go back to the OS when freed
    others = other_inputs(
        [("aligned model", aligned), ("base model", base), ("projection cache", projections)]
    )
    with _open_inputs(
        finetuned,
        aligned,
        targets=targets,
        revision=revision,
        revision_aligned=revision_aligned,
        download=download,
        aligned_reads=4 if base else 2,
    ) as inputs:
        plan = _plan(inputs, Path(output), force, others)
        with open_model_source(
            inputs,
            inputs.targets,
            projections=projections,
            base=base,
            target_spec=targets,
            device=device,
            revision_base=revision_base,
            download=download,
            representation=representation,
        ) as (source, sources):
            scores = _score_targets(inputs, source, inputs.targets, progress)
            report = decide(finetuned, inputs.ft_spec.path, scores, selection)
            report.sources = sources
            report.output = str(plan.targets[0])
            report.dry_run = dry_run
            _note_transfer(report, inputs, source)
            if dry_run:
                return report
            by_weight = {t.weight: t for t in inputs.targets}

            def write(item: ModelReport, staging: Path) -> None:
                _write_shards(inputs, inputs.ft.files, source, item, by_weight, staging, progress)
                _write_rest(inputs, item, staging)

            try:
                write_outputs([report], plan, write)
            except OSError as e:
                named = name_failed_output(e, plan)
                if named is e:
                    raise
                raise named from e
            _note_transfer(report, inputs, source)  # the selected weights were read again
    return report


def _patch_model_distributed(
    finetuned: str,
    output: Path,
    *,
    aligned: str | None,
    projections: Path | None,
    base: str | None,
    selection: Selection,
    targets: str | None,
    device: str,
    dry_run: bool,
    force: bool,
    revision: str | None,
    revision_aligned: str | None,
    revision_base: str | None,
    progress: Progress | None,
    dist: Dist,
    download: str = "ranged",
    representation: str = "auto",
) -> ModelReport:
    """patch-model as one rank of several (module docstring; docs/scale-out.md).

    Collectives, in the same order on every rank: agree (inputs, plan, this rank's scores),
    all_gather (scores), then, unless ``dry_run``: broadcast (rank 0's staging directory, or
    None when staging failed), agree (every rank's shards written), agree (published).
    """
    from safelora_cli.compute import limit_heap_retention
    from safelora_cli.distributed import balance, rank_device

    err: Exception | None = None
    stack = contextlib.ExitStack()
    inputs: _Inputs | None = None
    source: Any = None
    sources: dict[str, Any] = {}
    plan: OutputPlan | None = None
    mine: list[Path] = []
    my_scores: list[ModelModuleScore] = []
    with stack:
        try:
            check_model_flags(finetuned, aligned, projections, base, revision_base, representation)
            assert aligned is not None
            limit_heap_retention()
            others = other_inputs(
                [
                    ("aligned model", aligned),
                    ("base model", base),
                    ("projection cache", projections),
                ]
            )
            inputs = stack.enter_context(
                _open_inputs(
                    finetuned,
                    aligned,
                    targets=targets,
                    revision=revision,
                    revision_aligned=revision_aligned,
                    download=download,
                    aligned_reads=4 if base else 2,
                )
            )
            plan = _plan(inputs, output, force, others)
            shards = inputs.ft.files
            split = balance([_shard_cost(inputs, s) for s in shards], dist.world_size)
            mine = [shards[i] for i in split[dist.rank]]
            my_targets = [t for t in inputs.targets if t.shard in set(mine)]
            source, sources = stack.enter_context(
                open_model_source(
                    inputs,
                    my_targets,
                    projections=projections,
                    base=base,
                    target_spec=targets,
                    device=rank_device(device, dist),
                    revision_base=revision_base,
                    download=download,
                    representation=representation,
                )
            )
            my_scores = _score_targets(
                inputs, source, my_targets, progress if dist.is_main else None
            )
        except Exception as e:
            err = e
        dist.agree(err)
        assert inputs is not None and plan is not None
        gathered = dist.all_gather(my_scores)
        by_name = {m.name: m for part in gathered for m in part}
        scores = [by_name[t.name] for t in inputs.targets]
        report = decide(finetuned, inputs.ft_spec.path, scores, selection)
        report.sources = sources
        report.output = str(plan.targets[0])
        report.dry_run = dry_run
        if dry_run:
            return report
        by_weight = {t.weight: t for t in inputs.targets}

        def write_mine(staging: Path) -> None:
            _write_shards(
                inputs, mine, source, report, by_weight, staging, progress if dist.is_main else None
            )

        if dist.is_main:
            _main_rank_write(
                report, plan, dist, write_mine, lambda d: _write_rest(inputs, report, d)
            )
        else:
            _other_rank_write(dist, write_mine)
        return report


def _main_rank_write(
    report: ModelReport,
    plan: OutputPlan,
    dist: Dist,
    write_mine: Callable[[Path], None],
    write_rest: Callable[[Path], None],
) -> None:
    """Rank 0: stage with write_outputs; inside, share the staging directory with the ranks."""
    from safelora_cli.fsio import fsync_dir

    shared = [False]

    def write(item: ModelReport, staging: Path) -> None:
        shared[0] = True
        dist.broadcast(str(staging))
        err: Exception | None = None
        try:
            write_mine(staging)
            write_rest(staging)
        except Exception as e:
            err = e
        dist.agree(err)  # every rank's shards are in place (or the staging is dropped)
        fsync_dir(staging)  # the other ranks' file names too

    final: Exception | None = None
    try:
        write_outputs([report], plan, write)
    except Exception as e:
        if not shared[0]:
            dist.broadcast(None)  # the other ranks wait for a staging directory
        final = e
    dist.agree(final)


def _other_rank_write(dist: Dist, write_mine: Callable[[Path], None]) -> None:
    """A rank other than 0: write its shards into rank 0's staging directory."""
    staging = dist.broadcast(None)
    if staging is not None:
        err: Exception | None = None
        try:
            write_mine(Path(staging))
        except Exception as e:
            err = e
        # A failure anywhere: rank 0 reports it in the final agreement below.
        with contextlib.suppress(SafeLoraError):
            dist.agree(err)
    dist.agree(None)


__all__ = [
    "ModelModuleScore",
    "ModelReport",
    "ModelTarget",
    "candidate_names",
    "check_model_flags",
    "decide",
    "is_adapter_dir",
    "is_block_weight",
    "is_local_model",
    "model_targets",
    "open_model_source",
    "patch_model",
    "provenance_metadata",
    "score_model",
    "tensor_bytes",
    "write_safetensors",
]
