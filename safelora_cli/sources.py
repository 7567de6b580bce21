"""Model and adapter arguments: a local path or a Hugging Face Hub id (DESIGN §3).

A model argument is a local directory or ``.safetensors`` file when that path exists; otherwise
it must be a Hub id of the form ``org/name`` (with an optional revision: branch, tag or commit).

Hub models: the repository's file list and resolved commit come first (one API call, or the
local cache under ``HF_HUB_OFFLINE``), then ``config.json`` and ``model.safetensors.index.json``,
then, of the shards holding the tensors ``want(all_names)`` asks for, only the headers and the
bytes of the tensors read (``download="ranged"``: :mod:`safelora_cli.hub`, nothing written to
the Hugging Face cache; a shard already complete there is read from disk), or the whole shards
into that cache (``download="full"``, and always under ``HF_HUB_OFFLINE``). Every later request
is pinned to the resolved commit, so a branch moving mid-run cannot mix two versions.
``HF_ENDPOINT`` is read at call time and passed to every huggingface_hub call.

Environment, read at call time (not at import): ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``
(cache only, no network), ``HF_HUB_CACHE`` / ``HUGGINGFACE_HUB_CACHE`` / ``HF_HOME`` /
``XDG_CACHE_HOME`` (cache location, passed explicitly as ``cache_dir``), ``HF_TOKEN`` /
``HUGGING_FACE_HUB_TOKEN`` / ``HF_TOKEN_PATH`` / ``$HF_HOME/token`` (the token;
huggingface_hub's own lookup when none of these is set).

Fingerprints (what a projection cache must match, see :meth:`SourceSpec.fingerprint`):
- local: by content, not by file times: each ``.safetensors`` file's name relative to the
  checkpoint directory, its size and the SHA-256 of its header (the 8-byte length and the JSON
  header: every tensor's name, dtype, shape and offsets). The absolute path and ``mtime_ns`` are
  *not* part of it, so a moved, renamed or byte-identical copy (``cp -r``, a second download)
  of a checkpoint matches. Headers do not cover tensor values; the cache therefore also
  records, per entry, the SHA-256 of both source tensors' bytes (:func:`tensor_sha256`), and
  checks those when the files are not the very ones it was built from (size or ``mtime_ns``
  differ; see ``safelora_cli.cache``).
- hub: the repository id and the resolved commit sha.

Local arguments come first: an argument is a Hub id only when no such local path exists, and
a Hub failure for it says so first (a mistyped ``adapters/qvv`` is named as a missing path,
then as what the Hub said). A local directory of the wrong kind (an adapter or a projection
cache given as a model, a cache or a model given as an adapter) is refused naming its kind
(:func:`input_kind`).

Every failure is a one-line :class:`SourceError` (or :class:`CheckpointError` for a pickled
model or an input that is not a model, :class:`AdapterError` for one that is not an adapter)
with a hint.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from safelora_cli.errors import AdapterError, CheckpointError, SourceError
from safelora_cli.naming import natural_sorted
from safelora_cli.reader import (
    CONVERT_HINT,
    INDEX_NAME,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    CheckpointReader,
    read_index,
)

if TYPE_CHECKING:
    from safelora_cli.hub import HubFile

CONFIG_NAME = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
# What a Hub adapter snapshot fetches: the adapter, and the small files that travel with it
# (tokenizer, chat template, README). Top level only: training checkpoints in sub-folders stay.
ADAPTER_PATTERNS = [
    ADAPTER_CONFIG,
    "adapter_model.safetensors",
    "adapter_model.bin",
    "*.json",
    "*.md",
    "*.txt",
    "*.model",
    "*.jinja",
    "*.tiktoken",
]
ADAPTER_IGNORE = ["*/*"]

# --download: read only the needed tensors' bytes (default), or whole shards into the HF cache.
RANGED, FULL = "ranged", "full"
DOWNLOAD_MODES = (RANGED, FULL)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SourceSpec:
    """Where a checkpoint or adapter came from (recorded in caches and reports)."""

    arg: str
    kind: Literal["local", "hub"]
    path: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    files: dict[str, dict] = field(default_factory=dict)
    config: dict | None = None

    def to_json(self) -> dict:
        """A JSON-serialisable dict of every field."""
        return {
            "arg": self.arg,
            "kind": self.kind,
            "path": self.path,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "files": {k: dict(v) for k, v in sorted(self.files.items())},
            "config": self.config,
        }

    @classmethod
    def from_json(cls, data: dict) -> SourceSpec:
        """Inverse of :meth:`to_json`."""
        return cls(
            arg=data["arg"],
            kind=data["kind"],
            path=data["path"],
            repo_id=data.get("repo_id"),
            revision=data.get("revision"),
            commit=data.get("commit"),
            files={k: dict(v) for k, v in (data.get("files") or {}).items()},
            config=data.get("config"),
        )

    def fingerprint(self) -> dict:
        """What must be equal for a cache built from this source to be reused (by content).

        Local: ``{"kind": "local", "files": {name: {"size", "header_sha256"}}}`` over the
        ``.safetensors`` files (names relative to the checkpoint directory; the absolute path,
        the index and the files' times are deliberately left out, so an identical copy
        matches). Hub: ``{"kind": "hub", "repo_id", "commit"}``.
        """
        if self.kind == "hub":
            return {"kind": "hub", "repo_id": self.repo_id, "commit": self.commit}
        return {
            "kind": "local",
            "files": {
                k: {"size": v.get("size"), "header_sha256": v.get("header_sha256")}
                for k, v in sorted(self.files.items())
                if "header_sha256" in v
            },
        }

    def same_files(self, recorded: dict) -> bool:
        """True when ``recorded`` (a :meth:`to_json` of an earlier run) names these very files.

        Local only: the same resolved path (when ``recorded`` has one), and every weight file
        has the recorded size and ``mtime_ns`` (untouched since; what a cache may trust without
        reading tensor bytes again). Models unpacked from one archive can share file times, so
        the path is part of it: base and aligned given the other way round are not "the same".
        """
        if self.kind != "local" or recorded.get("kind") != "local":
            return False
        if recorded.get("path") not in (None, self.path):
            return False
        old = recorded.get("files") or {}
        if set(old) != set(self.files):
            return False
        return all(
            (old[k] or {}).get("size") == v.get("size")
            and (old[k] or {}).get("mtime_ns") == v.get("mtime_ns")
            for k, v in self.files.items()
        )

    def describe(self) -> str:
        """A short human label: the path, or ``org/name@commit``."""
        if self.kind == "hub":
            return f"{self.repo_id}@{(self.commit or self.revision or 'main')[:12]}"
        return self.path


# -- environment ------------------------------------------------------------------------------


def _truthy(v: str | None) -> bool:
    return (v or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read now."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(
        os.environ.get("TRANSFORMERS_OFFLINE")
    )


def _hf_home() -> Path:
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expandvars(home)).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface"


def hub_cache_dir() -> Path:
    """The Hub cache folder, from the environment as it is now (huggingface_hub's rules)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        v = os.environ.get(var)
        if v:
            return Path(os.path.expandvars(v)).expanduser()
    return _hf_home() / "hub"


def _token() -> str | None:
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        v = (os.environ.get(var) or "").strip()
        if v:
            return v
    tp = os.environ.get("HF_TOKEN_PATH")
    path = Path(tp).expanduser() if tp else _hf_home() / "token"
    try:
        v = path.read_text().strip()
    except OSError:
        return None  # huggingface_hub falls back to its own lookup
    return v or None


# -- argument classification ------------------------------------------------------------------


def is_repo_id(arg: str) -> bool:
    """True for ``org/name`` Hub ids (the only form accepted: a bare name is taken as a path)."""
    if not _REPO_ID.match(arg) or "--" in arg or ".." in arg or len(arg) > 96:
        return False
    return not arg.endswith((".git", ".safetensors", ".json", ".bin"))


def _classify(arg: str, *, what: str) -> Path | str:
    """The local Path when ``arg`` exists, else the repo id; SourceError when neither."""
    p = Path(arg).expanduser()
    if p.exists():
        return p
    if is_repo_id(arg):
        return arg
    why, guess = _nearby(p)
    raise SourceError(
        f"{what} {arg!r} does not exist ({why}) and is not a Hub id (org/name)",
        hint=(f"did you mean {guess}? " if guess else "")
        + "pass an existing directory or .safetensors file, or a Hub id like org/name",
        path=arg,
    )


def _nearby(p: Path) -> tuple[str, str | None]:
    """Why local path ``p`` does not exist, in words, and the closest existing spelling."""
    missing = p
    while not (missing.parent.exists() or missing.parent == missing):
        missing = missing.parent
    parent = missing.parent
    where = "the current directory" if str(parent) in ("", ".") else f"{parent}/"
    try:
        names = sorted(q.name for q in parent.iterdir()) if parent.is_dir() else []
    except OSError:
        names = []
    close = difflib.get_close_matches(missing.name, names, n=1, cutoff=0.6)
    guess = None
    if close:
        rest = p.relative_to(missing)
        guess = str(parent / close[0] if rest == Path(".") else parent / close[0] / rest)
    return f"{where} has no {missing.name}", guess


@contextlib.contextmanager
def _local_first(arg: str, label: str) -> Iterator[None]:
    """A Hub failure for an argument that names no local path says that first.

    ``adapters/qvv`` may be a mistyped path as well as a Hub id: the message says no such
    path exists (and the closest name that does), then what the Hub said.
    """
    try:
        yield
    except SourceError as e:
        why, guess = _nearby(Path(arg).expanduser())
        hub = e.message.removeprefix(f"{label}: ")
        hint = f"did you mean {guess}? " if guess else "check the path; "
        hint += f"for a Hub repo: {e.hint}" if e.hint else "or give an existing Hub id"
        raise SourceError(
            f"{label}: no local path {arg} ({why}); as a Hub id: {hub}", hint=hint, path=arg
        ) from None


def _model_marker(d: Path) -> str | None:
    """The file that makes directory ``d`` a model checkpoint (weights of any format), if any."""
    for name in (INDEX_NAME, SINGLE_NAME):
        if (d / name).is_file():
            return name
    for pattern in ("*.safetensors.index.json", "model-*-of-*.safetensors", "pytorch_model*.bin"):
        found = sorted(q.name for q in d.glob(pattern) if q.is_file())
        if found:
            return found[0]
    return None


def _is_cache_dir(d: Path) -> bool:
    from safelora_cli.cache import FORMAT_NAME, MANIFEST

    try:
        with open(d / MANIFEST, "rb") as fh:
            return FORMAT_NAME.encode() in fh.read(4096)  # "format" is the manifest's first key
    except OSError:
        return False


def input_kind(path: str | Path) -> Literal["adapter", "cache", "model"] | None:
    """What a local directory (or the directory of a file) holds, from its marker files.

    ``"cache"``: a safelora projection cache (``manifest.json``); ``"adapter"``: a PEFT adapter
    (``adapter_config.json`` and no model weights); ``"model"``: model weights
    (``model.safetensors``, an index, shards or ``pytorch_model*.bin``) and no
    ``adapter_config.json``. None when it is none of these or both an adapter and a model.
    """
    p = Path(path).expanduser()
    d = p if p.is_dir() else p.parent
    if _is_cache_dir(d):
        return "cache"
    adapter = (d / ADAPTER_CONFIG).is_file()
    model = _model_marker(d) is not None
    if adapter and not model:
        return "adapter"
    if model and not adapter:
        return "model"
    return None


def _refuse_as_model(path: Path, arg: str, label: str) -> None:
    """CheckpointError when ``path`` is an adapter or a projection cache, not a model."""
    kind = input_kind(path)
    if kind == "adapter":
        raise CheckpointError(
            f"{label}: {arg} is a LoRA adapter (it has {ADAPTER_CONFIG}), not a model; "
            "pass it as ADAPTER",
            hint="BASE and ALIGNED are full model checkpoints (config.json and "
            f"{SINGLE_NAME} or {INDEX_NAME}), such as the model the adapter was trained on",
            path=arg,
        )
    if kind == "cache":
        raise CheckpointError(
            f"{label}: {arg} is a projection cache (it has manifest.json), not a model; "
            "pass it with -p",
            hint="patch and inspect take a cache as -p CACHE; BASE and ALIGNED are model "
            f"checkpoints (config.json and {SINGLE_NAME} or {INDEX_NAME})",
            path=arg,
        )


def _refuse_as_adapter(path: Path, arg: str) -> None:
    """AdapterError when ``path`` is a projection cache or a model, not an adapter."""
    kind = input_kind(path)
    want = f"an adapter is a PEFT directory with {ADAPTER_CONFIG} and adapter_model.safetensors"
    if kind == "cache":
        raise AdapterError(
            f"adapter: {arg} is a projection cache (it has manifest.json), not a LoRA adapter; "
            "pass it with -p",
            hint=f"`safelora inspect -p {arg}` shows what it holds; {want}",
            path=arg,
        )
    if kind == "model":
        d = path if path.is_dir() else path.parent
        raise AdapterError(
            f"adapter: {arg} is a model checkpoint (it has {_model_marker(d)}), not a LoRA "
            "adapter; pass it as BASE or ALIGNED",
            hint="models go to compute-projections as BASE ALIGNED and to patch or inspect as "
            f"--base/--aligned; {want}",
            path=arg,
        )


# -- local ------------------------------------------------------------------------------------


def header_sha256(path: Path) -> str:
    """SHA-256 of a safetensors file's header: its 8-byte length and the JSON after it.

    The header names every tensor with its dtype, shape and byte offsets, so equal digests and
    equal sizes mean the same layout (not the same values: see :func:`tensor_sha256`). The
    file was validated by :func:`safelora_cli.reader.read_header` before this is called.
    """
    from safelora_cli.reader import MAX_HEADER_BYTES

    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        # Bounded as read_header bounds it (a file swapped since would otherwise be read whole).
        n = min(int.from_bytes(raw_len, "little"), MAX_HEADER_BYTES)
        return hashlib.sha256(raw_len + fh.read(n)).hexdigest()


def tensor_sha256(reader: CheckpointReader, name: str) -> str:
    """SHA-256 of tensor ``name``'s bytes exactly as stored (what a cache entry records)."""
    return hashlib.sha256(reader.read_bytes(name)).hexdigest()


def _stat_files(files: Iterable[Path], root: Path, *, headers: bool = False) -> dict[str, dict]:
    """Per file (relative name): size and ``mtime_ns``; with ``headers`` (files validated by
    the reader) also the header digest of each ``.safetensors`` file."""
    out: dict[str, dict] = {}
    for f in files:
        st = f.stat()
        try:
            rel = f.relative_to(root).as_posix()
        except ValueError:
            rel = f.name
        out[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if headers and f.name.endswith(".safetensors"):
            out[rel]["header_sha256"] = header_sha256(f)
    return out


def _read_config(path: Path, *, label: str) -> dict | None:
    if not path.is_file():
        return None
    from safelora_cli.reader import MAX_JSON_BYTES

    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(
                f"{label}: {path} is {size} bytes, too large for a config.json",
                hint="fix or remove the malformed config.json",
                path=path,
            )
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{label}: cannot read {path}: {_first_line(e)}",
            hint="fix or remove the malformed config.json",
            path=path,
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{label}: {path} is not a JSON object", hint="fix or remove it", path=path
        )
    return data


def _open_local(path: Path, arg: str, label: str) -> tuple[CheckpointReader, SourceSpec]:
    reader = CheckpointReader.open(path, label=label)
    root = reader.root
    weight_files = list(reader.files)
    if reader.index_path is not None:
        weight_files.append(reader.index_path)
    spec = SourceSpec(
        arg=arg,
        kind="local",
        path=str(path.resolve()),
        files=_stat_files(weight_files, root, headers=True),
        config=_read_config(root / CONFIG_NAME, label=label),
    )
    return reader, spec


# -- hub --------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def hub_error(
    e: BaseException, repo_id: str, revision: str | None, filename: str | None = None
) -> SourceError:
    """A one-line SourceError for a huggingface_hub (or network) exception."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    what = f"{filename} of Hub repo {repo_id}@{rev}" if filename else f"Hub repo {repo_id}@{rev}"
    login = "log in with `hf auth login` or set HF_TOKEN"
    page = f"{_model_page_root()}/{repo_id}"
    if isinstance(e, GatedRepoError):
        return SourceError(
            f"Hub repo {repo_id} is gated and this account has no access",
            hint=f"accept the licence on the model page ({page}), then {login}",
            path=repo_id,
        )
    if isinstance(e, RepositoryNotFoundError):
        return SourceError(
            f"Hub repo {repo_id} not found (or private and not accessible)",
            hint=f"check the id; for a private repo {login}",
            path=repo_id,
        )
    if isinstance(e, RevisionNotFoundError):
        return SourceError(
            f"revision {rev!r} not found in Hub repo {repo_id}",
            hint="check --revision (a branch, tag or commit sha of that repo)",
            path=repo_id,
        )
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if hub_offline():
            return SourceError(
                f"{what} is not in the local Hub cache ({hub_cache_dir()}) "
                "and HF_HUB_OFFLINE is set",
                hint=f"download it once with network access (hf download {repo_id}), "
                "or unset HF_HUB_OFFLINE",
                path=repo_id,
            )
        return SourceError(
            f"cannot reach the Hub and {what} is not in the local cache ({hub_cache_dir()})",
            hint="check the network connection or proxy settings, then retry",
            path=repo_id,
        )
    if isinstance(e, EntryNotFoundError):
        return SourceError(
            f"{what} not found",
            hint="check the repo id and --revision; the file may not exist at that revision",
            path=repo_id,
        )
    if isinstance(e, HFValidationError):
        return SourceError(
            f"{repo_id!r} is not a valid Hub id: {_first_line(e)}",
            hint="use the form org/name",
            path=repo_id,
        )
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return SourceError(
                f"access to {what} was refused (HTTP {status})",
                hint=f"if the model is gated, accept the licence on the model page ({page}); "
                f"then {login} with a token that can read {repo_id}",
                path=repo_id,
            )
        return SourceError(
            f"Hub request for {what} failed: {_first_line(e)}",
            hint="retry later; if it persists, check https://status.huggingface.co",
            path=repo_id,
        )
    transport = isinstance(e, (ConnectionError, TimeoutError)) or (
        type(e).__module__ or ""
    ).startswith(("httpx", "requests", "urllib3"))
    if isinstance(e, OSError) and not transport:
        return SourceError(
            f"cannot store {what} in the Hub cache ({hub_cache_dir()}): {_first_line(e)}",
            hint="check free disk space and write permission there, or set HF_HUB_CACHE",
            path=repo_id,
        )
    return SourceError(
        f"cannot reach the Hub for {what}: {_first_line(e)}",
        hint="check the network connection, or set HF_HUB_OFFLINE=1 to use the local cache",
        path=repo_id,
    )


def _model_page_root() -> str:
    """Where model pages are: the Hub endpoint (``HF_ENDPOINT``), huggingface.co by default."""
    from safelora_cli.hub import hub_endpoint

    return hub_endpoint()


def is_hub_failure(e: BaseException) -> bool:
    """Exceptions from huggingface_hub / the network that :func:`hub_error` turns into messages."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    if isinstance(e, (EntryNotFoundError, HfHubHTTPError, HFValidationError, ConnectionError)):
        return True
    if isinstance(e, (TimeoutError, OSError)):
        return True
    # httpx / requests transport errors, without importing either.
    mod = type(e).__module__ or ""
    return mod.startswith(("httpx", "requests", "urllib3"))


