"""The projection cache: a directory with ``manifest.json`` and one safetensors file per weight.

Format: see ``docs/cache-format.md`` (DESIGN §5). Contract used by patch, inspect and compute:

- :meth:`ProjectionCache.open` ``(path, *, device="cpu", adapters=(), allow_incomplete=False)``:
  read-only. CacheError on a missing directory, a corrupt manifest, an unknown format version
  or projector kind, or a cache marked *in progress* (a compute run was killed or is running;
  ``allow_incomplete=True`` lets ``inspect`` show it anyway). ``adapters`` only feeds the
  "add it with ..." hint of missing-entry errors.
- :meth:`ProjectionCache.create_or_resume` ``(path, base, aligned, *, dtype)``: writable.
  A fresh directory gets a manifest with zero entries and ``"state": "in_progress"`` before any
  compute (created in a temporary sibling, then renamed), so it is never half-written and
  unmarked. An existing cache is refused, with the difference said in words and both models
  named, when its recorded source fingerprints (``SourceSpec.fingerprint()``: content, not file
  times) or its dtype differ; when they match but the local files are not the very ones
  recorded, every entry's ``source_sha256`` (the source tensors' digests) is checked against
  ``readers`` first, so a byte-identical copy is accepted and other values are not. A non-empty
  directory that is not a cache is refused. One writer at a time: an exclusive ``flock`` on
  ``.<name>.safelora-lock`` beside the cache (the directory itself when its parent is
  read-only), taken before the manifest is read or the directory created; a second writer gets
  a CacheError naming the holder. The new directory is renamed into place without replacing
  anything; every file is written under a fresh ``O_EXCL|O_NOFOLLOW`` temporary name, so a
  symlink planted in the cache is never written through.
- ``sources`` (``{"base": ..., "aligned": ...}``: ``SourceSpec.to_json()``), ``dtype``
  (safetensors code), ``complete``, ``weights()`` (natural order), ``has(weight)``,
  ``entry(weight) -> CacheEntry``, ``size_bytes()``.
- ProjectorSource: ``get(weight, *, fan_in_fan_out=False) -> Projector`` and
  ``projectors(requests)`` read only the requested entries, each through
  :class:`safelora_cli.reader.CheckpointReader` (prefetching the next one). CacheError for a
  missing entry (naming the weight and the exact ``safelora compute-projections ... --adapter
  ...`` command that adds it) and when the stored orientation disagrees with the request.
  :meth:`require` checks a whole request list up front (patch: nothing written on error).
- :meth:`put` ``(projector) -> CacheEntry``: writes the entry's safetensors file to a temporary
  name, fsyncs, renames, then rewrites ``manifest.json`` atomically (temp + fsync + rename).
  An entry is complete on disk before the manifest names it, so a killed run leaves a cache
  whose manifest names only complete entries, marked in progress: it is *resumable*
  (``create_or_resume`` again). :meth:`finish` marks it complete.
- Multi-process runs (:mod:`safelora_cli.distributed`): rank 0 holds the lock and writes the
  manifest. Every other rank writes through :meth:`ProjectionCache.worker`: its :meth:`put`
  writes the entry file, then records the entry in the rank's *journal*
  (``.journal-<rank>.json``, atomic) instead of the manifest. At the end rank 0 names them in
  the manifest with :meth:`adopt` (only entries whose file is on disk with the recorded shape
  and dtype) and deletes the journals. A killed multi-process run leaves journals behind;
  :meth:`create_or_resume` adopts their verified entries, so nothing finished is recomputed.
- Determinism: no timestamps anywhere; manifest keys and entries are sorted (entries in natural
  order); numbers are written with ``repr`` (exact round trip). The same inputs give
  byte-identical caches, whether built in one run or resumed.

Torch is imported lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shlex
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safelora_cli import __version__, fsio
from safelora_cli.errors import CacheError, CheckpointError
from safelora_cli.fsio import fsync_dir
from safelora_cli.naming import natural_key, natural_sorted
from safelora_cli.projector import KINDS, PROJECTOR_KIND, Projector, prefetched, stored_shape
from safelora_cli.reader import (
    DTYPE_SIZES,
    MAX_JSON_BYTES,
    CheckpointReader,
    dtype_code,
    torch_dtype,
)

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "safelora-projection-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IN_PROGRESS, COMPLETE = "in_progress", "complete"
FLOAT_CODES = ("F32", "F64", "F16", "BF16")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"
_JOURNAL_PREFIX = ".journal-"


@dataclass(frozen=True)
class CacheEntry:
    """One cached projector: where it is and what it is.

    ``shape`` is the stored tensor's shape (``[d_out, d_out]`` gram, ``[d_out, d_in]`` factor);
    ``d_out``/``d_in`` are the weight's linear-orientation dims; ``dtype`` a safetensors code.
    """

    weight: str
    file: str
    kind: str
    d_out: int
    d_in: int
    dtype: str
    norm_v: float
    fan_in_fan_out: bool
    shape: tuple[int, ...]
    # SHA-256 of the base and aligned tensors' stored bytes when the entry was computed (None
    # in entries of older caches): what identifies the source weights by content.
    source_sha256: tuple[str, str] | None = None

    @property
    def degenerate(self) -> bool:
        return self.norm_v == 0.0

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.file,
            "representation": self.kind,
            "shape": list(self.shape),
            "d_out": self.d_out,
            "d_in": self.d_in,
            "dtype": self.dtype,
            "norm_v": self.norm_v,
            "fan_in_fan_out": self.fan_in_fan_out,
        }
        if self.source_sha256 is not None:
            out["source_sha256"] = dict(zip(("base", "aligned"), self.source_sha256, strict=True))
        return out


def entry_file_name(weight: str) -> str:
    """The entry's file name: ``<weight>.safetensors``, or a sanitised name + hash if needed."""
    if _SAFE_NAME.fullmatch(weight) and not weight.startswith(".") and len(weight) <= 200:
        return f"{weight}.safetensors"
    safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", weight).lstrip(".")[:150]
    digest = hashlib.sha256(weight.encode()).hexdigest()[:12]
    return f"{safe}-{digest}.safetensors"


