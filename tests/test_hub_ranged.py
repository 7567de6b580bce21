"""Hub models read by byte ranges (issue 17), against tests/hub_server.py on 127.0.0.1.

Nothing leaves the machine: ``HF_ENDPOINT`` points at the local server, the Hugging Face cache
and home are temporary folders (conftest), and huggingface_hub's import-time offline switch is
turned off for these tests only. Expected values come from elsewhere: byte budgets from the
shards' headers parsed here (tests/model_trio.header), cache entries from a build over the
same repos as local directories.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants
from typer.testing import CliRunner

from safelora_cli import hub as hub_mod
from safelora_cli import sources
from safelora_cli.cache import MANIFEST
from safelora_cli.cli import app
from safelora_cli.compute import compute_projections
from safelora_cli.errors import FetchError, SourceError
from safelora_cli.sources import open_model
from tests import factory
from tests import model_trio as mt
from tests.hub_server import HubServer
from tests.model_trio import header

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
TARGETS = ("q_proj", "v_proj")


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    # conftest sets HF_HUB_OFFLINE before huggingface_hub is imported, which reads it once.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_mod, "RETRY_WAIT", 0.01)
    monkeypatch.setattr(hub_mod, "MAX_WAIT", 0.02)
    with HubServer(tmp_path / "server") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    """Base and aligned Llama checkpoints, 3 shards each; q/v are a small part of each shard."""
    w = factory.llama_weights(layers=4, hidden=64, intermediate=256, heads=4, kv_heads=2)
    base = factory.write_checkpoint(tmp_path / "base", w, shards=3, config="llama")
    aligned = factory.write_checkpoint(
        tmp_path / "aligned", factory.aligned_from(w), shards=3, config="llama"
    )
    return base, aligned


def is_target(name: str) -> bool:
    return name.endswith(tuple(f"{t}.weight" for t in TARGETS))


def budget(d: Path) -> tuple[int, int, int]:
    """(target tensor bytes, their shards' header bytes + index + config, the shards' total)."""
    tensors = meta = total = 0
    for f in sorted(d.glob("*.safetensors")):
        h, start = header(f)
        hits = [e for n, e in h.items() if n != "__metadata__" and is_target(n)]
        tensors += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in hits)
        if hits:
            meta += start
            total += f.stat().st_size
    meta += sum((d / n).stat().st_size for n in ("model.safetensors.index.json", "config.json"))
    return tensors, meta, total


def entries(cache: Path) -> dict[str, bytes]:
    """Every entry file of a cache, by name, and the manifest's weights section."""
    out = {f.name: f.read_bytes() for f in sorted(cache.glob("*.safetensors"))}
    m = json.loads((cache / MANIFEST).read_text())
    out["<weights>"] = json.dumps(m["weights"], sort_keys=True).encode()
    out["<fingerprint-kinds>"] = json.dumps(
        sorted(v["kind"] for v in m["fingerprints"].values())
    ).encode()
    return out


def oracle(models: tuple[Path, Path], out: Path) -> dict[str, bytes]:
    base, aligned = models
    compute_projections(str(base), str(aligned), out, targets=",".join(TARGETS), device="cpu")
    e = entries(out)
    e["<fingerprint-kinds>"] = b'["hub", "hub"]'  # the local build's sources are local
    return e


def hf_cache_files() -> list[Path]:
    root = Path(os.environ["HF_HUB_CACHE"])
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def serve(hub: HubServer, models: tuple[Path, Path]) -> None:
    hub.add("org/base", models[0], commit=COMMIT_A)
    hub.add("org/aligned", models[1], commit=COMMIT_B)


