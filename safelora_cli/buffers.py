"""Reusable host buffers for the weight-pair stream (compute-projections, ``patch --base``).

Why: :func:`safelora_cli.compute.limit_heap_retention` pins glibc's mmap threshold at 1 MiB so
that freed weights leave RSS at once. The price is that every fresh tensor of a MiB or more is
a new mapping whose pages fault in one by one and are unmapped again on free. At width 1024
(4 MiB per float32 weight) that was about 12 ms per weight, a third of compute-projections.
Handing the same few buffers round keeps both: each page faults once, and memory stays at the
buffers in flight.

Contract:

- :class:`BufferPool` ``(slot_bytes=0, max_free=6)``: thread-safe. :meth:`take` ``(nbytes)``
  returns a contiguous CPU ``uint8`` tensor of exactly ``nbytes`` whose contents are undefined;
  it is a prefix view of a *slot* of at least ``max(nbytes, slot_bytes)`` bytes. A free slot
  that is large enough is reused (the smallest such one); otherwise a new slot is allocated.
  :meth:`tensor` ``(shape, dtype)`` is ``take`` viewed as that dtype and shape.
- :meth:`give` ``(t)``: ``t`` (any tensor starting at a slot's first byte, e.g. the result of
  :meth:`tensor`) returns its slot to the pool; a tensor the pool did not hand out is ignored,
  so callers may give whatever they hold. The caller must not use ``t`` (or any other view of
  that slot) afterwards: the memory will be handed out again. At most ``max_free`` slots are
  kept; beyond that a given slot is dropped (freed).
- ``slot_bytes``: with every request at most this size (the largest weight of a known work
  list), all slots have one size and any free slot serves any request. Pages a request does not
  touch are never faulted in, so a slot costs RSS only for what has been written to it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class BufferPool:
    """A few large CPU buffers handed round instead of freed (see the module docstring)."""

    def __init__(self, slot_bytes: int = 0, *, max_free: int = 6):
        self.slot_bytes = int(slot_bytes)
        self.max_free = int(max_free)
        self._free: list[torch.Tensor] = []
        self._out: dict[int, torch.Tensor] = {}  # data_ptr -> slot handed out
        self._lock = threading.Lock()
        self.allocated = 0  # slots ever allocated (for tests and benchmarks)

    def take(self, nbytes: int) -> torch.Tensor:
        """A ``uint8`` tensor of exactly ``nbytes`` (contents undefined), backed by a slot."""
        import torch

        nbytes = int(nbytes)
        with self._lock:
            fits = [i for i, s in enumerate(self._free) if s.numel() >= nbytes]
            if fits:
                i = min(fits, key=lambda j: self._free[j].numel())
                slot = self._free.pop(i)
            else:
                slot = None
        if slot is None:
            slot = torch.empty(max(nbytes, self.slot_bytes, 1), dtype=torch.uint8)
            with self._lock:
                self.allocated += 1
        with self._lock:
            self._out[slot.data_ptr()] = slot
        return slot[:nbytes]

    def tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """:meth:`take` of ``prod(shape)`` elements of ``dtype``, viewed with that shape."""
        import torch

        n = 1
        for s in shape:
            n *= int(s)
        size = torch.empty((), dtype=dtype).element_size()
        return self.take(n * size).view(dtype).view(tuple(int(s) for s in shape))

    def give(self, t: torch.Tensor | None) -> None:
        """Return the slot ``t`` starts at; ignored for a tensor the pool did not hand out."""
        if t is None:
            return
        with self._lock:
            slot = self._out.pop(t.data_ptr(), None)
            if slot is not None and len(self._free) < self.max_free:
                self._free.append(slot)

    @property
    def outstanding(self) -> int:
        """Slots handed out and not given back."""
        with self._lock:
            return len(self._out)

    def clear(self) -> None:
        """Drop every free slot (outstanding ones are forgotten too; their memory goes when
        their last view is dropped)."""
        with self._lock:
            self._free.clear()
            self._out.clear()
