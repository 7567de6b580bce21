"""Sources: local paths and Hub ids, resolved offline against a Hub cache built by the test.

The autouse ``offline_hf`` fixture (conftest) sets HF_HUB_OFFLINE=1 and points HF_HOME /
HF_HUB_CACHE at an empty temporary folder; tests here lay out
``models--org--name/{blobs,refs,snapshots/<commit>}`` by hand, as huggingface_hub does.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hf_errors
from safetensors.torch import save_file

from safelora_cli import sources
from safelora_cli.errors import CheckpointError, SourceError
from safelora_cli.sources import SourceSpec, open_model, resolve_adapter
from tests import factory

COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"


def hub_cache() -> Path:
    return Path(os.environ["HF_HUB_CACHE"])


def cache_repo(
    repo_id: str,
    src: Path,
    *,
    commit: str = COMMIT_A,
    refs: tuple[str, ...] = ("main",),
    skip: tuple[str, ...] = (),
    cache: Path | None = None,
) -> Path:
    """Lay ``src``'s files out as huggingface_hub's cache does: blobs + snapshot symlinks."""
    repo = (cache or hub_cache()) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.name in skip:
            continue
        blob = repo / "blobs" / f"{commit[:8]}-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = e.value.message
    assert "\n" not in msg and e.value.hint
    return msg


def http_error(cls: type, status: int, url: str = "https://huggingface.co/api/models/org/x"):
    """A real huggingface_hub exception, with the HTTP response it carries in real life."""
    http = importlib.import_module(hf_errors.Response.__module__.split(".")[0])
    resp = http.Response(status, request=http.Request("GET", url))
    return cls(f"{status} Client Error.\n\nsome detail", response=resp)


@pytest.fixture
def sharded(tmp_path: Path) -> tuple[Path, dict]:
    """A 3-shard Llama checkpoint (with config.json) and its tensors."""
    w = factory.llama_weights(layers=3)
    src = factory.write_checkpoint(tmp_path / "src", w, shards=3, config="llama")
    return src, w


def _weight_map(d: Path) -> dict[str, str]:
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]


# -- Hub, offline -----------------------------------------------------------------------------


def test_cached_hub_model_fetches_only_needed_shards(sharded) -> None:
    src, w = sharded
    wm = _weight_map(src)
    wanted = [n for n in wm if ".layers.0." in n]
    needed = sorted({wm[n] for n in wanted})
    unneeded = sorted(set(wm.values()) - set(needed))
    assert unneeded, "the fixture must spread layers over several shards"
    # The un-needed shards are not in the cache at all: opening must not touch them.
    cache_repo("org/tiny", src, skip=tuple(unneeded))

    seen: list[list[str]] = []

    def want(names: list[str]) -> list[str]:
        seen.append(list(names))
        return [n for n in names if ".layers.0." in n]

    reader, spec = open_model("org/tiny", label="base model", want=want)
    with reader:
        assert sorted(seen[0]) == sorted(wm)  # want sees every name of the index
        assert set(wanted) <= set(reader.names())
        for n in wanted:
            assert torch.equal(reader.load(n), w[n])
    assert spec.kind == "hub" and spec.repo_id == "org/tiny"
    assert spec.revision is None and spec.commit == COMMIT_A
    assert spec.config == json.loads((src / "config.json").read_text())
    assert set(spec.files) == {"config.json", "model.safetensors.index.json", *needed}
    for name, meta in spec.files.items():
        assert meta["size"] == (src / name).stat().st_size
    assert spec.fingerprint() == {"kind": "hub", "repo_id": "org/tiny", "commit": COMMIT_A}
    assert SourceSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_cached_hub_model_all_shards_by_default(sharded) -> None:
    src, w = sharded
    cache_repo("org/tiny", src)
    reader, spec = open_model("org/tiny", label="base model")
    with reader:
        assert set(reader.names()) == set(w)
    assert set(_weight_map(src).values()) <= set(spec.files)


def test_cached_single_file_model(tmp_path: Path) -> None:
    w = factory.gpt2_weights()
    src = factory.write_checkpoint(tmp_path / "src", w, config="gpt2")
    cache_repo("org/g2", src)
    reader, spec = open_model("org/g2", label="aligned model")
    with reader:
        assert set(reader.names()) == set(w)
    assert spec.config is not None and spec.config.get("model_type") == "gpt2"


def test_revision_resolved_through_refs(tmp_path: Path) -> None:
    one = factory.write_checkpoint(tmp_path / "one", {"w": torch.ones(2)})
    two = factory.write_checkpoint(tmp_path / "two", {"w": torch.full((2,), 2.0)})
    cache_repo("org/rev", one, commit=COMMIT_A, refs=("main",))
    cache_repo("org/rev", two, commit=COMMIT_B, refs=("v2",))
    reader, spec = open_model("org/rev", revision="v2", label="base model")
    assert spec.commit == COMMIT_B and spec.revision == "v2"
    assert torch.equal(reader.load("w"), torch.full((2,), 2.0))
    reader, spec = open_model("org/rev", label="base model")
    assert spec.commit == COMMIT_A
    assert torch.equal(reader.load("w"), torch.ones(2))
    reader, spec = open_model("org/rev", revision=COMMIT_B, label="base model")
    assert spec.commit == COMMIT_B


def test_hf_home_alone_locates_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sharded
) -> None:
    src, _ = sharded
    home = tmp_path / "home"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    cache_repo("org/tiny", src, cache=home / "hub")
    reader, spec = open_model("org/tiny", label="base model")
    assert spec.path.startswith(str(home / "hub"))
    reader.close()


def test_not_cached_offline(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as ei:
        open_model("org/absent", label="base model")
    msg = one_line(ei)
    assert "org/absent" in msg and "HF_HUB_OFFLINE" in msg


def test_revision_not_cached_offline(sharded) -> None:
    src, _ = sharded
    cache_repo("org/tiny", src)
    with pytest.raises(SourceError) as ei:
        open_model("org/tiny", revision="v9", label="base model")
    msg = one_line(ei)
    assert "v9" in msg and "org/tiny" in msg


def test_needed_shard_not_cached_offline(sharded) -> None:
    src, _ = sharded
    wm = _weight_map(src)
    first = sorted(set(wm.values()))[0]
    cache_repo("org/tiny", src, skip=(first,))
    with pytest.raises(SourceError) as ei:
        open_model("org/tiny", label="base model")
    msg = one_line(ei)
    assert first in msg and "HF_HUB_OFFLINE" in msg


def test_pickled_only_hub_repo_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (src / "config.json").write_text("{}")
    cache_repo("org/old", src)
    with pytest.raises(CheckpointError) as ei:
        open_model("org/old", label="base model")
    assert "pytorch_model.bin" in one_line(ei)
    assert ei.value.hint.startswith("download it (hf download org/old --local-dir DIR), then")
    assert "save_file" in ei.value.hint and "weights_only=True" in ei.value.hint


# -- argument classification -----------------------------------------------------------------


@pytest.mark.parametrize(
    "arg", ["./does/not/exist", "no/such/path/here", "missing_dir", "a/b.safetensors", "/abs/x"]
)
def test_missing_path_that_is_not_a_repo_id(arg: str) -> None:
    with pytest.raises(SourceError) as ei:
        open_model(arg, label="base model")
    msg = one_line(ei)
    assert arg in msg and "does not exist" in msg


def test_revision_with_local_path_refused(tmp_path: Path) -> None:
    factory.write_checkpoint(tmp_path / "m", {"w": torch.ones(1)})
    with pytest.raises(SourceError):
        open_model(str(tmp_path / "m"), revision="main", label="base model")


# -- local ------------------------------------------------------------------------------------


def test_local_spec_and_fingerprint(tmp_path: Path, sharded) -> None:
    src, w = sharded
    reader, spec = open_model(str(src), label="base model")
    with reader:
        assert set(reader.names()) == set(w)
    assert spec.kind == "local" and spec.path == str(src.resolve())
    assert spec.config == json.loads((src / "config.json").read_text())
    expected = {
        f.name: {"size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
        for f in src.iterdir()
        if f.name.endswith((".safetensors", ".index.json"))
    }
    for name, d in expected.items():
        if name.endswith(".safetensors"):
            raw = (src / name).read_bytes()
            d["header_sha256"] = hashlib.sha256(raw[: 8 + int.from_bytes(raw[:8], "little")])
            d["header_sha256"] = d["header_sha256"].hexdigest()
    assert spec.files == expected

    # Moved elsewhere with the same files (copy2 keeps mtimes): same fingerprint.
    moved = shutil.copytree(src, tmp_path / "elsewhere", copy_function=shutil.copy2)
    _, spec2 = open_model(str(moved), label="base model")
    assert spec2.path != spec.path
    assert spec2.fingerprint() == spec.fingerprint()

    # A touched shard (new mtime, same bytes) still has the same content fingerprint, but is
    # no longer "the same files"; a shard with another header does not match.
    shard = sorted(moved.glob("*-of-*.safetensors"))[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    _, spec3 = open_model(str(moved), label="base model")
    assert spec3.fingerprint() == spec.fingerprint()
    assert spec2.same_files(spec2.to_json()) and not spec3.same_files(spec2.to_json())
    raw = bytearray(shard.read_bytes())
    i = raw.index(b'"dtype":"F32"')
    raw[i : i + 13] = b'"dtype":"I32"'  # same size, another header
    shard.write_bytes(bytes(raw))
    _, spec4 = open_model(str(moved), label="base model")
    assert spec4.fingerprint() != spec.fingerprint()


def test_local_single_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(3)}, str(f))
    reader, spec = open_model(str(f), label="aligned model")
    assert reader.names() == ["w"]
    raw = f.read_bytes()
    head = hashlib.sha256(raw[: 8 + int.from_bytes(raw[:8], "little")]).hexdigest()
    assert spec.files == {
        "weights.safetensors": {
            "size": f.stat().st_size,
            "mtime_ns": f.stat().st_mtime_ns,
            "header_sha256": head,
        }
    }


def test_local_pickled_model_refused(tmp_path: Path) -> None:
    d = tmp_path / "old"
    d.mkdir()
    torch.save({"w": torch.ones(1)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as ei:
        open_model(str(d), label="base model")
    assert "pytorch_model.bin" in one_line(ei)


# -- adapters ---------------------------------------------------------------------------------


def _adapter_src(tmp_path: Path) -> Path:
    base = factory.llama_weights(layers=1)
    return factory.write_adapter(tmp_path / "adapter_src", base=base)


def test_resolve_local_adapter(tmp_path: Path) -> None:
    d = _adapter_src(tmp_path)
    path, spec = resolve_adapter(str(d))
    assert path == d and spec.kind == "local"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(spec.files)
    path2, _ = resolve_adapter(str(d / "adapter_model.safetensors"))
    assert path2 == d


def test_resolve_cached_hub_adapter(tmp_path: Path) -> None:
    d = _adapter_src(tmp_path)
    (d / "README.md").write_text("# adapter")
    snap = cache_repo("org/lora", d, commit=COMMIT_B)
    path, spec = resolve_adapter("org/lora")
    assert path == snap
    assert spec.kind == "hub" and spec.commit == COMMIT_B and spec.repo_id == "org/lora"
    assert (path / "adapter_model.safetensors").is_file() and (path / "README.md").is_file()
    assert spec.files["adapter_model.safetensors"]["size"] == (
        (d / "adapter_model.safetensors").stat().st_size
    )


def test_hub_adapter_not_cached_offline() -> None:
    with pytest.raises(SourceError) as ei:
        resolve_adapter("org/nolora")
    msg = one_line(ei)
    assert "org/nolora" in msg and "HF_HUB_OFFLINE" in msg


def test_hub_repo_without_adapter_config(tmp_path: Path) -> None:
    src = factory.write_checkpoint(tmp_path / "m", {"w": torch.ones(1)})
    cache_repo("org/notlora", src)
    with pytest.raises(SourceError) as ei:
        resolve_adapter("org/notlora")
    assert "adapter_config.json" in one_line(ei)


# -- Hub, online paths (huggingface_hub calls replaced by the real exceptions they raise) -----


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    return monkeypatch


def fake_model_info(mp: pytest.MonkeyPatch, src: Path) -> None:
    """HfApi.model_info answering with ``src``'s files at COMMIT_A (the fields sources uses)."""
    info = SimpleNamespace(
        sha=COMMIT_A, siblings=[SimpleNamespace(rfilename=f.name) for f in src.iterdir()]
    )
    mp.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: info)


