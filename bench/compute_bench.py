"""compute-projections performance against issue 3's goals (each measurement a fresh child).

Usage::

    .venv/bin/python bench/compute_bench.py [--width 1024] [--layers 4 8] [--dtype bf16]
                                            [--work DIR] [--json OUT.json]

Importable: :func:`run_bench` returns the figures as a dict (the ``make bench`` driver builds on
it). The parent never imports torch; every measurement runs in its own ``python`` child, which
reports its own peak RSS (``VmHWM``; ``ru_maxrss`` as a cross-check) and timings as JSON.

Pairs: Llama-shaped bf16 base/aligned checkpoints (GQA: k/v are a quarter of q; intermediate
``2.75 x width``; vocab 32000; two shards + index + config.json), written by a child.
Targets: every linear weight of every layer (q, k, v, o, gate, up, down), so both
representations are exercised (gate/up are ``factor``, the rest ``gram``).

Measurements (children):

- ``compute``: ``safelora_cli.compute.compute_projections(..., device="cpu")`` into a fresh
  cache; wall time of that call, its peak RSS.
- ``official``: the way the official code works (``SafeLoRA.get_aligned_matrix``): both
  models whole in float32 (``from_pretrained``'s default) and every target's ``d_out x d_out``
  projector computed up front and kept. The peak-RSS goal is measured against this.
- ``whole``: a generous variant, both checkpoints merely loaded whole in their stored bf16
  (``safetensors.torch.load_file``, every tensor touched), reported alongside.
- ``bare``: for the same target shapes, a random float32 ``V`` per weight (not timed) and only
  the matmul that forms the smaller Gram, ``V V^T`` (``d_out <= d_in``) or ``V^T V``; the sum of
  the matmul times. ``bare_gram`` is the stricter sum over the ``gram`` weights only, i.e.
  exactly the matmuls compute-projections performs (it stores ``factor`` without a matmul).

Goals (issue 3): peak RSS at 2x depth within 15% of 1x depth; peak RSS >= 3x below the
official way; CPU wall time <= 1.5x ``bare`` (worst over the depths).

Measured on the 2-core dev box (torch 2.13 CPU, shared with other jobs, load average ~4-5),
``--repeats 3``::

    layers weights model MB read MB cache MB peak MB whole MB official MB wall s bare s gram s
         4      28    442.5   180.4    144.7   307.7    689.3      1518.1   1.80   1.34   0.73
         8      56    622.9   360.7    289.4   308.1    869.7      2196.3   2.84   3.58   1.83
    peak RSS, 2x depth / 1x depth: 1.001 (goal <= 1.15: met)
    official-way peak / compute peak: 7.13x (goal >= 3: met); plain bf16 load / compute: 2.82x
    wall / bare Gram matmuls (worst depth): 1.35 (goal <= 1.5: met); wall / the gram matmuls
    compute does: 2.46

About 230 MB of every peak is the interpreter plus torch. Wall times on this shared box vary by
+-30% from run to run.
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
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
MB = 1e6
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = ",".join(LINEAR)


def _hwm() -> int:
    """This process's peak RSS in bytes (VmHWM), falling back to ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _emit(**kw: object) -> None:
    kw["peak_rss"] = _hwm()
    kw["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(kw), flush=True)


# ----------------------------------------------------------------------------- shapes


def shapes(width: int, layers: int, vocab: int = 32000) -> list[tuple[str, tuple[int, ...]]]:
    """Checkpoint tensors (name, shape) of a Llama-like model, linear orientation."""
    inter = round(width * 2.75 / 64) * 64
    kv = width // 4
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, width))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (width, width)),
            (f"{p}.self_attn.k_proj.weight", (kv, width)),
            (f"{p}.self_attn.v_proj.weight", (kv, width)),
            (f"{p}.self_attn.o_proj.weight", (width, width)),
            (f"{p}.mlp.gate_proj.weight", (inter, width)),
            (f"{p}.mlp.up_proj.weight", (inter, width)),
            (f"{p}.mlp.down_proj.weight", (width, inter)),
            (f"{p}.input_layernorm.weight", (width,)),
            (f"{p}.post_attention_layernorm.weight", (width,)),
        ]
    out += [("model.norm.weight", (width,)), ("lm_head.weight", (vocab, width))]
    return out


def target_shapes(width: int, layers: int) -> list[tuple[int, ...]]:
    """Shapes of the target weights (every linear weight of every layer)."""
    ends = tuple(f"{t}.weight" for t in LINEAR)
    return [s for n, s in shapes(width, layers) if n.endswith(ends)]


# ----------------------------------------------------------------------------- children


