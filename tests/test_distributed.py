"""Multi-process compute-projections and patch under ``accelerate launch`` (issue 9).

Real launches: ``accelerate launch --multi_gpu --num_processes 2`` (torchrun underneath; on a
machine without CUDA the ranks use gloo on the CPU; ``--cpu`` would start a single process) runs
the real CLI in two processes. Their caches, adapters and ``--json`` lines must be byte-identical
to a single-process run into the same paths. A failure on rank 1 only (a NaN in one aligned
weight of rank 1's share; a write error injected by the test's own wrapper script) must fail the
whole run: one error message, every rank exits non-zero, no manifest names a file that was
never written, no partial output. Journals of a killed multi-process run are exercised
in-process (no launcher needed), and so are the per-rank reads and the cross-rank rollback of
patch: ranks as threads whose collectives are barriers (the same code path as a process group).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from safelora_cli.cache import MANIFEST, ProjectionCache
from safelora_cli.cli import app
from safelora_cli.compute import compute_projections, schedule, split_targets
from safelora_cli.distributed import balance, launched, rank_device
from safelora_cli.reader import CheckpointReader
from safelora_cli.targets import resolve_targets
from tests import factory

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).parent / "accelerate"
ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
runner = CliRunner()

needs_launcher = pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate CLI not found")


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (hidden files included)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args: list[str], *, script: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Two ranks of ``safelora ARGS`` (or of ``script ARGS``) on gloo, via accelerate launch."""
    cmd = [
        str(ACCELERATE),
        "launch",
        *("--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(free_port())),
        *(["-m", "safelora_cli"] if script is None else [str(script)]),
        *args,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # gloo on the CPU even where a GPU exists
        "HF_HUB_OFFLINE": "1",
        "SAFELORA_DIST_TIMEOUT": "120",  # a hang fails the test instead of stalling it
    }
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def single(*args: str) -> Any:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-layer Llama pair and three adapters on different modules."""
    tmp = tmp_path_factory.mktemp("dist")
    pair = factory.make_pair(tmp, layers=3, shards=2)
    a = [
        factory.write_adapter(tmp / "a1", base=pair.base, targets=("q_proj", "v_proj", "up_proj")),
        factory.write_adapter(tmp / "a2", base=pair.base, targets=("q_proj", "k_proj"), seed=2),
        factory.write_adapter(
            tmp / "a3", base=pair.base, targets=("o_proj", "down_proj"), seed=3, r=2
        ),
    ]
    return {
        "tmp": tmp,
        "base": pair.base_dir,
        "aligned": pair.aligned_dir,
        **{f"a{i + 1}": p for i, p in enumerate(a)},
    }


# ----------------------------------------------------------------------------- no launcher


def test_help_imports_neither_accelerate_nor_torch_distributed() -> None:
    code = (
        "import sys\nfrom safelora_cli.cli import app\n"
        "for argv in (['--help'], ['compute-projections', '--help'], ['patch', '--help']):\n"
        "    try:\n        app(argv)\n    except SystemExit:\n        pass\n"
        "bad = [m for m in ('accelerate', 'torch', 'torch.distributed') if m in sys.modules]\n"
        "print('IMPORTED', bad, file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert "IMPORTED []" in r.stderr, r.stderr[-2000:]


def test_launched_reads_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not launched()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not launched()  # one process: the single-process path
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched()
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert not launched()
    assert rank_device("auto", None) == "auto"


def _brute_best(costs: list[float], parts: int) -> float:
    best = float("inf")
    for code in range(parts ** len(costs)):
        loads = [0.0] * parts
        c = code
        for x in costs:
            loads[c % parts] += x
            c //= parts
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize(
    "costs,parts",
    [
        ([10.0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2),  # one heavy weight: count balance is wrong
        ([5.0, 4, 3, 3, 3], 2),
        ([7.0, 7, 6, 6, 5, 4, 4, 2], 3),
        ([1.0, 2], 4),  # more parts than items
        ([], 2),
    ],
)
def test_balance_is_a_partition_within_lpt_bound(costs: list[float], parts: int) -> None:
    shares = balance(costs, parts)
    assert len(shares) == parts
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    assert all(s == sorted(s) for s in shares)
    if costs:
        worst = max(sum(costs[i] for i in s) for s in shares)
        # Graham's bound for LPT: within 4/3 of the best split.
        assert worst <= _brute_best(costs, parts) * 4 / 3 + 1e-9
    assert balance(costs, parts) == shares  # deterministic


def test_balance_is_by_cost_not_by_count() -> None:
    shares = balance([10.0] + [1.0] * 10, 2)
    assert shares[0] == [0] and len(shares[1]) == 10


def test_split_targets_weighs_flops_and_bytes(case: dict[str, Path]) -> None:
    with (
        CheckpointReader.open(case["base"], label="base model") as rb,
        CheckpointReader.open(case["aligned"], label="aligned model") as ra,
    ):
        ts = resolve_targets(rb, targets=ALL)
        shares = split_targets(ts, rb, ra, 2, "cpu")
        assert sorted(t.weight for s in shares for t in s) == sorted(t.weight for t in ts)
        assert all(s for s in shares)

        # Independent cost: bytes of both tensors from the headers, FLOPs of V V^T for gram.
        def cost(t: Any) -> float:
            nbytes = 2 * 4 * t.d_out * t.d_in
            flops = 2 * t.d_out**2 * t.d_in if t.d_out <= t.d_in else 3 * t.d_out * t.d_in
            return nbytes / 2e9 + flops / 5e10

        loads = [sum(cost(t) for t in s) for s in shares]
        cs = [cost(t) for t in ts]
        # Any greedy list schedule ends within total/m + (1 - 1/m) * largest item.
        assert max(loads) <= sum(cs) / 2 + max(cs) / 2 + 1e-12
        assert split_targets(ts, rb, ra, 2, "cpu") == shares


def test_killed_distributed_run_resumes_from_journals(tmp_path: Path) -> None:
    """A killed multi-process run left rank 1's entries in its journal: resume adopts them."""
    pair = factory.make_pair(tmp_path, layers=2)
    base, aligned = str(pair.base_dir), str(pair.aligned_dir)
    ref = tmp_path / "ref"
    compute_projections(base, aligned, ref, targets=ALL, device="cpu")
    ref_tree = tree(ref)

    from safelora_cli.compute import _PairStream, parse_device
    from safelora_cli.sources import open_model

    out = tmp_path / "cache"
    rb, sb = open_model(base, label="base model")
    ra, sa = open_model(aligned, label="aligned model")
    with rb, ra:
        ts = resolve_targets(rb, targets=ALL)
        shares = split_targets(ts, rb, ra, 2, "cpu")
        owner = ProjectionCache.create_or_resume(out, sb, sa)
        worker = ProjectionCache.worker(out, owner.manifest, rank=1)
        stream = _PairStream(rb, ra, parse_device("cpu"), digests={})
        sha = stream.digests
        assert sha is not None
        # Rank 0 wrote one entry, rank 1 two; then both were killed (nothing adopted).
        for t in shares[0][:1]:
            owner.put(stream.compute([stream.load(t)]), source_sha256=sha.pop(t.weight))
        done1 = shares[1][:2]
        for t in done1:
            worker.put(stream.compute([stream.load(t)]), source_sha256=sha.pop(t.weight))
        owner.close()
    journals = sorted(p.name for p in out.iterdir() if p.name.startswith(".journal-"))
    assert journals == [".journal-1.json"]
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk["state"] == "in_progress" and len(on_disk["weights"]) == 1
    # Damage one journalled entry: it must be recomputed, not adopted.
    broken = (
        out / json.loads((out / ".journal-1.json").read_text())["weights"][done1[1].weight]["file"]
    )
    broken.write_bytes(broken.read_bytes()[:20])

    s = compute_projections(base, aligned, out, targets=ALL, device="cpu")
    assert s.skipped == 2 and s.computed == len(ts) - 2
    assert tree(out) == ref_tree  # journals gone, manifest and entries as one clean run


# ----------------------------------------------------------------------------- launched


@needs_launcher
def test_two_ranks_equal_one_for_compute_and_batch_patch(case: dict[str, Path]) -> None:
    tmp = case["tmp"]
    base, aligned = str(case["base"]), str(case["aligned"])
    adapters = [str(case[k]) for k in ("a1", "a2", "a3")]
    cache, out = tmp / "eq-cache", tmp / "eq-out"
    compute = ["compute-projections", base, aligned, "-o", str(cache), "--targets", ALL]
    patch = ["patch", *adapters, "-p", str(cache), "-o", str(out), "-k", "3", "--json"]

    single(*compute, "--device", "cpu", "-q")
    p1 = single(*patch)
    one = {"cache": tree(cache), "out": tree(out), "json": p1.stdout}
    assert len(one["cache"]) == 1 + 3 * 7 and len(p1.stdout.splitlines()) == 3
    cache.rename(tmp / "eq-cache-1")
    out.rename(tmp / "eq-out-1")

    r = launch(compute)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree(cache) == one["cache"]  # manifest and every entry file, byte for byte
    assert r.stderr.count("21 weights computed") == 1  # the summary is printed once
    assert "2 processes" in r.stderr

    r = launch(patch)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree(out) == one["out"]
    assert r.stdout == one["json"]  # gathered in argument order, printed by rank 0 only
    assert [json.loads(x)["adapter"] for x in r.stdout.splitlines()] == adapters

    # --force into the existing output takes the per-target path: still the same bytes.
    r = launch([*patch, "--force"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree(out) == one["out"]
    assert not [p for p in tmp.iterdir() if p.name.startswith(".eq-out")]


@needs_launcher
def test_rank_one_failing_fails_the_run_and_names_no_unwritten_entry(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path, layers=3)
    base, aligned = str(pair.base_dir), str(pair.aligned_dir)
    cache = tmp_path / "cache"
    targets = "k_proj,o_proj,gate_proj,up_proj,down_proj"
    # Poison the last weight of rank 1's share (rank 1 writes others first, then fails).
    with (
        CheckpointReader.open(pair.base_dir, label="base model") as rb,
        CheckpointReader.open(pair.aligned_dir, label="aligned model") as ra,
    ):
        shares = split_targets(resolve_targets(rb, targets=targets), rb, ra, 2, "cpu")
    assert len(shares[1]) >= 2
    bad = schedule(shares[1])[-1].weight
    poisoned = dict(pair.aligned)
    poisoned[bad] = poisoned[bad].clone()
    poisoned[bad][0, 0] = float("nan")
    factory.write_checkpoint(pair.aligned_dir, poisoned, config="llama")
    # An existing cache (built after the poisoning: same fingerprints) with q_proj in it.
    single("compute-projections", base, aligned, "-o", str(cache), "--targets", "q_proj", "-q")
    before = json.loads((cache / MANIFEST).read_text())["weights"]

    r = launch(["compute-projections", base, aligned, "-o", str(cache), "--targets", targets])
    assert r.returncode != 0
    assert r.stderr.count("error: ") == 1, r.stderr[-3000:]  # printed once, by rank 0
    assert "rank 1 of 2" in r.stderr and bad in r.stderr and "NaN" in r.stderr

    m = json.loads((cache / MANIFEST).read_text())
    named = m["weights"]
    assert bad not in named
    assert set(before) <= set(named)
    assert {t.weight for t in shares[0]} <= set(named)  # rank 0 finished its share
    # Every entry the manifest names is on disk and reads back as recorded.
    opened = ProjectionCache.open(cache)
    for w, e in named.items():
        assert (cache / e["file"]).is_file(), w
        assert list(opened.get(w, fan_in_fan_out=e["fan_in_fan_out"]).tensor.shape) == e["shape"]
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith((".journal-", ".tmp-"))]
    assert not leftovers
    files = {p.name for p in cache.iterdir()} - {MANIFEST}
    assert files == {e["file"] for e in named.values()}


WRAPPER = r"""
import os, sys

import safelora_cli.patch as patch

real = patch.write_adapter_dir


def failing(scored, dest):
    # Rank 1 cannot write (a full disk, say); rank 0 can.
    if os.environ.get("RANK") == "1":
        raise OSError(28, "No space left on device", str(dest))
    return real(scored, dest)


patch.write_adapter_dir = failing
from safelora_cli.cli import main

sys.argv[0] = "safelora"
main()
"""


@needs_launcher
def test_rank_one_failing_to_write_leaves_no_partial_batch(case: dict[str, Path]) -> None:
    tmp = case["tmp"] / "fail-patch"
    tmp.mkdir()
    base, aligned = str(case["base"]), str(case["aligned"])
    cache = tmp / "cache"
    single("compute-projections", base, aligned, "-o", str(cache), "--targets", ALL, "-q")
    script = tmp / "wrapper.py"
    script.write_text(WRAPPER)
    adapters = [str(case[k]) for k in ("a1", "a2", "a3")]
    out = tmp / "out"
    argv = ["patch", *adapters, "-p", str(cache), "-o", str(out), "-t", "0.9"]

    # A new batch output: nothing appears.
    r = launch(argv, script=script)
    assert r.returncode != 0 and r.stderr.count("error: ") == 1, r.stderr[-3000:]
    assert "No space left" in r.stderr
    assert sorted(p.name for p in tmp.iterdir()) == ["cache", "wrapper.py"]

    # --force over an existing batch: the old adapters stay, whole, and nothing else is left.
    single(*argv[:-2], "-k", "1")
    old = tree(out)
    r = launch([*argv, "--force"], script=script)
    assert r.returncode != 0 and r.stderr.count("error: ") == 1, r.stderr[-3000:]
    assert tree(out) == old
    assert sorted(p.name for p in tmp.iterdir()) == ["cache", "out", "wrapper.py"]
    assert sorted(p.name for p in out.iterdir()) == ["a1", "a2", "a3"]


def test_save_projections_is_refused_under_several_ranks(tmp_path: Path) -> None:
    """``--save-projections`` would have several processes write one cache: refused up front."""
    from safelora_cli.distributed import Dist, RankError
    from safelora_cli.errors import UsageError
    from safelora_cli.patch import patch_adapters

    class OneRankOfTwo(Dist):
        def all_gather(self, obj: Any) -> list[Any]:
            return [obj, None]  # the other rank is fine

        def broadcast(self, obj: Any) -> Any:
            return obj

    pair = factory.make_pair(tmp_path)
    ad = factory.write_adapter(tmp_path / "a", base=pair.base)
    d = OneRankOfTwo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(UsageError, match="save-projections"):
        patch_adapters(
            [str(ad)],
            tmp_path / "out",
            base=str(pair.base_dir),
            aligned=str(pair.aligned_dir),
            save_projections=tmp_path / "c",
            device="cpu",
            dist=d,
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()
    # The other rank raises a quiet RankError with the same exit code.
    d1 = OneRankOfTwo(rank=1, world_size=2, local_rank=0, device=torch.device("cpu"))
    d1.all_gather = lambda obj: [("x failed", "hint", 2), obj]  # type: ignore[method-assign]
    with pytest.raises(RankError) as info:
        d1.agree(None)
    assert info.value.quiet and info.value.exit_code == 2
    shutil.rmtree(tmp_path / "a")


# ----------------------------------------------------------------------------- in-process ranks


class _Group:
    """Collectives between threads: a stand-in for a process group (same call pattern)."""

    def __init__(self, n: int) -> None:
        import threading

        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list[Any] = [None] * n


def _thread_ranks(n: int) -> list[Any]:
    from safelora_cli.distributed import Dist

    group = _Group(n)

    class ThreadDist(Dist):
        def all_gather(self, obj: Any) -> list[Any]:
            group.barrier.wait()
            group.slots[self.rank] = obj
            group.barrier.wait()
            out = list(group.slots)
            group.barrier.wait()
            return out

        def broadcast(self, obj: Any) -> Any:
            return self.all_gather(obj)[0]

    return [ThreadDist(r, n, r, torch.device("cpu")) for r in range(n)]


def _run_ranks(fn: Any, n: int = 2) -> list[Any]:
    """``fn(dist)`` on ``n`` threads; returns each rank's result or exception."""
    import threading

    ranks = _thread_ranks(n)
    out: list[Any] = [None] * n

    def body(d: Any) -> None:
        try:
            out[d.rank] = fn(d)
        except BaseException as e:
            out[d.rank] = e

    threads = [threading.Thread(target=body, args=(d,), name=f"rank{d.rank}") for d in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_each_rank_reads_only_the_entries_its_adapters_need(
    case: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safelora_cli.adapter import load_adapter
    from safelora_cli.patch import _adapter_cost, patch_adapters

    cache = tmp_path / "cache"
    compute_projections(str(case["base"]), str(case["aligned"]), cache, targets=ALL, device="cpu")
    adapters = [str(case[k]) for k in ("a1", "a2", "a3")]
    reads: dict[int, set[str]] = {}
    real_get = ProjectionCache.get

    def spy(self: ProjectionCache, weight: str, **kw: Any) -> Any:
        reads.setdefault(id(self), set()).add(weight)
        return real_get(self, weight, **kw)

    out = tmp_path / "out"
    patch_adapters(adapters, out, projections=cache, device="cpu")  # one process
    first = tree(out)
    shutil.rmtree(out)

    monkeypatch.setattr(ProjectionCache, "get", spy)
    results = _run_ranks(
        lambda d: patch_adapters(adapters, out, projections=cache, device="cpu", dist=d)
    )
    assert all(isinstance(r, list) for r in results), results
    assert tree(out) == first  # the same bytes as one process
    # Every rank returns every report, in argument order.
    assert [r.adapter for r in results[0]] == adapters
    assert [r.to_json() for r in results[1]] == [r.to_json() for r in results[0]]

    loaded = [load_adapter(a) for a in adapters]
    shares = balance([_adapter_cost(ad) for ad in loaded], 2)
    need = [
        {f"{m}.weight" for i in share for m in factory.adapter_modules(adapters[i])}
        for share in shares
    ]
    for ad in loaded:
        ad.close()
    assert all(need) and need[0] != need[1]
    assert sorted(map(sorted, reads.values())) == sorted(map(sorted, need))


def test_a_failed_rename_on_one_rank_rolls_back_every_rank(
    case: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--force into an existing batch: rank 0 published, rank 1 could not; all old again."""
    import threading

    from safelora_cli.patch import patch_adapters

    cache = tmp_path / "cache"
    compute_projections(str(case["base"]), str(case["aligned"]), cache, targets=ALL, device="cpu")
    adapters = [str(case[k]) for k in ("a1", "a2", "a3")]
    out = tmp_path / "out"
    patch_adapters(adapters, out, projections=cache, device="cpu")  # the old batch (-k 10)
    old = tree(out)

    from safelora_cli import fsio

    real_exchange = fsio.exchange

    def exchange(src: Any, dst: Any) -> bool:
        # --force swaps each staged directory with its target (RENAME_EXCHANGE).
        if threading.current_thread().name == "rank1" and ".safelora-tmp-" in str(src):
            raise OSError(5, "Input/output error", str(dst))
        return real_exchange(src, dst)

    monkeypatch.setattr(fsio, "exchange", exchange)
    from safelora_cli.selection import Selection

    results = _run_ranks(
        lambda d: patch_adapters(
            adapters,
            out,
            projections=cache,
            device="cpu",
            force=True,
            selection=Selection.from_flags(1, None, None),
            dist=d,
        )
    )
    from safelora_cli.distributed import RankError

    # Both ranks fail with rank 1's error; only rank 0's is to be printed.
    assert all(isinstance(r, RankError) for r in results), results
    assert [r.quiet for r in results] == [False, True]
    assert "rank 1 of 2: Input/output error" in str(results[0])
    assert isinstance(results[1].__cause__, OSError)
    assert tree(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]


KILL_WRAPPER = r"""
import os, signal, sys

from safelora_cli.cache import ProjectionCache

real = ProjectionCache.put
count = [0]


def put(self, projector, **kw):
    entry = real(self, projector, **kw)
    count[0] += 1
    if os.environ.get("RANK") == "1" and count[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # rank 1 dies after its second entry
    return entry


ProjectionCache.put = put
from safelora_cli.cli import main

sys.argv[0] = "safelora"
main()
"""


@needs_launcher
def test_killed_rank_leaves_a_cache_the_same_command_resumes(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path, layers=2)
    base, aligned = str(pair.base_dir), str(pair.aligned_dir)
    ref = tmp_path / "ref"
    compute_projections(base, aligned, ref, targets=ALL, device="cpu")
    script = tmp_path / "kill.py"
    script.write_text(KILL_WRAPPER)
    cache = tmp_path / "cache"
    argv = ["compute-projections", base, aligned, "-o", str(cache), "--targets", ALL]

    r = launch(argv, script=script)
    assert r.returncode != 0
    m = json.loads((cache / MANIFEST).read_text())
    assert m["state"] == "in_progress"
    with pytest.raises(Exception, match="incomplete"):
        ProjectionCache.open(cache)  # patch -p / inspect -p refuse it
    journal = json.loads((cache / ".journal-1.json").read_text())["weights"]
    assert len(journal) == 2  # rank 1's two entries, not in the manifest
    assert not set(journal) & set(m["weights"])
    for w, e in [*m["weights"].items(), *journal.items()]:
        assert (cache / e["file"]).is_file(), w

    s = compute_projections(base, aligned, cache, targets=ALL, device="cpu")
    assert s.skipped == len(m["weights"]) + 2  # nothing finished is computed again
    assert tree(cache) == tree(ref)
