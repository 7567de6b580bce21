"""``patch``: project the selected LoRA modules of one or many adapters, write new adapters.

:func:`patch_adapters` is the library entry point (the CLI only parses and renders). Contract:

- Projectors come from exactly one place: a projection cache (``projections``; only the entries
  the adapters need are read, and a missing one is a CacheError naming the
  ``compute-projections`` command that adds it) or ``base`` + ``aligned`` checkpoints (only the
  needed weights are read, streaming, nothing cached unless ``save_projections`` is given).
  Modules map to checkpoint weights exactly as ``compute-projections`` maps them
  (``targets.weight_for_module``).
- Scoring is batched (:func:`safelora_cli.scoring.score_adapters`): every projector is read or
  computed once and applied to every adapter that has that module.
- Output: with one adapter ``output`` is the new adapter directory; with several it is a
  parent and each adapter lands in ``output/<name>``, ``<name>`` being the input directory's
  name (a Hub adapter's repository name); two inputs with one name are a UsageError. ``output``
  (and every target) may not equal, lie inside or contain an input. An existing ``output`` is
  refused unless ``force``; with ``force`` an existing target must be a directory that looks
  like an adapter (it has ``adapter_config.json`` or ``safelora_report.json``) or is empty, so
  ``--force`` never wipes an unrelated directory.
- Batch failures are **all-or-nothing**: every adapter is read, matched, scored and checked
  before the first byte is written; then every new adapter is staged in a temporary directory
  beside its target (files fsynced) and only when all are staged are they renamed into place.
  If staging or a rename fails, the renames already done are rolled back (``--force``'d
  originals restored) and the temporary directories removed. A killed run leaves at most a
  hidden ``.<name>.safelora-tmp-*`` directory beside the target, never a partial adapter.
  When ``output`` does not exist yet, a batch is staged as one tree and renamed once.
- The new adapter directory: every file of the input directory is copied byte for byte
  (recursively; ``.git`` and ``.cache`` are not copied: they describe the input's download,
  not the new adapter), ``adapter_config.json`` included, unchanged. The weights file is
  rewritten as ``adapter_model.safetensors`` with the same keys, dtypes, shapes and tensor
  order; tensors other than the projected ``lora_B`` are copied as their stored bytes. Its
  ``__metadata__`` keeps the input's entries (``{"format": "pt"}``) and adds
  :data:`META_PREFIX`-keys (JSON strings): ``version``, ``sources``, ``selection``,
  ``projected``. A legacy ``adapter_model.bin`` input is written as
  ``adapter_model.safetensors`` (the ``.bin`` is not copied, so PEFT cannot load the unpatched
  weights by mistake; likewise a stale ``.bin`` beside a ``.safetensors`` input is dropped);
  tensors keep their dtype and values.
- ``safelora_report.json`` (:meth:`AdapterReport.to_json`, indented) sits beside it. There is
  no timestamp anywhere: the same inputs give byte-identical output directories.
- ``dry_run``: everything up to the writes (including the output checks); nothing written.

- Several processes (``dist=``, under ``accelerate launch`` / ``torchrun``; docs/scale-out.md):
  every rank applies the output rules to every adapter; the adapters are split by
  :func:`_adapter_cost`; each rank scores its own (reading only their projectors); any failure
  fails every rank before a byte is written; :func:`_write_distributed` publishes them. Outputs
  are byte-identical to a single-process run.

Returns one :class:`~safelora_cli.scoring.AdapterReport` per adapter, in argument order.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safelora_cli import __version__
from safelora_cli.errors import AdapterError, OutputError, SafeLoraError, UsageError
from safelora_cli.fsio import fsync_dir
from safelora_cli.scoring import AdapterReport, ScoredAdapter, score_adapters
from safelora_cli.selection import Selection

if TYPE_CHECKING:
    from safelora_cli.adapter import Adapter, LoraModule
    from safelora_cli.distributed import Dist
    from safelora_cli.progress import Progress

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_NAME = "adapter_model.bin"
REPORT_NAME = "safelora_report.json"
CONFIG_NAME = "adapter_config.json"
META_PREFIX = "safelora."
NOT_COPIED = frozenset({".git", ".cache"})
_TMP = ".safelora-tmp-"
_OLD = ".safelora-old-"


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
) -> list[AdapterReport]:
    """Patch ``adapters`` into ``output`` (see the module docstring for every rule).

    Raises UsageError (bad flag combination, duplicate names), SourceError/AdapterError/
    CheckpointError/CacheError (inputs), OutputError (output rules); nothing is written then.
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
        )
    _check_flags(
        adapters,
        projections,
        base,
        aligned,
        revision_base,
        revision_aligned,
        save_projections,
        dry_run,
    )
    loaded = _load_all(adapters)
    try:
        others = _other_inputs(projections, base, aligned, save_projections)
        plan = plan_outputs(loaded, Path(output), force=force, others=others)
        with _projector_source(
            loaded,
            adapters,
            projections=projections,
            base=base,
            aligned=aligned,
            device=device,
            revision_base=revision_base,
            revision_aligned=revision_aligned,
            save_projections=save_projections,
        ) as (source, weight_for, sources):
            scored = score_adapters(
                loaded, source, selection, weight_for=weight_for, progress=progress
            )
            for s, target in zip(scored, plan.targets, strict=True):
                s.report.output = str(target)
                s.report.sources = sources
                s.report.dry_run = dry_run
            if not dry_run:
                # Inside the source's context: a failed write also undoes --save-projections.
                try:
                    write_outputs(scored, plan)
                except OSError as e:
                    if e.filename is not None:
                        raise
                    # A full disk (fsync/write) names no file: say which output failed.
                    raise OSError(e.errno, e.strerror or str(e), str(plan.root)) from e
        return [s.report for s in scored]
    finally:
        for ad in loaded:
            ad.close()


