"""Determinism (issue 6): the same inputs give byte-identical caches, adapters and reports.

The whole pipeline (compute-projections, patch from the cache for two adapters, patch from
base/aligned for one, inspect --json) runs twice on the same inputs into the *same* paths:
once in this process and once in a fresh interpreter with another ``PYTHONHASHSEED`` (so set
and dict orders that depend on string hashes would show). The first run's results are moved
aside before the second, and every file must then be byte-identical: no timestamp, no
process id, no hash order anywhere. A cache built incrementally (two runs adding targets) must
equal one built in a single run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safelora_cli.cli import app
from tests import factory

PIPELINE = r"""
import sys
from pathlib import Path

from safelora_cli.cli import app

def call(argv, stdout_to=None):
    from typer.testing import CliRunner
    r = CliRunner().invoke(app, argv)
    if r.exit_code != 0:
        raise SystemExit(f"{argv[0]} failed ({r.exit_code}): {r.stderr}")
    if stdout_to:
        Path(stdout_to).write_text(r.stdout)

def pipeline(base, aligned, a1, a2, run):
    call(["compute-projections", base, aligned, "-o", f"{run}/cache", "-a", a1, "-a", a2,
          "--device", "cpu", "--quiet"])
    call(["patch", a1, a2, "-p", f"{run}/cache", "-o", f"{run}/batch", "-k", "3", "--json"],
         stdout_to=f"{run}/patch.jsonl")
    call(["patch", a1, "--base", base, "--aligned", aligned, "-o", f"{run}/stream",
          "--fraction", "0.5", "--device", "cpu", "-q"])
    call(["inspect", a1, "-p", f"{run}/cache", "--json"], stdout_to=f"{run}/inspect.jsonl")

if __name__ == "__main__":
    pipeline(*sys.argv[1:])
"""


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``; directories as "dir"."""
    return {
        str(p.relative_to(root)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    pair = factory.make_pair(tmp_path, shards=2)
    a1 = factory.write_adapter(
        tmp_path / "adapter", base=pair.base, targets=("q_proj", "v_proj", "up_proj")
    )
    a2 = factory.write_adapter(
        tmp_path / "second", base=pair.base, targets=("q_proj", "down_proj"), seed=3, r=2
    )
    return {"base": pair.base_dir, "aligned": pair.aligned_dir, "a1": a1, "a2": a2}


def test_two_runs_are_byte_identical(tmp_path: Path, inputs: dict[str, Path]) -> None:
    script = tmp_path / "pipeline.py"
    script.write_text(PIPELINE)
    args = [str(inputs[k]) for k in ("base", "aligned", "a1", "a2")]
    run = tmp_path / "run"
    run.mkdir()

    # First run: in this process.
    ns: dict[str, object] = {}
    exec(compile(PIPELINE, str(script), "exec"), ns)  # the script above
    ns["pipeline"](*args, str(run))  # type: ignore[operator]
    first = tree(run)
    run.rename(tmp_path / "run1")

    # Second run: a fresh interpreter with a different string-hash seed, same paths.
    run.mkdir()
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    env = {
        **os.environ,
        "PYTHONHASHSEED": seed,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    proc = subprocess.run(
        [sys.executable, str(script), *args, str(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = tree(run)

    assert first.keys() == second.keys()
    differ = sorted(k for k in first if first[k] != second[k])
    assert not differ, differ
    # The comparison covers what the issue names: caches, adapters and reports.
    for name in (
        "cache/manifest.json",
        "batch/adapter/adapter_model.safetensors",
        "batch/second/safelora_report.json",
        "stream/adapter_model.safetensors",
        "stream/safelora_report.json",
        "patch.jsonl",
        "inspect.jsonl",
    ):
        assert name in first, name
    assert len([k for k in first if k.startswith("cache/")]) >= 8
    # Reports carry no timestamps (nothing that looks like a date or an epoch time).
    report = (run / "stream" / "safelora_report.json").read_text()
    assert not any(w in report.lower() for w in ('"time', "timestamp", '"date', "created"))


def test_incremental_cache_equals_one_shot(tmp_path: Path, inputs: dict[str, Path]) -> None:
    runner = CliRunner()
    base, aligned = str(inputs["base"]), str(inputs["aligned"])

    def compute(out: Path, targets: str) -> None:
        r = runner.invoke(
            app,
            [
                *("compute-projections", base, aligned, "-o", str(out)),
                *("--targets", targets, "--device", "cpu", "-q"),
            ],
        )
        assert r.exit_code == 0, r.stderr

    one = tmp_path / "c"
    compute(one, "v_proj,q_proj,down_proj")
    one_shot = tree(one)
    one.rename(tmp_path / "one-shot")
    compute(one, "down_proj")
    compute(one, "q_proj")
    compute(one, "q_proj,v_proj")
    assert tree(one) == one_shot
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["state"] == "complete" and len(manifest["weights"]) == 6


def test_patch_twice_into_same_path_is_identical(tmp_path: Path, inputs: dict[str, Path]) -> None:
    runner = CliRunner()
    base, aligned = str(inputs["base"]), str(inputs["aligned"])
    out = tmp_path / "out"
    argv = ["patch", str(inputs["a2"]), "--base", base, "--aligned", aligned, "-o", str(out)]
    r = runner.invoke(app, [*argv, "-t", "0.9", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.stderr
    first, first_json = tree(out), r.stdout
    r = runner.invoke(app, [*argv, "-t", "0.9", "--device", "cpu", "--json", "--force"])
    assert r.exit_code == 0, r.stderr
    assert tree(out) == first
    assert r.stdout == first_json
