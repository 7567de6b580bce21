"""Multi-process runs under ``accelerate launch`` / ``torchrun`` (issue 9; docs/scale-out.md).

Single process is the default: nothing here runs, and neither torch.distributed nor accelerate
is imported, unless a launcher started this process as one of several (``WORLD_SIZE > 1`` and
``RANK`` in the environment, as ``accelerate launch`` and ``torchrun`` set them).

Contract:

- :func:`launched` ``() -> bool``: this process is one rank of a multi-process launch (env only;
  imports nothing).
- :func:`current` ``(device="auto") -> Dist | None``: ``None`` without a launcher; otherwise the
  process group, set up once through accelerate's ``PartialState`` (gloo on CPU, NCCL on CUDA:
  ``device="cpu"`` or a machine without CUDA selects gloo). The ranks must find each other
  within ``SAFELORA_DIST_INIT_TIMEOUT`` seconds (default 300): a stray WORLD_SIZE/RANK without
  MASTER_ADDR/MASTER_PORT, or a group that never forms, is a :class:`LaunchError`, not a hang.
  The collectives' timeout is ``SAFELORA_DIST_TIMEOUT`` seconds (default 24 h): a rank whose
  share takes longer than the others waits in the next collective, and must not be cut off by
  torch's default 10-30 min.
- :class:`Dist`: ``rank``, ``world_size``, ``local_rank``, ``device`` (``PartialState().device``:
  ``cuda:<local_rank>`` on a GPU node, ``cpu`` otherwise), ``is_main``; the collectives
  :meth:`Dist.all_gather`, :meth:`Dist.broadcast` and :meth:`Dist.agree` (every rank calls each
  one at the same point, or the run hangs: library code calls them outside any ``try`` whose
  failure would skip them on one rank only).
- :meth:`Dist.agree` ``(error)``: every rank reports its failure of the phase (or ``None``); if
  any failed, every rank raises. Rank 0 raises its own exception when it failed first, otherwise
  a :class:`RankError` carrying the lowest failing rank's message, hint and exit code; the other
  ranks raise a :class:`RankError` too, which the CLI ends silently with that exit code
  (:func:`quiet_exit_code`), so the message is printed once and every rank exits alike.
- :func:`agreed` ``(dist, fn) -> fn()``: ``fn`` run on every rank as one agreed phase (argument
  checks before the first collective), or just ``fn()`` without ``dist``.
- :func:`balance` ``(costs, parts) -> list[list[int]]``: greedy LPT split of item indices into
  ``parts`` lists of about equal total cost; deterministic (ties by index, then by part).
- :func:`rank_device` ``(spec, dist) -> str``: the ``--device`` a rank uses: ``auto`` (and
  ``cuda`` on a CUDA node) become that rank's own device; ``cpu`` and ``cuda:N`` are honoured.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from safelora_cli.errors import EXIT_ERROR, SafeLoraError

if TYPE_CHECKING:
    import torch

DEFAULT_TIMEOUT_S = 24 * 3600
# How long the ranks may take to find each other (the TCP store rendezvous).
DEFAULT_INIT_TIMEOUT_S = 300.0


def launched() -> bool:
    """True when a launcher started this process as one rank of several (env only)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