def _repo_folder(repo_id: str) -> Path:
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _cached_listing(repo_id: str, revision: str | None) -> tuple[str, list[str]]:
    """Commit and file list of a cached snapshot (no network); SourceError when not cached."""
    rev = revision or "main"
    folder = _repo_folder(repo_id)
    hint_dl = (
        f"download it once with network access (hf download {repo_id}), or unset HF_HUB_OFFLINE"
    )
    if not folder.is_dir():
        raise SourceError(
            f"Hub repo {repo_id} is not in the local Hub cache ({hub_cache_dir()}) "
            "and HF_HUB_OFFLINE is set",
            hint=hint_dl,
            path=repo_id,
        )
    if _COMMIT.match(rev):
        commit = rev
    else:
        ref = folder / "refs" / rev
        try:
            commit = ref.read_text().strip()
        except OSError:
            raise SourceError(
                f"revision {rev!r} of Hub repo {repo_id} is not in the local Hub cache "
                "and HF_HUB_OFFLINE is set",
                hint=hint_dl,
                path=repo_id,
            ) from None
    snap = folder / "snapshots" / commit
    if not _COMMIT.match(commit) or not snap.is_dir():
        raise SourceError(
            f"Hub repo {repo_id}@{rev} (commit {commit[:12]}) is not in the local Hub cache",
            hint=hint_dl,
            path=repo_id,
        )
    files = sorted(
        p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file() or p.is_symlink()
    )
    return commit, files


