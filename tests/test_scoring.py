"""scoring.py against a float64 dense oracle built from the definitions (DESIGN §1).

The oracle forms ``C = V V^T / ||V||_F`` and the dense ``d_out x d_in`` products ``C B A`` and
``B A`` directly; the code under test never does. Adapters and projector sources are small
in-test fakes that follow the adapter.py / projector.py contracts, so these tests pin the
scoring logic independently of the readers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from safelora_cli.adapter import LoraModule
from safelora_cli.naming import natural_sorted
from safelora_cli.scoring import (
    cosine_from_traces,
    lora_norm,
    pdst,
    score_adapters,
)
from safelora_cli.selection import Selection

# ----------------------------------------------------------------------------- oracle


def oracle_c(v: torch.Tensor) -> torch.Tensor:
    v = v.to(torch.float64)
    n = torch.linalg.matrix_norm(v)
    return torch.zeros(v.shape[0], v.shape[0], dtype=torch.float64) if n == 0 else v @ v.T / n


def oracle_cos(c: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float | None:
    b, a = b.to(torch.float64), a.to(torch.float64)
    ba = b @ a
    cba = c @ ba
    nba, ncba = torch.linalg.matrix_norm(ba), torch.linalg.matrix_norm(cba)
    if nba == 0 or ncba == 0:
        return None
    return float((cba * ba).sum() / (ncba * nba))


def oracle_select(cos: dict[str, float | None], mode: str, value: float) -> set[str]:
    """The official rules restated: round to 5 dp; count -> K-th smallest as threshold."""
    defined = {k: round(v, 5) for k, v in cos.items() if v is not None}
    if mode == "threshold":
        t = value
    else:
        k = int(value) if mode == "num_layers" else math.ceil(value * len(defined))
        ordered = sorted(defined.values())
        if not ordered:
            return set()
        t = ordered[min(k, len(ordered)) - 1]
    return {k for k, v in defined.items() if v <= t}


# ----------------------------------------------------------------------------- fakes


@dataclass
class FakeSource:
    arg: str


@dataclass
class FakeSkipped:
    name: str
    keys: tuple[str, ...]
    reason: str


CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclass
class FakeAdapter:
    path: Path
    tensors: dict[str, torch.Tensor]
    modules: list[LoraModule]
    skipped: list[FakeSkipped] = field(default_factory=list)
    loads: int = 0

    @property
    def source(self) -> FakeSource:
        return FakeSource(str(self.path))

    def load(self, key: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        self.loads += 1
        t = self.tensors[key].clone()
        return t if dtype is None else t.to(dtype)

    def load_a(self, m: LoraModule, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.load(m.key_a, dtype=dtype)

    def load_b(self, m: LoraModule, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.load(m.key_b, dtype=dtype)


def make_adapter(
    path: str,
    shapes: dict[str, tuple[int, int]],
    *,
    r: int = 4,
    alpha: float = 8.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    zero_b: tuple[str, ...] = (),
) -> FakeAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    for name, (d_out, d_in) in shapes.items():
        ka = f"base_model.model.{name}.lora_A.weight"
        kb = f"base_model.model.{name}.lora_B.weight"
        tensors[ka] = torch.randn(r, d_in, generator=g).to(dtype)
        b = torch.randn(d_out, r, generator=g).to(dtype)
        tensors[kb] = torch.zeros_like(b) if name in zero_b else b
        modules.append(
            LoraModule(name, ka, kb, r, alpha, alpha / r, False, d_out, d_in, CODES[dtype])
        )
    return FakeAdapter(Path(path), tensors, modules)


@dataclass
class FakeProjector:
    weight: str
    tensor: torch.Tensor  # dense C, float64 (the fake's choice of representation)
    norm_v: float
    d_out: int
    fan_in_fan_out: bool = False

    @property
    def degenerate(self) -> bool:
        return self.norm_v == 0

    def apply(self, b: torch.Tensor) -> torch.Tensor:
        return self.tensor @ b.to(torch.float64)


class FakeProjectorSource:
    def __init__(self, vs: dict[str, torch.Tensor]) -> None:
        self.vs = vs
        self.requests: list[tuple[str, bool]] = []

    def projectors(self, requests: list[tuple[str, bool]]):
        for weight, fif in requests:
            self.requests.append((weight, fif))
            v = self.vs[weight]
            yield FakeProjector(weight, oracle_c(v), float(torch.linalg.matrix_norm(v)), v.shape[0])


def random_vs(shapes: dict[str, tuple[int, int]], seed: int = 7, zero=()) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{n}.weight": (
            torch.zeros(s, dtype=torch.float32)
            if n in zero
            else torch.randn(*s, generator=g, dtype=torch.float32)
        )
        for n, s in shapes.items()
    }


# ----------------------------------------------------------------------------- traces


@pytest.mark.parametrize(("d_out", "d_in", "r"), [(8, 12, 2), (20, 6, 4), (16, 16, 1), (5, 9, 8)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_matches_dense_oracle(d_out: int, d_in: int, r: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    c = oracle_c(v)
    got = cosine_from_traces(c @ b, b, a)
    want = oracle_cos(c, b, a)
    assert got is not None and want is not None
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_cosine_of_float32_inputs_is_computed_in_float64() -> None:
    g = torch.Generator().manual_seed(3)
    v = torch.randn(24, 40, generator=g)
    b = torch.randn(24, 4, generator=g)
    a = torch.randn(4, 40, generator=g)
    c = oracle_c(v)
    got = cosine_from_traces((c @ b.double()).float(), b, a)
    assert got == pytest.approx(oracle_cos(c, b, a), rel=1e-5)


def test_cosine_undefined_without_division_by_zero() -> None:
    g = torch.Generator().manual_seed(4)
    b = torch.randn(6, 2, generator=g, dtype=torch.float64)
    a = torch.randn(2, 5, generator=g, dtype=torch.float64)
    assert cosine_from_traces(torch.zeros(6, 2, dtype=torch.float64), b, a) is None
    assert cosine_from_traces(b, torch.zeros(6, 2), a) is None
    assert cosine_from_traces(b, b, torch.zeros(2, 5)) is None


def test_cosine_of_identical_updates_is_one_and_clamped() -> None:
    g = torch.Generator().manual_seed(5)
    b = torch.randn(7, 3, generator=g, dtype=torch.float64)
    a = torch.randn(3, 9, generator=g, dtype=torch.float64)
    assert cosine_from_traces(b, b, a) == pytest.approx(1.0, abs=1e-15)
    assert cosine_from_traces(b * 1e3, b, a) <= 1.0
    assert cosine_from_traces(-b, b, a) == pytest.approx(-1.0, abs=1e-15)


def test_lora_norm_matches_dense() -> None:
    g = torch.Generator().manual_seed(6)
    b = torch.randn(10, 3, generator=g)
    a = torch.randn(3, 14, generator=g)
    want = float(torch.linalg.matrix_norm(0.5 * b.double() @ a.double()))
    assert lora_norm(b, a, 0.5) == pytest.approx(want, rel=1e-12)
    assert lora_norm(torch.zeros(10, 3), a, 2.0) == 0.0


def test_pdst_is_a_mean() -> None:
    assert pdst([1.0, 0.5]) == pytest.approx(0.75)
    assert pdst([]) is None


# ----------------------------------------------------------------------------- batch scoring

SHAPES = {
    f"model.layers.{i}.self_attn.{p}": s
    for i in range(3)
    for p, s in (("q_proj", (16, 16)), ("v_proj", (8, 16)), ("up_proj", (24, 16)))
}


def _expected(ad: FakeAdapter, vs: dict, mode: str, value: float):
    cos = {}
    cb = {}
    for m in ad.modules:
        c = oracle_c(vs[m.weight_name])
        b = ad.tensors[m.key_b].double()
        cos[m.name] = oracle_cos(c, b, ad.tensors[m.key_a].double())
        cb[m.name] = c @ b
    chosen = oracle_select(cos, mode, value)
    return cos, cb, chosen


@pytest.mark.parametrize(
    ("mode", "value"),
    [
        ("num_layers", 1),
        ("num_layers", 4),
        ("num_layers", 9),
        ("num_layers", 50),
        ("threshold", 0.3),
        ("threshold", -1.0),
        ("fraction", 0.1),
        ("fraction", 0.5),
        ("fraction", 1.0),
    ],
)
def test_score_adapters_against_oracle(mode: str, value: float) -> None:
    vs = random_vs(SHAPES)
    ad = make_adapter("/x/ad", SHAPES)
    [scored] = score_adapters([ad], FakeProjectorSource(vs), Selection(mode, value))
    cos, cb, chosen = _expected(ad, vs, mode, value)
    rep = scored.report
    assert {m.name for m in rep.modules if m.projected} == chosen
    assert set(scored.tensors) == {m.key_b for m in ad.modules if m.name in chosen}
    dists = []
    for ms, m in zip(rep.modules, ad.modules, strict=True):
        assert ms.name == m.name and ms.weight == m.weight_name
        assert ms.cosine == pytest.approx(cos[m.name], rel=1e-10)
        b_final = cb[m.name] if ms.projected else ad.tensors[m.key_b].double()
        if ms.projected:
            assert ms.reason is None
            assert scored.tensors[m.key_b].dtype == torch.float32
            assert torch.allclose(scored.tensors[m.key_b].double(), cb[m.name], rtol=1e-6)
            b_final = scored.tensors[m.key_b].double()
        else:
            assert ms.reason and "above the threshold" in ms.reason
        dists.append(1 / (1 + float(torch.linalg.matrix_norm(b_final - cb[m.name]))))
        dense = m.scale * ad.tensors[m.key_b].double() @ ad.tensors[m.key_a].double()
        assert ms.norm_dw == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-10)
        assert ms.norm_v == pytest.approx(float(torch.linalg.matrix_norm(vs[m.weight_name])))
    assert rep.pdst == pytest.approx(sum(dists) / len(dists), rel=1e-12)
    assert rep.projected == len(chosen) and rep.total == len(SHAPES)


def test_count_mode_projects_boundary_ties_and_reports_them() -> None:
    # Identical A, B and V for every module: all cosines tie; K = 2 projects all 4.
    shapes = {f"model.layers.{i}.q_proj": (6, 6) for i in range(4)}
    ad = make_adapter("/x/ad", shapes)
    first = ad.modules[0]
    for m in ad.modules:
        ad.tensors[m.key_a] = ad.tensors[first.key_a].clone()
        ad.tensors[m.key_b] = ad.tensors[first.key_b].clone()
    v = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    vs = {f"{n}.weight": v.clone() for n in shapes}
    [scored] = score_adapters([ad], FakeProjectorSource(vs), Selection("num_layers", 2))
    assert scored.report.projected == 4
    assert scored.report.ties == 2
    assert scored.report.to_json()["ties"] == 2


def test_degenerate_modules_are_reported_and_never_projected() -> None:
    shapes = {
        "model.layers.0.q_proj": (8, 8),
        "model.layers.1.q_proj": (8, 8),
        "model.layers.2.q_proj": (8, 8),
    }
    vs = random_vs(shapes, zero=("model.layers.0.q_proj",))
    ad = make_adapter("/x/ad", shapes, zero_b=("model.layers.1.q_proj",))
    [scored] = score_adapters([ad], FakeProjectorSource(vs), Selection("threshold", 1.0))
    by = {m.name: m for m in scored.report.modules}
    no_signal, untrained, normal = (by[n] for n in shapes)
    assert no_signal.cosine is None and not no_signal.projected
    assert "no alignment signal" in (no_signal.reason or "")
    assert untrained.cosine is None and not untrained.projected
    assert "untrained" in (untrained.reason or "")
    assert normal.projected and normal.cosine is not None
    assert set(scored.tensors) == {ad.modules[2].key_b}
    # Pdst terms: V = 0 means C = 0, so the kept B is ||B|| away; B = 0 gives 1.
    b0 = ad.tensors[ad.modules[0].key_b].double()
    assert no_signal.dist == pytest.approx(1 / (1 + float(torch.linalg.matrix_norm(b0))))
    assert untrained.dist == 1.0
    js = scored.report.to_json()
    assert [m["cosine"] for m in js["modules"]][:2] == [None, None]
    json.dumps(js, allow_nan=False)


def test_batch_reads_each_projector_once_in_natural_order() -> None:
    shapes_a = {f"model.layers.{i}.q_proj": (8, 8) for i in (0, 2, 10)}
    shapes_b = {f"model.layers.{i}.q_proj": (8, 8) for i in (2, 9, 10)}
    vs = random_vs({**shapes_a, **shapes_b})
    src = FakeProjectorSource(vs)
    a1 = make_adapter("/x/a1", shapes_a, seed=1)
    a2 = make_adapter("/x/a2", shapes_b, seed=2, dtype=torch.bfloat16)
    out = score_adapters([a1, a2], src, Selection("num_layers", 2))
    names = [w for w, _ in src.requests]
    assert names == natural_sorted({f"{n}.weight" for n in {**shapes_a, **shapes_b}})
    assert len(names) == len(set(names)) == 4
    for ad, scored in zip((a1, a2), out, strict=True):
        cos, cb, chosen = _expected(ad, vs, "num_layers", 2)
        assert {m.name for m in scored.report.modules if m.projected} == chosen
        for m in scored.report.modules:
            assert m.cosine == pytest.approx(cos[m.name], rel=1e-10)
        for key, t in scored.tensors.items():
            name = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
            assert t.dtype == ad.tensors[key].dtype
            assert torch.equal(t, cb[name].to(ad.tensors[key].dtype))


def test_shape_mismatch_names_the_module() -> None:
    from safelora_cli.errors import AdapterError

    ad = make_adapter("/x/ad", {"model.layers.0.q_proj": (8, 8)})
    vs = {"model.layers.0.q_proj.weight": torch.randn(6, 8)}
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.q_proj"):
        score_adapters([ad], FakeProjectorSource(vs), Selection("num_layers", 1))


def test_weight_for_maps_modules_and_progress_is_reported() -> None:
    shapes = {"model.layers.0.q_proj": (8, 8), "model.layers.1.q_proj": (8, 8)}
    vs = {f"model.language_model.{k}": v for k, v in random_vs(shapes).items()}
    src = FakeProjectorSource(vs)

    class Rec:
        def __init__(self) -> None:
            self.events: list[Any] = []

        def start(self, total: int, description: str) -> None:
            self.events.append(("start", total))

        def advance(self, units: int = 1, nbytes: int = 0) -> None:
            self.events.append(("advance", units, nbytes > 0))

        def finish(self) -> None:
            self.events.append(("finish",))

    rec = Rec()
    ad = make_adapter("/x/ad", shapes)
    [s] = score_adapters(
        [ad],
        src,
        Selection("num_layers", 1),
        weight_for=lambda m: "model.language_model." + m.weight_name,
        progress=rec,
    )
    assert [m.weight for m in s.report.modules] == sorted(vs)
    assert rec.events == [("start", 2), ("advance", 1, True), ("advance", 1, True), ("finish",)]
