"""Projection cache: manifest, atomic entries, resume, refusal of other sources (DESIGN §5)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safelora_cli.cache import (
    COMPLETE,
    FORMAT_VERSION,
    IN_PROGRESS,
    MANIFEST,
    ProjectionCache,
    entry_file_name,
)
from safelora_cli.errors import CacheError
from safelora_cli.projector import (
    FACTOR,
    GRAM,
    PROJECTOR_KIND,
    ProjectorSource,
    alignment_delta,
    build_projector,
)
from safelora_cli.sources import SourceSpec, open_model
from tests import factory


def specs(pair: factory.Pair) -> tuple[SourceSpec, SourceSpec]:
    rb, sb = open_model(str(pair.base_dir), label="base model")
    ra, sa = open_model(str(pair.aligned_dir), label="aligned model")
    rb.close()
    ra.close()
    return sb, sa


def projector_for(pair: factory.Pair, weight: str, fifo: bool = False):
    v = alignment_delta(pair.base[weight], pair.aligned[weight], fan_in_fan_out=fifo)
    return build_projector(weight, v, fan_in_fan_out=fifo)


Q0 = "model.layers.0.self_attn.q_proj.weight"
K1 = "model.layers.1.self_attn.k_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"


def read_manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def test_fresh_cache_is_marked_before_any_entry(tmp_path: Path, llama_pair: factory.Pair) -> None:
    sb, sa = specs(llama_pair)
    c = ProjectionCache.create_or_resume(tmp_path / "cache", sb, sa)
    m = read_manifest(tmp_path / "cache")
    assert m["state"] == IN_PROGRESS and m["weights"] == {}
    assert m["format_version"] == FORMAT_VERSION and m["projector"] == PROJECTOR_KIND
    assert m["sources"]["base"] == sb.to_json() and m["sources"]["aligned"] == sa.to_json()
    assert m["dtype"] == "F32"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    c.close()
    with pytest.raises(CacheError, match="incomplete"):
        ProjectionCache.open(tmp_path / "cache")
    assert ProjectionCache.open(tmp_path / "cache", allow_incomplete=True).weights() == []


def test_put_get_roundtrip_and_manifest(tmp_path: Path, llama_pair: factory.Pair) -> None:
    sb, sa = specs(llama_pair)
    path = tmp_path / "cache"
    with ProjectionCache.create_or_resume(path, sb, sa) as c:
        prs = {w: projector_for(llama_pair, w) for w in (UP0, K1, Q0)}
        for pr in prs.values():
            c.put(pr)
        c.finish()
    m = read_manifest(path)
    assert m["state"] == COMPLETE
    assert list(m["weights"]) == [UP0, Q0, K1]  # natural order, not insertion order
    e = m["weights"][UP0]
    assert e["representation"] == FACTOR and e["shape"] == [48, 32]
    assert (e["d_out"], e["d_in"], e["dtype"], e["fan_in_fan_out"]) == (48, 32, "F32", False)
    assert e["norm_v"] == prs[UP0].norm_v
    assert m["weights"][Q0]["representation"] == GRAM and m["weights"][Q0]["shape"] == [32, 32]

    c = ProjectionCache.open(path)
    assert isinstance(c, ProjectorSource)
    assert c.weights() == [UP0, Q0, K1] and c.has(K1) and not c.has("nope")
    ent = c.entry(K1)
    assert (ent.kind, ent.d_out, ent.d_in, ent.shape) == (GRAM, 16, 32, (16, 16))
    for w, pr in prs.items():
        got = c.get(w)
        assert torch.equal(got.tensor, pr.tensor)
        assert (got.kind, got.norm_v, got.d_out, got.d_in) == (
            pr.kind,
            pr.norm_v,
            pr.d_out,
            pr.d_in,
        )
    # Files are ordinary safetensors, readable by the safetensors library, self-describing.
    with safe_open(str(path / c.entry(Q0).file), framework="pt") as f:
        assert list(f.keys()) == [Q0]
        meta = f.metadata()
        assert meta["format"] == "pt" and meta["safelora.representation"] == GRAM
        assert float(meta["safelora.norm_v"]) == prs[Q0].norm_v
    sizes = sum(p.stat().st_size for p in path.iterdir())
    assert c.size_bytes() == sizes
    got = [p.weight for p in c.projectors([(K1, False), (Q0, False)])]
    assert got == [K1, Q0]


def test_missing_entry_names_weight_and_command(tmp_path: Path, llama_pair: factory.Pair) -> None:
    sb, sa = specs(llama_pair)
    with ProjectionCache.create_or_resume(tmp_path / "c", sb, sa) as c:
        c.put(projector_for(llama_pair, Q0))
        c.finish()
    c = ProjectionCache.open(tmp_path / "c", adapters=["my adapter"])
    with pytest.raises(CacheError) as ei:
        c.get(K1)
    msg = str(ei.value)
    assert K1 in msg and "safelora compute-projections" in msg
    assert str(llama_pair.base_dir) in msg and "--adapter 'my adapter'" in msg
    with pytest.raises(CacheError, match="and 1 more"):
        c.require([(K1, False), (UP0, False), (Q0, False)], adapters=["a"])
    with pytest.raises(CacheError, match="fan_in_fan_out"):
        c.get(Q0, fan_in_fan_out=True)
    with pytest.raises(CacheError, match=K1):
        list(c.projectors([(Q0, False), (K1, False)]))


def test_resume_keeps_entries_and_cleans_temporaries(
    tmp_path: Path, llama_pair: factory.Pair
) -> None:
    sb, sa = specs(llama_pair)
    path = tmp_path / "c"
    c = ProjectionCache.create_or_resume(path, sb, sa)
    c.put(projector_for(llama_pair, Q0))
    # A killed run: a temporary half-written file, no finish(), lock released by death.
    (path / ".tmp-junk.safetensors").write_bytes(b"partial")
    c.close()
    c = ProjectionCache.create_or_resume(path, sb, sa)
    assert c.weights() == [Q0] and not c.complete and not c.created
    assert not (path / ".tmp-junk.safetensors").exists()
    c.put(projector_for(llama_pair, K1))
    c.finish()
    c.close()
    assert ProjectionCache.open(path).weights() == [Q0, K1]


def test_resume_drops_entries_whose_file_is_damaged(
    tmp_path: Path, llama_pair: factory.Pair
) -> None:
    sb, sa = specs(llama_pair)
    path = tmp_path / "c"
    with ProjectionCache.create_or_resume(path, sb, sa) as c:
        c.put(projector_for(llama_pair, Q0))
        c.put(projector_for(llama_pair, K1))
        c.finish()
    (path / entry_file_name(K1)).write_bytes(b"\x00" * 3)
    with ProjectionCache.create_or_resume(path, sb, sa) as c:
        assert c.weights() == [Q0]
    with pytest.raises(CacheError, match="incomplete"):
        ProjectionCache.open(path)


def test_byte_identical_whether_resumed_or_not(tmp_path: Path, llama_pair: factory.Pair) -> None:
    sb, sa = specs(llama_pair)
    weights = [Q0, K1, UP0]
    with ProjectionCache.create_or_resume(tmp_path / "one", sb, sa) as c:
        for w in weights:
            c.put(projector_for(llama_pair, w))
        c.finish()
    with ProjectionCache.create_or_resume(tmp_path / "two", sb, sa) as c:
        c.put(projector_for(llama_pair, UP0))
    with ProjectionCache.create_or_resume(tmp_path / "two", sb, sa) as c:
        for w in (K1, Q0):
            c.put(projector_for(llama_pair, w))
        c.finish()
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    assert one == two


def test_refuses_cache_from_other_weights(tmp_path: Path, llama_pair: factory.Pair) -> None:
    sb, sa = specs(llama_pair)
    # The entry records its sources' bytes (as compute does; hashed here from the files).
    sha = tuple(
        hashlib.sha256(
            safe_open(d / "model.safetensors", "pt").get_slice(Q0)[:].numpy()
        ).hexdigest()
        for d in (llama_pair.base_dir, llama_pair.aligned_dir)
    )
    with ProjectionCache.create_or_resume(tmp_path / "c", sb, sa) as c:
        c.put(projector_for(llama_pair, Q0), source_sha256=sha)
        c.finish()
    f = llama_pair.aligned_dir / "model.safetensors"
    original = f.read_bytes()
    save_file({**llama_pair.aligned, "extra": torch.zeros(2)}, f)  # another layout
    sb2, sa2 = specs(llama_pair)
    with pytest.raises(CacheError) as ei:
        ProjectionCache.create_or_resume(tmp_path / "c", sb2, sa2)
    assert "aligned model" in str(ei.value) and "model.safetensors" in str(ei.value)
    f.write_bytes(original)  # the same content again, new times
    rb, sb = open_model(str(llama_pair.base_dir), label="base model")
    ra, sa = open_model(str(llama_pair.aligned_dir), label="aligned model")
    with rb, ra:
        ProjectionCache.create_or_resume(tmp_path / "c", sb, sa, readers=(rb, ra)).close()
        # Swapped sides are other weights too (same layout, other values).
        with pytest.raises(CacheError, match="base model"):
            ProjectionCache.create_or_resume(tmp_path / "c", sa, sb, readers=(ra, rb))
    with pytest.raises(CacheError, match="F32"):
        ProjectionCache.create_or_resume(tmp_path / "c", sb, sa, dtype=torch.bfloat16)


def test_hub_sources_compare_commit(tmp_path: Path) -> None:
    def hub(commit: str) -> SourceSpec:
        return SourceSpec("org/m", "hub", "/x", "org/m", None, commit, {"model.safetensors": {}})

    with ProjectionCache.create_or_resume(tmp_path / "c", hub("a" * 40), hub("b" * 40)) as c:
        c.finish()
    with pytest.raises(CacheError, match="commit"):
        ProjectionCache.create_or_resume(tmp_path / "c", hub("c" * 40), hub("b" * 40))
    ProjectionCache.create_or_resume(tmp_path / "c", hub("a" * 40), hub("b" * 40)).close()


def test_one_writer_at_a_time(tmp_path: Path, llama_pair: factory.Pair) -> None:
    sb, sa = specs(llama_pair)
    c = ProjectionCache.create_or_resume(tmp_path / "c", sb, sa)
    with pytest.raises(CacheError, match="another safelora process"):
        ProjectionCache.create_or_resume(tmp_path / "c", sb, sa)
    c.close()
    ProjectionCache.create_or_resume(tmp_path / "c", sb, sa).close()


def test_refuses_foreign_directories(tmp_path: Path, llama_pair: factory.Pair) -> None:
    sb, sa = specs(llama_pair)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(CacheError, match="not a projection cache"):
        ProjectionCache.create_or_resume(tmp_path / "full", sb, sa)
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="not a directory"):
        ProjectionCache.create_or_resume(tmp_path / "file", sb, sa)
    (tmp_path / "empty").mkdir()
    ProjectionCache.create_or_resume(tmp_path / "empty", sb, sa).close()
    assert (tmp_path / "empty" / MANIFEST).is_file()


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda m: "{not json", "unreadable"),
        (lambda m: {**m, "format_version": 99}, "format version 99"),
        (lambda m: {**m, "format": "other"}, "not a safelora"),
        (lambda m: {**m, "projector": "orthogonal"}, "projector kind"),
        (
            lambda m: {**m, "weights": {Q0: {**m["weights"][Q0], "shape": [3, 3]}}},
            "inconsistent",
        ),
        (
            lambda m: {**m, "weights": {Q0: {**m["weights"][Q0], "file": "../x.safetensors"}}},
            "inconsistent",
        ),
    ],
)
def test_open_refuses_damaged_manifests(
    tmp_path: Path, llama_pair: factory.Pair, damage, match: str
) -> None:
    sb, sa = specs(llama_pair)
    path = tmp_path / "c"
    with ProjectionCache.create_or_resume(path, sb, sa) as c:
        c.put(projector_for(llama_pair, Q0))
        c.finish()
    new = damage(read_manifest(path))
    (path / MANIFEST).write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(CacheError, match=match):
        ProjectionCache.open(path)


def test_open_missing_and_damaged_entry_file(tmp_path: Path, llama_pair: factory.Pair) -> None:
    with pytest.raises(CacheError, match="does not exist"):
        ProjectionCache.open(tmp_path / "nope")
    sb, sa = specs(llama_pair)
    path = tmp_path / "c"
    with ProjectionCache.create_or_resume(path, sb, sa) as c:
        c.put(projector_for(llama_pair, Q0))
        c.finish()
    (path / entry_file_name(Q0)).unlink()
    c = ProjectionCache.open(path)
    with pytest.raises(CacheError, match="cannot be read"):
        c.get(Q0)


def test_odd_weight_names_get_safe_file_names() -> None:
    assert entry_file_name("a.b.weight") == "a.b.weight.safetensors"
    odd = entry_file_name("a/../b weight")
    assert "/" not in odd and " " not in odd and odd.endswith(".safetensors")
    assert entry_file_name("a/b") != entry_file_name("a_b")


def test_kill_between_entry_file_and_manifest(
    tmp_path: Path, llama_pair: factory.Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest never names a file that is not complete, and a resume recomputes it."""
    import safelora_cli.cache as cache_mod

    sb, sa = specs(llama_pair)
    path = tmp_path / "c"
    with ProjectionCache.create_or_resume(path, sb, sa) as c:
        c.put(projector_for(llama_pair, Q0))
    real = cache_mod._write_atomic

    def dies_on_manifest(p: Path, chunks, **kw):  # type: ignore[no-untyped-def]
        if p.name == MANIFEST:
            raise KeyboardInterrupt
        return real(p, chunks, **kw)

    monkeypatch.setattr(cache_mod, "_write_atomic", dies_on_manifest)
    c = ProjectionCache.create_or_resume(path, sb, sa)
    with pytest.raises(KeyboardInterrupt):
        c.put(projector_for(llama_pair, K1))
    c.close()
    monkeypatch.setattr(cache_mod, "_write_atomic", real)
    assert (path / entry_file_name(K1)).exists()  # the file landed ...
    assert list(read_manifest(path)["weights"]) == [Q0]  # ... but is not named
    with ProjectionCache.create_or_resume(path, sb, sa) as c:
        assert c.weights() == [Q0]
        c.put(projector_for(llama_pair, K1))
        c.finish()
    assert torch.equal(
        ProjectionCache.open(path).get(K1).tensor, projector_for(llama_pair, K1).tensor
    )