def _corrupt(path: Path, what: str) -> CacheError:
    return CacheError(
        f"projection cache {path}: {what}",
        hint="the cache is damaged; delete it and run safelora compute-projections again",
        path=path,
    )


def _entry_from_json(weight: Any, d: Any, root: Path) -> CacheEntry:
    mp = root / MANIFEST
    if not isinstance(weight, str) or not isinstance(d, dict):
        raise _corrupt(mp, f"malformed entry {weight!r}")
    try:
        file, kind, dtype = d["file"], d["representation"], d["dtype"]
        d_out, d_in, norm_v, fifo = d["d_out"], d["d_in"], d["norm_v"], d["fan_in_fan_out"]
        shape = tuple(d["shape"])
    except (KeyError, TypeError):
        raise _corrupt(mp, f"entry {weight!r} lacks required fields") from None
    ok = (
        isinstance(file, str)
        and _SAFE_NAME.fullmatch(file) is not None
        and file.endswith(".safetensors")
        and not file.startswith(".")
        and kind in KINDS
        and dtype in FLOAT_CODES
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (d_out, d_in))
        and isinstance(norm_v, (int, float))
        and not isinstance(norm_v, bool)
        and math.isfinite(norm_v)
        and norm_v >= 0
        and isinstance(fifo, bool)
        and shape == stored_shape(kind, d_out, d_in)
    )
    digests = d.get("source_sha256")
    if digests is not None:
        ok = ok and (
            isinstance(digests, dict)
            and set(digests) == {"base", "aligned"}
            and all(isinstance(x, str) and _SHA256.fullmatch(x) for x in digests.values())
        )
    if not ok:
        raise _corrupt(mp, f"entry {weight!r} is inconsistent ({d})")
    sha = (digests["base"], digests["aligned"]) if digests is not None else None
    return CacheEntry(weight, file, kind, d_out, d_in, dtype, float(norm_v), fifo, shape, sha)


def entry_mismatch(e: CacheEntry, r: CheckpointReader) -> str | None:
    """Why the entry file open in ``r`` is not the entry ``e`` the manifest names, or None.

    The file must hold exactly one tensor, named ``e.weight``, with the manifest's shape and
    dtype, and its own metadata (written by :meth:`ProjectionCache.put`) must agree on the
    weight, projector kind, representation, orientation (``fan_in_fan_out``) and ``norm_v``:
    an entry file swapped, copied from another weight or another cache, or edited, is caught
    before it is used.
    """
    names = r.names()
    if names != [e.weight]:
        shown = ", ".join(repr(n) for n in names[:3]) or "no tensor"
        return f"the file holds {shown}, not {e.weight!r}"
    ti = r.info(e.weight)
    if ti.shape != e.shape or ti.dtype != e.dtype:
        return (
            f"it is stored as {ti.dtype} {list(ti.shape)} but the manifest says "
            f"{e.dtype} {list(e.shape)}"
        )
    meta = r.metadata()
    want = {
        "safelora.weight": e.weight,
        "safelora.projector": PROJECTOR_KIND,
        "safelora.representation": e.kind,
        "safelora.fan_in_fan_out": "true" if e.fan_in_fan_out else "false",
    }
    for k, v in want.items():
        if meta.get(k) != v:
            return f"its metadata has {k}={meta.get(k)!r}, the manifest {v!r}"
    try:
        norm_v = float(meta.get("safelora.norm_v", "nan"))
    except ValueError:
        norm_v = math.nan
    if norm_v != e.norm_v:
        got = meta.get("safelora.norm_v")
        return f"its metadata has safelora.norm_v={got!r}, the manifest {e.norm_v!r}"
    return None


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def _write_atomic(
    path: Path,
    chunks: Iterable[bytes | memoryview],
    *,
    sync_dir: bool = True,
    written: Callable[[], None] | None = None,
) -> int:
    """Write ``chunks`` to a temporary sibling, fsync, rename over ``path``. Returns bytes.

    ``sync_dir=False`` leaves the directory fsync to a later write in the same directory (an
    entry file's rename is made durable by the manifest write that follows it; a resumed run
    also drops entries whose file did not survive). ``written`` is called once every chunk is
    in the kernel's hands, before the fsync (the chunks' memory may be reused from then on).
    """
    # A fresh name, created O_EXCL|O_NOFOLLOW: a symlink planted at a temporary (or any other)
    # name in the cache is never written through; the rename then replaces a planted link at
    # ``path`` itself rather than following it.
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    n = 0
    try:
        with os.fdopen(fsio.create_new(tmp), "wb") as fh:
            for c in chunks:
                fh.write(c)
                n += len(c) if isinstance(c, bytes) else c.nbytes
            fh.flush()
            if written is not None:
                written()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return n


