"""Atomic output directories, shared by every command that writes one (``patch``, ``patch-model``).

Contract:

- :func:`plan_outputs` applies the output rules before anything is read in earnest: with one
  input the target is ``output`` itself; with several, ``output`` is a parent and each input
  lands in ``output/<name>``; two inputs with one name are a UsageError. No target may equal,
  lie inside or contain an input (or one of ``others``). An existing ``output`` is refused
  unless ``force``; with ``force`` an existing target must be a directory that looks like an
  earlier output (it holds one of ``markers``) or is empty, so ``--force`` never wipes an
  unrelated directory.
- :func:`write_outputs` is **all-or-nothing**: every output is staged in a hidden temporary
  directory beside its target (``.<name>.safelora-tmp-<host>-<pid>-*``, files fsynced) by the
  caller's ``write(item, staging_dir)``; only when all are staged are they renamed into place,
  originals moved aside (``.<name>.safelora-old-<host>-<pid>-*``) and dropped at the end. If
  staging or a rename fails, the renames already done are rolled back (originals restored) and
  the staging removed. A killed run leaves at most hidden directories beside the target, never
  a partial output. When a batch ``output`` does not exist yet, it is staged as one tree and
  renamed once.
- :func:`write_distributed`: the same under several ranks (docs/scale-out.md).
- :func:`clean_stale` removes what killed runs of this host left (never a live run's, never
  another host's, never the only copy of a previous output).
- :func:`copy_tree` / :func:`check_links`: every file of an input directory carried over byte
  for byte (``.git`` and ``.cache`` are not: they describe the input's download), links that
  lead out of the input or to directories refused first.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from safelora_cli.errors import AdapterError, OutputError, SafeLoraError, UsageError
from safelora_cli.fsio import fsync_dir

if TYPE_CHECKING:
    from safelora_cli.distributed import Dist

REPORT_NAME = "safelora_report.json"
NOT_COPIED = frozenset({".git", ".cache"})
TMP_TAG = ".safelora-tmp-"
OLD_TAG = ".safelora-old-"

T = TypeVar("T")


@dataclass(frozen=True)
class OutputInput:
    """One input that gets an output: ``name`` under a batch parent, ``path`` its directory."""

    name: str
    path: Path
    label: str = "input adapter"


@dataclass
class OutputPlan:
    """Where each output goes. ``batch``: ``root`` is a parent of the targets."""

    root: Path
    targets: list[Path]
    batch: bool
    force: bool


# ----------------------------------------------------------------------------- planning


def related(a: Path, b: Path) -> bool:
    """``a`` equals, contains or lies inside ``b``."""
    return a == b or a in b.parents or b in a.parents


def _looks_replaceable(p: Path, markers: Sequence[str]) -> bool:
    """An existing directory ``--force`` may replace: an earlier output or an empty directory."""
    return p.is_dir() and (any((p / m).is_file() for m in markers) or not any(p.iterdir()))


def other_inputs(args: Sequence[tuple[str, str | Path | None]]) -> list[tuple[str, Path]]:
    """``(label, arg)`` pairs -> ``(label, resolved path)`` for the args that exist locally."""
    out: list[tuple[str, Path]] = []
    for label, arg in args:
        if arg is not None and Path(arg).expanduser().exists():
            out.append((label, Path(arg).expanduser().resolve()))
    return out


def check_parents(root: Path, staging: Path) -> None:
    """OutputError unless the nearest existing ancestor of ``staging`` is a writable directory."""
    anc = staging
    while not (anc.exists() or anc.is_symlink()) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(
            f"output {root}: {anc} is a file, not a directory.",
            hint="Choose an -o whose parent directories are directories.",
            path=root,
        )
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(
            f"output {root}: cannot write in {anc} (permission denied).",
            hint="Choose a location you can write to (-o), or fix the permissions.",
            path=root,
        )


def check_links(
    src: Path,
    *,
    own: Sequence[str] = (),
    label: str = "adapter",
    error: type[SafeLoraError] = AdapterError,
) -> None:
    """``error`` for links the copy must not follow: out of the input, or to directories.

    Every file of the input directory is copied into the output; a symlinked extra file
    (README, tokenizer, ...) that resolves outside the directory would copy a file the input
    does not contain (a Hub snapshot's links into its ``blobs`` stay inside: see
    ``reader.containment_root``). The files in ``own`` (top level only) are read as the input
    itself and may link anywhere. Directory links are refused: they can loop.
    """
    from safelora_cli.reader import containment_root

    src = Path(src)
    if not src.is_dir():
        return
    bound = containment_root(src.resolve()).resolve()
    hint = "Replace the link by the file itself or remove it: every file is copied."

    def walk(d: Path) -> None:
        for entry in sorted(d.iterdir()):
            if entry.name in NOT_COPIED:
                continue
            rel = entry.relative_to(src)
            if entry.is_symlink():
                try:
                    target = entry.resolve(strict=True)
                except (OSError, RuntimeError):
                    raise error(
                        f"{label} {src}: {rel} is a broken or looping symlink.",
                        hint=hint,
                        path=entry,
                    ) from None
                if target.is_dir():
                    raise error(
                        f"{label} {src}: {rel} is a symlink to a directory ({target}).",
                        hint=hint,
                        path=entry,
                    )
                if d == src and entry.name in own:
                    continue
                if not target.is_relative_to(bound):
                    raise error(
                        f"{label} {src}: {rel} links to {target}, outside the {label} directory.",
                        hint=hint,
                        path=entry,
                    )
            elif entry.is_dir():
                walk(entry)

    walk(src)


def plan_outputs(
    inputs: Sequence[OutputInput],
    output: Path,
    *,
    force: bool,
    others: Sequence[tuple[str, Path]] = (),
    markers: Sequence[str] = (REPORT_NAME,),
    what: str = "adapter",
    check_input: Callable[[Path], None] | None = None,
) -> OutputPlan:
    """Apply the output rules (module docstring); OutputError / UsageError when broken.

    ``others``: further inputs as (label, resolved path) (the cache, local models, a cache
    being written) that no output may equal, contain or lie inside. ``markers``: file names
    that make an existing directory an earlier output ``--force`` may replace. ``what`` names
    the kind of output in messages. ``check_input(path)`` runs on each input after the overlap
    checks (e.g. :func:`check_links`).
    """
    root = Path(os.path.abspath(output)).resolve()
    batch = len(inputs) > 1
    if batch:
        names: dict[str, OutputInput] = {}
        for inp in inputs:
            if inp.name in names:
                raise UsageError(
                    f"two {what}s would both be written to {root / inp.name}: "
                    f"{names[inp.name].path} and {inp.path}.",
                    hint="Patch them in separate runs, or rename one of the input directories.",
                )
            names[inp.name] = inp
        targets = [root / inp.name for inp in inputs]
    else:
        targets = [root]
    pairs = [(inp.label, inp.path.resolve()) for inp in inputs] + list(others)
    for label, src in pairs:
        for t in [root, *targets]:
            if related(t, src):
                raise OutputError(
                    f"output {t} {'is' if t == src else 'overlaps'} the {label} {src}.",
                    hint="Choose an output directory outside every input (-o).",
                    path=t,
                )
    if check_input is not None:
        for inp in inputs:
            check_input(inp.path)
    check_parents(root, root if batch and root.is_dir() else root.parent)
    if root.exists() or root.is_symlink():
        if not force:
            raise OutputError(
                f"output {root} already exists.",
                hint="Choose another -o, or pass --force to replace it.",
                path=root,
            )
        if not root.is_dir():
            raise OutputError(
                f"output {root} exists and is not a directory.",
                hint="Remove it or choose another -o.",
                path=root,
            )
        for t in targets:
            if (t.exists() or t.is_symlink()) and not _looks_replaceable(t, markers):
                raise OutputError(
                    f"output {t} exists and is not {_article(what)} {what} directory; "
                    "--force will not replace it.",
                    hint="Remove it yourself or choose another -o.",
                    path=t,
                )
    return OutputPlan(root=root, targets=targets, batch=batch, force=force)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# ----------------------------------------------------------------------------- copying


def copy_tree(src: Path, dest: Path, skip: set[str]) -> None:
    """Copy every file under ``src`` into the existing ``dest`` (following symlinks: Hub
    snapshots link to blobs), fsynced; ``skip``: top-level names not copied."""
    for entry in sorted(src.iterdir()):
        if entry.name in NOT_COPIED or (entry.parent == src and entry.name in skip):
            continue
        target = dest / entry.name
        if entry.is_dir():
            target.mkdir()
            copy_tree(entry, target, set())
        elif entry.is_file():
            with open(entry, "rb") as fi, open(target, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
                os.fsync(fo.fileno())
            shutil.copymode(entry, target)
    fsync_dir(dest)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a new file in a staging directory, fsynced."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- staging


def host() -> str:
    """This machine's name, safe in a file name (temporaries of other hosts are never touched)."""
    import socket

    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname() or "host")[:64]


