"""Safe LoRA scores: per-module cosines, selection, Pdst and per-adapter reports (DESIGN §1, §6).

Public API (``inspect`` and ``patch`` build on it)::

    cosine_from_traces(cb, b, a) -> float | None
        cb = X = C @ B [d_out, r], b = B [d_out, r], a = A [r, d_in] (any float dtype, any
        device; everything is upcast to float64). With G = A A^T (r x r):
        <XA, BA> = tr(X^T B G), ||XA||^2 = tr(X^T X G), ||BA||^2 = tr(B^T B G); no d_out x d_in
        product is formed. None when ||BA|| == 0 (untrained LoRA) or ||XA|| == 0 (no alignment
        signal): never a division by zero. The result is clamped to [-1, 1].
    lora_norm(b, a, scale) -> float
        ||s B A||_F by the same trace trick (float64).
    ModuleScore      one LoRA module: name (base-model module path), weight (checkpoint weight it
                     was matched to), layer, rank, scale, d_out, d_in, dtype (lora_B's code),
                     norm_dw = ||s B A||_F, norm_v = ||V||_F, cosine (raw float64 or None),
                     projected (bool), reason (why undefined / not projected; None if projected),
                     dist (this module's Pdst term), key_b, note.
    AdapterReport    one adapter: adapter (argument as given), path, output (where it is or, on
                     a dry run, would be written; None when not patching), dry_run,
                     selection, threshold / k / ties (the Decision), modules (natural order),
                     skipped (adapter.SkippedModule list), projected, total, pdst, sources.
                     ``to_json()`` gives DESIGN §6's schema (below).
    ScoredAdapter    adapter, report, and ``tensors``: lora_B key -> B' = C B cast back to B's
                     own dtype (CPU), for the selected modules only.
    score_adapters(adapters, source, selection, *, weight_for=None, progress=None)
        -> list[ScoredAdapter]
        Batch scoring. The union of needed weights (``weight_for(module)``, default
        ``module.weight_name``) is requested from ``source.projectors`` once, in natural order;
        each projector is applied once (``Projector.apply_many``) to the ``B`` of every adapter
        that has that module, then dropped; every adapter's result is bit-identical to scoring
        it alone. Memory: about one projector plus, per adapter, the small B and C B of its
        modules.
    pdst(dists) -> float | None     mean of the per-module terms 1 / (1 + ||B_final - C B||_F)

JSON (``AdapterReport.to_json()``; ``cosine`` is null where undefined; keys in this order)::

    {"adapter", "path", "output", "dry_run", "selection": {"mode", "value"}, "projected",
     "total", "pdst",
     "threshold", "k", "ties", "sources",
     "modules": [{"name", "weight", "layer", "cosine", "projected", "reason", "rank", "scale",
                  "d_out", "d_in", "dtype", "norm_dw", "norm_v", "note"}],
     "skipped": [{"name", "keys", "reason"}]}

Pdst follows the official code: the mean over the adapter's LoRA modules of
``1 / (1 + ||B_final - C B||_F)``, where ``B_final`` is the lora_B that is written (B' for a
projected module, B otherwise) and ``C B`` is the float64 product. Degenerate modules count too:
with ``V == 0`` the projector is the zero matrix (the limit of ``V V^T / ||V||_F``), so their term
is ``1 / (1 + ||B||_F)``; with ``B == 0`` it is 1. Skipped modules (embedding LoRA, DoRA,
``modules_to_save``) are not LoRA modules we can project and are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safelora_cli.errors import AdapterError
from safelora_cli.naming import layer_index, natural_key
from safelora_cli.progress import announce
from safelora_cli.selection import Decision, Selection, round_cosine, select

if TYPE_CHECKING:
    import torch

    from safelora_cli.adapter import Adapter, LoraModule, SkippedModule
    from safelora_cli.progress import Progress
    from safelora_cli.projector import UpdateSums

REASON_NO_SIGNAL = "no alignment signal: V = W_aligned - W_base is zero for {weight}"
REASON_UNTRAINED = "untrained LoRA: B A is zero"
REASON_ORTHOGONAL = "C B A is zero: the update is orthogonal to the alignment subspace"
REASON_ABOVE = "cosine {cos:.5f} is above the threshold {t:.5f}"
REASON_NONE_SELECTED = "no module selected"

_EPS64 = 2.0**-52  # float64 machine epsilon


def pow2_exponent(t: torch.Tensor) -> int | None:
    """``e`` with ``max|t| = f * 2**e``, ``0.5 <= f < 1`` (None when ``t`` is all zero).

    Dividing by ``2**e`` is exact (a power of two), so a product of scaled tensors is the
    product of the originals times a power of two, bit for bit, as long as nothing overflows or
    underflows: which is why inputs are scaled this way before the r x r products.
    """
    if t.numel() == 0:
        return None
    m = float(t.abs().max())
    if m == 0.0:
        return None
    return math.frexp(m)[1]


def scale_pow2(t: torch.Tensor, e: int) -> torch.Tensor:
    """``t * 2**e`` (float64), in two steps so that neither factor over/underflows."""
    e1 = e // 2
    return t * (2.0**e1) * (2.0 ** (e - e1))


def _normalised(t: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """``(t / 2**e, e)`` as float64 with max-abs in [0.5, 1); ``(t, None)`` when ``t == 0``."""
    import torch

    t64 = t.to(dtype=torch.float64)
    e = pow2_exponent(t64)
    return (t64, None) if e is None else (scale_pow2(t64, -e), e)


def _ldexp(x: float, e: int) -> float:
    """``x * 2**e`` as a float, ``inf`` (with x's sign) when it does not fit float64."""
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.copysign(math.inf, x)


def _traces(cb: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> tuple[float, float, float]:
    """``(<XA, BA>, ||XA||^2, ||BA||^2)`` in float64 from r x r products only.

    Callers pass max-abs-normalised tensors (:func:`_normalised`): then every entry is below 1
    in magnitude and no product overflows, whatever the stored magnitudes were.
    """
    import torch

    x = cb.to(dtype=torch.float64)
    b64 = b.to(device=x.device, dtype=torch.float64)
    a64 = a.to(device=x.device, dtype=torch.float64)
    r = x.shape[1]
    g = a64 @ a64.T  # r x r, symmetric: tr(M G) = sum(M * G)
    # One [2r, d_out] x [d_out, 2r] product gives X^T X, X^T B and B^T B: each BLAS call costs
    # a thread wake-up under OMP_WAIT_POLICY=PASSIVE, which outweighs these tiny products.
    yt = torch.cat([x.T, b64.T])
    m = yt @ yt.T
    inner = float((m[:r, r:] * g).sum())
    nx = float((m[:r, :r] * g).sum())
    nb = float((m[r:, r:] * g).sum())
    return inner, nx, nb


# ||B A||^2 of the normalised factors below this fraction of (sum_k ||b_k|| ||a_k||)^2 is
# cancellation: the trace's own rounding (~1e-16 of that bound) is then a visible part of the
# value, so the update is neither reliably zero nor reliably scored. Real adapters sit near 1/r.
RELIABLE_NB = 1e-12


def cosine_from_traces(cb: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float | None:
    """Cosine of ``C B A`` and ``B A`` (Frobenius), or None when either is zero.

    ``cb`` = C @ B [d_out, r], ``b`` = B [d_out, r], ``a`` = A [r, d_in]; float64 throughout.
    Each input is first scaled by a power of two to max-abs ~1 (the cosine does not change, bit
    for bit), so stored magnitudes near the ends of the float range neither overflow nor
    underflow the products.
    """
    xn, ex = _normalised(cb)
    bn, eb = _normalised(b)
    an, ea = _normalised(a)
    if ex is None or eb is None or ea is None:
        return None
    inner, nx, nb = _traces(xn, bn, an)
    # Rounding can leave a true zero as a tiny negative trace; anything <= 0 is zero.
    if not (nx > 0.0 and nb > 0.0):
        return None
    cos = inner / (math.sqrt(nx) * math.sqrt(nb))
    if not math.isfinite(cos):
        return None
    return max(-1.0, min(1.0, cos))


def lora_norm(b: torch.Tensor, a: torch.Tensor, scale: float) -> float:
    """``||scale * B A||_F`` via ``tr(B^T B A A^T)`` in float64 (no d_out x d_in product).

    Scale-safe: B and A are normalised by powers of two first; ``inf`` only when the norm
    itself exceeds the float64 range.
    """
    bn, eb = _normalised(b)
    an, ea = _normalised(a.to(device=bn.device))
    if eb is None or ea is None:
        return 0.0
    nb = float(((bn.T @ bn) * (an @ an.T)).sum())
    return _ldexp(abs(scale) * math.sqrt(max(nb, 0.0)), eb + ea)


def pdst(dists: Iterable[float]) -> float | None:
    """Mean of the per-module Pdst terms; None for an adapter without LoRA modules."""
    values = list(dists)
    return sum(values) / len(values) if values else None


@dataclass
class ModuleScore:
    """One LoRA module's score (see the module docstring for the fields)."""

    name: str
    weight: str
    layer: int | None
    rank: int
    scale: float
    d_out: int
    d_in: int
    dtype: str
    norm_dw: float
    norm_v: float
    cosine: float | None
    projected: bool = False
    reason: str | None = None
    dist: float = 0.0
    key_b: str = ""
    note: str | None = None

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
            "rank": self.rank,
            "scale": self.scale,
            "d_out": self.d_out,
            "d_in": self.d_in,
            "dtype": self.dtype,
            "norm_dw": self.norm_dw,
            "norm_v": self.norm_v,
            "note": self.note,
        }


@dataclass
class AdapterReport:
    """One adapter's outcome: scores, the decision and Pdst (``to_json``: DESIGN §6)."""

    adapter: str
    path: str
    selection: Selection
    decision: Decision
    modules: list[ModuleScore]
    skipped: list[SkippedModule] = field(default_factory=list)
    output: str | None = None
    sources: dict[str, Any] | None = None
    dry_run: bool = False

    @property
    def projected(self) -> int:
        return sum(1 for m in self.modules if m.projected)

    @property
    def total(self) -> int:
        return len(self.modules)

    @property
    def pdst(self) -> float | None:
        return pdst(m.dist for m in self.modules)

    @property
    def threshold(self) -> float | None:
        return self.decision.threshold

    @property
    def ties(self) -> int:
        return self.decision.ties

    def lowest(self, n: int = 5) -> list[ModuleScore]:
        """The ``n`` modules with the lowest defined cosine (ties in natural name order)."""
        defined = [m for m in self.modules if m.cosine is not None]
        defined.sort(key=lambda m: (m.rounded, natural_key(m.name)))
        return defined[:n]

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "path": self.path,
            "output": self.output,
            "dry_run": self.dry_run,
            "selection": self.selection.to_json(),
            "projected": self.projected,
            "total": self.total,
            "pdst": self.pdst,
            "threshold": self.decision.threshold,
            "k": self.decision.k,
            "ties": self.decision.ties,
            "sources": self.sources,
            "modules": [m.to_json() for m in self.modules],
            "skipped": [
                {"name": s.name, "keys": list(s.keys), "reason": s.reason} for s in self.skipped
            ],
        }


@dataclass
class ScoredAdapter:
    """An adapter with its report and the projected lora_B tensors (key -> B', B's dtype, CPU)."""

    adapter: Adapter
    report: AdapterReport
    tensors: dict[str, torch.Tensor]


@dataclass
class _Pending:
    """What is kept per module between its projector and the selection (small: d_out x r)."""

    module: LoraModule
    weight: str
    cosine: float | None
    norm_dw: float
    norm_v: float
    projected_b: torch.Tensor | None  # C B cast to B's dtype
    dist_keep: float  # ||B - C B||_F
    dist_proj: float  # ||cast(C B) - C B||_F
    degenerate: str | None  # reason when the cosine is undefined
    unfit: str | None = None  # why C B cannot be written in B's dtype (None: it fits)


def _default_weight(module: LoraModule) -> str:
    return module.weight_name


def _check_shape(adapter: Adapter, m: LoraModule, weight: str, proj: Any) -> None:
    d_out = getattr(proj, "d_out", None)
    d_in = getattr(proj, "d_in", None)
    if (d_out is not None and d_out != m.d_out) or (d_in is not None and d_in != m.d_in):
        have = f"[{d_out}, {d_in}]" if d_in is not None else f"d_out {d_out}"
        raise AdapterError(
            f"adapter {adapter.path}: module {m.name} is [{m.d_out}, {m.d_in}] "
            f"(lora_B {m.key_b}) but weight {weight} is {have}",
            hint="The adapter belongs to another model; use the base/aligned pair it was made for.",
            path=adapter.path,
        )


def _vector_norm_pow2(t: torch.Tensor, e: int) -> float:
    """``||t * 2**e||_F`` for a normalised ``t``, without overflowing on the way."""
    import torch

    return _ldexp(float(torch.linalg.vector_norm(t)), e)


def _file(adapter: Adapter) -> Path:
    """The adapter's weights file (its directory for adapters built without one)."""
    return Path(getattr(adapter, "weights_path", adapter.path))


def _unreliable(adapter: Adapter, m: LoraModule, what: str) -> AdapterError:
    return AdapterError(
        f"adapter {_file(adapter)}: module {m.name}: {what}; its cosine cannot be "
        "computed reliably",
        hint="The adapter's lora_A/lora_B values are degenerate or crafted; retrain or re-save "
        "it (nothing was written).",
        path=_file(adapter),
    )


def _fit_problem(cast: torch.Tensor, x: torch.Tensor, dtype: str) -> str | None:
    """Why ``cast`` (= ``x`` in the adapter's dtype) cannot be written, or None when it fits."""
    import torch

    if not bool(torch.isfinite(cast).all()):
        big = float(x.abs().max()) if bool(torch.isfinite(x).all()) else math.inf
        limit = torch.finfo(cast.dtype).max
        return f"max |C B| = {big:.4g} does not fit {dtype} (largest finite value {limit:.6g})"
    return None


@dataclass
class _Loaded:
    """One module's checked and normalised ``B`` (float64 ``B / 2**eb``), ready for ``C @ B``."""

    adapter: Adapter
    module: LoraModule
    norm_v: float
    bn: torch.Tensor
    eb: int | None


def _load_module(adapter: Adapter, m: LoraModule, weight: str, proj: Any) -> _Loaded:
    """The checks that need no product (shape, ``||V||_F``) and ``B`` normalised by a power of
    two (:func:`_normalised`). A corrupt ``||V||_F`` (non-finite or negative) is a CacheError.
    """
    import torch

    from safelora_cli.errors import CacheError

    _check_shape(adapter, m, weight, proj)
    norm_v = float(getattr(proj, "norm_v", 0.0))
    if not (math.isfinite(norm_v) and norm_v >= 0.0):
        raise CacheError(
            f"the projector of {weight} records ||V||_F = {norm_v!r} (module {m.name} of "
            f"{_file(adapter)})",
            hint="The cache is corrupt: rebuild it with safelora compute-projections.",
        )
    bn, eb = _normalised(adapter.load_b(m, dtype=torch.float64))
    return _Loaded(adapter, m, norm_v, bn, eb)


def _apply_all(proj: Any, bns: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[C @ B_k]`` through ``proj.apply_many`` (one pass over the projector for the whole
    batch, each result independent of the batch) or, for a projector-like object without it,
    ``proj.apply`` per ``B``."""
    many = getattr(proj, "apply_many", None)
    if many is not None:
        return list(many(bns))
    return [proj.apply(bn) for bn in bns]


def _finish_module(ld: _Loaded, weight: str, proj: Any, cb: torch.Tensor) -> _Pending:
    """One module's cosine, ||dW||, C B (cast) and Pdst terms, all scale-safe (float64).

    ``cb`` is ``C @ ld.bn``. A and B are normalised by powers of two before any product
    (:func:`_normalised`), so stored magnitudes anywhere in the float range give the same cosine
    as the same update at ordinary scale (bit for bit when nothing over/underflows). Fails
    closed: a non-finite projector (corrupt cache) is a CacheError, a cancelling ``B A`` or an
    update too large for float64 an AdapterError, never a silent "untrained" or a NaN cosine.
    """
    import torch

    from safelora_cli.errors import CacheError
    from safelora_cli.reader import torch_dtype

    adapter, m, norm_v, bn, eb = ld.adapter, ld.module, ld.norm_v, ld.bn, ld.eb
    an, ea = _normalised(adapter.load_a(m, dtype=torch.float64))
    xn = cb.to(device="cpu", dtype=torch.float64)  # C (B / 2**eb)
    if not bool(torch.isfinite(xn).all()):
        raise CacheError(
            f"the projector of {weight} contains NaN or Inf (C B is not finite for module "
            f"{m.name} of {_file(adapter)})",
            hint="The cache entry or the checkpoints are corrupt: rebuild the cache with "
            "safelora compute-projections.",
        )
    cos = None
    degenerate = None
    norm_dw = 0.0
    if eb is None or ea is None:
        degenerate = REASON_UNTRAINED  # B == 0 or A == 0 exactly: no update at all
    else:
        xs, ex = _normalised(xn)
        inner, nx, nb = _traces(xs if ex is not None else xn, bn, an)
        # Rounding in tr(B^T B A A^T) is bounded by eps (sum_k ||b_k|| ||a_k||)^2; compare
        # ||B A||^2 with that, not with ||B||^2 ||A||^2 (a zero column of B weighs nothing).
        bound = (
            float((torch.linalg.vector_norm(bn, dim=0) * torch.linalg.vector_norm(an, dim=1)).sum())
            ** 2
        )
        norm_dw = _ldexp(abs(m.scale) * math.sqrt(max(nb, 0.0)), eb + ea)
        if not math.isfinite(norm_dw):
            raise _unreliable(adapter, m, "||s B A||_F exceeds the float64 range")
        if getattr(proj, "degenerate", False):
            degenerate = REASON_NO_SIGNAL.format(weight=weight)
        elif not nb > RELIABLE_NB * bound:
            rel = math.sqrt(max(nb, 0.0) / bound) if bound > 0 else 0.0
            raise _unreliable(
                adapter,
                m,
                f"B A cancels or underflows to {rel:.2g} of sum_k ||b_k|| ||a_k|| (entries far "
                "apart in magnitude?)",
            )
        else:
            # ||C B|| <= ||C||_2 ||B|| <= tr(C) ||B|| = ||V||_F ||B||: below float64's precision
            # of that bound (the precision C B is formed in) C B is rounding noise, i.e. zero.
            # (float64 eps is what this test has used since it was written: the projector was
            # then upcast to float64 before it reached here.)
            eps = _EPS64
            if (
                ex is None
                or not float(torch.linalg.vector_norm(xn))
                > eps * norm_v * math.sqrt(float((bn * bn).sum()))
                or not nx > 0.0
            ):
                degenerate = REASON_ORTHOGONAL
            else:
                cos = inner / (math.sqrt(nx) * math.sqrt(nb))
                if not math.isfinite(cos):
                    raise _unreliable(adapter, m, "the cosine is not a finite number")
                cos = max(-1.0, min(1.0, cos))
    e = eb if eb is not None else 0
    x = scale_pow2(xn, e) if e else xn  # C B at the stored scale (inf where it overflows)
    cast = x.to(torch_dtype(m.dtype)).contiguous()
    unfit = _fit_problem(cast, x, m.dtype)
    dist_keep = _vector_norm_pow2(bn - xn, e)
    if unfit is None and bool(torch.isfinite(x).all()):
        dist_proj = float(torch.linalg.vector_norm(cast.to(torch.float64) - x))
    else:
        dist_proj = math.inf
    return _Pending(
        module=m,
        weight=weight,
        cosine=cos,
        norm_dw=norm_dw,
        norm_v=norm_v,
        projected_b=cast,
        dist_keep=dist_keep,
        dist_proj=dist_proj,
        degenerate=degenerate,
        unfit=unfit,
    )


def _score_group(
    adapters: Sequence[Adapter],
    group: list[tuple[int, LoraModule]],
    weight: str,
    proj: Any,
    pending: list[dict[str, _Pending]],
) -> None:
    """Score every module that shares ``proj``: one ``proj.apply_many`` over all their ``B``.

    The projector is read once per pass for the whole group, a float64 row block at a time
    (:meth:`safelora_cli.projector.Projector.apply_many`); each adapter's ``C @ B`` is still
    its own product with the same shapes as alone, so results are bit-identical however
    adapters are batched (or split across ranks). Every check of :func:`_load_module` runs for
    every module before the product, every check of :func:`_finish_module` after it, in the
    group's order. Memory: the projector plus each module's ``B`` and ``C B`` (``d_out x r``).
    """
    loaded = [_load_module(adapters[i], m, weight, proj) for i, m in group]
    cbs = _apply_all(proj, [ld.bn for ld in loaded])
    for (i, m), ld, cb in zip(group, loaded, cbs, strict=True):
        pending[i][m.name] = _finish_module(ld, weight, proj, cb)
    del loaded, cbs


def _report(
    adapter: Adapter, pending: list[_Pending], selection: Selection
) -> tuple[AdapterReport, dict[str, torch.Tensor]]:
    decision = select({p.module.name: p.cosine for p in pending}, selection)
    scores: list[ModuleScore] = []
    tensors: dict[str, torch.Tensor] = {}
    for p in pending:
        m = p.module
        chosen = m.name in decision.projected
        if chosen:
            reason = None
            assert p.projected_b is not None
            if p.unfit is not None:
                raise AdapterError(
                    f"adapter {_file(adapter)}: module {m.name}: the projected lora_B "
                    f"({m.key_b}): {p.unfit}",
                    hint=f"Nothing was written. Save the adapter in a wider dtype (float32) and "
                    f"patch that, or leave {m.name} unprojected (a higher threshold).",
                    path=_file(adapter),
                )
            tensors[m.key_b] = p.projected_b
        elif p.degenerate is not None:
            reason = p.degenerate
        elif decision.threshold is None:
            reason = REASON_NONE_SELECTED
        else:
            reason = REASON_ABOVE.format(cos=round_cosine(p.cosine or 0.0), t=decision.threshold)
        scores.append(
            ModuleScore(
                name=m.name,
                weight=p.weight,
                layer=layer_index(m.name),
                rank=m.rank,
                scale=m.scale,
                d_out=m.d_out,
                d_in=m.d_in,
                dtype=m.dtype,
                norm_dw=p.norm_dw,
                norm_v=p.norm_v,
                cosine=p.cosine,
                projected=chosen,
                reason=reason,
                dist=1.0 / (1.0 + (p.dist_proj if chosen else p.dist_keep)),
                key_b=m.key_b,
                note=m.note,
            )
        )
    report = AdapterReport(
        adapter=str(getattr(adapter.source, "arg", adapter.path)),
        path=str(Path(adapter.path).resolve()),
        selection=selection,
        decision=decision,
        modules=scores,
        skipped=list(adapter.skipped),
    )
    return report, tensors


def score_adapters(
    adapters: Sequence[Adapter],
    source: Any,
    selection: Selection,
    *,
    weight_for: Callable[[LoraModule], str] | None = None,
    progress: Progress | None = None,
) -> list[ScoredAdapter]:
    """Score (and prepare the projection of) every LoRA module of every adapter.

    ``source`` is a ``ProjectorSource`` (a projection cache or on-the-fly compute): its
    ``projectors(requests)`` yields one Projector per ``(weight, fan_in_fan_out)`` request, in
    order. Each distinct request is made once for the whole batch, in natural weight order.
    ``weight_for`` maps a LoraModule to its checkpoint weight name (default ``<module>.weight``).
    Raises AdapterError when a module's shape does not fit its weight.
    """
    wf = weight_for or _default_weight
    users: dict[tuple[str, bool], list[tuple[int, LoraModule]]] = {}
    for i, ad in enumerate(adapters):
        for m in ad.modules:
            users.setdefault((wf(m), bool(m.fan_in_fan_out)), []).append((i, m))
    requests = sorted(users, key=lambda r: (natural_key(r[0]), r[1]))
    pending: list[dict[str, _Pending]] = [{} for _ in adapters]
    if progress is not None:
        progress.start(len(requests), "projecting")
    stream: Any = None
    try:
        stream = iter(source.projectors(requests))
        for req in requests:
            proj = next(stream, None)
            if proj is None or getattr(proj, "weight", req[0]) != req[0]:
                got = "nothing" if proj is None else repr(getattr(proj, "weight", None))
                raise RuntimeError(f"projector source yielded {got} for {req[0]!r}")
            tensor = getattr(proj, "tensor", None)
            nbytes = int(tensor.numel() * tensor.element_size()) if tensor is not None else 0
            announce(progress, req[0])
            _score_group(adapters, users[req], req[0], proj, pending)
            del proj
            if progress is not None:
                progress.advance(1, nbytes)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stops a prefetching generator
        if progress is not None:
            progress.finish()
    out: list[ScoredAdapter] = []
    for i, ad in enumerate(adapters):
        ordered = [pending[i][m.name] for m in ad.modules]
        report, tensors = _report(ad, ordered, selection)
        out.append(ScoredAdapter(adapter=ad, report=report, tensors=tensors))
    return out


# ----------------------------------------------------------------------------- full fine-tunes

REASON_NOT_FINETUNED = "not fine-tuned: dW = W_ft - W_aligned is zero for {weight}"
REASON_UPDATE_ORTHOGONAL = "C dW is zero: the update is orthogonal to the alignment subspace"


def update_cosine(sums: UpdateSums) -> float | None:
    """``cos = <C dW, dW>_F / (||C dW||_F ||dW||_F)`` from float64 sums, or None when either
    norm is zero (never a division by zero). Clamped to [-1, 1].

    ``sums`` comes from :func:`safelora_cli.projector.update_sums`: the products of
    ``D = dW / max|dW|``, so the cosine (independent of that scale) is formed from numbers of
    order one whatever the weights' magnitudes. ValueError on NaN/Inf sums.
    """
    vals = (sums.inner, sums.cd_sq, sums.d_sq)
    if not all(math.isfinite(v) for v in vals):
        raise ValueError("the update or its projection contains NaN or Inf")
    if not (sums.cd_sq > 0.0 and sums.d_sq > 0.0):
        return None
    cos = sums.inner / (math.sqrt(sums.cd_sq) * math.sqrt(sums.d_sq))
    return max(-1.0, min(1.0, cos))


def update_norm(sums: UpdateSums) -> float:
    """``||dW||_F`` from the sums (``sqrt(||D||^2) * max|dW|``, float64)."""
    return math.sqrt(max(sums.d_sq, 0.0)) * abs(sums.scale)
