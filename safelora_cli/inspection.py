"""``inspect``: summaries of adapters, of projection caches, and of adapters against projectors.

The library half of ``safelora inspect`` (DESIGN §6). It returns plain data (dataclasses with a
``to_json``); the CLI (``safelora_cli/commands/inspect.py``) renders it. Nothing here knows about
terminals, and the similarity math is not reimplemented: cosines, the selection and Pdst come
from :func:`safelora_cli.scoring.score_adapters`, the same code ``patch`` uses.

Public API::

    summarize_adapter(arg, *, revision=None) -> AdapterSummary
        what an adapter holds: LoRA modules (projectable) and skipped entries with reasons.
    summarize_cache(path, *, progress=None) -> CacheSummary
        sources, tool version, per weight shape/representation/||V||_F/stable rank, size on disk.
    stable_rank(kind, tensor, norm_v) -> tuple[float | None, float | None]
        (sigma_max(V)^2, ||V||_F^2 / sigma_max(V)^2) from a cached gram C or factor F, float64.
    score(adapters, selection, *, projections | base + aligned, ...) -> list[AdapterReport]
        what patch --dry-run computes, through patch's own source/mapping and scoring code.
    gate(reports, threshold) -> GateResult
        the ``--fail-below`` CI gate: which defined cosines lie below ``threshold``.
    order_modules(modules, sort, top=None) -> tuple[list, int]
        table rows in ``layer`` or ``cosine`` order, optionally only the ``top`` lowest cosines.
    split_name(name) -> tuple[int | None, str]
        ``model.layers.3.mlp.up_proj`` -> ``(3, "mlp.up_proj")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from safelora_cli.errors import CacheError, UsageError
from safelora_cli.naming import layer_index, natural_key
from safelora_cli.selection import Selection, round_cosine

if TYPE_CHECKING:
    import torch

    from safelora_cli.progress import Progress
    from safelora_cli.scoring import AdapterReport

SortKey = Literal["layer", "cosine"]
SORT_KEYS: tuple[str, ...] = ("layer", "cosine")

# Above this size the top eigenvalue comes from Lanczos instead of a dense eigensolver: a dense
# float64 eigvalsh of a 4096 x 4096 gram costs tens of seconds on a laptop-class CPU, and a 7B
# cache holds up to 224 of them.
DENSE_LIMIT = 512


# ----------------------------------------------------------------------------- names


def split_name(name: str) -> tuple[int | None, str]:
    """A module path as (layer, the rest after the layer index); (None, name) without a layer.

    ``model.layers.3.self_attn.q_proj`` -> ``(3, "self_attn.q_proj")``;
    ``transformer.h.0.attn.c_attn`` -> ``(0, "attn.c_attn")``.
    """
    layer = layer_index(name)
    if layer is None:
        return None, name
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p == str(layer):
            rest = ".".join(parts[i + 1 :])
            return layer, rest or name
    return layer, name


# ----------------------------------------------------------------------------- adapter alone


@dataclass(frozen=True)
class AdapterModuleSummary:
    """One LoRA module of an adapter: it can be projected once a projector is given."""

    name: str  # base-model module path
    layer: int | None
    rank: int
    alpha: float
    scale: float  # alpha / r (or alpha / sqrt(r) with rsLoRA), patterns applied
    d_out: int
    d_in: int
    dtype: str  # lora_B's safetensors dtype code
    fan_in_fan_out: bool
    note: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "rank": self.rank,
            "alpha": self.alpha,
            "scale": self.scale,
            "shape": [self.d_out, self.d_in],
            "dtype": self.dtype,
            "fan_in_fan_out": self.fan_in_fan_out,
            "note": self.note,
        }


@dataclass(frozen=True)
class SkippedSummary:
    """Adapter tensors that patch carries over unchanged, and why."""

    name: str
    keys: tuple[str, ...]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "keys": list(self.keys), "reason": self.reason}


@dataclass(frozen=True)
class AdapterSummary:
    """What an adapter holds (``inspect ADAPTER`` without projectors)."""

    adapter: str  # the argument as given
    path: Path  # resolved adapter directory
    weights_file: str  # adapter_model.safetensors (or the legacy .bin)
    base_model: str | None  # adapter_config.json base_model_name_or_path
    r: int | None
    lora_alpha: float | None
    use_rslora: bool
    target_modules: Any
    modules: list[AdapterModuleSummary]
    skipped: list[SkippedSummary]

    @property
    def dtypes(self) -> list[str]:
        """The distinct lora_B dtypes, in first-seen order."""
        return list(dict.fromkeys(m.dtype for m in self.modules))

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "path": str(self.path),
            "weights_file": self.weights_file,
            "base_model": self.base_model,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "target_modules": self.target_modules,
            "projectable": len(self.modules),
            "skipped": [s.to_json() for s in self.skipped],
            "modules": [m.to_json() for m in self.modules],
        }


def summarize_adapter(arg: str | Path, *, revision: str | None = None) -> AdapterSummary:
    """Read an adapter's config and tensor headers (no tensor data) and describe its modules.

    Raises AdapterError (via :func:`safelora_cli.adapter.load_adapter`) for what would be
    refused outright.
    """
    from safelora_cli.adapter import load_adapter

    ad = load_adapter(arg, revision=revision)
    try:
        cfg = ad.config or {}
        modules = [
            AdapterModuleSummary(
                name=m.name,
                layer=layer_index(m.name),
                rank=int(m.rank),
                alpha=float(m.alpha),
                scale=float(m.scale),
                d_out=int(m.d_out),
                d_in=int(m.d_in),
                dtype=str(m.dtype),
                fan_in_fan_out=bool(m.fan_in_fan_out),
                note=m.note,
            )
            for m in ad.modules
        ]
        skipped = [SkippedSummary(s.name, tuple(s.keys), s.reason) for s in ad.skipped]
        alpha = cfg.get("lora_alpha")
        return AdapterSummary(
            adapter=str(arg),
            path=Path(ad.path),
            weights_file=Path(ad.weights_path).name,
            base_model=cfg.get("base_model_name_or_path"),
            r=cfg.get("r"),
            lora_alpha=float(alpha) if alpha is not None else None,
            use_rslora=bool(cfg.get("use_rslora", False)),
            target_modules=cfg.get("target_modules"),
            modules=sorted(modules, key=lambda m: natural_key(m.name)),
            skipped=sorted(skipped, key=lambda s: natural_key(s.name)),
        )
    finally:
        ad.close()


# ----------------------------------------------------------------------------- cache alone


@dataclass(frozen=True)
class WeightSummary:
    """One cached projector.

    ``d_out x d_in`` is the weight in linear orientation; ``shape`` is the stored tensor
    (gram ``C``: ``d_out x d_out``; factor ``F``: ``d_out x d_in``). ``stable_rank`` is
    ``||V||_F^2 / sigma_max(V)^2`` (1 for a rank-1 ``V``, ``min(d_out, d_in)`` at most);
    None when ``V == 0``.
    """

    weight: str
    kind: str
    d_out: int
    d_in: int
    shape: tuple[int, ...]
    dtype: str
    norm_v: float
    sigma_max_sq: float | None
    stable_rank: float | None
    fan_in_fan_out: bool
    file: str

    def to_json(self) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "kind": self.kind,
            "shape": [self.d_out, self.d_in],
            "stored_shape": list(self.shape),
            "dtype": self.dtype,
            "norm_v": self.norm_v,
            "stable_rank": self.stable_rank,
            "fan_in_fan_out": self.fan_in_fan_out,
            "file": self.file,
        }


@dataclass(frozen=True)
class CacheSummary:
    """What a projection cache holds (``inspect -p CACHE``)."""

    path: Path
    tool_version: str | None
    format_version: Any
    projector: str | None  # the manifest's projector kind
    dtype: str  # stored dtype (safetensors code)
    complete: bool  # False: a compute-projections run was interrupted (resumable)
    sources: dict[str, Any]  # role ("base", "aligned") -> SourceSpec JSON
    weights: list[WeightSummary]
    size_bytes: int  # manifest plus entry files

    def to_json(self) -> dict[str, Any]:
        return {
            "cache": str(self.path),
            "tool_version": self.tool_version,
            "format_version": self.format_version,
            "projector": self.projector,
            "dtype": self.dtype,
            "complete": self.complete,
            "sources": self.sources,
            "count": len(self.weights),
            "size_bytes": self.size_bytes,
            "weights": [w.to_json() for w in self.weights],
        }


def _lambda_max_psd(
    apply: Callable[[torch.Tensor], torch.Tensor], n: int, *, max_iter: int = 500
) -> float:
    """Largest eigenvalue of a symmetric PSD ``n x n`` operator given as ``x -> A @ x`` (float64).

    Lanczos with full reorthogonalisation from a fixed random start. It stops when the top Ritz
    pair's residual is below 1e-9 of the eigenvalue (so the eigenvalue is that close, and in
    practice far closer: the error shrinks with the residual squared), when the Krylov space
    is invariant, or when the Ritz value stops moving at float64 precision. Ritz values never
    exceed the true eigenvalue. About a hundred products suffice even for slowly decaying
    spectra, where plain power iteration needs thousands.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, generator=g, dtype=torch.float64)
    q /= torch.linalg.vector_norm(q)
    basis = torch.empty(n, min(max_iter, n) + 1, dtype=torch.float64)
    basis[:, 0] = q
    alphas: list[float] = []
    betas: list[float] = []
    lam, prev, still = 0.0, -1.0, 0
    for j in range(min(max_iter, n)):
        w = apply(basis[:, j])
        alphas.append(float(w @ basis[:, j]))
        qj = basis[:, : j + 1]
        # Twice is enough (Kahan): keeps the basis orthogonal to working precision.
        w -= qj @ (qj.T @ w)
        w -= qj @ (qj.T @ w)
        beta = float(torch.linalg.vector_norm(w))
        last = j + 1 == min(max_iter, n) or beta <= 1e-14 * max(abs(a) for a in alphas)
        if j % 4 != 3 and not last:
            # The small eigensolve is cheap in flops but not in latency on a busy machine
            # (thread pools spin); every 4th step is often enough to stop within a few steps.
            betas.append(beta)
            basis[:, j + 1] = w / beta
            continue
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        lam = float(evals[-1])
        if lam <= 0.0:
            return 0.0
        residual = beta * abs(float(evecs[-1, -1]))
        still = still + 1 if abs(lam - prev) <= 1e-15 * lam else 0
        if last or residual <= 1e-9 * lam or beta <= 1e-14 * lam or still >= 2:
            break
        prev = lam
        betas.append(beta)
        basis[:, j + 1] = w / beta
    return lam


