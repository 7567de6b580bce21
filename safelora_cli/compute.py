"""compute-projections: stream two checkpoints one weight pair at a time into a projection cache.

Contract:

- :func:`compute_projections` ``(base, aligned, cache_dir, *, adapters=(), targets=None,
  device="auto", revision_base=None, revision_aligned=None, progress=None, dtype=None,
  representation="auto") -> ComputeSummary``. ``representation`` (``auto|gram|factor``,
  UsageError otherwise) is resolved per weight by
  :func:`~safelora_cli.projector.representation_for` on the computing device's type; entries
  already cached are kept in whatever form they were stored. Targets come from
  :func:`safelora_cli.targets.resolve_targets` (the weights behind the adapters' LoRA
  modules, mapped as patch maps them, and/or ``--targets``).
  Hub models are opened with ``want=`` so only the shards holding target weights are fetched.
  Everything that can be checked from headers is checked before the cache is touched: each
  target present on both sides, same shape, 2-D, floating point (CheckpointError naming the
  weight and the files). Weights already in the cache are skipped and not read.
- :class:`ComputeSummary`: ``computed`` (weights computed now), ``skipped`` (already
  cached, not read), ``weights`` (their sum), ``bytes_read`` (tensor bytes read from both
  checkpoints), ``seconds``, ``cache_bytes`` (cache size on disk), ``device``, ``degenerate``
  (weights with ``V == 0``), ``created``; ``line()`` is the CLI's summary line.
- Streaming: each needed tensor is read once from each checkpoint. A background thread reads
  the *next* pair while the current one is computed, so at most two pairs are resident (the
  current one and the prefetched one). On CPU that thread also forms the float32 delta
  (single-threaded, bit-identical to :func:`~safelora_cli.projector.alignment_delta`) so the
  pair's memory goes before it is handed over. On CUDA it reads into pinned host memory; the
  host-to-device copies are ``non_blocking``, so disk reads overlap GPU work; results come
  back to the CPU for writing. Each entry is handed to a writer thread
  (:meth:`ProjectionCache.put`) as soon as it is computed (at most one write pending).
  ``gram`` and ``factor`` weights are computed alternately (:func:`schedule`); the cache does
  not depend on the order.
- Failure: a killed run leaves the cache marked in progress with only complete entries; the
  same command resumes it. A run that fails with an input error (e.g. NaN in a delta) removes
  a cache directory it created itself, and leaves an existing cache with the entries it had
  plus any completed in this run (all valid), marked complete. A Hub transfer that fails after
  its retries (:class:`~safelora_cli.errors.FetchError`) keeps the entries of a cache this run
  created too: the same command resumes, fetching only what is missing.
- Hub models (``download="ranged"``, the default): each reader is told the weights about to
  be read (:meth:`CheckpointReader.plan`), so adjacent ones come with one range; the summary's
  ``fetched`` / ``shards_bytes`` say what came over the network of the shards' total, and the
  progress object's optional ``fetched(nbytes, total)`` gets the running count.
- Several processes (``dist=``, under ``accelerate launch`` / ``torchrun``; docs/scale-out.md):
  rank 0 creates or resumes the cache and splits the missing weights by :func:`target_cost`
  (:func:`split_targets`); each rank streams its share and writes its own entry files (other
  ranks through :meth:`ProjectionCache.worker`); rank 0 then adopts the verified entries into
  the one manifest. The cache is byte-identical to a single-process run. A failure on any rank
  fails every rank; the cache then ends as after a failed single-process run.
- :func:`parse_device` ``(spec) -> torch.device``: ``auto|cpu|cuda|cuda:N``; UsageError for a
  malformed or unavailable device.
- :class:`StreamingProjectorSource` ``(base_reader, aligned_reader, *, device="cpu",
  representation="auto")``: a
  :class:`~safelora_cli.projector.ProjectorSource` computing only the requested projectors
  from two open readers (``patch --base/--aligned``); nothing is written. Its projectors live
  on ``device``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safelora_cli.errors import (
    CacheError,
    CheckpointError,
    FetchError,
    SafeLoraError,
    UsageError,
)
from safelora_cli.naming import natural_sorted
from safelora_cli.progress import (
    announce,
    fetched_line,
    hub_transfer,
    report_fetched,
    size_text,
)
from safelora_cli.projector import (
    GRAM,
    PATCH_RANK,
    Projector,
    alignment_delta,
    alignment_delta_serial,
    build_projector,
    check_representation,
    prefetched,
    representation_for,
)
from safelora_cli.targets import FLOAT_CODES, Target, names_for, resolve_targets

if TYPE_CHECKING:
    import torch

    from safelora_cli.buffers import BufferPool
    from safelora_cli.distributed import Dist
    from safelora_cli.progress import Progress
    from safelora_cli.reader import CheckpointReader


def limit_heap_retention() -> None:
    """Make glibc return freed weight-sized buffers to the OS (Linux; a no-op elsewhere).

    glibc raises its mmap threshold after the first large ``free`` (up to 32 MiB), after which
    freed tensors of a few MiB stay in the heap and in RSS; with weights of many sizes streaming
    through, RSS creeps up. Pinning ``M_MMAP_THRESHOLD`` to 1 MiB keeps every tensor buffer in
    its own mapping that is unmapped when freed, so peak RSS stays at the pairs in flight.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def parse_device(spec: str | None) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; UsageError otherwise."""
    import torch

    s = (spec or "auto").strip().lower()
    if s == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if s == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", s)
    if m is None:
        raise UsageError(
            f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N",
            hint="e.g. --device cuda:0",
        )
    if not torch.cuda.is_available():
        raise UsageError(
            f"--device {spec} asked for CUDA but no CUDA device is available",
            hint="use --device cpu (or auto)",
        )
    idx = int(m.group(1) or 0)
    n = torch.cuda.device_count()
    if idx >= n:
        raise UsageError(
            f"--device {spec}: there is no CUDA device {idx} ({n} visible)",
            hint=f"use cuda:0 .. cuda:{n - 1}",
        )
    return torch.device("cuda", idx)


@dataclass
class ComputeSummary:
    """What a compute-projections run did."""

    cache_dir: Path
    computed: int
    skipped: int
    bytes_read: int
    seconds: float
    cache_bytes: int
    device: str
    degenerate: list[str] = field(default_factory=list)
    created: bool = False
    # Hub models read by byte ranges: bytes received (headers and tensors), and the total size
    # of the shards they were read from (what --download full would have fetched).
    fetched: int = 0
    shards_bytes: int = 0

    @property
    def weights(self) -> int:
        """Weights the cache now holds for this request (computed + already present)."""
        return self.computed + self.skipped

    def line(self) -> str:
        """The one-line human summary (weights, bytes read, seconds, cache size)."""
        parts = [f"{self.computed} weight{'' if self.computed == 1 else 's'} computed"]
        if self.skipped:
            parts.append(f"{self.skipped} already cached")
        if self.degenerate:
            parts.append(f"{len(self.degenerate)} with no alignment signal (V = 0)")
        line = (
            f"{', '.join(parts)}; read {size_text(self.bytes_read)} in {self.seconds:.1f} s "
            f"on {self.device}; cache {self.cache_dir} is {size_text(self.cache_bytes)}"
        )
        if self.shards_bytes:
            line += f"; {fetched_line(self.fetched, self.shards_bytes)}"
        return line

    def to_json(self) -> dict[str, Any]:
        return {
            "cache": str(self.cache_dir),
            "computed": self.computed,
            "skipped": self.skipped,
            "bytes_read": self.bytes_read,
            "seconds": self.seconds,
            "cache_bytes": self.cache_bytes,
            "device": self.device,
            "degenerate": list(self.degenerate),
            "fetched": self.fetched,
            "shards_bytes": self.shards_bytes,
        }


def _where(reader: CheckpointReader) -> Path:
    if reader.index_path is not None:
        return reader.index_path
    files = reader.files
    return files[0] if len(files) == 1 else reader.root


def check_pairs(base: CheckpointReader, aligned: CheckpointReader, weights: Sequence[str]) -> None:
    """CheckpointError unless every weight is a 2-D float tensor of the same shape on both sides."""
    for w in weights:
        for r in (base, aligned):
            if w not in r:
                raise CheckpointError(
                    f"{w} is missing from the {r.label} ({_where(r)})",
                    hint="base and aligned must be the same architecture; check both paths",
                    path=_where(r),
                )
        tb, ta = base.info(w), aligned.info(w)
        if tb.shape != ta.shape:
            raise CheckpointError(
                f"{w} has shape {list(tb.shape)} in {tb.path} but {list(ta.shape)} in {ta.path}",
                hint="base and aligned must be the same architecture and size",
                path=ta.path,
            )
        if len(tb.shape) != 2:
            raise CheckpointError(
                f"{w} in {tb.path} has shape {list(tb.shape)}; only 2-D weights are projected",
                hint="choose linear-layer weights (--targets q_proj,v_proj or --adapter)",
                path=tb.path,
            )
        for ti in (tb, ta):
            if ti.dtype not in FLOAT_CODES:
                raise CheckpointError(
                    f"{w} in {ti.path} is {ti.dtype}, not a float tensor",
                    hint="quantised checkpoints are not supported; use the unquantised weights",
                    path=ti.path,
                )


# (target, float32 delta) on CPU; (target, pinned base weight, pinned aligned weight) on CUDA.
_Item = tuple[Any, ...]


class _PairStream:
    """Reads weight pairs on a background thread and turns them into projectors.

    ``load`` (prefetch thread): both tensors read once. On CPU they are read into one buffer of
    ``pool`` (two when they are wider than 16 bits) and turned into the float32 delta, in a
    second buffer, by :func:`alignment_delta_serial` (on that thread only: no second OpenMP
    team fighting the main thread's matmul); the pair's buffer goes back before the delta is
    handed over. On CUDA the pair goes into pinned host memory instead.
    ``compute`` (caller thread): on CUDA a non-blocking copy to the device and the delta there;
    then the projector. The delta's buffer goes back to the pool unless it became the
    projector (``factor``).

    ``pooled_output``: the projector tensor itself lives in a pool buffer (the gram product is
    written into one; a factor is the delta scaled in place); whoever consumes the projector
    must :meth:`BufferPool.give` its tensor back. Without it every projector owns fresh memory
    (``patch --base/--aligned``, which keeps them).
    """

    def __init__(
        self,
        base: CheckpointReader,
        aligned: CheckpointReader,
        device: torch.device,
        *,
        pool: BufferPool | None = None,
        pooled_output: bool = False,
        representation: str = "auto",
        digests: dict[str, tuple[Any, Any]] | None = None,
        full_update: bool = False,
    ):
        from safelora_cli.buffers import BufferPool

        self.base = base
        self.aligned = aligned
        self.device = device
        self.pool = pool if pool is not None else BufferPool()
        self.pooled_output = pooled_output
        self.representation = representation
        # patch-model applies each projector to a whole dW (d_in columns), not to a LoRA B:
        # that decides which form costs less (projector.representation_cost).
        self.full_update = full_update
        # When given: weight -> SHA-256 of the (base, aligned) bytes read, for the cache entry
        # (:meth:`take_digests`). On the CPU they are hashed on the prefetch thread while the
        # previous projector is computed; for a GPU, whose compute is quick, on two threads of
        # their own, so hashing (~1.4 GB/s per thread) does not slow the reads down.
        self.digests = digests
        self._hasher: ThreadPoolExecutor | None = None

    def kind(self, t: Target) -> str:
        """The stored form of ``t``'s projector on this stream's device."""
        cols = t.d_in if self.full_update else PATCH_RANK
        return representation_for(
            t.d_out, t.d_in, self.representation, self.device.type, columns=cols
        )

    def load(self, t: Target) -> _Item:
        if self.device.type == "cpu":
            import torch

            nb, na = self.base.info(t.weight).nbytes, self.aligned.info(t.weight).nbytes
            pool = self.pool
            shape = (t.d_out, t.d_in)
            if nb + na <= max(pool.slot_bytes, 4 * t.d_out * t.d_in):
                raw = pool.take(nb + na)
                parts, bufs = [raw[:nb], raw[nb:]], [raw]
            else:
                parts = bufs = [pool.take(nb), pool.take(na)]
            v = pool.tensor(shape, torch.float32)
            try:
                wb = self.base.load_into(t.weight, parts[0])
                wa = self.aligned.load_into(t.weight, parts[1])
                if self.digests is not None:
                    self.digests[t.weight] = (_sha256(parts[0]), _sha256(parts[1]))
                alignment_delta_serial(wb, wa, fan_in_fan_out=t.fan_in_fan_out, out=v)
            except BaseException:
                pool.give(v)
                raise
            finally:
                for b in bufs:
                    pool.give(b)
            return (t, v)
        wb = self.base.load(t.weight)
        wa = self.aligned.load(t.weight)
        if self.device.type == "cuda":
            wb, wa = wb.pin_memory(), wa.pin_memory()
        if self.digests is not None:
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(2, thread_name_prefix="safelora-hash")
            hb, ha = self._hasher.submit(_sha256, wb), self._hasher.submit(_sha256, wa)
            self.digests[t.weight] = (hb, ha)
        return (t, wb, wa)

    def take_digests(self, weight: str) -> tuple[str, str] | None:
        """SHA-256 of ``weight``'s (base, aligned) bytes as read; None when not recorded."""
        d = self.digests.pop(weight, None) if self.digests is not None else None
        if d is None:
            return None
        b, a = (x.result() if isinstance(x, Future) else x for x in d)
        return (b, a)

    def close(self) -> None:
        """Stop the hashing threads (if any were started)."""
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None

    def compute(self, box: list[_Item], *, dtype: Any = None) -> Projector:
        """The projector of the item in ``box`` (emptied, so its memory goes early)."""
        import torch

        t, *tensors = box.pop()
        if len(tensors) == 1:
            (v,) = tensors
        else:
            wb, wa = (x.to(self.device, non_blocking=True) for x in tensors)
            del tensors
            v = alignment_delta(wb, wa, fan_in_fan_out=t.fan_in_fan_out)
            del wb, wa
        files = (self.base.info(t.weight).path, self.aligned.info(t.weight).path)
        out = None
        f32 = dtype is None or dtype == torch.float32
        kind = self.kind(t)
        if self.pooled_output and v.device.type == "cpu" and kind == GRAM and f32:
            out = self.pool.tensor((t.d_out, t.d_out), torch.float32)
        try:
            pr = build_projector(
                t.weight,
                v,
                fan_in_fan_out=t.fan_in_fan_out,
                dtype=dtype,
                sources=files,
                consume=self.pooled_output or v.device.type != "cpu",
                out=out,
                representation=kind,
            )
        except BaseException:
            self.pool.give(out)
            self.pool.give(v)
            raise
        for buf in (v, out):
            if buf is not None and buf.data_ptr() != pr.tensor.data_ptr():
                self.pool.give(buf)
        return pr

    def stream(self, targets: Sequence[Target], *, dtype: Any = None) -> Iterator[Projector]:
        """Projectors of ``targets`` in order; the next pair is read while one is computed."""
        pairs = prefetched(self.load, targets)
        try:
            for _ in range(len(targets)):
                yield self.compute([next(pairs)], dtype=dtype)
        finally:
            pairs.close()


class StreamingProjectorSource:
    """A ProjectorSource that computes projectors on the fly from two open readers.

    Nothing is cached or written; each ``get`` reads both tensors of that weight once.
    ``projectors`` prefetches the next pair on a background thread. Projectors are on ``device``.
    ``full_update``: the projectors will be applied to whole updates ``dW`` (patch-model), not
    to LoRA ``B``; under ``representation="auto"`` each form is chosen for that use.
    When either reader reads a Hub model by byte ranges, ``progress`` (optional) is told the
    bytes fetched so far after each projector (:func:`report_fetched`); :meth:`transfer` gives
    the figures for a summary.
    """

    def __init__(
        self,
        base_reader: CheckpointReader,
        aligned_reader: CheckpointReader,
        *,
        device: str | torch.device = "cpu",
        representation: str = "auto",
        progress: object | None = None,
        full_update: bool = False,
    ):
        import torch

        representation = check_representation(representation)
        dev = device if isinstance(device, torch.device) else parse_device(str(device))
        from safelora_cli.buffers import BufferPool

        limit_heap_retention()
        # Two free buffers: the pair and the delta of one weight (projectors are fresh memory).
        pool = BufferPool(max_free=2)
        self._stream = _PairStream(
            base_reader,
            aligned_reader,
            dev,
            pool=pool,
            representation=representation,
            full_update=full_update,
        )
        self.device = dev
        # Only a ranged Hub read has anything to report; local runs never call the progress.
        remote = bool(base_reader.remote_files or aligned_reader.remote_files)
        self._progress = progress if remote else None

    @property
    def bytes_read(self) -> int:
        return self._stream.base.bytes_read + self._stream.aligned.bytes_read

    @property
    def readers(self) -> tuple[CheckpointReader, CheckpointReader]:
        """The (base, aligned) readers the projectors are computed from."""
        return (self._stream.base, self._stream.aligned)

    def transfer(self) -> tuple[int, int]:
        """(bytes fetched from the Hub by ranged reads, the shards' total) so far; (0, 0) when
        both models are local or already downloaded."""
        return hub_transfer(*self.readers)

    def _report(self) -> None:
        if self._progress is not None:
            report_fetched(self._progress, *self.transfer())

    def _target(self, weight: str, fan_in_fan_out: bool) -> Target:
        check_pairs(self._stream.base, self._stream.aligned, [weight])
        shape = self._stream.base.info(weight).shape
        d_out, d_in = (shape[1], shape[0]) if fan_in_fan_out else (shape[0], shape[1])
        return Target(weight, fan_in_fan_out, d_out, d_in)

    def require(self, requests: Sequence[tuple[str, bool]], **_: Any) -> None:
        """CheckpointError unless every requested weight can be computed (headers only)."""
        check_pairs(self._stream.base, self._stream.aligned, [w for w, _ in requests])

    def get(self, weight: str, *, fan_in_fan_out: bool = False) -> Projector:
        t = self._target(weight, fan_in_fan_out)
        pr = self._stream.compute([self._stream.load(t)])
        self._report()
        return pr

    def projectors(self, requests: Sequence[tuple[str, bool]]) -> Iterator[Projector]:
        targets = [self._target(w, f) for w, f in requests]
        if self._progress is None:
            return self._stream.stream(targets)
        return self._reporting(self._stream.stream(targets))

    def _reporting(self, it: Iterator[Projector]) -> Iterator[Projector]:
        try:
            for pr in it:
                self._report()
                yield pr
        finally:
            # Closed with this one, so the prefetch thread stops when the caller stops.
            close = getattr(it, "close", None)
            if close is not None:
                close()


def schedule(
    targets: Sequence[Target], kind_of: Callable[[Target], str] | None = None
) -> list[Target]:
    """The order to compute in: ``gram`` and ``factor`` weights alternating, each in given order.

    ``kind_of(target)``: its stored form (default: the ``auto`` rule on CPU).

    A ``factor`` entry costs the main thread almost nothing (a scaling) while its pair still
    has to be read and subtracted on the prefetch thread; two in a row leave the main thread
    waiting. Putting a ``gram`` matmul between them hides that work. The cache does not depend
    on the order (entries are independent files; the manifest is sorted).
    """
    kind_of = kind_of or (lambda t: representation_for(t.d_out, t.d_in))
    kinds = [kind_of(t) for t in targets]
    grams = [t for t, k in zip(targets, kinds, strict=True) if k == GRAM]
    factors = [t for t, k in zip(targets, kinds, strict=True) if k != GRAM]
    out: list[Target] = []
    for i in range(max(len(grams), len(factors))):
        out += [x[i] for x in (grams, factors) if i < len(x)]
    return out


def _sha256(t: torch.Tensor) -> str:
    """SHA-256 of a contiguous CPU tensor's bytes (as stored in the checkpoint file)."""
    import torch

    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _peek_present(cache_dir: Path) -> set[str]:
    """Weights an existing cache already holds (empty when there is none or it is unreadable)."""
    from safelora_cli.cache import ProjectionCache

    try:
        return set(ProjectionCache.open(cache_dir, allow_incomplete=True).weights())
    except SafeLoraError:
        return set()


def compute_projections(
    base: str,
    aligned: str,
    cache_dir: str | Path,
    *,
    adapters: Sequence[str | Path] = (),
    targets: str | None = None,
    device: str = "auto",
    revision_base: str | None = None,
    revision_aligned: str | None = None,
    progress: Progress | None = None,
    dtype: Any = None,
    dist: Dist | None = None,
    representation: str = "auto",
    download: str = "ranged",
) -> ComputeSummary:
    """Compute and cache one projector per target weight (see the module docstring).

    ``download`` (Hub models; :func:`safelora_cli.sources.open_model`): ``ranged`` fetches only
    the target tensors' bytes, ``full`` whole shards into the Hugging Face cache.

    ``dist`` (:func:`safelora_cli.distributed.current`): split the work across the ranks of a
    multi-process launch (:func:`_run_distributed`); None (the default) is a single process.
    """
    from safelora_cli.progress import NullProgress

    t0 = time.perf_counter()
    progress = progress or NullProgress()
    representation = check_representation(representation)
    if dist is not None and dist.world_size > 1:
        return _compute_distributed(
            base,
            aligned,
            Path(cache_dir),
            adapters=adapters,
            targets=targets,
            device=device,
            revision_base=revision_base,
            revision_aligned=revision_aligned,
            progress=progress,
            dtype=dtype,
            dist=dist,
            t0=t0,
            representation=representation,
            download=download,
        )
    dev = _checked_request(adapters, targets, device)
    cache_dir = Path(cache_dir)
    with _inputs(
        base, aligned, cache_dir, adapters, targets, revision_base, revision_aligned, download
    ) as (
        rb,
        ra,
        sb,
        sa,
        tlist,
    ):
        return _run(rb, ra, sb, sa, cache_dir, tlist, dev, progress, dtype, t0, representation)


def _checked_request(
    adapters: Sequence[str | Path], targets: str | None, device: str
) -> torch.device:
    if not adapters and targets is None:
        raise UsageError(
            "nothing to compute: give --adapter (one or more) or --targets",
            hint="e.g. --adapter ./my-lora, or --targets q_proj,v_proj",
        )
    dev = parse_device(device)
    limit_heap_retention()
    return dev


@contextlib.contextmanager
def _inputs(
    base: str,
    aligned: str,
    cache_dir: Path,
    adapters: Sequence[str | Path],
    targets: str | None,
    revision_base: str | None,
    revision_aligned: str | None,
    download: str = "ranged",
) -> Iterator[tuple[CheckpointReader, CheckpointReader, Any, Any, list[Target]]]:
    """Open both models, resolve the targets and check (headers only) those not yet cached."""
    from safelora_cli.adapter import load_adapter, orient_for_base
    from safelora_cli.sources import open_model

    loaded = []
    try:
        for a in adapters:
            loaded.append(load_adapter(a))
        # Every tensor name of the base checkpoint, as the Hub index lists them (a Hub reader
        # only lists the shards that were fetched); stays empty for local checkpoints.
        base_names: list[str] = []

        def want_base(names: list[str]) -> list[str]:
            base_names[:] = names
            return names_for(names, adapters=loaded, targets=targets)

        def want_aligned(names: list[str]) -> list[str]:
            # The base decides the weight names; the aligned side fetches the same ones (a
            # name it lacks is reported by check_pairs, naming the file).
            wanted = names_for(base_names or rb.names(), adapters=loaded, targets=targets)
            have = set(names)
            return [n for n in wanted if n in have]

        rb, sb = open_model(
            base, revision=revision_base, label="base model", want=want_base, download=download
        )
        # Orientation as PEFT decides it, from the base's layer classes (as patch does): a
        # Conv1D adapter that mis-declares fan_in_fan_out must be cached the way patch asks.
        orient_for_base(loaded, (sb.config or {}).get("model_type"))
        with contextlib.ExitStack() as stack:
            stack.callback(rb.close)
            ra, sa = open_model(
                aligned,
                revision=revision_aligned,
                label="aligned model",
                want=want_aligned,
                download=download,
            )
            stack.callback(ra.close)
            tlist = resolve_targets(
                rb,
                adapters=loaded,
                targets=targets,
                names=base_names or None,
                config=sb.config,
            )
            present = _peek_present(cache_dir)
            todo = [t for t in tlist if t.weight not in present]
            check_pairs(rb, ra, [t.weight for t in todo])
            yield rb, ra, sb, sa, tlist
    finally:
        for ad in loaded:
            ad.close()


def _stream_into(
    cache: Any,
    rb: CheckpointReader,
    ra: CheckpointReader,
    todo: Sequence[Target],
    dev: torch.device,
    dtype: Any,
    progress: Progress,
    degenerate: list[str],
    representation: str = "auto",
) -> int:
    """Compute ``todo`` in order and ``cache.put`` each entry; returns how many were written.

    Weights with ``V == 0`` are appended to ``degenerate`` as their entries are written.
    """
    from safelora_cli.buffers import BufferPool

    # Every buffer has the size of the largest float32 delta, so any free one serves any
    # weight (a projector is never larger than its delta).
    pool = BufferPool(max((4 * t.d_out * t.d_in for t in todo), default=0))
    stream = _PairStream(
        rb, ra, dev, pool=pool, pooled_output=True, representation=representation, digests={}
    )
    done = 0
    # A Hub model read by byte ranges fetches runs of adjacent planned tensors at once.
    for r in (rb, ra):
        r.plan(t.weight for t in todo)
    remote = bool(rb.remote_files or ra.remote_files)
    progress.start(len(todo), "computing projections")
    if remote:
        report_fetched(progress, *hub_transfer(rb, ra))

    def written(fut: Future[Any], t: Target) -> None:
        nonlocal done
        entry = fut.result()
        if entry.degenerate:
            degenerate.append(entry.weight)
        done += 1
        if remote:
            report_fetched(progress, *hub_transfer(rb, ra))
        progress.advance(1, rb.info(t.weight).nbytes + ra.info(t.weight).nbytes)

    try:
        # Entries are written on their own thread (file, fsync, rename, manifest) while the
        # next projector is computed; at most one write is pending. The projector's buffer
        # goes back to the pool as soon as its bytes are written, before the fsyncs.
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="safelora-writer") as wx,
            contextlib.closing(stream.stream(todo, dtype=dtype)) as it,
        ):
            pending: tuple[Future[Any], Target] | None = None
            for t, pr in zip(todo, it, strict=True):
                announce(progress, t.weight)
                if pending is not None:
                    written(*pending)
                release = functools.partial(pool.give, pr.tensor)
                sha = stream.take_digests(t.weight)
                pending = (wx.submit(cache.put, pr, written=release, source_sha256=sha), t)
                del pr, release
            if pending is not None:
                written(*pending)
    finally:
        progress.finish()
        stream.close()
        pool.clear()
    return done


