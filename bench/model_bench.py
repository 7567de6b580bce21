"""patch-model benchmarks (issue 16): memory against depth and against loading three models,
wall time against a floor, side by side in one run.

Usage::

    python bench/model_bench.py [--work DIR] [--width 1024] [--layers 4 12] [--repeats 1]
                                [--json runs.json] [--device cpu|cuda] [--toy]

For each depth it builds (once, reused) a synthetic Llama trio with ``bench/synth.py``'s shapes
(bf16, vocab 32000, at least two shards): base and aligned from :func:`synth.make_pair`, and a
fine-tuned model = aligned + dense noise on every tensor. A projection cache for every target
(``compute-projections --targets q_proj,...,down_proj``) is built before the runs (not timed).
Then, round-robin with the order rotating every repeat, each as a fresh child process:

1. **patch-model -p**: ``safelora patch-model FT --aligned AL -p CACHE -o OUT --device cpu``
   (default ``--num-layers 10``).
2. **patch-model --base**: the same with projectors computed on the fly from BASE.
3. **floor** (``--floor``): reads every tensor of the three checkpoints once (``safe_open``,
   one tensor at a time) and writes FINETUNED's shards to a new directory; nothing else.
4. **full-load** (``--full-load``): loads the three models whole (``load_file`` of every
   shard, every tensor touched), as code that holds whole models does, and writes nothing.

It prints one table (median wall, CPU, peak RSS ``VmHWM`` per method and depth) and the ratios
the issue asks for: patch-model's peak RSS at the deepest over the shallowest depth, the
full-load peak RSS over patch-model's, and patch-model's wall time over the floor's (same run).
The driver never imports torch (``harness.py`` says why).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


# ----------------------------------------------------------------------------- children


def make_trio(root: Path, width: int, layers: int, vocab: int) -> None:
    """Write (or reuse) base/aligned (synth.make_pair) and finetuned beside them."""
    import synth
    import torch
    from safetensors import safe_open

    shape = synth.llama_shape(width, layers, vocab=vocab)
    pair = synth.make_pair(root, shape)
    ft = pair.aligned_dir.parent / "finetuned"
    stamp = ft / "bench.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"tag": shape.tag}:
        return
    shutil.rmtree(ft, ignore_errors=True)
    ft.mkdir()
    g = torch.Generator().manual_seed(7)
    for f in sorted(pair.aligned_dir.iterdir()):
        if not f.name.endswith(".safetensors"):
            shutil.copy2(f, ft / f.name)
            continue
        items = []
        with safe_open(str(f), "pt") as h:
            for name in h.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = h.get_tensor(name)
                noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * 0.002
                t = (t.float() + noise).to(t.dtype)
                items.append((name, tuple(t.shape), "BF16", t))
        synth.write_safetensors(ft / f.name, items)
    stamp.write_text(json.dumps({"tag": shape.tag}))


def _files(d: Path) -> list[Path]:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        return sorted({d / v for v in json.loads(idx.read_text())["weight_map"].values()})
    return [d / "model.safetensors"]


def floor(ft: Path, al: Path, base: Path, out: Path, stats: str | None) -> None:
    """Read the three checkpoints once and write FINETUNED's shards: the least any tool does."""
    import procstats
    import torch  # noqa: F401 (the floor pays for torch too, as every method does)
    from safetensors import safe_open
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    nbytes = 0
    for d in (base, al):
        for f in _files(d):
            with safe_open(str(f), "pt") as h:
                for name in h.keys():  # noqa: SIM118
                    nbytes += h.get_tensor(name).nbytes
    out.mkdir(parents=True)
    for f in _files(ft):
        with safe_open(str(f), "pt") as h:
            tensors = {name: h.get_tensor(name) for name in h.keys()}  # noqa: SIM118
        nbytes += sum(t.nbytes for t in tensors.values())
        save_file(tensors, str(out / f.name), metadata={"format": "pt"})
        del tensors
    procstats.dump(stats, bytes_read=nbytes, in_process_s=time.perf_counter() - t0)