class RankError(SafeLoraError):
    """A rank of a multi-process run failed; carries that rank's message, hint and exit code."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        exit_code: int = EXIT_ERROR,
        rank: int = 0,
        quiet: bool = False,
    ):
        super().__init__(message, hint=hint)
        self.exit_code = exit_code
        self.rank = rank
        # True on ranks other than 0: the message is printed by rank 0 only.
        self.quiet = quiet


def quiet_exit_code(exc: BaseException) -> int | None:
    """The exit code a non-zero rank ends with, silently, for ``exc``; None: report it."""
    if isinstance(exc, RankError) and exc.quiet:
        return exc.exit_code
    return None


def _describe(exc: BaseException) -> tuple[str, str | None, int]:
    """``(message, hint, exit code)`` of a failure, picklable, as the CLI would show it."""
    if isinstance(exc, SafeLoraError):
        lines = exc.lines()
        return lines[0], (lines[1] if len(lines) > 1 else None), exc.exit_code
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc) or type(exc).__name__
        where = f": {exc.filename}" if exc.filename else ""
        return f"{what}{where}", "Check the paths and free disk space, then run again.", EXIT_ERROR
    return (
        f"internal error: {type(exc).__name__}: {exc}",
        "A bug in safelora: rerun with SAFELORA_DEBUG=1 and report the traceback.",
        EXIT_ERROR,
    )


@dataclass
class Dist:
    """This process's place in a multi-process run (see the module docstring)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        import torch.distributed as td

        out: list[Any] = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as td

        box = [obj if self.is_main else None]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.all_gather(None)

    def close(self) -> None:
        """Tear the process group down (every rank, after its last collective).

        Leaving it to interpreter exit can abort the process (gloo threads still running).
        """
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()
        _CURRENT.clear()

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if ``error`` is not None on any rank (module docstring)."""
        mine = None if error is None else _describe(error)
        reports = self.all_gather(mine)
        failed = [(r, d) for r, d in enumerate(reports) if d is not None]
        if not failed:
            return
        rank, (message, hint, code) = failed[0]
        if self.is_main and rank == 0 and error is not None:
            raise error
        if self.world_size > 1 and rank != 0:
            message = f"rank {rank} of {self.world_size}: {message}"
        raise RankError(
            message, hint=hint, exit_code=code, rank=rank, quiet=not self.is_main
        ) from (error if rank == self.rank else None)


_CURRENT: list[Dist] = []
T = TypeVar("T")


def agreed(dist: Dist | None, fn: Callable[[], T]) -> T:
    """``fn()`` on every rank; a failure on any rank fails every rank (:meth:`Dist.agree`).

    Without ``dist`` this is just ``fn()``. For checks run before the first collective (argument
    validation), so that their error is printed once too.
    """
    if dist is None:
        return fn()
    err: Exception | None = None
    out: Any = None
    try:
        out = fn()
    except Exception as e:
        err = e
    dist.agree(err)
    return out


class LaunchError(SafeLoraError):
    """The launcher environment (WORLD_SIZE, RANK, MASTER_ADDR ...) is unusable, or the process
    group did not form in time."""


LAUNCH_HINT = (
    "Start every rank with accelerate launch or torchrun (docs/scale-out.md), or unset "
    "WORLD_SIZE and RANK to run as one process."
)


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < 10**9):  # also refuses NaN and inf
        raise LaunchError(
            f"{name}={raw!r} is not a number of seconds",
            hint=f"Set {name} to a positive number of seconds, or unset it (default {default:g}).",
        )
    return value


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(
            f"{name}={raw!r} is not an integer (WORLD_SIZE={os.environ.get('WORLD_SIZE')!r})",
            hint=LAUNCH_HINT,
        ) from None


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 points at /dev/null inside the block (native libraries' logging)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def launch_env() -> tuple[int, int, str, int]:
    """``(rank, world_size, master_addr, master_port)`` of a launch, checked (LaunchError).

    A launcher sets all four; WORLD_SIZE/RANK alone (a stray environment, e.g. copied from a
    training job) cannot form a group and is refused at once instead of waiting.
    """
    world = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK")
    if rank is None or not 0 <= rank < world:
        raise LaunchError(
            f"RANK={os.environ.get('RANK')!r} does not fit WORLD_SIZE={world}",
            hint=LAUNCH_HINT,
        )
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n, "").strip()]
    if missing:
        raise LaunchError(
            f"WORLD_SIZE={world} and RANK={rank} are set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: no launcher started this process",
            hint=LAUNCH_HINT,
        )
    port = _env_int("MASTER_PORT")
    if port is None or not 0 < port < 65536:
        raise LaunchError(
            f"MASTER_PORT={os.environ.get('MASTER_PORT')!r} is not a port", hint=LAUNCH_HINT
        )
    return rank, world, os.environ["MASTER_ADDR"].strip(), port


def current(device: str | None = "auto") -> Dist | None:
    """The multi-process context, or None when no launcher started this process (no imports).

    The group forms through a TCP store at ``MASTER_ADDR:MASTER_PORT`` that every rank must
    join within ``SAFELORA_DIST_INIT_TIMEOUT`` seconds (default :data:`DEFAULT_INIT_TIMEOUT_S`);
    a rank that is missing then, or a master that is unreachable, is a LaunchError on every
    rank that is waiting, not a wait of ``SAFELORA_DIST_TIMEOUT`` (the collectives' timeout,
    default 24 h, for a rank whose share takes long).
    """
    if not launched():
        return None
    if _CURRENT:
        return _CURRENT[0]
    from datetime import timedelta

    rank, world, addr, port = launch_env()
    timeout = _env_seconds("SAFELORA_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
    init_timeout = _env_seconds("SAFELORA_DIST_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT_S)

    import torch
    import torch.distributed as td
    from accelerate import PartialState

    spec = (device or "auto").strip().lower()
    cpu = spec == "cpu" or not torch.cuda.is_available()
    if not td.is_initialized():
        try:
            # c10d logs every failed connect attempt (with C++ stack frames) straight to fd 2;
            # the error below says it in one line instead.
            # As torch's env:// rendezvous does: under torchrun the elastic agent already hosts
            # the store at MASTER_ADDR:MASTER_PORT and every rank is a client; otherwise rank 0
            # hosts it (multi-tenant) and waits for the others, here for init_timeout only.
            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
            with _stderr_silenced():
                store = td.TCPStore(
                    addr,
                    port,
                    world,
                    is_master=rank == 0 and not agent,
                    timeout=timedelta(seconds=init_timeout),
                    wait_for_workers=not agent,
                    multi_tenant=True,
                )
                store.set_timeout(timedelta(seconds=timeout))
                td.init_process_group(
                    "gloo" if cpu else "nccl",
                    store=td.PrefixStore("default_pg", store),
                    rank=rank,
                    world_size=world,
                    timeout=timedelta(seconds=timeout),
                )
        except (RuntimeError, ValueError, OSError) as e:
            who = (
                "the other ranks did not join"
                if rank == 0
                else f"rank 0 at {addr}:{port} did not answer"
            )
            detail = (str(e).splitlines() or [""])[0][:160]
            raise LaunchError(
                f"rank {rank} of {world}: the process group did not form within "
                f"{init_timeout:g} s ({who}; {type(e).__name__}: {detail})",
                hint=LAUNCH_HINT.replace(
                    "process.", "process; SAFELORA_DIST_INIT_TIMEOUT sets the wait."
                ),
            ) from None
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=timeout))
    d = Dist(
        rank=int(state.process_index),
        world_size=int(state.num_processes),
        local_rank=int(state.local_process_index),
        device=state.device,
    )
    _CURRENT.append(d)
    return d


def rank_device(spec: str | None, dist: Dist | None) -> str:
    """The ``--device`` this rank uses (module docstring)."""
    s = (spec or "auto").strip().lower()
    if dist is None:
        return spec or "auto"
    if s == "auto" or (s == "cuda" and dist.device.type == "cuda"):
        if dist.device.type == "cuda":
            return f"cuda:{dist.device.index or 0}"
        return "cpu"  # PartialState says "cpu:0"; --device spells it "cpu"
    return spec or "auto"


def balance(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Split item indices into ``parts`` lists of about equal total cost (greedy LPT).

    Items go in decreasing cost (ties: lower index first) to the least loaded part (ties: lower
    part first), which is within 4/3 of the best split. Each list is in increasing index order.
    """
    if parts < 1:
        raise ValueError("parts must be >= 1")
    heap = [(0.0, p) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        load, p = heapq.heappop(heap)
        out[p].append(i)
        heapq.heappush(heap, (load + float(costs[i]), p))
    return [sorted(x) for x in out]