def _run(
    rb: CheckpointReader,
    ra: CheckpointReader,
    sb: Any,
    sa: Any,
    cache_dir: Path,
    tlist: list[Target],
    dev: torch.device,
    progress: Progress,
    dtype: Any,
    t0: float,
    representation: str = "auto",
) -> ComputeSummary:
    from safelora_cli.cache import ProjectionCache

    read0 = rb.bytes_read + ra.bytes_read  # checking a copy's tensors counts as read
    cache = ProjectionCache.create_or_resume(cache_dir, sb, sa, dtype=dtype, readers=(rb, ra))
    shards_bytes = hub_transfer(rb, ra)[1]
    created = cache.created
    degenerate: list[str] = []
    todo: list[Target] = []
    done = 0
    try:
        cache.require([(t.weight, t.fan_in_fan_out) for t in tlist if cache.has(t.weight)])
        todo = schedule(
            [t for t in tlist if not cache.has(t.weight)],
            lambda t: representation_for(t.d_out, t.d_in, representation, dev.type),
        )
        done = _stream_into(cache, rb, ra, todo, dev, dtype, progress, degenerate, representation)
        cache.finish()
    except (SafeLoraError, OSError) as e:
        if created and not isinstance(e, FetchError):
            # A cache this run created and could not finish: remove it (nothing left behind).
            # A Hub transfer that failed after its retries is not the inputs' fault: the
            # entries computed so far stay, as after any other run, and a rerun resumes.
            cache.close()
            shutil.rmtree(cache_dir, ignore_errors=True)
        else:
            # Every entry the manifest names is complete; the run is over, so say so.
            with contextlib.suppress(SafeLoraError, OSError):
                cache.finish()
        if isinstance(e, OSError) and e.filename is None:
            # A full disk (write/fsync) names no file: say which cache failed.
            raise OSError(e.errno, e.strerror or str(e), str(cache_dir)) from e
        raise
    finally:
        cache.close()
    return ComputeSummary(
        cache_dir=cache_dir,
        computed=done,
        skipped=len(tlist) - len(todo),
        bytes_read=rb.bytes_read + ra.bytes_read - read0,
        seconds=time.perf_counter() - t0,
        cache_bytes=cache.size_bytes(),
        device=str(dev),
        degenerate=degenerate,
        created=created,
        fetched=hub_transfer(rb, ra)[0],
        shards_bytes=shards_bytes,
    )