def _check_flags(
    adapters: Sequence[str],
    projections: Path | None,
    base: str | None,
    aligned: str | None,
    revision_base: str | None,
    revision_aligned: str | None,
    save_projections: Path | None,
    dry_run: bool = False,
) -> None:
    if not adapters:
        raise UsageError("no adapter given.", hint="Pass one or more adapter directories.")
    streaming = base is not None or aligned is not None
    if projections is not None and streaming:
        raise UsageError(
            "-p/--projections and --base/--aligned are mutually exclusive.",
            hint="Use a projection cache (-p CACHE) or compute on the fly (--base B --aligned A).",
        )
    if projections is None and not streaming:
        raise UsageError(
            "no projector source given.",
            hint="Pass -p CACHE (from safelora compute-projections) or --base B --aligned A.",
        )
    if streaming and (base is None or aligned is None):
        missing = "--aligned" if aligned is None else "--base"
        raise UsageError(
            f"{missing} is missing: --base and --aligned go together.",
            hint="Pass both the base (unaligned) and the aligned model.",
        )
    if projections is not None and (revision_base or revision_aligned):
        raise UsageError(
            "--revision-base/--revision-aligned apply to --base/--aligned, not to -p.",
            hint="The cache records the revisions it was built from; drop the flag.",
        )
    if save_projections is not None and dry_run:
        raise UsageError(
            "--save-projections writes a cache; --dry-run writes nothing.",
            hint="Drop one of the two (compute-projections builds a cache on its own).",
        )
    if save_projections is not None and not streaming:
        raise UsageError(
            "--save-projections needs --base and --aligned.",
            hint="With -p the projections are already cached.",
        )


def _load_all(args: Sequence[str]) -> list[Adapter]:
    """Every adapter read and validated before anything else happens (nothing half-done)."""
    from safelora_cli.adapter import load_adapter

    loaded: list[Adapter] = []
    try:
        for arg in args:
            loaded.append(load_adapter(arg))
    except BaseException:
        for ad in loaded:
            ad.close()
        raise
    return loaded


# ----------------------------------------------------------------------------- sources


def _provenance(spec: Any) -> dict[str, Any]:
    """The part of a SourceSpec (object or its JSON) a reader of the output needs."""
    d = spec.to_json() if hasattr(spec, "to_json") else dict(spec or {})
    return {k: d.get(k) for k in ("arg", "kind", "path", "repo_id", "revision", "commit")}


