"""bench/model_bench.py's children at toy size: the trio it builds and its two references.

No timing is asserted: the fine-tuned model differs from the aligned one on every tensor, the
floor writes FINETUNED's shards unchanged and reports the bytes of all three checkpoints, and
the full-load reference holds all three.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import model_trio as mt

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("model_bench")
    finally:
        sys.path.remove(str(BENCH))


def test_toy_trio_floor_and_full_load(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bench.make_trio(tmp_path, 64, 1, 128)
    top = tmp_path / "llama-w64-L1-bf16-v128"
    base, al, ft = top / "base", top / "aligned", top / "finetuned"
    a, f = mt.read(al), mt.read(ft)
    assert set(a) == set(f) and all(not torch.equal(a[n], f[n]) for n in a)
    assert json.loads((ft / "config.json").read_text())["model_type"] == "llama"
    stats = tmp_path / "floor.json"
    bench.floor(ft, al, base, tmp_path / "out", str(stats))
    for shard in sorted(ft.glob("*.safetensors")):
        got, want = load_file(str(tmp_path / "out" / shard.name)), load_file(str(shard))
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    sizes = sum(t.nbytes for d in (base, al, ft) for t in mt.read(d).values())
    assert json.loads(stats.read_text())["bytes_read"] == sizes
    stats = tmp_path / "full.json"
    bench.full_load([ft, al, base], str(stats))
    assert json.loads(stats.read_text())["bytes_read"] == sizes
