"""Issue 19: ``patch`` of 1 and of N adapters, this code against another checkout, alternating.

Usage::

    python bench/batch_bench.py --before DIR [--layers 4] [--width 4096] [--adapters 50]
                                [--repeats 3] [--work DIR] [--json OUT.json] [--toy]

``DIR`` holds another version's ``safelora_cli`` package (for example
``git archive <commit> safelora_cli | tar -x -C DIR``); its runs get ``PYTHONPATH=DIR``, which
comes before this venv's editable install. The synthetic pair and adapters are
``scale_bench``'s (``run_all.generate``); one q/v cache is built with this code
(``--representation``, default ``auto``: factors on a CPU) and read by both versions, so the
only difference between the two is the code that patches. Per repeat, ``patch 1 adapter``
and ``patch N adapters`` run for both versions back to back, the order swapped every repeat;
ratios are per repeat (drift cancels), then the median. After the timings the two versions'
N-adapter outputs are compared: per module the selection, the largest cosine difference and
whether the written ``lora_B`` bytes are equal.
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
import run_all
import synth

MIB = 1 << 20
QV = "q_proj,v_proj"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


COMPARE = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
a, b = Path(sys.argv[1]), Path(sys.argv[2])
out = {"adapters": 0, "modules": 0, "selection_differs": 0, "max_cos_diff": 0.0,
       "max_cos_rel_diff": 0.0, "b_tensors": 0, "b_bytes_differ": 0, "max_b_rel_diff": 0.0}
for d in sorted(p for p in a.iterdir() if p.is_dir()):
    ra = json.loads((d / "safelora_report.json").read_text())
    rb = json.loads((b / d.name / "safelora_report.json").read_text())
    out["adapters"] += 1
    for ma, mb in zip(ra["modules"], rb["modules"], strict=True):
        out["modules"] += 1
        out["selection_differs"] += ma["projected"] != mb["projected"]
        if ma["cosine"] is not None:
            diff = abs(ma["cosine"] - mb["cosine"])
            out["max_cos_diff"] = max(out["max_cos_diff"], diff)
            out["max_cos_rel_diff"] = max(out["max_cos_rel_diff"], diff / abs(ma["cosine"]))
    ta = load_file(d / "adapter_model.safetensors")
    tb = load_file(b / d.name / "adapter_model.safetensors")
    for k, x in ta.items():
        if "lora_B" not in k:
            continue
        y = tb[k]
        out["b_tensors"] += 1
        if not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            out["b_bytes_differ"] += 1
            x64, y64 = x.double(), y.double()
            rel = float((x64 - y64).norm() / x64.norm())
            out["max_b_rel_diff"] = max(out["max_b_rel_diff"], rel)
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="dir holding the other safelora_cli")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--representation", default="auto", help="of the cache: auto, gram, factor")
    ap.add_argument("--work", type=Path, default=Path("/tmp/safelora-batch-bench"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep-data", action="store_true")
    ap.add_argument("--toy", action="store_true", help="tiny shapes (figures mean nothing)")
    a = ap.parse_args()
    if a.toy:
        a.width, a.layers, a.adapters, a.vocab, a.repeats = 128, 2, 3, 256, 1
    before = str(a.before.resolve())
    if not (Path(before) / "safelora_cli" / "__init__.py").is_file():
        raise SystemExit(f"{before}/safelora_cli is not a package")
    shape = synth.llama_shape(a.width, a.layers, vocab=a.vocab)
    data, scratch = a.work / "data", a.work / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    many = data / f"adapters{a.adapters}-{shape.tag}"
    res: dict = {
        "config": {k: v for k, v in vars(a).items() if k not in ("json", "work", "before")},
        "before": before,
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "uptime_before": uptime(),
        "machine": harness.machine(),
        "runs": {},
    }
    run_all.compile_bytecode()
    try:
        log(f"synthetic pair {shape.tag} and {a.adapters} adapters under {data}")
        c = run_all.generate(data, [shape], {shape.tag: (many, a.adapters)})[shape.tag]
        cache = scratch / "cache-qv"
        shutil.rmtree(cache, ignore_errors=True)
        log(f"the q/v cache (this code, --representation {a.representation})")
        harness.run(
            "cache",
            harness.safelora_argv(
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
                "--representation",
                a.representation,
            ),
            stats=True,
            timeout=7200,
        )
        ads = [str(many / f"adapter-{k:03d}") for k in range(a.adapters)]
        steps = {"patch 1 adapter": [str(c.adapter)], f"patch {a.adapters} adapters": ads}
        versions = {"after": {}, "before": {"PYTHONPATH": before}}
        runs: dict = {s: {v: [] for v in versions} for s in steps}
        for rep in range(a.repeats):
            for step, inputs in steps.items():
                order = list(versions)
                if rep % 2:
                    order.reverse()
                for v in order:
                    out = scratch / f"out-{v}"
                    shutil.rmtree(out, ignore_errors=True)
                    argv = harness.safelora_argv(
                        "patch", *inputs, "-p", str(cache), "-o", str(out), "--device", "cpu", "-q"
                    )
                    load = uptime()
                    r = harness.run(f"{step} [{v}]", argv, stats=True, env=versions[v])
                    d = r.to_json()
                    d["uptime"] = load
                    runs[step][v].append(d)
                    log(f"{step} [{v}]: {r.wall_s:.2f} s wall, {r.cpu_s:.2f} s CPU, "
                        f"{r.peak_rss / MIB:.0f} MiB")  # fmt: skip
                    last = rep == a.repeats - 1 and len(inputs) > 1
                    if not last:
                        shutil.rmtree(out, ignore_errors=True)
                res["runs"] = runs
                res["uptime_after"] = uptime()
                if a.json:
                    a.json.write_text(json.dumps(res, indent=1))
        cmp = subprocess.run(
            [harness.PY, "-c", COMPARE, str(scratch / "out-before"), str(scratch / "out-after")],
            capture_output=True,
            text=True,
            check=True,
        )
        res["outputs_compared"] = json.loads(cmp.stdout)
    finally:
        if not a.keep_data:
            shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    res["uptime_after"] = uptime()
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    print(render(res))
    return 0


def render(res: dict) -> str:
    runs = res["runs"]
    one, many = list(runs)
    med = statistics.median

    def col(step: str, v: str, key: str) -> list[float]:
        return [x[key] for x in runs[step][v]]

    def ratio(xs: list[float], ys: list[float]) -> list[float]:
        return [x / y for x, y in zip(xs, ys, strict=False)]  # a partial run: the pairs done

    def per_rep(step: str, key: str) -> list[float]:
        return ratio(col(step, "after", key), col(step, "before", key))

    lines = [
        f"Measured {res['started']} UTC, cache `--representation "
        f"{res['config'].get('representation', 'auto')}`, {res['config']['repeats']} repeats; "
        f"`uptime` before: "
        f"`{res['uptime_before']}`; after: `{res['uptime_after']}`.",
        "",
        "| step | version | wall s (median, min–max) | CPU s (median) | peak RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for step in runs:
        for v in ("before", "after"):
            w = col(step, v, "wall_s")
            lines.append(
                f"| {step} | {v} | {med(w):.2f} ({min(w):.2f}–{max(w):.2f}) "
                f"| {med(col(step, v, 'cpu_s')):.2f} "
                f"| {med(col(step, v, 'peak_rss')) / MIB:.0f} |"
            )
    lines += ["", "| ratio | wall (median of per-repeat, min–max) | CPU |", "|---|---|---|"]
    for step in runs:
        w, c = per_rep(step, "wall_s"), per_rep(step, "cpu_s")
        lines.append(
            f"| {step}: after ÷ before | {med(w):.2f}x ({min(w):.2f}–{max(w):.2f}) "
            f"| {med(c):.2f}x |"
        )
    for v in ("before", "after"):
        w = ratio(col(many, v, "wall_s"), col(one, v, "wall_s"))
        c = ratio(col(many, v, "cpu_s"), col(one, v, "cpu_s"))
        lines.append(
            f"| {v}: {many} ÷ {one} | {med(w):.2f}x ({min(w):.2f}–{max(w):.2f}) | {med(c):.2f}x |"
        )
    if "outputs_compared" in res:
        lines += ["", f"Outputs of `{many}`, before against after: `{res['outputs_compared']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
