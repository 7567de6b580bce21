"""Small filesystem helpers shared by the cache and output writers (docs/security.md).

Contract:

- :func:`rename_noreplace` ``(src, dst)``: rename that never replaces ``dst``
  (FileExistsError if anything, even a dangling symlink, is there). Linux: ``renameat2`` with
  ``RENAME_NOREPLACE`` (atomic); elsewhere, or where the file system refuses the flag, a
  re-checking fallback (``lexists`` then ``rename``: a window of microseconds, and ``rename``
  of a directory onto a non-empty directory fails anyway).
- :func:`exchange` ``(a, b) -> bool``: atomically swap two existing paths (``RENAME_EXCHANGE``);
  False when the platform or file system cannot (the caller falls back to two renames).
- :func:`open_regular` ``(path) -> fd``: open for reading without blocking on a FIFO and refuse
  anything that is not a regular file (:class:`NotRegularFile`, an OSError naming the kind).
- :func:`create_new` ``(path, mode) -> fd``: ``O_CREAT|O_EXCL|O_NOFOLLOW``: never opens an
  existing file or writes through a planted symlink; ``mode`` is filtered by the umask.
- :func:`mkdir_beside` ``(target, tag) -> Path``: a fresh hidden directory
  ``.<name><tag><host>-<pid>-<random>`` beside ``target``, created with ``mkdir`` (mode 0o777
  filtered by the umask, unlike ``tempfile.mkdtemp``'s 0700) and never an existing one.
- :func:`stale_beside` ``(target, tag)``: such directories left by dead processes of this host.
- :class:`BesideLock` / :func:`lock_beside`: an exclusive ``flock`` on ``.<name>.safelora-lock``
  beside a target (created ``O_NOFOLLOW``), never blocking: :class:`LockBusy` names the holder.
  Released by unlinking then closing; an acquirer re-checks that the file it locked is still
  the one at the path, so unlinking is race-free.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_TAG = ".safelora-tmp-"
OLD_TAG = ".safelora-old-"
LOCK_SUFFIX = ".safelora-lock"

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None  # resolved lazily: a libc function, or False when there is none


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable; best effort (some filesystems refuse it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- renames


def _libc_renameat2() -> Any:
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.renameat2  # glibc >= 2.28, musl >= 1.2.?
                fn.argtypes = [
                    ctypes.c_int,
                    ctypes.c_char_p,
                    ctypes.c_int,
                    ctypes.c_char_p,
                    ctypes.c_uint,
                ]
                fn.restype = ctypes.c_int
                _renameat2 = fn
            except (OSError, AttributeError):
                _renameat2 = False
    return _renameat2


def _rename2(src: Path | str, dst: Path | str, flags: int) -> bool:
    """renameat2(src, dst, flags); False when unsupported here. OSError on a real failure."""
    fn = _libc_renameat2()
    if not fn:
        return False
    import ctypes

    rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # old kernel, or a file system without this flag (some network FSs)
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: Path | str, dst: Path | str) -> None:
    """Rename ``src`` to ``dst``; FileExistsError when ``dst`` exists (never replaced)."""
    if _rename2(src, dst, _RENAME_NOREPLACE):
        return
    # Fallback: re-check just before renaming (no atomic primitive on this platform/FS).
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def exchange(a: Path | str, b: Path | str) -> bool:
    """Atomically swap the existing paths ``a`` and ``b``; False if unsupported here."""
    return _rename2(a, b, _RENAME_EXCHANGE)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block is done, then deliver them as they would be.

    For the few renames that publish an output (and their rollback): Ctrl-C between two of
    them would otherwise leave a half-swapped state that the clean-up code never hears of.
    Only the main thread can install handlers; elsewhere this is a no-op.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: Any) -> None:
        caught.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)):
        if sig in previous:
            continue
        try:
            previous[sig] = signal.signal(sig, hold)
        except (ValueError, OSError):  # pragma: no cover - not allowed here
            continue
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            handler = previous.get(sig)
            if callable(handler):
                handler(sig, None)  # e.g. Python's default SIGINT handler: KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


# ----------------------------------------------------------------------------- opening


class NotRegularFile(OSError):
    """A path that must be a regular file is a FIFO, socket, device or directory."""


def kind_of(mode: int) -> str:
    """``st_mode`` in words: "a FIFO", "a socket", "a directory", ..."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path | str) -> int:
    """A read-only fd of the regular file ``path`` (symlinks followed).

    Opened with ``O_NONBLOCK`` so a FIFO never blocks the open, then checked with ``fstat``:
    :class:`NotRegularFile` (errno EINVAL, message naming the kind) for anything else. Nothing
    is read from a non-regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, f"is {kind_of(mode)}, not a regular file", str(path))
    return fd


EMFILE_HINT = (
    "too many files are open at once: raise the limit (e.g. ulimit -n 4096) "
    "or pass fewer inputs per run"
)


def emfile_hint(e: BaseException) -> str | None:
    """:data:`EMFILE_HINT` when ``e`` is "too many open files" (EMFILE/ENFILE), else None."""
    if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
        return EMFILE_HINT
    return None


def read_regular(path: Path | str, limit: int) -> bytes:
    """The bytes of the regular file ``path``; ValueError when it holds more than ``limit``."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise ValueError(f"is {size} bytes, more than {limit}")
        # Read what fstat says (+1 to notice growth), not ``limit``: read(n) allocates n bytes.
        data = fh.read(size + 1)
    if len(data) > limit:
        raise ValueError(f"is more than {limit} bytes")
    return data