def stable_rank(
    kind: str, tensor: torch.Tensor, norm_v: float, *, dense_limit: int = DENSE_LIMIT
) -> tuple[float | None, float | None]:
    """``(sigma_max(V)^2, ||V||_F^2 / sigma_max(V)^2)`` from one cached projector, in float64.

    ``kind == "gram"``: ``tensor`` is ``C = V V^T / ||V||_F`` (d_out x d_out), so
    ``sigma_max(V)^2 = lambda_max(C) * ||V||_F``. ``kind == "factor"``: ``tensor`` is
    ``F = V / sqrt(||V||_F)`` (d_out x d_in), so ``sigma_max(V)^2 = sigma_max(F)^2 * ||V||_F``.
    The stable rank is taken as ``tr(C) / lambda_max(C)`` (gram) or
    ``||F||_F^2 / sigma_max(F)^2`` (factor): the same number, ``||V||_F`` cancels, so it does
    not depend on the accuracy of the recorded ``norm_v``. Returns ``(None, None)`` when
    ``V == 0``. Matrices with more than ``dense_limit`` rows and columns use Lanczos
    (:func:`_lambda_max_psd`); smaller ones a dense eigensolver.
    """
    import torch

    if not norm_v or norm_v <= 0.0 or not math.isfinite(norm_v):
        return None, None
    t = tensor.detach().to("cpu", torch.float64)
    if kind == "gram":
        n = t.shape[0]
        if n <= dense_limit:
            lam = float(torch.linalg.eigvalsh((t + t.T) / 2).max())
        else:
            lam = _lambda_max_psd(lambda x: t @ x, n)
        mass = float(torch.diagonal(t).sum())  # tr(C) = ||V||_F^2 / ||V||_F
    elif kind == "factor":
        small = min(t.shape)
        if small <= dense_limit:
            lam = float(torch.linalg.svdvals(t)[0]) ** 2
        elif t.shape[1] <= t.shape[0]:
            lam = _lambda_max_psd(lambda x: t.T @ (t @ x), t.shape[1])
        else:
            lam = _lambda_max_psd(lambda x: t @ (t.T @ x), t.shape[0])
        mass = float((t * t).sum())  # ||F||_F^2 = ||V||_F^2 / ||V||_F
    else:
        raise CacheError(
            f"unknown projector representation {kind!r} in the cache.",
            hint="Rebuild the cache with this version of safelora compute-projections.",
        )
    if lam <= 0.0 or mass <= 0.0:
        return None, None
    return lam * float(norm_v), mass / lam