def _mapper(names: Sequence[str], label: str, *, strict: bool) -> Callable[[LoraModule], str]:
    """``LoraModule -> checkpoint weight`` exactly as compute-projections maps it."""
    from safelora_cli.targets import weight_for_module

    memo: dict[str, str] = {}

    def weight_for(m: LoraModule) -> str:
        if m.name not in memo:
            try:
                memo[m.name] = weight_for_module(m, names, source_label=label)
            except SafeLoraError:
                if strict:
                    raise
                # A cache lacking the weight: let the cache say which command adds it.
                memo[m.name] = m.weight_name
        return memo[m.name]

    return weight_for


@contextlib.contextmanager
def _projector_source(
    loaded: Sequence[Adapter],
    args: Sequence[str],
    *,
    projections: Path | None,
    base: str | None,
    aligned: str | None,
    device: str,
    revision_base: str | None,
    revision_aligned: str | None,
    save_projections: Path | None,
) -> Iterator[tuple[Any, Callable[[LoraModule], str], dict[str, Any]]]:
    """``(ProjectorSource, weight_for, provenance)``; everything checked before yielding."""
    from safelora_cli.adapter import orient_for_base

    if projections is not None:
        from safelora_cli.cache import ProjectionCache

        cache = ProjectionCache.open(projections, device=_device(device), adapters=list(args))
        try:
            base_config = (cache.sources.get("base") or {}).get("config") or {}
            orient_for_base(loaded, base_config.get("model_type"))
            modules = [m for ad in loaded for m in ad.modules]
            weight_for = _mapper(cache.weights(), "projection cache", strict=False)
            requests = sorted({(weight_for(m), bool(m.fan_in_fan_out)) for m in modules})
            cache.require(requests, adapters=list(args))
            recorded = cache.sources
            sources = {
                "cache": str(Path(projections).resolve()),
                **{k: _provenance(recorded[k]) for k in ("base", "aligned") if k in recorded},
            }
            yield cache, weight_for, sources
        finally:
            cache.close()
        return

    from safelora_cli.compute import StreamingProjectorSource
    from safelora_cli.sources import open_model

    assert base is not None and aligned is not None

    def want(label: str) -> Callable[[list[str]], list[str]]:
        def pick(names: list[str]) -> list[str]:
            wf = _mapper(names, label, strict=True)
            return sorted({wf(m) for ad in loaded for m in ad.modules})

        return pick

    base_reader, base_spec = open_model(
        base, revision=revision_base, label="base model", want=want("base model")
    )
    try:
        aligned_reader, aligned_spec = open_model(
            aligned, revision=revision_aligned, label="aligned model", want=want("aligned model")
        )
    except BaseException:
        base_reader.close()
        raise
    try:
        orient_for_base(loaded, (base_spec.config or {}).get("model_type"))
        modules = [m for ad in loaded for m in ad.modules]
        weight_for = _mapper(base_reader.names(), "base model", strict=True)
        requests = sorted({(weight_for(m), bool(m.fan_in_fan_out)) for m in modules})
        source: Any = StreamingProjectorSource(base_reader, aligned_reader, device=_device(device))
        source.require(requests)  # headers only: shapes, dtypes, presence, before any compute
        sources = {"base": _provenance(base_spec), "aligned": _provenance(aligned_spec)}
        if save_projections is not None:
            source = _Saving(source, save_projections, base_spec, aligned_spec)
        try:
            yield source, weight_for, sources
        except BaseException:
            if isinstance(source, _Saving):
                source.abort()
            raise
        else:
            if isinstance(source, _Saving):
                source.finish()
        finally:
            if isinstance(source, _Saving):
                source.close()
    finally:
        base_reader.close()
        aligned_reader.close()


