"""Model and adapter arguments: a local path or a Hugging Face Hub id (DESIGN §3).

A model argument is a local directory or ``.safetensors`` file when that path exists; otherwise
it must be a Hub id of the form ``org/name`` (with an optional revision: branch, tag or commit).

Hub models: the repository's file list and resolved commit come first (one API call, or the
local cache under ``HF_HUB_OFFLINE``), then ``config.json`` and ``model.safetensors.index.json``,
then only the shards holding the tensors ``want(all_names)`` asks for. Every later download is
pinned to the resolved commit, so a branch moving mid-run cannot mix two versions.

Environment, read at call time (not at import): ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``
(cache only, no network), ``HF_HUB_CACHE`` / ``HUGGINGFACE_HUB_CACHE`` / ``HF_HOME`` /
``XDG_CACHE_HOME`` (cache location, passed explicitly as ``cache_dir``), ``HF_TOKEN`` /
``HUGGING_FACE_HUB_TOKEN`` / ``HF_TOKEN_PATH`` / ``$HF_HOME/token`` (the token;
huggingface_hub's own lookup when none of these is set).

Fingerprints (what a projection cache must match, see :meth:`SourceSpec.fingerprint`):
- local: the weight files' names relative to the checkpoint directory, sizes and ``mtime_ns``.
  The absolute path is *not* part of it, so moving or renaming a checkpoint directory keeps a
  cache valid, while rewriting, touching or copying its files (new mtimes) invalidates it.
- hub: the repository id and the resolved commit sha.

Every failure is a one-line :class:`SourceError` (or :class:`CheckpointError` for a pickled
model) with a hint.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from safelora_cli.errors import CheckpointError, SourceError
from safelora_cli.naming import natural_sorted
from safelora_cli.reader import (
    CONVERT_HINT,
    INDEX_NAME,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    CheckpointReader,
    read_index,
)

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
        """What must be equal for a cache built from this source to be reused.

        Local: ``{"kind": "local", "files": {name: {"size", "mtime_ns"}}}`` over the weight files
        (names relative to the checkpoint directory; the absolute path is deliberately left
        out). Hub: ``{"kind": "hub", "repo_id", "commit"}``.
        """
        if self.kind == "hub":
            return {"kind": "hub", "repo_id": self.repo_id, "commit": self.commit}
        return {
            "kind": "local",
            "files": {
                k: {"size": v.get("size"), "mtime_ns": v.get("mtime_ns")}
                for k, v in sorted(self.files.items())
            },
        }

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
    raise SourceError(
        f"{what} {arg!r} does not exist and is not a Hub id (org/name)",
        hint="pass an existing directory or .safetensors file, or a Hub id like org/name",
        path=arg,
    )


# -- local ------------------------------------------------------------------------------------


def _stat_files(files: Iterable[Path], root: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for f in files:
        st = f.stat()
        try:
            rel = f.relative_to(root).as_posix()
        except ValueError:
            rel = f.name
        out[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
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
        files=_stat_files(weight_files, root),
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
    if isinstance(e, GatedRepoError):
        return SourceError(
            f"Hub repo {repo_id} is gated and this account has no access",
            hint=f"request access at https://huggingface.co/{repo_id}, then {login}",
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
                hint=f"{login} with a token that can read {repo_id}",
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


def _is_hub_failure(e: BaseException) -> bool:
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

    info = HfApi().model_info(repo_id, revision=revision, token=_token())
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
        if not _is_hub_failure(e):
            raise
        # No connection: use what the cache holds, as huggingface_hub itself does.
        try:
            commit, files = _cached_listing(repo_id, revision)
        except SourceError:
            raise hub_error(e, repo_id, revision) from None
        return commit, files, True


def hub_download(
    repo_id: str, filename: str, *, commit: str, revision: str | None, offline: bool
) -> Path:
    """One file of ``repo_id`` at ``commit`` into the cache (or from it when offline)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=commit,
                cache_dir=str(hub_cache_dir()),
                token=_token(),
                local_files_only=offline,
            )
        )
    except Exception as e:
        if _is_hub_failure(e):
            raise hub_error(e, repo_id, revision, filename) from None
        raise


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
            hint=CONVERT_HINT,
            path=repo_id,
        )
    raise SourceError(
        f"{label}: Hub repo {repo_id}@{rev} has no model.safetensors or {INDEX_NAME}"
        + (" in the local cache" if hub_offline() else ""),
        hint="check the repo id and --revision",
        path=repo_id,
    )


def _open_hub(
    repo_id: str,
    revision: str | None,
    label: str,
    want: Callable[[list[str]], Iterable[str]] | None,
) -> tuple[CheckpointReader, SourceSpec]:
    commit, files, offline = _listing(repo_id, revision)
    rev = revision or "main"
    weights, is_index = _pick_weights(files, repo_id, rev, label)

    def get(name: str) -> Path:
        return hub_download(repo_id, name, commit=commit, revision=revision, offline=offline)

    fetched: dict[str, Path] = {}
    config = None
    if CONFIG_NAME in files:
        fetched[CONFIG_NAME] = get(CONFIG_NAME)
        config = _read_config(fetched[CONFIG_NAME], label=label)
    fetched[weights] = first = get(weights)
    if is_index:
        wm = read_index(first, label)
        all_names = natural_sorted(wm)
        wanted = all_names if want is None else list(want(all_names))
        shards = sorted({wm[n] for n in wanted if n in wm})
        for s in shards:
            fetched[s] = get(s)
        reader = CheckpointReader.from_index(first, label=label, shards=shards)
    else:
        reader = CheckpointReader.from_files([first], label=label, root=first.parent)
    spec = SourceSpec(
        arg=repo_id,
        kind="hub",
        path=str(first.parent),
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        files={k: {"size": os.path.getsize(v)} for k, v in sorted(fetched.items())},
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
) -> tuple[CheckpointReader, SourceSpec]:
    """A reader over a model checkpoint and its provenance.

    ``arg``: an existing local directory / ``.safetensors`` file, or a Hub id ``org/name``
    (``revision``: branch, tag or commit; default main). For a sharded Hub model only the shards
    holding ``want(all_names)`` are downloaded (all when ``want`` is None); the reader then lists
    only those shards' tensors. ``want`` is ignored for local paths (every file is present and is
    validated). Raises SourceError / CheckpointError.
    """
    target = _classify(str(arg), what=label)
    if isinstance(target, Path):
        if revision is not None:
            raise SourceError(
                f"{label}: --revision {revision!r} given but {arg} is a local path",
                hint="drop the revision, or pass a Hub id",
                path=arg,
            )
        return _open_local(target, str(arg), label)
    return _open_hub(target, revision, label, want)


def resolve_adapter(arg: str, *, revision: str | None = None) -> tuple[Path, SourceSpec]:
    """The local directory of a PEFT adapter and its provenance.

    ``arg``: a local adapter directory (or a file inside it), or a Hub id ``org/name`` whose
    snapshot (``adapter_config.json``, ``adapter_model.safetensors``/``.bin`` and small
    top-level files such as README and tokenizer files) is downloaded, or read from the cache
    under ``HF_HUB_OFFLINE``. The directory's contents are not validated here (see adapter.py).
    """
    target = _classify(str(arg), what="adapter")
    if isinstance(target, Path):
        if revision is not None:
            raise SourceError(
                f"adapter: --revision {revision!r} given but {arg} is a local path",
                hint="drop the revision, or pass a Hub id",
                path=arg,
            )
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
            )
        )
    except Exception as e:
        if _is_hub_failure(e):
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
