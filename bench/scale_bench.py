"""Real scale: safelora against its I/O floors at Llama-2-7B width, side by side in one run.

Usage::

    python bench/scale_bench.py [--layers 4] [--repeats 3] [--adapters 50] [--work DIR]
                                [--json OUT.json] [--compare SHALLOW.json] [--keep-data] [--toy]

``make bench-4096`` runs the default (width 4096, 4 layers, ~5-10 min on 2 cores);
``make bench-7b`` runs ``--layers 32 --repeats 1`` on a full-depth synthetic Llama-2-7B-shaped
pair (2 x 13.5 GB bf16, larger than a 23 GB machine's page cache, so reads hit the disk; needs
~60 GB free under ``--work``; opt-in, never in CI) and compares peak RSS with a 4-layer run
given by ``--compare``. ``--toy`` (width 128, 2 layers, 3 adapters, tiny vocab) is for the smoke
test; its figures mean nothing.

Every measured command is a fresh child (``harness.run``: wall, CPU, peak RSS from the child's
own VmHWM). Per repeat, each safelora command and its floor (``io_floor.py``) run back to back,
the order swapped every repeat, and their ratio is taken per repeat (drift cancels):

- ``compute-projections --targets q_proj,v_proj`` and ``--targets`` all seven linear weights,
  against ``io_floor.py compute`` (read each pair once, ``V`` in float32, scale, one fsynced
  safetensors file per weight; no product).
- ``patch AD -p CACHE`` with 1 and with N adapters in one call, against ``io_floor.py patch``.
- ``inspect AD -p CACHE`` against ``io_floor.py patch --no-write``.
- ``patch AD --base B --aligned A`` against ``io_floor.py fly``.

Synthetic data (``synth.py``) is made once under ``--work`` and removed at the end unless
``--keep-data``; every output is removed right after its run (the full-depth all-linear cache
is 26 GB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness
import procstats
import run_all
import synth
from harness import script_argv

MIB = 1 << 20
LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
QV = "q_proj,v_proj"
GOAL_COMPUTE = 1.2
GOAL_BATCH = 3.0
GOAL_RSS_DEPTH = 1.15
GOAL_RSS_QV = 1.5e9


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def uptime() -> str:
    out = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return out or " ".join(map(str, harness.loadavg()))


def sl(*args: str) -> list[str]:
    return harness.safelora_argv(*args)


def floor(*args: str) -> list[str]:
    return script_argv("io_floor.py", *args)


def measure(
    label: str, argv: list[str], out: Path | None, *, keep: bool = False, dir_stats: bool = False
) -> dict:
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    r = harness.run(label, argv, stats=True, timeout=7200)
    d = r.to_json()
    if dir_stats and out is not None and out.exists():
        d["stats"]["cache_bytes"] = harness.dir_bytes(out)
    if out is not None and not keep:
        shutil.rmtree(out, ignore_errors=True)
    log(f"  {label}: {r.wall_s:.2f} s wall, {r.cpu_s:.2f} s CPU, {r.peak_rss / MIB:.0f} MiB")
    return d


def pairs_of(cfg: dict, case: dict, scratch: Path) -> dict[str, tuple[list[str], list[str], Path]]:
    """name -> (safelora argv, floor argv, output path) for every comparison."""
    b, a = case["base"], case["aligned"]
    ad, ads, cache = case["adapter"], case["adapters"], str(case["cache"])
    o = scratch / "out"
    dev = ["--device", "cpu", "--quiet"]
    return {
        "compute q/v": (
            sl("compute-projections", b, a, "-o", str(o), "--targets", QV, *dev),
            floor("compute", b, a, str(o), "--targets", QV),
            o,
        ),
        "compute all-linear": (
            sl("compute-projections", b, a, "-o", str(o), "--targets", LINEAR, *dev),
            floor("compute", b, a, str(o), "--targets", LINEAR),
            o,
        ),
        "patch 1 adapter": (
            sl("patch", ad, "-p", cache, "-o", str(o), *dev),
            floor("patch", cache, str(o), ad),
            o,
        ),
        "inspect": (
            sl("inspect", ad, "-p", cache, "--json"),
            floor("patch", cache, str(o), ad, "--no-write"),
            o,
        ),
        "patch --base/--aligned": (
            sl("patch", ad, "--base", b, "--aligned", a, "-o", str(o), *dev),
            floor("fly", b, a, str(o), ad),
            o,
        ),
        f"patch {len(ads)} adapters": (
            sl("patch", *ads, "-p", cache, "-o", str(o), *dev),
            floor("patch", cache, str(o), *ads),
            o,
        ),
    }


def run(cfg: dict, work: Path, partial: Path | None = None) -> dict:
    shape = synth.llama_shape(cfg["width"], cfg["layers"], vocab=cfg["vocab"])
    data, scratch = work / "data", work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    n = cfg["adapters"]
    many = data / f"adapters{n}-{shape.tag}"
    res: dict = {
        "config": cfg,
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "uptime_before": uptime(),
        "machine": harness.machine(),
        "df_before": shutil.disk_usage(work).free,
        "runs": {},
    }
    t = time.perf_counter()
    log(f"synthetic pair {shape.tag} and {n} adapters under {data}")
    cases = run_all.generate(data, [shape], {shape.tag: (many, n)})
    res["generate_s"] = time.perf_counter() - t
    c = cases[shape.tag]
    res["model_bytes"] = c.pair.model_bytes
    cache = scratch / "cache-qv"
    shutil.rmtree(cache, ignore_errors=True)
    log("the q/v cache that patch and inspect read")
    res["cache_run"] = measure(
        "compute-projections (cache for patch)",
        sl(
            "compute-projections",
            str(c.pair.base_dir),
            str(c.pair.aligned_dir),
            "-o",
            str(cache),
            "--targets",
            QV,
            "--device",
            "cpu",
            "--quiet",
        ),
        cache,
        keep=True,
        dir_stats=True,
    )
    case = {
        "base": str(c.pair.base_dir),
        "aligned": str(c.pair.aligned_dir),
        "adapter": str(c.adapter),
        "adapters": [str(many / f"adapter-{k:03d}") for k in range(n)],
        "cache": cache,
    }
    if cfg["warm"]:
        harness.warm(c.pair.base_dir, c.pair.aligned_dir)
    comps = pairs_of(cfg, case, scratch)
    for name in comps:
        res["runs"][name] = {"safelora": [], "floor": []}
    for rep in range(cfg["repeats"]):
        for name, (s_argv, f_argv, out) in comps.items():
            log(f"repeat {rep + 1}/{cfg['repeats']}: {name}")
            order = [("safelora", s_argv), ("floor", f_argv)]
            if rep % 2:
                order.reverse()
            for who, argv in order:
                d = measure(f"{name} [{who}]", argv, out, dir_stats=name.startswith("compute"))
                res["runs"][name][who].append(d)
                if partial is not None:  # what has finished survives a run cut short
                    res["uptime_after"] = uptime()
                    partial.write_text(json.dumps(res, indent=1))
    shutil.rmtree(cache, ignore_errors=True)
    res["uptime_after"] = uptime()
    res["driver_vm_hwm"] = procstats.proc_stats()["vm_hwm"]
    return res


def complete(res: dict) -> dict:
    """The comparisons with at least one (safelora, floor) pair measured."""
    runs = res["runs"].items()
    return {k: {w: v[w][: len(v["floor"])] for w in v} for k, v in runs if v["floor"]}


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def ratios(r: dict, key: str) -> list[float]:
    return [s[key] / f[key] for s, f in zip(r["safelora"], r["floor"], strict=True)]


def render(res: dict, shallow: dict | None = None) -> str:
    cfg, m = res["config"], res["machine"]
    lines = [
        f"Measured {res['started']} UTC: width {cfg['width']}, {cfg['layers']} layers, bf16, "
        f"{cfg['repeats']} repeats (safelora and its floor back to back, order swapped each "
        f"repeat; figures are medians, ratios the median of per-repeat ratios with min–max), "
        f"page cache {'warm' if cfg['warm'] else 'not warmed'}; one checkpoint "
        f"{res['model_bytes'] / 1e9:.2f} GB.",
        f"Machine: {m.get('nproc')} CPUs ({m.get('cpu_model', '?')}), "
        f"{m.get('mem_total_gib', '?')} GiB RAM, torch {m.get('torch')} "
        f"({m.get('torch_threads')} threads), no GPU; **shared with other processes** during "
        f"the run: `uptime` before: `{res['uptime_before']}`; after: `{res['uptime_after']}`.",
        "",
        "| step | safelora wall s | floor wall s | wall ÷ floor | CPU ÷ floor "
        "| safelora peak RSS MiB | floor peak RSS MiB | read MB | written MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in complete(res).items():
        w, cp = ratios(r, "wall_s"), ratios(r, "cpu_s")
        s, f = r["safelora"], r["floor"]
        rb = med([x["stats"].get("bytes_read", 0) for x in s]) / 1e6
        cb = med([x["stats"].get("cache_bytes", 0) for x in s]) / 1e6
        lines.append(
            f"| {name} | {med([x['wall_s'] for x in s]):.2f} | {med([x['wall_s'] for x in f]):.2f} "
            f"| {med(w):.2f}x ({min(w):.2f}–{max(w):.2f}) | {med(cp):.2f}x "
            f"| {med([x['peak_rss'] for x in s]) / MIB:.0f} "
            f"| {med([x['peak_rss'] for x in f]) / MIB:.0f} | {rb:.0f} | {cb:.0f} |"
        )
    lines += ["", *goal_lines(res, shallow)]
    return "\n".join(lines) + "\n"


def goal_lines(res: dict, shallow: dict | None) -> list[str]:
    out = ["| goal | measured | verdict |", "|---|---|---|"]

    def row(goal: str, measured: str, ok: bool) -> None:
        out.append(f"| {goal} | {measured} | {'met' if ok else '**missed**'} |")

    def safelora(name: str, key: str, r: dict | None = None) -> float:
        return med([x[key] for x in (r or runs)[name]["safelora"]])

    runs = complete(res)
    for name in ("compute q/v", "compute all-linear"):
        if name in runs:
            w = med(ratios(runs[name], "wall_s"))
            row(f"{name}: wall ≤ {GOAL_COMPUTE}x the I/O floor", f"{w:.2f}x", w <= GOAL_COMPUTE)
    n = res["config"]["adapters"]
    if "patch 1 adapter" in runs and f"patch {n} adapters" in runs:
        one, big = safelora("patch 1 adapter", "wall_s"), safelora(f"patch {n} adapters", "wall_s")
        cpu = safelora(f"patch {n} adapters", "cpu_s") / safelora("patch 1 adapter", "cpu_s")
        row(f"patch of {n} adapters < {GOAL_BATCH:.0f}x one (CPU-time ratio in parentheses)",
            f"{big:.2f} s ÷ {one:.2f} s = {big / one:.2f}x ({cpu:.2f}x)",
            big / one < GOAL_BATCH)  # fmt: skip
    if "compute q/v" in runs:
        qv = safelora("compute q/v", "peak_rss")
        row("compute q/v peak RSS < 1.5 GB", f"{qv / 1e9:.2f} GB", qv < GOAL_RSS_QV)
    if shallow:
        low = complete(shallow)
        for name in ("compute q/v", "compute all-linear"):
            if name in runs and name in low:
                lo, hi = safelora(name, "peak_rss", low), safelora(name, "peak_rss")
                row(
                    f"{name}: peak RSS at {res['config']['layers']} layers within "
                    f"{GOAL_RSS_DEPTH}x of {shallow['config']['layers']}",
                    f"{hi / MIB:.0f} MiB ÷ {lo / MIB:.0f} MiB = {hi / lo:.2f}x",
                    hi / lo <= GOAL_RSS_DEPTH,
                )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/safelora-scale-bench"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--compare", type=Path, help="a shallower run's --json, for the RSS goal")
    ap.add_argument("--no-warm", action="store_true", help="do not pre-read the pair")
    ap.add_argument("--keep-data", action="store_true")
    ap.add_argument("--toy", action="store_true", help="tiny shapes for the smoke test")
    ap.add_argument("--render", type=Path, help="only render a (possibly partial) --json file")
    a = ap.parse_args()
    shallow = json.loads(a.compare.read_text()) if a.compare else None
    if a.render:
        print(render(json.loads(a.render.read_text()), shallow))
        return 0
    cfg = {
        "width": a.width,
        "layers": a.layers,
        "repeats": a.repeats,
        "adapters": a.adapters,
        "vocab": a.vocab,
        "warm": not a.no_warm,
    }
    if a.toy:
        cfg.update(width=128, layers=2, repeats=1, adapters=3, vocab=256)
    run_all.compile_bytecode()
    try:
        res = run(cfg, a.work, a.json)
    finally:
        if not a.keep_data:
            shutil.rmtree(a.work / "data", ignore_errors=True)
        shutil.rmtree(a.work / "scratch", ignore_errors=True)
    text = render(res, shallow)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
