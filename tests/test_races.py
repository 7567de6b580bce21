"""Races on outputs and interrupted ``--force`` (issue 15, categories 3 and 5).

Two kinds of tests:

- In-process cases (typer's CliRunner): a directory appears at ``-o`` while the run is writing,
  an earlier output is swapped for a stranger's directory before ``--force`` replaces it,
  another process holds the output's or the cache's lock. Each asserts the exit code, the
  message, that nothing was written and that every input (and the stranger's directory) is
  byte-identical.
- A fork-based harness (tests/races_driver.py: safelora imported once, every run a forked
  child of the real CLI): two ``patch`` runs with one ``-o`` released at the same instant, two
  ``compute-projections`` into one new cache, and ``patch --force`` killed (SIGKILL) or
  interrupted (SIGINT) before and after every exchange / no-replace rename / fsync, with and
  without ``RENAME_EXCHANGE``. The default run does each race and kill point once; the
  ``races`` marker (``pytest -m races``, run by .ci/run) repeats each 20 times.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from safelora_cli import fsio
from safelora_cli.cli import app
from safelora_cli.compute import compute_projections
from tests import factory
from tests._trees import tree

REPO = Path(__file__).resolve().parent.parent
REPEATS = 20


# ----------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, Any]:
    """Everything under ``root`` (iterative, links not followed): bytes, modes, mtimes."""
    out: dict[str, Any] = {}
    stack = [root]
    while stack:
        d = stack.pop()
        for entry in os.scandir(d):
            p = Path(entry.path)
            rel = str(p.relative_to(root))
            if entry.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif entry.is_dir(follow_symlinks=False):
                out[rel] = ("dir",)
                stack.append(p)
            elif entry.is_file(follow_symlinks=False):
                st = p.stat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("file", digest, st.st_size, st.st_mode, st.st_mtime_ns)
            else:
                out[rel] = ("special", entry.stat(follow_symlinks=False).st_mode)
    return out


def clean_error(r: Any, *must: str, code: int = 1) -> str:
    """Assert a clean one-line error (plus hint) with exit ``code``; returns stderr."""
    err = r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), (r.exception, err)
    assert r.exit_code == code, (r.exit_code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error:"), err
    assert 2 <= len(lines) <= 5, err
    for s in must:
        assert s in err, (s, err)
    assert r.stdout == "", r.stdout
    return err


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("races") / "world"
    root.mkdir()
    pair = factory.make_pair(root)
    adapter = factory.write_adapter(root / "adapter", base=pair.base)
    adapter2 = factory.write_adapter(root / "second", base=pair.base, seed=5)
    compute_projections(
        str(pair.base_dir), str(pair.aligned_dir), root / "cache", adapters=[adapter]
    )
    prev = root / "previous"
    r = CliRunner().invoke(
        app, ["patch", str(adapter), "-p", str(root / "cache"), "-o", str(prev), "-k", "1", "-q"]
    )
    assert r.exit_code == 0, r.stderr
    return {
        "root": root,
        "base": pair.base_dir,
        "aligned": pair.aligned_dir,
        "adapter": adapter,
        "adapter2": adapter2,
        "cache": root / "cache",
        "previous": prev,
    }


@pytest.fixture
def world(pristine: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "world"
    shutil.copytree(pristine["root"], root, symlinks=True)
    return {k: root / v.relative_to(pristine["root"]) for k, v in pristine.items()}


def patch_argv(w: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["patch", str(w["adapter"]), "-p", str(w["cache"]), "-o", str(out), "-q", *extra]


def stranger(d: Path) -> None:
    """A directory someone else made: not an adapter output, not empty."""
    d.mkdir()
    (d / "precious.txt").write_text("not safelora's\n")


def hook_write(mp: pytest.MonkeyPatch, during: Any) -> None:
    """Run ``during()`` once, while the first output is being staged."""
    import safelora_cli.patch as patch_mod

    real = patch_mod.write_adapter_dir
    done = [False]

    def write(s: Any, dest: Path) -> None:
        if not done[0]:
            done[0] = True
            during()
        real(s, dest)

    mp.setattr(patch_mod, "write_adapter_dir", write)


# ----------------------------------------------------------------------------- in-process


def test_directory_appearing_at_o_is_left_alone(
    world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = world["root"] / "out"
    before = snapshot(world["root"])
    hook_write(monkeypatch, lambda: stranger(out))
    r = CliRunner().invoke(app, patch_argv(world, out))
    monkeypatch.undo()
    clean_error(r, str(out), "appeared while this run was writing it")
    assert (out / "precious.txt").read_text() == "not safelora's\n"
    after = snapshot(world["root"])
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before


def test_force_never_replaces_a_directory_swapped_in_after_planning(
    world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--force planned to replace an earlier output; a stranger's directory took its place."""
    out = world["previous"]
    before = snapshot(world["root"])

    def swap() -> None:
        shutil.rmtree(out)
        stranger(out)

    hook_write(monkeypatch, swap)
    r = CliRunner().invoke(app, patch_argv(world, out, "--force"))
    monkeypatch.undo()
    clean_error(r, str(out), "no longer an earlier output")
    assert sorted(os.listdir(out)) == ["precious.txt"]
    after = snapshot(world["root"])
    assert {k for k in after if not k.startswith("previous")} == {
        k for k in before if not k.startswith("previous")
    }
    assert [k for k in after if k.startswith("previous")] == ["previous", "previous/precious.txt"]


