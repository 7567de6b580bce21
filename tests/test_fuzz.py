"""Fuzzing and limits (issue 6): malformed configs, indexes, headers and manifests only ever raise
SafeLoraError subclasses, and absurd sizes are refused before memory is allocated.

Hypothesis generates ``adapter_config.json`` contents (random JSON, and valid configs with one
field replaced by random JSON), ``model.safetensors.index.json`` contents, safetensors headers
(random entries, and byte-level mutations of a valid file) and projection-cache manifests, and
feeds them to the reader (:class:`CheckpointReader`), the adapter loader (:func:`load_adapter`)
and the cache (:meth:`ProjectionCache.open`). Whatever they accept must then load every tensor
without error. Examples are bounded (``max_examples``) and run without deadlines.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from safelora_cli.adapter import load_adapter
from safelora_cli.cache import ProjectionCache
from safelora_cli.errors import SafeLoraError
from safelora_cli.reader import DTYPE_SIZES, CheckpointReader, read_header
from tests import factory

# SAFELORA_FUZZ_EXAMPLES=5000 runs a long, random (not derandomized) campaign by hand.
_LONG = int(os.environ.get("SAFELORA_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_LONG or 120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=not _LONG,  # the same examples every run: a failure is reproducible
    database=None,
)

# JSON values, with the numbers that break naive code: huge ints, negative, zero, floats.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 10**400]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="safelora-fuzz-") as d:
        yield Path(d)


def only_clean_errors(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a SafeLoraError is fine (returns None), anything else fails the test."""
    try:
        return fn()
    except SafeLoraError as e:
        assert e.message and "\n" not in e.message
        return None


def load_everything(reader: CheckpointReader) -> None:
    for name in reader.names():
        reader.load(name)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzz")
    base = factory.llama_weights(layers=1, hidden=8, intermediate=12, heads=2, kv_heads=1)
    adapter = factory.write_adapter(root / "adapter", base=base, r=2)
    return {
        "config": json.loads((adapter / "adapter_config.json").read_text()),
        "weights": (adapter / "adapter_model.safetensors").read_bytes(),
        "base": base,
    }


def write_adapter_dir(d: Path, config: bytes, weights: bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_bytes(config)
    (d / "adapter_model.safetensors").write_bytes(weights)
    return d


def try_adapter(d: Path) -> None:
    def go() -> None:
        with load_adapter(str(d)) as ad:
            for m in ad.modules:
                a, b = ad.load_a(m), ad.load_b(m)
                assert tuple(a.shape) == (m.rank, m.d_in) and tuple(b.shape) == (m.d_out, m.rank)
            for s in ad.skipped:
                for k in s.keys:
                    ad.load(k)

    only_clean_errors(go)


# ----------------------------------------------------------------------------- adapter config


@FUZZ
@given(cfg=json_values)
def test_adapter_config_random_json(valid: dict[str, Any], cfg: Any) -> None:
    with scratch() as d:
        try_adapter(write_adapter_dir(d / "a", json.dumps(cfg).encode(), valid["weights"]))


FIELDS = [
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "use_rslora",
    "use_dora",
    "peft_type",
    "target_modules",
    "modules_to_save",
    "layer_replication",
    "target_parameters",
    "layers_to_transform",
    "bias",
    "lora_bias",
]


@FUZZ
@given(
    field=st.sampled_from(FIELDS),
    value=json_values,
    pattern=st.dictionaries(st.text(max_size=10), json_scalars, max_size=3),
)
def test_adapter_config_one_field_fuzzed(
    valid: dict[str, Any], field: str, value: Any, pattern: dict[str, Any]
) -> None:
    cfg = dict(valid["config"])
    cfg[field] = value
    if field in ("rank_pattern", "alpha_pattern") and not isinstance(value, dict):
        cfg[field] = pattern  # also reach the per-key checks (regex keys, values)
    with scratch() as d:
        try_adapter(write_adapter_dir(d / "a", json.dumps(cfg).encode(), valid["weights"]))


NASTY: list[Any] = [
    None,
    True,
    0,
    -1,
    2**63,
    10**400,  # too large for a float
    1e308,
    -0.0,
    "",
    "LORA",
    "(",
    "a**",
    [],
    [None],
    {},
    {"(": 1},
    {"q_proj": 10**400},
    {"q_proj": 0},
    {"q_proj": "x"},
    {"": 2},
    [[[]]],
]


def test_adapter_config_every_field_every_nasty_value(valid: dict[str, Any]) -> None:
    """The deterministic complement of the fuzzers: each field x each known-nasty value."""
    with scratch() as d:
        for i, (field, value) in enumerate((f, v) for f in FIELDS for v in NASTY):
            cfg = {**valid["config"], field: value}
            try_adapter(write_adapter_dir(d / str(i), json.dumps(cfg).encode(), valid["weights"]))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_adapter_config_random_bytes(valid: dict[str, Any], raw: bytes) -> None:
    with scratch() as d:
        try_adapter(write_adapter_dir(d / "a", raw, valid["weights"]))


# ----------------------------------------------------------------------------- safetensors


dtype_codes = st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), json_scalars)
dims = st.one_of(
    st.integers(min_value=0, max_value=6),
    st.sampled_from([-1, 2**31, 2**40, 2**63, 2**64 + 3]),
    json_scalars,
)