def _once(fn: Callable[[], None] | None) -> Callable[[], None]:
    """``fn`` callable any number of times, run on the first call only (None: a no-op)."""
    done = fn is None

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            fn()  # type: ignore[misc]

    return call


def _make_parents(p: Path) -> None:
    """Create ``p``'s missing parents; CacheError when one of them is a file."""
    anc = p.parent
    while not (anc.exists() or anc.is_symlink()) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise CacheError(
            f"cache path {p}: {anc} is a file, not a directory",
            hint="choose an -o whose parent directories are directories",
            path=p,
        )
    p.parent.mkdir(parents=True, exist_ok=True)


def _clean_stale_tmp(p: Path) -> None:
    """Remove the temporary siblings (``.<name>.safelora-tmp-<host>-<pid>-*``) that killed
    runs of this host left while creating ``p``; a live run's, another machine's and
    symlinks are left alone (the same rule as the output writer's, :mod:`safelora_cli.fsio`).
    They hold nothing but an in-progress manifest with no entries."""
    for q in fsio.stale_beside(p, fsio.TMP_TAG):
        fsio.rmtree_own(q)


def _safetensors_chunks(
    key: str, t: torch.Tensor, metadata: dict[str, str]
) -> list[bytes | memoryview]:
    """A one-tensor safetensors file as byte chunks (the tensor's memory is not copied)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    code = dtype_code(t.dtype)
    nbytes = t.numel() * t.element_size()
    header = {
        "__metadata__": dict(sorted(metadata.items())),
        key: {"dtype": code, "shape": list(t.shape), "data_offsets": [0, nbytes]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if nbytes else b""
    return [len(raw).to_bytes(8, "little"), raw, data]


def _source_label(recorded: dict[str, Any]) -> str:
    """A source as a manifest records it (``SourceSpec.to_json()``): path or ``org/name@commit``."""
    if recorded.get("kind") == "hub":
        at = str(recorded.get("commit") or recorded.get("revision") or "main")[:12]
        return f"Hub repo {recorded.get('repo_id')}@{at}"
    return str(recorded.get("path") or recorded.get("arg") or "(unknown)")


def _is_legacy(fp: dict[str, Any]) -> bool:
    """A local fingerprint of safelora <= 0.1.0's caches: file sizes and ``mtime_ns`` only."""
    files = fp.get("files")
    return (
        fp.get("kind") == "local"
        and isinstance(files, dict)
        and not any(isinstance(v, dict) and "header_sha256" in v for v in files.values())
    )


def _file_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """In words, the first way two local content fingerprints' files differ (None: equal)."""
    of, nf = old.get("files") or {}, new.get("files") or {}
    for name in natural_sorted(set(of) | set(nf)):
        if name not in nf:
            return f"its shard {name} is missing"
        if name not in of:
            return f"it has a shard {name} that was not there"
        o, n = of[name] or {}, nf[name] or {}
        if o.get("size") != n.get("size"):
            return (
                f"its shard {name} has another size ({n.get('size')} bytes, was "
                f"{o.get('size')}): its tensors changed"
            )
        if o.get("header_sha256") != n.get("header_sha256"):
            return f"its shard {name} has a different header (its tensors changed)"
    return None


def _not_the_source(path: Path, label: str, was: str, now: str, why: str) -> CacheError:
    """The refusal of a local ``label`` whose content is not what the cache was built from."""
    if was == now:
        return CacheError(
            f"projection cache {path}: the {label} {now} changed since the cache was built "
            f"from it: {why}",
            hint=f"build a new cache elsewhere (-o NEW_DIR), or delete {path} and run "
            "compute-projections again",
            path=path,
        )
    return CacheError(
        f"projection cache {path}: the {label} {now} is not the model it was built from "
        f"({was}): {why}",
        hint=f"pass the {label} the cache was built from ({was}), or build a new cache "
        "elsewhere (-o NEW_DIR)",
        path=path,
    )


def _source_problem(
    path: Path, label: str, old: Any, recorded: Any, spec: Any
) -> tuple[CacheError | None, bool]:
    """Whether the cache at ``path`` may take entries from ``spec`` (a SourceSpec) for one side.

    ``old`` is the fingerprint the manifest records, ``recorded`` its ``sources`` record.
    Returns (the refusal, or None; whether the entries' source digests must be checked against
    the given tensors: same content fingerprint, but not the very files it was built from).
    """
    recorded = recorded if isinstance(recorded, dict) else {}
    was, now = _source_label(recorded), _source_label(spec.to_json())
    elsewhere = "or build a new cache elsewhere (-o NEW_DIR)"
    new = spec.fingerprint()

    def refuse(what: str, hint: str) -> tuple[CacheError, bool]:
        return CacheError(f"projection cache {path}: {what}", hint=hint, path=path), False

    if not isinstance(old, dict) or old.get("kind") not in ("local", "hub"):
        return refuse(
            f"{MANIFEST} records no fingerprint of the {label}",
            "the cache is damaged; delete it and run safelora compute-projections again",
        )
    if _is_legacy(old):
        if spec.same_files(old):
            return None, False
        return refuse(
            f"it was built by an older safelora, which knew the {label} {was} only by its files' "
            f"sizes and times, and those of {now} differ (a copy or a new download?)",
            f"rebuild it: delete {path} or choose a new -o, then run compute-projections",
        )
    if old["kind"] != new["kind"] or old.get("repo_id") != new.get("repo_id"):
        return refuse(
            f"it was built from the {label} {was}, not from {now}",
            f"pass the {label} the cache was built from ({was}), {elsewhere}",
        )
    if new["kind"] == "hub":
        if old.get("commit") != new.get("commit"):
            flag = "--revision-base" if label.startswith("base") else "--revision-aligned"
            return refuse(
                f"it was built from the {label} {was}, but {spec.arg} is now at commit "
                f"{str(new.get('commit'))[:12]} (the repo changed)",
                f"pass {flag} {old.get('commit')} to use the commit it was built from, "
                + elsewhere,
            )
        return None, False
    why = _file_difference(old, new)
    if why is not None:
        return _not_the_source(path, label, was, now, why), False
    return None, not spec.same_files(recorded)


