"""Selection semantics against a direct re-statement of the official code's rules."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safelora_cli.errors import UsageError
from safelora_cli.selection import Selection, select


def _oracle(cosines: dict[str, float | None], mode: str, value: float) -> set[str]:
    """The official semantics, stated independently: np.round(cos, 5); sort; K-th; <=."""
    rounded = {n: float(f"{c:.5f}") for n, c in cosines.items() if c is not None}
    if mode == "threshold":
        t = value
    else:
        k = int(value) if mode == "num_layers" else math.ceil(round(value * len(rounded), 9))
        if not rounded or k <= 0:
            return set()
        t = sorted(rounded.values())[: int(k)][-1]
    return {n for n, c in rounded.items() if c <= t}


def test_default_is_ten_modules() -> None:
    assert Selection.from_flags(None, None, None) == Selection("num_layers", 10)


@pytest.mark.parametrize(
    "flags",
    [(3, 0.5, None), (3, None, 0.1), (None, 0.5, 0.1), (3, 0.5, 0.1)],
)
def test_flags_are_mutually_exclusive(flags: tuple) -> None:
    with pytest.raises(UsageError, match="mutually exclusive"):
        Selection.from_flags(*flags)


@pytest.mark.parametrize(
    "flags",
    [
        (0, None, None),
        (-2, None, None),
        (None, 1.5, None),
        (None, None, 0.0),
        (None, None, 1.01),
        (None, float("nan"), None),
    ],
)
def test_out_of_range_values_are_usage_errors(flags: tuple) -> None:
    with pytest.raises(UsageError) as info:
        Selection.from_flags(*flags)
    assert info.value.exit_code == 2


def test_count_mode_projects_boundary_ties() -> None:
    cos = {"a": 0.1, "b": 0.2, "c": 0.2, "d": 0.3}
    d = select(cos, Selection("num_layers", 2))
    assert d.projected == {"a", "b", "c"}
    assert d.threshold == 0.2 and d.ties == 1


def test_rounding_to_five_decimals_creates_ties() -> None:
    cos = {"a": 0.1234561, "b": 0.1234549, "c": 0.9}
    # Both round to 0.12346 / 0.12345: distinct; 0.1234561 and 0.1234564 would tie.
    assert select(cos, Selection("num_layers", 1)).projected == {"b"}
    cos2 = {"a": 0.1234561, "b": 0.1234564, "c": 0.9}
    assert select(cos2, Selection("num_layers", 1)).projected == {"a", "b"}


def test_k_larger_than_n_projects_all_defined() -> None:
    cos = {"a": 0.5, "b": None, "c": -0.2}
    d = select(cos, Selection("num_layers", 10))
    assert d.projected == {"a", "c"}


def test_fraction_uses_ceil_and_ignores_float_noise() -> None:
    cos = {f"m{i}": i / 100 for i in range(30)}
    # 0.1 * 30 is 3.0000000000000004 in binary floating point; ceil must give 3, not 4.
    assert len(select(cos, Selection("fraction", 0.1)).projected) == 3
    assert len(select(cos, Selection("fraction", 0.11)).projected) == 4


def test_undefined_cosines_are_never_projected() -> None:
    d = select({"a": None, "b": None}, Selection("threshold", 1.0))
    assert d.projected == frozenset()


@given(
    st.dictionaries(
        st.text("abcdef", min_size=1, max_size=3),
        st.one_of(st.none(), st.floats(-1, 1)),
        max_size=12,
    ),
    st.sampled_from(["num_layers", "threshold", "fraction"]),
    st.floats(0.01, 1.0),
    st.integers(1, 15),
)
def test_select_matches_oracle(cos: dict, mode: str, frac: float, k: int) -> None:
    value = {"num_layers": k, "threshold": frac * 2 - 1, "fraction": frac}[mode]
    assert select(cos, Selection(mode, value)).projected == _oracle(cos, mode, value)


def test_json_form() -> None:
    assert Selection("num_layers", 4).to_json() == {"mode": "num_layers", "value": 4}
    assert Selection("threshold", 0.25).to_json() == {"mode": "threshold", "value": 0.25}