def _raise(exc: BaseException):
    def f(*a, **k):
        raise exc

    return f


@pytest.mark.parametrize(
    ("cls", "status", "words"),
    [
        (hf_errors.GatedRepoError, 403, "gated"),
        (hf_errors.RepositoryNotFoundError, 404, "not found"),
        (hf_errors.RevisionNotFoundError, 404, "revision"),
        (hf_errors.HfHubHTTPError, 500, "failed"),
        (hf_errors.HfHubHTTPError, 401, "refused"),
    ],
    ids=["gated", "repo-not-found", "revision-not-found", "server-error", "unauthorised"],
)
def test_hub_errors_on_listing(online, cls, status: int, words: str) -> None:
    online.setattr(huggingface_hub.HfApi, "model_info", _raise(http_error(cls, status)))
    with pytest.raises(SourceError) as ei:
        open_model("org/x", revision="dev", label="base model")
    msg = one_line(ei)
    assert "org/x" in msg and words in msg


def test_gated_on_download(online, sharded) -> None:
    """model_info of a gated repo succeeds; the download is what gets refused."""
    src, _ = sharded

    fake_model_info(online, src)
    online.setattr(
        huggingface_hub, "hf_hub_download", _raise(http_error(hf_errors.GatedRepoError, 403))
    )
    with pytest.raises(SourceError) as ei:
        open_model("org/x", label="base model")
    msg = one_line(ei)
    assert "gated" in msg and "huggingface.co/org/x" in ei.value.hint


