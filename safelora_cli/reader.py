"""The lazy shard reader: every checkpoint, adapter and cache goes through it (DESIGN §4).

:meth:`CheckpointReader.open` parses safetensors *headers only* and validates everything up
front (index, shard paths, headers, file sizes), raising :class:`CheckpointError` naming the
file and the fix. Tensors are then loaded one at a time on request.

Memory: tensors are read with ``os.pread``/``os.preadv`` into fresh memory (a ``bytearray``
wrapped by ``torch.frombuffer``), **not** through mmap. Pages of an mmap stay resident (and are
counted in RSS) for as long as the mapping is open, so reading a whole model through
``safe_open`` grows RSS to roughly the model size until the handle is closed; with pread each
tensor owns its memory and RSS returns to its baseline as soon as the tensor is dropped.
``bench/read_rss.py`` measures both: reading every tensor of a 512 MB / 1 GB float32
checkpoint (16 MiB tensors) peaks at +21 MB over the RSS after ``import torch`` with this reader,
and at +517 MB / +1029 MB through ``safe_open`` or raw mmap views with the handles kept open.
The cost is one copy from the page cache, which mmap would also pay on first touch.
:meth:`CheckpointReader.load_into` reads into a caller's buffer instead (the weight-pair stream
reuses a few, see :mod:`safelora_cli.buffers`).

Byte order: safetensors data is little-endian; on a big-endian host :meth:`load` byte-swaps.
File handles: at most :attr:`CheckpointReader.max_open` (default :data:`MAX_OPEN_FILES`) files
are open at once (LRU; 0: none between reads). A file re-opened for its data must be the one
whose header was read (device, inode, size, mtime), else CheckpointError. Non-regular files
(FIFOs, devices) are refused without blocking or reading.
Thread safety: one lock guards handle bookkeeping and reads, so a reader may be shared between
a prefetch thread and the main thread.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from safelora_cli.errors import CheckpointError
from safelora_cli.fsio import EMFILE_HINT, NotRegularFile, emfile_hint, kind_of, open_regular
from safelora_cli.naming import natural_sorted

if TYPE_CHECKING:
    import torch

# Same bound as the safetensors library: a header larger than this is refused unread.
MAX_HEADER_BYTES = 100_000_000
# Index / config JSON files are read whole; real ones are kilobytes (Llama-2-70B's index: 66 kB).
MAX_JSON_BYTES = 64_000_000
MAX_OPEN_FILES = 4
MAX_NDIM = 64
# A read of a remote (ranged) file takes the tensors planned right after the asked one, when
# they are adjacent in the file, into the same run while the run stays within this many bytes;
# the extra tensors wait in a stash until asked for (memory: at most this much per reader).
MAX_RUN_BYTES = 64 << 20
# Linux returns at most 0x7ffff000 bytes per read call; stay well below.
_CHUNK = 1 << 30

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Writes model.safetensors (or model-0000x-of-0000y.safetensors + model.safetensors.index.json)
# beside pytorch_model.bin (or its shards + pytorch_model.bin.index.json) in the directory
# given as its argument, keeping every key name (AutoModel.from_pretrained(...).save_pretrained
# would strip the ``model.`` prefix and drop ``lm_head``). Each tensor is cloned contiguous, so
# tied (shared) tensors and strided views save. No ``$``, ``!`` or backquote: it is pasted
# into shells. tests/test_ux_sources.py runs it, literally, on transformers-format pickles.
CONVERT_PROGRAM = (
    "import json,sys,torch,pathlib;from safetensors.torch import save_file;"
    "d=pathlib.Path(sys.argv[1]);i=d/'pytorch_model.bin.index.json';"
    "m=json.loads(i.read_text())['weight_map'] if i.exists() else {};"
    "n=lambda b:b.replace('pytorch_model','model').replace('.bin','.safetensors');"
    "[save_file({k:v.clone(memory_format=torch.contiguous_format) for k,v in "
    "torch.load(d/b,map_location='cpu',weights_only=True).items()},d/n(b),{'format':'pt'}) "
    "for b in sorted(set(m.values())) or ['pytorch_model.bin']];"
    "m and (d/'model.safetensors.index.json').write_text(json.dumps("
    "{'metadata':{},'weight_map':{k:n(v) for k,v in m.items()}}))"
)


# One pickled file of another name (``weights.pt``) to one safetensors file, keys kept.
CONVERT_FILE_PROGRAM = (
    "import sys,torch;from safetensors.torch import save_file;"
    "save_file({k:v.clone(memory_format=torch.contiguous_format) for k,v in "
    "torch.load(sys.argv[1],map_location='cpu',weights_only=True).items()},sys.argv[2],"
    "{'format':'pt'})"
)


def convert_command(path: str | Path) -> str:
    """The shell command that converts the pickled model at ``path`` to safetensors.

    A directory (or a ``pytorch_model*.bin`` in one): :data:`CONVERT_PROGRAM` on the
    directory. Any other pickled file: :data:`CONVERT_FILE_PROGRAM` to ``<stem>.safetensors``
    beside it.
    """
    import shlex

    p = Path(path)
    if p.suffix in PICKLE_SUFFIXES and not p.name.startswith("pytorch_model"):
        out = shlex.quote(str(p.with_suffix(".safetensors")))
        return f'python -c "{CONVERT_FILE_PROGRAM}" {shlex.quote(str(p))} {out}'
    d = p.parent if p.suffix in PICKLE_SUFFIXES else p
    return f'python -c "{CONVERT_PROGRAM}" {shlex.quote(str(d))}'


def convert_hint(path: str | Path) -> str:
    """The hint for the pickled model at ``path``: the command that converts it, keys kept."""
    p = Path(path)
    if p.suffix in PICKLE_SUFFIXES and not p.name.startswith("pytorch_model"):
        where = f"then pass {p.with_suffix('.safetensors')}"
    else:
        where = "then pass the same directory again"
    return f"convert it to safetensors (key names kept), {where}: {convert_command(p)}"


CONVERT_HINT = convert_hint("DIR")

# safetensors dtype code -> bytes per element.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}

# safetensors dtype code -> torch attribute name (looked up lazily: torch is imported late).
_TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "BF16": "bfloat16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
    "C64": "complex64",
}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype code (CheckpointError if this torch lacks it)."""
    import torch

    attr = _TORCH_NAMES.get(code)
    dt = getattr(torch, attr, None) if attr else None
    if dt is None:
        raise CheckpointError(
            f"dtype {code} is not supported by this torch ({torch.__version__})",
            hint="upgrade torch or convert the checkpoint to a supported dtype",
        )
    return dt


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype (inverse of :func:`torch_dtype`)."""
    import torch

    for code, attr in _TORCH_NAMES.items():
        if getattr(torch, attr, None) is dtype:
            return code
    raise ValueError(f"no safetensors dtype code for {dtype}")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``nbytes`` bytes at absolute offset ``start`` of ``path``."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class FileHeader:
    """The parsed header of one safetensors file."""

    path: Path
    size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    # (st_dev, st_ino, st_size, st_mtime_ns) when the header was read: a file re-opened later
    # for its data must still be this one (see CheckpointReader: handles are not kept).
    ident: tuple[int, int, int, int] | None = None


class ByteSource(Protocol):
    """Where a file's bytes come from when it is not a local file: e.g. a Hub file read by byte
    ranges (:class:`safelora_cli.hub.HubFile`). The reader parses its header with the same
    :func:`parse_header` as a local file's and reads tensors through :meth:`read_into`.
    """

    size: int  # the file's size in bytes (as the server states it)

    def read(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes at ``offset`` (headers; small)."""
        ...

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        """Fill ``views`` with the file's bytes from ``offset`` on, in order (contiguous).

        Every byte count is checked; a failure raises a :class:`SafeLoraError`.
        """
        ...

    @property
    def fetched(self) -> int:
        """Bytes received so far (headers and tensors)."""
        ...


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _DuplicateKey(ValueError):
    """A JSON object names one key twice."""

    def __init__(self, key: str):
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _bad(label: str, path: Path, what: str, hint: str | None = None) -> CheckpointError:
    return CheckpointError(
        f"{label}: {path}: {what}",
        hint=hint or "the file is corrupt or not a safetensors file; re-download or re-save it",
        path=path,
    )


