"""Atomicity under SIGKILL (issue 6): no half-written adapter, caches resumable or refused.

Real processes are killed: a small driver (written to ``tmp_path``, run with the venv's
python) imports safelora once, then for every kill point ``fork()``s a child that runs the
real CLI (``safelora_cli.cli.app``) with one library-level OS call wrapped so that the N-th
call SIGKILLs the process, just *before* or just *after* that call. The wrapped calls are the
ones every durable step goes through: ``os.replace`` / ``os.rename`` (publishing a file or a
directory) and ``os.fsync`` (making bytes durable). A first, unkilled run counts the calls, so
every rename point is hit (the product code carries no test hook).

After each kill the test checks the state left on disk, then the driver reruns the same
command without a hook:

- ``compute-projections``: the cache directory is absent, or its manifest is valid, names
  only complete entries and is marked in progress (``ProjectionCache.open`` refuses it: a
  ``patch -p`` would say "incomplete"), unless the kill came after the final "complete"
  manifest. Nothing but the manifest, named entries and ``.tmp-`` files is inside it. The rerun
  resumes it to a cache byte-identical to an uninterrupted run.
- ``patch``: the output is absent or a complete adapter byte-identical to an uninterrupted
  run (a ``--force`` replacement: the old or the new adapter, never a mix; the old one is never
  lost). Anything else beside it is a hidden, clearly named ``.out.safelora-*`` directory. The
  rerun succeeds and gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from safelora_cli.cache import ProjectionCache
from safelora_cli.errors import CacheError
from tests import factory

DRIVER = textwrap.dedent(
    r"""
    import importlib, json, os, shutil, signal, sys

    import torch

    # Everything is imported and torch warmed up once, before any fork, single-threaded (no
    # OpenMP pool in the parent: forking a process with one is unsafe).
    torch.set_num_threads(1)
    torch.mm(torch.ones(4, 4), torch.ones(4, 4))
    from safelora_cli.cli import app
    import safelora_cli.adapter, safelora_cli.cache, safelora_cli.compute  # noqa: E401,F401
    import safelora_cli.patch, safelora_cli.scoring, safelora_cli.sources  # noqa: E401,F401

    def install(target, n, when):
        mod_name, attr = target.rsplit(".", 1)
        mod = importlib.import_module(mod_name)
        real = getattr(mod, attr)
        count = [0]

        def hooked(*a, **k):
            count[0] += 1
            if when == "before" and count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            r = real(*a, **k)
            if when == "after" and count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return r

        setattr(mod, attr, hooked)

    def counting(targets, counts):
        for target in targets:
            mod_name, attr = target.rsplit(".", 1)
            mod = importlib.import_module(mod_name)
            real = getattr(mod, attr)

            def hooked(*a, _real=real, _t=target, **k):
                counts[_t] = counts.get(_t, 0) + 1
                return _real(*a, **k)

            setattr(mod, attr, hooked)

    def run(argv, log, hook=None, count=None):
        pid = os.fork()
        if pid == 0:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            counts = {}
            if hook:
                install(*hook)
            if count:
                counting(count, counts)
            code = 0
            try:
                app(args=argv, prog_name="safelora", standalone_mode=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            if count:
                with open(log + ".counts", "w") as f:
                    json.dump(counts, f)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            return {"signal": os.WTERMSIG(status), "code": None}
        return {"signal": None, "code": os.WEXITSTATUS(status)}

    def argv_for(template, out):
        return [a.replace("{OUT}", out) for a in template]

    def do(plan):
        work = plan["work"]
        os.makedirs(work, exist_ok=True)

        def fresh(name):
            d = os.path.join(work, name)
            os.makedirs(d)
            out = os.path.join(d, "out")
            if plan.get("prepare_from"):
                shutil.copytree(plan["prepare_from"], out)
            return d, out

        results = {"runs": []}
        d, out = fresh("reference")
        log = os.path.join(d, "log")
        r = run(argv_for(plan["argv"], out), log, count=plan["sweep"])
        results["reference"] = {**r, "dir": d, "counts": json.load(open(log + ".counts"))}
        k = 0
        for target in plan["sweep"]:
            total = results["reference"]["counts"].get(target, 0)
            points = range(1, total + 1)
            if plan.get("max_points") and total > plan["max_points"]:
                step = -(-total // plan["max_points"])
                points = sorted(set(range(1, total + 1, step)) | {total})
            for n in points:
                for when in plan["when"].get(target, ["before", "after"]):
                    k += 1
                    d, out = fresh(f"k{k}")
                    killed = run(argv_for(plan["argv"], out), os.path.join(d, "log"),
                                 hook=(target, n, when))
                    snap = os.path.join(work, f"k{k}-after-kill")
                    shutil.copytree(d, snap, symlinks=True)
                    # Nothing left on disk: the rerun would be a fresh run (the reference).
                    left = [n for n in os.listdir(d) if n != "log"]
                    again = (
                        run(argv_for(plan["argv"], out), os.path.join(d, "log2"))
                        if left or plan.get("prepare_from")
                        else None
                    )
                    results["runs"].append({"target": target, "n": n, "when": when,
                                            "killed": killed, "rerun": again,
                                            "dir": d, "snap": snap})
        return results

    plans = json.load(open(sys.argv[1]))
    json.dump({name: do(plan) for name, plan in plans.items()}, open(sys.argv[2], "w"))
    """
)


def drive(tmp_path: Path, plans: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run the fork-and-kill driver on every plan (one process); results by plan name."""
    script = tmp_path / "kill_driver.py"
    script.write_text(DRIVER)
    plan_file = tmp_path / "plans.json"
    plan_file.write_text(json.dumps(plans))
    result_file = tmp_path / "results.json"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    env.pop("SAFELORA_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(plan_file), str(result_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result_file.read_text())


def _normal(value: Any) -> Any:
    """A report with the run's own output path left out (it differs between runs by design)."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if k != "output"}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (directories as "dir").

    ``safelora_report.json`` is hashed without its ``output`` field (the output path).
    """
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = "dir"
        elif p.name == "safelora_report.json":
            data = json.dumps(_normal(json.loads(p.read_text())), sort_keys=True)
            out[rel] = hashlib.sha256(data.encode()).hexdigest()
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def log_of(run_dir: str, name: str = "log") -> str:
    p = Path(run_dir) / name
    return p.read_text() if p.exists() else ""


def _input_hashes(inputs: dict[str, Path]) -> dict[str, str]:
    return {k: json.dumps(tree(v)) for k, v in inputs.items() if k != "root" and v.is_dir()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from typer.testing import CliRunner

    from safelora_cli.cli import app
    from safelora_cli.compute import compute_projections

    root = tmp_path_factory.mktemp("kill")
    pair = factory.make_pair(root, shards=2)
    adapter = factory.write_adapter(root / "adapter", base=pair.base)
    adapter2 = factory.write_adapter(root / "second", base=pair.base, seed=5)
    compute_projections(
        str(pair.base_dir), str(pair.aligned_dir), root / "cache", adapters=[adapter]
    )
    compute_projections(
        str(pair.base_dir), str(pair.aligned_dir), root / "cache_q", targets="q_proj"
    )
    # An earlier output (another selection) for --force to replace.
    prev = root / "previous"
    r = CliRunner().invoke(
        app, ["patch", str(adapter), "-p", str(root / "cache"), "-o", str(prev), "-k", "1"]
    )
    assert r.exit_code == 0, r.stderr
    return {
        "root": root,
        "base": pair.base_dir,
        "aligned": pair.aligned_dir,
        "adapter": adapter,
        "adapter2": adapter2,
        "cache": root / "cache",
        "cache_q": root / "cache_q",
        "previous": prev,
    }


@pytest.fixture(scope="module")
def killed(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every kill plan, run by one driver process (one interpreter start for all)."""
    work = tmp_path_factory.mktemp("kill-work")
    before = _input_hashes(inputs)
    cache, adapter = str(inputs["cache"]), str(inputs["adapter"])
    plans = {
        "compute": {
            "argv": [
                "compute-projections",
                str(inputs["base"]),
                str(inputs["aligned"]),
                "-o",
                "{OUT}",
                "--targets",
                "q_proj,down_proj",
                "--device",
                "cpu",
                "--quiet",
            ],
            "sweep": ["os.replace", "os.fsync"],
            "when": {"os.fsync": ["before"]},
            "max_points": 3,
        },
        # Extending an existing, complete cache (q_proj) with more weights.
        "extend": {
            "argv": [
                "compute-projections",
                str(inputs["base"]),
                str(inputs["aligned"]),
                "-o",
                "{OUT}",
                "--targets",
                "q_proj,down_proj",
                "--device",
                "cpu",
                "--quiet",
            ],
            "sweep": ["os.replace"],
            "when": {},
            "max_points": 3,
            "prepare_from": str(inputs["cache_q"]),
        },
        "patch": {
            "argv": ["patch", adapter, "-p", cache, "-o", "{OUT}", "-q"],
            "sweep": ["os.fsync", "safelora_cli.fsio.rename_noreplace"],
            "when": {"os.fsync": ["before"]},
            "max_points": 3,
        },
        "batch": {
            "argv": [
                "patch",
                adapter,
                str(inputs["adapter2"]),
                "--base",
                str(inputs["base"]),
                "--aligned",
                str(inputs["aligned"]),
                "-o",
                "{OUT}",
                "-q",
                "-k",
                "2",
            ],
            "sweep": ["safelora_cli.fsio.rename_noreplace", "os.fsync"],
            "when": {"os.fsync": ["before"]},
            "max_points": 2,
        },
        "force": {
            "argv": ["patch", adapter, "-p", cache, "-o", "{OUT}", "-q", "--force", "-k", "3"],
            "sweep": ["safelora_cli.fsio.exchange", "os.fsync"],
            "when": {"os.fsync": ["before"]},
            "max_points": 3,
            "prepare_from": str(inputs["previous"]),
        },
    }
    for name, plan in plans.items():
        plan["work"] = str(work / name)
    res = drive(work, plans)
    res["inputs_unchanged"] = _input_hashes(inputs) == before
    return res


def test_inputs_untouched_by_killed_runs(killed: dict[str, Any]) -> None:
    assert killed["inputs_unchanged"]


# ----------------------------------------------------------------------------- compute


def test_killed_compute_leaves_a_resumable_or_refused_cache(killed: dict[str, Any]) -> None:
    res = killed["compute"]
    ref = res["reference"]
    assert ref["code"] == 0, log_of(ref["dir"])
    assert ref["counts"]["os.replace"] >= 5  # manifest + 4 entries + final manifest at least
    ref_tree = tree(Path(ref["dir"]) / "out")
    assert "manifest.json" in ref_tree and len(ref_tree) == 5

    kills = 0
    for r in res["runs"]:
        where = f"{r['target']} #{r['n']} {r['when']}"
        if r["killed"]["signal"] is None:
            continue  # the hook point was not reached in this run
        kills += 1
        assert r["killed"]["signal"] == 9, where
        snap = Path(r["snap"])
        out = snap / "out"
        siblings = sorted(p.name for p in snap.iterdir() if p.name not in ("out", "log"))
        # A half-made cache directory is only ever a hidden, clearly named temporary (and the
        # writer's lock file).
        assert all(s.startswith(".out.safelora-") for s in siblings), (where, siblings)
        if out.exists():
            _check_killed_cache(out, ref_tree, where)
        if r["rerun"] is None:
            assert not out.exists() and not siblings, where
            continue
        # The same command again resumes to exactly the uninterrupted result, and removes the
        # killed run's temporary directory.
        assert r["rerun"]["code"] == 0, (where, log_of(r["dir"], "log2"))
        assert tree(Path(r["dir"]) / "out") == ref_tree, where
        assert not [p for p in Path(r["dir"]).iterdir() if p.name.startswith(".out.")], where
    assert kills >= 6


def test_killed_extension_keeps_the_cache_resumable(killed: dict[str, Any]) -> None:
    res = killed["extend"]
    ref = res["reference"]
    assert ref["code"] == 0, log_of(ref["dir"])
    ref_tree = tree(Path(ref["dir"]) / "out")
    assert len(ref_tree) == 5
    kills = 0
    for r in res["runs"]:
        where = f"{r['target']} #{r['n']} {r['when']}"
        if r["killed"]["signal"] is None:
            continue
        kills += 1
        out = Path(r["snap"]) / "out"
        # The cache never disappears and never loses the entries it had.
        assert out.is_dir(), where
        manifest = json.loads((out / "manifest.json").read_text())
        assert all(w.endswith("q_proj.weight") or "down_proj" in w for w in manifest["weights"])
        assert sum(w.endswith("q_proj.weight") for w in manifest["weights"]) == 2, where
        _check_killed_cache(out, ref_tree, where)
        assert r["rerun"]["code"] == 0, (where, log_of(r["dir"], "log2"))
        assert tree(Path(r["dir"]) / "out") == ref_tree, where
    assert kills >= 4


def _check_killed_cache(out: Path, ref_tree: dict[str, str], where: str) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    named = {e["file"] for e in manifest["weights"].values()}
    for p in out.iterdir():
        if p.name == "manifest.json" or p.name.startswith(".tmp-"):
            continue
        # Every other file is a complete entry, identical to the uninterrupted run's: those
        # the manifest names, and at most one renamed into place just before the kill and not
        # yet named (the rerun recomputes and replaces it).
        assert p.name in ref_tree, (where, p.name)
        assert hashlib.sha256(p.read_bytes()).hexdigest() == ref_tree[p.name], (where, p.name)
    assert named <= {p.name for p in out.iterdir()}, where
    if manifest["state"] == "complete":
        # Complete: the finished cache, or (extending a cache) the one it was before; either
        # way usable as it is.
        with ProjectionCache.open(out) as cache:
            assert set(cache.weights()) == set(manifest["weights"]), where
    else:
        assert manifest["state"] == "in_progress", where
        with pytest.raises(CacheError, match="incomplete"):
            ProjectionCache.open(out)


# ----------------------------------------------------------------------------- patch


def _check_patch_runs(res: dict[str, Any], *, old: dict[str, str] | None) -> int:
    ref = res["reference"]
    assert ref["code"] == 0, log_of(ref["dir"])
    ref_tree = tree(Path(ref["dir"]) / "out")
    assert any(k.endswith("adapter_model.safetensors") for k in ref_tree)
    kills = 0
    for r in res["runs"]:
        where = f"{r['target']} #{r['n']} {r['when']}"
        if r["killed"]["signal"] is None:
            continue
        kills += 1
        snap = Path(r["snap"])
        out = snap / "out"
        hidden = [p for p in snap.iterdir() if p.name not in ("out", "log")]
        for p in hidden:
            assert p.name.startswith((".out.safelora-tmp-", ".out.safelora-old-")) or (
                p.name == ".out.safelora-lock" and p.is_file()
            ), (where, p)
        got = tree(out) if out.exists() else None
        if got is not None:
            assert got in (ref_tree, old), (where, sorted(got))
        elif old is not None:
            # No output: the old one must survive, moved aside intact, while the new one was
            # being put in place.
            olds = [
                p for p in hidden if p.name.startswith((".out.safelora-old-", ".out.safelora-tmp-"))
            ]
            assert any(tree(p) == old for p in olds), (where, "the old output was lost")
        rerun, log2 = r["rerun"], log_of(r["dir"], "log2")
        if rerun is None:
            assert got is None and not hidden, where
        elif got == ref_tree and old is None:
            # Finished before the kill: the output is complete, so a rerun (no --force) refuses
            # to overwrite it and leaves it alone.
            assert rerun["code"] == 1 and "already exists" in log2, (where, log2)
            assert tree(Path(r["dir"]) / "out") == ref_tree, where
        else:
            # Leftover hidden temporaries do not disturb the rerun: same bytes, and the killed
            # run's staging directories are removed (a moved-aside original stays until the
            # output exists again, so it is never the only copy lost).
            assert rerun["code"] == 0, (where, log2)
            assert tree(Path(r["dir"]) / "out") == ref_tree, where
            left = [
                p.name
                for p in Path(r["dir"]).iterdir()
                if ".safelora-tmp-" in p.name or ".safelora-lock" in p.name
            ]
            assert not left, (where, left)
    return kills


def test_killed_patch_never_leaves_a_partial_adapter(killed: dict[str, Any]) -> None:
    res = killed["patch"]
    assert _check_patch_runs(res, old=None) >= 4
    # The hook really kills: before the first rename nothing is in place yet.
    first = next(
        r
        for r in res["runs"]
        if r["target"] == "safelora_cli.fsio.rename_noreplace" and r["when"] == "before"
    )
    assert first["killed"] == {"signal": 9, "code": None}
    assert not (Path(first["snap"]) / "out").exists()


def test_killed_batch_patch_is_all_or_nothing(killed: dict[str, Any]) -> None:
    assert _check_patch_runs(killed["batch"], old=None) >= 3


def test_killed_forced_replacement_keeps_old_or_new(
    killed: dict[str, Any], inputs: dict[str, Path]
) -> None:
    res = killed["force"]
    # One atomic swap (RENAME_EXCHANGE): the old output ends up under the staging name.
    assert res["reference"]["counts"]["safelora_cli.fsio.exchange"] == 1
    assert _check_patch_runs(res, old=tree(inputs["previous"])) >= 3


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_only_this_hosts_dead_runs_are_cleaned(tmp_path: Path) -> None:
    """Stale-temporary cleanup never touches a live run's or another machine's staging."""
    from safelora_cli import cache as cache_mod
    from safelora_cli import output as output_mod

    host, dead, live = output_mod.host(), _dead_pid(), os.getpid()
    target = tmp_path / "out"
    names = {
        f".out.safelora-tmp-{host}-{dead}-abc": False,  # killed here: removed
        f".out.safelora-tmp-{host}-{live}-abc": True,  # running here: kept
        f".out.safelora-tmp-otherhost-{dead}-abc": True,  # another machine's: kept
        f".out.safelora-old-{host}-{dead}-abc": True,  # the only copy while out is absent
        ".out.safelora-tmp-abc": True,  # not ours to judge
    }
    for n in names:
        (tmp_path / n).mkdir()
    output_mod.clean_stale(target)
    assert {n: (tmp_path / n).exists() for n in names} == names
    target.mkdir()  # the output exists again: the moved-aside original can go
    output_mod.clean_stale(target)
    assert not (tmp_path / f".out.safelora-old-{host}-{dead}-abc").exists()

    cache = tmp_path / "cache"
    tmps = {
        f".cache.safelora-tmp-{host}-{dead}-abc": False,
        f".cache.safelora-tmp-{host}-{live}-abc": True,
        f".cache.safelora-tmp-otherhost-{dead}-abc": True,
    }
    for n in tmps:
        (tmp_path / n).mkdir()
    cache_mod._clean_stale_tmp(cache)
    assert {n: (tmp_path / n).exists() for n in tmps} == tmps