def test_fetches_only_target_bytes_and_matches_a_local_build(
    hub: HubServer, models, tmp_path: Path
) -> None:
    serve(hub, models)
    s = compute_projections(
        "org/base", "org/aligned", tmp_path / "c", targets=",".join(TARGETS), device="cpu"
    )
    tb, mb, total = (sum(x) for x in zip(budget(models[0]), budget(models[1]), strict=True))
    ratio = hub.file_bytes / (tb + mb)
    print(f"served {hub.file_bytes} B for {tb} B of q/v + {mb} B metadata: {ratio:.4f}x")
    assert hub.file_bytes <= 1.10 * (tb + mb)
    assert hub.file_bytes < total / 3  # today's behaviour: every shard, whole
    # What the run says it fetched is what the server sent for the shards (headers + tensors).
    index_config = sum(
        (d / n).stat().st_size
        for d in models
        for n in ("model.safetensors.index.json", "config.json")
    )
    assert s.fetched == hub.file_bytes - index_config
    assert s.shards_bytes == total and "of" in s.line() and "(the shards' total)" in s.line()
    # Every weight came by ranges (never a whole-file GET of a shard), adjacent ones together:
    # each layer's q_proj and v_proj sit next to each other in the file, one request.
    gets = [e for e in hub.log if e[0] == "GET" and e[1].endswith(".safetensors")]
    assert gets and all(rng for _, _, rng in gets)
    data_gets = [e for e in gets if e[1].startswith("/cdn/") and not e[2].startswith("bytes=0-")]
    headers = [e for e in data_gets if e[2].startswith("bytes=8-")]
    assert len(data_gets) - len(headers) == 2 * 4  # 4 layers x (q+v) x 2 models / 2 per request
    # No ranged bytes in the Hugging Face cache: only the index and config went there.
    names = {p.name for p in hf_cache_files() if "snapshots" in p.parts}
    assert names == {"model.safetensors.index.json", "config.json"}
    assert not any(".safetensors" in p.name and "index" not in p.name for p in hf_cache_files())
    # The cache, entry by entry and byte for byte, is the one built from local directories.
    assert entries(tmp_path / "c") == oracle(models, tmp_path / "local")
    m = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert m["fingerprints"]["base"] == {"kind": "hub", "repo_id": "org/base", "commit": COMMIT_A}
    sizes = {k: v["size"] for k, v in m["sources"]["base"]["files"].items()}
    assert (
        sizes
        == {
            f.name: f.stat().st_size
            for f in models[0].iterdir()
            if f.name in sizes  # the shards holding targets, the index, the config
        }
        and len(sizes) == 5
    )


def test_full_download_and_ranged_give_the_same_cache(
    hub: HubServer, models, tmp_path: Path
) -> None:
    """--download full keeps today's behaviour; a ranged run accepts that cache (same
    fingerprint: repo + commit) and finds nothing left to do; the shards, now complete in the
    HF cache, are then read from disk without any network request for them."""
    serve(hub, models)
    args = dict(targets=",".join(TARGETS), device="cpu")
    full = compute_projections("org/base", "org/aligned", tmp_path / "c", download="full", **args)
    assert full.computed == 8 and full.shards_bytes == 0
    shards = [p for p in hf_cache_files() if p.name.startswith("model-") and "snapshots" in p.parts]
    assert len(shards) == 6
    hub.reset_counters()
    again = compute_projections("org/base", "org/aligned", tmp_path / "c", **args)
    assert again.computed == 0 and again.skipped == 8
    hub.reset_counters()
    fresh = compute_projections("org/base", "org/aligned", tmp_path / "c2", **args)
    assert fresh.computed == 8 and fresh.fetched == 0 and fresh.shards_bytes == 0
    assert not [e for e in hub.log if e[1].endswith("safetensors")]
    assert entries(tmp_path / "c2") == entries(tmp_path / "c")


def test_retries_a_500_and_a_cut_connection(hub: HubServer, models, tmp_path: Path) -> None:
    serve(hub, models)
    hub.fail(500, match="/cdn/", times=2)
    hub.cut(match="/cdn/", times=3, min_start=100)
    compute_projections(
        "org/base", "org/aligned", tmp_path / "c", targets=",".join(TARGETS), device="cpu"
    )
    assert not hub._fail and not hub._cut  # every injected failure was met
    statuses = [e for e in hub.log if e[1].startswith("/cdn/")]
    assert len(statuses) > 2 * 4 + 6 * 2  # the failed requests were repeated
    assert entries(tmp_path / "c") == oracle(models, tmp_path / "local")