def header_length(raw_len: bytes, size: int, path: Path, label: str) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against ``size``.

    The one bound on a header length, for local files and ranged Hub reads alike: at most
    :data:`MAX_HEADER_BYTES` and inside the file (a remote file's size comes from the server's
    HEAD answer, so a hostile length is refused before the header is asked for).
    """
    if len(raw_len) < 8:
        raise _bad(label, path, f"file is too short ({size} bytes) to be safetensors")
    n = int.from_bytes(raw_len[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise _bad(label, path, f"header length {n} exceeds {MAX_HEADER_BYTES} bytes")
    if 8 + n > size:
        raise _bad(
            label,
            path,
            f"file is truncated: header says {n} bytes but the file has {size}",
            hint="the download or copy was interrupted; fetch the file again",
        )
    return n


def read_header(path: str | Path, *, label: str = "checkpoint") -> FileHeader:
    """Parse and validate the header of one safetensors file without reading tensor data.

    The checks are :func:`parse_header`'s (the same code validates ranged Hub headers).
    """
    path = Path(path)
    try:
        # Non-blocking open + fstat: a FIFO named *.safetensors is refused, never read.
        with os.fdopen(open_regular(path), "rb") as fh:
            st = os.fstat(fh.fileno())
            size = st.st_size
            raw_len = fh.read(8)
            n = header_length(raw_len, size, path, label)
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(
            f"{label}: cannot read {path}: {e.strerror or e}",
            hint=_open_hint(e, "check that the file exists and is readable"),
            path=path,
        ) from e
    return parse_header(
        raw,
        size=size,
        path=path,
        label=label,
        ident=(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns),
    )


def read_remote_header(source: ByteSource, path: Path, *, label: str) -> FileHeader:
    """The validated header of a file read by byte ranges: 8 bytes, then the header itself.

    ``path`` names the file (where it would be in a snapshot); nothing is opened there.
    """
    size = source.size
    raw_len = source.read(0, min(8, size))
    n = header_length(raw_len, size, path, label)
    raw = source.read(8, n)
    if len(raw) != n:
        raise _bad(label, path, f"header: {len(raw)} bytes received, {n} expected")
    return parse_header(raw, size=size, path=path, label=label)


def parse_header(
    raw: bytes,
    *,
    size: int,
    path: Path,
    label: str = "checkpoint",
    ident: tuple[int, int, int, int] | None = None,
) -> FileHeader:
    """Parse and validate a safetensors JSON header (``raw``, the bytes after the 8-byte length)
    of a file of ``size`` bytes.

    Checks: a JSON object (no duplicate keys, bounded nesting); each entry has a known
    ``dtype``, a ``shape`` of non-negative ints and ``data_offsets`` [begin, end] with
    ``end - begin`` equal to ``prod(shape) * itemsize``, inside the data section and not
    overlapping another tensor; ``__metadata__`` maps str to str. The length itself was checked
    by :func:`header_length`.
    """
    n = len(raw)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise _bad(label, path, "header JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(label, path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(label, path, "header is not a JSON object")

    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(label, path, "__metadata__ must map strings to strings")

    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise _bad(label, path, f"{where}: entry is not an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise _bad(label, path, f"{where}: entry lacks {', '.join(missing)}")
        code = entry["dtype"]
        if not isinstance(code, str) or code not in DTYPE_SIZES:
            raise _bad(
                label,
                path,
                f"{where}: unknown dtype {code!r}",
                hint=f"supported dtypes: {', '.join(DTYPE_SIZES)}",
            )
        shape = entry["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(_is_int(d) and d >= 0 for d in shape)
        ):
            raise _bad(label, path, f"{where}: shape must be a list of non-negative ints")
        offs = entry["data_offsets"]
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(_is_int(o) and o >= 0 for o in offs)
        ):
            raise _bad(label, path, f"{where}: data_offsets must be two non-negative ints")
        begin, end = offs
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * DTYPE_SIZES[code]
        if end < begin or end - begin != nbytes:
            raise _bad(
                label,
                path,
                f"{where}: data_offsets {offs} do not match {code} shape {shape} ({nbytes} bytes)",
            )
        if end > data_len:
            raise _bad(
                label,
                path,
                f"{where}: data ends at byte {data_start + end} but the file has {size} bytes",
                hint="the file is truncated; fetch or copy it again",
            )
        tensors[name] = TensorInfo(name, path, code, tuple(shape), data_start + begin, nbytes)
        if nbytes:
            spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise _bad(label, path, f"tensors {n0!r} and {n1!r} overlap")
    return FileHeader(path, size, tensors, metadata, ident)


def _open_hint(e: OSError, default: str) -> str:
    """The hint for a file that cannot be opened: the fix for EMFILE, a FIFO, or ``default``."""
    if emfile_hint(e):
        return EMFILE_HINT
    if isinstance(e, NotRegularFile):
        return "pass a regular safetensors file (FIFOs, sockets and devices are never read)"
    return default


def read_index(path: Path, label: str) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of a safetensors index, validated."""
    hint = 'the index must be a JSON object with a "weight_map" of tensor name -> shard file'
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(
                f"{label}: {path}: index is {size} bytes, more than {MAX_JSON_BYTES}",
                hint=hint,
                path=path,
            )
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{label}: cannot read {path}: {e}", hint="check the file", path=path
        ) from e
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise CheckpointError(
            f"{label}: {path}: index JSON is nested too deeply", hint=hint, path=path
        ) from None
    except _DuplicateKey as e:
        # JSON keeps the last of two equal keys: a tensor listed twice could silently be read
        # from either shard, so refuse rather than guess.
        raise CheckpointError(
            f"{label}: {path}: index lists {e.key!r} more than once",
            hint="each tensor must be listed once in weight_map; fix or re-download the index",
            path=path,
        ) from None
    except ValueError as e:
        raise CheckpointError(
            f"{label}: {path}: index is not valid JSON ({e})", hint=hint, path=path
        ) from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
    ):
        raise CheckpointError(f"{label}: {path}: malformed index", hint=hint, path=path)
    return wm


