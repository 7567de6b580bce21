"""Smoke test of the benchmark scripts (bench/): they run end to end at toy size.

No timing is asserted. What is checked: the synthetic checkpoints are valid sharded safetensors
of the stated shapes (read back with the safetensors library and safelora's reader); the
full-load script makes the same patched adapter as ``safelora patch`` (so the comparison is
like for like); ``run_all.py --toy`` measures every method, records peak RSS, reads each target
pair exactly once in safelora as in the floor, and writes its tables between the page markers.
"""

from __future__ import annotations

import importlib
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from safelora_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def synth():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("synth")
    finally:
        sys.path.remove(str(BENCH))


def test_synthetic_pair_is_a_valid_sharded_llama_checkpoint(synth, tmp_path: Path) -> None:
    from safelora_cli.adapter import load_adapter
    from safelora_cli.reader import CheckpointReader

    shape = synth.llama_shape(256, 3, vocab=100)
    assert (shape.intermediate, shape.heads) == (704, 2)  # 11008/4096 of 256, rounded to 64
    pair = synth.make_pair(tmp_path, shape)
    expected = dict(synth.weight_shapes(shape))
    assert len(expected) == 3 + 9 * 3
    for d in (pair.base_dir, pair.aligned_dir):
        index = json.loads((d / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 2
        assert set(index["weight_map"]) == set(expected)
        seen = {}
        for s in shards:
            with safe_open(str(d / s), "pt") as f:
                assert f.metadata() == {"format": "pt"}
                for k in f.keys():  # noqa: SIM118
                    t = f.get_tensor(k)
                    assert index["weight_map"][k] == s
                    seen[k] = (tuple(t.shape), t.dtype)
        assert seen == {k: (v, torch.bfloat16) for k, v in expected.items()}
        assert index["metadata"]["total_size"] == sum((d / s).stat().st_size for s in shards)
        assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 3
        with CheckpointReader.open(d, label="bench") as r:  # safelora's own validation
            assert set(r.names()) == set(expected)

    base = load_file(pair.base_dir / "model-00001-of-00002.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    with CheckpointReader.open(pair.aligned_dir, label="aligned") as r:
        delta = r.load(q).float() - base[q].float()
    assert 0 < delta.norm() < base[q].float().norm()  # a real but smaller alignment signal

    ads = synth.make_adapters(tmp_path / "ads", shape, 2, r=4)
    a = load_adapter(ads[1])
    assert [m.name for m in a.modules] == [
        w.removesuffix(".weight") for w in synth.target_weights(shape)
    ]
    assert {(m.rank, m.d_out, m.d_in) for m in a.modules} == {(4, 256, 256)}
    a.close()

    mtime = (pair.base_dir / "config.json").stat().st_mtime_ns
    again = synth.make_pair(tmp_path, shape)  # reused, not rewritten
    assert again == pair
    assert (pair.base_dir / "config.json").stat().st_mtime_ns == mtime


def test_full_load_way_patches_like_safelora(synth, tmp_path: Path, monkeypatch) -> None:
    shape = synth.llama_shape(128, 6, vocab=64)
    pair = synth.make_pair(tmp_path, shape)
    (ad,) = synth.make_adapters(tmp_path / "ads", shape, 1, r=4)
    cache, ours, theirs = tmp_path / "cache", tmp_path / "ours", tmp_path / "theirs"
    runner = CliRunner()
    b, al = str(pair.base_dir), str(pair.aligned_dir)
    res = runner.invoke(app, ["compute-projections", b, al, "-o", str(cache), "--adapter", str(ad)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["patch", str(ad), "-p", str(cache), "-o", str(ours), "--quiet"])
    assert res.exit_code == 0, res.output

    stats = tmp_path / "stats.json"
    argv = ["full_load.py", b, al, str(ad), "-o", str(theirs), "--stats", str(stats)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.syspath_prepend(str(BENCH))
    runpy.run_path(str(BENCH / "full_load.py"), run_name="__main__")

    got, want = (
        load_file(theirs / "adapter_model.safetensors"),
        load_file(ours / "adapter_model.safetensors"),
    )
    orig = load_file(ad / "adapter_model.safetensors")
    assert got.keys() == want.keys() == orig.keys()
    changed = [k for k in orig if not torch.equal(orig[k], want[k])]
    assert len(changed) == 10  # --num-layers 10 of 12 modules
    for k in orig:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
    s = json.loads(stats.read_text())
    assert s["weights"] == 2 * 6 and s["vm_hwm"] > 0
    assert s["cache_bytes"] == 12 * 128 * 128 * 4


def test_run_all_toy_end_to_end(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text("# before\n<!-- BENCH:BEGIN -->\nold figures\n<!-- BENCH:END -->\n# after\n")
    out = tmp_path / "res.json"
    cmd = [sys.executable, str(BENCH / "run_all.py"), "--toy", "--work", str(tmp_path / "w")]
    p = subprocess.run(
        [*cmd, "--json", str(out), "--write-docs", str(doc)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    (case,) = res["cases"].values()
    assert set(case) == {"floor", "compute-projections", "patch", "full-load"}
    for runs in case.values():
        assert runs and all(r["rc"] == 0 and r["wall_s"] > 0 for r in runs)
        assert all(r["peak_rss"] > 20 << 20 for r in runs)  # torch alone is far more than 20 MiB
    # safelora reads each target pair exactly once, like the floor; the full-load way reads all.
    floor_read = case["floor"][0]["stats"]["bytes_read"]
    assert case["compute-projections"][0]["stats"]["bytes_read"] == floor_read > 0
    assert case["full-load"][0]["stats"]["bytes_read"] > 2 * floor_read
    assert case["compute-projections"][0]["stats"]["cache_bytes"] >= floor_read  # fp32 grams
    assert set(res["patch_curve"]["batch"]) == {"1", "2"}
    assert set(res["help"]) == {"safelora --help", 'python -c "import torch"'}
    text = doc.read_text()
    assert text.startswith("# before\n<!-- BENCH:BEGIN -->\n") and text.endswith("# after\n")
    assert "old figures" not in text
    for heading in ("### Goals", "### Each pair", "### Cost against depth", "### `patch`"):
        assert heading in text and heading in p.stdout


def test_gpu_script_runs_on_cpu(tmp_path: Path) -> None:
    """The prepared GPU script (no device here): its timers hook compute-projections and it
    reports a read-wait share and throughputs that add up."""
    p = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_bench.py"),
            "--width",
            "128",
            "--layers",
            "2",
            "--vocab",
            "64",
            "--device",
            "cpu",
            "--no-drop",
            "--work",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)
    cp = res["compute_projections"]
    assert res["weights"] == 4 and res["page_cache"].startswith("warm")
    assert cp["bytes_read"] == res["sequential_read"]["bytes"] == 4 * 2 * 128 * 128 * 2
    assert 0 < cp["wait_for_reads_s"] <= cp["wall_s"] and 0 < cp["wait_share"] <= 1
    assert cp["prefetch_read_s"] > 0


def test_io_floor_does_the_same_work(synth, tmp_path: Path, monkeypatch) -> None:
    """bench/io_floor.py (scale_bench's floors): ``compute`` writes F = V / sqrt(||V||_F) per
    weight (float64 oracle), and ``patch`` writes what ``safelora patch`` writes when every
    module is projected (4 modules, default -k 10), so the comparison is like for like."""
    shape = synth.llama_shape(64, 2, vocab=64)
    pair = synth.make_pair(tmp_path, shape)
    (ad,) = synth.make_adapters(tmp_path / "ads", shape, 1, r=4)
    monkeypatch.syspath_prepend(str(BENCH))
    b, al = str(pair.base_dir), str(pair.aligned_dir)

    def floor(*args: str) -> None:
        monkeypatch.setattr(sys, "argv", ["io_floor.py", *args])
        runpy.run_path(str(BENCH / "io_floor.py"), run_name="__main__")

    floor("compute", b, al, str(tmp_path / "f"), "--stats", str(tmp_path / "s.json"))
    names = synth.target_weights(shape)
    assert json.loads((tmp_path / "s.json").read_text())["weights"] == len(names) == 4
    base = {**load_file(pair.base_dir / "model-00001-of-00002.safetensors"),
            **load_file(pair.base_dir / "model-00002-of-00002.safetensors")}  # fmt: skip
    aligned = {**load_file(pair.aligned_dir / "model-00001-of-00002.safetensors"),
               **load_file(pair.aligned_dir / "model-00002-of-00002.safetensors")}  # fmt: skip
    for n in names:
        v = aligned[n].double() - base[n].double()
        want = v / torch.linalg.norm(v).sqrt()
        got = load_file(tmp_path / "f" / f"{n}.safetensors")[n].double()
        assert float(torch.linalg.norm(got - want) / torch.linalg.norm(want)) < 1e-6

    cache, ours, theirs = tmp_path / "cache", tmp_path / "ours", tmp_path / "theirs"
    runner = CliRunner()
    res = runner.invoke(app, ["compute-projections", b, al, "-o", str(cache), "--adapter", str(ad)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["patch", str(ad), "-p", str(cache), "-o", str(ours), "--quiet"])
    assert res.exit_code == 0, res.output
    floor("patch", str(cache), str(theirs), str(ad))
    got = load_file(theirs / "adapter_model.safetensors")
    want = load_file(ours / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)


def test_scale_bench_goals_from_paired_runs(monkeypatch) -> None:
    """scale_bench's verdicts come from per-repeat safelora/floor ratios (medians), skip
    comparisons not measured yet (a full-depth run cut short), and compare RSS across depths."""
    monkeypatch.syspath_prepend(str(BENCH))
    sb = importlib.import_module("scale_bench")

    def run(wall: float, cpu: float, rss: int) -> dict:
        return {"wall_s": wall, "cpu_s": cpu, "peak_rss": rss, "stats": {}}

    cfg = {"width": 64, "layers": 8, "repeats": 3, "adapters": 5, "warm": True}
    res = {
        "config": cfg, "started": "t", "uptime_before": "u0", "uptime_after": "u1",
        "machine": {}, "model_bytes": 1,
        "runs": {
            # ratios 1.0, 1.5, 1.1 -> median 1.1 (<= 1.2); medians of walls would give 1.1 too
            "compute q/v": {"safelora": [run(10, 1, 900 << 20), run(15, 1, 900 << 20),
                                         run(11, 1, 900 << 20)],
                            "floor": [run(10, 1, 1), run(10, 1, 1), run(10, 1, 1)]},
            # 2 floors measured, 3 safelora: only the pairs count; ratios 1.3, 1.4 -> missed
            "compute all-linear": {"safelora": [run(13, 1, 2), run(14, 1, 2), run(1, 1, 2)],
                                   "floor": [run(10, 1, 1), run(10, 1, 1)]},
            "patch 1 adapter": {"safelora": [run(2, 1, 1)], "floor": [run(2, 1, 1)]},
            "patch 5 adapters": {"safelora": [], "floor": []},  # not measured yet
        },
    }  # fmt: skip
    shallow = {"config": {"layers": 4}, "runs": {
        "compute q/v": {"safelora": [run(1, 1, 800 << 20)], "floor": [run(1, 1, 1)]}}}  # fmt: skip
    text = sb.render(res, shallow)
    assert "| compute q/v: wall ≤ 1.2x the I/O floor | 1.10x | met |" in text
    assert "| compute all-linear: wall ≤ 1.2x the I/O floor | 1.35x | **missed** |" in text
    assert "patch of 5 adapters" not in text  # skipped, not failed
    assert "| compute q/v peak RSS < 1.5 GB | 0.94 GB | met |" in text
    assert "900 MiB ÷ 800 MiB = 1.12x | met |" in text
