"""``patch-model`` under several ranks (issue 16): the shards are split, the output is the
same bytes as one process, and a failure on one rank publishes nothing.

In process, ranks are threads whose collectives are barriers (the call pattern of a process
group, as in tests/test_distributed.py); one real ``accelerate launch`` with two gloo ranks
runs the CLI end to end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from safelora_cli.cli import app
from safelora_cli.distributed import Dist
from tests import model_trio as mt

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).parent / "accelerate"
runner = CliRunner()


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> mt.Trio:
    return mt.llama_trio(tmp_path_factory.mktemp("dist"), dtype=torch.float32, seed=5)


@pytest.fixture(scope="module")
def cache(trio: mt.Trio) -> Path:
    c = trio.base.parent / "cache"
    r = runner.invoke(
        app,
        [
            "compute-projections",
            str(trio.base),
            str(trio.aligned),
            "-o",
            str(c),
            "--targets",
            mt.ALL_LLAMA,
            "-q",
        ],
    )
    assert r.exit_code == 0, r.stderr
    return c


def _thread_ranks(n: int) -> list[Dist]:
    barrier = threading.Barrier(n, timeout=60)
    slots: list[Any] = [None] * n

    class ThreadDist(Dist):
        def all_gather(self, obj: Any) -> list[Any]:
            barrier.wait()
            slots[self.rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out

        def broadcast(self, obj: Any) -> Any:
            return self.all_gather(obj)[0]

    return [ThreadDist(r, n, r, torch.device("cpu")) for r in range(n)]


def _run_ranks(fn: Any, n: int = 2) -> list[Any]:
    out: list[Any] = [None] * n

    def body(d: Dist) -> None:
        try:
            out[d.rank] = fn(d)
        except BaseException as e:
            out[d.rank] = e

    threads = [
        threading.Thread(target=body, args=(d,), name=f"rank{d.rank}") for d in _thread_ranks(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_ranks_split_the_shards_and_write_the_same_bytes(
    trio: mt.Trio, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safelora_cli.model_patch as mp
    from safelora_cli.selection import Selection

    sel = Selection.from_flags(None, 0.9, None)
    two = tmp_path / "two"
    mp.patch_model(
        str(trio.finetuned), two, aligned=str(trio.aligned), projections=cache, selection=sel
    )
    one = two.rename(tmp_path / "one")  # the report names the output: write the same path
    written: dict[str, set[str]] = {}
    real = mp.write_safetensors

    def spy(dest: Path, *a: Any, **kw: Any) -> None:
        written.setdefault(threading.current_thread().name, set()).add(dest.name)
        real(dest, *a, **kw)

    monkeypatch.setattr(mp, "write_safetensors", spy)
    results = _run_ranks(
        lambda d: mp.patch_model(
            str(trio.finetuned),
            two,
            aligned=str(trio.aligned),
            projections=cache,
            selection=sel,
            dist=d,
        )
    )
    assert all(isinstance(r, mp.ModelReport) for r in results), results
    assert results[0].to_json() == results[1].to_json()
    assert mt.tree(two) == mt.tree(one)
    shards = {p.name for p in trio.finetuned.glob("model-*.safetensors")}
    assert len(shards) >= 3
    assert written["rank0"] | written["rank1"] == shards
    assert written["rank0"] and written["rank1"] and not written["rank0"] & written["rank1"]


def test_a_write_failure_on_one_rank_publishes_nothing(
    trio: mt.Trio, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safelora_cli.model_patch as mp

    real = mp.write_safetensors

    def failing(dest: Path, *a: Any, **kw: Any) -> None:
        if threading.current_thread().name == "rank1":
            raise OSError(28, "No space left on device", str(dest))
        real(dest, *a, **kw)

    monkeypatch.setattr(mp, "write_safetensors", failing)
    out = tmp_path / "out"
    results = _run_ranks(
        lambda d: mp.patch_model(
            str(trio.finetuned), out, aligned=str(trio.aligned), projections=cache, dist=d
        )
    )
    assert all(isinstance(r, Exception) for r in results), results
    assert "No space left" in str(results[0])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging left behind


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate CLI not found")
def test_accelerate_launch_two_ranks_equal_one(trio: mt.Trio, cache: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["patch-model", str(trio.finetuned), "--aligned", str(trio.aligned), "-p", str(cache)]
    r = runner.invoke(app, [*args, "-o", str(two), "-k", "4", "--json"])
    assert r.exit_code == 0, r.stderr
    two.rename(one)  # the report names the output: the launch writes the same path
    cmd = [
        str(ACCELERATE),
        "launch",
        *("--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(_free_port())),
        *("-m", "safelora_cli"),
        *args,
        *("-o", str(two), "-k", "4", "--json"),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "SAFELORA_DIST_TIMEOUT": "120",
    }
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert mt.tree(two) == mt.tree(one)
    lines = p.stdout.splitlines()
    assert len(lines) == 1  # printed by rank 0 only
    a, b = json.loads(lines[0]), json.loads(r.stdout)
    assert a == b


def test_ranks_on_the_fly_and_dry_run_agree_with_one_process(trio: mt.Trio, tmp_path: Path) -> None:
    import safelora_cli.model_patch as mp

    kw = {"aligned": str(trio.aligned), "base": str(trio.base), "dry_run": True}
    one = mp.patch_model(str(trio.finetuned), tmp_path / "out", **kw)
    results = _run_ranks(
        lambda d: mp.patch_model(str(trio.finetuned), tmp_path / "out", dist=d, **kw)
    )
    assert all(isinstance(r, mp.ModelReport) for r in results), results
    assert results[0].to_json() == results[1].to_json() == one.to_json()
    assert not (tmp_path / "out").exists()