def test_network_drop_beyond_retries_keeps_entries_and_rerun_fetches_the_rest(
    hub: HubServer, models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve(hub, models)
    monkeypatch.setattr(hub_mod, "MAX_RETRIES", 2)
    # The last shard's tensor data never arrives whole (its header does).
    hub.cut(match="model-00003-of-00003", times=1000, min_start=100)
    with pytest.raises(FetchError) as ei:
        compute_projections(
            "org/base", "org/aligned", tmp_path / "c", targets=",".join(TARGETS), device="cpu"
        )
    assert "connection dropped" in ei.value.message and "run the same command" in ei.value.hint
    kept = json.loads((tmp_path / "c" / MANIFEST).read_text())["weights"]
    assert 0 < len(kept) < 8
    hub._cut.clear()
    hub.reset_counters()
    s = compute_projections(
        "org/base", "org/aligned", tmp_path / "c", targets=",".join(TARGETS), device="cpu"
    )
    assert s.skipped == len(kept) and s.computed == 8 - len(kept)
    # Only the missing weights' bytes came again (plus the headers).
    missing = [w for w in json.loads((tmp_path / "c" / MANIFEST).read_text())["weights"]]
    missing = [w for w in missing if w not in kept]
    need = 0
    for d in models:
        for f in d.glob("model-*.safetensors"):
            h, start = header(f)
            need += start if any(is_target(n) for n in h) else 0
            need += sum(
                e["data_offsets"][1] - e["data_offsets"][0] for n, e in h.items() if n in missing
            )
    assert s.fetched == need
    assert entries(tmp_path / "c") == oracle(models, tmp_path / "local")


def test_gated_repo_says_accept_the_licence_and_log_in(hub: HubServer, models) -> None:
    hub.add("org/gated", models[0], commit=COMMIT_A, gated=True)
    with pytest.raises(SourceError) as ei:
        open_model("org/gated", label="base model")
    msg = ei.value.message
    assert "\n" not in msg and "gated" in msg and "org/gated" in msg
    assert "accept the licence on the model page" in ei.value.hint
    assert f"{hub.endpoint}/org/gated" in ei.value.hint and "hf auth login" in ei.value.hint


def test_401_on_a_shard_only(hub: HubServer, models, tmp_path: Path) -> None:
    """The index and config are readable, the shard's bytes are refused (gated LFS files)."""
    serve(hub, models)
    hub.fail(401, match="model-00001", times=10)
    r = CliRunner().invoke(
        app,
        [
            *("compute-projections", "org/base", "org/aligned"),
            *("-o", str(tmp_path / "c"), "--targets", "q_proj,v_proj"),
        ],
    )
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "org/base" in lines[0] and "401" in lines[0]
    assert "accept the licence" in lines[1] and "hf auth login" in lines[1]
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("repo", "revision", "words"),
    [
        ("org/nothing", None, "not found"),
        ("org/base", "no-such-branch", "revision 'no-such-branch' not found"),
    ],
    ids=["repo", "revision"],
)
def test_404_repo_and_revision(hub: HubServer, models, repo, revision, words) -> None:
    serve(hub, models)
    with pytest.raises(SourceError) as ei:
        open_model(repo, revision=revision, label="base model")
    assert words in ei.value.message and "\n" not in ei.value.message


