"""Output trees as comparable values, shared by tests/test_races.py and its fork driver."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def _normal(value: Any) -> Any:
    """A report with the run's own output path left out (it differs between runs by design)."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if k != "output"}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def tree(root: str | os.PathLike[str]) -> dict[str, str] | None:
    """Relative path -> sha256 of every file under ``root`` (directories "dir", links
    "link:<target>"; ``safelora_report.json`` without its output path); None when absent."""
    if not os.path.isdir(root):
        return None
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif name == "safelora_report.json":
                with open(p) as f:
                    data = json.dumps(_normal(json.load(f)), sort_keys=True)
                out[rel] = hashlib.sha256(data.encode()).hexdigest()
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out
