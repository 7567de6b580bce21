"""Run ``python -m MODULE ARGS...`` inside this process and record what it cost.

Usage: ``python bench/probe.py STATS.json -m safelora_cli compute-projections ...``

The module runs exactly as with ``python -m`` (``runpy``, ``__main__``, ``sys.argv``); its
``SystemExit`` code becomes this process's exit code. Before it starts, every
``safelora_cli.reader.CheckpointReader`` created is remembered (a wrapper around ``__init__``;
the reader module imports no torch, so this adds nothing measurable), and at exit the sum of their
``bytes_read`` counters is written with :func:`procstats.proc_stats` to STATS.json. That is the
number of tensor bytes safelora pulled from base, aligned, adapter and cache files.
"""

from __future__ import annotations

import runpy
import sys
import time

import procstats


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        print(__doc__, file=sys.stderr)
        return 2
    stats_path, module, args = sys.argv[1], sys.argv[3], sys.argv[4:]
    readers: list[object] = []
    try:
        from safelora_cli import reader as _reader

        init = _reader.CheckpointReader.__init__

        def tracked(self, *a, **kw):  # type: ignore[no-untyped-def]
            init(self, *a, **kw)
            readers.append(self)

        _reader.CheckpointReader.__init__ = tracked  # type: ignore[method-assign]
    except ImportError:
        pass
    sys.argv = [module, *args]
    t0 = time.perf_counter()
    code: object = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    run_s = time.perf_counter() - t0
    procstats.dump(
        stats_path,
        bytes_read=sum(int(getattr(r, "bytes_read", 0)) for r in readers),
        readers=len(readers),
        in_process_s=run_s,
    )
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