class _Saving:
    """A ProjectorSource wrapper that also writes every projector into a projection cache."""

    def __init__(self, inner: Any, path: Path, base_spec: Any, aligned_spec: Any) -> None:
        from safelora_cli.cache import ProjectionCache

        self.inner = inner
        self.cache = ProjectionCache.create_or_resume(Path(path), base_spec, aligned_spec)

    def get(self, weight: str, *, fan_in_fan_out: bool = False) -> Any:
        p = self.inner.get(weight, fan_in_fan_out=fan_in_fan_out)
        self._put(p)
        return p

    def projectors(self, requests: Sequence[tuple[str, bool]]) -> Iterator[Any]:
        for p in self.inner.projectors(requests):
            self._put(p)
            yield p

    def _put(self, p: Any) -> None:
        if not self.cache.has(p.weight):
            self.cache.put(p)

    def finish(self) -> None:
        self.cache.finish()

    def abort(self) -> None:
        """The run failed: a cache this run created goes; an existing one keeps valid entries."""
        if self.cache.created:
            self.cache.close()
            shutil.rmtree(self.cache.path, ignore_errors=True)
        else:
            self.cache.finish()

    def close(self) -> None:
        self.cache.close()


def _device(device: str) -> Any:
    """``auto|cpu|cuda|cuda:N`` -> torch.device (UsageError when malformed or unavailable)."""
    from safelora_cli.compute import parse_device

    return parse_device(device)


# ----------------------------------------------------------------------------- output plan


@dataclass
class OutputPlan:
    """Where each adapter goes. ``batch``: ``root`` is a parent of the targets."""

    root: Path
    targets: list[Path]
    batch: bool
    force: bool


def _output_name(ad: Adapter) -> str:
    src = ad.source
    if src is not None and getattr(src, "kind", None) == "hub" and src.repo_id:
        return str(src.repo_id).rsplit("/", 1)[-1]
    return ad.path.resolve().name


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _looks_replaceable(p: Path) -> bool:
    """An existing directory ``--force`` may replace: an adapter or an empty directory."""
    return p.is_dir() and (
        (p / CONFIG_NAME).is_file() or (p / REPORT_NAME).is_file() or not any(p.iterdir())
    )


def _other_inputs(
    projections: Path | None,
    base: str | None,
    aligned: str | None,
    save_projections: Path | None,
) -> list[tuple[str, Path]]:
    """The non-adapter inputs (and the --save-projections cache) the output must stay out of."""
    out: list[tuple[str, Path]] = []
    for label, arg in (
        ("projection cache", projections),
        ("base model", base),
        ("aligned model", aligned),
    ):
        if arg is not None and Path(arg).expanduser().exists():
            out.append((label, Path(arg).expanduser().resolve()))
    if save_projections is not None:
        out.append(("--save-projections cache", Path(os.path.abspath(save_projections)).resolve()))
    return out


def _check_parents(root: Path, staging: Path) -> None:
    """OutputError unless the nearest existing ancestor of ``staging`` is a writable directory."""
    anc = staging
    while not (anc.exists() or anc.is_symlink()) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(
            f"output {root}: {anc} is a file, not a directory.",
            hint="Choose an -o whose parent directories are directories.",
            path=root,
        )
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(
            f"output {root}: cannot write in {anc} (permission denied).",
            hint="Choose a location you can write to (-o), or fix the permissions.",
            path=root,
        )


def check_links(src: Path) -> None:
    """AdapterError for links the copy must not follow: out of the adapter, or to directories.

    Every file of the adapter directory is copied into the new adapter; a symlinked extra file
    (README, tokenizer, ...) that resolves outside the directory would copy a file the adapter
    does not contain (a Hub snapshot's links into its ``blobs`` stay inside: see
    ``reader.containment_root``). The config and weights are read as the adapter itself and may
    link anywhere. Directory links are refused: they can loop.
    """
    from safelora_cli.reader import containment_root

    src = Path(src)
    if not src.is_dir():
        return
    bound = containment_root(src.resolve()).resolve()
    own = {CONFIG_NAME, WEIGHTS_NAME, LEGACY_NAME}
    hint = "Replace the link by the file itself or remove it: patch copies every file."

    def walk(d: Path) -> None:
        for entry in sorted(d.iterdir()):
            if entry.name in NOT_COPIED:
                continue
            rel = entry.relative_to(src)
            if entry.is_symlink():
                try:
                    target = entry.resolve(strict=True)
                except (OSError, RuntimeError):
                    raise AdapterError(
                        f"adapter {src}: {rel} is a broken or looping symlink.",
                        hint=hint,
                        path=entry,
                    ) from None
                if target.is_dir():
                    raise AdapterError(
                        f"adapter {src}: {rel} is a symlink to a directory ({target}).",
                        hint=hint,
                        path=entry,
                    )
                if d == src and entry.name in own:
                    continue
                if not target.is_relative_to(bound):
                    raise AdapterError(
                        f"adapter {src}: {rel} links to {target}, outside the adapter directory.",
                        hint=hint,
                        path=entry,
                    )
            elif entry.is_dir():
                walk(entry)

    walk(src)


