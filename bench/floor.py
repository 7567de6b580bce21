"""The floor: the least any tool must do to build the projection cache, and nothing else.

Usage: ``python bench/floor.py BASE_DIR ALIGNED_DIR [--targets q_proj,v_proj] [--stats S.json]``

Imports torch, reads each needed (base, aligned) weight pair once with safetensors ``safe_open``
(one pair at a time; the shard handles are closed after each pair so mapped pages do not pile up
in RSS), forms ``V = W_aligned - W_base`` in float32 and the matrix the cache holds
(``V V^T / ||V||_F`` when ``d_out <= d_in``, else the factor ``V / sqrt(||V||_F)``), then drops
it. No validation, no provenance, no writing: the cost of the reads and the products alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import procstats
import torch
from safetensors import safe_open


def weight_map(d: Path) -> dict[str, Path]:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        return {k: d / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
    f = d / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        return {k: f for k in h.keys()}  # noqa: SIM118 (safe_open is not a mapping)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=Path)
    ap.add_argument("aligned", type=Path)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--stats")
    a = ap.parse_args()
    t0 = time.perf_counter()
    suffixes = tuple(f".{t}.weight" for t in a.targets.split(","))
    bmap, amap = weight_map(a.base), weight_map(a.aligned)
    names = [n for n in bmap if n.endswith(suffixes)]
    nbytes = cache_bytes = 0
    for n in names:
        with safe_open(str(bmap[n]), "pt") as hb, safe_open(str(amap[n]), "pt") as ha:
            wb, wa = hb.get_tensor(n), ha.get_tensor(n)
        nbytes += wb.nbytes + wa.nbytes
        v = wa.float()
        v.sub_(wb.float() if wb.dtype != torch.float32 else wb)
        del wa, wb
        norm = float(torch.linalg.vector_norm(v))
        if v.shape[0] <= v.shape[1]:
            m = (v @ v.T).div_(norm)
        else:
            m = v.div_(norm**0.5)
        cache_bytes += m.nbytes
        del v, m
    procstats.dump(
        a.stats,
        bytes_read=nbytes,
        cache_bytes=cache_bytes,
        weights=len(names),
        in_process_s=time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