@st.composite
def headers(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """A header with plausible-to-absurd entries, and the data length to write after it."""
    names = draw(st.lists(st.text(min_size=1, max_size=10), max_size=4, unique=True))
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        shape = draw(st.one_of(st.lists(dims, max_size=3), json_values))
        code = draw(dtype_codes)
        if draw(st.booleans()) and isinstance(shape, list) and isinstance(code, str):
            # Consistent offsets for this shape (when computable), so later checks are reached.
            n = 1
            for s in shape:
                n *= s if isinstance(s, int) else 1
            nbytes = n * DTYPE_SIZES.get(code, 1)
            offs: Any = [offset, offset + nbytes]
            offset += max(nbytes, 0)
        else:
            offs = draw(st.one_of(st.lists(dims, max_size=3), json_values))
        entry: Any = {"dtype": code, "shape": shape, "data_offsets": offs}
        if draw(st.integers(0, 9)) == 0:
            entry = draw(json_values)
        header[name] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5)), json_values)
        )
    slack = draw(st.integers(-8, 16))
    return header, max(0, min(offset, 4096) + slack)


def write_raw(path: Path, header_bytes: bytes, data: bytes, length: int | None = None) -> None:
    n = len(header_bytes) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header_bytes + data)


@FUZZ
@given(h=headers())
def test_safetensors_random_headers(h: tuple[dict[str, Any], int]) -> None:
    header, data_len = h
    with scratch() as d:
        f = d / "model.safetensors"
        write_raw(f, json.dumps(header).encode(), b"\x00" * data_len)

        def go() -> None:
            with CheckpointReader.open(f, label="base model") as r:
                load_everything(r)

        only_clean_errors(go)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_safetensors_byte_mutations(
    valid: dict[str, Any], edits: list[tuple[int, int]], cut: int | None
) -> None:
    raw = bytearray(valid["weights"])
    hlen = struct.unpack("<Q", raw[:8])[0]
    for pos, byte in edits:
        # Mostly in the length and header (where parsing happens), sometimes in the data.
        raw[pos % (hlen + 8) if pos % 3 else pos % len(raw)] = byte
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    with scratch() as d:
        f = d / "adapter_model.safetensors"
        f.write_bytes(bytes(raw))

        def go() -> None:
            with CheckpointReader.open(f, label="adapter") as r:
                load_everything(r)

        only_clean_errors(go)
        (d / "adapter_config.json").write_text(json.dumps(valid["config"]))
        try_adapter(d)


# ----------------------------------------------------------------------------- index


@st.composite
def indexes(draw: st.DrawFn) -> Any:
    shard_names = st.one_of(
        st.sampled_from(
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "../model-00001-of-00002.safetensors",
                "/etc/passwd",
                "",
                ".",
                "sub/../model-00001-of-00002.safetensors",
                "model-00003-of-00002.safetensors",
                "a\x00b",
            ]
        ),
        st.text(max_size=12),
        json_scalars,
    )
    tensor_names = st.sampled_from(
        ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "nope", ""]
    )
    wm = draw(st.dictionaries(st.one_of(tensor_names, st.text(max_size=6)), shard_names))
    if draw(st.integers(0, 5)) == 0:
        return draw(json_values)
    index: dict[str, Any] = {"weight_map": wm}
    if draw(st.booleans()):
        index["metadata"] = draw(json_values)
    return index


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-sharded")
    base = factory.llama_weights(layers=1, hidden=8, intermediate=12, heads=2, kv_heads=1)
    return factory.write_checkpoint(root / "m", base, shards=2)


@FUZZ
@given(index=indexes())
def test_index_fuzz(sharded: Path, index: Any) -> None:
    with scratch() as d:
        m = d / "m"
        m.mkdir()
        for f in sharded.glob("*.safetensors"):
            (m / f.name).write_bytes(f.read_bytes())
        (m / "model.safetensors.index.json").write_text(json.dumps(index))

        def go() -> None:
            with CheckpointReader.open(m, label="base model") as r:
                load_everything(r)
                for f in r.files:
                    assert f.resolve().is_relative_to(m.resolve())

        only_clean_errors(go)