def plan_outputs(
    loaded: Sequence[Adapter],
    output: Path,
    *,
    force: bool,
    others: Sequence[tuple[str, Path]] = (),
) -> OutputPlan:
    """Apply the output rules (module docstring); OutputError / UsageError when broken.

    ``others``: further inputs as (label, resolved path) (the cache, local base/aligned models,
    the --save-projections cache) that no output may equal, contain or lie inside.
    """
    root = Path(os.path.abspath(output)).resolve()
    batch = len(loaded) > 1
    if batch:
        names: dict[str, Adapter] = {}
        for ad in loaded:
            n = _output_name(ad)
            if n in names:
                raise UsageError(
                    f"two adapters would both be written to {root / n}: {names[n].path} and "
                    f"{ad.path}.",
                    hint="Patch them in separate runs, or rename one of the input directories.",
                )
            names[n] = ad
        targets = [root / _output_name(ad) for ad in loaded]
    else:
        targets = [root]
    inputs = [("input adapter", ad.path.resolve()) for ad in loaded] + list(others)
    for label, src in inputs:
        for t in [root, *targets]:
            if _related(t, src):
                raise OutputError(
                    f"output {t} {'is' if t == src else 'overlaps'} the {label} {src}.",
                    hint="Choose an output directory outside every input (-o).",
                    path=t,
                )
    for ad in loaded:
        check_links(ad.path)
    _check_parents(root, root if batch and root.is_dir() else root.parent)
    if root.exists() or root.is_symlink():
        if not force:
            raise OutputError(
                f"output {root} already exists.",
                hint="Choose another -o, or pass --force to replace it.",
                path=root,
            )
        if not root.is_dir():
            raise OutputError(
                f"output {root} exists and is not a directory.",
                hint="Remove it or choose another -o.",
                path=root,
            )
        for t in targets:
            if (t.exists() or t.is_symlink()) and not _looks_replaceable(t):
                raise OutputError(
                    f"output {t} exists and is not an adapter directory; --force will not "
                    "replace it.",
                    hint="Remove it yourself or choose another -o.",
                    path=t,
                )
    return OutputPlan(root=root, targets=targets, batch=batch, force=force)


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


def _copy_tree(src: Path, dest: Path, skip: set[str]) -> None:
    """Copy every file under ``src`` (following symlinks: Hub snapshots link to blobs)."""
    for entry in sorted(src.iterdir()):
        if entry.name in NOT_COPIED or (entry.parent == src and entry.name in skip):
            continue
        target = dest / entry.name
        if entry.is_dir():
            target.mkdir()
            _copy_tree(entry, target, set())
        elif entry.is_file():
            with open(entry, "rb") as fi, open(target, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
                os.fsync(fo.fileno())
            shutil.copymode(entry, target)
    fsync_dir(dest)


def write_adapter_dir(s: ScoredAdapter, dest: Path) -> None:
    """Fill the (empty, existing) directory ``dest`` with the patched adapter."""
    ad = s.adapter
    src = ad.path
    _copy_tree(src, dest, {ad.weights_path.name, WEIGHTS_NAME, LEGACY_NAME, REPORT_NAME})
    _write_safetensors(s, dest / WEIGHTS_NAME)
    report = json.dumps(s.report.to_json(), indent=2, allow_nan=False) + "\n"
    with open(dest / REPORT_NAME, "w", encoding="utf-8") as f:
        f.write(report)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(dest)


def _host() -> str:
    """This machine's name, safe in a file name (temporaries of other hosts are never touched)."""
    import socket

    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname() or "host")[:64]