def containment_root(root: Path) -> Path:
    """The directory a checkpoint's files must resolve into.

    Normally ``root`` itself. In a Hugging Face cache snapshot
    (``models--org--name/snapshots/<commit>/``) the files are symlinks into ``../../blobs``, so
    the repository folder ``models--org--name`` is the boundary instead.
    """
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        return root.parent.parent
    return root


def _shard_path(root: Path, shard: str, index: Path, label: str, *, local: bool = True) -> Path:
    """``root/shard``, refusing names that leave ``root`` (absolute, ``..``, symlink escape).

    ``local=False``: a shard read by byte ranges; only its name is checked (nothing is on disk).
    """
    hint = "the index must name shard files inside its own directory; fix or re-download it"
    p = Path(shard)
    if not shard or p.is_absolute() or ".." in p.parts or "\\" in shard or "\x00" in shard:
        raise CheckpointError(
            f"{label}: {index}: shard name {shard!r} points outside the checkpoint directory",
            hint=hint,
            path=index,
        )
    full = root / p
    if not local:
        return full
    try:
        resolved = full.resolve()
    except (OSError, RuntimeError) as e:
        raise CheckpointError(
            f"{label}: {index}: cannot resolve shard {shard!r}: {e}", hint=hint, path=index
        ) from e
    if not resolved.is_relative_to(containment_root(root).resolve()):
        raise CheckpointError(
            f"{label}: {index}: shard {shard!r} resolves to {resolved}, outside {root}",
            hint=hint,
            path=index,
        )
    if not resolved.is_file():
        raise CheckpointError(
            f"{label}: {index}: shard {shard!r} is listed but {full} does not exist",
            hint="download or copy the missing shard next to the index",
            path=full,
        )
    return full