def create_new(path: Path | str, mode: int = 0o666) -> int:
    """A write-only fd of a new file at ``path``: FileExistsError if anything is there.

    ``O_EXCL|O_NOFOLLOW``: a symlink planted at ``path`` is never followed (EEXIST/ELOOP).
    ``mode`` is filtered by the umask, like any file the user creates.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), mode)


# ----------------------------------------------------------------------------- siblings


def host() -> str:
    """This machine's name, safe in a file name (temporaries of other hosts are never touched)."""
    import socket

    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname() or "host")[:64]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (someone else's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def mkdir_beside(target: Path, tag: str) -> Path:
    """A new empty directory ``.<name><tag><host>-<pid>-<random>`` in ``target``'s parent.

    Created with ``mkdir(0o777)``: the umask decides the mode (0755 under umask 022), as for
    any directory the user makes. Host and pid in the name let a later run tell a killed run's
    leftovers from a live run's (another machine's pids mean nothing here).
    """
    prefix = f".{target.name}{tag}{host()}-{os.getpid()}-"
    for _ in range(100):
        p = target.parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(p, 0o777)
        except FileExistsError:
            continue
        return p
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target.parent))


def stale_beside(target: Path, tag: str) -> list[Path]:
    """This host's ``.<name><tag><host>-<pid>-*`` directories whose process is gone.

    Symlinks are never listed (a planted link is not ours to follow or remove).
    """
    parent = target.parent
    prefix = f".{target.name}{tag}{host()}-"
    out: list[Path] = []
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return out
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        q = parent / name
        try:
            st = os.lstat(q)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or not pid.isdigit() or pid_alive(int(pid)):
            continue
        out.append(q)
    return out


def rmtree_own(p: Path | None) -> None:
    """Remove the directory ``p`` this run created; a symlink found there is left alone.

    ``shutil.rmtree`` never follows links inside the tree; the top level is checked here, so a
    link planted at one of our temporary names is never followed out of it.
    """
    import shutil

    if p is None:
        return
    try:
        st = os.lstat(p)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- locking


class LockBusy(Exception):
    """Another process holds the lock; ``holder`` is what it wrote there (``pid N on HOST``)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path = path
        self.holder = holder


class BesideLock:
    """An exclusive, non-blocking ``flock`` on ``path`` (see :func:`lock_beside`)."""

    def __init__(self, path: Path, fd: int | None, *, unlink: bool = True):
        self.path = path
        self._fd = fd
        self._unlink = unlink

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlink the lock file, then close it (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            if self._unlink and os.path.samestat(os.fstat(fd), os.lstat(self.path)):
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(fd)

    def __enter__(self) -> BesideLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return read_regular(path, 256).decode("utf-8", "replace").strip()
    return ""


def lock_beside(target: Path) -> BesideLock:
    """Take the lock of ``target``: ``flock(LOCK_EX|LOCK_NB)`` on ``.<name>.safelora-lock``.

    LockBusy when another process holds it. Where ``flock`` does not exist the lock is a no-op
    (the no-replace renames still keep outputs safe). OSError when the file cannot be made.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        return BesideLock(lock_path(target), None)
    path = lock_path(target)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(50):
        fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o666)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotRegularFile(errno.EINVAL, "is not a regular file", str(path))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockBusy(path, _holder(path)) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(path))
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (unlinked) it between our open and flock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {host()}\n".encode())
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        return BesideLock(path, fd)
    raise LockBusy(path, "")


def lock_dir(directory: Path) -> BesideLock:
    """``flock`` on the directory itself (for a directory whose parent is not writable).

    LockBusy when another process holds it; nothing is created or unlinked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        return BesideLock(directory, None, unlink=False)
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockBusy(directory, "") from None
    return BesideLock(directory, fd, unlink=False)


__all__ = [
    "EMFILE_HINT",
    "LOCK_SUFFIX",
    "OLD_TAG",
    "TMP_TAG",
    "BesideLock",
    "LockBusy",
    "NotRegularFile",
    "create_new",
    "deferred_signals",
    "emfile_hint",
    "exchange",
    "fsync_dir",
    "host",
    "kind_of",
    "lock_beside",
    "lock_dir",
    "lock_path",
    "mkdir_beside",
    "open_regular",
    "pid_alive",
    "read_regular",
    "rename_noreplace",
    "rmtree_own",
    "stale_beside",
]
