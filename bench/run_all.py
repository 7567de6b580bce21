"""``make bench``: safelora against the full-load way and the floor, side by side in one run.

Usage::

    python bench/run_all.py [--quick | --toy] [--repeats N] [--work DIR] [--json OUT.json]
                            [--write-docs docs/performance.md]

What it does (every measured command is a fresh child process, see ``harness.py``):

1. ``safelora --help`` against a bare ``python -c "import torch"`` (interleaved, median of several).
2. Builds synthetic Llama-shaped bf16 base/aligned pairs (``synth.py``; reused across runs from
   ``--work``) at width 1024 for several depths and at width 4096 (the Llama-2-7B layer), and a
   rank-16 q/v LoRA adapter for each.
3. For each pair, repeated with the order of the methods rotated every repeat, from a warm page
   cache: the floor (``floor.py``); ``safelora compute-projections`` then ``safelora patch`` (the
   real CLI, ``probe.py``); the full-load way (``full_load.py``).
4. ``safelora patch`` of 1, 10, 50 adapters in one call against N separate calls.
5. Prints (and with ``--write-docs`` puts into the page between its BENCH markers) the tables
   and the goals, each marked met or missed with its figures; ``--json`` keeps every run.

Modes: default (6-9 min on a quiet 2-core machine, ~17 min at load average 7), ``--quick``
(~3 min quiet), ``--toy`` (tiny shapes, seconds of work, for the smoke test; its figures mean
nothing). Exit status 1 when any run failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import harness
import procstats
import synth
from harness import PY, Run, RunFailed, script_argv, summarize

MIB = 1 << 20
MODES: dict[str, dict] = {
    "full": dict(
        width=1024,
        depths=(4, 8, 12, 16),
        wide=4096,
        wide_depths=(2, 4),
        repeats=3,
        patch_ns=(1, 10, 50),
        separate_ns=(10, 50),
        patch_repeats=3,
        help_repeats=7,
        vocab=32000,
        goal_depth=12,
    ),
    "quick": dict(
        width=1024,
        depths=(4, 12),
        wide=4096,
        wide_depths=(2,),
        repeats=2,
        patch_ns=(1, 10),
        separate_ns=(10,),
        patch_repeats=2,
        help_repeats=5,
        vocab=32000,
        goal_depth=12,
    ),
    "toy": dict(
        width=64,
        depths=(2,),
        wide=128,
        wide_depths=(),
        repeats=1,
        patch_ns=(1, 2),
        separate_ns=(),
        patch_repeats=1,
        help_repeats=1,
        vocab=256,
        goal_depth=2,
    ),
}
METHODS = ("floor", "safelora", "full-load")
GOAL_FLOOR = 1.3
GOAL_RSS_VS_FULL = 4.0
GOAL_BATCH50 = 3.0
GOAL_HELP = 0.6
FLAT_TOL = 1.10
LINEAR_R2 = 0.9  # "flat": the deepest case's peak RSS within 10% of the shallowest's


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Case:
    shape: synth.Shape
    pair: synth.Pair
    adapter: Path


def safelora_bin() -> list[str]:
    """The installed console script when there is one (what users run), else ``-m``."""
    exe = Path(PY).with_name("safelora")
    return [str(exe)] if exe.exists() else [PY, "-m", "safelora_cli"]


def generate(data: Path, shapes: list[synth.Shape], extra: dict[str, tuple[Path, int]]) -> dict:
    """Write (or reuse) every pair and adapter in one child (the driver stays torch-free)."""
    plan = {"root": str(data), "pairs": []}
    for s in shapes:
        ads = [[str(data / f"adapters-{s.tag}"), 1]]
        if s.tag in extra:
            ads.append([str(extra[s.tag][0]), extra[s.tag][1]])
        plan["pairs"].append(
            {
                "width": s.width,
                "layers": s.layers,
                "vocab": s.vocab,
                "dtype": s.dtype,
                "adapters": ads,
            }
        )
    data.mkdir(parents=True, exist_ok=True)
    plan_path = data / "plan.json"
    plan_path.write_text(json.dumps(plan))
    subprocess.run([PY, str(harness.BENCH / "synth.py"), str(plan_path)], check=True)
    cases = {}
    for s in shapes:
        top = data / s.tag
        size = json.loads((top / "synth.json").read_text())["model_bytes"]
        pair = synth.Pair(top / "base", top / "aligned", s, size)
        cases[s.tag] = Case(s, pair, data / f"adapters-{s.tag}" / "adapter-000")
    return cases


# --- 1. --help against import torch ---------------------------------------------------------------


def bench_help(reps: int) -> dict:
    runs: dict[str, list[Run]] = defaultdict(list)
    cmds = {
        "safelora --help": [*safelora_bin(), "--help"],
        'python -c "import torch"': [PY, "-c", "import torch"],
    }
    if reps > 1:  # the first start of torch pays for cold .so pages
        harness.run("warm-up", cmds['python -c "import torch"'])
    for _ in range(reps):
        for label, argv in cmds.items():
            runs[label].append(harness.run(label, argv))
    return {k: [r.to_json() for r in v] for k, v in runs.items()}


# --- 3. one pair: floor, safelora, full-load -----------------------------------------------------


def run_case(case: Case, reps: int, scratch: Path) -> dict[str, list[dict]]:
    """Every method ``reps`` times, the order rotated each repeat; returns runs by method."""
    b, a = str(case.pair.base_dir), str(case.pair.aligned_dir)
    harness.warm(case.pair.base_dir, case.pair.aligned_dir, case.adapter)
    out: dict[str, list[dict]] = defaultdict(list)
    for rep in range(reps):
        order = METHODS[rep % 3 :] + METHODS[: rep % 3]
        for m in order:
            work = scratch / f"{case.shape.tag}-{m}-{rep}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            if m == "floor":
                r = harness.run(m, script_argv("floor.py", b, a), stats=True)
                out[m].append(r.to_json())
            elif m == "full-load":
                argv = script_argv("full_load.py", b, a, str(case.adapter), "-o", str(work / "o"))
                out[m].append(harness.run(m, argv, stats=True).to_json())
            else:
                cache = work / "cache"
                c = harness.run(
                    "compute-projections",
                    harness.safelora_argv(
                        "compute-projections",
                        b,
                        a,
                        "-o",
                        str(cache),
                        "--targets",
                        "q_proj,v_proj",
                        "--device",
                        "cpu",
                        "--quiet",
                    ),
                    stats=True,
                )
                c.stats["cache_bytes"] = harness.dir_bytes(cache)
                p = harness.run(
                    "patch",
                    harness.safelora_argv(
                        "patch",
                        str(case.adapter),
                        "-p",
                        str(cache),
                        "-o",
                        str(work / "o"),
                        "--quiet",
                    ),
                    stats=True,
                )
                out["compute-projections"].append(c.to_json())
                out["patch"].append(p.to_json())
            shutil.rmtree(work, ignore_errors=True)
    return dict(out)


# --- 4. patch: one call with N adapters against N calls ------------------------------------------


def bench_patch_curve(
    case: Case,
    adapters: list[Path],
    ns: tuple[int, ...],
    separate: tuple[int, ...],
    reps: int,
    scratch: Path,
) -> dict:
    cache = scratch / "curve-cache"
    shutil.rmtree(cache, ignore_errors=True)
    harness.run(
        "compute-projections (curve)",
        harness.safelora_argv(
            "compute-projections",
            str(case.pair.base_dir),
            str(case.pair.aligned_dir),
            "-o",
            str(cache),
            "--targets",
            "q_proj,v_proj",
            "--device",
            "cpu",
            "--quiet",
        ),
        stats=True,
    )
    harness.warm(cache, *adapters)
    batch: dict[int, list[dict]] = defaultdict(list)
    for _ in range(reps):
        for n in ns:
            out = scratch / f"curve-out-{n}"
            shutil.rmtree(out, ignore_errors=True)
            argv = harness.safelora_argv(
                "patch", *map(str, adapters[:n]), "-p", str(cache), "-o", str(out), "--quiet"
            )
            batch[n].append(harness.run(f"patch x{n}", argv, stats=True).to_json())
            shutil.rmtree(out, ignore_errors=True)
    sep: dict[int, dict] = {}
    for n in separate:
        runs = []
        for k in range(n):
            out = scratch / f"curve-sep-{k}"
            shutil.rmtree(out, ignore_errors=True)
            argv = harness.safelora_argv(
                "patch", str(adapters[k]), "-p", str(cache), "-o", str(out), "--quiet"
            )
            runs.append(harness.run("patch (separate)", argv, stats=True))
            shutil.rmtree(out, ignore_errors=True)
        sep[n] = {
            "wall_s": sum(r.wall_s for r in runs),
            "cpu_s": sum(r.cpu_s for r in runs),
            "peak_rss": max(r.peak_rss for r in runs),
        }
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "batch": {str(k): v for k, v in batch.items()},
        "separate": {str(k): v for k, v in sep.items()},
    }


# --- reporting -----------------------------------------------------------------------------------


def mib(n: float) -> str:
    """Bytes as MiB with enough digits to not print 0 for small toy figures."""
    v = n / MIB
    return f"{v:.0f}" if v >= 10 or v == 0 else f"{v:.2f}"


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def spread(runs: list[dict], key: str, unit: str = "s", scale: float = 1.0, d: int = 2) -> str:
    return summarize([r[key] for r in runs]).fmt(unit, scale, d)


def totals(case_runs: dict[str, list[dict]]) -> list[dict]:
    """safelora end to end per repeat: compute + patch wall/CPU, the larger peak RSS."""
    out = []
    for c, p in zip(case_runs["compute-projections"], case_runs["patch"], strict=True):
        out.append(
            {
                "wall_s": c["wall_s"] + p["wall_s"],
                "cpu_s": c["cpu_s"] + p["cpu_s"],
                "peak_rss": max(c["peak_rss"], p["peak_rss"]),
                "stats": {
                    "bytes_read": c["stats"].get("bytes_read", 0) + p["stats"].get("bytes_read", 0),
                    "cache_bytes": c["stats"].get("cache_bytes", 0),
                },
            }
        )
    return out


def case_table(cases: dict[str, dict]) -> list[str]:
    lines = [
        "| pair | method | wall s | CPU s | peak RSS MiB | read MiB | cache MiB "
        "| wall (CPU) ÷ floor | wall ÷ full-load | RSS ÷ full-load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tag, runs in cases.items():
        if "error" in runs:
            lines.append(f"| {tag} | **failed** | {runs['error'].splitlines()[0]} |||||||")
            continue
        rows = {
            "floor": runs.get("floor"),
            "compute-projections": runs.get("compute-projections"),
            "patch (1 adapter)": runs.get("patch"),
            "safelora total": totals(runs) if runs.get("patch") else None,
            "full-load": runs.get("full-load"),
        }
        fl = rows["floor"]
        full = rows["full-load"]
        for name, rs in rows.items():
            if not rs:
                continue
            rb = mib(statistics.median(r["stats"].get("bytes_read", 0) for r in rs))
            cb = mib(statistics.median(r["stats"].get("cache_bytes", 0) for r in rs))
            vs_floor = (
                f"{med(rs, 'wall_s') / med(fl, 'wall_s'):.2f}x "
                f"({med(rs, 'cpu_s') / med(fl, 'cpu_s'):.2f}x)"
                if fl and name in ("compute-projections", "floor")
                else ""
            )
            vs_full = (
                f"{med(rs, 'wall_s') / med(full, 'wall_s'):.2f}x"
                if full and name in ("safelora total", "full-load", "floor")
                else ""
            )
            rss_full = (
                f"{med(full, 'peak_rss') / med(rs, 'peak_rss'):.1f}x below"
                if full and name != "full-load"
                else ""
            )
            lines.append(
                f"| {tag} | {name} | {spread(rs, 'wall_s')} | {spread(rs, 'cpu_s')} "
                f"| {spread(rs, 'peak_rss', '', MIB, 0)} | {rb} | {cb} "
                f"| {vs_floor} | {vs_full} | {rss_full} |"
            )
    return lines


def paired(a: list[dict], b: list[dict], key: str) -> harness.Summary:
    """a/b ratio per repeat (the two ran back to back), summarized: drift cancels out."""
    return summarize([x[key] / y[key] for x, y in zip(a, b, strict=True)])


def linfit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x; returns (a, b, r^2)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


def depth_table(res: dict, cfg: dict) -> tuple[list[str], dict]:
    w = cfg["width"]
    rows = []
    facts: dict = {}
    lines = [
        f"| method (width {w}) | "
        + " | ".join(f"{d} layers: wall s / CPU s / RSS MiB" for d in cfg["depths"])
        + " | wall s per layer (r²) | CPU s per layer (r²) | RSS deepest ÷ shallowest |",
        "|---|" + "---|" * (len(cfg["depths"]) + 3),
    ]
    for m in ("floor", "compute-projections", "patch", "full-load"):
        pts = []
        for d in cfg["depths"]:
            runs = res["cases"].get(synth.llama_shape(w, d, vocab=cfg["vocab"]).tag, {})
            if m not in runs:
                break
            rs = runs[m]
            pts.append((d, med(rs, "wall_s"), med(rs, "cpu_s"), med(rs, "peak_rss")))
        if len(pts) != len(cfg["depths"]):
            continue
        xs = [p[0] for p in pts]
        _, slope, r2 = linfit(xs, [p[1] for p in pts])
        _, cslope, cr2 = linfit(xs, [p[2] for p in pts])
        growth = pts[-1][3] / pts[0][3]
        facts[m] = {
            "wall_s_per_layer": slope,
            "wall_r2": r2,
            "cpu_s_per_layer": cslope,
            "cpu_r2": cr2,
            "rss_growth": growth,
            "points": pts,
        }
        cells = " | ".join(f"{t:.2f} / {c:.2f} / {r / MIB:.0f}" for _, t, c, r in pts)
        rows.append(
            f"| {m} | {cells} | {slope:.3f} ({r2:.2f}) | {cslope:.3f} ({cr2:.2f}) | {growth:.2f}x |"
        )
    return lines + rows, facts


def goals(res: dict, cfg: dict, depth_facts: dict) -> list[str]:
    out = ["| goal | measured | verdict |", "|---|---|---|"]

    def row(goal: str, measured: str, ok: bool | None) -> None:
        verdict = "n/a" if ok is None else ("met" if ok else "**missed**")
        out.append(f"| {goal} | {measured} | {verdict} |")

    w, gd = cfg["width"], cfg["goal_depth"]
    ratios = []
    for tag, runs in res["cases"].items():
        if "compute-projections" in runs and "floor" in runs:
            c, f = runs["compute-projections"], runs["floor"]
            ratios.append((tag, paired(c, f, "wall_s"), paired(c, f, "cpu_s")))
    worst = max(ratios, key=lambda x: x[1].median) if ratios else None
    row(
        f"compute-projections wall ≤ {GOAL_FLOOR}x the floor, every pair: median of the "
        "per-repeat ratios (min–max), CPU-time ratio after the slash",
        "<br>".join(f"{t}: {r.fmt('x')} / {c.median:.2f}x" for t, r, c in ratios) or "no data",
        (worst[1].median <= GOAL_FLOOR) if worst else None,
    )
    cp = depth_facts.get("compute-projections")
    row(
        f"compute-projections peak RSS flat in depth (deepest ≤ {FLAT_TOL:.2f}x shallowest)",
        f"{cp['rss_growth']:.2f}x from {cfg['depths'][0]} to {cfg['depths'][-1]} layers"
        if cp
        else "no data",
        (cp["rss_growth"] <= FLAT_TOL) if cp else None,
    )
    if cp and len(cfg["depths"]) > 2:
        row(
            f"compute-projections time linear in depth (least-squares fit r² ≥ {LINEAR_R2})",
            f"CPU {cp['cpu_s_per_layer']:.3f} s/layer, r² {cp['cpu_r2']:.2f}; "
            f"wall {cp['wall_s_per_layer']:.3f} s/layer, r² {cp['wall_r2']:.2f}",
            max(cp["cpu_r2"], cp["wall_r2"]) >= LINEAR_R2,
        )
    tag = synth.llama_shape(w, gd, vocab=cfg["vocab"]).tag
    runs = res["cases"].get(tag, {})
    if "full-load" in runs and "patch" in runs:
        ratio = med(runs["full-load"], "peak_rss") / med(totals(runs), "peak_rss")
        row(
            f"peak RSS ≥ {GOAL_RSS_VS_FULL:.0f}x below the full-load way ({gd} layers, width {w})",
            f"{ratio:.2f}x ({med(totals(runs), 'peak_rss') / MIB:.0f} MiB against "
            f"{med(runs['full-load'], 'peak_rss') / MIB:.0f} MiB)",
            ratio >= GOAL_RSS_VS_FULL,
        )
    pc = res.get("patch_curve", {}).get("batch", {})
    ns = sorted(int(n) for n in pc)
    if len(ns) >= 2:
        one, big = med(pc[str(ns[0])], "wall_s"), med(pc[str(ns[-1])], "wall_s")
        cpu = med(pc[str(ns[-1])], "cpu_s") / med(pc[str(ns[0])], "cpu_s")
        row(
            f"patch: a batch of {ns[-1]} adapters < {GOAL_BATCH50:.0f}x one adapter "
            "(CPU-time ratio in parentheses)",
            f"{big:.2f} s against {one:.2f} s = {big / one:.2f}x ({cpu:.2f}x)",
            big / one < GOAL_BATCH50,
        )
    h = res.get("help", {})
    if h:
        s = med(h["safelora --help"], "wall_s")
        t = med(h['python -c "import torch"'], "wall_s")
        row(
            f"`safelora --help` < {GOAL_HELP}x a bare `import torch`",
            f"{s:.3f} s against {t:.3f} s = {s / t:.2f}x",
            s / t < GOAL_HELP,
        )
    return out


def patch_table(res: dict) -> list[str]:
    pc = res.get("patch_curve")
    if not pc or "error" in pc:
        return [f"patch curve failed: {pc.get('error', '') if pc else 'not run'}"]
    lines = [
        "| adapters N | one call: wall s | CPU s | peak RSS MiB | per adapter beyond the first "
        "| N separate calls: wall s | CPU s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    b = pc["batch"]
    ns = sorted(int(n) for n in b)
    t1 = med(b[str(ns[0])], "wall_s")
    for n in ns:
        rs = b[str(n)]
        marg = (med(rs, "wall_s") - t1) / (n - ns[0]) if n != ns[0] else None
        sep = pc["separate"].get(str(n))
        sep_cells = (
            f"{sep['wall_s']:.2f} | {sep['cpu_s']:.2f} | {sep['peak_rss'] / MIB:.0f}"
            if sep
            else ("(same)" if n == 1 else "not run") + " | |"
        )
        lines.append(
            f"| {n} | {spread(rs, 'wall_s')} | {spread(rs, 'cpu_s')} "
            f"| {spread(rs, 'peak_rss', '', MIB, 0)} "
            f"| {f'{marg:.3f} s' if marg is not None else ''} "
            f"| {sep_cells} |"
        )
    return lines


def help_table(res: dict) -> list[str]:
    lines = ["| command | wall s | CPU s | peak RSS MiB |", "|---|---|---|---|"]
    for k, rs in res.get("help", {}).items():
        lines.append(
            f"| `{k}` | {spread(rs, 'wall_s', d=3)} | {spread(rs, 'cpu_s', d=3)} "
            f"| {spread(rs, 'peak_rss', '', MIB, 0)} |"
        )
    return lines


def render(res: dict, cfg: dict) -> str:
    m = res["machine"]
    dtab, dfacts = depth_table(res, cfg)
    parts = [
        f"Measured {res['started']} UTC, mode `{res['mode']}`, {cfg['repeats']} repeats per pair "
        f"(figures: median (min–max)); load average before/after: "
        f"{res['loadavg_before']} / {res['loadavg_after']}; total {res['total_s']:.0f} s.",
        "",
        f"Machine: {m.get('nproc')} CPUs ({m.get('cpu_model', '?')}), "
        f"{m.get('mem_total_gib', '?')} GiB RAM, Linux {m.get('kernel')}, "
        f"Python {m.get('python')}, "
        f"torch {m.get('torch')} ({m.get('torch_threads')} threads), no GPU.",
        "",
        "### Goals",
        "",
        *goals(res, cfg, dfacts),
        "",
        "### Each pair, side by side",
        "",
        *case_table(res["cases"]),
        "",
        "### Cost against depth",
        "",
        *dtab,
        "",
        "### `patch`: N adapters in one call against N calls",
        "",
        *patch_table(res),
        "",
        "### Start-up",
        "",
        *help_table(res),
    ]
    return "\n".join(parts) + "\n"


BEGIN, END = "<!-- BENCH:BEGIN -->", "<!-- BENCH:END -->"


def write_docs(path: Path, text: str) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} markers to write between")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def compile_bytecode() -> None:
    """Compile safelora's and the bench scripts' bytecode once, as ``pip install`` does.

    An editable install ships no ``.pyc``; with ``PYTHONDONTWRITEBYTECODE`` set (as on these
    machines) every measured run would otherwise compile ~20 modules from source (~50 ms), a
    cost no installed copy pays. Existing ``.pyc`` files are read even with that variable set.
    """
    import compileall

    for d in (harness.ROOT / "safelora_cli", harness.BENCH):
        compileall.compile_dir(str(d), quiet=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer depths and repeats (~3-4 min)")
    g.add_argument("--toy", action="store_true", help="tiny shapes for the smoke test")
    ap.add_argument("--repeats", type=int, help="repeats per pair (default: by mode)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/safelora-bench"))
    ap.add_argument("--json", type=Path, help="write every run here")
    ap.add_argument("--write-docs", type=Path, help="put the tables into this page")
    ap.add_argument("--render", type=Path, help="only re-render the tables of a --json file")
    a = ap.parse_args()
    if a.render:
        res = json.loads(a.render.read_text())
        text = render(res, res["config"])
        print(text)
        if a.write_docs:
            write_docs(a.write_docs, text)
        return 0
    mode = "toy" if a.toy else "quick" if a.quick else "full"
    cfg = dict(MODES[mode])
    if a.repeats:
        cfg["repeats"] = cfg["patch_repeats"] = a.repeats
    t_start = time.perf_counter()
    res: dict = {
        "mode": mode,
        "config": cfg,
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "loadavg_before": harness.loadavg(),
        "machine": harness.machine(),
        "cases": {},
    }
    failed = False
    data = a.work / "data"
    scratch = a.work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    log(f"mode {mode}; work dir {a.work}")
    compile_bytecode()

    try:
        res["help"] = bench_help(cfg["help_repeats"])
    except RunFailed as e:
        failed = True
        res["help_error"] = str(e)
        log(str(e))

    shapes = [synth.llama_shape(cfg["width"], d, vocab=cfg["vocab"]) for d in cfg["depths"]]
    shapes += [synth.llama_shape(cfg["wide"], d, vocab=cfg["vocab"]) for d in cfg["wide_depths"]]
    curve_shape = synth.llama_shape(cfg["width"], cfg["goal_depth"], vocab=cfg["vocab"])
    nmax = max(max(cfg["patch_ns"]), max(cfg["separate_ns"], default=0))
    curve_dir = data / f"adapters{nmax}-{curve_shape.tag}"
    t = time.perf_counter()
    log(f"synthetic pairs: {', '.join(s.tag for s in shapes)} (reused when present)")
    cases = generate(data, shapes, {curve_shape.tag: (curve_dir, nmax)})
    res["generate_s"] = time.perf_counter() - t
    res["driver_vm_hwm"] = procstats.proc_stats()["vm_hwm"]

    for tag, case in cases.items():
        log(f"measuring {tag} x{cfg['repeats']} (model {case.pair.model_bytes / MIB:.0f} MiB)")
        try:
            res["cases"][tag] = run_case(case, cfg["repeats"], scratch)
        except RunFailed as e:
            failed = True
            res["cases"][tag] = {"error": str(e)}
            log(str(e))

    curve = cases[curve_shape.tag]
    log(f"patch curve on {curve.shape.tag}: N = {cfg['patch_ns']}")
    adapters = [curve_dir / f"adapter-{k:03d}" for k in range(nmax)]
    try:
        res["patch_curve"] = bench_patch_curve(
            curve, adapters, cfg["patch_ns"], cfg["separate_ns"], cfg["patch_repeats"], scratch
        )
    except RunFailed as e:
        failed = True
        res["patch_curve"] = {"error": str(e)}
        log(str(e))

    res["loadavg_after"] = harness.loadavg()
    res["total_s"] = time.perf_counter() - t_start
    text = render(res, cfg)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    if a.write_docs:
        write_docs(a.write_docs, text)
    log(f"done in {res['total_s']:.0f} s" + (" (some runs FAILED)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