def _mkdtemp(beside: Path, tag: str) -> Path:
    # Host and pid in the name let a later run tell a killed run's leftovers from a live run's
    # (on a shared file system, another machine's pids mean nothing here).
    prefix = f".{beside.name}{tag}{_host()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=beside.parent))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def clean_stale(target: Path) -> None:
    """Remove what killed runs left beside ``target`` (hidden ``.<name>.safelora-*`` dirs).

    Only directories this host created whose process is gone: a live run's staging (or another
    machine's) is left alone. A moved-aside original (``-old-``) is removed only when ``target``
    exists again; otherwise it may be the only copy of the previous output, and it stays.
    """
    parent = target.parent
    if not parent.is_dir():
        return
    for tag in (_TMP, _OLD):
        prefix = f".{target.name}{tag}{_host()}-"
        for q in parent.iterdir():
            if not q.name.startswith(prefix) or not q.is_dir() or q.is_symlink():
                continue
            pid = q.name[len(prefix) :].split("-", 1)[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if tag == _OLD and not (target.exists() or target.is_symlink()):
                continue
            _rmtree(q)


def _rmtree(p: Path | None) -> None:
    if p is not None and (p.exists() or p.is_symlink()):
        shutil.rmtree(p, ignore_errors=True)


def write_outputs(scored: Sequence[ScoredAdapter], plan: OutputPlan) -> None:
    """Stage every adapter, then move them all into place; all-or-nothing (module docstring)."""
    for t in {plan.root, *plan.targets}:
        clean_stale(t)
    created: list[Path] = []  # parents this run created, removed again on failure
    for p in reversed(plan.root.parents):
        if not p.exists():
            p.mkdir()
            created.append(p)
    staged: list[tuple[Path, Path]] = []  # (target, staged directory)
    try:
        if plan.batch and not plan.root.exists():
            tree = _mkdtemp(plan.root, _TMP)
            staged.append((plan.root, tree))
            for s, t in zip(scored, plan.targets, strict=True):
                d = tree / t.name
                d.mkdir()
                write_adapter_dir(s, d)
            fsync_dir(tree)
        else:
            for s, t in zip(scored, plan.targets, strict=True):
                d = _mkdtemp(t, _TMP)
                staged.append((t, d))
                write_adapter_dir(s, d)
        _commit(staged)
    except BaseException:
        for _, d in staged:
            _rmtree(d)
        for p in reversed(created):
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _commit(staged: Sequence[tuple[Path, Path]]) -> None:
    """Rename each staged directory onto its target; roll every rename back on failure."""
    _drop_old(_publish(staged))


_Done = list[tuple[Path, Path | None]]  # (target, moved-aside original)


def _publish(staged: Sequence[tuple[Path, Path]]) -> _Done:
    """Rename each staged directory onto its target, originals moved aside (kept).

    On failure the renames already done are rolled back before the error propagates.
    """
    done: _Done = []
    try:
        for target, d in staged:
            old = None
            if target.exists() or target.is_symlink():
                old = _mkdtemp(target, _OLD)
                os.rmdir(old)
                os.rename(target, old)
            try:
                os.rename(d, target)
            except BaseException:
                if old is not None:
                    os.rename(old, target)
                raise
            done.append((target, old))
            fsync_dir(target.parent)
    except BaseException:
        _rollback(done)
        raise
    return done


def _rollback(done: _Done) -> None:
    """Undo :func:`_publish`: new adapters removed, moved-aside originals put back."""
    for target, old in reversed(done):
        _rmtree(target)
        if old is not None:
            os.rename(old, target)


def _drop_old(done: _Done) -> None:
    for _, old in done:
        _rmtree(old)


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
) -> list[AdapterReport]:
    """patch as one rank of several (docs/scale-out.md).

    Every rank reads every adapter's header and applies the output rules (cheap, identical on
    all); the adapters are split by :func:`_adapter_cost`; each rank scores its own, reading
    only the projectors they need; :meth:`Dist.agree` makes a failure anywhere fail every rank
    before anything is written. Then :func:`_write_distributed`. Reports are gathered in
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
            _check_flags(
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
            loaded = _load_all(adapters)
            others = _other_inputs(projections, base, aligned, save_projections)
            plan = plan_outputs(loaded, output, force=force, others=others)
            mine = balance([_adapter_cost(ad) for ad in loaded], dist.world_size)[dist.rank]
            if mine:
                subset = [loaded[i] for i in mine]
                with _projector_source(
                    subset,
                    adapters,
                    projections=projections,
                    base=base,
                    aligned=aligned,
                    device=rank_device(device, dist),
                    revision_base=revision_base,
                    revision_aligned=revision_aligned,
                    save_projections=None,
                ) as (source, weight_for, sources):
                    scored = score_adapters(
                        subset,
                        source,
                        selection,
                        weight_for=weight_for,
                        progress=progress if dist.is_main else None,
                    )
                for sa, i in zip(scored, mine, strict=True):
                    sa.report.output = str(plan.targets[i])
                    sa.report.sources = sources
                    sa.report.dry_run = dry_run
        except Exception as e:
            err = e
        dist.agree(err)
        assert plan is not None
        if not dry_run:
            _write_distributed(scored, mine, plan, dist)
        parts = dist.all_gather([(i, sa.report) for i, sa in zip(mine, scored, strict=True)])
        reports: list[Any] = [None] * len(loaded)
        for part in parts:
            for i, report in part:
                reports[i] = report
        return reports
    finally:
        for ad in loaded:
            ad.close()


def _write_distributed(
    scored: Sequence[ScoredAdapter], mine: Sequence[int], plan: OutputPlan, dist: Dist
) -> None:
    """Each rank writes its adapters; all-or-nothing across ranks as far as renames allow.

    1. Rank 0 creates the output's missing parents and, for a batch into a new ``output``, one
       staging tree that every rank writes into.
    2. Every rank stages its adapters (in that tree, or beside each target). Any failure: every
       staged directory is removed, nothing was published.
    3. A new batch ``output``: rank 0 renames the tree into place (one rename: all or nothing).
       Otherwise (``--force`` into an existing ``output``, or one adapter) every rank renames its
       targets, originals moved aside; any failure rolls back every rank's renames; success
       drops the originals. A rank *killed* between its renames and the others' leaves some
       adapters new and some old (each one whole), with the originals of the replaced ones in
       hidden ``.<name>.safelora-old-*`` directories beside them.
    """
    created: list[Path] = []
    tree: Path | None = None
    staged: list[tuple[Path, Path]] = []
    done: _Done = []
    err: Exception | None = None

    def undo() -> None:
        _rollback(done)
        for _, d in staged:
            _rmtree(d)
        if dist.is_main:
            _rmtree(tree)
            for p in reversed(created):
                with contextlib.suppress(OSError):
                    p.rmdir()

    if dist.is_main:
        try:
            for p in reversed(plan.root.parents):
                if not p.exists():
                    p.mkdir()
                    created.append(p)
            if plan.batch and not plan.root.exists():
                tree = _mkdtemp(plan.root, _TMP)
        except Exception as e:
            err = e
    try:
        dist.agree(err)
        tree = dist.broadcast(tree)
        try:
            for sa, i in zip(scored, mine, strict=True):
                target = plan.targets[i]
                if tree is not None:
                    d = tree / target.name
                    d.mkdir()
                else:
                    d = _mkdtemp(target, _TMP)
                staged.append((target, d))
                write_adapter_dir(sa, d)
            if tree is not None and staged:
                fsync_dir(tree)
        except Exception as e:
            err = e
        dist.agree(err)
        try:
            if tree is not None:
                if dist.is_main:
                    done = _publish([(plan.root, tree)])
            else:
                done = _publish(staged)
        except Exception as e:
            err = e
        dist.agree(err)
    except BaseException:
        undo()
        raise
    _drop_old(done)
