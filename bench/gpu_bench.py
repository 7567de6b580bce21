"""compute-projections on a GPU: how long the device waits for reads, and read throughput.

Usage: ``python bench/gpu_bench.py [--width 4096] [--layers 8] [--device cuda] [--work DIR]``

The prepared script for a machine with a GPU (the issue's "GPU" bullet; keep it under 8 minutes:
the default 4096-wide 8-layer slice is ~7 GiB per model and ~1 min to generate). Steps:

1. Build (or reuse) the synthetic 4096-wide pair (``synth.py``).
2. Baseline: a plain sequential read of the byte ranges compute-projections needs (the q/v
   tensors of both models), 16 MiB ``readinto`` calls, from a cold page cache when this process
   may drop it (root: ``/proc/sys/vm/drop_caches``), else warm and said so. Throughput in MiB/s.
3. ``safelora_cli.compute.compute_projections`` in this process on ``--device`` from the same
   cache state, instrumented without changing it: the time the prefetch thread spends in
   ``_PairStream.load`` (disk reads + pinning), and the time the computing thread spends blocked
   on the next pair (``prefetched`` iterator ``next``): that is the device waiting for reads.
   Reports wall time, wait time and its share of the run, read throughput (bytes read / wall and
   / time in reads) against the baseline.

Prints one JSON object on stdout. Runs on CPU too (``--device cpu``), which is how the smoke test
and a machine without a GPU exercise it; the figures only mean something on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import synth

MIB = 1 << 20


def drop_caches() -> bool:
    """Drop the page cache (needs root); False when not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def sequential_read(ranges: list[tuple[Path, int, int]]) -> tuple[int, float]:
    """Read each (file, offset, length) range in order with 16 MiB reads; (bytes, seconds)."""
    buf = bytearray(16 * MIB)
    mv = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for path, off, n in ranges:
        with open(path, "rb", buffering=0) as f:
            f.seek(off)
            while n > 0:
                k = f.readinto(mv[: min(n, len(buf))])
                if not k:
                    break
                total += k
                n -= k
    return total, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, default=Path("/tmp/safelora-bench"))
    ap.add_argument(
        "--no-drop", action="store_true", help="keep the page cache (shared machines, smoke test)"
    )
    a = ap.parse_args()

    import torch

    from safelora_cli import compute
    from safelora_cli.reader import CheckpointReader

    shape = synth.llama_shape(a.width, a.layers, vocab=a.vocab)
    t = time.perf_counter()
    pair = synth.make_pair(a.work / "data", shape)
    gen_s = time.perf_counter() - t
    names = synth.target_weights(shape)
    ranges = []
    for d in (pair.base_dir, pair.aligned_dir):
        with CheckpointReader.open(d, label="bench") as r:
            for n in names:
                i = r.info(n)
                ranges.append((i.path, i.start, i.nbytes))

    cold = not a.no_drop and drop_caches()
    seq_bytes, seq_s = sequential_read(ranges)

    waits: list[float] = []
    loads: list[float] = []
    lock = threading.Lock()
    orig_load = compute._PairStream.load
    orig_prefetched = compute.prefetched

    def timed_load(self, t):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return orig_load(self, t)
        finally:
            with lock:
                loads.append(time.perf_counter() - t0)

    def timed_prefetched(fn, items):  # type: ignore[no-untyped-def]
        it = orig_prefetched(fn, items)

        class Timed:
            def __iter__(self):  # type: ignore[no-untyped-def]
                return self

            def __next__(self):  # type: ignore[no-untyped-def]
                t0 = time.perf_counter()
                try:
                    return next(it)
                finally:
                    waits.append(time.perf_counter() - t0)

            def close(self) -> None:
                it.close()

        return Timed()

    compute._PairStream.load = timed_load  # type: ignore[method-assign]
    compute.prefetched = timed_prefetched  # type: ignore[assignment]
    out = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    try:
        if cold:
            drop_caches()
        dev = compute.parse_device(a.device)
        if dev.type == "cuda":  # CUDA context start-up is not part of the run
            torch.zeros(1, device=dev)
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        summary = compute.compute_projections(
            str(pair.base_dir),
            str(pair.aligned_dir),
            out / "cache",
            targets="q_proj,v_proj",
            device=a.device,
        )
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t0
    finally:
        compute._PairStream.load = orig_load  # type: ignore[method-assign]
        compute.prefetched = orig_prefetched  # type: ignore[assignment]
        shutil.rmtree(out, ignore_errors=True)

    wait = sum(waits)
    result = {
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "shape": shape.tag,
        "weights": len(names),
        "generate_s": gen_s,
        "page_cache": "cold (dropped)" if cold else "warm (--no-drop, or not root)",
        "sequential_read": {
            "bytes": seq_bytes,
            "seconds": seq_s,
            "mib_per_s": seq_bytes / MIB / seq_s,
        },
        "compute_projections": {
            "wall_s": wall,
            "bytes_read": summary.bytes_read,
            "cache_bytes": summary.cache_bytes,
            "wait_for_reads_s": wait,
            "wait_share": wait / wall,
            "prefetch_read_s": sum(loads),
            "mib_per_s_over_wall": summary.bytes_read / MIB / wall,
            "mib_per_s_while_reading": summary.bytes_read / MIB / max(sum(loads), 1e-9),
        },
    }
    result["read_throughput_vs_sequential"] = (
        result["compute_projections"]["mib_per_s_over_wall"]
        / result["sequential_read"]["mib_per_s"]
    )
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