# ----------------------------------------------------------------------------- multi-process

# Rough rates for balancing ranks (only ratios matter): bytes read from disk per second, and
# float32 matmul FLOP/s of one process on each device type.
READ_BYTES_PER_S = 2e9
FLOPS_PER_S = {"cpu": 5e10, "cuda": 2e13}


def target_cost(
    t: Target,
    rb: CheckpointReader,
    ra: CheckpointReader,
    device: str,
    representation: str = "auto",
) -> float:
    """Estimated seconds to compute ``t``: both tensors read, plus the projector's FLOPs.

    ``gram`` forms ``V V^T`` (``2 d_out^2 d_in`` FLOPs); ``factor`` only subtracts and scales.
    The form is :func:`~safelora_cli.projector.representation_for` on ``device`` (a type).
    """
    nbytes = rb.info(t.weight).nbytes + ra.info(t.weight).nbytes
    if representation_for(t.d_out, t.d_in, representation, device) == GRAM:
        flops = 2.0 * t.d_out * t.d_out * t.d_in
    else:
        flops = 3.0 * t.d_out * t.d_in
    return nbytes / READ_BYTES_PER_S + flops / FLOPS_PER_S.get(device, FLOPS_PER_S["cpu"])


def split_targets(
    todo: Sequence[Target],
    rb: CheckpointReader,
    ra: CheckpointReader,
    parts: int,
    device: str = "cpu",
    representation: str = "auto",
) -> list[list[Target]]:
    """``todo`` split into ``parts`` shares balanced by :func:`target_cost` (deterministic).

    Each share keeps ``todo``'s order.
    """
    from safelora_cli.distributed import balance

    costs = [target_cost(t, rb, ra, device, representation) for t in todo]
    return [[todo[i] for i in share] for share in balance(costs, parts)]