def test_force_swap_checks_what_it_swapped_out(
    world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stranger's directory lands between the last check and the exchange: swapped back."""
    out = world["previous"]
    before = snapshot(world["root"])
    real = fsio.exchange
    calls = [0]

    def exchange(a: Any, b: Any) -> bool:
        calls[0] += 1
        if calls[0] == 1:
            shutil.rmtree(out)
            stranger(out)
        return real(a, b)

    monkeypatch.setattr(fsio, "exchange", exchange)
    r = CliRunner().invoke(app, patch_argv(world, out, "--force"))
    monkeypatch.undo()
    clean_error(r, str(out), "no longer an earlier output")
    assert calls[0] == 2  # swapped, checked, swapped back
    assert sorted(os.listdir(out)) == ["precious.txt"]
    after = snapshot(world["root"])
    assert {k for k in after if not k.startswith("previous")} == {
        k for k in before if not k.startswith("previous")
    }


def test_batch_target_appearing_rolls_the_batch_back(
    world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--force into an existing batch; one target (absent when planned) appears meanwhile."""
    out = world["root"] / "batch"
    argv = ["patch", str(world["adapter"]), str(world["adapter2"]), "-p", str(world["cache"])]
    argv += ["-o", str(out), "-q", "-k", "1"]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.stderr
    shutil.rmtree(out / "second")
    before = snapshot(world["root"])
    hook_write(monkeypatch, lambda: stranger(out / "second"))
    r = CliRunner().invoke(app, [*argv, "--force", "-k", "3"])
    monkeypatch.undo()
    clean_error(r, str(out / "second"), "left as it is")
    after = snapshot(world["root"])
    assert sorted(os.listdir(out / "second")) == ["precious.txt"]
    # The other target was swapped in and back: the same bytes as before the run.
    assert {k: v for k, v in after.items() if "second" not in k or "batch" not in k} == {
        k: v for k, v in before.items() if "second" not in k or "batch" not in k
    }
    assert sorted(os.listdir(world["root"])) == sorted(os.listdir(world["root"]))
    assert not [n for n in os.listdir(world["root"]) if ".safelora-" in n]


def test_output_lock_held_by_another_process(world: dict[str, Path]) -> None:
    out = world["root"] / "out"
    lock = fsio.lock_beside(out)  # as a concurrent run holds it (flock is per open file)
    try:
        before = snapshot(world["root"])
        r = CliRunner().invoke(app, patch_argv(world, out))
        clean_error(r, str(out), "being written by another safelora process", f"pid {os.getpid()}")
        assert snapshot(world["root"]) == before
    finally:
        lock.release()
    assert not [n for n in os.listdir(world["root"]) if n.startswith(".out")]


def test_cache_lock_held_by_another_process(world: dict[str, Path]) -> None:
    cache = world["cache"]
    lock = fsio.lock_beside(cache)
    try:
        before = snapshot(world["root"])
        argv = ["compute-projections", str(world["base"]), str(world["aligned"]), "-o"]
        argv += [str(cache), "--targets", "q_proj,k_proj", "--device", "cpu", "-q"]
        r = CliRunner().invoke(app, argv)
        clean_error(r, str(cache), "being written by another safelora process")
        assert snapshot(world["root"]) == before
    finally:
        lock.release()


def test_cache_appearing_while_being_created(
    world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory made at -o between the checks and the rename of the new cache."""
    new = world["root"] / "new-cache"
    before = snapshot(world["root"])
    real = fsio.rename_noreplace

    def rename(a: Any, b: Any) -> None:
        if Path(b) == new:
            stranger(new)
        real(a, b)

    monkeypatch.setattr(fsio, "rename_noreplace", rename)
    argv = ["compute-projections", str(world["base"]), str(world["aligned"]), "-o", str(new)]
    r = CliRunner().invoke(app, [*argv, "--targets", "q_proj", "--device", "cpu", "-q"])
    monkeypatch.undo()
    clean_error(r, str(new), "appeared while this run was creating the cache")
    assert sorted(os.listdir(new)) == ["precious.txt"]
    after = snapshot(world["root"])
    assert {k: v for k, v in after.items() if not k.startswith("new-cache")} == before


def test_orphaned_original_is_named_then_replaced_with_force(world: dict[str, Path]) -> None:
    """A --force run (without RENAME_EXCHANGE) killed between its renames left the previous
    output moved aside and no output: the next run names it; --force replaces it."""
    out = world["previous"]
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    aside = out.parent / f".previous{fsio.OLD_TAG}{fsio.host()}-{dead}-abcd"
    os.rename(out, aside)
    before = snapshot(world["root"])
    r = CliRunner().invoke(app, patch_argv(world, out))
    clean_error(r, str(aside), "is missing", f"mv {aside} {out}")
    assert snapshot(world["root"]) == before
    r = CliRunner().invoke(app, patch_argv(world, out, "--force"))
    assert r.exit_code == 0, r.stderr
    assert (out / "adapter_model.safetensors").is_file() and not aside.exists()


# ----------------------------------------------------------------------------- the harness


def drive(tmp_path: Path, pristine: dict[str, Path], reps: int) -> dict[str, Any]:
    adapter, cache = str(pristine["adapter"]), str(pristine["cache"])
    force = ["patch", adapter, "-p", cache, "-o", "{OUT}", "-q", "--force", "-k", "3"]
    jobs = [
        {
            "kind": "pair",
            "name": "patch-pair",
            "argv": ["patch", adapter, "-p", cache, "-o", "{OUT}", "-q"],
            "reps": reps,
        },
        {
            "kind": "pair",
            "name": "compute-pair",
            "argv": [
                "compute-projections",
                str(pristine["base"]),
                str(pristine["aligned"]),
                "-o",
                "{OUT}",
                "--targets",
                "q_proj",
                "--device",
                "cpu",
                "--quiet",
            ],
            "reps": reps,
        },
        {
            "kind": "kill",
            "name": "force-exchange",
            "argv": force,
            "prepare_from": str(pristine["previous"]),
            "sweep": ["safelora_cli.fsio.exchange", "os.fsync"],
            "when": {"os.fsync": ["before"]},
            "max_points": {"os.fsync": 2},
            "signals": ["SIGKILL", "SIGINT"],
            "signals_for": {"os.fsync": ["SIGKILL"]},
            "reps": reps,
        },
        {
            "kind": "kill",
            "name": "force-fallback",
            "argv": force,
            "prepare_from": str(pristine["previous"]),
            "fallback": True,
            "sweep": ["safelora_cli.fsio.rename_noreplace"],
            "when": {},
            "signals": ["SIGKILL", "SIGINT"],
            "reps": reps,
        },
    ]
    work = tmp_path / "work"
    work.mkdir()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"work": str(work), "jobs": jobs}))
    result = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("SAFELORA_DEBUG", None)
    before = {k: snapshot(v) for k, v in pristine.items() if k != "root"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "races_driver.py"), str(plan), str(result)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(result.read_text())
    res["inputs_unchanged"] = before == {k: snapshot(v) for k, v in pristine.items() if k != "root"}
    return res


