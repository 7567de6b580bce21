"""Atomic output directories, shared by every command that writes one (``patch``, ``patch-model``).

Contract:

- :func:`plan_outputs` applies the output rules before anything is read in earnest: with one
  input the target is ``output`` itself; with several, ``output`` is a parent and each input
  lands in ``output/<name>``; two inputs with one name are a UsageError. No target may equal,
  lie inside or contain an input (or one of ``others``). An existing ``output`` is refused
  unless ``force``; with ``force`` an existing target must be a directory that looks like an
  earlier output (it holds one of ``markers``) or is empty, so ``--force`` never wipes an
  unrelated directory.
- :func:`write_outputs` is **all-or-nothing**: it takes an exclusive lock beside ``output``
  (``.<name>.safelora-lock``; a second run exits 1 naming the holder), then every output is
  staged in a hidden temporary directory beside its target
  (``.<name>.safelora-tmp-<host>-<pid>-*``, files fsynced, modes from the umask) by the
  caller's ``write(item, staging_dir)``; only when all are staged are they put into place with
  renames that never replace anything: ``RENAME_NOREPLACE`` for a new target (a directory that
  appeared at the target meanwhile is left alone: OutputError), and with ``--force``
  ``RENAME_EXCHANGE`` (the original ends up under the staging name, is checked to be an
  earlier output or empty, else swapped back, and is removed only once every swap is done).
  Where the platform has no exchange, the original is renamed aside
  (``.<name>.safelora-old-<host>-<pid>-*``) first. If staging or a rename fails, the renames
  already done are rolled back (originals restored) and the staging removed. A killed run
  leaves at most hidden directories (and the lock file) beside the target, never a partial
  output, and never loses the previous one: a moved-aside original of a dead run, with its
  target missing, makes the next run stop and name it (``--force`` replaces it). When a batch
  ``output`` does not exist yet, it is staged as one tree and renamed once.
- :func:`write_distributed`: the same under several ranks (docs/scale-out.md).
- :func:`clean_stale` removes what killed runs of this host left (never a live run's, never
  another host's, never the only copy of a previous output).
- :func:`copy_tree` / :func:`check_links`: every file of an input directory carried over byte
  for byte (``.git`` and ``.cache`` are not: they describe the input's download), links that
  lead out of the input or to directories refused first, and so are FIFOs, sockets, devices
  and trees nested deeper than :data:`MAX_TREE_DEPTH` (both walk iteratively, by ``lstat``,
  and never open a file that is not regular).
- An ``-o`` that is itself a symbolic link is refused (nothing is written through it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from safelora_cli import fsio
from safelora_cli.errors import AdapterError, OutputError, SafeLoraError, UsageError
from safelora_cli.fsio import OLD_TAG, TMP_TAG, fsync_dir, host

if TYPE_CHECKING:
    from safelora_cli.distributed import Dist

REPORT_NAME = "safelora_report.json"
NOT_COPIED = frozenset({".git", ".cache"})
MAX_TREE_DEPTH = 32  # directory levels below an input directory that are walked

T = TypeVar("T")


@dataclass(frozen=True)
class OutputInput:
    """One input that gets an output: ``name`` under a batch parent, ``path`` its directory."""

    name: str
    path: Path
    label: str = "input adapter"


@dataclass
class OutputPlan:
    """Where each output goes. ``batch``: ``root`` is a parent of the targets.

    ``markers``: the file names that make an existing directory an earlier output (``--force``
    replaces only such a directory, or an empty one; checked again at the moment of the swap).
    """

    root: Path
    targets: list[Path]
    batch: bool
    force: bool
    markers: tuple[str, ...] = (REPORT_NAME,)


# ----------------------------------------------------------------------------- planning


def related(a: Path, b: Path) -> bool:
    """``a`` equals, contains or lies inside ``b``."""
    return a == b or a in b.parents or b in a.parents


def _looks_replaceable(p: Path, markers: Sequence[str]) -> bool:
    """An existing directory ``--force`` may replace: an earlier output or an empty directory.

    By ``lstat``: a symlink (to anything) is never replaceable, nor is a marker that is a link.
    """
    try:
        if not stat.S_ISDIR(os.lstat(p).st_mode):
            return False
        with os.scandir(p) as it:
            if not any(it):
                return True
    except OSError:
        return False
    for m in markers:
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(p / m).st_mode):
                return True
    return False


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
    """``error`` for entries the copy must not take: links out of the input or to
    directories, FIFOs, sockets, devices, and directories nested deeper than
    :data:`MAX_TREE_DEPTH`.

    Every file of the input directory is copied into the output; a symlinked extra file
    (README, tokenizer, ...) that resolves outside the directory would copy a file the input
    does not contain (a Hub snapshot's links into its ``blobs`` stay inside: see
    ``reader.containment_root``). The files in ``own`` (top level only) are read as the input
    itself and may link anywhere (to a regular file). Directory links are refused: they can
    loop. The walk is iterative and by ``lstat``; nothing is opened.
    """
    from safelora_cli.reader import containment_root

    src = Path(src)
    if not src.is_dir():
        return
    bound = containment_root(src.resolve()).resolve()
    hint = "Replace the link by the file itself or remove it: every file is copied."
    stack: list[tuple[Path, int]] = [(src, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            names = sorted(os.listdir(d))
        except OSError as e:
            raise error(
                f"{label} {src}: cannot list {d}: {e.strerror or e}",
                hint="Fix the permissions of the directory.",
                path=d,
            ) from None
        for name in names:
            if name in NOT_COPIED:
                continue
            entry = d / name
            rel = entry.relative_to(src)
            try:
                st = os.lstat(entry)
            except OSError:
                continue  # vanished meanwhile; copy_tree re-checks
            if stat.S_ISLNK(st.st_mode):
                try:
                    target = entry.resolve(strict=True)
                    tst = os.stat(entry)
                except (OSError, RuntimeError):
                    raise error(
                        f"{label} {src}: {rel} is a broken or looping symlink.",
                        hint=hint,
                        path=entry,
                    ) from None
                if stat.S_ISDIR(tst.st_mode):
                    raise error(
                        f"{label} {src}: {rel} is a symlink to a directory ({target}).",
                        hint=hint,
                        path=entry,
                    )
                if not stat.S_ISREG(tst.st_mode):
                    raise error(
                        f"{label} {src}: {rel} links to {target}, which is "
                        f"{fsio.kind_of(tst.st_mode)}, not a regular file.",
                        hint=hint,
                        path=entry,
                    )
                if d == src and name in own:
                    continue
                if not target.is_relative_to(bound):
                    raise error(
                        f"{label} {src}: {rel} links to {target}, outside the {label} directory.",
                        hint=hint,
                        path=entry,
                    )
            elif stat.S_ISDIR(st.st_mode):
                if depth + 1 > MAX_TREE_DEPTH:
                    raise error(
                        f"{label} {src}: {rel} is nested more than {MAX_TREE_DEPTH} "
                        "directories deep.",
                        hint=f"Flatten or remove it: every file of the {label} directory is "
                        "copied.",
                        path=entry,
                    )
                stack.append((entry, depth + 1))
            elif not stat.S_ISREG(st.st_mode):
                raise error(
                    f"{label} {src}: {rel} is {fsio.kind_of(st.st_mode)}, not a regular file.",
                    hint=f"Remove it: every file of the {label} directory is copied, and only "
                    "regular files can be.",
                    path=entry,
                )


def orphans(target: Path) -> list[Path]:
    """Moved-aside originals of ``target`` left by dead runs of this host, while it is missing.

    Such a directory may be the only copy of the previous output (a ``--force`` run killed
    between its two renames, where the platform has no atomic exchange).
    """
    if os.path.lexists(target):
        return []
    return fsio.stale_beside(target, OLD_TAG)


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
    given = Path(os.path.abspath(output))
    if given.is_symlink():
        raise OutputError(
            f"output {given} is a symbolic link (to {os.readlink(given)}); safelora does not "
            "write through links.",
            hint="Pass the link's target as -o, or remove the link.",
            path=given,
        )
    root = given.resolve()
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
    if not force:
        for t in dict.fromkeys([root, *targets]):
            left = orphans(t)
            if left:
                more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
                raise OutputError(
                    f"output {t} is missing, but an interrupted safelora run left the previous "
                    f"output in {left[0]}{more}.",
                    hint=f"Restore it (mv {left[0]} {t}), or pass --force to replace it.",
                    path=t,
                )
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
            if t.is_symlink():
                raise OutputError(
                    f"output {t} is a symbolic link; --force will not replace it.",
                    hint="Remove it yourself or choose another -o.",
                    path=t,
                )
            if t.exists() and not _looks_replaceable(t, markers):
                raise OutputError(
                    f"output {t} exists and is not {_article(what)} {what} directory; "
                    "--force will not replace it.",
                    hint="Remove it yourself or choose another -o.",
                    path=t,
                )
    return OutputPlan(root=root, targets=targets, batch=batch, force=force, markers=tuple(markers))


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# ----------------------------------------------------------------------------- copying


def _copy_file(src: Path, dest: Path, mode: int) -> None:
    """``src`` (a regular file, links followed) into the new file ``dest``, fsynced."""
    fi = os.fdopen(fsio.open_regular(src), "rb")
    with fi:
        fo = os.fdopen(fsio.create_new(dest, mode & 0o777), "wb")
        with fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())


def copy_tree(
    src: Path,
    dest: Path,
    skip: set[str],
    *,
    label: str = "adapter",
    error: type[SafeLoraError] = AdapterError,
) -> None:
    """Copy every file under ``src`` into the existing ``dest`` (following symlinks: Hub
    snapshots link to blobs), fsynced; ``skip``: top-level names not copied.

    Iterative, by ``lstat``: directories nested deeper than :data:`MAX_TREE_DEPTH`, links to
    directories, FIFOs, sockets and devices are ``error`` (run :func:`check_links` first to
    refuse them before anything is written); nothing but regular files is opened. Files are
    created ``O_EXCL|O_NOFOLLOW`` with the source's permission bits filtered by the umask,
    directories with 0o777 filtered by the umask (as ``cp`` does without ``-p``).
    """
    stack: list[tuple[Path, Path, int]] = [(Path(src), Path(dest), 0)]
    while stack:
        s, t, depth = stack.pop()
        for name in sorted(os.listdir(s)):
            if name in NOT_COPIED or (depth == 0 and name in skip):
                continue
            entry, target = s / name, t / name
            try:
                st = os.stat(entry)  # links followed (check_links vetted where they lead)
            except OSError as e:
                raise error(
                    f"{label} {src}: cannot read {entry}: {e.strerror or e}",
                    hint="Fix or remove the file.",
                    path=entry,
                ) from None
            if stat.S_ISDIR(st.st_mode):
                if entry.is_symlink() or depth + 1 > MAX_TREE_DEPTH:
                    raise error(
                        f"{label} {src}: {entry.relative_to(src)} is a directory link or nested "
                        f"more than {MAX_TREE_DEPTH} deep; it is not copied.",
                        hint="Remove it, or replace the link by the directory itself.",
                        path=entry,
                    )
                os.mkdir(target, 0o777)
                stack.append((entry, target, depth + 1))
            elif stat.S_ISREG(st.st_mode):
                try:
                    _copy_file(entry, target, st.st_mode)
                except fsio.NotRegularFile as e:  # swapped for a FIFO since the stat
                    raise error(f"{label} {src}: {entry} {e.strerror}.", path=entry) from None
            else:
                raise error(
                    f"{label} {src}: {entry.relative_to(src)} is {fsio.kind_of(st.st_mode)}, "
                    "not a regular file.",
                    hint=f"Remove it: every file of the {label} directory is copied.",
                    path=entry,
                )
        fsync_dir(t)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a new file in a staging directory, fsynced (never through a
    link: ``O_EXCL|O_NOFOLLOW``)."""
    with os.fdopen(fsio.create_new(path), "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- staging


def clean_stale(target: Path) -> None:
    """Remove what killed runs left beside ``target`` (hidden ``.<name>.safelora-*`` dirs).

    Only directories this host created whose process is gone: a live run's staging (or another
    machine's) is left alone, and so is a symlink. A moved-aside original (``-old-``) is
    removed only when ``target`` exists again; otherwise it may be the only copy of the
    previous output, and it stays (:func:`plan_outputs` names it).
    """
    if not target.parent.is_dir():
        return
    for tag in (TMP_TAG, OLD_TAG):
        for q in fsio.stale_beside(target, tag):
            if tag == OLD_TAG and not os.path.lexists(target):
                continue
            fsio.rmtree_own(q)


def _lock(root: Path) -> fsio.BesideLock:
    try:
        return fsio.lock_beside(root)
    except fsio.LockBusy as e:
        raise OutputError(
            f"output {root} is being written by another safelora process"
            + (f" ({e.holder})" if e.holder else "")
            + ".",
            hint="Wait for it to finish, or choose another -o.",
            path=root,
        ) from None
    except fsio.NotRegularFile:
        raise OutputError(
            f"output {root}: {fsio.lock_path(root)} is not a regular file.",
            hint="Remove it, or choose another -o.",
            path=root,
        ) from None


def write_outputs(items: Sequence[T], plan: OutputPlan, write: Callable[[T, Path], None]) -> None:
    """Stage every item with ``write(item, empty_dir)``, then move them all into place.

    All-or-nothing, under the lock beside ``plan.root`` (module docstring). ``items`` pair
    with ``plan.targets`` in order.
    """
    created: list[Path] = []  # parents this run created, removed again on failure
    for p in reversed(plan.root.parents):
        if not p.exists():
            p.mkdir()
            created.append(p)
    lock: fsio.BesideLock | None = None
    staged: list[tuple[Path, Path, bool]] = []  # (target, staged directory, fresh tree)
    done: _Done | None = None
    try:
        lock = _lock(plan.root)
        for t in {plan.root, *plan.targets}:
            clean_stale(t)
        if plan.batch and not plan.root.exists():
            tree = fsio.mkdir_beside(plan.root, TMP_TAG)
            staged.append((plan.root, tree, True))
            for item, t in zip(items, plan.targets, strict=True):
                d = tree / t.name
                d.mkdir()
                write(item, d)
            fsync_dir(tree)
        else:
            for item, t in zip(items, plan.targets, strict=True):
                d = fsio.mkdir_beside(t, TMP_TAG)
                staged.append((t, d, False))
                write(item, d)
        with fsio.deferred_signals():  # Ctrl-C waits for the swaps (or their rollback)
            done = _publish(staged, plan)
        _drop_old(done)
        for t in {plan.root, *plan.targets}:
            clean_stale(t)  # an orphaned original of a target --force just replaced
    except BaseException:
        if done is not None:
            # Published, then interrupted (a Ctrl-C held back until the swaps were done): the
            # new outputs stay; the originals go as on success.
            _drop_old(done)
        for _, d, _ in staged:
            fsio.rmtree_own(d)
        if lock is not None:
            lock.release()
            lock = None
        for p in reversed(created):
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    finally:
        if lock is not None:
            lock.release()


_Done = list[tuple[Path, Path | None, bool]]  # (target, where the original is, swapped)


def _appeared(target: Path) -> OutputError:
    return OutputError(
        f"output {target} appeared while this run was writing it (another process created "
        "it); it was left as it is and nothing was written.",
        hint="Choose another -o, or pass --force to replace an earlier output.",
        path=target,
    )


def _not_replaceable(target: Path) -> OutputError:
    return OutputError(
        f"output {target} changed while this run was writing it and is no longer an earlier "
        "output or an empty directory; it was left as it is and nothing was written.",
        hint="Remove it yourself or choose another -o.",
        path=target,
    )


def _put_in_place(
    target: Path, d: Path, *, replace: bool, markers: Sequence[str]
) -> tuple[Path, Path | None, bool]:
    """Rename the staged ``d`` onto ``target``; returns the :data:`_Done` row."""
    if not replace or not os.path.lexists(target):
        try:
            fsio.rename_noreplace(d, target)
        except FileExistsError:
            raise _appeared(target) from None
        return (target, None, False)
    if not _looks_replaceable(target, markers):
        raise _not_replaceable(target)
    if fsio.exchange(d, target):
        # The original is now at ``d``: make sure it is what --force may replace (it could
        # have been swapped for something else after the check above), else swap back.
        if not _looks_replaceable(d, markers):
            fsio.exchange(d, target)
            raise _not_replaceable(target)
        return (target, d, True)
    # No atomic exchange here: the original is renamed aside first (a kill between the two
    # renames leaves it there, and the next run names it: plan_outputs).
    old = fsio.mkdir_beside(target, OLD_TAG)
    os.rmdir(old)
    fsio.rename_noreplace(target, old)
    try:
        fsio.rename_noreplace(d, target)
    except BaseException:
        fsio.rename_noreplace(old, target)
        raise
    return (target, old, False)


def _publish(staged: Sequence[tuple[Path, Path, bool]], plan: OutputPlan) -> _Done:
    """Put each staged directory in place (``fresh``: a whole new batch tree, never a
    replacement); originals kept (swapped or moved aside) until :func:`_drop_old`.

    On failure the renames already done are rolled back before the error propagates.
    """
    done: _Done = []
    try:
        for target, d, fresh in staged:
            done.append(
                _put_in_place(target, d, replace=plan.force and not fresh, markers=plan.markers)
            )
            fsync_dir(target.parent)
    except BaseException:
        _rollback(done)
        raise
    return done


def _rollback(done: _Done) -> None:
    """Undo :func:`_publish`: new outputs removed, originals put back."""
    for target, old, swapped in reversed(done):
        if swapped:
            assert old is not None
            fsio.exchange(old, target)  # the original back; ``old`` (staging) holds the new
            continue
        fsio.rmtree_own(target)
        if old is not None:
            fsio.rename_noreplace(old, target)


def _drop_old(done: _Done) -> None:
    for _, old, _ in done:
        fsio.rmtree_own(old)


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
       targets (no-replace renames, ``--force``: exchanges, as :func:`write_outputs`); any
       failure rolls back every rank's renames; success drops the originals. A rank *killed*
       between its renames and the others' leaves some outputs new and some old (each one
       whole), with the originals of the replaced ones in hidden ``.<name>.safelora-*``
       directories beside them. Rank 0 holds the lock beside ``output`` throughout.
    """
    created: list[Path] = []
    tree: Path | None = None
    staged: list[tuple[Path, Path, bool]] = []
    done: _Done = []
    err: Exception | None = None
    lock: fsio.BesideLock | None = None

    def undo() -> None:
        _rollback(done)
        for _, d, _ in staged:
            fsio.rmtree_own(d)
        if dist.is_main:
            fsio.rmtree_own(tree)
            if lock is not None:
                lock.release()
            for p in reversed(created):
                with contextlib.suppress(OSError):
                    p.rmdir()

    if dist.is_main:
        try:
            for p in reversed(plan.root.parents):
                if not p.exists():
                    p.mkdir()
                    created.append(p)
            # Rank 0 holds the output's lock for the whole run: a second run (of any size)
            # into the same -o fails on its rank 0, and so on all its ranks.
            lock = _lock(plan.root)
            for t in {plan.root, *plan.targets}:
                clean_stale(t)
            if plan.batch and not plan.root.exists():
                tree = fsio.mkdir_beside(plan.root, TMP_TAG)
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
                    staged.append((target, d, True))
                else:
                    d = fsio.mkdir_beside(target, TMP_TAG)
                    staged.append((target, d, False))
                write(item, d)
            if tree is not None and staged:
                fsync_dir(tree)
        except Exception as e:
            err = e
        dist.agree(err)
        try:
            with fsio.deferred_signals():
                if tree is not None:
                    if dist.is_main:
                        done = _publish([(plan.root, tree, True)], plan)
                else:
                    done = _publish(staged, plan)
        except Exception as e:
            err = e
        dist.agree(err)
    except BaseException:
        undo()
        raise
    _drop_old(done)
    if lock is not None:
        lock.release()


def name_failed_output(e: OSError, plan: OutputPlan) -> OSError:
    """A write error that names no file (a full disk: fsync/write) re-raised naming the output."""
    if e.filename is not None:
        return e
    return OSError(e.errno, e.strerror or str(e), str(plan.root))


__all__ = [
    "MAX_TREE_DEPTH",
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
    "orphans",
    "other_inputs",
    "plan_outputs",
    "related",
    "write_distributed",
    "write_outputs",
    "write_text",
]