def test_404_file(hub: HubServer, models, tmp_path: Path) -> None:
    """A shard the index names but the repo lacks: EntryNotFound, named."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in models[0].iterdir():
        if f.name != "model-00002-of-00003.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    hub.add("org/broken", broken, commit=COMMIT_A)
    with pytest.raises(SourceError) as ei:
        open_model("org/broken", label="base model")
    assert "model-00002-of-00003.safetensors" in ei.value.message
    assert "not found" in ei.value.message


def test_revision_pinned_to_its_commit(hub: HubServer, models, tmp_path: Path) -> None:
    """A branch resolves to its commit once; every request names that commit; the manifest
    records it; --revision with the commit itself gives the same cache."""
    hub.add("org/base", models[0], commit=COMMIT_A, refs=("main", "dev"))
    hub.add("org/aligned", models[1], commit=COMMIT_B)
    args = dict(targets=",".join(TARGETS), device="cpu")
    compute_projections("org/base", "org/aligned", tmp_path / "c", revision_base="dev", **args)
    files = [p for _, p, _ in hub.log if "/resolve/" in p or p.startswith("/cdn/")]
    # Only config.json is asked for by the branch's name (so refs/dev is recorded, and checked
    # to still be the listed commit); every other file, shards above all, by the commit.
    by_name = {p for p in files if not (COMMIT_A in p or COMMIT_B in p)}
    assert by_name == {"/org/base/resolve/dev/config.json", "/org/aligned/resolve/main/config.json"}
    assert any(".safetensors" in p for p in files)
    m = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert m["sources"]["base"]["revision"] == "dev" and m["sources"]["base"]["commit"] == COMMIT_A
    s = compute_projections(
        "org/base", "org/aligned", tmp_path / "c", revision_base=COMMIT_A, **args
    )
    assert s.skipped == 8 and s.computed == 0


def test_offline_reads_the_cache_only(
    hub: HubServer, models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_HUB_OFFLINE: the local Hugging Face cache only, as before (commits given here; the
    default revision offline is the next test)."""
    serve(hub, models)
    args = dict(
        targets=",".join(TARGETS), device="cpu", revision_base=COMMIT_A, revision_aligned=COMMIT_B
    )
    # Ranged bytes are never cached: offline, the shards are not there.
    compute_projections("org/base", "org/aligned", tmp_path / "c", **args)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset_counters()
    with pytest.raises(SourceError) as ei:
        compute_projections("org/base", "org/aligned", tmp_path / "c2", **args)
    assert "HF_HUB_OFFLINE" in ei.value.message and not hub.log
    assert not (tmp_path / "c2").exists()
    # After a full download, offline works from the cache with no request at all.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    compute_projections("org/base", "org/aligned", tmp_path / "c3", download="full", **args)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset_counters()
    s = compute_projections("org/base", "org/aligned", tmp_path / "c4", **args)
    assert s.computed == 8 and not hub.log and s.shards_bytes == 0
    assert entries(tmp_path / "c4") == entries(tmp_path / "c")


