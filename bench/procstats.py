"""What the OS accounts for the current process (stdlib only, so it costs nothing to import).

``proc_stats()`` reads ``/proc/self/status`` (VmHWM: peak resident set, VmRSS) and
``/proc/self/io`` (rchar: bytes through read/pread syscalls, page-cache hits included;
read_bytes: bytes the block layer fetched for this process). Memory-mapped reads do not show in
rchar, so every benchmark child also reports its own count of tensor bytes it pulled from the
checkpoint files (``bytes_read``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _kv(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k.strip()] = v.strip()
    except OSError:
        pass
    return out


def proc_stats() -> dict[str, int]:
    """Peak/current RSS in bytes and I/O counters of this process (zeros where unavailable)."""
    st = _kv("/proc/self/status")
    io = _kv("/proc/self/io")

    def kib(k: str) -> int:
        v = st.get(k, "0 kB").split()
        return int(v[0]) * 1024 if v else 0

    return {
        "vm_hwm": kib("VmHWM"),
        "vm_rss": kib("VmRSS"),
        "rchar": int(io.get("rchar", 0)),
        "wchar": int(io.get("wchar", 0)),
        "io_read_bytes": int(io.get("read_bytes", 0)),
    }


def dump(path: str | os.PathLike[str] | None, **extra: object) -> None:
    """Write proc_stats() plus ``extra`` as JSON to ``path`` (no-op when path is None)."""
    if path:
        Path(path).write_text(json.dumps({**proc_stats(), **extra}))
