"""Ctrl-C and SIGTERM at any moment (issue 15, category 8): real processes, real signals.

Each case starts the real command line in a child process (``python -m safelora_cli`` or a
small driver that calls the same entry point, ``safelora_cli.__main__.main``) and delivers a
real SIGINT or SIGTERM:

- during start-up, while typer and torch are being imported (the child is watched through
  ``/proc/<pid>/maps`` until libtorch is mapped, then signalled);
- during scoring (the driver sends the signal from inside the N-th ``Adapter.load_b``);
- during writing (from inside the N-th ``os.fsync``: staging files are being made durable);
- twice in a row, so the second arrives during the clean-up of the first.

And asserts: exit 130 (SIGINT) or 143 (SIGTERM), exactly one stderr line
(``error: interrupted ...`` / ``error: terminated ...``), no traceback, nothing left beside the
output (no staging directory), no output, and every input byte-identical; a ``--force`` run
keeps the previous output; an interrupted compute-projections resumes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from safelora_cli.cache import ProjectionCache
from tests import factory
from tests.test_catalogue import snapshot

REPO = Path(__file__).resolve().parent.parent

DRIVER = textwrap.dedent(
    r"""
    import importlib, os, signal, sys

    target, n, sig, times = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    mod_name, _, attr = target.rpartition(".")
    try:
        owner = importlib.import_module(mod_name)
    except ModuleNotFoundError:  # a class attribute: module.Class.method
        mod_name, _, cls = mod_name.rpartition(".")
        owner = getattr(importlib.import_module(mod_name), cls)
    real = getattr(owner, attr)
    count = [0]

    def hooked(*a, **k):
        count[0] += 1
        if count[0] == n:
            for _ in range(times):
                os.kill(os.getpid(), getattr(signal, sig))
        return real(*a, **k)

    setattr(owner, attr, hooked)
    sys.argv = ["safelora", *sys.argv[5:]]
    from safelora_cli.__main__ import main

    main()
    """
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SAFELORA_DEBUG", "WORLD_SIZE", "RANK")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safelora_cli.compute import compute_projections

    root = tmp_path_factory.mktemp("signals") / "world"
    root.mkdir()
    pair = factory.make_pair(root)
    factory.write_adapter(root / "adapter", base=pair.base)
    factory.write_adapter(root / "adapter2", base=pair.base, seed=5)
    compute_projections(str(root / "base"), str(root / "aligned"), root / "cache",
                        targets="q_proj,v_proj")  # fmt: skip
    return root


@pytest.fixture
def world(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "world"
    shutil.copytree(pristine, root)
    return root


def _driven(world: Path, target: str, n: int, sig: str, argv: list[str], times: int = 1):
    driver = world.parent / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.run(
        [sys.executable, str(driver), target, str(n), sig, str(times), *argv],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=world,
        timeout=180,
    )


def _assert_one_line(stderr: str, sig: str) -> None:
    word = {"SIGINT": "interrupted", "SIGTERM": "terminated"}[sig]
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {word} ({sig})"), stderr
    assert "Traceback" not in stderr


CODE = {"SIGINT": 130, "SIGTERM": 143}
PATCH = ["patch", "adapter", "adapter2", "-p", "cache", "-o", "out", "-t", "1"]


@pytest.mark.parametrize(
    ("target", "n", "sig"),
    [
        ("safelora_cli.adapter.Adapter.load_b", 1, "SIGINT"),  # scoring, first module
        ("safelora_cli.adapter.Adapter.load_b", 3, "SIGTERM"),  # scoring, second adapter
        ("os.fsync", 1, "SIGTERM"),  # writing: the first staged file
        ("os.fsync", 2, "SIGINT"),  # writing: later in the staging
    ],
    ids=["scoring-int", "scoring-term", "writing-term", "writing-int"],
)
def test_patch_interrupted_leaves_nothing(world: Path, target: str, n: int, sig: str) -> None:
    before = snapshot(world)
    p = _driven(world, target, n, sig, PATCH)
    assert p.returncode == CODE[sig], p.stderr
    _assert_one_line(p.stderr, sig)
    assert p.stdout == ""
    assert snapshot(world) == before  # no output, no staging directory, inputs unchanged


def test_second_signal_during_clean_up_is_ignored(world: Path) -> None:
    before = snapshot(world)
    p = _driven(world, "os.fsync", 1, "SIGINT", PATCH, times=3)
    assert p.returncode == 130, p.stderr
    _assert_one_line(p.stderr, "SIGINT")
    assert snapshot(world) == before


def test_force_interrupted_keeps_the_previous_output(world: Path) -> None:
    first = subprocess.run([sys.executable, "-m", "safelora_cli", *PATCH, "-q"], env=_env(),
                           cwd=world, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert first.returncode == 0, first.stderr
    before = snapshot(world)
    p = _driven(world, "os.fsync", 2, "SIGTERM", [*PATCH, "--force", "-t", "0.5"])
    assert p.returncode == 143, p.stderr
    _assert_one_line(p.stderr, "SIGTERM")
    assert snapshot(world) == before  # the old output is there, byte for byte


def test_inspect_interrupted_prints_no_partial_json(world: Path) -> None:
    before = snapshot(world)
    argv = ["inspect", "adapter", "adapter2", "-p", "cache", "--json"]
    p = _driven(world, "safelora_cli.adapter.Adapter.load_b", 2, "SIGTERM", argv)
    assert p.returncode == 143, p.stderr
    _assert_one_line(p.stderr, "SIGTERM")
    assert p.stdout == "" and snapshot(world) == before


def test_compute_interrupted_resumes(world: Path) -> None:
    argv = ["compute-projections", "base", "aligned", "-o", "new", "--targets", "q_proj,v_proj",
            "--device", "cpu"]  # fmt: skip
    before = snapshot(world)
    p = _driven(world, "os.fsync", 2, "SIGINT", argv)
    assert p.returncode == 130, p.stderr
    _assert_one_line(p.stderr, "SIGINT")
    after = snapshot(world)
    assert {k: v for k, v in after.items() if not k.startswith("new")} == before
    again = subprocess.run([sys.executable, "-m", "safelora_cli", *argv, "-q"], env=_env(),
                           cwd=world, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert again.returncode == 0, again.stderr
    with ProjectionCache.open(world / "new") as c:
        assert len(c.weights()) == 4


def _wait_for(pid: int, ready, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            if ready(pid):
                return True
        except OSError:
            return False
        time.sleep(0.002)
    return False


def _handler_installed(pid: int) -> bool:
    """SIGTERM is caught (``SigCgt`` in /proc/<pid>/status): safelora's handler is in place.

    Before that only the interpreter runs (its own start-up, outside safelora's reach)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _torch_mapped(pid: int) -> bool:
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("when", ["typer", "torch"])
def test_signal_during_start_up(world: Path, sig: str, when: str) -> None:
    """While the CLI imports typer/click, or torch (libtorch just mapped)."""
    before = snapshot(world)
    proc = subprocess.Popen([sys.executable, "-m", "safelora_cli", *PATCH], env=_env(),
                            cwd=world, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        # "typer": at once when the handler is in place (the next step imports typer/click);
        # "torch": once libtorch is mapped (torch's own Python start-up is still running).
        ready = _torch_mapped if when == "torch" else _handler_installed
        assert _wait_for(proc.pid, ready, time.monotonic() + 60)
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == CODE[sig], err
    _assert_one_line(err, sig)
    assert out == "" and snapshot(world) == before