@dataclass
class _Share:
    """What one rank did, sent to rank 0 (picklable)."""

    rank: int
    entries: list[dict[str, Any]]
    degenerate: list[str]
    bytes_read: int
    device: str
    failed: bool
    fetched: int = 0  # bytes this rank received from the Hub (ranged reads, headers included)
    shards_bytes: int = 0


def _compute_distributed(
    base: str,
    aligned: str,
    cache_dir: Path,
    *,
    adapters: Sequence[str | Path],
    targets: str | None,
    device: str,
    revision_base: str | None,
    revision_aligned: str | None,
    progress: Progress,
    dtype: Any,
    dist: Dist,
    t0: float,
    representation: str = "auto",
    download: str = "ranged",
) -> ComputeSummary:
    """compute-projections as one rank of several (docs/scale-out.md).

    Every rank opens the inputs and checks them (headers only); rank 0 creates or resumes the
    cache and splits what is missing; each rank streams only its share and writes its own
    entry files; rank 0 then names them in the manifest. Each phase ends with
    :meth:`Dist.agree`, so a failure on any rank fails every rank at the same point.
    """
    from safelora_cli.distributed import rank_device

    with contextlib.ExitStack() as stack:
        err: Exception | None = None
        try:
            dev = _checked_request(adapters, targets, rank_device(device, dist))
            rb, ra, sb, sa, tlist = stack.enter_context(
                _inputs(
                    base,
                    aligned,
                    cache_dir,
                    adapters,
                    targets,
                    revision_base,
                    revision_aligned,
                    download,
                )
            )
        except Exception as e:
            err = e
        dist.agree(err)
        return _run_distributed(
            rb, ra, sb, sa, cache_dir, tlist, dev, progress, dtype, t0, dist, representation
        )