def _source_checks(path: Path, m: dict[str, Any], base: Any, aligned: Any) -> list[tuple]:
    """Refuse (CacheError, in words) when ``base``/``aligned`` are not the models of manifest
    ``m``; return the sides whose entries' digests must still be checked against the tensors
    (``(index, label, recorded source, SourceSpec)``)."""
    old = m.get("fingerprints") if isinstance(m.get("fingerprints"), dict) else {}
    check = []
    for i, (side, spec) in enumerate((("base", base), ("aligned", aligned))):
        recorded = m["sources"].get(side)
        err, verify = _source_problem(path, f"{side} model", old.get(side), recorded, spec)
        if err is not None:
            raise err
        if verify:
            check.append((i, f"{side} model", recorded, spec))
    return check


def _verify_sources(
    path: Path, entries: dict[str, CacheEntry], sides: Sequence[tuple[int, str, Any, Any, Any]]
) -> None:
    """CacheError unless every entry's recorded source digests match the given tensors.

    ``sides``: ``(index into source_sha256, label, recorded source, SourceSpec, reader)``.
    Reads each cached weight's tensor once per side (what recomputing it would read, without
    the compute).
    """
    from safelora_cli.sources import tensor_sha256

    for i, label, recorded, spec, reader in sides:
        was = _source_label(recorded if isinstance(recorded, dict) else {})
        now = _source_label(spec.to_json())
        for w in natural_sorted(entries):
            e = entries[w]
            if e.source_sha256 is None:
                raise CacheError(
                    f"projection cache {path}: its entry {w} does not record which {label} "
                    f"bytes it came from, so the {label} cannot be matched by content",
                    hint=f"pass the {label} the cache was built from ({was}), or build a new "
                    "cache elsewhere (-o NEW_DIR)",
                    path=path,
                )
            if w not in reader or tensor_sha256(reader, w) != e.source_sha256[i]:
                why = f"{w} has other values (same layout, other weights)"
                raise _not_the_source(path, label, was, now, why)


def _dtype_code_of(dtype: Any) -> str:
    if dtype is None:
        return "F32"
    if isinstance(dtype, str):
        code = dtype.upper()
        aliases = {"FLOAT32": "F32", "FLOAT64": "F64", "FLOAT16": "F16", "BFLOAT16": "BF16"}
        code = aliases.get(code, code)
    else:
        code = dtype_code(dtype)
    if code not in FLOAT_CODES:
        raise CacheError(f"cache dtype {dtype} is not a float type", hint="use float32")
    return code