def _remote_listing(repo_id: str, revision: str | None) -> tuple[str, list[str]]:
    """Commit and file list from the Hub (one API call)."""
    from huggingface_hub import HfApi

    from safelora_cli.hub import hub_endpoint

    info = HfApi(endpoint=hub_endpoint()).model_info(repo_id, revision=revision, token=_token())
    files = sorted(s.rfilename for s in (info.siblings or []))
    if not info.sha:
        raise SourceError(f"Hub repo {repo_id} returned no commit sha", path=repo_id)
    return info.sha, files


def _listing(repo_id: str, revision: str | None) -> tuple[str, list[str], bool]:
    """(commit, files, offline). Falls back to the cache when the Hub cannot be reached."""
    if hub_offline():
        commit, files = _cached_listing(repo_id, revision)
        return commit, files, True
    try:
        commit, files = _remote_listing(repo_id, revision)
        return commit, files, False
    except SourceError:
        raise
    except Exception as e:
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError

        if isinstance(e, (HfHubHTTPError, HFValidationError)):
            raise hub_error(e, repo_id, revision) from None
        if not is_hub_failure(e):
            raise
        # No connection: use what the cache holds, as huggingface_hub itself does.
        try:
            commit, files = _cached_listing(repo_id, revision)
        except SourceError:
            raise hub_error(e, repo_id, revision) from None
        return commit, files, True


