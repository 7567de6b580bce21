"""Which LoRA modules get projected (DESIGN §1, the official code's semantics).

Cosines are rounded to 5 decimals first. Threshold ``t``: project iff ``cos <= t``. Count ``K``:
``t := K-th smallest cosine``, then threshold mode, so modules tied with the K-th are projected
too. Fraction ``f``: ``K = ceil(f * N)``. ``N`` counts the modules with a defined cosine;
modules without one (``V == 0`` or ``B A == 0``) are never projected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from safelora_cli.errors import UsageError

Mode = Literal["num_layers", "threshold", "fraction"]
DEFAULT_NUM_LAYERS = 10
DECIMALS = 5


@dataclass(frozen=True)
class Selection:
    """A selection rule: ``mode`` with its ``value`` (int K, float threshold, or fraction)."""

    mode: Mode
    value: float

    @classmethod
    def from_flags(
        cls, num_layers: int | None, threshold: float | None, fraction: float | None
    ) -> Selection:
        """The rule the three mutually exclusive flags ask for; ``--num-layers 10`` by default.

        Raises UsageError for more than one flag or a value out of range.
        """
        given = [
            (n, v)
            for n, v in (
                ("--num-layers", num_layers),
                ("--threshold", threshold),
                ("--fraction", fraction),
            )
            if v is not None
        ]
        if len(given) > 1:
            names = " and ".join(n for n, _ in given)
            raise UsageError(
                f"{names} are mutually exclusive.",
                hint="Choose one of --num-layers, --threshold or --fraction.",
            )
        if num_layers is not None:
            if num_layers < 1:
                raise UsageError(
                    f"--num-layers must be at least 1, got {num_layers}.",
                    hint="Give the number of modules to project, e.g. --num-layers 10.",
                )
            return cls("num_layers", int(num_layers))
        if threshold is not None:
            if not (-1.0 <= threshold <= 1.0) or math.isnan(threshold):
                raise UsageError(
                    f"--threshold must lie in [-1, 1], got {threshold}.",
                    hint="E.g. --threshold 0.35 projects modules whose cosine is at or below 0.35.",
                )
            return cls("threshold", float(threshold))
        if fraction is not None:
            if not (0.0 < fraction <= 1.0) or math.isnan(fraction):
                raise UsageError(
                    f"--fraction must lie in (0, 1], got {fraction}.",
                    hint="E.g. --fraction 0.1 projects the 10% of modules with the lowest cosine.",
                )
            return cls("fraction", float(fraction))
        return cls("num_layers", DEFAULT_NUM_LAYERS)

    def to_json(self) -> dict:
        """``{"mode", "value"}`` as in DESIGN §6."""
        value: float | int = int(self.value) if self.mode == "num_layers" else self.value
        return {"mode": self.mode, "value": value}


@dataclass(frozen=True)
class Decision:
    """The outcome of a selection over one adapter's modules."""

    projected: frozenset[str]
    threshold: float | None  # the threshold applied (count and fraction modes imply one)
    k: int | None  # the count asked for (count and fraction modes)
    ties: int  # modules projected beyond K because they tie with the K-th cosine


def round_cosine(cos: float) -> float:
    """The official code's rounding: 5 decimals."""
    return round(float(cos), DECIMALS)


def select(cosines: Mapping[str, float | None], selection: Selection) -> Decision:
    """Apply ``selection`` to raw per-module cosines (None = undefined, never projected)."""
    defined = {n: round_cosine(c) for n, c in cosines.items() if c is not None}
    n = len(defined)
    if selection.mode == "threshold":
        t: float | None = float(selection.value)
        k = None
    else:
        k = (
            int(selection.value)
            if selection.mode == "num_layers"
            else math.ceil(selection.value * n - 1e-12)
        )
        ordered = sorted(defined.values())
        t = ordered[min(k, n) - 1] if n and k > 0 else None
    if t is None:
        return Decision(frozenset(), None, k, 0)
    chosen = frozenset(name for name, c in defined.items() if c <= t)
    ties = max(0, len(chosen) - k) if k is not None else 0
    return Decision(chosen, t, k, ties)
