"""Where an adapter run's projectors come from, checked before any compute.

Exactly one source per run: a projection cache (``-p``; only the entries the adapters need are
read, and a missing one is a CacheError naming the ``compute-projections`` command that adds it)
or ``--base`` + ``--aligned`` checkpoints (only the needed weights are read, streaming, nothing
cached unless ``save_projections`` is given). Modules map to checkpoint weights exactly as
``compute-projections`` maps them (``targets.weight_for_module``). ``patch`` and ``inspect``
both go through :func:`check_flags` and :func:`open_projector_source`, so inspect sees the
weights patch would use. Both return :class:`AdapterReports`: the reports and what the run
fetched from the Hub by byte ranges (:func:`source_transfer`), for the CLI's summary line.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safelora_cli.errors import SafeLoraError, UsageError

if TYPE_CHECKING:
    from safelora_cli.adapter import Adapter, LoraModule


def check_flags(
    adapters: Sequence[str],
    projections: Path | None,
    base: str | None,
    aligned: str | None,
    revision_base: str | None,
    revision_aligned: str | None,
    save_projections: Path | None,
    dry_run: bool = False,
) -> None:
    """UsageError unless the flags name exactly one projector source, consistently."""
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


class AdapterReports(list[Any]):
    """One AdapterReport per adapter, in argument order (a plain list otherwise), and what the
    run fetched from the Hub by byte ranges: ``fetched`` bytes of ``shards_bytes`` (the total
    size of the shards read by ranges). Both are 0 when nothing was read by ranges (a cache,
    local or already downloaded models)."""

    def __init__(self, reports: Iterable[Any] = (), transfer: tuple[int, int] = (0, 0)) -> None:
        super().__init__(reports)
        self.fetched, self.shards_bytes = transfer


def source_transfer(source: Any) -> tuple[int, int]:
    """(bytes fetched by ranged reads, the shards' total) of a projector source; (0, 0) for a
    cache. Still valid once the source's context has closed its readers."""
    transfer = getattr(source, "transfer", None)
    return transfer() if callable(transfer) else (0, 0)


def provenance(spec: Any) -> dict[str, Any]:
    """The part of a SourceSpec (object or its JSON) a reader of the output needs."""
    d = spec.to_json() if hasattr(spec, "to_json") else dict(spec or {})
    return {k: d.get(k) for k in ("arg", "kind", "path", "repo_id", "revision", "commit")}


def weight_mapper(names: Sequence[str], label: str, *, strict: bool) -> Callable[[LoraModule], str]:
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


def source_representation(representation: str, projections: Path | None) -> str:
    """``representation`` checked (``auto|gram|factor``, UsageError otherwise); anything but
    ``auto`` is a UsageError with ``projections`` (a cache keeps the form of each entry)."""
    from safelora_cli.projector import AUTO, check_representation

    representation = check_representation(representation)
    if projections is not None and representation != AUTO:
        raise UsageError(
            f"--representation {representation} applies to --base/--aligned, not to -p.",
            hint="A cache keeps the form each entry was computed in; rebuild it with "
            "compute-projections --representation to change it.",
        )
    return representation


@contextlib.contextmanager
def open_projector_source(
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
    representation: str = "auto",
    download: str = "ranged",
    progress: object | None = None,
) -> Iterator[tuple[Any, Callable[[LoraModule], str], dict[str, Any]]]:
    """``(ProjectorSource, weight_for, provenance)``; everything checked before yielding.

    ``representation`` (``auto|gram|factor``) is how projectors built from ``base``/``aligned``
    are stored (and saved); with ``projections`` the cache decides, so anything but ``auto``
    is a UsageError. ``progress``: told the bytes fetched from the Hub as projectors are
    built from models read by byte ranges (:func:`source_transfer` gives the totals).
    """
    from safelora_cli.adapter import orient_for_base

    representation = source_representation(representation, projections)

    if projections is not None:
        from safelora_cli.cache import ProjectionCache

        cache = ProjectionCache.open(projections, device=_torch_device(device), adapters=list(args))
        try:
            base_config = (cache.sources.get("base") or {}).get("config") or {}
            orient_for_base(loaded, base_config.get("model_type"))
            modules = [m for ad in loaded for m in ad.modules]
            weight_for = weight_mapper(cache.weights(), "projection cache", strict=False)
            requests = sorted({(weight_for(m), bool(m.fan_in_fan_out)) for m in modules})
            cache.require(requests, adapters=list(args))
            recorded = cache.sources
            sources = {
                "cache": str(Path(projections).resolve()),
                **{k: provenance(recorded[k]) for k in ("base", "aligned") if k in recorded},
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
            wf = weight_mapper(names, label, strict=True)
            return sorted({wf(m) for ad in loaded for m in ad.modules})

        return pick

    base_reader, base_spec = open_model(
        base,
        revision=revision_base,
        label="base model",
        want=want("base model"),
        download=download,
    )
    try:
        aligned_reader, aligned_spec = open_model(
            aligned,
            revision=revision_aligned,
            label="aligned model",
            want=want("aligned model"),
            download=download,
        )
    except BaseException:
        base_reader.close()
        raise
    try:
        orient_for_base(loaded, (base_spec.config or {}).get("model_type"))
        modules = [m for ad in loaded for m in ad.modules]
        weight_for = weight_mapper(base_reader.names(), "base model", strict=True)
        requests = sorted({(weight_for(m), bool(m.fan_in_fan_out)) for m in modules})
        source: Any = StreamingProjectorSource(
            base_reader,
            aligned_reader,
            device=_torch_device(device),
            representation=representation,
            progress=progress,
        )
        source.require(requests)  # headers only: shapes, dtypes, presence, before any compute
        sources = {"base": provenance(base_spec), "aligned": provenance(aligned_spec)}
        if save_projections is not None:
            source = SavingSource(
                source,
                save_projections,
                base_spec,
                aligned_spec,
                readers=(base_reader, aligned_reader),
            )
        try:
            yield source, weight_for, sources
        except BaseException:
            if isinstance(source, SavingSource):
                source.abort()
            raise
        else:
            if isinstance(source, SavingSource):
                source.finish()
        finally:
            if isinstance(source, SavingSource):
                source.close()
    finally:
        base_reader.close()
        aligned_reader.close()


class SavingSource:
    """A ProjectorSource wrapper that also writes every projector into a projection cache."""

    def __init__(
        self,
        inner: Any,
        path: Path,
        base_spec: Any,
        aligned_spec: Any,
        *,
        readers: tuple[Any, Any] | None = None,
    ) -> None:
        from safelora_cli.cache import ProjectionCache

        self.inner = inner
        # (base, aligned) CheckpointReaders: each entry records its source tensors' digests, and
        # an existing cache built from a copy of the models is checked against them.
        self.readers = readers
        self.cache = ProjectionCache.create_or_resume(
            Path(path), base_spec, aligned_spec, readers=readers
        )

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
            sha = None
            if self.readers is not None:
                from safelora_cli.sources import tensor_sha256

                b, a = (tensor_sha256(r, p.weight) for r in self.readers)
                sha = (b, a)
            self.cache.put(p, source_sha256=sha)

    def transfer(self) -> tuple[int, int]:
        """The wrapped source's :func:`source_transfer`."""
        return source_transfer(self.inner)

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


def _torch_device(device: str) -> Any:
    """``auto|cpu|cuda|cuda:N`` -> torch.device (UsageError when malformed or unavailable)."""
    from safelora_cli.compute import parse_device

    return parse_device(device)
