"""The lazy shard reader: loading, dtypes, order, handles, and every up-front validation."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safelora_cli import reader as reader_mod
from safelora_cli.errors import CheckpointError
from safelora_cli.reader import CheckpointReader, read_header
from tests import factory

# -- helpers ----------------------------------------------------------------------------------


def raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", *, n: int | None = None):
    """Write a safetensors file by hand (so tests can break it in precise ways)."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)
    return path


def f32_entry(shape: list[int], begin: int) -> dict:
    numel = 1
    for d in shape:
        numel *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + 4 * numel]}


def as_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes of ``t``, formed independently of the reader."""
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def write_index(d: Path, weight_map: dict[str, str]) -> Path:
    p = d / "model.safetensors.index.json"
    p.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return p


def two_shards(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    save_file({"a": torch.ones(2)}, str(d / "s1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(d / "s2.safetensors"))


def expect(match_file: str | Path, fn, *args, **kw) -> CheckpointError:
    """Run ``fn``; it must raise CheckpointError whose message names ``match_file``."""
    with pytest.raises(CheckpointError) as ei:
        fn(*args, **kw)
    msg = ei.value.message
    assert Path(match_file).name in msg, msg
    assert "\n" not in msg
    assert ei.value.hint
    return ei.value


def open_dir(d: Path) -> CheckpointReader:
    return CheckpointReader.open(d, label="base model")


# -- loading ----------------------------------------------------------------------------------

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 50
    if dtype == torch.bool:
        return x > 0
    if dtype.is_floating_point:
        return x.to(dtype)
    if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        return x.abs().to(torch.int64).to(dtype)
    return x.to(torch.int64).to(dtype)


def test_dtype_round_trip_matches_safetensors(tmp_path: Path) -> None:
    tensors = {f"t{i}": _sample(dt, (3, 5), i) for i, dt in enumerate(DTYPES)}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(2.5)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ref = load_file(str(tmp_path / "model.safetensors"))
    with open_dir(tmp_path) as r:
        assert set(r.names()) == set(ref)
        for name, want in ref.items():
            got = r.load(name)
            assert got.dtype == want.dtype, name
            assert tuple(got.shape) == tuple(want.shape), name
            assert as_bytes(got) == as_bytes(want), name
            assert r.read_bytes(name) == as_bytes(want), name
            info = r.info(name)
            assert info.nbytes == want.numel() * want.element_size()


def test_load_casts_to_requested_dtype(tmp_path: Path) -> None:
    w = torch.randn(4, 6).bfloat16()
    save_file({"w": w, "h": torch.randn(3).double()}, str(tmp_path / "model.safetensors"))
    with open_dir(tmp_path) as r:
        got = r.load("w", dtype=torch.float32)
        assert got.dtype == torch.float32
        assert torch.equal(got, w.float())
        narrow = r.load("h", dtype=torch.float16, device="cpu")
        assert narrow.dtype == torch.float16


def test_loaded_tensor_owns_writable_memory(tmp_path: Path) -> None:
    save_file({"w": torch.ones(8)}, str(tmp_path / "model.safetensors"))
    with open_dir(tmp_path) as r:
        a = r.load("w")
        a.mul_(3)  # must not raise (not a read-only mapping) and must not alter the file
        assert torch.equal(r.load("w"), torch.ones(8))


def test_reads_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop that splits reads larger than one read call (2 GiB on Linux) is exercised."""
    monkeypatch.setattr(reader_mod, "_CHUNK", 7)
    w = torch.randn(13, 11)
    save_file({"w": w}, str(tmp_path / "x.safetensors"))
    with CheckpointReader.open(tmp_path / "x.safetensors", label="adapter") as r:
        assert torch.equal(r.load("w"), w)


def test_sharded_index_loads_every_tensor(tmp_path: Path) -> None:
    w = factory.llama_weights(layers=3)
    factory.write_checkpoint(tmp_path, w, shards=3)
    with open_dir(tmp_path) as r:
        assert set(r.names()) == set(w)
        assert len({r.info(n).path for n in r.names()}) == 3
        total = 0
        for n in r.names():
            assert torch.equal(r.load(n), w[n]), n
            total += w[n].numel() * w[n].element_size()
        assert r.bytes_read == total
        assert r.metadata() == {"format": "pt"}


def test_subset_of_shards(tmp_path: Path) -> None:
    two_shards(tmp_path)
    idx = write_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    (tmp_path / "s2.safetensors").unlink()  # not fetched: must not be needed
    r = CheckpointReader.from_index(idx, label="base model", shards=["s1.safetensors"])
    assert r.names() == ["a"]
    assert "b" not in r
    assert torch.equal(r.load("a"), torch.ones(2))
    with pytest.raises(CheckpointError, match="not fetched"):
        r.load("b")