def _mkdtemp(beside: Path, tag: str) -> Path:
    # Host and pid in the name let a later run tell a killed run's leftovers from a live run's
    # (on a shared file system, another machine's pids mean nothing here).
    prefix = f".{beside.name}{tag}{host()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=beside.parent))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def clean_stale(target: Path) -> None:
    """Remove what killed runs left beside ``target`` (hidden ``.<name>.safelora-*`` dirs).

    Only directories this host created whose process is gone: a live run's staging (or another
    machine's) is left alone. A moved-aside original (``-old-``) is removed only when ``target``
    exists again; otherwise it may be the only copy of the previous output, and it stays.
    """
    parent = target.parent
    if not parent.is_dir():
        return
    for tag in (TMP_TAG, OLD_TAG):
        prefix = f".{target.name}{tag}{host()}-"
        for q in parent.iterdir():
            if not q.name.startswith(prefix) or not q.is_dir() or q.is_symlink():
                continue
            pid = q.name[len(prefix) :].split("-", 1)[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if tag == OLD_TAG and not (target.exists() or target.is_symlink()):
                continue
            _rmtree(q)


def _rmtree(p: Path | None) -> None:
    if p is not None and (p.exists() or p.is_symlink()):
        shutil.rmtree(p, ignore_errors=True)


def write_outputs(items: Sequence[T], plan: OutputPlan, write: Callable[[T, Path], None]) -> None:
    """Stage every item with ``write(item, empty_dir)``, then move them all into place.

    All-or-nothing (module docstring). ``items`` pair with ``plan.targets`` in order.
    """
    for t in {plan.root, *plan.targets}:
        clean_stale(t)
    created: list[Path] = []  # parents this run created, removed again on failure
    for p in reversed(plan.root.parents):
        if not p.exists():
            p.mkdir()
            created.append(p)
    staged: list[tuple[Path, Path]] = []  # (target, staged directory)
    try:
        if plan.batch and not plan.root.exists():
            tree = _mkdtemp(plan.root, TMP_TAG)
            staged.append((plan.root, tree))
            for item, t in zip(items, plan.targets, strict=True):
                d = tree / t.name
                d.mkdir()
                write(item, d)
            fsync_dir(tree)
        else:
            for item, t in zip(items, plan.targets, strict=True):
                d = _mkdtemp(t, TMP_TAG)
                staged.append((t, d))
                write(item, d)
        _drop_old(_publish(staged))
    except BaseException:
        for _, d in staged:
            _rmtree(d)
        for p in reversed(created):
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


_Done = list[tuple[Path, Path | None]]  # (target, moved-aside original)


def _publish(staged: Sequence[tuple[Path, Path]]) -> _Done:
    """Rename each staged directory onto its target, originals moved aside (kept).

    On failure the renames already done are rolled back before the error propagates.
    """
    done: _Done = []
    try:
        for target, d in staged:
            old = None
            if target.exists() or target.is_symlink():
                old = _mkdtemp(target, OLD_TAG)
                os.rmdir(old)
                os.rename(target, old)
            try:
                os.rename(d, target)
            except BaseException:
                if old is not None:
                    os.rename(old, target)
                raise
            done.append((target, old))
            fsync_dir(target.parent)
    except BaseException:
        _rollback(done)
        raise
    return done


def _rollback(done: _Done) -> None:
    """Undo :func:`_publish`: new outputs removed, moved-aside originals put back."""
    for target, old in reversed(done):
        _rmtree(target)
        if old is not None:
            os.rename(old, target)


def _drop_old(done: _Done) -> None:
    for _, old in done:
        _rmtree(old)


def write_distributed(
    items: Sequence[T],
    mine: Sequence[int],
    plan: OutputPlan,
    dist: Dist,
    write: Callable[[T, Path], None],
) -> None:
    """Each rank writes its items (``items[j]`` goes to ``plan.targets[mine[j]]``).

    All-or-nothing across ranks as far as renames allow:

    1. Rank 0 creates the output's missing parents and, for a batch into a new ``output``, one
       staging tree that every rank writes into.
    2. Every rank stages its items (in that tree, or beside each target). Any failure: every
       staged directory is removed, nothing was published.
    3. A new batch ``output``: rank 0 renames the tree into place (one rename: all or nothing).
       Otherwise (``--force`` into an existing ``output``, or one output) every rank renames its
       targets, originals moved aside; any failure rolls back every rank's renames; success
       drops the originals. A rank *killed* between its renames and the others' leaves some
       outputs new and some old (each one whole), with the originals of the replaced ones in
       hidden ``.<name>.safelora-old-*`` directories beside them.
    """
    created: list[Path] = []
    tree: Path | None = None
    staged: list[tuple[Path, Path]] = []
    done: _Done = []
    err: Exception | None = None

    def undo() -> None:
        _rollback(done)
        for _, d in staged:
            _rmtree(d)
        if dist.is_main:
            _rmtree(tree)
            for p in reversed(created):
                with contextlib.suppress(OSError):
                    p.rmdir()

    if dist.is_main:
        try:
            for p in reversed(plan.root.parents):
                if not p.exists():
                    p.mkdir()
                    created.append(p)
            if plan.batch and not plan.root.exists():
                tree = _mkdtemp(plan.root, TMP_TAG)
        except Exception as e:
            err = e
    try:
        dist.agree(err)
        tree = dist.broadcast(tree)
        try:
            for item, i in zip(items, mine, strict=True):
                target = plan.targets[i]
                if tree is not None:
                    d = tree / target.name
                    d.mkdir()
                else:
                    d = _mkdtemp(target, TMP_TAG)
                staged.append((target, d))
                write(item, d)
            if tree is not None and staged:
                fsync_dir(tree)
        except Exception as e:
            err = e
        dist.agree(err)
        try:
            if tree is not None:
                if dist.is_main:
                    done = _publish([(plan.root, tree)])
            else:
                done = _publish(staged)
        except Exception as e:
            err = e
        dist.agree(err)
    except BaseException:
        undo()
        raise
    _drop_old(done)


def name_failed_output(e: OSError, plan: OutputPlan) -> OSError:
    """A write error that names no file (a full disk: fsync/write) re-raised naming the output."""
    if e.filename is not None:
        return e
    return OSError(e.errno, e.strerror or str(e), str(plan.root))


__all__ = [
    "NOT_COPIED",
    "OLD_TAG",
    "REPORT_NAME",
    "TMP_TAG",
    "OutputInput",
    "OutputPlan",
    "check_links",
    "check_parents",
    "clean_stale",
    "copy_tree",
    "host",
    "name_failed_output",
    "other_inputs",
    "plan_outputs",
    "related",
    "write_distributed",
    "write_outputs",
    "write_text",
]
