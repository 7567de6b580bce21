"""Buffer reuse in the weight-pair stream: BufferPool, CheckpointReader.load_into, put(written=).

The pool only pays if handing a buffer round never hands out memory that is still being read
or written; the stream tests below make the writer slow so that a buffer given back too early
would be overwritten while its entry is still being written, and compare every entry with a
projector built from the definition on fresh memory.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from safelora_cli import buffers as buffers_mod
from safelora_cli import cache as cache_mod
from safelora_cli.buffers import BufferPool
from safelora_cli.cache import ProjectionCache
from safelora_cli.compute import compute_projections
from safelora_cli.projector import (
    alignment_delta,
    alignment_delta_serial,
    build_projector,
)
from safelora_cli.reader import CheckpointReader
from safelora_cli.sources import open_model
from tests import factory

# ----------------------------------------------------------------------------- BufferPool


def test_take_gives_exact_size_and_reuses_the_slot() -> None:
    pool = BufferPool()
    a = pool.take(1000)
    assert a.dtype == torch.uint8 and a.numel() == 1000 and a.is_contiguous()
    ptr = a.data_ptr()
    pool.give(a)
    b = pool.take(600)  # fits in the free 1000-byte slot
    assert b.numel() == 600 and b.data_ptr() == ptr
    c = pool.take(600)  # the slot is out again: a new one
    assert c.data_ptr() != ptr
    assert pool.allocated == 2 and pool.outstanding == 2


def test_smallest_fitting_slot_is_chosen() -> None:
    pool = BufferPool()
    big, small = pool.take(4096), pool.take(512)
    big_ptr, small_ptr = big.data_ptr(), small.data_ptr()
    pool.give(big)
    pool.give(small)
    assert pool.take(100).data_ptr() == small_ptr
    assert pool.take(100).data_ptr() == big_ptr
    assert pool.take(5000).data_ptr() not in (big_ptr, small_ptr)


def test_slot_bytes_makes_every_slot_serve_every_request() -> None:
    pool = BufferPool(slot_bytes=4096)
    a = pool.take(8)
    ptr = a.data_ptr()
    pool.give(a)
    assert pool.take(4096).data_ptr() == ptr  # one size: any slot serves any request
    assert pool.allocated == 1


def test_tensor_view_and_give_by_view() -> None:
    pool = BufferPool()
    t = pool.tensor((3, 5), torch.float32)
    assert t.shape == (3, 5) and t.dtype == torch.float32 and t.is_contiguous()
    ptr = t.data_ptr()
    pool.give(t.view(15))  # any view starting at the slot's first byte
    assert pool.outstanding == 0
    assert pool.tensor((60,), torch.uint8).data_ptr() == ptr


def test_foreign_tensors_and_none_are_ignored() -> None:
    pool = BufferPool()
    pool.give(torch.zeros(10))
    pool.give(None)
    a = pool.take(10)
    pool.give(a)
    pool.give(a)  # a second give of the same slot does not put it on the free list twice
    x, y = pool.take(10), pool.take(10)
    assert x.data_ptr() != y.data_ptr()


def test_max_free_bounds_what_is_kept() -> None:
    pool = BufferPool(max_free=2)
    held = [pool.take(64) for _ in range(4)]
    ptrs = [h.data_ptr() for h in held]
    for h in held:
        pool.give(h)
    again = [pool.take(64) for _ in range(4)]
    reused = {a.data_ptr() for a in again} & set(ptrs)
    assert len(reused) == 2 and pool.allocated == 6


def test_threads_never_share_a_slot() -> None:
    pool = BufferPool(slot_bytes=256)
    errors: list[str] = []

    def worker(k: int) -> None:
        for i in range(300):
            t = pool.take(256)
            t.fill_(k)
            if not bool((t == k).all()):
                errors.append(f"worker {k} round {i}: slot shared")
            pool.give(t)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and pool.outstanding == 0 and pool.allocated <= 4


# ----------------------------------------------------------------------------- reader


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_load_into_equals_load_and_aliases_the_buffer(tmp_path: Path, dtype: torch.dtype) -> None:
    w = (torch.arange(35, dtype=torch.float64).reshape(5, 7) / 3 - 4).to(dtype)
    factory.write_checkpoint(tmp_path / "m", {"w": w, "s": torch.tensor(2.5)})
    with CheckpointReader.open(tmp_path / "m", label="model") as r:
        buf = torch.full((r.info("w").nbytes,), 0xAB, dtype=torch.uint8)
        got = r.load_into("w", buf)
        assert got.dtype == dtype and got.shape == (5, 7) and torch.equal(got, r.load("w"))
        assert got.data_ptr() == buf.data_ptr()
        assert r.load_into("s", torch.empty(4, dtype=torch.uint8)).item() == 2.5
        with pytest.raises(ValueError, match="bytes"):
            r.load_into("w", torch.empty(buf.numel() + 1, dtype=torch.uint8))
        with pytest.raises(ValueError, match="uint8"):
            r.load_into("w", torch.empty(buf.numel() // 4, dtype=torch.float32))


# ----------------------------------------------------------------------------- projector


def test_delta_and_gram_into_buffers_equal_fresh_memory() -> None:
    g = torch.Generator().manual_seed(0)
    wb = torch.randn(24, 40, generator=g).to(torch.bfloat16)
    wa = (wb.float() + 0.1 * torch.randn(24, 40, generator=g)).to(torch.bfloat16)
    for fifo in (False, True):
        shape = (40, 24) if fifo else (24, 40)
        out = torch.full(shape, float("nan"))
        v = alignment_delta_serial(wb, wa, fan_in_fan_out=fifo, out=out)
        assert v.data_ptr() == out.data_ptr()
        assert torch.equal(v, alignment_delta(wb, wa, fan_in_fan_out=fifo))
    with pytest.raises(ValueError, match="float32"):
        alignment_delta_serial(wb, wa, fan_in_fan_out=False, out=torch.empty(40, 24))
    v = alignment_delta(wb, wa, fan_in_fan_out=False)
    buf = torch.full((24, 24), float("nan"))
    p = build_projector("w", v, fan_in_fan_out=False, out=buf)
    assert p.tensor.data_ptr() == buf.data_ptr()
    assert torch.equal(p.tensor, build_projector("w", v, fan_in_fan_out=False).tensor)


# ----------------------------------------------------------------------------- put(written=)


def _projector(d: int = 8) -> Any:
    g = torch.Generator().manual_seed(1)
    return build_projector("model.w.weight", torch.randn(d, d, generator=g), fan_in_fan_out=False)


def _empty_cache(tmp_path: Path) -> ProjectionCache:
    pair = factory.make_pair(tmp_path / "pair", layers=1)
    _, sb = open_model(str(pair.base_dir), label="base model")
    _, sa = open_model(str(pair.aligned_dir), label="aligned model")
    return ProjectionCache.create_or_resume(tmp_path / "c", sb, sa, dtype=None)


def test_written_is_called_once_after_the_bytes_and_before_the_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _empty_cache(tmp_path)
    events: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(cache_mod.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    pr = _projector()
    want = pr.tensor.clone()

    def written() -> None:
        events.append("written")
        pr.tensor.fill_(float("nan"))  # the memory is reused from here on

    cache.put(pr, written=written)
    assert events.count("written") == 1
    assert events[events.index("written") + 1] == "fsync"  # the entry file's fsync comes next
    cache.finish()
    cache.close()
    got = ProjectionCache.open(tmp_path / "c").get("model.w.weight").tensor
    assert torch.equal(got, want)


def test_written_is_called_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _empty_cache(tmp_path)
    calls: list[int] = []

    def boom(*a: Any, **kw: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod, "_safetensors_chunks", boom)
    with pytest.raises(OSError):
        cache.put(_projector(), written=lambda: calls.append(1))
    assert calls == [1]
    cache.close()


# ----------------------------------------------------------------------------- the stream


def test_stream_reuses_few_buffers_and_every_entry_is_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mixed shapes (gram and factor), a slow writer: every cached entry equals the projector
    built from the definition on fresh memory, bit for bit, and the whole run used at most six
    buffers, all given back."""
    pair = factory.make_pair(tmp_path / "pair", dtype=torch.bfloat16, layers=4)
    pools: list[BufferPool] = []

    class Recording(BufferPool):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            pools.append(self)

        def clear(self) -> None:
            self.outstanding_at_clear = self.outstanding
            super().clear()

    monkeypatch.setattr(buffers_mod, "BufferPool", Recording)
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.003)  # the writer lags, so buffers are handed round while it writes
        real_fsync(fd)

    monkeypatch.setattr(cache_mod.os, "fsync", slow_fsync)
    targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    s = compute_projections(
        str(pair.base_dir), str(pair.aligned_dir), tmp_path / "c", targets=targets, device="cpu"
    )
    assert s.computed == 4 * 7
    (pool,) = pools
    assert pool.allocated <= 6 and pool.outstanding_at_clear == 0
    cache = ProjectionCache.open(tmp_path / "c")
    kinds = set()
    for w in cache.weights():
        v = alignment_delta(pair.base[w], pair.aligned[w], fan_in_fan_out=False)
        want = build_projector(w, v, fan_in_fan_out=False)
        got = cache.get(w)
        kinds.add(got.kind)
        assert torch.equal(got.tensor, want.tensor), w
        assert got.norm_v == want.norm_v
    assert kinds == {"gram", "factor"}
