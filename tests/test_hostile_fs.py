"""Hostile and careless file systems (issue 15: symlinks, pathological trees, cache integrity,
scale; issue 18: output permissions).

Every error case runs the real CLI (typer's CliRunner) on a private copy of a tiny world and
asserts: the exit code, a clean ``error:`` line plus hint naming the file, no traceback, no
"internal error", nothing written anywhere under the world and every input byte-identical
(a snapshot of every file's bytes, mode and mtime, taken without following links). Cases
with FIFOs run under an alarm: a blocking read would fail the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from safelora_cli import fsio
from safelora_cli.cli import app
from safelora_cli.compute import compute_projections
from safelora_cli.output import MAX_TREE_DEPTH, clean_stale
from tests import factory

REPO = Path(__file__).resolve().parent.parent
Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"


# ----------------------------------------------------------------------------- the world


@dataclass
class World:
    root: Path
    base: Path
    aligned: Path
    adapter: Path
    cache: Path
    victim: Path  # a directory outside every input and output: must never change

    @property
    def out(self) -> Path:
        return self.root / "out"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> World:
    top = tmp_path_factory.mktemp("hostile")
    root = top / "world"
    root.mkdir()
    pair = factory.make_pair(root)
    adapter = factory.write_adapter(root / "adapter", base=pair.base)
    (adapter / "README.md").write_text("# an adapter\n")
    compute_projections(
        str(pair.base_dir), str(pair.aligned_dir), root / "cache", adapters=[adapter]
    )
    victim = root / "victim"
    victim.mkdir()
    (victim / "secret.txt").write_text("do not touch\n")
    earlier = victim / "earlier-output"  # looks like an adapter output: --force would take it
    earlier.mkdir()
    (earlier / "adapter_config.json").write_text("{}\n")
    return World(root, pair.base_dir, pair.aligned_dir, adapter, root / "cache", victim)


@pytest.fixture
def world(pristine: World, tmp_path: Path) -> Iterator[World]:
    root = tmp_path / "world"
    shutil.copytree(pristine.root, root, symlinks=True)
    w = World(
        root,
        *(
            root / p.relative_to(pristine.root)
            for p in (
                pristine.base,
                pristine.aligned,
                pristine.adapter,
                pristine.cache,
                pristine.victim,
            )
        ),
    )
    yield w
    _remove_deep(root)


def _remove_deep(root: Path) -> None:
    """Remove a tree that may be nested deeper than shutil.rmtree's recursion allows."""
    if not root.exists():
        return
    order: list[Path] = []
    stack = [root]
    while stack:
        d = stack.pop()
        order.append(d)
        for e in os.scandir(d):
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
            else:
                os.unlink(e.path)
    for d in reversed(order):
        os.rmdir(d)