class ProjectionCache:
    """A projection cache directory (see the module docstring for the contract)."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        entries: dict[str, CacheEntry],
        *,
        writable: bool,
        device: str | torch.device = "cpu",
        adapters: Sequence[str] = (),
        lock_fd: fsio.BesideLock | None = None,
    ):
        self.path = path
        self._manifest = manifest
        self._entries = entries
        self.writable = writable
        self.device = device
        self.adapters = tuple(adapters)
        self._lock_fd = lock_fd
        self.bytes_read = 0
        self.created = False
        # Rank of a multi-process worker (writes its journal, never the manifest); None: owner.
        self._journal: int | None = None

    # -- opening --------------------------------------------------------------------------

    @staticmethod
    def _load(path: Path) -> tuple[dict[str, Any], dict[str, CacheEntry]]:
        if not path.exists():
            raise CacheError(
                f"projection cache {path} does not exist",
                hint="build it first: safelora compute-projections BASE ALIGNED -o "
                f"{shlex.quote(str(path))} --adapter ADAPTER",
                path=path,
            )
        mp = path / MANIFEST
        if path.is_dir() and mp.exists() and not mp.is_file():
            raise _corrupt(mp, f"{MANIFEST} is {fsio.kind_of(mp.stat().st_mode)}, not a file")
        if not path.is_dir() or not mp.is_file():
            raise CacheError(
                f"{path} is not a projection cache (no {MANIFEST})",
                hint="pass a directory written by safelora compute-projections",
                path=path,
            )
        try:
            size = mp.stat().st_size
            if size > MAX_JSON_BYTES:
                # Read whole below; a real manifest is kilobytes (bounded before allocating).
                raise _corrupt(mp, f"{MANIFEST} is {size} bytes, more than {MAX_JSON_BYTES}")
            m = json.loads(fsio.read_regular(mp, MAX_JSON_BYTES).decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise _corrupt(mp, f"{MANIFEST} is unreadable ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
            raise _corrupt(mp, f"{MANIFEST} is not a safelora projection-cache manifest")
        version = m.get("format_version")
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise CacheError(
                f"projection cache {path} has format version {version!r}; this safelora "
                f"({__version__}) reads version {FORMAT_VERSION}",
                hint="upgrade safelora"
                if newer
                else "rebuild the cache with this safelora (delete it, then compute-projections)",
                path=path,
            )
        if m.get("projector") != PROJECTOR_KIND:
            raise CacheError(
                f"projection cache {path} holds projector kind {m.get('projector')!r}, "
                f"not {PROJECTOR_KIND!r}",
                hint="rebuild the cache with safelora compute-projections",
                path=path,
            )
        if m.get("state") not in (IN_PROGRESS, COMPLETE):
            raise _corrupt(mp, f"unknown state {m.get('state')!r}")
        if m.get("dtype") not in FLOAT_CODES or not isinstance(m.get("sources"), dict):
            raise _corrupt(mp, "missing dtype or sources")
        raw = m.get("weights")
        if not isinstance(raw, dict):
            raise _corrupt(mp, "missing weights")
        entries = {w: _entry_from_json(w, d, path) for w, d in raw.items()}
        files = [e.file for e in entries.values()]
        if len(set(files)) != len(files):
            raise _corrupt(mp, "two weights share one file")
        return m, entries

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        adapters: Sequence[str] = (),
        allow_incomplete: bool = False,
    ) -> ProjectionCache:
        """Open an existing cache read-only; projectors are loaded onto ``device``."""
        p = Path(path)
        m, entries = cls._load(p)
        if m["state"] != COMPLETE and not allow_incomplete:
            raise CacheError(
                f"projection cache {p} is incomplete: a compute-projections run was "
                "interrupted or is still running",
                hint="finish it by running the same safelora compute-projections command again",
                path=p,
            )
        return cls(p, m, entries, writable=False, device=device, adapters=adapters)

    @classmethod
    def create_or_resume(
        cls,
        path: str | Path,
        base: Any,
        aligned: Any,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
        readers: Sequence[CheckpointReader] | None = None,
    ) -> ProjectionCache:
        """Open ``path`` for writing: a new cache, or an existing one built from the same sources.

        ``base``/``aligned`` are :class:`safelora_cli.sources.SourceSpec`. ``dtype`` (default
        float32) is the stored dtype. CacheError when the directory holds something else or a
        cache built from other weights/revisions or another dtype, with the difference in
        words. Sources are matched by content (``SourceSpec.fingerprint()``): a byte-identical
        copy is accepted. When a local source's files are not the very ones the cache was built
        from (size or ``mtime_ns`` differ) the entries' recorded source digests are checked
        against the tensors of ``readers`` (``(base, aligned)`` CheckpointReaders; without
        them such a source is refused).
        """
        p = Path(path)
        code = _dtype_code_of(dtype)
        sources = {"base": base.to_json(), "aligned": aligned.to_json()}
        prints = {"base": base.fingerprint(), "aligned": aligned.fingerprint()}
        if p.exists() and not p.is_dir():
            raise CacheError(
                f"cache path {p} exists and is not a directory",
                hint="pass a new or existing cache directory to -o",
                path=p,
            )
        # The lock first: everything below (reading the manifest, creating the directory) is
        # then one writer's at a time.
        _make_parents(p)
        lock = cls._lock(p)
        try:
            return cls._create_or_resume(
                p, lock, code, sources, prints, device, (base, aligned), readers
            )
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _create_or_resume(
        cls,
        p: Path,
        lock: fsio.BesideLock,
        code: str,
        sources: dict[str, Any],
        prints: dict[str, Any],
        device: str | torch.device,
        specs: tuple[Any, Any],
        readers: Sequence[CheckpointReader] | None,
    ) -> ProjectionCache:
        if p.is_dir() and (p / MANIFEST).exists():
            m, entries = cls._load(p)
            check = _source_checks(p, m, *specs)  # refuses other models, in words
            if m["dtype"] != code:
                raise CacheError(
                    f"projection cache {p} stores {m['dtype']}, not the requested {code}",
                    hint="use a new -o directory for another dtype",
                    path=p,
                )
            cache = cls(p, m, entries, writable=True, device=device, lock_fd=lock)
            # A copy of the models: its tensors against the entries' digests (on failure the
            # caller releases the lock).
            cache._verify_sources(check, readers)
            # Refresh provenance fields that are not part of the fingerprint (e.g. the path
            # spelling); what must match already did.
            cache._manifest["sources"] = sources
            cache._cleanup()
            return cache
        if p.is_dir() and any(p.iterdir()):
            raise CacheError(
                f"{p} is a non-empty directory that is not a projection cache",
                hint="pass a new directory (or an existing cache) to -o",
                path=p,
            )
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "projector": PROJECTOR_KIND,
            "state": IN_PROGRESS,
            "dtype": code,
            "sources": sources,
            "fingerprints": prints,
            "weights": {},
        }
        # Built in a temporary sibling and renamed (never over anything: an empty directory
        # the user made is removed first; one that appears meanwhile is left alone), so the
        # directory appears with its in-progress manifest already in place.
        _clean_stale_tmp(p)
        tmp: Path | None = None
        try:
            tmp = fsio.mkdir_beside(p, fsio.TMP_TAG)
            _write_atomic(tmp / MANIFEST, [_dumps(manifest)])
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            try:
                fsio.rename_noreplace(tmp, p)
            except FileExistsError:
                raise CacheError(
                    f"cache path {p} appeared while this run was creating the cache; it was "
                    "left as it is",
                    hint="pass a new directory to -o, or run again to use it if it is a cache",
                    path=p,
                ) from None
        except BaseException:
            fsio.rmtree_own(tmp)
            raise
        fsync_dir(p.parent)
        cache = cls(p, manifest, {}, writable=True, device=device, lock_fd=lock)
        cache.created = True
        return cache

    @staticmethod
    def _lock(p: Path) -> fsio.BesideLock:
        """The one-writer lock: ``.<name>.safelora-lock`` beside the cache (so it covers the
        cache's creation too), or the directory itself when its parent is read-only."""
        try:
            try:
                return fsio.lock_beside(p)
            except (PermissionError, fsio.NotRegularFile) as e:
                if p.is_dir():
                    return fsio.lock_dir(p)
                raise CacheError(
                    f"cache path {p}: cannot create its lock file {fsio.lock_path(p)} "
                    f"({e.strerror or e})",
                    hint="choose an -o in a directory you can write to",
                    path=p,
                ) from None
        except fsio.LockBusy as e:
            raise CacheError(
                f"projection cache {p} is being written by another safelora process"
                + (f" ({e.holder})" if e.holder else ""),
                hint="wait for it to finish, or use another -o directory",
                path=p,
            ) from None

    @classmethod
    def worker(cls, path: str | Path, manifest: dict[str, Any], *, rank: int) -> ProjectionCache:
        """A writable handle for rank ``rank`` (> 0) of a multi-process run.

        ``manifest`` is rank 0's (:attr:`manifest`, after :meth:`create_or_resume`). :meth:`put`
        writes the entry file, then this rank's journal; the manifest and the lock stay rank 0's.
        """
        p = Path(path)
        raw = manifest.get("weights") or {}
        entries = {w: _entry_from_json(w, d, p) for w, d in raw.items()}
        cache = cls(p, json.loads(json.dumps(manifest)), entries, writable=True)
        cache._journal = int(rank)
        cache._manifest["weights"] = {}  # the journal names only what this rank adds
        return cache

    def _journal_path(self, rank: int) -> Path:
        return self.path / f"{_JOURNAL_PREFIX}{rank}.json"

    def _journals(self) -> list[Path]:
        return sorted(
            q
            for q in self.path.iterdir()
            if q.name.startswith(_JOURNAL_PREFIX) and q.name.endswith(".json") and q.is_file()
        )

    def _write_journal(self) -> None:
        assert self._journal is not None
        mine = self._manifest["weights"]
        body = {"format": FORMAT_NAME, "weights": dict(sorted(mine.items()))}
        _write_atomic(self._journal_path(self._journal), [_dumps(body)])

    def _admit(self, e: CacheEntry) -> bool:
        """Name ``e`` (written by another process) if its file is there and as recorded."""
        if e.weight in self._entries or e.dtype != self.dtype:
            return False
        if any(x.file == e.file for x in self._entries.values()) or not self._file_ok(e):
            return False
        self._entries[e.weight] = e
        return True

    def adopt(self, entries: Iterable[CacheEntry]) -> list[str]:
        """Name entries other ranks wrote; returns the weights refused (file absent or wrong).

        Entries already named are left as they are. Writes the manifest (state unchanged), then
        deletes every rank's journal.
        """
        self._need_writable()
        refused = []
        changed = False
        for e in entries:
            if e.weight in self._entries:
                continue
            if self._admit(e):
                changed = True
            else:
                refused.append(e.weight)
        if changed:
            self._write_manifest()
        self._drop_journals()
        return refused

    def _drop_journals(self) -> None:
        gone = False
        for q in self._journals():
            with contextlib.suppress(OSError):
                q.unlink()
                gone = True
        if gone:
            fsync_dir(self.path)

    def _journal_entries(self) -> list[CacheEntry]:
        """Entries recorded in journals of a killed multi-process run (damaged ones skipped)."""
        out = []
        for q in self._journals():
            try:
                raw = json.loads(q.read_text(encoding="utf-8"))["weights"]
                out += [_entry_from_json(w, d, self.path) for w, d in raw.items()]
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
                continue  # UnicodeDecodeError is a ValueError
            except CacheError:
                continue
        return out

    def _verify_sources(self, check: list[tuple], readers: Sequence[Any] | None) -> None:
        """Check every entry, journalled ones included, against ``readers`` for the sides in
        ``check`` (from :func:`_source_checks`); CacheError naming the first that differs."""
        if not check:
            return
        # What a killed multi-process run journalled is adopted by _cleanup: check it too.
        every = {e.weight: e for e in self._journal_entries()} | self._entries
        if not every:
            return
        if readers is None:
            raise CacheError(
                f"projection cache {self.path}: the {check[0][1]}'s files are not the ones it "
                "was built from, and no readers were given to compare tensors",
                path=self.path,
            )
        _verify_sources(self.path, every, [(*c, readers[c[0]]) for c in check])

    def _cleanup(self) -> None:
        """Drop temporaries of a killed run and entries whose files are gone or damaged.

        Entries a killed multi-process run recorded in its journals are adopted when their
        files are intact (they are then recomputed by nobody).
        """
        for q in self.path.iterdir():
            if q.name.startswith(_TMP_PREFIX) and q.is_file():
                with contextlib.suppress(OSError):
                    q.unlink()
        bad = [w for w, e in self._entries.items() if not self._file_ok(e)]
        for w in bad:
            del self._entries[w]
        adopted = [e for e in self._journal_entries() if self._admit(e)]
        if bad or adopted:
            self._manifest["state"] = IN_PROGRESS
            self._write_manifest()
        self._drop_journals()

    def _file_ok(self, e: CacheEntry) -> bool:
        f = self.path / e.file
        try:
            with CheckpointReader.from_files([f], label="cache", root=self.path) as r:
                return entry_mismatch(e, r) is None
        except CheckpointError:
            return False

    # -- queries --------------------------------------------------------------------------

    @property
    def sources(self) -> dict[str, Any]:
        """``{"base": SourceSpec.to_json(), "aligned": ...}`` as recorded."""
        return dict(self._manifest["sources"])

    @property
    def dtype(self) -> str:
        """The stored dtype (safetensors code, ``"F32"`` by default)."""
        return str(self._manifest["dtype"])

    @property
    def complete(self) -> bool:
        return self._manifest["state"] == COMPLETE

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as it stands (a copy)."""
        return json.loads(json.dumps(self._manifest))

    def weights(self) -> list[str]:
        """Cached weight names, natural order."""
        return natural_sorted(self._entries)

    def has(self, weight: str) -> bool:
        return weight in self._entries

    def __contains__(self, weight: object) -> bool:
        return weight in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, weight: str) -> CacheEntry:
        """The entry of ``weight``; CacheError (with the command that adds it) if absent."""
        e = self._entries.get(weight)
        if e is None:
            raise self._missing([weight])
        return e

    def size_bytes(self) -> int:
        """Bytes on disk: the manifest plus every entry file."""
        total = 0
        for name in [MANIFEST, *(e.file for e in self._entries.values())]:
            with contextlib.suppress(OSError):
                total += (self.path / name).stat().st_size
        return total

    def add_command(self, adapters: Sequence[str] = ()) -> str:
        """The ``safelora compute-projections`` command that adds entries to this cache."""
        src = self._manifest["sources"]
        parts = ["safelora", "compute-projections"]
        for side in ("base", "aligned"):
            s = src.get(side) or {}
            parts.append(shlex.quote(str(s.get("arg") or s.get("path") or side.upper())))
        parts += ["-o", shlex.quote(str(self.path))]
        for side in ("base", "aligned"):
            rev = (src.get(side) or {}).get("revision")
            if rev:
                parts += [f"--revision-{side}", shlex.quote(str(rev))]
        for a in adapters or self.adapters or ("ADAPTER",):
            parts += ["--adapter", shlex.quote(str(a))]
        return " ".join(parts)

    def _missing(self, weights: Sequence[str], adapters: Sequence[str] = ()) -> CacheError:
        more = f" (and {len(weights) - 1} more)" if len(weights) > 1 else ""
        return CacheError(
            f"projection cache {self.path} has no projector for {weights[0]}{more}",
            hint=f"add it: {self.add_command(adapters)}",
            path=self.path,
        )

    def _check_orientation(self, e: CacheEntry, fan_in_fan_out: bool) -> None:
        if e.fan_in_fan_out != fan_in_fan_out:
            stored = "[in, out] (Conv1D)" if e.fan_in_fan_out else "[out, in] (Linear)"
            raise CacheError(
                f"projection cache {self.path}: {e.weight} was cached with the weight stored "
                f"{stored}, but the adapter says fan_in_fan_out={fan_in_fan_out}",
                hint="the adapter does not belong to this model; rebuild the cache from the "
                "adapter's base model",
                path=self.path,
            )

    def require(
        self, requests: Sequence[tuple[str, bool]], *, adapters: Sequence[str] = ()
    ) -> None:
        """CacheError unless every ``(weight, fan_in_fan_out)`` is cached with that orientation."""
        missing = natural_sorted({w for w, _ in requests if w not in self._entries})
        if missing:
            raise self._missing(missing, adapters)
        for w, fifo in requests:
            self._check_orientation(self._entries[w], fifo)

    def check_source(self, side: str, spec: Any, reader: Any, weights: Sequence[str]) -> None:
        """CacheError (in words) unless ``spec`` is the ``side`` model ("base" or "aligned")
        this cache was built from, as far as ``weights`` are concerned.

        The content fingerprint (sizes and header digests) must match; when the files are not
        the very ones recorded (a copy, another download), each of ``weights``' tensors in
        ``reader`` is hashed and compared with the digest its entry recorded.
        """
        i = ("base", "aligned").index(side)
        label = f"{side} model"
        old = self._manifest.get("fingerprints")
        old = old.get(side) if isinstance(old, dict) else None
        recorded = self.sources.get(side)
        err, verify = _source_problem(self.path, label, old, recorded, spec)
        if err is not None:
            raise err
        if verify:
            entries = {w: self._entries[w] for w in weights}
            _verify_sources(self.path, entries, [(i, label, recorded, spec, reader)])

    # -- ProjectorSource ------------------------------------------------------------------

    def get(self, weight: str, *, fan_in_fan_out: bool = False) -> Projector:
        """The cached projector of ``weight`` on this cache's device (reads only that entry)."""
        e = self.entry(weight)
        self._check_orientation(e, fan_in_fan_out)
        f = self.path / e.file
        try:
            with CheckpointReader.from_files([f], label="cache", root=self.path) as r:
                why = entry_mismatch(e, r)
                if why is not None:
                    raise _corrupt(f, f"entry {weight} does not match the manifest: {why}")
                t = r.load(weight, device=self.device)
                self.bytes_read += r.bytes_read
        except CheckpointError as err:
            raise _corrupt(f, f"entry {weight} cannot be read ({err.message})") from None
        return Projector(weight, e.kind, t, e.norm_v, e.fan_in_fan_out, e.d_out, e.d_in)

    def projectors(self, requests: Sequence[tuple[str, bool]]) -> Iterator[Projector]:
        """Projectors for ``[(weight, fan_in_fan_out)]`` in order, the next one prefetched."""
        self.require(requests)
        return prefetched(lambda req: self.get(req[0], fan_in_fan_out=req[1]), list(requests))

    # -- writing --------------------------------------------------------------------------

    def _need_writable(self) -> None:
        if not self.writable:
            raise CacheError(f"projection cache {self.path} was opened read-only", path=self.path)

    def _write_manifest(self) -> None:
        ordered = sorted(self._entries.items(), key=lambda kv: natural_key(kv[0]))
        self._manifest["weights"] = {w: e.to_json() for w, e in ordered}
        _write_atomic(self.path / MANIFEST, [_dumps(self._manifest)])

    def put(
        self,
        projector: Projector,
        *,
        written: Callable[[], None] | None = None,
        source_sha256: tuple[str, str] | None = None,
    ) -> CacheEntry:
        """Write one entry (file first, then the manifest naming it); returns the entry.

        The tensor is cast to the cache dtype and brought to the CPU. Replaces an existing
        entry of the same weight. Marks the cache in progress until :meth:`finish`.
        ``written`` is called once the tensor's bytes are written, before the fsyncs: from
        then on ``put`` does not read the tensor again, so its memory may be reused (the
        compute stream hands the buffer to the next weight). It is called on failure too.
        ``source_sha256``: SHA-256 of the base and aligned tensors' stored bytes the projector
        was computed from (recorded; what a later run from a copy of the models is checked by).
        """
        once = _once(written)
        try:
            return self._put(projector, once, source_sha256)
        finally:
            once()

    def _put(
        self,
        projector: Projector,
        written: Callable[[], None],
        source_sha256: tuple[str, str] | None = None,
    ) -> CacheEntry:
        self._need_writable()
        pr = projector
        want = stored_shape(pr.kind, pr.d_out, pr.d_in)
        if tuple(pr.tensor.shape) != want:
            raise ValueError(f"{pr.weight}: tensor {tuple(pr.tensor.shape)} is not {want}")
        t = pr.tensor.to(device="cpu", dtype=torch_dtype(self.dtype))
        file = entry_file_name(pr.weight)
        clash = [
            e.weight for e in self._entries.values() if e.file == file and e.weight != pr.weight
        ]
        if clash:
            digest = hashlib.sha256(pr.weight.encode()).hexdigest()[:12]
            file = file.removesuffix(".safetensors") + f"-{digest}.safetensors"
        meta = {
            "format": "pt",
            "safelora.weight": pr.weight,
            "safelora.projector": PROJECTOR_KIND,
            "safelora.representation": pr.kind,
            "safelora.norm_v": repr(float(pr.norm_v)),
            "safelora.fan_in_fan_out": "true" if pr.fan_in_fan_out else "false",
        }
        if self._journal is None and self._manifest["state"] != IN_PROGRESS:
            self._manifest["state"] = IN_PROGRESS
            self._write_manifest()
        chunks = _safetensors_chunks(pr.weight, t, meta)
        _write_atomic(self.path / file, chunks, sync_dir=False, written=written)
        e = CacheEntry(
            pr.weight,
            file,
            pr.kind,
            pr.d_out,
            pr.d_in,
            self.dtype,
            float(pr.norm_v),
            pr.fan_in_fan_out,
            want,
            source_sha256,
        )
        self._entries[pr.weight] = e
        if self._journal is not None:
            self._manifest["weights"][pr.weight] = e.to_json()
            self._write_journal()
        else:
            self._write_manifest()
        return e

    def finish(self) -> None:
        """Mark the cache complete (every entry it names is on disk)."""
        self._need_writable()
        if self._manifest["state"] != COMPLETE:
            self._manifest["state"] = COMPLETE
            self._write_manifest()

    def close(self) -> None:
        """Release the writer lock (a read-only cache holds nothing open)."""
        if self._lock_fd is not None:
            self._lock_fd.release()  # unlinks the lock file, then closes it
            self._lock_fd = None

    def __enter__(self) -> ProjectionCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"ProjectionCache({self.path}, {len(self._entries)} weights, {self.dtype})"