def summarize_cache(path: str | Path, *, progress: Progress | None = None) -> CacheSummary:
    """Describe a projection cache, reading one cached tensor at a time (float64 math).

    An incomplete cache (interrupted compute run) is shown too, marked by ``complete``.
    Raises CacheError for a missing or corrupt cache (via ``ProjectionCache.open``).
    """
    from safelora_cli.cache import ProjectionCache

    cache = ProjectionCache.open(Path(path), allow_incomplete=True)
    try:
        manifest = cache.manifest
        names = cache.weights()
        if progress is not None:
            progress.start(len(names), "reading projectors")
        weights: list[WeightSummary] = []
        try:
            for name in names:
                e = cache.entry(name)
                proj = cache.get(name, fan_in_fan_out=e.fan_in_fan_out)
                finite = bool(proj.tensor.isfinite().all())
                sigma_sq, srank = (
                    stable_rank(e.kind, proj.tensor, e.norm_v) if finite else (math.nan, None)
                )
                if any(x is not None and not math.isfinite(x) for x in (sigma_sq, srank)):
                    # NaN/Inf in the entry: say so rather than print a NaN (or invalid JSON).
                    raise CacheError(
                        f"projection cache {path}: the projector of {name} ({e.file}) contains "
                        "NaN or Inf",
                        hint="The cache is damaged: delete it and run safelora "
                        "compute-projections again.",
                        path=path,
                    )
                weights.append(
                    WeightSummary(
                        weight=name,
                        kind=e.kind,
                        d_out=e.d_out,
                        d_in=e.d_in,
                        shape=tuple(e.shape),
                        dtype=e.dtype,
                        norm_v=e.norm_v,
                        sigma_max_sq=sigma_sq,
                        stable_rank=srank,
                        fan_in_fan_out=e.fan_in_fan_out,
                        file=e.file,
                    )
                )
                del proj
                if progress is not None:
                    progress.advance(1, e.nbytes)
        finally:
            if progress is not None:
                progress.finish()
        return CacheSummary(
            path=Path(path),
            tool_version=manifest.get("tool_version"),
            format_version=manifest.get("format_version"),
            projector=manifest.get("projector"),
            dtype=cache.dtype,
            complete=cache.complete,
            sources=cache.sources,
            weights=weights,
            size_bytes=cache.size_bytes(),
        )
    finally:
        cache.close()


