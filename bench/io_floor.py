"""I/O floors: the least any tool must do for each step, written as plainly as possible.

Usage::

    python bench/io_floor.py compute BASE ALIGNED OUT [--targets q_proj,v_proj] [--stats S]
    python bench/io_floor.py patch CACHE OUT ADAPTER... [--no-write] [--stats S]
    python bench/io_floor.py fly BASE ALIGNED OUT ADAPTER... [--stats S]

``compute`` (issue 19's floor for compute-projections): imports torch, reads each target pair
once (``safe_open``, one pair at a time), forms ``V = W_aligned - W_base`` in float32, scales it
to the factor ``F = V / sqrt(||V||_F)`` (no product) and writes one fsynced safetensors file
per weight into ``OUT``. No manifest, no validation, no provenance, no resume.

``patch``: loads every adapter whole, reads each cache entry the adapters need once (its form
from the cache's manifest), forms ``C B`` for every module in float64 (``C B`` or
``F (F^T B)``), casts back and writes each adapter's ``adapter_model.safetensors`` (fsynced) and
``adapter_config.json`` into ``OUT/<name>`` (``OUT`` itself for one adapter). ``--no-write``:
the same without writing (the floor for ``inspect``).

``fly``: ``compute``'s reads and delta, then ``patch``'s products and writes, with no cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import procstats
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def weight_map(d: Path) -> dict[str, Path]:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        return {k: d / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
    f = d / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        return {k: f for k in h.keys()}  # noqa: SIM118 (safe_open is not a mapping)


def fsynced_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def factor(bmap: dict[str, Path], amap: dict[str, Path], name: str) -> tuple[torch.Tensor, int]:
    """``F = V / sqrt(||V||_F)`` (float32) of one weight, and the bytes read for it."""
    with safe_open(str(bmap[name]), "pt") as hb, safe_open(str(amap[name]), "pt") as ha:
        wb, wa = hb.get_tensor(name), ha.get_tensor(name)
    n = wb.nbytes + wa.nbytes
    v = wa.float()
    v.sub_(wb)
    del wa, wb
    norm = float(torch.linalg.vector_norm(v))
    if norm > 0:
        v.div_(math.sqrt(norm))
    return v, n


def compute(a: argparse.Namespace) -> dict:
    suffixes = tuple(f".{t}.weight" for t in a.targets.split(","))
    bmap, amap = weight_map(a.base), weight_map(a.aligned)
    a.out.mkdir(parents=True, exist_ok=True)
    nbytes = written = weights = 0
    for name in (n for n in bmap if n.endswith(suffixes)):
        f, n = factor(bmap, amap, name)
        nbytes += n
        path = a.out / f"{name}.safetensors"
        fsynced_save({name: f}, path)
        written += path.stat().st_size
        weights += 1
        del f
    return {"bytes_read": nbytes, "cache_bytes": written, "weights": weights}


def load_adapters(dirs: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(d / "adapter_model.safetensors")) for d in dirs]


def weight_of(lora_b_key: str) -> str:
    return lora_b_key.removeprefix("base_model.model.").split(".lora_B.")[0] + ".weight"


def write_outputs(adapters: list[Path], tensors: list[dict], out: Path) -> None:
    for d, t in zip(adapters, tensors, strict=True):
        dest = out if len(adapters) == 1 else out / d.name
        dest.mkdir(parents=True, exist_ok=True)
        fsynced_save(t, dest / "adapter_model.safetensors")
        shutil.copyfile(d / "adapter_config.json", dest / "adapter_config.json")


def project_all(tensors: list[dict], weight: str, proj: torch.Tensor, kind: str) -> None:
    """Every adapter's lora_B of ``weight`` replaced by ``C B`` (float64, cast back)."""
    t64 = proj.double()
    for t in tensors:
        for k in [k for k in t if ".lora_B." in k and weight_of(k) == weight]:
            # As (B^T T^T)^T: MKL's float64 GEMM with a skinny left-hand side is 2-3.5x faster
            # than with a skinny right-hand side (the floor must not be slower than it needs).
            bt = t[k].double().T
            cb = (bt @ t64.T).T if kind == "gram" else ((bt @ t64) @ t64.T).T
            t[k] = cb.to(t[k].dtype).contiguous()


def patch(a: argparse.Namespace) -> dict:
    tensors = load_adapters(a.adapters)
    entries = json.loads((a.cache / "manifest.json").read_text())["weights"]
    needed = sorted({weight_of(k) for t in tensors for k in t if ".lora_B." in k})
    nbytes = 0
    for w in needed:
        e = entries[w]
        with safe_open(str(a.cache / e["file"]), "pt") as h:
            proj = h.get_tensor(w)
        nbytes += proj.nbytes
        project_all(tensors, w, proj, e["representation"])
    if not a.no_write:
        write_outputs(a.adapters, tensors, a.out)
    return {"bytes_read": nbytes, "weights": len(needed)}


def fly(a: argparse.Namespace) -> dict:
    tensors = load_adapters(a.adapters)
    bmap, amap = weight_map(a.base), weight_map(a.aligned)
    needed = sorted({weight_of(k) for t in tensors for k in t if ".lora_B." in k})
    nbytes = 0
    for w in needed:
        f, n = factor(bmap, amap, w)
        nbytes += n
        project_all(tensors, w, f, "factor")
    write_outputs(a.adapters, tensors, a.out)
    return {"bytes_read": nbytes, "weights": len(needed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("compute")
    c.add_argument("base", type=Path)
    c.add_argument("aligned", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--targets", default="q_proj,v_proj")
    p = sub.add_parser("patch")
    p.add_argument("cache", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("adapters", type=Path, nargs="+")
    p.add_argument("--no-write", action="store_true")
    f = sub.add_parser("fly")
    f.add_argument("base", type=Path)
    f.add_argument("aligned", type=Path)
    f.add_argument("out", type=Path)
    f.add_argument("adapters", type=Path, nargs="+")
    for s in (c, p, f):
        s.add_argument("--stats")
    a = ap.parse_args()
    t0 = time.perf_counter()
    res = {"compute": compute, "patch": patch, "fly": fly}[a.mode](a)
    procstats.dump(a.stats, in_process_s=time.perf_counter() - t0, **res)


if __name__ == "__main__":
    main()