def test_natural_order(tmp_path: Path) -> None:
    names = [f"model.layers.{i}.w" for i in (10, 2, 9, 1, 11, 0)] + ["lm_head.weight"]
    save_file({n: torch.zeros(1) for n in names}, str(tmp_path / "model.safetensors"))
    with open_dir(tmp_path) as r:
        assert r.names() == [
            "lm_head.weight",
            "model.layers.0.w",
            "model.layers.1.w",
            "model.layers.2.w",
            "model.layers.9.w",
            "model.layers.10.w",
            "model.layers.11.w",
        ]
        assert list(r) == r.names()


def test_missing_tensor_names_checkpoint(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with open_dir(tmp_path) as r:
        err = expect("model.safetensors", r.info, "nope")
        assert "base model" in err.message and "nope" in err.message


def test_adapter_file_directory(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text("{}")
    with CheckpointReader.open(tmp_path, label="adapter") as r:
        assert r.names() == ["x"]


def test_hf_snapshot_symlinks_into_blobs_are_allowed(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--m"
    blobs = repo / "blobs"
    snap = repo / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    two_shards(tmp_path / "src")
    for name in ("s1.safetensors", "s2.safetensors"):
        (tmp_path / "src" / name).rename(blobs / name.upper())
        (snap / name).symlink_to(Path("../../blobs") / name.upper())
    write_index(snap, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with open_dir(snap) as r:
        assert r.names() == ["a", "b"]
        assert torch.equal(r.load("b"), torch.zeros(3))


# -- handles ----------------------------------------------------------------------------------


def _open_fds_under(d: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(d.resolve())):
            n += 1
    return n


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_open_handles_are_bounded_and_closed(tmp_path: Path) -> None:
    files = []
    for i in range(reader_mod.MAX_OPEN_FILES + 3):
        f = tmp_path / f"f{i}.safetensors"
        save_file({f"t{i}": torch.full((2,), float(i))}, str(f))
        files.append(f)
    r = CheckpointReader.from_files(files, label="cache", root=tmp_path)
    assert _open_fds_under(tmp_path) == 0  # headers are read and closed at once
    for _ in range(2):
        for i in range(len(files)):
            assert r.load(f"t{i}")[0].item() == i
            assert _open_fds_under(tmp_path) <= reader_mod.MAX_OPEN_FILES
    assert r.open_handles == reader_mod.MAX_OPEN_FILES
    r.close()
    assert _open_fds_under(tmp_path) == 0
    with pytest.raises(CheckpointError, match="closed"):
        r.load("t0")


def test_context_manager_closes(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with open_dir(tmp_path) as r:
        r.load("a")
        assert r.open_handles == 1
    assert r.open_handles == 0


# -- validation: directories and index --------------------------------------------------------


def test_nonexistent_path(tmp_path: Path) -> None:
    expect("nothing_here", open_dir, tmp_path / "nothing_here")


def test_empty_directory(tmp_path: Path) -> None:
    d = tmp_path / "emptydir"
    d.mkdir()
    expect("emptydir", open_dir, d)


def test_several_safetensors_without_index(tmp_path: Path) -> None:
    two_shards(tmp_path / "amb")
    expect("amb", open_dir, tmp_path / "amb")


class _Evil:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickled_checkpoint_refused_unread(tmp_path: Path, name: str) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    marker = tmp_path / "UNPICKLED"
    (d / name).write_bytes(pickle.dumps(_Evil(marker)))
    err = expect(name, open_dir, d)
    assert "save_file" in (err.hint or "") and "weights_only=True" in (err.hint or "")
    err = expect(name, open_dir, d / name)
    assert not marker.exists()


def test_index_shard_absolute_path(tmp_path: Path) -> None:
    two_shards(tmp_path)
    write_index(tmp_path, {"a": str((tmp_path / "s1.safetensors").resolve())})
    err = expect("model.safetensors.index.json", open_dir, tmp_path)
    assert "outside" in err.message


def test_index_shard_dotdot(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    two_shards(tmp_path)
    d.mkdir()
    write_index(d, {"a": "../s1.safetensors"})
    err = expect("model.safetensors.index.json", open_dir, d)
    assert "outside" in err.message


def test_index_shard_symlink_escape(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    two_shards(tmp_path)
    d.mkdir()
    (d / "s1.safetensors").symlink_to(tmp_path / "s1.safetensors")
    write_index(d, {"a": "s1.safetensors"})
    err = expect("model.safetensors.index.json", open_dir, d)
    assert "outside" in err.message


def test_index_lists_missing_shard(tmp_path: Path) -> None:
    two_shards(tmp_path)
    write_index(tmp_path, {"a": "s1.safetensors", "c": "s3.safetensors"})
    err = expect("s3.safetensors", open_dir, tmp_path)
    assert "does not exist" in err.message


def test_indexed_name_absent_from_shard(tmp_path: Path) -> None:
    two_shards(tmp_path)
    write_index(tmp_path, {"a": "s1.safetensors", "ghost": "s2.safetensors"})
    err = expect("s2.safetensors", open_dir, tmp_path)
    assert "ghost" in err.message


def test_two_shards_hold_same_name(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"a": torch.ones(2), "b": torch.ones(1)}, str(tmp_path / "s2.safetensors"))
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    err = expect("s2.safetensors", open_dir, tmp_path)
    assert "'a'" in err.message and "s1.safetensors" in err.message


def test_from_files_duplicate_name(tmp_path: Path) -> None:
    two_shards(tmp_path)
    save_file({"a": torch.ones(2)}, str(tmp_path / "s3.safetensors"))
    files = [tmp_path / "s1.safetensors", tmp_path / "s3.safetensors"]
    expect("s3.safetensors", CheckpointReader.from_files, files, label="cache", root=tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps([1, 2]),
        json.dumps({"weight_map": ["a"]}),
        json.dumps({"weight_map": {"a": 1}}),
        json.dumps({"metadata": {}}),
        json.dumps({"weight_map": {}}),
        "[" * 100_000 + "]" * 100_000,
    ],
    ids=["not-json", "not-object", "map-not-dict", "value-not-str", "no-map", "empty", "deep"],
)
def test_malformed_index(tmp_path: Path, content: str) -> None:
    two_shards(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(content)
    expect("model.safetensors.index.json", open_dir, tmp_path)


# -- validation: headers ----------------------------------------------------------------------


def _bad_file(tmp_path: Path, header: dict | bytes, data: bytes = b"", **kw) -> Path:
    d = tmp_path / "bad"
    d.mkdir()
    raw_safetensors(d / "model.safetensors", header, data, **kw)
    return d


def test_file_shorter_than_length_prefix(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\x01\x02")
    expect("model.safetensors", open_dir, d)


def test_header_longer_than_file(tmp_path: Path) -> None:
    d = _bad_file(tmp_path, {"a": f32_entry([1], 0)}, b"\0" * 4, n=10_000)
    err = expect("model.safetensors", open_dir, d)
    assert "truncated" in err.message


def test_header_size_bounded(tmp_path: Path) -> None:
    d = _bad_file(tmp_path, b"{}", n=reader_mod.MAX_HEADER_BYTES + 1)
    err = expect("model.safetensors", open_dir, d)
    assert "exceeds" in err.message


def test_data_shorter_than_header_says(tmp_path: Path) -> None:
    d = _bad_file(tmp_path, {"a": f32_entry([4], 0)}, b"\0" * 8)
    err = expect("model.safetensors", open_dir, d)
    assert "truncated" in err.hint or "truncated" in err.message


@pytest.mark.parametrize(
    "header",
    [
        b"\xff\xfe not utf8",
        b"{not json",
        b"[1, 2, 3]",
        b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
    ],
    ids=["not-utf8", "not-json", "not-object", "deeply-nested", "duplicate-key"],
)
def test_malformed_header_json(tmp_path: Path, header: bytes) -> None:
    d = _bad_file(tmp_path, header, b"\0" * 8)
    expect("model.safetensors", open_dir, d)


@pytest.mark.parametrize(
    "entry",
    [
        "not an object",
        {"dtype": "F32", "shape": [1]},
        {"shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "data_offsets": [0, 4]},
        {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]},
        {"dtype": 7, "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0]},
        {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]},
        {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
    ],
    ids=[
        "entry-not-object",
        "no-offsets",
        "no-dtype",
        "no-shape",
        "unknown-dtype",
        "dtype-not-str",
        "negative-dim",
        "bool-dim",
        "float-dim",
        "shape-not-list",
        "one-offset",
        "negative-offset",
        "reversed-offsets",
        "size-mismatch",
        "absurd-shape",
        "out-of-bounds",
    ],
)
def test_malformed_entry(tmp_path: Path, entry: object) -> None:
    d = _bad_file(tmp_path, {"a": entry}, b"\0" * 4)
    expect("model.safetensors", open_dir, d)


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {"a": f32_entry([2], 0), "b": f32_entry([2], 4)}
    d = _bad_file(tmp_path, header, b"\0" * 12)
    err = expect("model.safetensors", open_dir, d)
    assert "overlap" in err.message


def test_metadata_must_be_str_to_str(tmp_path: Path) -> None:
    d = _bad_file(tmp_path, {"__metadata__": {"format": 1}, "a": f32_entry([1], 0)}, b"\0" * 4)
    expect("model.safetensors", open_dir, d)


def test_hand_written_valid_file(tmp_path: Path) -> None:
    """The same hand-written layout the failure tests break is accepted when well formed."""
    vals = torch.tensor([1.0, -2.0, 3.5])
    header = {"__metadata__": {"k": "v"}, "b": f32_entry([3], 0), "a": f32_entry([0], 12)}
    d = _bad_file(tmp_path, header, as_bytes(vals) + b"  ")
    h = read_header(d / "model.safetensors")
    assert h.metadata == {"k": "v"}
    with open_dir(d) as r:
        assert torch.equal(r.load("b"), vals)
        assert r.load("a").shape == (0,)
        assert r.metadata() == {"k": "v"}