# ------------------------------------------------------------------------ adapter vs projectors


def score(
    adapters: Sequence[str],
    selection: Selection,
    *,
    projections: Path | None = None,
    base: str | None = None,
    aligned: str | None = None,
    device: str = "auto",
    revision_base: str | None = None,
    revision_aligned: str | None = None,
    progress: Progress | None = None,
    download: str = "ranged",
    representation: str = "auto",
) -> list[AdapterReport]:
    """Score each adapter against a cache (``projections``) or ``base`` + ``aligned``.

    Exactly what ``patch --dry-run`` computes, through the same code: the same flag checks,
    adapter loading, module-to-weight mapping and projector source as
    :func:`safelora_cli.patch.patch_adapters`, and :func:`safelora_cli.scoring.score_adapters`
    for cosines, selection and Pdst. Nothing is written. Returns one AdapterReport per adapter
    in argument order (``output`` None, ``sources`` set), as
    :class:`~safelora_cli.projector_source.AdapterReports` (what was fetched from the Hub by
    byte ranges, too); ``to_json()`` is the ``patch --json`` schema.
    Raises UsageError for flag combinations patch refuses, and the inputs' errors.
    """
    # The same checks and source as patch: inspect must see the weights patch would use.
    from safelora_cli.adapter import load_adapters
    from safelora_cli.projector_source import (
        AdapterReports,
        check_flags,
        open_projector_source,
        source_transfer,
    )
    from safelora_cli.scoring import score_adapters

    check_flags(adapters, projections, base, aligned, revision_base, revision_aligned, None)
    loaded = load_adapters(adapters)
    try:
        with open_projector_source(
            loaded,
            adapters,
            projections=Path(projections) if projections is not None else None,
            base=base,
            aligned=aligned,
            device=device,
            revision_base=revision_base,
            revision_aligned=revision_aligned,
            save_projections=None,
            download=download,
            representation=representation,
            progress=progress,
        ) as (source, weight_for, sources):
            scored = score_adapters(
                loaded, source, selection, weight_for=weight_for, progress=progress
            )
        for s in scored:
            s.report.sources = sources
        return AdapterReports((s.report for s in scored), source_transfer(source))
    finally:
        for ad in loaded:
            ad.close()