def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` (iterative, links not followed, FIFOs never opened)."""
    out: dict[str, Any] = {}
    stack = [root]
    while stack:
        d = stack.pop()
        for e in os.scandir(d):
            p = Path(e.path)
            rel = str(p.relative_to(root))
            st = e.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode)
                stack.append(p)
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("file", digest, st.st_size, st.st_mode, st.st_mtime_ns)
            else:
                out[rel] = ("special", st.st_mode)
    return out


@contextlib.contextmanager
def alarm(seconds: int = 60) -> Iterator[None]:
    """Fail (instead of hanging) if something blocks, e.g. on a FIFO."""

    def ring(signum: int, frame: Any) -> None:
        raise TimeoutError("blocked: a FIFO or a lock was waited on")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def invoke(argv: list[str]) -> Any:
    with alarm():
        return CliRunner().invoke(app, argv)


def assert_clean_error(r: Any, must: tuple[str, ...], code: int = 1) -> None:
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


def patch_p(w: World, *extra: str, adapter: Path | None = None) -> list[str]:
    return ["patch", str(adapter or w.adapter), "-p", str(w.cache), "-o", str(w.out), *extra]


def compute_argv(w: World, out: Path, targets: str = "q_proj,k_proj") -> list[str]:
    return ["compute-projections", str(w.base), str(w.aligned), "-o", str(out), "--targets",
            targets, "--device", "cpu", "-q"]  # fmt: skip


def mksock(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    return s


def edit_entry(w: World, weight: str, fn: Callable[[dict[str, torch.Tensor], dict], Any]) -> Path:
    """Rewrite the cache entry file of ``weight`` with ``fn(tensors, metadata)`` applied."""
    m = json.loads((w.cache / "manifest.json").read_text())
    f = w.cache / m["weights"][weight]["file"]
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        meta = dict(h.metadata())
    t = load_file(str(f))
    fn(t, meta)
    save_file(t, str(f), metadata=meta)
    return f


# ----------------------------------------------------------------------------- error cases


@dataclass
class Case:
    id: str
    build: Callable[[World], list[str]]
    must: tuple[str, ...]
    code: int = 1


CASES: list[Case] = []


def case(id: str, *must: str, code: int = 1) -> Callable[..., Any]:
    def deco(fn: Callable[[World], list[str]]) -> Any:
        CASES.append(Case(id, fn, must, code))
        return fn

    return deco


# -- symlinks ---------------------------------------------------------------------------------


@case("symlink-o-to-a-directory", "symbolic link", "out")
def _(w: World) -> list[str]:
    (w.root / "out").symlink_to(w.victim / "earlier-output")
    return patch_p(w, "--force")


@case("symlink-o-dangling", "symbolic link", "out")
def _(w: World) -> list[str]:
    (w.root / "out").symlink_to(w.victim / "new-output")  # would create victim/new-output
    return patch_p(w)


@case("symlink-batch-target", "symbolic link", "adapter")
def _(w: World) -> list[str]:
    shutil.copytree(w.adapter, w.root / "second")
    w.out.mkdir()
    (w.out / "adapter").symlink_to(w.victim / "earlier-output")
    argv = ["patch", str(w.adapter), str(w.root / "second"), "-p", str(w.cache)]
    return [*argv, "-o", str(w.out), "--force"]


@case("symlink-lock-file-planted", "symlink", "out.safelora-lock")
def _(w: World) -> list[str]:
    (w.root / ".out.safelora-lock").symlink_to(w.victim / "secret.txt")
    return patch_p(w)


@case("symlink-cache-lock-planted", "symlink", "cache.safelora-lock")
def _(w: World) -> list[str]:
    (w.root / ".cache.safelora-lock").symlink_to(w.victim / "secret.txt")
    return compute_argv(w, w.cache)


# -- pathological trees -----------------------------------------------------------------------


@case("fifo-extra-file", "FIFO", "tokenizer.json", "not a regular file")
def _(w: World) -> list[str]:
    os.mkfifo(w.adapter / "tokenizer.json")
    return patch_p(w)


@case("fifo-nested-extra-file", "FIFO", "sub/deeper/pipe")
def _(w: World) -> list[str]:
    (w.adapter / "sub" / "deeper").mkdir(parents=True)
    os.mkfifo(w.adapter / "sub" / "deeper" / "pipe")
    return patch_p(w)


@case("fifo-adapter-weights", "FIFO", "adapter_model.safetensors")
def _(w: World) -> list[str]:
    (w.adapter / "adapter_model.safetensors").unlink()
    os.mkfifo(w.adapter / "adapter_model.safetensors")
    return ["inspect", str(w.adapter), "-p", str(w.cache)]


@case("fifo-adapter-config", "FIFO", "adapter_config.json")
def _(w: World) -> list[str]:
    (w.adapter / "adapter_config.json").unlink()
    os.mkfifo(w.adapter / "adapter_config.json")
    return patch_p(w)


@case("socket-in-adapter", "socket", "agent.sock")
def _(w: World) -> list[str]:
    w.__dict__["_sock"] = mksock(w.adapter / "agent.sock")  # kept open for the run
    return patch_p(w)


@case("char-device-as-adapter-weights", "character device", "adapter_model.safetensors")
def _(w: World) -> list[str]:
    (w.adapter / "adapter_model.safetensors").unlink()
    (w.adapter / "adapter_model.safetensors").symlink_to("/dev/zero")
    return patch_p(w)


@case("symlink-to-fifo-inside", "FIFO", ".pipe")
def _(w: World) -> list[str]:
    os.mkfifo(w.adapter / ".pipe")
    (w.adapter / "notes.txt").symlink_to(".pipe")
    return patch_p(w)


@case("symlink-loop-files", "broken or looping symlink", "a.txt")
def _(w: World) -> list[str]:
    (w.adapter / "a.txt").symlink_to("b.txt")
    (w.adapter / "b.txt").symlink_to("a.txt")
    return patch_p(w)


@case("symlink-loop-directory", "symlink to a directory", "sub/loop")
def _(w: World) -> list[str]:
    (w.adapter / "sub").mkdir()
    (w.adapter / "sub" / "loop").symlink_to("..")
    return patch_p(w)


@case("deeply-nested-adapter-tree", "nested more than", str(MAX_TREE_DEPTH))
def _(w: World) -> list[str]:
    # Deeper than Python's recursion limit: a recursive walk would die with RecursionError.
    fd = os.open(w.adapter, os.O_RDONLY)
    try:
        for _ in range(sys.getrecursionlimit() + 100):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("leaf.txt", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    return patch_p(w)


@case("fifo-cache-entry", "FIFO", "cache")
def _(w: World) -> list[str]:
    m = json.loads((w.cache / "manifest.json").read_text())
    f = w.cache / m["weights"][Q0]["file"]
    f.unlink()
    os.mkfifo(f)
    return patch_p(w)


@case("fifo-cache-manifest", "FIFO", "manifest.json")
def _(w: World) -> list[str]:
    (w.cache / "manifest.json").unlink()
    os.mkfifo(w.cache / "manifest.json")
    return ["inspect", str(w.adapter), "-p", str(w.cache)]


@case("fifo-base-checkpoint", "FIFO", "model.safetensors")
def _(w: World) -> list[str]:
    (w.base / "model.safetensors").unlink()
    os.mkfifo(w.base / "model.safetensors")
    return compute_argv(w, w.root / "new-cache")


# -- cache integrity --------------------------------------------------------------------------


@case("cache-entry-files-swapped", Q0, "does not match the manifest", Q1)
def _(w: World) -> list[str]:
    m = json.loads((w.cache / "manifest.json").read_text())
    a, b = (w.cache / m["weights"][q]["file"] for q in (Q0, Q1))
    tmp = w.cache / "swap"
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    return patch_p(w)


@case("cache-entry-copied-under-another-name", Q0, "safelora.weight", Q1)
def _(w: World) -> list[str]:
    # Layer 1's projector relabelled as layer 0's tensor: only its own metadata tells.
    m = json.loads((w.cache / "manifest.json").read_text())
    t = load_file(str(w.cache / m["weights"][Q1]["file"]))
    meta = dict(json.loads(_raw_header(w.cache / m["weights"][Q1]["file"]))["__metadata__"])
    save_file({Q0: t[Q1]}, str(w.cache / m["weights"][Q0]["file"]), metadata=meta)
    return patch_p(w)


@case("cache-entry-representation", Q0, "safelora.representation")
def _(w: World) -> list[str]:
    def flip(t: dict, meta: dict) -> None:
        meta["safelora.representation"] = "factor" if meta[
            "safelora.representation"] == "gram" else "gram"  # fmt: skip

    edit_entry(w, Q0, flip)
    return patch_p(w)


@case("cache-entry-orientation", Q0, "safelora.fan_in_fan_out")
def _(w: World) -> list[str]:
    edit_entry(w, Q0, lambda t, meta: meta.update({"safelora.fan_in_fan_out": "true"}))
    return patch_p(w)


@case("cache-entry-norm", Q0, "safelora.norm_v")
def _(w: World) -> list[str]:
    edit_entry(w, Q0, lambda t, meta: meta.update({"safelora.norm_v": "0.5"}))
    return patch_p(w)


@case("cache-entry-projector-kind", Q0, "safelora.projector")
def _(w: World) -> list[str]:
    edit_entry(w, Q0, lambda t, meta: meta.update({"safelora.projector": "something else"}))
    return patch_p(w)


@case("cache-entry-dtype", Q0, "F16", "F32")
def _(w: World) -> list[str]:
    edit_entry(w, Q0, lambda t, meta: t.update({Q0: t[Q0].half()}))
    return patch_p(w)


@case("cache-entry-extra-tensor", Q0, "the file holds")
def _(w: World) -> list[str]:
    edit_entry(w, Q0, lambda t, meta: t.update({"smuggled": torch.zeros(2)}))
    return patch_p(w)


# -- scale ------------------------------------------------------------------------------------


@case("emfile-opening-adapter", "Too many open files", "ulimit -n")
def _(w: World) -> list[str]:
    import safelora_cli.reader as reader_mod

    real = reader_mod.open_regular

    def emfile(path: Any) -> int:
        if "adapter_model" in str(path):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(path))
        return real(path)

    w.__dict__["_patches"] = [(reader_mod, "open_regular", emfile)]
    return patch_p(w)


@case("emfile-reading-adapter-config", "Too many open files", "ulimit -n", "adapter_config")
def _(w: World) -> list[str]:
    real = fsio.read_regular

    def emfile(path: Any, limit: int) -> bytes:
        if str(path).endswith("adapter_config.json"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(path))
        return real(path, limit)

    w.__dict__["_patches"] = [(fsio, "read_regular", emfile)]
    return patch_p(w)


def _raw_header(path: Path) -> str:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + n].decode()


def test_catalogue_size() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_a_clean_error(
    c: Case, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = c.build(world)
    for mod, name, fn in world.__dict__.get("_patches", []):
        monkeypatch.setattr(mod, name, fn)
    before = snapshot(world.root)
    r = invoke(argv)
    monkeypatch.undo()
    after = snapshot(world.root)
    assert_clean_error(r, c.must, c.code)
    added = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    assert after == before, f"added {added}, removed {gone}, changed {changed}"
    assert (world.victim / "secret.txt").read_text() == "do not touch\n"


# ----------------------------------------------------------------------------- writes


def test_planted_links_in_a_cache_are_never_written_through(world: World) -> None:
    """Links at the temporary names (old fixed ones and entry names) point at a victim file;
    extending the cache replaces the links, never the victim."""
    secret = world.victim / "secret.txt"
    k0 = "model.layers.0.self_attn.k_proj.weight"
    planted = [
        ".tmp-manifest.json",
        f".tmp-{k0}.safetensors",
        f"{k0}.safetensors",
        ".journal-1.json.tmp",
    ]
    for name in planted:
        (world.cache / name).symlink_to(secret)
    victim_before = snapshot(world.victim)
    r = invoke(compute_argv(world, world.cache))
    assert r.exit_code == 0, r.stderr
    assert snapshot(world.victim) == victim_before
    entry = world.cache / f"{k0}.safetensors"
    assert entry.is_file() and not entry.is_symlink()
    m = json.loads((world.cache / "manifest.json").read_text())
    assert k0 in m["weights"] and not (world.cache / "manifest.json").is_symlink()
    for p in world.cache.iterdir():
        assert not (p.is_symlink() and p.name.startswith(".tmp-")), p  # our temporaries


def test_stale_cleanup_never_follows_a_planted_link(world: World) -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    name = f".out{fsio.TMP_TAG}{fsio.host()}-{p.pid}-abcd"
    (world.root / name).symlink_to(world.victim, target_is_directory=True)
    before = snapshot(world.victim)
    clean_stale(world.out)
    assert (world.root / name).is_symlink() and snapshot(world.victim) == before


def test_new_files_are_never_opened_through_links(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "link").symlink_to(victim)
    with pytest.raises(FileExistsError):
        fsio.create_new(tmp_path / "link")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        fsio.create_new(tmp_path / "dangling")
    assert victim.read_text() == "keep" and not (tmp_path / "nowhere").exists()


def test_rename_noreplace_refuses_anything_at_the_target(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    for kind in ("dir", "empty-dir", "link", "file"):
        dst = tmp_path / kind
        if kind == "dir":
            dst.mkdir()
            (dst / "x").write_text("x")
        elif kind == "empty-dir":
            dst.mkdir()
        elif kind == "link":
            dst.symlink_to(tmp_path / "nowhere")
        else:
            dst.write_text("x")
        with pytest.raises(FileExistsError):
            fsio.rename_noreplace(tmp_path / "src", dst)
    assert (tmp_path / "src").is_dir()


# ----------------------------------------------------------------------------- permissions


def _modes(root: Path) -> set[tuple[str, int]]:
    out = {("dir", stat.S_IMODE(root.stat().st_mode))}
    for p in root.rglob("*"):
        out.add(("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)))
    return out


@pytest.mark.parametrize(("umask", "d", "f"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_follow_the_umask(world: World, umask: int, d: int, f: int) -> None:
    shutil.copytree(world.adapter, world.root / "second")
    old = os.umask(umask)
    try:
        one = invoke(patch_p(world))
        batch = invoke(
            [
                "patch",
                str(world.adapter),
                str(world.root / "second"),
                *("-p", str(world.cache), "-o", str(world.root / "batch")),
            ]
        )
        new_cache = invoke(compute_argv(world, world.root / "new-cache", "q_proj"))
    finally:
        os.umask(old)
    assert one.exit_code == 0 and batch.exit_code == 0, (one.stderr, batch.stderr)
    assert new_cache.exit_code == 0, new_cache.stderr
    # Input files are 0644 (written by the test under the default umask): after the umask,
    # every file of every output is ``f`` and every directory ``d``, as for files the user
    # makes with cp (no -p).
    assert _modes(world.out) == {("dir", d), ("file", f)}
    assert _modes(world.root / "batch") == {("dir", d), ("file", f)}
    assert _modes(world.root / "new-cache") == {("dir", d), ("file", f)}


# ----------------------------------------------------------------------------- scale

SCALE_SCRIPT = textwrap.dedent(
    r"""
    import resource, sys
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    from safelora_cli.cli import app
    try:
        app(args=sys.argv[2:], prog_name="safelora", standalone_mode=True)
    except SystemExit as e:
        sys.exit(e.code)
    """
)


def test_hundreds_of_adapters_under_a_low_descriptor_limit(pristine: World, tmp_path: Path) -> None:
    """300 adapters in one call with RLIMIT_NOFILE = 64: each adapter's file is open only
    while it is read, so patch and inspect finish (before: one descriptor per adapter held
    until the end, EMFILE at about the 50th)."""
    n = 300
    src = pristine.adapter
    adapters = []
    for i in range(n):
        d = tmp_path / "many" / f"a{i:03d}"
        d.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            os.link(src / name, d / name)  # hard links: 300 adapters for the price of one
        adapters.append(str(d))
    script = tmp_path / "lowfd.py"
    script.write_text(SCALE_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("SAFELORA_DEBUG", None)
    before = snapshot(tmp_path / "many")
    out = tmp_path / "out"
    cmd = [sys.executable, str(script), "64"]
    p = subprocess.run(
        [*cmd, "patch", *adapters, "-p", str(pristine.cache), "-o", str(out), "-q"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(os.listdir(out)) == sorted(Path(a).name for a in adapters)
    q = subprocess.run(
        [*cmd, "inspect", *adapters, "-p", str(pristine.cache), "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert q.returncode == 0, q.stderr[-2000:]
    reports = [json.loads(line) for line in q.stdout.splitlines() if line.strip()]
    assert len(reports) == n  # one JSON line per adapter
    assert snapshot(tmp_path / "many") == before
