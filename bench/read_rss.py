"""Peak resident memory while reading every tensor of a ~500 MB checkpoint, one at a time.

Usage::

    .venv/bin/python bench/read_rss.py [--size-mb 512] [--shards 4] [--dir DIR] [--keep]

Writes a sharded float32 checkpoint (``model.safetensors.index.json`` + shards) into a temporary
directory, then, each in a fresh subprocess so the peaks do not mix:

- ``pread``: ``CheckpointReader`` (the project's reader) loads every tensor, touches it, drops it;
- ``mmap``: ``safetensors.safe_open`` (mmap-based), one handle per shard kept open while every
  tensor is read, as a lazy reader that keeps its shard handles open would do;
- ``mmap-closed``: the same, but each shard's handle is closed right after its tensors are read;
- ``mmap-view``: zero-copy ``torch.frombuffer`` views over ``mmap.mmap`` of each shard, maps kept
  open (what an mmap-based lazy reader does).

Every tensor is fully touched (``t.sum()``). Each mode reports RSS after ``import torch`` (the
baseline), the peak (VmHWM from /proc/self/status, equal to ``ru_maxrss`` on Linux) and RSS at
the end, in MB. The goal for the reader is a peak within ~100 MB of the baseline, independent of
the checkpoint size. Exit status 1 when the reader misses it.

Measured on the 2-core dev box (torch 2.13 CPU, Linux, float32, 16 MiB tensors):

    size / shards   mode          after torch   peak     end    peak-base
    512 MB / 4      pread              228.7    250.1   250.0      21.4
                    mmap               228.7    745.7   745.7     516.9
                    mmap-closed        228.8    361.7   233.8     132.8
                    mmap-view          228.8    746.4   746.4     517.5
    1024 MB / 8     pread              228.7    250.0   249.9      21.2
                    mmap               228.7   1257.5  1257.7    1028.8
                    mmap-closed        228.8    361.7   233.8     132.9
                    mmap-view          228.7   1258.3  1258.3    1029.5

With 64 MiB tensors the pread peak is +69.5 MB: one tensor plus allocator slack, whatever the
checkpoint size. Pages of an open mmap stay resident, so mmap grows with everything read.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 1 << 20
MODES = ("pread", "mmap", "mmap-closed", "mmap-view")


def _status_mb(field: str) -> float:
    """A ``Vm*`` field of /proc/self/status in MB (falls back to ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_checkpoint(d: Path, size_mb: int, shards: int, tensor_mb: int) -> int:
    """A float32 checkpoint of about ``size_mb`` MB; returns its total tensor bytes."""
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    cols = 1024
    rows = tensor_mb * MB // (4 * cols)
    n_tensors = max(1, size_mb // tensor_mb)
    per_shard = -(-n_tensors // shards)
    weight_map: dict[str, str] = {}
    total = 0
    g = torch.Generator().manual_seed(0)
    i = 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {}
        for _ in range(per_shard):
            if i >= n_tensors:
                break
            key = f"model.layers.{i}.mlp.up_proj.weight"
            part[key] = torch.randn(rows, cols, generator=g)
            weight_map[key] = name
            total += rows * cols * 4
            i += 1
        if part:
            save_file(part, str(d / name), metadata={"format": "pt"})
        del part
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def measure(mode: str, d: Path) -> dict:
    """Run in a fresh process: read every tensor of ``d`` with ``mode``; report RSS figures."""
    import torch

    base = _status_mb("VmRSS")
    checksum = 0.0
    n = 0
    if mode == "pread":
        from safelora_cli.reader import CheckpointReader

        with CheckpointReader.open(d, label="bench") as r:
            for name in r.names():
                t = r.load(name)
                checksum += float(t.sum())  # touch every page
                n += 1
                del t
            end = _status_mb("VmRSS")
    elif mode == "mmap-view":
        import mmap

        from safelora_cli.reader import CheckpointReader

        r = CheckpointReader.open(d, label="bench")
        maps: dict[Path, mmap.mmap] = {}
        for name in r.names():
            ti = r.info(name)
            if ti.path not in maps:
                with open(ti.path, "rb") as fh:
                    maps[ti.path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            view = memoryview(maps[ti.path])[ti.start : ti.start + ti.nbytes]
            t = torch.frombuffer(view, dtype=torch.float32).reshape(ti.shape)
            checksum += float(t.sum())
            n += 1
            del t, view
        end = _status_mb("VmRSS")
        r.close()
    else:
        from safetensors import safe_open

        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        by_shard: dict[str, list[str]] = {}
        for k, v in index.items():
            by_shard.setdefault(v, []).append(k)
        handles = []
        for shard, names in sorted(by_shard.items()):
            f = safe_open(str(d / shard), framework="pt")
            f.__enter__()
            for name in names:
                t = f.get_tensor(name)
                checksum += float(t.sum())
                n += 1
                del t
            if mode == "mmap-closed":
                f.__exit__(None, None, None)
            else:
                handles.append(f)
        end = _status_mb("VmRSS")
        for f in handles:
            f.__exit__(None, None, None)
    peak = _status_mb("VmHWM")
    return {
        "mode": mode,
        "tensors": n,
        "rss_after_import_torch_mb": round(base, 1),
        "peak_mb": round(peak, 1),
        "rss_end_mb": round(end, 1),
        "peak_minus_baseline_mb": round(peak - base, 1),
        "checksum": checksum,
        "torch": torch.__version__,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--tensor-mb", type=int, default=16)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.measure:
        print(json.dumps(measure(args.measure, args.dir)))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="safelora-bench-")) if args.dir is None else args.dir
    try:
        total = write_checkpoint(tmp, args.size_mb, args.shards, args.tensor_mb)
        print(f"checkpoint: {tmp}  {total / MB:.0f} MB in {args.shards} shards")
        rows = []
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--measure", mode, "--dir", str(tmp)],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        hdr = f"{'mode':<12} {'after torch':>12} {'peak':>8} {'end':>8} {'peak-base':>10}"
        print(hdr)
        for r in rows:
            print(
                f"{r['mode']:<12} {r['rss_after_import_torch_mb']:>12.1f} {r['peak_mb']:>8.1f}"
                f" {r['rss_end_mb']:>8.1f} {r['peak_minus_baseline_mb']:>10.1f}"
            )
        ok = rows[0]["peak_minus_baseline_mb"] <= 100
        print(f"reader peak within 100 MB of post-import RSS: {'yes' if ok else 'NO'}")
        return 0 if ok else 1
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
