"""Measurement harness: run a command as a fresh child process and account for what it cost.

Each measured command runs in its own process. The parent takes the wall time around it and reaps
it with ``os.wait4``, whose ``rusage`` is that child's own: ``ru_utime + ru_stime`` is its CPU
time and ``ru_maxrss`` its peak resident set. Children that know more (bytes read, cache bytes)
write a small JSON file (see ``procstats.py``) that is merged into the result.

Peak RSS (``peak_rss``) is the child's own ``VmHWM`` from ``/proc/self/status`` read just before
it exits, when the child reports it (every benchmark child does): the high-water mark of its
address space since ``exec``, the whole process as the kernel accounts it (interpreter, torch,
every tensor, mapped file pages, all threads). ``ru_maxrss`` is the fallback (for ``--help`` and
``import torch``) and is an upper bound: Linux carries the *spawning* process's high-water mark
across ``fork``/``exec`` into it. That is why the driver (``run_all.py``) never imports torch and
stays at a few tens of MiB; its own ``VmHWM`` is recorded with the results.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable


@dataclass
class Run:
    """One child process: what it was, how long it took, what it held."""

    label: str
    argv: list[str]
    wall_s: float
    cpu_s: float
    maxrss: int  # bytes, ru_maxrss (upper bound, see the module docstring)
    peak_rss: int  # bytes, the child's own VmHWM when it reports it, else maxrss
    rc: int
    stats: dict = field(default_factory=dict)
    stderr_tail: str = ""

    def to_json(self) -> dict:
        return asdict(self)


class RunFailed(RuntimeError):
    pass


def run(
    label: str,
    argv: Sequence[str],
    *,
    stats: bool = False,
    timeout: float = 1800,
    env: dict[str, str] | None = None,
) -> Run:
    """Run ``argv`` (``{stats}`` in it is replaced by a temp JSON path) and measure it.

    Raises RunFailed (with the child's stderr tail) when it exits non-zero.
    """
    with tempfile.TemporaryDirectory(prefix="bench-run-") as td:
        stats_path = Path(td) / "stats.json"
        args = [a.replace("{stats}", str(stats_path)) for a in argv]
        out_f = open(Path(td) / "out", "wb")  # noqa: SIM115 (closed below)
        err_f = open(Path(td) / "err", "wb")  # noqa: SIM115
        full_env = {**os.environ, **(env or {})}
        t0 = time.perf_counter()
        p = subprocess.Popen(args, stdout=out_f, stderr=err_f, env=full_env, cwd=ROOT)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.002)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out_f.close()
        err_f.close()
        err = (Path(td) / "err").read_text(errors="replace")[-2000:]
        child = json.loads(stats_path.read_text()) if stats and stats_path.exists() else {}
    r = Run(
        label=label,
        argv=list(args),
        wall_s=wall,
        cpu_s=ru.ru_utime + ru.ru_stime,
        maxrss=ru.ru_maxrss * 1024,  # KiB on Linux
        peak_rss=int(child.get("vm_hwm") or ru.ru_maxrss * 1024),
        rc=p.returncode,
        stats=child,
        stderr_tail=err,
    )
    if r.rc != 0:
        raise RunFailed(f"{label} exited {r.rc}: {' '.join(args)}\n{err}")
    return r


def safelora_argv(*args: str) -> list[str]:
    """``python bench/probe.py {stats} -m safelora_cli ARGS``: the real CLI, accounted."""
    return [PY, str(BENCH / "probe.py"), "{stats}", "-m", "safelora_cli", *args]


def script_argv(script: str, *args: str) -> list[str]:
    return [PY, str(BENCH / script), *args, "--stats", "{stats}"]


@dataclass
class Summary:
    median: float
    lo: float
    hi: float
    n: int

    def fmt(self, unit: str = "s", scale: float = 1.0, digits: int = 2) -> str:
        m, lo, hi = self.median / scale, self.lo / scale, self.hi / scale
        if self.n == 1:
            return f"{m:.{digits}f}{unit}"
        return f"{m:.{digits}f}{unit} ({lo:.{digits}f}–{hi:.{digits}f})"


def summarize(values: Sequence[float]) -> Summary:
    v = list(values)
    return Summary(statistics.median(v), min(v), max(v), len(v))


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def warm(*dirs: Path) -> int:
    """Read every file under ``dirs`` once so every method starts from a warm page cache."""
    n = 0
    for d in dirs:
        for f in sorted(d.rglob("*")):
            if f.is_file():
                with open(f, "rb", buffering=0) as h:
                    while b := h.read(1 << 24):
                        n += len(b)
    return n


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def machine() -> dict:
    """nproc, RAM, CPU model, kernel, python, torch: what the figures were measured on."""
    info: dict = {"nproc": os.cpu_count()}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
        cpu = Path("/proc/cpuinfo").read_text()
        for line in cpu.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in cpu.splitlines() if ln.startswith("flags")), "")
        info["avx512"] = "avx512f" in flags
    except OSError:
        pass
    info["kernel"] = os.uname().release
    info["python"] = sys.version.split()[0]
    out = subprocess.run(
        [PY, "-c", "import torch;print(torch.__version__, torch.get_num_threads())"],
        capture_output=True,
        text=True,
    ).stdout.split()
    if out:
        info["torch"], info["torch_threads"] = out[0], int(out[1])
    return info
