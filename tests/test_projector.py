"""Projector math against a float64 dense oracle formed from the definition (DESIGN §1)."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safelora_cli.errors import AdapterError, CheckpointError
from safelora_cli.projector import (
    FACTOR,
    GRAM,
    Projector,
    ProjectorSource,
    alignment_delta,
    alignment_delta_serial,
    build_projector,
    prefetched,
    representation_for,
)

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def oracle_cb(w_base: torch.Tensor, w_aligned: torch.Tensor, b: torch.Tensor, fifo: bool):
    """C @ B in float64 straight from the definition: V = Wa - Wb, C = V V^T / ||V||_F."""
    v = w_aligned.to(torch.float64) - w_base.to(torch.float64)
    if fifo:
        v = v.T
    c = v @ v.T / torch.linalg.norm(v)
    return c @ b.to(torch.float64), v, c


def cb_error(got: torch.Tensor, want: torch.Tensor, c: torch.Tensor, b: torch.Tensor) -> float:
    """``||got - C B||_F / (||C||_2 ||B||_F)``: the error relative to the scale of the product.

    Storing C (or F) in float32 perturbs each number by ~6e-8 relative, so the error in C B is
    bounded by ~1e-7 * ||C|| ||B||. Relative to ||C B|| itself it is not bounded: a B that lies
    almost in the null space of C (rank <= d_in) makes C B tiny, in float64 as in any precision.
    For a typical B the two measures agree.
    """
    scale = torch.linalg.matrix_norm(c, ord=2) * torch.linalg.norm(b.to(torch.float64))
    return float(torch.linalg.norm(got.double() - want) / scale)


def make_weights(d_out: int, d_in: int, dtype: torch.dtype, fifo: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (d_in, d_out) if fifo else (d_out, d_in)
    wb = torch.randn(shape, generator=g)
    wa = wb + 0.05 * torch.randn(shape, generator=g)
    return wb.to(dtype), wa.to(dtype)


def test_representation_rule() -> None:
    assert representation_for(16, 32) == GRAM
    assert representation_for(32, 32) == GRAM
    assert representation_for(96, 32) == FACTOR


@settings(max_examples=40, deadline=None)
@given(
    d_out=st.integers(1, 48),
    d_in=st.integers(1, 48),
    r=st.integers(1, 6),
    dtype=st.sampled_from(sorted(DTYPES)),
    fifo=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_apply_matches_dense_oracle(
    d_out: int, d_in: int, r: int, dtype: str, fifo: bool, seed: int
) -> None:
    wb, wa = make_weights(d_out, d_in, DTYPES[dtype], fifo, seed)
    b = torch.randn(d_out, r, generator=torch.Generator().manual_seed(seed + 1))
    want, v64, c64 = oracle_cb(wb, wa, b, fifo)
    v = alignment_delta(wb, wa, fan_in_fan_out=fifo)
    assert v.dtype == torch.float32 and v.shape == (d_out, d_in) and v.is_contiguous()
    pr = build_projector("w", v, fan_in_fan_out=fifo)
    assert pr.kind == representation_for(d_out, d_in)
    assert pr.tensor.shape == ((d_out, d_out) if pr.kind == GRAM else (d_out, d_in))
    assert pr.tensor.dtype == torch.float32
    assert pr.norm_v == pytest.approx(float(torch.linalg.norm(v64)), rel=1e-6)
    got = pr.apply(b)
    assert got.dtype == torch.float64 and got.shape == (d_out, r)
    assert cb_error(got, want, c64, b) < 1e-6


def test_delta_upcasts_before_subtracting() -> None:
    # Two bf16 values whose bf16 difference would round: 1 + 2^-7 - 1 is exact only in f32.
    wb = torch.full((2, 3), 1.0, dtype=torch.bfloat16)
    wa = torch.full((2, 3), 1.0078125, dtype=torch.bfloat16)  # 1 + 2^-7, exact in bf16
    wb[0, 0] = 256.0
    wa[0, 0] = 257.0  # 257 is not a bf16 number: stored as 256 or 258
    v = alignment_delta(wb, wa, fan_in_fan_out=False)
    ref = wa.to(torch.float64) - wb.to(torch.float64)
    assert torch.equal(v.double(), ref)


def test_delta_does_not_alias_inputs() -> None:
    wb = torch.zeros(3, 4)
    wa = torch.ones(3, 4)
    v = alignment_delta(wb, wa, fan_in_fan_out=False)
    v.add_(5)
    assert torch.equal(wa, torch.ones(3, 4)) and torch.equal(wb, torch.zeros(3, 4))
    pr = build_projector("w", v, fan_in_fan_out=False)
    assert float(v[0, 0]) == 6.0  # build_projector did not scale v in place
    assert pr.norm_v > 0


def test_conv1d_transposes_weight_not_b() -> None:
    wb, wa = make_weights(8, 5, torch.float32, True, 0)  # stored [in=5, out=8]
    assert wb.shape == (5, 8)
    v = alignment_delta(wb, wa, fan_in_fan_out=True)
    assert torch.equal(v, (wa - wb).T)
    pr = build_projector("c_attn.weight", v, fan_in_fan_out=True)
    assert (pr.d_out, pr.d_in, pr.kind) == (8, 5, FACTOR)


def test_projector_is_not_idempotent() -> None:
    # C = V V^T / ||V||_F has eigenvalues sigma_i^2 / ||V||_F: C @ C != C in general.
    v = torch.diag(torch.tensor([3.0, 4.0]))
    pr = build_projector("w", v, fan_in_fan_out=False)
    c = pr.tensor.double()
    assert torch.allclose(c, torch.diag(torch.tensor([9.0, 16.0], dtype=torch.float64)) / 5)
    assert not torch.allclose(c @ c, c)


def test_degenerate_when_v_is_zero() -> None:
    for shape in [(4, 6), (6, 4)]:
        pr = build_projector("w", torch.zeros(shape), fan_in_fan_out=False)
        assert pr.degenerate and pr.norm_v == 0.0
        assert not torch.isnan(pr.tensor).any()
        out = pr.apply(torch.randn(shape[0], 2))
        assert torch.equal(out, torch.zeros(shape[0], 2, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_names_weight_and_files(bad: float) -> None:
    v = torch.ones(3, 3)
    v[1, 2] = bad
    with pytest.raises(CheckpointError) as ei:
        build_projector("layers.0.q.weight", v, fan_in_fan_out=False, sources=("b.st", "a.st"))
    msg = str(ei.value)
    assert "layers.0.q.weight" in msg and "b.st" in msg and "a.st" in msg


def test_apply_wrong_rows_is_adapter_error() -> None:
    pr = build_projector("w", torch.ones(4, 6), fan_in_fan_out=False)
    with pytest.raises(AdapterError, match="w"):
        pr.apply(torch.ones(5, 2))


def spy_product_shapes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of every product apply may use (the @ operator, torch.mm with out= and
    Tensor.addmm_), recorded into the returned list for the rest of the test."""
    seen: list[tuple[int, ...]] = []
    for owner, name in ((torch.Tensor, "__matmul__"), (torch, "mm"), (torch.Tensor, "addmm_")):
        real = getattr(owner, name)

        def spy(*args: object, _real=real, **kw: object) -> torch.Tensor:
            out = _real(*args, **kw)
            seen.append(tuple(out.shape))
            return out

        monkeypatch.setattr(owner, name, spy)
    return seen