def child_make(root: Path, width: int, layers: int, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    items = shapes(width, layers)
    cfg = {
        "model_type": "llama",
        "hidden_size": width,
        "num_hidden_layers": layers,
        "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype],
    }
    half = len(items) // 2
    parts = [items[:half], items[half:]]
    for side in ("base", "aligned"):
        (root / side).mkdir(parents=True, exist_ok=True)
    wm: dict[str, str] = {}
    total = 0
    for k, part in enumerate(parts):
        fname = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        g = torch.Generator().manual_seed(k)
        base, aligned = {}, {}
        for name, shp in part:
            t = torch.randn(shp, generator=g) * 0.02
            base[name] = t.to(dt)
            aligned[name] = (t + 0.002 * torch.randn(shp, generator=g)).to(dt)
            wm[name] = fname
            total += base[name].nbytes
        save_file(base, str(root / "base" / fname), metadata={"format": "pt"})
        save_file(aligned, str(root / "aligned" / fname), metadata={"format": "pt"})
        del base, aligned
    for side in ("base", "aligned"):
        (root / side / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm})
        )
        (root / side / "config.json").write_text(json.dumps(cfg))
    _emit(done=True)


def child_compute(root: Path, cache: Path) -> None:
    t_import = time.perf_counter()
    import torch  # noqa: F401  (import cost kept out of the measured call)

    from safelora_cli.compute import compute_projections

    t0 = time.perf_counter()
    s = compute_projections(
        str(root / "base"), str(root / "aligned"), cache, targets=TARGETS, device="cpu"
    )
    wall = time.perf_counter() - t0
    _emit(
        wall_s=wall,
        import_s=t0 - t_import,
        computed=s.computed,
        bytes_read=s.bytes_read,
        cache_bytes=s.cache_bytes,
        threads=__import__("torch").get_num_threads(),
    )