def _run_distributed(
    rb: CheckpointReader,
    ra: CheckpointReader,
    sb: Any,
    sa: Any,
    cache_dir: Path,
    tlist: list[Target],
    dev: torch.device,
    progress: Progress,
    dtype: Any,
    t0: float,
    dist: Dist,
    representation: str = "auto",
) -> ComputeSummary:
    from safelora_cli.cache import ProjectionCache, _entry_from_json
    from safelora_cli.progress import NullProgress

    by_name = {t.weight: t for t in tlist}
    cache: ProjectionCache | None = None
    plan: tuple[dict[str, Any], list[list[str]], bool] | None = None
    err: Exception | None = None

    def drop_created() -> None:
        assert cache is not None
        cache.close()
        shutil.rmtree(cache_dir, ignore_errors=True)

    # 1. Rank 0 owns the cache (lock, manifest) and splits the missing weights.
    if dist.is_main:
        try:
            cache = ProjectionCache.create_or_resume(
                cache_dir, sb, sa, dtype=dtype, readers=(rb, ra)
            )
            cache.require([(t.weight, t.fan_in_fan_out) for t in tlist if cache.has(t.weight)])
            todo = [t for t in tlist if not cache.has(t.weight)]
            shares = split_targets(todo, rb, ra, dist.world_size, dev.type, representation)
            plan = (cache.manifest, [[t.weight for t in s] for s in shares], cache.created)
        except Exception as e:
            err = e
            if cache is not None:
                if cache.created:
                    drop_created()
                cache.close()
    dist.agree(err)
    manifest, shares, created = dist.broadcast(plan)
    skipped = len(tlist) - sum(len(s) for s in shares)

    # 2. Every rank streams its share into its own entry files.
    mine = schedule(
        [by_name[w] for w in shares[dist.rank]],
        lambda t: representation_for(t.d_out, t.d_in, representation, dev.type),
    )
    read0 = rb.bytes_read + ra.bytes_read
    degenerate: list[str] = []
    written: list[dict[str, Any]] = []
    try:
        handle = cache if dist.is_main else None
        if handle is None:
            handle = ProjectionCache.worker(cache_dir, manifest, rank=dist.rank)
        _stream_into(
            _Recording(handle, written),
            rb,
            ra,
            mine,
            dev,
            dtype,
            progress if dist.is_main else NullProgress(),
            degenerate,
            representation,
        )
    except Exception as e:
        err = e
    share = _Share(
        dist.rank,
        written,
        degenerate,
        rb.bytes_read + ra.bytes_read - read0,
        str(dev),
        bool(err),
        *hub_transfer(rb, ra),
    )
    results: list[_Share] = dist.all_gather(share)

    # 3. Rank 0 names the other ranks' entries (files verified) and ends the run.
    end_err: Exception | None = None
    if dist.is_main:
        assert cache is not None
        try:
            others = [
                _entry_from_json(d["weight"], d["entry"], cache_dir)
                for r in results[1:]
                for d in r.entries
            ]
            refused = cache.adopt(others)
            if any(r.failed for r in results):
                if created:
                    drop_created()  # as a single process does: nothing left behind
                else:
                    cache.finish()  # every entry named is complete; the run is over
            elif refused:
                end_err = CacheError(
                    f"projection cache {cache_dir}: {refused[0]} was written by another "
                    f"process but is not there for rank 0"
                    + (f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""),
                    hint="the cache directory must be on storage shared by every node; run the "
                    "same command again to compute what is missing",
                    path=cache_dir,
                )
            else:
                cache.finish()
        except Exception as e:
            end_err = e
        finally:
            cache.close()
    dist.agree(err or end_err)
    if dist.is_main:
        assert cache is not None
        cache_bytes = cache.size_bytes()
    else:
        cache_bytes = 0
    kinds = sorted({r.device.split(":")[0] for r in results})
    return ComputeSummary(
        cache_dir=cache_dir,
        computed=sum(len(r.entries) for r in results),
        skipped=skipped,
        bytes_read=sum(r.bytes_read for r in results),
        seconds=time.perf_counter() - t0,
        cache_bytes=cache_bytes,
        device=f"{dist.world_size} processes ({', '.join(kinds)})",
        degenerate=natural_sorted({w for r in results for w in r.degenerate}),
        created=created,
        fetched=sum(r.fetched for r in results),
        shards_bytes=max((r.shards_bytes for r in results), default=0),
    )


class _Recording:
    """Forwards ``put`` to a cache and records each written entry (for rank 0 to adopt)."""

    def __init__(self, cache: Any, out: list[dict[str, Any]]):
        self.cache = cache
        self.out = out

    def put(self, projector: Projector, **kw: Any) -> Any:
        e = self.cache.put(projector, **kw)
        self.out.append({"weight": e.weight, "entry": e.to_json()})
        return e