def hub_download(
    repo_id: str,
    filename: str,
    *,
    commit: str,
    revision: str | None,
    offline: bool,
    record_ref: bool = False,
) -> Path:
    """One file of ``repo_id`` at ``commit`` into the cache (or from it when offline).

    ``record_ref`` (online, ``revision`` a branch or tag, main by default): ask for the file by
    that name, so huggingface_hub records ``refs/<revision>`` -> commit in the cache (a later
    ``HF_HUB_OFFLINE=1`` run without ``--revision`` finds the snapshot), and check that the name
    still points at ``commit`` (SourceError if the branch moved during the run).
    """
    from huggingface_hub import hf_hub_download

    from safelora_cli.hub import hub_endpoint

    ref = revision or "main"
    by_ref = record_ref and not offline and not _COMMIT.match(ref)
    try:
        path = Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=ref if by_ref else commit,
                cache_dir=str(hub_cache_dir()),
                token=_token(),
                local_files_only=offline,
                endpoint=hub_endpoint(),
            )
        )
    except Exception as e:
        if is_hub_failure(e):
            raise hub_error(e, repo_id, revision, filename) from None
        raise
    if by_ref:
        got = path.parents[len(Path(filename).parts) - 1].name
        if got != commit:
            raise SourceError(
                f"Hub repo {repo_id}@{ref} moved from commit {commit[:12]} to {got[:12]} "
                "during the run",
                hint="run the same command again, or pin a commit with --revision",
                path=repo_id,
            )
    return path