def test_offline_after_an_online_run_finds_the_default_revision(
    hub: HubServer, models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An online run by branch name records refs/main in the Hugging Face cache (through
    huggingface_hub), so the same command offline, with no --revision, reads that snapshot.
    (Before, every download was pinned to the commit and no ref was written: offline failed.)"""
    serve(hub, models)
    args = dict(targets=",".join(TARGETS), device="cpu")
    compute_projections("org/base", "org/aligned", tmp_path / "c", download="full", **args)
    for repo, commit in (("org/base", COMMIT_A), ("org/aligned", COMMIT_B)):
        ref = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo.replace('/', '--')}" / "refs"
        assert (ref / "main").read_text().strip() == commit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset_counters()
    s = compute_projections("org/base", "org/aligned", tmp_path / "c2", **args)
    assert s.computed == 8 and not hub.log
    assert entries(tmp_path / "c2") == entries(tmp_path / "c")


def test_a_branch_that_moves_during_the_run_is_refused(
    hub: HubServer, models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing said main is at one commit; by the time config.json is fetched by name it
    points elsewhere: a SourceError, not a mix of two versions."""
    serve(hub, models)
    real = sources._listing
    stale = "c" * 40

    def listing(repo_id: str, revision: str | None):
        commit, files, offline = real(repo_id, revision)
        return (stale if repo_id == "org/base" else commit), files, offline

    monkeypatch.setattr(sources, "_listing", listing)
    with pytest.raises(SourceError) as ei:
        open_model("org/base", label="base model", want=lambda names: names[:1])
    assert "moved from commit cccccccccccc to aaaaaaaaaaaa" in ei.value.message
    assert "--revision" in ei.value.hint


def test_server_ignoring_ranges_is_refused_unread(
    hub: HubServer, models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 200 with the whole file instead of a 206: refused before its body is read."""
    serve(hub, models)
    hub.ignore_ranges = True
    opened: list[hub_mod.HubFile] = []
    real = hub_mod.open_file

    def recording(*a, **k):
        opened.append(real(*a, **k))
        return opened[-1]

    monkeypatch.setattr(hub_mod, "open_file", recording)
    with pytest.raises(SourceError) as ei:
        open_model("org/base", label="base model", want=lambda names: names[:1])
    assert "206" in ei.value.message and "--download full" in ei.value.hint
    assert opened and all(f.fetched == 0 for f in opened)  # not one byte of the body taken


def test_cli_summary_says_what_was_fetched(hub: HubServer, models, tmp_path: Path) -> None:
    serve(hub, models)
    base = ("compute-projections", "org/base", "org/aligned", "--targets", "q_proj,v_proj")
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "8 weights computed" in line
    assert "fetched " in line and "(the shards' total) from the Hub" in line
    bad = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "d"), "--download", "some"])
    assert bad.exit_code == 2 and "--download 'some' is not one of ranged, full" in bad.stderr


def test_progress_is_told_the_bytes_fetched(hub: HubServer, models, tmp_path: Path) -> None:
    serve(hub, models)
    rec = Recording()
    s = compute_projections(
        "org/base",
        "org/aligned",
        tmp_path / "c",
        targets=",".join(TARGETS),
        device="cpu",
        progress=rec,
    )
    seen = rec.seen
    assert len(seen) == 1 + 8  # once at the start, once per weight written
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)
    assert seen[-1] == (s.fetched, s.shards_bytes)


def test_patch_with_hub_base_and_aligned(hub: HubServer, models, tmp_path: Path) -> None:
    """patch --base/--aligned with Hub ids reads by ranges and writes what a local run does."""
    from safetensors.torch import load_file

    from safelora_cli.patch import patch_adapters
    from tests.model_trio import read

    serve(hub, models)
    adapter = factory.write_adapter(tmp_path / "adapter", base=read(models[0]), layers=[1, 3])
    kw = dict(device="cpu")
    patch_adapters(
        [str(adapter)], tmp_path / "hub-out", base="org/base", aligned="org/aligned", **kw
    )
    local = tmp_path / "local-out"
    patch_adapters([str(adapter)], local, base=str(models[0]), aligned=str(models[1]), **kw)
    got = load_file(str(tmp_path / "hub-out" / "adapter_model.safetensors"))
    want = load_file(str(local / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    tb = sum(
        t.numel() * t.element_size()
        for d in models
        for n, t in read(d).items()
        if is_target(n) and (".1." in n or ".3." in n)
    )
    assert hub.file_bytes <= 1.10 * (tb + sum(budget(d)[1] for d in models))


def test_hub_adapter_through_the_same_endpoint(hub: HubServer, models, tmp_path: Path) -> None:
    """Adapters still come whole (snapshot_download), from HF_ENDPOINT as read at call time."""
    from safelora_cli.sources import resolve_adapter
    from tests.model_trio import read

    adapter = factory.write_adapter(tmp_path / "adapter", base=read(models[0]))
    hub.add("org/lora", adapter, commit=COMMIT_B)
    path, spec = resolve_adapter("org/lora")
    assert spec.commit == COMMIT_B and (path / "adapter_config.json").is_file()
    got = (path / "adapter_model.safetensors").read_bytes()
    assert got == (adapter / "adapter_model.safetensors").read_bytes()


def test_token_sent_to_the_hub_not_to_the_cdn(
    hub: HubServer, models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resolve/ redirect goes to another origin: the range survives it, the token does not."""
    serve(hub, models)
    hub.cdn_host = "localhost"
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    names = ["model.layers.0.self_attn.q_proj.weight"]
    reader, _ = open_model("org/base", label="base model", want=lambda _: names)
    with reader:
        want = factory.llama_weights(layers=4, hidden=64, intermediate=256, heads=4, kv_heads=2)
        assert reader.read_bytes(names[0]) == want[names[0]].numpy().tobytes()
    cdn = [a for p, a in hub.auth if p.startswith("/cdn/")]
    hub_side = [a for p, a in hub.auth if "/resolve/" in p]
    assert cdn and all(a is None for a in cdn)
    assert hub_side and all(a == "Bearer hf_local_test_token" for a in hub_side)


# ------------------------------------------------- patch / patch-model: what was fetched


def shard_bytes_served(hub: HubServer) -> int:
    """What the server sent of the models' shards (ranged reads), not the JSON files."""
    return sum(n for p, n in hub.served.items() if p.endswith(".safetensors"))


def shards_total(d: Path, pick) -> int:
    """The total size of the shards of ``d`` holding a tensor ``pick`` accepts."""
    return sum(
        f.stat().st_size
        for f in sorted(d.glob("*.safetensors"))
        if any(n != "__metadata__" and pick(n) for n in header(f)[0])
    )


def in_layers(*layers: int):
    return lambda n: is_target(n) and any(f".layers.{i}." in n for i in layers)


def is_block_weight(n: str) -> bool:
    """What patch-model targets by default: 2-D weights inside layers.N, no norms."""
    return ".layers." in n and n.endswith(".weight") and "norm" not in n


def hub_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "from the Hub" in ln]


class Recording:
    """A progress object that keeps what ``fetched`` was told."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, units: int = 1, nbytes: int = 0) -> None:
        pass

    def finish(self) -> None:
        pass

    def fetched(self, nbytes: int, total: int) -> None:
        self.seen.append((nbytes, total))


def test_patch_reports_what_was_fetched(hub: HubServer, models, tmp_path: Path) -> None:
    """patch --base/--aligned (Hub ids): the progress and the result carry the server's count."""
    from safelora_cli.patch import patch_adapters
    from tests.model_trio import read

    serve(hub, models)
    adapter = factory.write_adapter(tmp_path / "adapter", base=read(models[0]), layers=[1, 3])
    rec = Recording()
    reports = patch_adapters(
        [str(adapter)],
        tmp_path / "out",
        base="org/base",
        aligned="org/aligned",
        device="cpu",
        progress=rec,
    )
    total = sum(shards_total(d, in_layers(1, 3)) for d in models)
    assert reports.fetched == shard_bytes_served(hub) > 0
    assert reports.shards_bytes == total
    assert len(rec.seen) == 4  # one per projector: layers 1 and 3 x (q, v)
    assert [n for n, _ in rec.seen] == sorted(n for n, _ in rec.seen)
    assert rec.seen[-1] == (reports.fetched, total)
    # Local models: nothing read by ranges, nothing told.
    rec = Recording()
    local = patch_adapters(
        [str(adapter)],
        tmp_path / "local",
        base=str(models[0]),
        aligned=str(models[1]),
        device="cpu",
        progress=rec,
    )
    assert (local.fetched, local.shards_bytes, rec.seen) == (0, 0, [])


def test_patch_cli_says_once_what_was_fetched(hub: HubServer, models, tmp_path: Path) -> None:
    from safelora_cli.progress import fetched_line
    from tests.model_trio import read

    serve(hub, models)
    base_w = read(models[0])
    a1 = factory.write_adapter(tmp_path / "a1", base=base_w, layers=[1, 3])
    a2 = factory.write_adapter(tmp_path / "a2", base=base_w, layers=[1], seed=1)
    hub_args = ["--base", "org/base", "--aligned", "org/aligned", "--device", "cpu"]
    run = CliRunner().invoke
    hub.reset_counters()
    r = run(app, ["patch", str(a1), str(a2), *hub_args, "-o", str(tmp_path / "o1")])
    assert r.exit_code == 0, r.stderr
    total = sum(shards_total(d, in_layers(1, 3)) for d in models)
    # Once per run, the summary's last line, with the server's figures.
    assert hub_lines(r.stderr) == [fetched_line(shard_bytes_served(hub), total)]
    assert r.stderr.strip().splitlines()[-1] == hub_lines(r.stderr)[0]
    assert not hub_lines(r.stdout)

    q = run(app, ["patch", str(a1), *hub_args, "-o", str(tmp_path / "o2"), "--quiet"])
    assert q.exit_code == 0, q.stderr
    assert not hub_lines(q.stdout) and not hub_lines(q.stderr)

    j = run(app, ["patch", str(a1), *hub_args, "-o", str(tmp_path / "o3"), "--json"])
    assert j.exit_code == 0, j.stderr
    assert not hub_lines(j.stdout) and not hub_lines(j.stderr)
    assert all(json.loads(ln)["adapter"] for ln in j.stdout.splitlines())

    local = ["--base", str(models[0]), "--aligned", str(models[1]), "--device", "cpu"]
    loc = run(app, ["patch", str(a1), *local, "-o", str(tmp_path / "o4")])
    assert loc.exit_code == 0, loc.stderr
    assert "projected" in loc.stderr and not hub_lines(loc.stderr)


def fine_tune(aligned: Path, out: Path) -> Path:
    """A full fine-tune of ``aligned``: every block weight moved a little, 3 shards."""
    import torch

    from tests.model_trio import read

    g = torch.Generator().manual_seed(7)
    w = {
        n: (t + 0.01 * torch.randn(t.shape, generator=g, dtype=t.dtype))
        if is_block_weight(n)
        else t
        for n, t in read(aligned).items()
    }
    return factory.write_checkpoint(out, w, shards=3, config="llama")


def test_patch_model_reports_what_was_fetched(hub: HubServer, models, tmp_path: Path) -> None:
    """patch-model FINETUNED (local) --aligned/--base (Hub ids), q/v targets: ALIGNED and BASE
    by ranges (their targets are a small share of the shards, so even read several times they
    cost less than the shards)."""
    from safelora_cli.model_patch import patch_model
    from safelora_cli.progress import fetched_line

    serve(hub, models)
    ft = fine_tune(models[1], tmp_path / "ft")
    total = sum(shards_total(d, is_target) for d in models)
    rec = Recording()
    rep = patch_model(
        str(ft),
        tmp_path / "out",
        aligned="org/aligned",
        base="org/base",
        targets="q_proj,v_proj",
        device="cpu",
        progress=rec,
    )
    assert rep.projected > 0  # pass 2 read the selected ALIGNED weights again
    assert rep.fetched == shard_bytes_served(hub) > 0 and rep.shards_bytes == total
    assert rep.fetched <= total  # never more than downloading the shards whole
    assert rec.seen and rec.seen[-1] == (rep.fetched, total)
    assert "fetched" not in rep.to_json() and "shards_bytes" not in rep.to_json()

    run = CliRunner().invoke
    hub_args = ["--aligned", "org/aligned", "--base", "org/base", "--device", "cpu",
                "--targets", "q_proj,v_proj"]  # fmt: skip
    hub.reset_counters()
    r = run(app, ["patch-model", str(ft), *hub_args, "-o", str(tmp_path / "o1")])
    assert r.exit_code == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == fetched_line(shard_bytes_served(hub), total)
    assert len(hub_lines(r.stderr)) == 1 and not hub_lines(r.stdout)

    q = run(app, ["patch-model", str(ft), *hub_args, "-o", str(tmp_path / "o2"), "--quiet"])
    assert q.exit_code == 0, q.stderr
    assert not hub_lines(q.stdout) and not hub_lines(q.stderr)
    j = run(app, ["patch-model", str(ft), *hub_args, "-o", str(tmp_path / "o3"), "--json"])
    assert j.exit_code == 0, j.stderr
    assert not hub_lines(j.stdout) and not hub_lines(j.stderr)
    assert json.loads(j.stdout)["model"] == str(ft)

    local = ["--aligned", str(models[1]), "--base", str(models[0]), "--device", "cpu"]
    loc = run(app, ["patch-model", str(ft), *local, "-o", str(tmp_path / "o4")])
    assert loc.exit_code == 0, loc.stderr
    assert "projected" in loc.stderr and not hub_lines(loc.stderr)


def test_patch_model_downloads_whole_shards_when_ranges_would_cost_more(
    hub: HubServer, models, tmp_path: Path
) -> None:
    """Default targets (every block weight, most of the model): read up to four times by
    ranges they would cost more than the shards, so ALIGNED and BASE are downloaded whole
    (each shard once, into the Hugging Face cache) and the output is the same as a local run."""
    from safelora_cli.model_patch import patch_model

    serve(hub, models)
    ft = fine_tune(models[1], tmp_path / "ft")
    rep = patch_model(
        str(ft), tmp_path / "out", aligned="org/aligned", base="org/base", device="cpu"
    )
    held = [
        f
        for d in models
        for f in sorted(d.glob("*.safetensors"))
        if any(n != "__metadata__" and is_block_weight(n) for n in header(f)[0])
    ]
    # Each shard holding a target once, whole, after its header was read by ranges (8 bytes,
    # then the header) to weigh the two ways.
    assert shard_bytes_served(hub) == sum(f.stat().st_size + header(f)[1] for f in held)
    assert rep.fetched == 0 and rep.shards_bytes == 0  # nothing read by ranges
    cached = Path(os.environ["HF_HUB_CACHE"])
    for repo, commit, d in (
        ("org/base", COMMIT_A, models[0]),
        ("org/aligned", COMMIT_B, models[1]),
    ):
        snap = cached / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
        for f in d.glob("*.safetensors"):
            if any(n != "__metadata__" and is_block_weight(n) for n in header(f)[0]):
                assert (snap / f.name).read_bytes() == f.read_bytes()
    loc = patch_model(
        str(ft), tmp_path / "local", aligned=str(models[1]), base=str(models[0]), device="cpu"
    )
    assert [m.projected for m in loc.modules] == [m.projected for m in rep.modules]
    assert mt.raw(tmp_path / "out") == mt.raw(tmp_path / "local")


def test_inspect_says_what_was_fetched_on_stderr(hub: HubServer, models, tmp_path: Path) -> None:
    """inspect (adapter or full model) with Hub ids: the line on stderr, the table on stdout."""
    from safelora_cli.progress import fetched_line
    from tests.model_trio import read

    serve(hub, models)
    adapter = factory.write_adapter(tmp_path / "adapter", base=read(models[0]), layers=[1, 3])
    ft = fine_tune(models[1], tmp_path / "ft")
    run = CliRunner().invoke
    for args, pick in (
        ([str(adapter), "--base", "org/base", "--aligned", "org/aligned"], in_layers(1, 3)),
        (
            [
                str(ft),
                "--aligned",
                "org/aligned",
                "--base",
                "org/base",
                "--targets",
                "q_proj,v_proj",
            ],
            is_target,
        ),
    ):
        hub.reset_counters()
        r = run(app, ["inspect", *args, "--device", "cpu"])
        assert r.exit_code == 0, r.stderr
        total = sum(shards_total(d, pick) for d in models)
        assert hub_lines(r.stderr) == [fetched_line(shard_bytes_served(hub), total)]
        assert not hub_lines(r.stdout)
        for flag in ("--json", "--quiet"):
            o = run(app, ["inspect", *args, "--device", "cpu", flag])
            assert o.exit_code == 0, o.stderr
            assert not hub_lines(o.stdout) and not hub_lines(o.stderr)