@pytest.fixture(scope="module")
def once(pristine: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return drive(tmp_path_factory.mktemp("races-once"), pristine, 1)


@pytest.fixture(scope="module")
def repeated(pristine: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return drive(tmp_path_factory.mktemp("races-repeated"), pristine, REPEATS)


def _loser_ok(code: dict[str, Any], log: str, allowed: tuple[str, ...]) -> None:
    assert code == {"signal": None, "code": 1}, (code, log)
    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and len(lines) <= 5, log
    assert any(a in log for a in allowed), log
    assert "Traceback" not in log and "internal error" not in log, log


def check_patch_pair(res: dict[str, Any], reps: int) -> None:
    ref = res["reference"]
    assert ref["code"] == 0 and ref["tree"], ref["log"]
    assert len(res["reps"]) == reps
    for i, rep in enumerate(res["reps"]):
        codes = [c["code"] for c in rep["codes"]]
        assert sorted(codes) == [0, 1], (i, rep["codes"], rep["logs"])
        loser = codes.index(1)
        _loser_ok(
            rep["codes"][loser],
            rep["logs"][loser],
            ("already exists", "being written by another safelora process", "appeared while"),
        )
        assert rep["out"] == ref["tree"], i
        assert rep["hidden"] == {}, (i, rep["hidden"])


def check_compute_pair(res: dict[str, Any], reps: int) -> None:
    ref = res["reference"]
    assert ref["code"] == 0 and ref["tree"], ref["log"]
    assert len(res["reps"]) == reps
    for i, rep in enumerate(res["reps"]):
        codes = [c["code"] for c in rep["codes"]]
        assert 0 in codes and set(codes) <= {0, 1}, (i, rep["codes"], rep["logs"])
        for c, log in zip(rep["codes"], rep["logs"], strict=True):
            if c["code"] == 1:
                _loser_ok(c, log, ("being written by another safelora process",))
        # Never corrupted: exactly the cache one uninterrupted run builds.
        assert rep["out"] == ref["tree"], i
        assert rep["hidden"] == {}, (i, rep["hidden"])


def check_force_kills(res: dict[str, Any], old: dict[str, str], reps: int, points: int) -> None:
    ref = res["reference"]
    assert ref["code"] == 0, ref["log"]
    new = ref["tree"]
    assert new and new != old
    runs = res["runs"]
    assert len(runs) >= points * reps, len(runs)
    for row in runs:
        where = row["point"]
        sig = where[3]
        after = row["after"]
        if sig == "SIGKILL":
            assert row["killed"]["signal"] == 9, (where, row["killed"], row["log"])
        else:
            assert row["killed"] == {"signal": None, "code": 130}, (where, row["log"])
            assert "Traceback" not in row["log"], row["log"]
            assert after["hidden"] == {}, (where, after["hidden"])  # the same clean-up
        assert after["out"] in (old, new), (where, after["out"])
        for name in after["hidden"]:
            assert name.startswith(".out.safelora-"), (where, name)
        if "plain" not in row:
            continue
        # The next run without --force refuses, leaving everything as it was.
        assert row["plain"]["code"] == 1, (where, row["plain"]["log"])
        assert "already exists" in row["plain"]["log"], row["plain"]["log"]
        assert row["plain_state"] == after, where
        # With --force: the new output, nothing else left beside it.
        assert row["forced"]["code"] == 0, (where, row["forced"]["log"])
        assert row["final"] == {"out": new, "hidden": {}}, (where, row["final"])


def check_fallback_kills(res: dict[str, Any], old: dict[str, str], reps: int) -> None:
    ref = res["reference"]
    assert ref["code"] == 0, ref["log"]
    assert ref["counts"]["safelora_cli.fsio.rename_noreplace"] == 2  # old aside, new in place
    new = ref["tree"]
    runs = res["runs"]
    assert len(runs) == 2 * 2 * 2 * reps
    orphaned = 0
    for row in runs:
        where = row["point"]
        after = row["after"]
        olds = [v for k, v in after["hidden"].items() if k.startswith(".out.safelora-old-")]
        if where[3] == "SIGINT":
            assert row["killed"] == {"signal": None, "code": 130}, (where, row["log"])
            assert after["out"] in (old, new) and after["hidden"] == {}, (where, after)
        else:
            assert after["out"] in (old, new, None), where
            if after["out"] is None:
                orphaned += 1
                assert olds == [old], (where, after["hidden"])  # moved aside, intact
        if "plain" not in row:
            continue
        plain = row["plain"]
        assert plain["code"] == 1, (where, plain["log"])
        if after["out"] is None:
            # Names where the previous output is, and how to restore it.
            aside = next(k for k in after["hidden"] if k.startswith(".out.safelora-old-"))
            assert aside in plain["log"] and "mv " in plain["log"], plain["log"]
        else:
            assert "already exists" in plain["log"], plain["log"]
        assert row["plain_state"] == after, where
        assert row["forced"]["code"] == 0, (where, row["forced"]["log"])
        assert row["final"] == {"out": new, "hidden": {}}, (where, row["final"])
    assert orphaned >= reps  # SIGKILL after the first rename: the case being tested


def check_all(res: dict[str, Any], pristine: dict[str, Path], job: str, reps: int) -> None:
    assert res["inputs_unchanged"]
    old = tree(pristine["previous"])
    assert old is not None
    if job == "patch-pair":
        check_patch_pair(res[job], reps)
    elif job == "compute-pair":
        check_compute_pair(res[job], reps)
    elif job == "force-exchange":
        # exchange before/after under two signals + 2 fsync points under SIGKILL
        check_force_kills(res[job], old, reps, points=2 * 2 + 2)
    else:
        check_fallback_kills(res[job], old, reps)


JOBS = ["patch-pair", "compute-pair", "force-exchange", "force-fallback"]


@pytest.mark.parametrize("job", JOBS)
def test_race_and_kill_points_once(
    once: dict[str, Any], pristine: dict[str, Path], job: str
) -> None:
    check_all(once, pristine, job, 1)


@pytest.mark.races
@pytest.mark.parametrize("job", JOBS)
def test_race_and_kill_points_repeated(
    repeated: dict[str, Any], pristine: dict[str, Path], job: str
) -> None:
    check_all(repeated, pristine, job, REPEATS)
