"""``Projector.apply_many`` (issue 19): batched ``C @ B`` that never depends on the batch.

Each adapter's result must be bit-identical to applying the projector to its ``B`` alone,
whatever else is in the batch (size, order, ranks, duplicates), for both representations and
for shapes whose rows are not a multiple of the block size; and it must agree with a dense
float64 oracle ``C = V V^T / ||V||_F`` to float64 precision.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from safelora_cli import projector as projector_mod
from safelora_cli.errors import AdapterError
from safelora_cli.projector import FACTOR, GRAM, Projector, apply_block_rows, build_projector
from safelora_cli.scoring import score_adapters
from safelora_cli.selection import Selection
from tests.test_projector import spy_product_shapes
from tests.test_scoring import make_adapter

# (d_out, d_in): square, wide (d_out < d_in), tall (d_out > d_in), and row counts that are
# not multiples of the 8-row blocks the small-block fixture makes (last block shorter).
SHAPES = [(40, 40), (29, 61), (67, 13), (8, 8), (1, 5), (130, 47)]


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 8 rows at every width used here: many blocks even at test sizes."""
    monkeypatch.setattr(projector_mod, "APPLY_BLOCK_BYTES", 8 * 8)


def stored_projector(kind: str, d_out: int, d_in: int, seed: int) -> tuple[Projector, torch.Tensor]:
    """A float32-stored projector of a random V (as the cache stores it) and that V (float32)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d_out, d_in, generator=g)
    return build_projector("w", v, fan_in_fan_out=False, representation=kind), v


def float64_projector(kind: str, v: torch.Tensor) -> Projector:
    """The exact float64 projector of float64 ``v`` (gram ``C`` or factor ``F``)."""
    n = float(torch.linalg.norm(v))
    t = v @ v.T / n if kind == GRAM else v / math.sqrt(n)
    return Projector("w", kind, t, n, False, v.shape[0], v.shape[1])


def batch_of(d_out: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ranks = [1, 4, 16, 3, 8, 2]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float16]
    return [
        torch.randn(d_out, r, generator=g).to(dtypes[k % len(dtypes)]) for k, r in enumerate(ranks)
    ]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


@pytest.mark.parametrize("blocks", ["small", "default"])
@pytest.mark.parametrize("kind", [GRAM, FACTOR])
@pytest.mark.parametrize(("d_out", "d_in"), SHAPES)
def test_batch_is_bit_identical_to_alone(
    kind: str, d_out: int, d_in: int, blocks: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if blocks == "small":
        monkeypatch.setattr(projector_mod, "APPLY_BLOCK_BYTES", 8 * 8)
        assert apply_block_rows(d_in) == 8
    pr, _ = stored_projector(kind, d_out, d_in, seed=d_out * 100 + d_in)
    assert pr.kind == kind
    bs = batch_of(d_out, seed=d_out + d_in)
    alone = [pr.apply(b) for b in bs]
    for a, b in zip(alone, bs, strict=True):
        assert a.dtype == torch.float64 and a.shape == b.shape
    rng = random.Random(d_out * d_in)
    batches = [list(range(len(bs))), list(reversed(range(len(bs)))), [2], [3, 3, 0]]
    for _ in range(4):
        k = rng.randint(1, len(bs))
        batches.append(rng.sample(range(len(bs)), k))
    for idx in batches:
        got = pr.apply_many([bs[i] for i in idx])
        assert len(got) == len(idx)
        for i, x in zip(idx, got, strict=True):
            assert torch.equal(x, alone[i]), (kind, d_out, d_in, idx, i)


@pytest.mark.parametrize("kind", [GRAM, FACTOR])
@pytest.mark.parametrize(("d_out", "d_in"), SHAPES)
def test_matches_dense_float64_oracle(kind: str, d_out: int, d_in: int, small_blocks: None) -> None:
    g = torch.Generator().manual_seed(d_out + 7 * d_in)
    v = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    c = v @ v.T / torch.linalg.norm(v)  # the oracle, dense, from the definition
    pr = float64_projector(kind, v)
    bs = batch_of(d_out, seed=3)
    for b, x in zip(bs, pr.apply_many(bs), strict=True):
        want = c @ b.to(torch.float64)
        assert rel_err(x, want) < 1e-12
    # The float32-stored projector (the cache's): exact against its own stored numbers.
    pr32, _ = stored_projector(kind, d_out, d_in, seed=5)
    t = pr32.tensor.to(torch.float64)
    c32 = t if kind == GRAM else t @ t.T
    for b, x in zip(bs, pr32.apply_many(bs), strict=True):
        assert rel_err(x, c32 @ b.to(torch.float64)) < 1e-12


def test_block_rows_are_a_constant_of_the_width() -> None:
    # Never a function of the batch: the signature takes the width only.
    assert apply_block_rows(4096) == projector_mod.APPLY_BLOCK_BYTES // (8 * 4096)
    assert apply_block_rows(4096) % 8 == 0 and apply_block_rows(10**9) == 8


def test_empty_degenerate_and_wrong_rows(small_blocks: None) -> None:
    pr, _ = stored_projector(FACTOR, 20, 9, seed=1)
    assert pr.apply_many([]) == []
    bad = [torch.randn(20, 2), torch.randn(21, 2)]
    with pytest.raises(AdapterError, match="lora_B has shape"):
        pr.apply_many(bad)
    zero = build_projector("w", torch.zeros(20, 9), fan_in_fan_out=False)
    out = zero.apply_many([torch.randn(20, 3), torch.randn(20, 1)])
    assert [tuple(x.shape) for x in out] == [(20, 3), (20, 1)]
    assert all(x.dtype == torch.float64 and not x.any() for x in out)


def test_factor_never_forms_d_out_square(monkeypatch: pytest.MonkeyPatch) -> None:
    pr, _ = stored_projector(FACTOR, 64, 3, seed=2)
    seen = spy_product_shapes(monkeypatch)
    pr.apply_many([torch.randn(64, 2), torch.randn(64, 5)])
    assert seen and all(s != (64, 64) for s in seen)


class _Source:
    """Real float32 projectors of fixed random deltas, as a cache would yield them."""

    def __init__(self, shapes: dict[str, tuple[int, int]], kind: str) -> None:
        self.projs = {
            f"{n}.weight": build_projector(
                f"{n}.weight",
                torch.randn(*s, generator=torch.Generator().manual_seed(len(n) + s[0])),
                fan_in_fan_out=False,
                representation=kind,
            )
            for n, s in shapes.items()
        }

    def projectors(self, requests):  # type: ignore[no-untyped-def]
        for weight, _ in requests:
            yield self.projs[weight]


@pytest.mark.parametrize("kind", [GRAM, FACTOR])
def test_scores_do_not_depend_on_the_batch(kind: str, small_blocks: None) -> None:
    shapes = {"layers.0.q": (37, 21), "layers.0.v": (21, 37), "layers.1.q": (37, 21)}
    src = _Source(shapes, kind)
    adapters = [make_adapter(f"/ad{k}", shapes, r=2 + k, seed=k) for k in range(4)]
    sel = Selection.from_flags(2, None, None)
    together = score_adapters(adapters, src, sel)
    for k in (3, 0):
        alone = score_adapters([adapters[k]], src, sel)[0]
        both = together[k]
        assert alone.report.to_json() == both.report.to_json()
        assert alone.tensors.keys() == both.tensors.keys()
        for key, t in alone.tensors.items():
            assert torch.equal(t, both.tensors[key])
    assert Path(together[1].report.path).name == "ad1"


@pytest.mark.parametrize("kind", [GRAM, FACTOR])
def test_float32_tensor_and_its_float64_upcast_give_the_same_bits(
    kind: str, small_blocks: None
) -> None:
    # apply upcasts each block exactly, so a float32-stored projector and the same numbers in
    # float64 (what patch-model's update_blocks used to pass) give identical results.
    import dataclasses

    pr32, _ = stored_projector(kind, 45, 30, seed=9)
    pr64 = dataclasses.replace(pr32, tensor=pr32.tensor.to(torch.float64))
    for b in batch_of(45, seed=4):
        assert torch.equal(pr32.apply(b), pr64.apply(b))