@dataclass(frozen=True)
class GateFailure:
    """A module whose (rounded) cosine lies below the gate, or (``cosine`` None) that could
    not be scored although it has an update and an alignment signal (the gate fails closed)."""

    adapter: str
    name: str
    cosine: float | None

    def text(self) -> str:
        return (
            f"{self.name} {self.cosine:.5f}"
            if self.cosine is not None
            else (f"{self.name} (no cosine: C B A = 0)")
        )


@dataclass(frozen=True)
class GateResult:
    """Outcome of ``--fail-below T``: ``failures`` sorted worst (unscored, then lowest cosine)
    first."""

    threshold: float
    failures: list[GateFailure]
    checked: int  # modules with a defined cosine, plus the unscored ones that fail

    @property
    def passed(self) -> bool:
        return not self.failures

    def message(self, worst: int = 3) -> str:
        """One line naming the worst modules (with several adapters: the worst of each)."""
        head = (
            f"{len(self.failures)} of {self.checked} modules have a cosine below {self.threshold:g}"
        )
        unscored = sum(1 for f in self.failures if f.cosine is None)
        if unscored:
            head += f" or none ({unscored} orthogonal to the alignment subspace)"
        adapters = list(dict.fromkeys(f.adapter for f in self.failures))
        if len(adapters) <= 1:
            shown = ", ".join(f.text() for f in self.failures[:worst])
            more = len(self.failures) - worst
            tail = f" (+{more} more)" if more > 0 else ""
            where = f" in {adapters[0]}" if adapters and adapters[0] else ""
            return f"{head}{where}; lowest: {shown}{tail}"
        per = []
        for a in adapters[:worst]:
            mine = [f for f in self.failures if f.adapter == a]
            per.append(f"{a}: {mine[0].text()} ({len(mine)} below)")
        more = len(adapters) - worst
        tail = f" (+{more} more adapters)" if more > 0 else ""
        return f"{head} in {len(adapters)} adapters; lowest: {'; '.join(per)}{tail}"


def gate(reports: Sequence[Any], threshold: float) -> GateResult:
    """Which defined cosines lie strictly below ``threshold`` (cosines rounded to 5 decimals,
    as the selection and the tables use them).

    Fails closed: a module without a cosine because ``C B A = 0`` (an update the projector
    maps to nothing: orthogonal to the alignment subspace, the worst case) fails too. Only the
    two undefined cases that are facts about the inputs pass: ``B A = 0`` (no update at all)
    and ``V = 0`` (the alignment did not touch the weight). Modules whose numbers cannot be
    trusted never reach here: scoring raises an error for them.
    """
    from safelora_cli.scoring import REASON_ORTHOGONAL, REASON_UPDATE_ORTHOGONAL

    # Full fine-tunes (patch-model) have their own spelling of C dW = 0: it fails alike.
    orthogonal = (REASON_ORTHOGONAL, REASON_UPDATE_ORTHOGONAL)

    failures: list[GateFailure] = []
    checked = 0
    for rep in reports:
        label = str(getattr(rep, "adapter", ""))
        for m in rep.modules:
            if m.cosine is None:
                if getattr(m, "reason", None) in orthogonal:
                    checked += 1
                    failures.append(GateFailure(label, m.name, None))
                continue
            checked += 1
            c = round_cosine(m.cosine)
            if not (c >= threshold):  # NaN fails too
                failures.append(GateFailure(label, m.name, c))
    failures.sort(
        key=lambda f: (
            f.cosine is not None,
            f.cosine if f.cosine is not None else 0.0,
            natural_key(f.adapter),
            natural_key(f.name),
        )
    )
    return GateResult(float(threshold), failures, checked)