def child_whole(root: Path, official: bool) -> None:
    """Both checkpoints in memory at once; ``official`` also does what the official code does.

    Plain: every shard through ``safetensors.torch.load_file`` in its stored dtype, every tensor
    touched. Official (``SafeLoRA.get_aligned_matrix``): both models held in float32 (what
    ``from_pretrained`` gives by default) and every target's ``C = V V^T / ||V||_F``
    (``d_out x d_out``) computed up front and kept in a list.
    """
    import torch
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    held: list[dict] = []
    nbytes = 0
    for side in ("base", "aligned"):
        sd: dict = {}
        for f in sorted((root / side).glob("*.safetensors")):
            part = load_file(str(f))
            for k in list(part):
                t = part.pop(k)
                if official:
                    t = t.float()
                if t.numel():
                    t.view(-1)[:: max(1, 4096 // t.element_size())].float().sum()
                nbytes += t.nbytes
                sd[k] = t
        held.append(sd)
    projectors = []
    if official:
        ends = tuple(f"{t}.weight" for t in LINEAR)
        base, aligned = held
        for name in base:
            if name.endswith(ends):
                v = aligned[name] - base[name]
                projectors.append((v @ v.T) / torch.linalg.norm(v))
                del v
    _emit(
        wall_s=time.perf_counter() - t0,
        model_bytes=nbytes,
        projector_bytes=sum(p.nbytes for p in projectors),
        threads=torch.get_num_threads(),
    )


def child_bare(width: int, layers: int) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    total = gram_only = 0.0
    for d_out, d_in in target_shapes(width, layers):
        v = torch.randn(d_out, d_in, generator=g)
        t0 = time.perf_counter()
        m = v @ v.T if d_out <= d_in else v.T @ v
        dt = time.perf_counter() - t0
        total += dt
        if d_out <= d_in:
            gram_only += dt
        del m, v
    _emit(wall_s=total, gram_wall_s=gram_only, threads=torch.get_num_threads())


# ----------------------------------------------------------------------------- parent


def _child(*args: str) -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(ROOT))
    out = subprocess.run(
        [sys.executable, str(HERE), "--child", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def run_bench(
    *,
    width: int = 1024,
    layers: tuple[int, int] = (4, 8),
    dtype: str = "bf16",
    work: Path | None = None,
    repeats: int = 2,
) -> dict:
    """Build the pairs, run every measurement in its own child, return figures and goal verdicts.

    Times are the best of ``repeats`` (least disturbed by other load); peak RSS the max.
    """
    tmp = Path(work) if work else Path(tempfile.mkdtemp(prefix="safelora-compute-bench-"))
    res: dict = {"width": width, "dtype": dtype, "depths": {}}
    try:
        for n in layers:
            root = tmp / f"w{width}-l{n}-{dtype}"
            if not (root / "aligned" / "config.json").exists():
                shutil.rmtree(root, ignore_errors=True)
                _child("make", str(root), str(width), str(n), dtype)
            comp, whole, bare = [], [], []
            for k in range(repeats):
                cache = root / f"cache-{k}"
                shutil.rmtree(cache, ignore_errors=True)
                comp.append(_child("compute", str(root), str(cache)))
                shutil.rmtree(cache, ignore_errors=True)
                bare.append(_child("bare", str(width), str(n)))
            whole.append(_child("whole", str(root)))
            official = _child("official", str(root))
            res["depths"][n] = {
                "compute_wall_s": min(c["wall_s"] for c in comp),
                "compute_peak_rss": max(c["peak_rss"] for c in comp),
                "compute_ru_maxrss": max(c["ru_maxrss"] for c in comp),
                "bytes_read": comp[0]["bytes_read"],
                "cache_bytes": comp[0]["cache_bytes"],
                "weights": comp[0]["computed"],
                "whole_peak_rss": whole[0]["peak_rss"],
                "model_bytes": whole[0]["model_bytes"],
                "official_peak_rss": official["peak_rss"],
                "official_wall_s": official["wall_s"],
                "bare_wall_s": min(b["wall_s"] for b in bare),
                "bare_gram_wall_s": min(b["gram_wall_s"] for b in bare),
                "threads": comp[0]["threads"],
            }
    finally:
        if work is None:
            shutil.rmtree(tmp, ignore_errors=True)
    lo, hi = res["depths"][layers[0]], res["depths"][layers[1]]
    goals = {
        "rss_depth_ratio": hi["compute_peak_rss"] / lo["compute_peak_rss"],
        "rss_vs_whole": hi["whole_peak_rss"] / hi["compute_peak_rss"],
        "rss_vs_official": hi["official_peak_rss"] / hi["compute_peak_rss"],
        # Worst over the depths measured.
        "wall_vs_bare": max(d["compute_wall_s"] / d["bare_wall_s"] for d in (lo, hi)),
        "wall_vs_bare_gram": max(d["compute_wall_s"] / d["bare_gram_wall_s"] for d in (lo, hi)),
    }
    goals["met"] = {
        "rss_depth_within_15pct": goals["rss_depth_ratio"] <= 1.15,
        "rss_3x_below_official": goals["rss_vs_official"] >= 3.0,
        "wall_within_1.5x_bare": goals["wall_vs_bare"] <= 1.5,
    }
    res["goals"] = goals
    return res


def report(res: dict) -> str:
    lines = [
        f"width {res['width']}, {res['dtype']} checkpoints, CPU, all 7 linear weights per layer",
        f"{'layers':>6} {'weights':>7} {'model MB':>9} {'read MB':>8} {'cache MB':>9} "
        f"{'peak MB':>8} {'whole MB':>9} {'official MB':>12} {'wall s':>7} {'bare s':>7} "
        f"{'gram s':>7}",
    ]
    for n, d in res["depths"].items():
        lines.append(
            f"{n:>6} {d['weights']:>7} {d['model_bytes'] / MB:>9.1f} {d['bytes_read'] / MB:>8.1f} "
            f"{d['cache_bytes'] / MB:>9.1f} {d['compute_peak_rss'] / MB:>8.1f} "
            f"{d['whole_peak_rss'] / MB:>9.1f} {d['official_peak_rss'] / MB:>12.1f} "
            f"{d['compute_wall_s']:>7.2f} "
            f"{d['bare_wall_s']:>7.2f} {d['bare_gram_wall_s']:>7.2f}"
        )
    g = res["goals"]
    m = g["met"]
    lines += [
        f"peak RSS, 2x depth / 1x depth: {g['rss_depth_ratio']:.3f} (goal <= 1.15: "
        f"{'met' if m['rss_depth_within_15pct'] else 'MISSED'})",
        f"official-way peak / compute peak: {g['rss_vs_official']:.2f}x (goal >= 3: "
        f"{'met' if m['rss_3x_below_official'] else 'MISSED'}); plain bf16 load of both "
        f"models / compute peak: {g['rss_vs_whole']:.2f}x",
        f"wall / bare Gram matmuls (worst depth): {g['wall_vs_bare']:.2f} (goal <= 1.5: "
        f"{'met' if m['wall_within_1.5x_bare'] else 'MISSED'}); "
        f"wall / the gram matmuls compute does: {g['wall_vs_bare_gram']:.2f}",
    ]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, *rest = sys.argv[2:]
        if mode == "make":
            child_make(Path(rest[0]), int(rest[1]), int(rest[2]), rest[3])
        elif mode == "compute":
            child_compute(Path(rest[0]), Path(rest[1]))
        elif mode in ("whole", "official"):
            child_whole(Path(rest[0]), official=mode == "official")
        elif mode == "bare":
            child_bare(int(rest[0]), int(rest[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, nargs=2, default=[4, 8])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    res = run_bench(
        width=a.width, layers=tuple(a.layers), dtype=a.dtype, work=a.work, repeats=a.repeats
    )
    print(report(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0 if all(res["goals"]["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