# ----------------------------------------------------------------------------- cache manifest


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safelora_cli.compute import compute_projections

    root = tmp_path_factory.mktemp("fuzz-cache")
    pair = factory.make_pair(root, layers=1, hidden=8, intermediate=12, heads=2, kv_heads=1)
    compute_projections(
        str(pair.base_dir), str(pair.aligned_dir), root / "cache", targets="q_proj,up_proj"
    )
    return root / "cache"


@FUZZ
@given(
    path=st.lists(st.sampled_from(["weights", "sources", "state", "dtype", 0, "file", "shape"])),
    value=json_values,
)
def test_cache_manifest_fuzz(cache_dir: Path, path: list[Any], value: Any) -> None:
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    # Replace the value at a (partly random) path: descend while the keys exist.
    node: Any = manifest
    for key in path[:-1]:
        if isinstance(node, dict) and node:
            node = node.get(key, node[sorted(node)[0]]) if isinstance(key, str) else node
    if isinstance(node, dict):
        key = path[-1] if path and isinstance(path[-1], str) else "weights"
        node[key] = value
    with scratch() as d:
        c = d / "cache"
        c.mkdir()
        for f in cache_dir.iterdir():
            (c / f.name).write_bytes(f.read_bytes())
        (c / "manifest.json").write_text(json.dumps(manifest))

        def go() -> None:
            with ProjectionCache.open(c, allow_incomplete=True) as cache:
                for w in cache.weights():
                    e = cache.entry(w)
                    cache.get(w, fan_in_fan_out=e.fan_in_fan_out)

        only_clean_errors(go)


# ----------------------------------------------------------------------------- limits


