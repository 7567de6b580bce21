"""The Safe LoRA projector: alignment delta, projector build (gram/factor) and ``C @ B``.

Contract (DESIGN §1; other modules code against exactly this):

- Orientation: everything here is in *linear orientation*, ``W: [d_out, d_in]`` for ``y = W x``.
  GPT-2 ``Conv1D`` checkpoints store ``W^T`` (``[in, out]``); pass ``fan_in_fan_out=True`` and the
  base/aligned weights are transposed before anything else. LoRA ``A [r, d_in]`` and
  ``B [d_out, r]`` are always linear orientation.
- :func:`alignment_delta` ``(w_base, w_aligned, *, fan_in_fan_out) -> float32 [d_out, d_in]``:
  ``V = W_aligned - W_base``, both upcast to float32 *before* subtracting. Fresh, contiguous
  memory (never aliases an input).
- :func:`representation_for` ``(d_out, d_in, mode="auto", device="cpu") -> "gram" | "factor"``:
  ``gram``/``factor`` force that form; ``auto`` picks the one with the lower estimated cost
  (:func:`representation_cost`: the product, writing the entry, one patch reading and applying
  it, at :data:`RATES` of ``device``'s type); where the two differ by under
  :data:`NEGLIGIBLE_S` it keeps the smaller tensor (``gram`` on a tie: the pre-``auto`` rule).
  ``check_representation(mode)`` raises UsageError for anything but ``auto|gram|factor``.
- :func:`build_projector` ``(weight, v, *, fan_in_fan_out, dtype=torch.float32,
  representation="auto") -> Projector``: ``C = V V^T / ||V||_F`` (the paper's and the
  official code's projector). It is **not** idempotent (eigenvalues ``sigma_i^2 / ||V||_F``);
  do not "fix" it. ``gram`` stores ``C``
  ``[d_out, d_out]``; ``factor`` stores ``F = V / sqrt(||V||_F)`` ``[d_out, d_in]`` so that
  ``C = F F^T``. ``V == 0`` gives a *degenerate* projector (``norm_v == 0``, zero tensor, no
  division by zero). NaN/Inf in ``V`` raises :class:`CheckpointError` naming the weight (and
  both files when ``sources`` is given).
- :class:`Projector` ``(weight, kind, tensor, norm_v, fan_in_fan_out, d_out, d_in)``;
  ``.degenerate`` is ``norm_v == 0``; ``.apply(b)`` returns ``C @ B`` as float64 ``[d_out, r]``
  on the projector tensor's device (gram: ``C @ B``; factor: ``F @ (F^T @ B)``, never forming
  ``d_out x d_out``). ``B`` with the wrong number of rows raises :class:`AdapterError`.
  ``.apply_many(bs)`` does that for a batch in one pass over the tensor (fixed float64 row
  blocks, one product per ``B``): result ``k`` is bit-identical to ``.apply(bs[k])`` whatever
  the batch; ``apply(b)`` is ``apply_many([b])[0]``.
- :class:`ProjectorSource` protocol: ``get(weight, *, fan_in_fan_out=False) -> Projector`` and
  ``projectors(requests) -> Iterator[Projector]`` (``requests`` = ``[(weight, fan_in_fan_out)]``;
  yields in the given order; streaming implementations prefetch the next one). Implemented by
  :class:`safelora_cli.cache.ProjectionCache` and
  :class:`safelora_cli.compute.StreamingProjectorSource`.

Precision: the projector is built with float32 matmuls (the cache is float32 unless asked
otherwise); :meth:`Projector.apply` upcasts to float64, so the only error against a float64
oracle is float32 rounding of ``V V^T`` and of the stored numbers (~1e-7 relative).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

from safelora_cli.errors import AdapterError, CheckpointError, UsageError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
R = TypeVar("R")

GRAM, FACTOR = "gram", "factor"
KINDS = (GRAM, FACTOR)
PROJECTOR_KIND = "safe-lora: C = V V^T / ||V||_F"


AUTO = "auto"
MODES = (AUTO, GRAM, FACTOR)


@dataclass(frozen=True)
class Rates:
    """Throughputs the ``auto`` rule weighs (one process, all its threads).

    ``flops``: float32 matmul FLOP/s (``V V^T``); float64 (``C B``) is taken at half of it.
    ``write``: bytes/s of a written and fsynced cache entry. ``read``: bytes/s of reading an
    entry back at patch time.
    """

    flops: float
    write: float
    read: float


# CPU: measured on the 2-core development machine (torch 2.13, MKL, 2 threads), 2026-12-04:
# torch.mm(V, V.T) at 4096x4096 and 4096x11008 float32 ran at 135-146 GFLOP/s; a 67 MB
# write + fsync at 1.1-1.2 GB/s. The read rate, 2 GB/s, is not measured: it is the nominal rate
# compute.READ_BYTES_PER_S balances ranks by. CUDA: *not measured* (no GPU was available); a
# nominal 2e13 float32 FLOP/s (a data-centre GPU without TF32) with the same host disk.
RATES: dict[str, Rates] = {
    "cpu": Rates(flops=1.4e11, write=1.1e9, read=2e9),
    "cuda": Rates(flops=2e13, write=1.1e9, read=2e9),
}
# A typical LoRA rank, for the patch-time term (the term is small next to the others).
PATCH_RANK = 16
# Below this difference in estimated seconds the choice does not matter to anyone.
NEGLIGIBLE_S = 1e-3


def check_representation(mode: str) -> str:
    """``mode`` lower-cased when it is ``auto``, ``gram`` or ``factor``; UsageError otherwise."""
    m = (mode or AUTO).strip().lower()
    if m not in MODES:
        raise UsageError(
            f"--representation {mode!r} is not one of auto, gram, factor",
            hint="auto picks per weight by estimated cost (docs/algorithm.md); gram stores "
            "C = V V^T / ||V||_F, factor stores F = V / sqrt(||V||_F)",
        )
    return m


def representation_cost(
    kind: str, d_out: int, d_in: int, device: str = "cpu", *, columns: int = PATCH_RANK
) -> float:
    """Estimated seconds a user pays for storing one ``[d_out, d_in]`` weight as ``kind``.

    The sum of: forming it (``gram``: the ``V V^T`` product, ``2 d_out^2 d_in`` FLOPs;
    ``factor``: a scaling, which ``gram``'s division matches, so 0), writing it (float32
    bytes / ``write``), and one patch reading it back and applying it to ``columns`` columns
    (bytes / ``read`` plus ``2 d_out^2 c`` or ``4 d_out d_in c`` float64 FLOPs): a LoRA ``B``
    (:data:`PATCH_RANK`), or a full update ``dW`` (``d_in``: patch-model). Rates are
    :data:`RATES` of ``device`` (a type: ``cpu``, ``cuda``; unknown types count as ``cpu``).
    """
    rt = RATES.get(device, RATES["cpu"])
    numel = d_out * d_out if kind == GRAM else d_out * d_in
    nbytes = 4.0 * numel
    if kind == GRAM:
        make = 2.0 * d_out * d_out * d_in / rt.flops
        apply = 2.0 * d_out * d_out * columns
    else:
        make = 0.0
        apply = 4.0 * d_out * d_in * columns
    return make + nbytes / rt.write + nbytes / rt.read + apply / (rt.flops / 2)


def representation_for(
    d_out: int, d_in: int, mode: str = AUTO, device: str = "cpu", *, columns: int = PATCH_RANK
) -> str:
    """The form to store a ``[d_out, d_in]`` weight's projector in (``"gram"``/``"factor"``).

    ``mode`` ``gram``/``factor``: that form. ``auto``: the lower :func:`representation_cost`
    on ``device`` (a device type) for a projector applied to ``columns`` columns; when the two
    costs differ by less than :data:`NEGLIGIBLE_S` the smaller tensor, ``gram`` on a tie
    (``d_out <= d_in``).
    """
    if mode in (GRAM, FACTOR):
        return mode
    if mode != AUTO:
        raise ValueError(f"representation must be one of {MODES}, got {mode!r}")
    g = representation_cost(GRAM, d_out, d_in, device, columns=columns)
    f = representation_cost(FACTOR, d_out, d_in, device, columns=columns)
    if abs(g - f) < NEGLIGIBLE_S:
        return GRAM if d_out <= d_in else FACTOR
    return GRAM if g < f else FACTOR


def stored_shape(kind: str, d_out: int, d_in: int) -> tuple[int, int]:
    """The shape of the stored tensor: ``[d_out, d_out]`` (gram) or ``[d_out, d_in]`` (factor)."""
    return (d_out, d_out) if kind == GRAM else (d_out, d_in)


def alignment_delta(
    w_base: torch.Tensor, w_aligned: torch.Tensor, *, fan_in_fan_out: bool
) -> torch.Tensor:
    """``V = W_aligned - W_base`` as float32 ``[d_out, d_in]`` (linear orientation).

    Both weights are upcast to float32 before subtracting (bf16/fp16 -> f32 is exact, so the
    difference is the exact difference of the stored values, rounded once). With
    ``fan_in_fan_out`` the inputs are ``[in, out]`` (Conv1D) and the result is transposed.
    The result is fresh contiguous memory on the inputs' device. ValueError on shapes that
    differ or are not 2-D (callers check these with names first).
    """
    import torch

    if w_base.dim() != 2 or w_aligned.dim() != 2:
        raise ValueError(f"weights must be 2-D, got {tuple(w_base.shape)}")
    if w_base.shape != w_aligned.shape:
        raise ValueError(f"shapes differ: {tuple(w_base.shape)} vs {tuple(w_aligned.shape)}")
    f32 = torch.float32
    if w_aligned.dtype == f32 and w_base.dtype == f32:
        v = torch.sub(w_aligned, w_base)
    else:
        # One float32 buffer: copy-upcast the aligned weight, subtract the base in place
        # (the base is upcast element by element inside the kernel, exactly).
        v = w_aligned.to(f32, copy=True)
        v.sub_(w_base if w_base.dtype == f32 else w_base.to(f32))
    if fan_in_fan_out:
        v = v.t().contiguous()
    return v


# ATen runs an elementwise kernel on the calling thread when it has fewer elements than this
# (at::internal::GRAIN_SIZE); chunks below it never start an OpenMP team.
_SERIAL_CHUNK = 32767


def alignment_delta_serial(
    w_base: torch.Tensor,
    w_aligned: torch.Tensor,
    *,
    fan_in_fan_out: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`alignment_delta` on the calling thread only, bit-identical to it (CPU tensors).

    Works in chunks small enough that ATen never starts a parallel region, so a background
    (prefetch) thread can form the next delta without a second OpenMP team competing with the
    main thread's matmul for the cores. Same elementwise float32 operations, same result.
    ``out``: a contiguous float32 ``[d_out, d_in]`` buffer to write into (returned), instead of
    fresh memory; it must not overlap the inputs.
    """
    import torch

    if w_base.dim() != 2 or w_aligned.dim() != 2:
        raise ValueError(f"weights must be 2-D, got {tuple(w_base.shape)}")
    if w_base.shape != w_aligned.shape:
        raise ValueError(f"shapes differ: {tuple(w_base.shape)} vs {tuple(w_aligned.shape)}")
    rows, cols = (int(s) for s in w_base.shape)
    f32 = torch.float32
    shape = (cols, rows) if fan_in_fan_out else (rows, cols)
    if out is None:
        v = torch.empty(shape, dtype=f32)
    elif out.dtype != f32 or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 {list(shape)} tensor")
    else:
        v = out
    step = max(1, _SERIAL_CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        a, b = w_aligned[r0:r1], w_base[r0:r1]
        out = v[:, r0:r1] if fan_in_fan_out else v[r0:r1]
        if fan_in_fan_out:
            a, b = a.t(), b.t()
        if cols > _SERIAL_CHUNK:  # a single row is above the grain: split it too
            for c0 in range(0, cols, _SERIAL_CHUNK):
                c1 = min(cols, c0 + _SERIAL_CHUNK)
                if fan_in_fan_out:
                    o, x, y = out[c0:c1], a[c0:c1], b[c0:c1]
                else:
                    o, x, y = out[:, c0:c1], a[:, c0:c1], b[:, c0:c1]
                o.copy_(x)
                o.sub_(y)
        elif a.dtype == f32 and b.dtype == f32:
            torch.sub(a, b, out=out)
        else:
            out.copy_(a)
            out.sub_(b)
    return v


# Bytes of one float64 row block in Projector.apply_many: the block is converted once and then
# read by every adapter's GEMM, so it should stay in cache between them (L3 here: 32 MiB shared),
# while each block costs one BLAS call per adapter and pass (a thread wake-up under
# OMP_WAIT_POLICY=PASSIVE). Measured 2026-12-07 on the 2-core EPYC (patch of 1 and 50 adapters
# in-process, 4096 x 4096 factors, 2-32 MiB side by side): 8 MiB had the least CPU time for both,
# 2 MiB was 20-40% slower for 50 adapters, 16-32 MiB no faster and slower for one adapter.
# A constant, never a function of the batch: the block boundaries, and so every adapter's
# bits, must not depend on what else is in the batch.
APPLY_BLOCK_BYTES = 8 << 20


def apply_block_rows(width: int) -> int:
    """Rows per float64 block of a ``[*, width]`` projector tensor (a multiple of 8, >= 8)."""
    rows = APPLY_BLOCK_BYTES // (8 * max(width, 1))
    return max(8, rows - rows % 8)


@dataclass
class Projector:
    """One weight's projector ``C = V V^T / ||V||_F`` in its stored representation.

    ``tensor`` is ``C [d_out, d_out]`` (``kind == "gram"``) or ``F [d_out, d_in]`` with
    ``C = F F^T`` (``kind == "factor"``). ``norm_v`` is ``||V||_F`` (0 for a degenerate
    projector, whose tensor is all zeros). ``fan_in_fan_out`` records the checkpoint's
    orientation of the weight (the projector itself is always linear orientation).
    """

    weight: str
    kind: str
    tensor: torch.Tensor
    norm_v: float
    fan_in_fan_out: bool
    d_out: int
    d_in: int

    @property
    def degenerate(self) -> bool:
        """No alignment signal (``V == 0``): never project, no cosine."""
        return self.norm_v == 0.0

    @property
    def numel(self) -> int:
        return int(self.tensor.numel())

    def check_b(self, b: torch.Tensor) -> None:
        """AdapterError unless ``b`` is 2-D with ``d_out`` rows (a LoRA ``B`` for this weight)."""
        if b.dim() != 2 or b.shape[0] != self.d_out:
            raise AdapterError(
                f"{self.weight}: lora_B has shape {tuple(b.shape)} but the weight has "
                f"d_out={self.d_out} (d_in={self.d_in})",
                hint="the adapter was trained on a different model, or its fan_in_fan_out "
                "setting does not match the checkpoint",
            )

    def apply(self, b: torch.Tensor) -> torch.Tensor:
        """``C @ B`` as float64 ``[d_out, r]`` on this projector's device (a transposed view:
        not contiguous).

        ``b``: ``[d_out, r]`` (LoRA ``B``, linear orientation), any float dtype/device. Exactly
        ``apply_many([b])[0]`` (one code path: see :meth:`apply_many`). A degenerate projector
        returns zeros. AdapterError when ``b`` does not have ``d_out`` rows.
        """
        return self.apply_many([b])[0]

    def apply_many(self, bs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[C @ B_k]`` for every ``B_k`` in ``bs``: float64 ``[d_out, r_k]`` on this
        projector's device, each a transposed view (not contiguous).

        ``B_k``: ``[d_out, r_k]`` (linear orientation), any float dtype/device, ranks may
        differ. Gram: ``C @ B``; factor: ``F @ (F^T @ B)``, never forming ``d_out x d_out``.
        **Batch-independent**: ``apply_many(bs)[k]`` is bit-identical to ``apply(bs[k])``
        whatever else is in the batch, its size and its order; every product below has shapes
        and operands that depend only on ``B_k`` and the projector (see :data:`APPLY_BLOCK_BYTES`).
        The stored tensor is read in row blocks, each upcast to float64 once per pass and used
        for every ``B_k`` while it is in cache; no float64 copy of the whole tensor is made.
        AdapterError (before any work) when some ``B_k`` does not have ``d_out`` rows.
        """
        import torch

        for b in bs:
            self.check_b(b)
        dev = self.tensor.device
        # B_k^T [r, d_out], contiguous: each block's operand is then a column slice of it.
        bts = [b.to(device=dev, dtype=torch.float64).t().contiguous() for b in bs]
        if self.degenerate or not bts:
            return [torch.zeros_like(bt).t() for bt in bts]
        n_rows, width = (int(s) for s in self.tensor.shape)
        rows = apply_block_rows(width)
        # One buffer for the current block: every block (the last, shorter one included) starts
        # at its base address, so the GEMMs' operands are laid out the same in every call. Its
        # size depends on the projector only (no larger than the tensor).
        buf = torch.empty((min(rows, n_rows), width), dtype=torch.float64, device=dev)
        # (C B_k)^T [r, d_out]; each block's GEMM writes its columns in place (MKL takes the
        # row stride), no temporary.
        outs = [torch.empty_like(bt) for bt in bts]
        # Formed as (B^T T^T)^T: MKL's float64 GEMM with a skinny right-hand side (N = r) runs
        # 2-3.5x slower than with a skinny left-hand side (M = r) on the same numbers (measured
        # at widths 256-11008). One GEMM per block and adapter, never one over stacked B's:
        # a stacked product's columns change with the batch (docs/performance.md).
        if self.kind == GRAM:
            # (C B)^T[:, i] = B^T C[i]^T: no reduction across blocks.
            for r0, blk in self._blocks(buf, rows):
                for bt, out in zip(bts, outs, strict=True):
                    torch.mm(bt, blk.t(), out=out[:, r0 : r0 + blk.shape[0]])
            return [out.t() for out in outs]
        # Y = B^T F = sum_i B[i]^T F[i], in block order (fixed), then (F Y^T)^T[:, i] = Y F[i]^T.
        ys = [torch.zeros((bt.shape[0], width), dtype=torch.float64, device=dev) for bt in bts]
        for r0, blk in self._blocks(buf, rows):
            for bt, y in zip(bts, ys, strict=True):
                y.addmm_(bt[:, r0 : r0 + blk.shape[0]], blk)
        for r0, blk in self._blocks(buf, rows):
            for y, out in zip(ys, outs, strict=True):
                torch.mm(y, blk.t(), out=out[:, r0 : r0 + blk.shape[0]])
        return [out.t() for out in outs]

    def _blocks(self, buf: torch.Tensor, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(r0, T[r0:r0 + n] as float64)`` for consecutive row blocks of ``rows`` rows, each
        copied into (a prefix of) ``buf``; valid until the next block is produced."""
        n_rows = int(self.tensor.shape[0])
        for r0 in range(0, n_rows, rows):
            n = min(rows, n_rows - r0)
            blk = buf[:n]
            blk.copy_(self.tensor[r0 : r0 + n])
            yield r0, blk

    def to(self, device: str | torch.device) -> Projector:
        """The same projector with its tensor on ``device``."""
        return Projector(
            self.weight,
            self.kind,
            self.tensor.to(device),
            self.norm_v,
            self.fan_in_fan_out,
            self.d_out,
            self.d_in,
        )


def _where(sources: Sequence[str | Path] | None) -> str:
    if not sources:
        return ""
    return " (" + " vs ".join(str(s) for s in sources) + ")"


def build_projector(
    weight: str,
    v: torch.Tensor,
    *,
    fan_in_fan_out: bool,
    dtype: torch.dtype | None = None,
    sources: Sequence[str | Path] | None = None,
    consume: bool = False,
    out: torch.Tensor | None = None,
    representation: str = AUTO,
) -> Projector:
    """The projector of alignment matrix ``v`` (float32 ``[d_out, d_in]``, linear orientation).

    ``C = V V^T / ||V||_F`` stored as ``gram`` (``C``) or ``factor`` (``F = V / sqrt(||V||_F)``)
    as :func:`representation_for` ``(d_out, d_in, representation, v.device.type)`` says, cast to
    ``dtype`` (default float32). The result lives on ``v``'s device. ``V == 0`` -> degenerate
    projector (zeros, ``norm_v == 0``).
    NaN/Inf in ``v`` -> CheckpointError naming ``weight`` and ``sources`` (base and aligned
    files). ``consume=True`` lets the factor path scale ``v`` in place (saves one copy).
    ``out``: a contiguous float32 ``[d_out, d_out]`` buffer on ``v``'s device for the gram
    product (same numbers as fresh memory); unused for ``factor`` and degenerate projectors or
    when cast to another ``dtype``, so the caller compares it with the result's tensor.
    """
    import torch

    if dtype is None:
        dtype = torch.float32
    if v.dim() != 2:
        raise CheckpointError(
            f"{weight}: alignment matrix must be 2-D, got shape {tuple(v.shape)}{_where(sources)}",
            hint="only 2-D (linear / Conv1D) weights can be projected",
        )
    if v.dtype != torch.float32:
        v = v.to(torch.float32)
        consume = True
    d_out, d_in = (int(s) for s in v.shape)
    kind = representation_for(d_out, d_in, representation, v.device.type)
    norm = frobenius_norm(v)
    if not math.isfinite(norm):
        raise CheckpointError(
            f"{weight}: the alignment delta (aligned - base) contains NaN or Inf{_where(sources)}",
            hint="one of the checkpoints is corrupt or overflowed; re-download or re-save it",
        )
    if norm == 0.0:
        t = torch.zeros(stored_shape(kind, d_out, d_in), dtype=dtype, device=v.device)
        return Projector(weight, kind, t, 0.0, fan_in_fan_out, d_out, d_in)
    if kind == GRAM:
        # Divide rather than multiply by a reciprocal: 1/norm can overflow for tiny deltas.
        t = torch.mm(v, v.t()) if out is None else torch.mm(v, v.t(), out=out)
        t.div_(norm)
        # tr(C) = ||V||_F^2 / ||V||_F = ||V||_F. A float32 V V^T under- or overflows for
        # deltas far from unit scale (entries below ~1e-19 or above ~1e19): then form C in
        # float64 (rare, and exact to float32 rounding once C itself is representable).
        trace = float(torch.diagonal(t).sum(dtype=torch.float64))
        if not (math.isfinite(trace) and abs(trace - norm) <= 1e-3 * norm):
            v64 = v.to(torch.float64)
            t = (v64 @ v64.t()).div_(norm).to(torch.float32)
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(
                    f"{weight}: the projector C = V V^T / ||V||_F does not fit float32 "
                    f"(||V||_F = {norm:.3g}){_where(sources)}",
                    hint="the alignment delta is absurdly large; check the checkpoints",
                )
    else:
        root = math.sqrt(norm)
        t = v.div_(root) if consume else v.div(root)
        if not t.is_contiguous():
            t = t.contiguous()
    if t.dtype != dtype:
        t = t.to(dtype)
    return Projector(weight, kind, t, norm, fan_in_fan_out, d_out, d_in)


def frobenius_norm(v: torch.Tensor) -> float:
    """``||v||_F`` of a 2-D float tensor, accurate to ~1e-9 relative at any size.

    A single float32 reduction drifts with the element count (3e-3 relative at 7B MLP size on
    CPU), and one float64 reduction materialises a float64 copy of ``v``. Row norms in float32
    are accurate (a row is short), and their squares are summed in float64.
    """
    import torch

    rows = torch.linalg.vector_norm(v, dim=1)
    norm = math.sqrt(float(rows.to(torch.float64).square().sum()))
    if (norm == 0.0 or not math.isfinite(norm)) and v.dtype != torch.float64:
        # A float32 row norm squares its entries in float32: below ~1e-19 they underflow to 0
        # (a real delta would read as "V = 0"), above ~1e19 they overflow to inf. Redo those
        # rare cases in float64, where squares of any float32 value fit.
        rows = torch.linalg.vector_norm(v, dim=1, dtype=torch.float64)
        norm = math.sqrt(float(rows.square().sum()))
    return norm


@runtime_checkable
class ProjectorSource(Protocol):
    """Where projectors come from: a projection cache, or on-the-fly compute from two models."""

    def get(self, weight: str, *, fan_in_fan_out: bool = False) -> Projector:
        """The projector of checkpoint weight ``weight`` (linear orientation).

        ``fan_in_fan_out``: the weight is stored ``[in, out]`` (GPT-2 Conv1D). A cache raises
        CacheError when the entry is missing or was stored with the other orientation.
        """
        ...

    def projectors(self, requests: Sequence[tuple[str, bool]]) -> Iterator[Projector]:
        """Projectors for ``[(weight, fan_in_fan_out), ...]``, yielded in the given order.

        Streaming implementations prefetch the next one while the caller works on the current.
        """
        ...


def prefetched(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``fn(item)`` for each item, in order, computing the next one on a background thread.

    At most two results exist at once: the one the caller holds and the one being prepared.
    An exception from ``fn`` is raised when the caller reaches that item. Closing the iterator
    early waits for the in-flight call and discards it.
    """
    todo = list(items)

    def gen() -> Iterator[R]:
        if not todo:
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="safelora-prefetch") as ex:
            fut = ex.submit(fn, todo[0])
            try:
                for i in range(len(todo)):
                    # Held in a box and popped into the yield, so this frame keeps no
                    # reference to an item the caller has already dropped.
                    box = [fut.result()]
                    fut = ex.submit(fn, todo[i + 1]) if i + 1 < len(todo) else None
                    yield box.pop()
            finally:
                if fut is not None:
                    fut.cancel()

    return gen()


# ----------------------------------------------------------------------------- full fine-tunes

# Columns of dW per product: C @ dW is formed a block of columns at a time, so a weight's float64
# temporaries are d_out x UPDATE_BLOCK instead of d_out x d_in (memory flat in the weight's size).
UPDATE_BLOCK = 256


@dataclass(frozen=True)
class UpdateSums:
    """What the cosine of a full update needs, from :func:`update_sums` (float64).

    With ``D = dW / scale`` (``scale = max|dW|``, 0 when ``dW == 0``): ``inner = <C D, D>_F``,
    ``cd_sq = ||C D||_F^2``, ``d_sq = ||D||_F^2``. Dividing by the max-abs first keeps every
    product and sum inside float64's range whatever the magnitudes of the weights.
    """

    scale: float
    inner: float
    cd_sq: float
    d_sq: float


def update_scale(dw: torch.Tensor) -> float:
    """``max|dW|`` (exact: a max); ValueError when ``dw`` holds NaN or Inf."""
    import torch

    if dw.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(dw)
    scale = max(-float(lo), float(hi))
    if not math.isfinite(scale) or math.isnan(float(lo)):
        raise ValueError("the update contains NaN or Inf")
    return scale


def update_blocks(
    proj: Projector, dw: torch.Tensor, scale: float, *, block: int = UPDATE_BLOCK
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(c0, c1, D[:, c0:c1], (C D)[:, c0:c1])`` for ``D = dw / scale``, float64 on the
    projector's device, one block of columns at a time.

    ``dw``: ``W_ft - W_aligned`` in linear orientation ``[d_out, d_in]``, as
    :func:`alignment_delta` forms it (``alignment_delta(w_aligned, w_ft, ...)``: float32 before
    subtracting). Gram: ``C D``; factor: ``F (F^T D)`` (never ``d_out x d_out``), through
    :meth:`Projector.apply`, which upcasts the stored tensor a row block at a time (no float64
    copy of the whole projector). ``scale == 0`` (or a degenerate projector) gives zero
    products. ValueError for the wrong shape.
    """
    import torch

    if dw.dim() != 2 or tuple(dw.shape) != (proj.d_out, proj.d_in):
        raise ValueError(
            f"{proj.weight}: update has shape {tuple(dw.shape)}, projector is "
            f"[{proj.d_out}, {proj.d_in}]"
        )
    dev = proj.tensor.device
    for c0 in range(0, proj.d_in, block):
        c1 = min(proj.d_in, c0 + block)
        # copy=True: a float64 dw must not be scaled in place.
        d = dw[:, c0:c1].to(device=dev, dtype=torch.float64, copy=True)
        if scale:
            d.div_(scale)
        else:
            d.zero_()
        cd = proj.apply(d) if scale else torch.zeros_like(d)
        yield c0, c1, d, cd


def update_sums(proj: Projector, dw: torch.Tensor, *, block: int = UPDATE_BLOCK) -> UpdateSums:
    """The sums :func:`safelora_cli.scoring.update_cosine` needs (see :class:`UpdateSums`).

    ValueError when ``dw`` holds NaN/Inf or has the wrong shape (the caller names the weight).
    """
    scale = update_scale(dw)
    inner = cd_sq = d_sq = 0.0
    for _, _, d, cd in update_blocks(proj, dw, scale, block=block):
        inner += float((cd * d).sum())
        cd_sq += float((cd * cd).sum())
        d_sq += float((d * d).sum())
    return UpdateSums(scale, inner, cd_sq, d_sq)


def projected_weight(
    proj: Projector,
    w_aligned: torch.Tensor,
    dw: torch.Tensor,
    *,
    fan_in_fan_out: bool,
    dtype: torch.dtype,
    block: int = UPDATE_BLOCK,
) -> torch.Tensor:
    """``W_aligned + C dW`` in the stored orientation, cast once to ``dtype`` (CPU, contiguous).

    ``w_aligned`` is the stored tensor (``[in, out]`` when ``fan_in_fan_out``); ``dw`` is linear
    orientation (see :func:`update_blocks`). Each block is summed in float64 from the exact
    upcast of ``w_aligned`` and ``scale * C D``, then cast: the only rounding after the product
    is that one cast (for bf16: one rounding of the float64 sum). OverflowError when a value
    does not fit ``dtype`` (float16's 65504, say): never a tensor holding Inf.
    """
    import torch

    scale = update_scale(dw)
    out = torch.empty(tuple(w_aligned.shape), dtype=dtype)
    out_lin = out.t() if fan_in_fan_out else out
    w_lin = w_aligned.t() if fan_in_fan_out else w_aligned
    for c0, c1, _, cd in update_blocks(proj, dw, scale, block=block):
        w = w_lin[:, c0:c1].to(dtype=torch.float64, copy=True)  # never add into the input
        w.add_(cd.to(device="cpu"), alpha=scale)
        cast = w.to(dtype)
        if not bool(torch.isfinite(cast).all()):
            raise OverflowError(f"{proj.weight}: W_aligned + C dW does not fit {dtype}")
        out_lin[:, c0:c1] = cast
    return out
