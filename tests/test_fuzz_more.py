"""More fuzzing (issue 15, category 12): safetensors headers built field by field, regex pattern
keys in ``adapter_config.json``, and LoRA values anywhere in the float64 range (NaN, Inf,
subnormals, 1e308) through the real ``inspect`` command.

Any exception other than a SafeLoraError (the CLI's "internal error") is a bug. Examples are
bounded (``max_examples``), derandomized (a failure reproduces) and run without deadlines;
``SAFELORA_FUZZ_EXAMPLES=N`` runs a longer random campaign by hand.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from safelora_cli.adapter import load_adapter
from safelora_cli.cli import app
from safelora_cli.errors import SafeLoraError
from safelora_cli.reader import DTYPE_SIZES, CheckpointReader
from tests import factory

_LONG = int(os.environ.get("SAFELORA_FUZZ_EXAMPLES", "0"))


def fuzz(n: int) -> Any:
    return settings(
        max_examples=_LONG or n,
        deadline=None,
        derandomize=not _LONG,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="safelora-fuzz2-") as d:
        yield Path(d)


def clean(fn: Any) -> Any:
    try:
        return fn()
    except SafeLoraError as e:
        assert e.message and "\n" not in e.message and len(e.message) < 2000
        return None


# ----------------------------------------------------------------------------- headers

ints = st.one_of(
    st.integers(0, 64),
    st.sampled_from([-1, 2**31, 2**32, 2**53 + 1, 2**63, 2**64, 2**64 + 8, 10**30]),
)
odd = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=4),
                st.lists(st.integers(0, 4), max_size=2), st.just({}))  # fmt: skip
codes = st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), st.sampled_from(["f32", "F4", "", "I128"]))


@st.composite
def layouts(draw: st.DrawFn) -> tuple[bytes, int]:
    """A header whose offsets are mostly consistent, with targeted breakage: overlaps, gaps,
    reversed or shared spans, huge numbers, non-int fields, odd metadata."""
    n = draw(st.integers(0, 4))
    header: dict[str, Any] = {}
    pos = 0
    for i in range(n):
        code = draw(codes)
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        numel = math.prod(shape)
        size = numel * DTYPE_SIZES.get(code, 4)
        begin = pos + draw(st.sampled_from([0, 0, 0, 1, -1, -size]))
        offs: Any = [max(begin, 0), max(begin, 0) + size]
        pos = max(pos, offs[1])
        field = draw(st.sampled_from(["none", "none", "shape", "offs", "dtype", "extra", "order"]))
        entry: dict[str, Any] = {"dtype": code, "shape": shape, "data_offsets": offs}
        if field == "shape":
            entry["shape"] = draw(st.one_of(odd, st.lists(st.one_of(ints, odd), max_size=3)))
        elif field == "offs":
            entry["data_offsets"] = draw(st.one_of(odd, st.lists(st.one_of(ints, odd), max_size=3)))
        elif field == "dtype":
            entry["dtype"] = draw(odd)
        elif field == "extra":
            entry[draw(st.text(max_size=3))] = draw(odd)
        elif field == "order":
            entry["data_offsets"] = offs[::-1]
        name = draw(st.sampled_from([f"t{i}", "", "__metadata__", "t0", f"lora\x00{i}", "é" * 3]))
        header[name] = entry
    if draw(st.booleans()):
        values = st.one_of(st.text(max_size=3), odd)
        header["__metadata__"] = draw(
            st.one_of(odd, st.dictionaries(st.text(max_size=3), values, max_size=3))
        )
    raw = json.dumps(header).encode()
    pad = draw(st.sampled_from([b"", b" ", b"\x00", b"  \n"]))
    data = pos + draw(st.integers(-2, 4))
    return raw + pad, max(data, 0)


@fuzz(250)
@given(h=layouts(), length_delta=st.sampled_from([0, 0, 0, -1, 1, 7]))
def test_safetensors_header_layouts(h: tuple[bytes, int], length_delta: int) -> None:
    raw, data = h
    with scratch() as d:
        f = d / "model.safetensors"
        f.write_bytes(struct.pack("<Q", max(len(raw) + length_delta, 0)) + raw + b"\x01" * data)

        def go() -> None:
            with CheckpointReader.open(f, label="base model") as r:
                for name in r.names():
                    info = r.info(name)
                    t = r.load(name)
                    assert tuple(t.shape) == tuple(info.shape)
                    if t.is_floating_point():
                        r.load(name, dtype=torch.float64)

        clean(go)


# ----------------------------------------------------------------------------- config regexes


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz2")
    base = factory.llama_weights(layers=2, hidden=8, intermediate=12, heads=2, kv_heads=1)
    return factory.write_adapter(root / "adapter", base=base, r=2)


@pytest.fixture(scope="module", autouse=True)
def short_regex_timeout() -> Iterator[None]:
    old = os.environ.get("SAFELORA_REGEX_TIMEOUT")
    os.environ["SAFELORA_REGEX_TIMEOUT"] = "2"
    yield
    if old is None:
        os.environ.pop("SAFELORA_REGEX_TIMEOUT", None)
    else:
        os.environ["SAFELORA_REGEX_TIMEOUT"] = old


regex_text = st.text(alphabet="aqvp_.()+*?[]{}|\\^$0129:<=!P#ilmn,-", max_size=14)
pattern_values = st.one_of(st.integers(-2, 4), st.floats(allow_nan=False), odd)


@fuzz(120)
@given(
    rank=st.dictionaries(st.one_of(regex_text, st.sampled_from(["q_proj", "a{99999999999}",
         "(" * 3000 + ")" * 3000, "(a+)+$", "layers\\.1\\..*"])), pattern_values, max_size=3),
    alpha=st.dictionaries(regex_text, pattern_values, max_size=3),
    targets=st.one_of(regex_text, st.lists(regex_text, max_size=3), odd),
)  # fmt: skip
def test_adapter_config_patterns(adapter_dir: Path, rank: dict, alpha: dict, targets: Any) -> None:
    with scratch() as d:
        a = d / "a"
        shutil.copytree(adapter_dir, a)
        cfg = json.loads((a / "adapter_config.json").read_text())
        cfg.update(rank_pattern=rank, alpha_pattern=alpha, target_modules=targets)
        (a / "adapter_config.json").write_text(json.dumps(cfg))

        def go() -> None:
            with load_adapter(str(a)) as ad:
                for m in ad.modules:
                    assert m.rank > 0 and math.isfinite(m.scale)

        clean(go)


# ----------------------------------------------------------------------------- LoRA values


@pytest.fixture(scope="module")
def scored_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from safelora_cli.compute import compute_projections

    root = tmp_path_factory.mktemp("fuzz2-values")
    pair = factory.make_pair(root, layers=1, hidden=8, intermediate=12, heads=2, kv_heads=1)
    adapter = factory.write_adapter(root / "adapter", base=pair.base, r=2, targets=("q_proj",))
    compute_projections(str(pair.base_dir), str(pair.aligned_dir), root / "cache", targets="q_proj")
    return {"adapter": adapter, "cache": root / "cache"}


specials = st.sampled_from([math.nan, math.inf, -math.inf, 5e-324, -0.0, 1.7e308, 0.0])


@fuzz(60)
@given(
    eb=st.integers(-1074, 1023),
    ea=st.integers(-1074, 1023),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    poke=st.lists(st.tuples(st.booleans(), st.integers(0, 63), specials), max_size=2),
)
def test_lora_values_anywhere_in_the_float_range(
    scored_world: dict[str, Path], eb: int, ea: int, dtype: torch.dtype, poke: list
) -> None:
    """Exit 0, 1 or 3; strict JSON; a cosine is in [-1, 1] and, when only the scale changed,
    equal to the honest adapter's."""
    honest = _inspect(scored_world["adapter"], scored_world["cache"])
    assert honest[0] == 0
    with scratch() as d:
        a = d / "a"
        shutil.copytree(scored_world["adapter"], a)
        f = a / "adapter_model.safetensors"
        t = load_file(str(f))
        for k in list(t):
            e = eb if ".lora_B." in k else ea
            t[k] = (t[k].double() * 2.0 ** (e // 2) * 2.0 ** (e - e // 2)).to(dtype)
        keys = sorted(t)
        for in_b, i, v in poke:
            k = next(k for k in keys if (".lora_B." in k) == in_b)
            # Through float64, so 1.7e308 becomes Inf in a narrower dtype (as a file would).
            t[k].view(-1)[i % t[k].numel()] = torch.tensor(v, dtype=torch.float64).to(dtype)
        save_file({k: v.contiguous() for k, v in t.items()}, str(f), metadata={"format": "pt"})
        code, cos = _inspect(a, scored_world["cache"])
    assert code in (0, 1, 3)
    if code == 1:
        return
    finite = all(bool(torch.isfinite(v).all()) for v in t.values())
    assert finite, "an adapter holding NaN/Inf was scored"
    for name, c in cos.items():
        assert c is None or -1.0 <= c <= 1.0
        exact = not poke and dtype == torch.float64 and -1000 < eb < 960 and -1000 < ea < 960
        if c is not None and exact:
            assert c == pytest.approx(honest[1][name], abs=1e-6)


def _no_constant(name: str) -> Any:
    raise AssertionError(f"non-JSON literal {name} in --json output")


def _inspect(adapter: Path, cache: Path) -> tuple[int, dict[str, float | None]]:
    r = CliRunner().invoke(
        app, ["inspect", str(adapter), "-p", str(cache), "--json", "--fail-below", "0.5"]
    )
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    if r.exit_code == 1:
        assert r.stdout == "" and r.stderr.startswith("error: ")
        return 1, {}
    [rep] = [json.loads(ln, parse_constant=_no_constant) for ln in r.stdout.splitlines()]
    return r.exit_code, {m["name"]: m["cosine"] for m in rep["modules"]}