def validate_sort(sort: str | None) -> SortKey | None:
    """``--sort`` value check (UsageError, exit 2, otherwise)."""
    if sort is None:
        return None
    s = sort.strip().lower()
    if s not in SORT_KEYS:
        raise UsageError(
            f"--sort must be layer or cosine, got {sort!r}.",
            hint="Use --sort layer (model order) or --sort cosine (lowest first).",
        )
    return s  # type: ignore[return-value]


def order_modules(
    modules: Sequence[Any], sort: SortKey = "layer", top: int | None = None
) -> tuple[list[Any], int]:
    """Rows to show and how many were left out.

    ``layer``: natural order of the module names (layer 10 after 9). ``cosine``: lowest
    (rounded) cosine first, ties in layer order, undefined cosines last. ``top``: only the
    ``top`` lowest defined cosines, shown in ``sort`` order.
    """
    by_layer = sorted(modules, key=lambda m: natural_key(m.name))
    if top is not None:
        ranked = sorted(
            (m for m in by_layer if m.cosine is not None), key=lambda m: round_cosine(m.cosine)
        )
        keep = {id(m) for m in ranked[:top]}
        rows = [m for m in by_layer if id(m) in keep]
    else:
        rows = by_layer
    if sort == "cosine":
        rows = sorted(
            rows,
            key=lambda m: (m.cosine is None, round_cosine(m.cosine) if m.cosine is not None else 0),
        )
    return rows, len(modules) - len(rows)


def short_reason(module: Any) -> str:
    """A few words for a table cell: ``yes``, or ``no: <why>`` (the full reason is in JSON).

    ``no: cos > t`` (above the threshold the selection implies), ``no: V = 0`` (no alignment
    signal), ``no: BA = 0`` (untrained LoRA), ``no: CBA = 0`` (update orthogonal to the
    alignment subspace), ``no: none`` (nothing selected).
    """
    from safelora_cli import scoring

    if module.projected:
        return "yes"
    reason = module.reason or ""
    if reason == scoring.REASON_UNTRAINED:
        return "no: BA = 0"
    if reason == scoring.REASON_ORTHOGONAL:
        return "no: CBA = 0"
    if reason == scoring.REASON_NONE_SELECTED:
        return "no: none"
    if reason == scoring.REASON_UPDATE_ORTHOGONAL:
        return "no: CdW = 0"
    if reason.startswith(scoring.REASON_NOT_FINETUNED.split("{", 1)[0]):
        return "no: dW = 0"
    if reason.startswith(scoring.REASON_NO_SIGNAL.split("{", 1)[0]):
        return "no: V = 0"
    if reason.startswith(scoring.REASON_ABOVE.split("{", 1)[0]):
        return "no: cos > t"
    return f"no: {reason}" if reason else "no"


def is_full_model_request(
    args: Sequence[str], *, projections: Path | None, aligned: str | None
) -> bool:
    """``inspect ARG ...`` is about a fully fine-tuned model, not an adapter.

    True when ARG is a local full-model checkpoint (safetensors weights, no
    ``adapter_config.json``), or when ``-p`` and ``--aligned`` are both given (the adapter form
    takes one or the other). A Hub id with ``--base``/``--aligned`` stays an adapter.
    """
    from safelora_cli.model_patch import is_local_model

    if not args:
        return False
    return is_local_model(args[0]) or (projections is not None and aligned is not None)