@contextmanager
def allocation_bound(limit: int = 20_000_000) -> Iterator[None]:
    """Fails if Python allocates more than ``limit`` bytes at once inside the block."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak allocation {peak} bytes"


DEEP = 100_000


def test_huge_header_length_is_refused_unread(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    write_raw(f, b"{}", b"", length=2**62)
    with allocation_bound(), pytest.raises(SafeLoraError, match="header length"):
        read_header(f)
    # Just above the bound, and a length pointing past the end of a small file.
    write_raw(f, b"{}", b"", length=100_000_001)
    with allocation_bound(), pytest.raises(SafeLoraError, match="exceeds"):
        read_header(f)
    write_raw(f, b"{}", b"", length=50_000_000)
    with allocation_bound(), pytest.raises(SafeLoraError, match="truncated"):
        read_header(f)


@pytest.mark.parametrize(
    "shape,offsets",
    [
        ([2**40, 2**40], [0, 16]),
        ([2**40, 2**40], [0, 2**82]),  # consistent with the shape: refused as past the end
        ([2**62], [0, 2**64]),
        ([2**31] * 8, [0, 4]),
        ([0, 2**62], [0, 0]),  # zero elements: harmless, loads as an empty tensor
    ],
)
def test_absurd_shapes_are_refused_before_allocating(
    tmp_path: Path, shape: list[int], offsets: list[int]
) -> None:
    f = tmp_path / "model.safetensors"
    header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}
    write_raw(f, json.dumps(header).encode(), b"\x00" * 16)
    with allocation_bound():
        try:
            with CheckpointReader.open(f, label="base model") as r:
                t = r.load("w")
            assert t.numel() == 0
        except SafeLoraError as e:
            assert "w" in e.message


def test_adapter_with_absurd_lora_shapes_is_refused(tmp_path: Path, valid: dict[str, Any]) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    header = {
        key: {"dtype": "F32", "shape": [2, 2**40], "data_offsets": [0, 2**43]},
        key.replace("lora_A", "lora_B"): {"dtype": "F32", "shape": [8, 2], "data_offsets": [0, 64]},
    }
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(valid["config"]))
    write_raw(d / "adapter_model.safetensors", json.dumps(header).encode(), b"\x00" * 64)
    with (
        allocation_bound(),
        pytest.raises(SafeLoraError, match=re.escape("adapter_model.safetensors")),
    ):
        load_adapter(str(d))


def deep(n: int) -> str:
    return "[" * n + "]" * n


def test_deep_json_in_header_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    write_raw(f, ('{"w": ' + deep(DEEP) + "}").encode(), b"")
    with allocation_bound(), pytest.raises(SafeLoraError, match=re.escape("model.safetensors")):
        read_header(f)


def test_deep_json_in_index_is_refused(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    save_file({"w": torch.zeros(2)}, str(m / "model-00001-of-00001.safetensors"))
    (m / "model.safetensors.index.json").write_text('{"weight_map": ' + deep(DEEP) + "}")
    with allocation_bound(), pytest.raises(SafeLoraError, match="index"):
        CheckpointReader.open(m, label="base model")


def test_deep_json_in_adapter_config_is_refused(tmp_path: Path, valid: dict[str, Any]) -> None:
    d = write_adapter_dir(tmp_path / "a", ('{"r": ' + deep(DEEP) + "}").encode(), valid["weights"])
    with allocation_bound(), pytest.raises(SafeLoraError, match=re.escape("adapter_config.json")):
        load_adapter(str(d))


def test_deep_json_in_config_and_manifest_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    from safelora_cli.sources import open_model

    m = tmp_path / "m"
    m.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(m / "model.safetensors"))
    (m / "config.json").write_text('{"model_type": ' + deep(DEEP) + "}")
    with allocation_bound(), pytest.raises(SafeLoraError, match=re.escape("config.json")):
        open_model(str(m), label="base model")
    c = tmp_path / "cache"
    c.mkdir()
    (c / "manifest.json").write_text('{"weights": ' + deep(DEEP) + "}")
    with allocation_bound(), pytest.raises(SafeLoraError, match=re.escape("manifest.json")):
        ProjectionCache.open(c)


def test_huge_json_files_are_refused_unread(tmp_path: Path, valid: dict[str, Any]) -> None:
    """A multi-gigabyte index, config or manifest (sparse file) is refused by size, unread."""
    from safelora_cli.reader import MAX_JSON_BYTES

    m = tmp_path / "m"
    m.mkdir()
    save_file({"w": torch.zeros(2)}, str(m / "model-00001-of-00001.safetensors"))
    with open(m / "model.safetensors.index.json", "wb") as f:
        f.truncate(MAX_JSON_BYTES * 50)
    with allocation_bound(), pytest.raises(SafeLoraError, match="index"):
        CheckpointReader.open(m, label="base model")
    d = write_adapter_dir(tmp_path / "a", b"", valid["weights"])
    with open(d / "adapter_config.json", "wb") as f:
        f.truncate(MAX_JSON_BYTES * 50)
    with allocation_bound(), pytest.raises(SafeLoraError, match=re.escape("adapter_config.json")):
        load_adapter(str(d))
    c = tmp_path / "cache"
    c.mkdir()
    with open(c / "manifest.json", "wb") as f:
        f.truncate(MAX_JSON_BYTES * 50)
    with allocation_bound(), pytest.raises(SafeLoraError, match=re.escape("manifest.json")):
        ProjectionCache.open(c)


# ----------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from safelora_cli.compute import compute_projections

    root = tmp_path_factory.mktemp("fuzz-cli")
    pair = factory.make_pair(root, layers=1, hidden=8, intermediate=12, heads=2, kv_heads=1)
    adapter = factory.write_adapter(root / "adapter", base=pair.base, r=2)
    compute_projections(
        str(pair.base_dir), str(pair.aligned_dir), root / "cache", targets="re:proj"
    )
    return {
        "root": root,
        "base": pair.base_dir,
        "aligned": pair.aligned_dir,
        "adapter": adapter,
        "cache": root / "cache",
    }


FLAGS = [
    "-o", "-p", "--base", "--aligned", "-k", "-t", "-f", "--device", "--force", "--dry-run",
    "--json", "-q", "--targets", "-a", "--top", "--sort", "--fail-below", "--revision-base",
    "--save-projections", "--help", "--version",
]  # fmt: skip
VALUES = [
    "0", "-1", "3", "0.5", "1e309", "nan", "-inf", "abc", "", "cpu", "cuda:1", "auto",
    "layer", "cosine", "q_proj", "re:(", "org/name", "main", "10000000000000000000000",
]  # fmt: skip


@settings(
    max_examples=_LONG or 60,
    deadline=None,
    derandomize=not _LONG,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    command=st.sampled_from(["patch", "inspect", "compute-projections"]),
    tokens=st.lists(
        st.one_of(
            st.sampled_from(FLAGS),
            st.sampled_from(VALUES),
            st.sampled_from(["ADAPTER", "CACHE", "BASE", "ALIGNED", "OUT", "OUT"]),
        ),
        max_size=10,
    ),
)
def test_command_line_soup(cli_world: dict[str, Path], command: str, tokens: list[str]) -> None:
    """Random flag/value/path mixtures: exit 0-3, never a traceback or an internal error."""
    from typer.testing import CliRunner

    from safelora_cli.cli import app

    with scratch() as d:
        paths = {
            "ADAPTER": str(cli_world["adapter"]),
            "CACHE": str(cli_world["cache"]),
            "BASE": str(cli_world["base"]),
            "ALIGNED": str(cli_world["aligned"]),
            "OUT": str(d / "out"),
        }
        argv = [command, *(paths.get(t, t) for t in tokens)]
        r = CliRunner().invoke(app, argv)
    assert r.exception is None or isinstance(r.exception, SystemExit), (argv, r.exception)
    assert r.exit_code in (0, 1, 2, 3), (argv, r.exit_code, r.stderr)
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