def full_load(dirs: list[Path], stats: str | None) -> None:
    """Hold the three models whole in memory, every tensor touched."""
    import procstats
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    held = []
    nbytes = 0
    for d in dirs:
        sd = {}
        for f in _files(d):
            sd.update(load_file(str(f)))
        for t in sd.values():
            if t.numel():
                t.view(-1)[:: max(1, 4096 // t.element_size())].sum()
            nbytes += t.nbytes
        held.append(sd)
    procstats.dump(stats, bytes_read=nbytes, in_process_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- driver

METHODS = ("patch-model -p", "patch-model --base", "floor", "full-load")


def _argv(
    name: str, ft: Path, al: Path, base: Path, cache: Path, out: Path, device: str = "cpu"
) -> list[str]:
    """The child process of method ``name`` writing to ``out``."""
    me = [harness.PY, str(BENCH / "model_bench.py")]
    pm = ["patch-model", str(ft), "--aligned", str(al), "-o", str(out), "--device", device, "-q"]
    if name == "patch-model -p":
        return harness.safelora_argv(*pm, "-p", str(cache))
    if name == "patch-model --base":
        return harness.safelora_argv(*pm, "--base", str(base))
    if name == "floor":
        return [*me, "--floor", str(ft), str(al), str(base), str(out), "--stats", "{stats}"]
    return [*me, "--full-load", str(ft), str(al), str(base), "--stats", "{stats}"]


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/safelora-model-bench"))
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--toy", action="store_true", help="tiny sizes (smoke test; figures mean nothing)"
    )
    ap.add_argument("--make", nargs=3, metavar=("ROOT", "WIDTH", "LAYERS"))
    ap.add_argument("--floor", nargs=4, type=Path, metavar=("FT", "AL", "BASE", "OUT"))
    ap.add_argument("--full-load", nargs=3, type=Path, metavar=("FT", "AL", "BASE"))
    ap.add_argument("--stats")
    ap.add_argument("--device", default="cpu", help="patch-model's --device (cuda on a GPU)")
    a = ap.parse_args()
    if a.make:
        make_trio(Path(a.make[0]), int(a.make[1]), int(a.make[2]), a.vocab)
        return 0
    if a.floor:
        floor(*a.floor, a.stats)
        return 0
    if a.full_load:
        full_load(list(a.full_load), a.stats)
        return 0
    if a.toy:
        a.width, a.layers, a.vocab = 128, [1, 2], 512

    t_start = time.perf_counter()
    load0 = harness.loadavg()
    runs: list[dict] = []
    by: dict[tuple[str, int], list[harness.Run]] = {}
    for layers in a.layers:
        harness.run(
            f"make L{layers}",
            [
                harness.PY,
                str(BENCH / "model_bench.py"),
                "--make",
                str(a.work),
                str(a.width),
                str(layers),
                "--vocab",
                str(a.vocab),
            ],
            timeout=3600,
        )
        top = a.work / f"llama-w{a.width}-L{layers}-bf16-v{a.vocab}"
        base, al, ft = top / "base", top / "aligned", top / "finetuned"
        cache = top / "cache"
        if not (cache / "manifest.json").exists():
            harness.run(
                f"cache L{layers}",
                harness.safelora_argv(
                    "compute-projections",
                    str(base),
                    str(al),
                    "-o",
                    str(cache),
                    "--targets",
                    TARGETS,
                    "--device",
                    "cpu",
                    "-q",
                ),
                timeout=3600,
            )
        harness.warm(base, al, ft, cache)
        outs = top / "outs"
        names = list(METHODS)
        for rep in range(a.repeats):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                shutil.rmtree(outs, ignore_errors=True)
                outs.mkdir(parents=True)
                r = harness.run(
                    f"{name} L{layers}",
                    _argv(name, ft, al, base, cache, outs / "out", a.device),
                    stats=True,
                    timeout=3600,
                )
                by.setdefault((name, layers), []).append(r)
                runs.append({"method": name, "layers": layers, **r.to_json()})
                print(
                    f"  {name:20s} L{layers:<3d} wall {r.wall_s:7.2f} s  cpu {r.cpu_s:7.2f} s  "
                    f"peak {_mib(r.peak_rss)}",
                    file=sys.stderr,
                    flush=True,
                )
        shutil.rmtree(outs, ignore_errors=True)

    def med(name: str, layers: int, attr: str) -> float:
        return harness.summarize([getattr(r, attr) for r in by[(name, layers)]]).median

    lines = [
        f"width {a.width}, vocab {a.vocab}, bf16, --device {a.device}, {a.repeats} repeat(s); "
        f"load average before/"
        f"after {load0} / {harness.loadavg()}; {time.perf_counter() - t_start:.0f} s in all",
        "",
        "| method | layers | wall s | CPU s | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for layers in a.layers:
        for name in METHODS:
            lines.append(
                f"| {name} | {layers} | {med(name, layers, 'wall_s'):.2f} | "
                f"{med(name, layers, 'cpu_s'):.2f} | {_mib(med(name, layers, 'peak_rss'))} |"
            )
    lo, hi = min(a.layers), max(a.layers)
    lines += ["", "| ratio | value |", "|---|---|"]
    for name in ("patch-model -p", "patch-model --base"):
        rss = med(name, hi, "peak_rss") / med(name, lo, "peak_rss")
        lines.append(f"| {name}: peak RSS at {hi} layers / at {lo} layers | {rss:.2f}x |")
        full = med("full-load", hi, "peak_rss") / med(name, hi, "peak_rss")
        lines.append(f"| full-load peak RSS / {name}'s, {hi} layers | {full:.2f}x |")
        for layers in a.layers:
            w = med(name, layers, "wall_s") / med("floor", layers, "wall_s")
            c = med(name, layers, "cpu_s") / med("floor", layers, "cpu_s")
            lines.append(
                f"| {name} wall / floor wall, {layers} layers (CPU ratio) | {w:.2f}x ({c:.2f}x) |"
            )
    text = "\n".join(lines)
    print(text)
    if a.json:
        a.json.write_text(
            json.dumps({"machine": harness.machine(), "runs": runs, "table": text}, indent=2)
        )
    return 0 if all(math.isfinite(r["wall_s"]) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
