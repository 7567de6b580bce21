"""``safelora patch`` with N adapters in one call: where the per-adapter cost goes, and a fix.

Usage::

    python bench/patch_bench.py [--n 1 10 50] [--repeats 3]
                                [--variants current stacked passive stacked-passive]
                                [--work DIR] [--json OUT.json]

Each measurement is a fresh child (``harness.run``): ``python bench/patch_bench.py --child
VARIANT -- patch ADAPTERS... -p CACHE -o OUT --quiet``, which runs the real CLI in-process and
reports its own peak RSS (VmHWM). Variants:

- ``current``: the code as it is.
- ``stacked``: a prototype of the change proposed in docs/performance.md, applied by
  monkeypatching (nothing in ``safelora_cli`` is edited): ``score_adapters`` already walks the
  batch one weight at a time; the prototype loads the ``B`` of *every* adapter using that weight,
  computes ``C @ [B_1 ... B_N]`` with one ``Projector.apply`` call and hands each module its
  slice, instead of one ``apply`` per (adapter, module), each of which converts the whole
  ``d_out x d_out`` projector to float64 again and runs one skinny matmul.
- ``passive``: the code as it is, run with ``OMP_WAIT_POLICY=PASSIVE`` (libgomp threads sleep
  at barriers instead of spinning; the proposed one-line change sets it in the CLI before torch
  is imported). torch's 2 OpenMP threads spin at the end of every parallel op; with a second
  thread of the same process issuing torch ops (the projector prefetch) or any other load on 2
  cores, each tiny op then waits for a descheduled partner.
- ``stacked-passive``: both.

All variants' outputs are compared byte for byte (they must be identical). Prints a table
of wall time, CPU time and peak RSS per (variant, N), medians with the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import harness
import synth
from harness import PY

MIB = 1 << 20


def install_stacked() -> None:
    """Monkeypatch scoring so each weight's projector is applied once to all adapters' B."""
    import torch

    from safelora_cli import patch as patch_mod
    from safelora_cli import scoring

    if not all(hasattr(scoring, n) for n in ("_score_module", "_default_weight")):
        raise SystemExit(
            "the stacked prototype no longer fits safelora_cli/scoring.py (it changed); "
            "run with --variants current passive"
        )
    orig_score, orig_module = scoring.score_adapters, scoring._score_module
    state: dict = {}

    def score_adapters(adapters, source, selection, *, weight_for=None, progress=None):  # type: ignore[no-untyped-def]
        wf = weight_for or scoring._default_weight
        users: dict[str, list] = {}
        for ad in adapters:
            for m in ad.modules:
                users.setdefault(wf(m), []).append((ad, m))
        state["users"], state["x"] = users, {}
        return orig_score(adapters, source, selection, weight_for=weight_for, progress=progress)

    class Applied:
        """The projector with C @ B already computed for one module."""

        def __init__(self, proj, x) -> None:  # type: ignore[no-untyped-def]
            names = ("weight", "kind", "tensor", "norm_v", "d_out", "d_in", "degenerate")
            self.__dict__.update({k: getattr(proj, k) for k in names if hasattr(proj, k)})
            self._x = x

        def apply(self, b):  # type: ignore[no-untyped-def]
            return self._x

    def score_module(adapter, m, weight, proj):  # type: ignore[no-untyped-def]
        xs = state["x"]
        if (id(adapter), m.name) not in xs:
            xs.clear()
            us = state["users"][weight]
            bs = [ad.load_b(mm, dtype=torch.float64) for ad, mm in us]
            big = proj.apply(torch.cat(bs, 1))
            for (ad, mm), piece in zip(
                us, torch.split(big, [b.shape[1] for b in bs], 1), strict=True
            ):
                xs[(id(ad), mm.name)] = piece
        return orig_module(adapter, m, weight, Applied(proj, xs[(id(adapter), m.name)]))

    scoring.score_adapters = score_adapters
    patch_mod.score_adapters = score_adapters
    scoring._score_module = score_module


def child(variant: str, stats: str, args: list[str]) -> int:
    import runpy
    import time

    import procstats

    if variant.endswith("passive"):  # before torch (libgomp) is loaded
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if variant.startswith("stacked"):
        install_stacked()
    sys.argv = ["safelora", *args]
    t0 = time.perf_counter()
    code: object = 0
    try:
        runpy.run_module("safelora_cli", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    procstats.dump(stats, in_process_s=time.perf_counter() - t0)
    return code if isinstance(code, int) else (0 if code is None else 1)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sep = sys.argv.index("--")
        return child(sys.argv[2], sys.argv[3], sys.argv[sep + 1 :])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["current", "stacked", "passive", "stacked-passive"],
        choices=["current", "stacked", "passive", "stacked-passive"],
    )
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/safelora-bench"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    shape = synth.llama_shape(a.width, a.layers, vocab=a.vocab)
    data = a.work / "data"
    nmax = max(a.n)
    ads_dir = data / f"adapters{nmax}-{shape.tag}"
    plan = {
        "root": str(data),
        "pairs": [
            {
                "width": shape.width,
                "layers": shape.layers,
                "vocab": shape.vocab,
                "dtype": shape.dtype,
                "adapters": [[str(ads_dir), nmax]],
            }
        ],
    }
    data.mkdir(parents=True, exist_ok=True)
    (data / "plan-patch.json").write_text(json.dumps(plan))
    subprocess.run([PY, str(harness.BENCH / "synth.py"), str(data / "plan-patch.json")], check=True)
    top = data / shape.tag
    scratch = a.work / "scratch-patch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    cache = scratch / "cache"
    harness.run(
        "compute-projections",
        harness.safelora_argv(
            "compute-projections",
            str(top / "base"),
            str(top / "aligned"),
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
    adapters = [str(ads_dir / f"adapter-{k:03d}") for k in range(nmax)]
    harness.warm(cache, ads_dir)
    runs: dict[str, dict[int, list[dict]]] = {v: {n: [] for n in a.n} for v in a.variants}
    for _ in range(a.repeats):
        for n in a.n:
            for v in a.variants:
                out = scratch / f"out-{v}-{n}"
                shutil.rmtree(out, ignore_errors=True)
                argv = [
                    PY,
                    str(harness.BENCH / "patch_bench.py"),
                    "--child",
                    v,
                    "{stats}",
                    "--",
                    "patch",
                    *adapters[:n],
                    "-p",
                    str(cache),
                    "-o",
                    str(out),
                    "--quiet",
                ]
                runs[v][n].append(harness.run(f"patch x{n} ({v})", argv, stats=True).to_json())
    same = True
    if len(a.variants) > 1:
        for n in a.n:
            ref = scratch / f"out-{a.variants[0]}-{n}"
            for v in a.variants[1:]:
                for f in sorted(ref.rglob("*.safetensors")):
                    g = scratch / f"out-{v}-{n}" / f.relative_to(ref)
                    if f.read_bytes() != g.read_bytes():
                        same = False
                        print(f"DIFFERENT: {f} vs {g}", file=sys.stderr)
    lines = [
        f"patch of N adapters ({shape.tag}, rank 16 on q/v: {2 * a.layers} modules each), "
        f"{a.repeats} repeats, median (min–max); outputs identical across variants: {same}",
        "",
        "| variant | N | wall s | CPU s | peak RSS MiB | CPU ÷ N=1 |",
        "|---|---|---|---|---|---|",
    ]
    for v in a.variants:
        one = harness.summarize([r["cpu_s"] for r in runs[v][min(a.n)]]).median
        for n in a.n:
            rs = runs[v][n]
            w = harness.summarize([r["wall_s"] for r in rs]).fmt("")
            c = harness.summarize([r["cpu_s"] for r in rs])
            m = harness.summarize([r["peak_rss"] for r in rs]).fmt("", MIB, 0)
            lines.append(f"| {v} | {n} | {w} | {c.fmt('')} | {m} | {c.median / one:.2f}x |")
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps({"runs": runs, "identical": same}, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