def _pickled_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


class CheckpointReader:
    """Lazy, validated access to the tensors of one checkpoint (one or many safetensors files).

    ``label`` names the checkpoint in errors ("base model", "adapter", ...); ``root`` is its
    directory. Build with :meth:`open`, :meth:`from_index` or :meth:`from_files`.
    """

    def __init__(
        self,
        headers: list[FileHeader],
        *,
        label: str,
        root: Path,
        names: Iterable[str] | None = None,
        unfetched: dict[str, str] | None = None,
        index_path: Path | None = None,
        remote: dict[Path, ByteSource] | None = None,
    ):
        self.label = label
        self.root = Path(root)
        self.index_path = index_path
        self.bytes_read = 0
        self._headers = {h.path: h for h in headers}
        self._infos: dict[str, TensorInfo] = {}
        owner: dict[str, Path] = {}
        for h in headers:
            for name, ti in h.tensors.items():
                if name in owner:
                    raise CheckpointError(
                        f"{label}: tensor {name!r} is in both {owner[name]} and {h.path}",
                        hint="a checkpoint must hold each tensor once; remove the stale shard",
                        path=h.path,
                    )
                owner[name] = h.path
                self._infos[name] = ti
        if names is not None:
            keep = set(names)
            self._infos = {k: v for k, v in self._infos.items() if k in keep}
        self._names = natural_sorted(self._infos)
        self._unfetched = dict(unfetched or {})
        # Files read by byte ranges (path -> source); every other file is read with pread.
        self._remote: dict[Path, ByteSource] = dict(remote or {})
        # Per remote file, its tensors in file order (for runs of adjacent planned tensors).
        self._order: dict[Path, list[TensorInfo]] = {
            path: sorted(h.tensors.values(), key=lambda t: (t.start, t.nbytes))
            for path, h in self._headers.items()
            if path in self._remote
        }
        self._planned: set[str] = set()
        self._stash: OrderedDict[str, bytearray] = OrderedDict()
        self._fds: OrderedDict[Path, int] = OrderedDict()
        # How many files stay open between reads (LRU). 0: each read opens and closes its
        # file, so a caller holding thousands of readers (adapters) holds no descriptors.
        self.max_open = MAX_OPEN_FILES
        self._lock = threading.Lock()
        self._closed = False

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, label: str) -> CheckpointReader:
        """Open a checkpoint directory or a single ``.safetensors`` file (headers only).

        A directory holds ``model.safetensors.index.json`` + shards, or ``model.safetensors``,
        or exactly one other ``*.safetensors`` (e.g. ``adapter_model.safetensors``), or exactly
        one ``*.safetensors.index.json``. Pickled checkpoints (``*.bin``, ``*.pt``, ``*.pth``)
        are refused with a conversion hint; nothing is ever unpickled.
        """
        p = Path(path)
        if not p.exists():
            raise CheckpointError(
                f"{label}: {p} does not exist",
                hint="pass a checkpoint directory or a .safetensors file",
                path=p,
            )
        if p.is_file():
            if p.name.endswith(".safetensors.index.json"):
                return cls.from_index(p, label=label)
            if p.suffix in PICKLE_SUFFIXES:
                raise cls._pickle_error(p, label)
            return cls.from_files([p], label=label, root=p.parent)
        if not p.is_dir():
            raise CheckpointError(f"{label}: {p} is not a file or directory", path=p)
        for name in (INDEX_NAME, SINGLE_NAME):
            q = p / name
            if q.exists() and not q.is_file():  # a FIFO, socket or device: never opened
                raise CheckpointError(
                    f"{label}: {q} is {kind_of(q.stat().st_mode)}, not a regular file",
                    hint="replace it by the checkpoint file itself",
                    path=q,
                )
        if (p / INDEX_NAME).is_file():
            return cls.from_index(p / INDEX_NAME, label=label)
        if (p / SINGLE_NAME).is_file():
            return cls.from_files([p / SINGLE_NAME], label=label, root=p)
        singles = sorted(q for q in p.glob("*.safetensors") if q.is_file())
        indexes = sorted(q for q in p.glob("*.safetensors.index.json") if q.is_file())
        if len(indexes) == 1:
            return cls.from_index(indexes[0], label=label)
        if len(singles) == 1 and not indexes:
            return cls.from_files(singles, label=label, root=p)
        if singles or indexes:
            found = ", ".join(q.name for q in (indexes or singles)[:5])
            raise CheckpointError(
                f"{label}: {p} holds several safetensors files ({found}) and no {INDEX_NAME}",
                hint="pass the one .safetensors file to use, or add an index",
                path=p,
            )
        pickled = _pickled_files(p)
        if pickled:
            raise cls._pickle_error(pickled[0], label)
        raise CheckpointError(
            f"{label}: no safetensors checkpoint in {p}",
            hint=f"expected {SINGLE_NAME} or {INDEX_NAME} with its shards",
            path=p,
        )

    @staticmethod
    def _pickle_error(path: Path, label: str) -> CheckpointError:
        hint = convert_hint(path)
        if path.name.startswith("adapter_model"):
            hint = (
                "load PEFT adapters with safelora_cli.adapter.load_adapter (it reads a legacy "
                "adapter_model.bin safely), or re-save with save_pretrained(..., "
                "safe_serialization=True)"
            )
        return CheckpointError(
            f"{label}: {path} is a pickled PyTorch checkpoint; only safetensors is read",
            hint=hint,
            path=path,
        )

    @classmethod
    def from_index(
        cls,
        index: str | Path,
        *,
        label: str,
        shards: Iterable[str] | None = None,
        remote: dict[str, ByteSource] | None = None,
    ) -> CheckpointReader:
        """Open ``index`` (a ``*.safetensors.index.json``) and its shards.

        ``shards``: only these shard names (as written in the index) are opened; names held by
        the others stay known (``info``/``load`` say they were not fetched) but are not listed
        by :meth:`names`. Used for Hub models where only the needed shards are downloaded.
        ``remote``: shard name -> :class:`ByteSource` for shards read by byte ranges (not on
        disk); their headers are fetched and validated exactly as local ones.
        """
        index = Path(index)
        root = index.parent
        wm = read_index(index, label)
        if not wm:
            raise CheckpointError(
                f"{label}: {index} lists no tensors",
                hint="the index is empty; re-download or re-save the checkpoint",
                path=index,
            )
        only = None if shards is None else set(shards)
        by_shard: dict[str, list[str]] = {}
        for name, shard in wm.items():
            by_shard.setdefault(shard, []).append(name)
        headers: list[FileHeader] = []
        kept: list[str] = []
        unfetched: dict[str, str] = {}
        for shard in sorted(by_shard):
            if only is not None and shard not in only:
                unfetched.update(dict.fromkeys(by_shard[shard], shard))
                continue
            if remote is not None and shard in remote:
                sp = _shard_path(root, shard, index, label, local=False)
                h = read_remote_header(remote[shard], sp, label=label)
            else:
                sp = _shard_path(root, shard, index, label)
                h = read_header(sp, label=label)
            absent = [n for n in by_shard[shard] if n not in h.tensors]
            if absent:
                raise CheckpointError(
                    f"{label}: {index} lists {absent[0]!r} in {shard} but {sp} does not hold it"
                    + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""),
                    hint="the index and shards do not belong together; re-download the checkpoint",
                    path=sp,
                )
            headers.append(h)
            kept.extend(by_shard[shard])
        read = {h.path for h in headers}
        ranged = {root / s: src for s, src in (remote or {}).items() if root / s in read}
        return cls(
            headers,
            label=label,
            root=root,
            names=kept,
            unfetched=unfetched,
            index_path=index,
            remote=ranged,
        )

    @classmethod
    def from_files(
        cls,
        files: list[Path],
        *,
        label: str,
        root: Path,
        remote: dict[Path, ByteSource] | None = None,
    ) -> CheckpointReader:
        """A reader over exactly these safetensors files (no index); names must not repeat.

        ``remote``: file -> :class:`ByteSource` for files read by byte ranges (not on disk).
        """
        remote = {Path(k): v for k, v in (remote or {}).items()}
        headers = [
            read_remote_header(remote[Path(f)], Path(f), label=label)
            if Path(f) in remote
            else read_header(Path(f), label=label)
            for f in files
        ]
        return cls(headers, label=label, root=Path(root), remote=remote)

    # -- queries ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """All tensor names, natural order (``layers.9`` before ``layers.10``)."""
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    @property
    def files(self) -> list[Path]:
        """The safetensors files this reader reads (sorted)."""
        return sorted(self._headers)

    def info(self, name: str) -> TensorInfo:
        """Where ``name`` lives; CheckpointError naming the checkpoint if it is absent."""
        ti = self._infos.get(name)
        if ti is not None:
            return ti
        if name in self._unfetched:
            raise CheckpointError(
                f"{self.label}: tensor {name!r} is in shard {self._unfetched[name]}, "
                f"which was not fetched",
                hint="this is a bug in the caller's list of wanted tensors",
                path=self.root,
            )
        where = self.index_path or (self.files[0] if len(self._headers) == 1 else self.root)
        raise CheckpointError(
            f"{self.label}: tensor {name!r} not found in {where}",
            hint="check that the checkpoint is the right model",
            path=where,
        )

    def metadata(self, path: Path | None = None) -> dict[str, str]:
        """``__metadata__`` of ``path`` (default: the first file of this reader)."""
        if path is None:
            if not self._headers:
                return {}
            path = self.files[0]
        h = self._headers.get(Path(path))
        if h is None:
            raise KeyError(f"{path} is not a file of this reader")
        return dict(h.metadata)

    # -- reading ------------------------------------------------------------------------------

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        while self._fds and len(self._fds) >= max(self.max_open, 1):
            _, old = self._fds.popitem(last=False)
            os.close(old)
        try:
            fd = open_regular(path)
        except OSError as e:
            raise CheckpointError(
                f"{self.label}: cannot open {path}: {e.strerror or e}",
                hint=_open_hint(e, "the file was moved or deleted after it was opened"),
                path=path,
            ) from e
        h = self._headers.get(path)
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if h is not None and h.ident is not None and ident != h.ident:
            os.close(fd)
            raise CheckpointError(
                f"{self.label}: {path} changed since its header was read",
                hint="the file was replaced or modified during the run; run it again",
                path=path,
            )
        self._fds[path] = fd
        return fd

    def release(self) -> None:
        """Close the open file handles; the reader stays usable (files re-open on demand)."""
        with self._lock:
            while self._fds:
                _, fd = self._fds.popitem()
                os.close(fd)

    # -- remote (ranged) files ------------------------------------------------------------------

    def plan(self, names: Iterable[str]) -> None:
        """Say which tensors will be read: a remote file then fetches a run of adjacent planned
        tensors with one request (see :data:`MAX_RUN_BYTES`). No effect on local files."""
        with self._lock:
            self._planned = {n for n in names if n in self._infos}

    @property
    def remote_files(self) -> list[Path]:
        """The files of this reader read by byte ranges (sorted)."""
        return sorted(self._remote)

    def file_size(self, path: Path) -> int:
        """The size of ``path`` (a file of this reader) as its header was read."""
        return self._headers[Path(path)].size

    @property
    def bytes_fetched(self) -> int:
        """Bytes received for this reader's remote files (headers and tensors)."""
        return sum(src.fetched for src in self._remote.values())

    def _run(self, ti: TensorInfo) -> list[TensorInfo]:
        """``ti`` and the planned tensors right after it in its file, within MAX_RUN_BYTES."""
        run = [ti]
        order = self._order[ti.path]
        total, end = ti.nbytes, ti.start + ti.nbytes
        i = next(k for k, t in enumerate(order) if t.name == ti.name) + 1
        while i < len(order):
            t = order[i]
            i += 1
            if t.nbytes == 0:
                continue
            if t.start != end or t.name not in self._planned or t.name in self._stash:
                break
            if total + t.nbytes > MAX_RUN_BYTES:
                break
            run.append(t)
            total += t.nbytes
            end += t.nbytes
        return run

    def _read_remote(self, ti: TensorInfo, view: memoryview) -> None:
        stashed = self._stash.pop(ti.name, None)
        if stashed is not None:
            view[:] = stashed
            return
        run = self._run(ti)
        extra = [bytearray(t.nbytes) for t in run[1:]]
        self._remote[ti.path].read_into(ti.start, [view, *(memoryview(b) for b in extra)])
        self._planned.discard(ti.name)
        for t, b in zip(run[1:], extra, strict=True):
            self._stash[t.name] = b
            self._planned.discard(t.name)
        # Bounded: tensors stashed but never asked for go first.
        while sum(len(b) for b in self._stash.values()) > MAX_RUN_BYTES:
            self._stash.popitem(last=False)

    def _read_into(self, ti: TensorInfo, buf: bytearray | memoryview) -> None:
        if self._closed:
            raise CheckpointError(f"{self.label}: reader is closed", path=ti.path)
        view = memoryview(buf)
        if ti.path in self._remote:
            with self._lock:
                self._read_remote(ti, view[: ti.nbytes])
                self.bytes_read += ti.nbytes
            return
        done = 0
        with self._lock:
            fd = self._fd(ti.path)
            while done < ti.nbytes:
                part = view[done : min(ti.nbytes, done + _CHUNK)]
                if hasattr(os, "preadv"):
                    got = os.preadv(fd, [part], ti.start + done)
                else:  # pragma: no cover - non-Linux fallback
                    data = os.pread(fd, len(part), ti.start + done)
                    part[: len(data)] = data
                    got = len(data)
                if got <= 0:
                    raise CheckpointError(
                        f"{self.label}: {ti.path} ended while reading {ti.name!r} "
                        "(file changed since it was opened?)",
                        hint="fetch or copy the file again",
                        path=ti.path,
                    )
                done += got
            self.bytes_read += ti.nbytes
            if self.max_open == 0:
                os.close(self._fds.pop(ti.path))

    def read_bytes(self, name: str) -> bytes:
        """The raw little-endian bytes of ``name`` exactly as stored (for byte-identical copies)."""
        ti = self.info(name)
        buf = bytearray(ti.nbytes)
        self._read_into(ti, buf)
        return bytes(buf)

    def load(
        self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Tensor ``name`` with its stored shape, on ``device``, cast to ``dtype`` if given.

        Reads exactly that tensor's bytes with pread into fresh memory (no mmap); the result
        owns its memory, so dropping it returns the memory.
        """
        import torch

        ti = self.info(name)
        src = torch_dtype(ti.dtype)
        if ti.nbytes == 0:
            t = torch.empty(ti.shape, dtype=src)
        else:
            buf = bytearray(ti.nbytes)
            self._read_into(ti, buf)
            t = torch.frombuffer(buf, dtype=src).reshape(ti.shape)
            if sys.byteorder == "big":  # pragma: no cover
                t = t.view(torch.uint8).reshape(-1, DTYPE_SIZES[ti.dtype]).flip(-1)
                t = t.contiguous().view(src).reshape(ti.shape)
        dev = torch.device(device)
        if dtype is None or dtype == src:
            return t if dev.type == "cpu" else t.to(dev)
        # Move the narrower representation across the bus.
        if torch.empty((), dtype=dtype).element_size() < t.element_size():
            return t.to(dtype=dtype).to(dev)
        return t.to(dev).to(dtype=dtype)

    def load_into(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        """Tensor ``name`` read into ``buf``, returned as a view of it (stored dtype and shape).

        ``buf``: a contiguous CPU ``uint8`` tensor of exactly ``info(name).nbytes`` bytes (e.g.
        from :class:`safelora_cli.buffers.BufferPool`); nothing else is allocated. ValueError
        for a buffer of another size or kind.
        """
        import torch

        ti = self.info(name)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
            raise ValueError("load_into needs a contiguous 1-D uint8 buffer")
        if buf.device.type != "cpu" or buf.numel() != ti.nbytes:
            raise ValueError(f"{name}: buffer of {buf.numel()} bytes, tensor has {ti.nbytes}")
        src = torch_dtype(ti.dtype)
        out = buf.view(src).view(ti.shape) if ti.nbytes else torch.empty(ti.shape, dtype=src)
        if sys.byteorder == "big":  # pragma: no cover
            out.copy_(self.load(name))
        elif ti.nbytes:
            self._read_into(ti, memoryview(buf.numpy()))
        return out

    def close(self) -> None:
        """Close every open file handle (the reader can no longer read)."""
        with self._lock:
            self._stash.clear()
            while self._fds:
                _, fd = self._fds.popitem()
                os.close(fd)
            self._closed = True

    @property
    def open_handles(self) -> int:
        """How many shard files are open right now (at most :data:`MAX_OPEN_FILES`)."""
        return len(self._fds)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            for fd in self._fds.values():
                os.close(fd)
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"CheckpointReader({self.label!r}, {self.root}, {len(self)} tensors)"