def test_apply_factor_never_forms_d_out_square(monkeypatch: pytest.MonkeyPatch) -> None:
    pr = build_projector("w", torch.randn(64, 3), fan_in_fan_out=False)
    assert pr.kind == FACTOR
    seen = spy_product_shapes(monkeypatch)
    pr.apply(torch.randn(64, 2))
    assert seen and all(s != (64, 64) for s in seen)


def test_dtype_option_and_to() -> None:
    pr = build_projector("w", torch.randn(3, 5), fan_in_fan_out=False, dtype=torch.float64)
    assert pr.tensor.dtype == torch.float64
    assert pr.to("cpu").tensor.device.type == "cpu"


def test_projector_positional_construction() -> None:
    t = torch.eye(2)
    pr = Projector("w", GRAM, t, 1.0, False, 2, 3)
    assert not pr.degenerate and pr.d_in == 3


def test_protocol_is_structural() -> None:
    class Src:
        def get(self, weight: str, *, fan_in_fan_out: bool = False) -> Projector:
            raise NotImplementedError

        def projectors(self, requests):  # type: ignore[no-untyped-def]
            return iter(())

    assert isinstance(Src(), ProjectorSource)


def test_prefetched_order_overlap_and_errors() -> None:
    # The next item is prepared while the caller holds the current one, never further ahead.
    started: list[int] = []

    def fn(i: int) -> int:
        started.append(i)
        if i == 2:
            raise ValueError("boom")
        return i * 10

    it = prefetched(fn, range(4))
    assert next(it) == 0
    # While the caller holds item 0, item 1 is being prepared (wait for the worker to start it).
    for _ in range(1000):
        if 1 in started:
            break
        threading.Event().wait(0.001)
    assert started[:2] == [0, 1] and 2 not in started
    assert next(it) == 10
    with pytest.raises(ValueError, match="boom"):
        next(it)
    assert list(prefetched(fn, [])) == []


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.sampled_from([1, 3, 17, 40, 33000]),
    dtype=st.sampled_from(sorted(DTYPES)),
    fifo=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_serial_delta_is_bit_identical(
    rows: int, cols: int, dtype: str, fifo: bool, seed: int
) -> None:
    # Chunks straddle ATen's grain both by rows and (cols=33000) within one row.
    g = torch.Generator().manual_seed(seed)
    wb = torch.randn(rows, cols, generator=g).to(DTYPES[dtype])
    wa = torch.randn(rows, cols, generator=g).to(DTYPES[dtype])
    want = alignment_delta(wb, wa, fan_in_fan_out=fifo)
    got = alignment_delta_serial(wb, wa, fan_in_fan_out=fifo)
    assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, want)