def test_file_not_found_on_hub(online, sharded) -> None:
    src, _ = sharded

    fake_model_info(online, src)
    err = http_error(hf_errors.RemoteEntryNotFoundError, 404)
    online.setattr(huggingface_hub, "hf_hub_download", _raise(err))
    with pytest.raises(SourceError) as ei:
        open_model("org/x", label="base model")
    msg = one_line(ei)
    assert "config.json" in msg and "not found" in msg


def test_download_pinned_to_commit_with_token(online, sharded, tmp_path: Path) -> None:
    """--download full: whole shards through hf_hub_download (ranged reads: test_hub_ranged).
    The first file is asked for by the revision's name (huggingface_hub then records the ref)
    and must land in the listed commit's snapshot; every other file by the commit."""
    src, _ = sharded
    snap = tmp_path / "snapshots" / COMMIT_A  # where huggingface_hub would put them
    shutil.copytree(src, snap)
    online.setenv("HF_TOKEN", "hf_test_token")
    calls: list[dict] = []

    def fake_download(repo_id, filename, **kw):
        calls.append({"filename": filename, **kw})
        return str(snap / filename)

    fake_model_info(online, src)
    online.setattr(huggingface_hub, "hf_hub_download", fake_download)
    wm = _weight_map(src)
    picked: list[str] = []

    def want(names: list[str]) -> list[str]:
        picked.append(names[-1])
        return picked

    reader, spec = open_model(
        "org/x", revision="main", label="base model", want=want, download="full"
    )
    reader.close()
    fetched = [c["filename"] for c in calls]
    assert fetched == ["config.json", "model.safetensors.index.json", wm[picked[0]]]
    assert [c["revision"] for c in calls] == ["main", COMMIT_A, COMMIT_A]
    assert all(c["token"] == "hf_test_token" for c in calls)
    assert all(c["local_files_only"] is False for c in calls)
    assert all(c["cache_dir"] == os.environ["HF_HUB_CACHE"] for c in calls)
    assert spec.commit == COMMIT_A and spec.revision == "main"