def _pick_weights(files: list[str], repo_id: str, rev: str, label: str) -> tuple[str, bool]:
    """(file, is_index) of the safetensors weights in a repo listing; refuses pickles."""
    top = [f for f in files if "/" not in f]
    if INDEX_NAME in top:
        return INDEX_NAME, True
    if SINGLE_NAME in top:
        return SINGLE_NAME, False
    indexes = [f for f in top if f.endswith(".safetensors.index.json")]
    singles = [f for f in top if f.endswith(".safetensors")]
    if len(indexes) == 1:
        return indexes[0], True
    if len(singles) == 1 and not indexes:
        return singles[0], False
    if singles or indexes:
        raise SourceError(
            f"{label}: Hub repo {repo_id}@{rev} holds several safetensors files and no "
            f"{INDEX_NAME}",
            hint="download it and pass the .safetensors file to use",
            path=repo_id,
        )
    pickled = [f for f in top if f.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise CheckpointError(
            f"{label}: Hub repo {repo_id}@{rev} has only pickled weights ({pickled[0]}); "
            "only safetensors is read",
            hint=f"download it (hf download {repo_id} --local-dir DIR), then " + CONVERT_HINT,
            path=repo_id,
        )
    raise SourceError(
        f"{label}: Hub repo {repo_id}@{rev} has no model.safetensors or {INDEX_NAME}"
        + (" in the local cache" if hub_offline() else ""),
        hint="check the repo id and --revision",
        path=repo_id,
    )


def check_download(mode: str) -> str:
    """``mode`` if it is one of :data:`DOWNLOAD_MODES`, else UsageError (exit 2)."""
    m = (mode or RANGED).strip().lower()
    if m not in DOWNLOAD_MODES:
        from safelora_cli.errors import UsageError

        raise UsageError(
            f"--download {mode!r} is not one of {', '.join(DOWNLOAD_MODES)}",
            hint="ranged: fetch only the needed tensors' bytes; full: whole shards into the "
            "Hugging Face cache",
        )
    return m


def _cached_file(repo_id: str, filename: str, commit: str) -> Path | None:
    """``filename`` at ``commit`` when the Hugging Face cache holds it complete, else None.

    huggingface_hub writes a blob as ``<etag>.incomplete`` and renames it when it is whole, so
    a snapshot entry that resolves to a regular file is a complete file.
    """
    from huggingface_hub import try_to_load_from_cache

    got = try_to_load_from_cache(repo_id, filename, cache_dir=str(hub_cache_dir()), revision=commit)
    if isinstance(got, str) and Path(got).is_file():
        return Path(got)
    return None


def _weight_sources(
    repo_id: str,
    names: list[str],
    *,
    commit: str,
    revision: str | None,
    offline: bool,
    download: str,
) -> tuple[dict[str, Path], dict[str, HubFile]]:
    """Per weight file: a complete local file (the HF cache), or a file read by byte ranges.

    ``full`` or offline: every file through ``hf_hub_download`` (whole, into the cache; cache
    only when offline). ``ranged``: a file already complete in the cache is read from disk,
    the others by byte ranges (one HEAD each; nothing written to the HF cache).
    """
    from safelora_cli.hub import hub_endpoint, open_file

    local: dict[str, Path] = {}
    remote: dict[str, HubFile] = {}
    for name in names:
        if offline or download == FULL:
            local[name] = hub_download(
                repo_id, name, commit=commit, revision=revision, offline=offline
            )
            continue
        cached = _cached_file(repo_id, name, commit)
        if cached is not None:
            local[name] = cached
        else:
            remote[name] = open_file(
                repo_id,
                name,
                commit=commit,
                revision=revision,
                token=_token(),
                endpoint=hub_endpoint(),
            )
    return local, remote


def _open_hub(
    repo_id: str,
    revision: str | None,
    label: str,
    want: Callable[[list[str]], Iterable[str]] | None,
    download: str = "ranged",
) -> tuple[CheckpointReader, SourceSpec]:
    commit, files, offline = _listing(repo_id, revision)
    rev = revision or "main"
    weights, is_index = _pick_weights(files, repo_id, rev, label)

    def get(name: str) -> Path:
        # The first file asked for by the revision's name records refs/<revision> in the cache.
        return hub_download(
            repo_id,
            name,
            commit=commit,
            revision=revision,
            offline=offline,
            record_ref=name == (CONFIG_NAME if CONFIG_NAME in files else weights),
        )

    fetched: dict[str, Path] = {}
    config = None
    if CONFIG_NAME in files:
        fetched[CONFIG_NAME] = get(CONFIG_NAME)
        config = _read_config(fetched[CONFIG_NAME], label=label)
    # Where huggingface_hub puts this commit's files (ranged files are never written there).
    snap = _repo_folder(repo_id) / "snapshots" / commit

    def sources_for(names: list[str]) -> tuple[dict[str, Path], dict[str, HubFile]]:
        return _weight_sources(
            repo_id, names, commit=commit, revision=revision, offline=offline, download=download
        )

    if is_index:
        fetched[weights] = first = get(weights)
        snap = first.parent
        wm = read_index(first, label)
        all_names = natural_sorted(wm)
        wanted = all_names if want is None else list(want(all_names))
        shards = sorted({wm[n] for n in wanted if n in wm})
        local, remote = sources_for(shards)
        fetched.update(local)
        reader = CheckpointReader.from_index(first, label=label, shards=shards, remote=remote)
    else:
        local, remote = sources_for([weights])
        fetched.update(local)
        path = local[weights] if weights in local else snap / weights
        snap = path.parent
        reader = CheckpointReader.from_files(
            [path],
            label=label,
            root=snap,
            remote={path: remote[weights]} if weights in remote else None,
        )
    sizes = {k: {"size": os.path.getsize(v)} for k, v in fetched.items()}
    sizes.update({k: {"size": v.size} for k, v in remote.items()})
    spec = SourceSpec(
        arg=repo_id,
        kind="hub",
        path=str(snap),
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        files=dict(sorted(sizes.items())),
        config=config,
    )
    return reader, spec


# -- public -----------------------------------------------------------------------------------


def open_model(
    arg: str,
    *,
    revision: str | None = None,
    label: str,
    want: Callable[[list[str]], Iterable[str]] | None = None,
    download: str = "ranged",
) -> tuple[CheckpointReader, SourceSpec]:
    """A reader over a model checkpoint and its provenance.

    ``arg``: an existing local directory / ``.safetensors`` file, or a Hub id ``org/name``
    (``revision``: branch, tag or commit; default main). For a sharded Hub model only the shards
    holding ``want(all_names)`` are downloaded (all when ``want`` is None); the reader then lists
    only those shards' tensors. ``want`` is ignored for local paths (every file is present and is
    validated). ``download`` (Hub ids, :func:`check_download`): ``ranged`` (default) reads only
    the needed tensors' bytes by HTTP ranges (shards already complete in the Hugging Face cache
    from disk); ``full`` downloads the needed shards whole into that cache. Under
    ``HF_HUB_OFFLINE`` (or with no connection) both read the cache only.
    Raises SourceError / CheckpointError (UsageError for an unknown ``download``).
    """
    download = check_download(download)
    target = _classify(str(arg), what=label)
    if isinstance(target, Path):
        if revision is not None:
            raise SourceError(
                f"{label}: --revision {revision!r} given but {arg} is a local path",
                hint="drop the revision, or pass a Hub id",
                path=arg,
            )
        _refuse_as_model(target, str(arg), label)
        return _open_local(target, str(arg), label)
    with _local_first(str(arg), label):
        return _open_hub(target, revision, label, want, download)


def resolve_adapter(arg: str, *, revision: str | None = None) -> tuple[Path, SourceSpec]:
    """The local directory of a PEFT adapter and its provenance.

    ``arg``: a local adapter directory (or a file inside it), or a Hub id ``org/name`` whose
    snapshot (``adapter_config.json``, ``adapter_model.safetensors``/``.bin`` and small
    top-level files such as README and tokenizer files) is downloaded, or read from the cache
    under ``HF_HUB_OFFLINE``. The directory's contents are not validated here (see adapter.py),
    except that a local projection cache or model checkpoint is refused as such (AdapterError).
    """
    if Path(str(arg)).expanduser().exists() or not is_repo_id(str(arg)):
        return _resolve_adapter(str(arg), revision=revision)
    with _local_first(str(arg), "adapter"):
        return _resolve_adapter(str(arg), revision=revision)


def _resolve_adapter(arg: str, *, revision: str | None = None) -> tuple[Path, SourceSpec]:
    target = _classify(str(arg), what="adapter")
    if isinstance(target, Path):
        if revision is not None:
            raise SourceError(
                f"adapter: --revision {revision!r} given but {arg} is a local path",
                hint="drop the revision, or pass a Hub id",
                path=arg,
            )
        _refuse_as_adapter(target, str(arg))
        d = target if target.is_dir() else target.parent
        files = sorted(
            f
            for f in d.iterdir()
            if f.is_file() and (f.name == ADAPTER_CONFIG or f.name.startswith("adapter_model"))
        )
        spec = SourceSpec(
            arg=str(arg), kind="local", path=str(d.resolve()), files=_stat_files(files, d)
        )
        return d, spec

    from huggingface_hub import snapshot_download

    from safelora_cli.hub import hub_endpoint

    repo_id = target
    offline = hub_offline()
    try:
        snap = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=str(hub_cache_dir()),
                token=_token(),
                local_files_only=offline,
                allow_patterns=ADAPTER_PATTERNS,
                ignore_patterns=ADAPTER_IGNORE,
                endpoint=hub_endpoint(),
            )
        )
    except Exception as e:
        if is_hub_failure(e):
            raise hub_error(e, repo_id, revision) from None
        raise
    commit = snap.name if _COMMIT.match(snap.name) else None
    if not (snap / ADAPTER_CONFIG).is_file():
        raise SourceError(
            f"Hub repo {repo_id}@{revision or 'main'} has no {ADAPTER_CONFIG}"
            + (" in the local cache" if offline else ""),
            hint="is it a PEFT LoRA adapter repo? check the id and --revision",
            path=repo_id,
        )
    files = {
        f.name: {"size": os.path.getsize(f)}
        for f in sorted(snap.iterdir())
        if f.is_file() and (f.name == ADAPTER_CONFIG or f.name.startswith("adapter_model"))
    }
    spec = SourceSpec(
        arg=repo_id,
        kind="hub",
        path=str(snap),
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        files=files,
        config=None,
    )
    return snap, spec