def test_no_connection_falls_back_to_cache(online, sharded) -> None:
    src, w = sharded
    cache_repo("org/tiny", src)
    online.setattr(
        huggingface_hub.HfApi, "model_info", _raise(ConnectionError("network unreachable"))
    )

    def no_network(*a, **kw):
        assert kw.get("local_files_only") is True
        return huggingface_hub.try_to_load_from_cache(
            a[0], a[1], cache_dir=kw["cache_dir"], revision=kw["revision"]
        )

    online.setattr(huggingface_hub, "hf_hub_download", no_network)
    reader, spec = open_model("org/tiny", label="base model")
    with reader:
        assert set(reader.names()) == set(w)
    assert spec.commit == COMMIT_A


def test_no_connection_and_not_cached(online) -> None:
    online.setattr(
        huggingface_hub.HfApi, "model_info", _raise(ConnectionError("network unreachable"))
    )
    with pytest.raises(SourceError) as ei:
        open_model("org/nothing", label="base model")
    msg = one_line(ei)
    assert "cannot reach the Hub" in msg and "org/nothing" in msg


def test_hub_adapter_gated(online) -> None:
    online.setattr(
        huggingface_hub, "snapshot_download", _raise(http_error(hf_errors.GatedRepoError, 403))
    )
    with pytest.raises(SourceError) as ei:
        resolve_adapter("org/lora")
    assert "gated" in one_line(ei)


def test_token_file_in_hf_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "token").write_text("hf_from_file\n")
    monkeypatch.setenv("HF_HOME", str(home))
    assert sources._token() == "hf_from_file"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert sources._token() == "hf_env"


def test_cache_write_failure_is_not_called_a_network_error(online, sharded) -> None:
    src, _ = sharded
    fake_model_info(online, src)
    full = OSError(28, "No space left on device")
    online.setattr(huggingface_hub, "hf_hub_download", _raise(full))
    with pytest.raises(SourceError) as ei:
        open_model("org/x", label="base model")
    msg = one_line(ei)
    assert "No space left" in msg and "cannot reach" not in msg
