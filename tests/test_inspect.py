"""Library tests for safelora_cli.inspection: cache and adapter summaries, gate, row order.

Numbers are checked against float64 oracles formed from the raw weights (never against values
the code under test produced). ``golden_case`` builds the hand-computable checkpoint/adapter
pair the CLI golden files (tests/golden/) are derived from; see its docstring for the math.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safelora_cli.errors import CacheError, UsageError
from safelora_cli.inspection import (
    gate,
    order_modules,
    split_name,
    stable_rank,
    summarize_adapter,
    summarize_cache,
    validate_sort,
)
from tests import factory

# ----------------------------------------------------------------------------- helpers


def build_cache(base_dir: Path, aligned_dir: Path, out: Path, weights: list[str]) -> Path:
    """A projection cache for ``weights`` written through the cache API (linear orientation)."""
    from safelora_cli.cache import ProjectionCache
    from safelora_cli.projector import alignment_delta, build_projector
    from safelora_cli.sources import open_model

    rb, sb = open_model(str(base_dir), label="base model")
    ra, sa = open_model(str(aligned_dir), label="aligned model")
    cache = ProjectionCache.create_or_resume(out, sb, sa)
    try:
        for w in weights:
            v = alignment_delta(rb.load(w), ra.load(w), fan_in_fan_out=False)
            cache.put(build_projector(w, v, fan_in_fan_out=False))
        cache.finish()
    finally:
        cache.close()
        rb.close()
        ra.close()
    return out


@dataclass
class GoldenCase:
    base_dir: Path
    aligned_dir: Path
    adapter_dir: Path
    cache_dir: Path
    base: dict[str, torch.Tensor]
    aligned: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]


GOLDEN_WEIGHTS = [
    f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj")
]


def golden_case(tmp: Path, *, extras: bool = False) -> GoldenCase:
    """Two layers of q (4x4), k (2x4, gram) and v (8x4, factor) with d_in = 4.

    Every alignment delta is ``V = e1 e1^T`` (a single 1 at [0, 0]; multiples of 1/4 keep
    ``aligned - base`` exact in float32), so ``||V||_F = 1`` and ``C = e1 e1^T`` is the
    orthogonal projector onto the first output coordinate; layer 1's q_proj has ``V = 0``.
    With ``A`` having orthonormal rows, ``cos = ||C B||_F / ||B||_F = ||row 0 of B|| / ||B||_F``
    and ``||dW||_F = scale * ||B||_F``. Config: r = 1, alpha = 2 (scale 2); layer 0's k_proj
    has rank 2 through rank_pattern (scale 2 / 2 = 1).

    ====  ======  =======================  ======  ========  =====================
    layer module  B                        scale   ||dW||_F  cosine
    ====  ======  =======================  ======  ========  =====================
    0     q       (3, 4, 0, 0)             2       10        3/5 = 0.6
    0     k       [[3, 0], [0, 4]]         1       5         3/5 = 0.6
    0     v       e1 (8 rows)              2       2         1
    1     q       (1, 2, 2, 0), V = 0      2       6         undefined (V = 0)
    1     k       0 (2 rows)               2       0         undefined (B A = 0)
    1     v       (5, 0, .., 0, 12)        2       26        5/13 = 0.38462
    ====  ======  =======================  ======  ========  =====================

    ``extras`` adds an embedding LoRA and a modules_to_save copy of lm_head (both skipped).
    """
    base: dict[str, torch.Tensor] = {}
    aligned: dict[str, torch.Tensor] = {}
    shapes = {"q_proj": (4, 4), "k_proj": (2, 4), "v_proj": (8, 4)}
    for i in (0, 1):
        for p, shape in shapes.items():
            name = f"model.layers.{i}.self_attn.{p}.weight"
            n = shape[0] * shape[1]
            w = ((torch.arange(n, dtype=torch.float32) * (i + 3)) % 7 - 3).reshape(shape) / 4
            base[name] = w
            v = torch.zeros(shape)
            if not (i == 1 and p == "q_proj"):
                v[0, 0] = 1.0
            aligned[name] = w + v
    base["model.embed_tokens.weight"] = torch.ones(8, 4) / 4
    aligned["model.embed_tokens.weight"] = torch.ones(8, 4) / 2
    base["lm_head.weight"] = torch.ones(8, 4) / 4
    aligned["lm_head.weight"] = torch.ones(8, 4) / 4
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    base_dir = factory.write_checkpoint(tmp / "base", base, config=cfg)
    aligned_dir = factory.write_checkpoint(tmp / "aligned", aligned, config=cfg)

    def lora(module: str, a: list[list[float]], b: list[list[float]]) -> dict[str, torch.Tensor]:
        pre = f"base_model.model.model.layers.{module}"
        return {
            f"{pre}.lora_A.weight": torch.tensor(a, dtype=torch.float32),
            f"{pre}.lora_B.weight": torch.tensor(b, dtype=torch.float32),
        }

    e = [[1.0, 0.0, 0.0, 0.0]]
    tensors: dict[str, torch.Tensor] = {}
    tensors |= lora("0.self_attn.q_proj", e, [[3.0], [4.0], [0.0], [0.0]])
    tensors |= lora(
        "0.self_attn.k_proj", [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], [[3.0, 0.0], [0.0, 4.0]]
    )
    tensors |= lora("0.self_attn.v_proj", e, [[1.0]] + [[0.0]] * 7)
    tensors |= lora("1.self_attn.q_proj", [[0.0, 1.0, 0.0, 0.0]], [[1.0], [2.0], [2.0], [0.0]])
    tensors |= lora("1.self_attn.k_proj", e, [[0.0], [0.0]])
    tensors |= lora("1.self_attn.v_proj", [[0.0, 0.0, 1.0, 0.0]], [[5.0]] + [[0.0]] * 6 + [[12.0]])
    targets = ["q_proj", "k_proj", "v_proj"]
    if extras:
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.ones(1, 8)
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.ones(4, 1)
        tensors["base_model.model.lm_head.weight"] = base["lm_head.weight"].clone()
        targets.append("embed_tokens")
    adapter_dir = tmp / "adapter"
    adapter_dir.mkdir()
    cfg_a = factory.adapter_config(
        targets=targets,
        r=1,
        alpha=2,
        rank_pattern={"model.layers.0.self_attn.k_proj": 2},
        modules_to_save=["lm_head"] if extras else None,
    )
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg_a, indent=2))
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cache_dir = build_cache(base_dir, aligned_dir, tmp / "cache", GOLDEN_WEIGHTS)
    return GoldenCase(base_dir, aligned_dir, adapter_dir, cache_dir, base, aligned, tensors)


def oracle_stable_rank(v: torch.Tensor) -> float:
    v64 = v.double()
    s = torch.linalg.svdvals(v64)
    return float((v64**2).sum() / s[0] ** 2)


# ----------------------------------------------------------------------------- names, sort


def test_split_name() -> None:
    assert split_name("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert split_name("transformer.h.11.attn.c_attn") == (11, "attn.c_attn")
    assert split_name("lm_head") == (None, "lm_head")


def test_validate_sort() -> None:
    assert validate_sort("layer") == "layer"
    assert validate_sort("Cosine") == "cosine"
    assert validate_sort(None) is None
    with pytest.raises(UsageError):
        validate_sort("name")


@dataclass
class _M:
    name: str
    cosine: float | None


def test_order_modules_layer_cosine_top() -> None:
    mods = [
        _M("m.layers.10.q", 0.1),
        _M("m.layers.2.q", None),
        _M("m.layers.9.q", 0.5),
        _M("m.layers.1.q", 0.3),
        _M("m.layers.1.v", 0.1),
    ]
    rows, hidden = order_modules(mods, "layer")
    assert [m.name for m in rows] == [
        "m.layers.1.q",
        "m.layers.1.v",
        "m.layers.2.q",
        "m.layers.9.q",
        "m.layers.10.q",
    ]
    assert hidden == 0
    rows, _ = order_modules(mods, "cosine")
    # Ties keep layer order; undefined cosines last.
    assert [m.name for m in rows] == [
        "m.layers.1.v",
        "m.layers.10.q",
        "m.layers.1.q",
        "m.layers.9.q",
        "m.layers.2.q",
    ]
    rows, hidden = order_modules(mods, "cosine", top=2)
    assert [m.name for m in rows] == ["m.layers.1.v", "m.layers.10.q"] and hidden == 3
    rows, hidden = order_modules(mods, "layer", top=3)
    assert [m.name for m in rows] == ["m.layers.1.q", "m.layers.1.v", "m.layers.10.q"]
    assert hidden == 2


# ----------------------------------------------------------------------------- gate


@dataclass
class _Rep:
    adapter: str
    modules: list[_M]


def test_gate_strict_rounded_and_undefined_ignored() -> None:
    rep = _Rep(
        "ad",
        [
            _M("a", 0.3),
            _M("b", 0.2999999),  # rounds to 0.30000: not below 0.3
            _M("c", 0.29999),
            _M("d", None),
            _M("e", -0.5),
        ],
    )
    g = gate([rep], 0.3)
    assert not g.passed
    assert [f.name for f in g.failures] == ["e", "c"]
    assert g.checked == 4
    msg = g.message()
    assert "\n" not in msg and "e -0.50000" in msg and "c 0.29999" in msg and " in ad;" in msg
    assert msg.index("e -0.50000") < msg.index("c 0.29999")
    assert gate([rep], -0.5).passed


def test_gate_names_at_most_three_and_adapters() -> None:
    reps = [
        _Rep("one", [_M(f"x{i}", 0.01 * i) for i in range(5)] + [_M("ok", 0.9)]),
        _Rep("two", [_M("y", 0.005)]),
    ]
    g = gate(reps, 0.5)
    assert len(g.failures) == 6
    msg = g.message()
    # Several adapters: the worst module of each, worst adapter first, with its count.
    assert "one: x0 0.00000 (5 below); two: y 0.00500 (1 below)" in msg
    assert "x1" not in msg and "6 of 7 modules" in msg and "in 2 adapters" in msg
    assert "\n" not in msg


# ----------------------------------------------------------------------------- stable rank


@pytest.mark.parametrize("dense_limit", [512, 0])
@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (1, 5), (5, 1), (7, 7)])
def test_stable_rank_matches_svd_oracle(shape: tuple[int, int], dense_limit: int) -> None:
    from safelora_cli.projector import build_projector

    g = torch.Generator().manual_seed(sum(shape))
    v = torch.randn(*shape, generator=g, dtype=torch.float64)
    # A dominant direction keeps subspace iteration honest but not trivial.
    v[:, 0] *= 3
    p = build_projector("w", v.float(), fan_in_fan_out=False, dtype=torch.float64)
    p64_norm = float(torch.linalg.vector_norm(v))
    sig_sq, sr = stable_rank(p.kind, p.tensor, p64_norm, dense_limit=dense_limit)
    s = torch.linalg.svdvals(v)
    assert sr == pytest.approx(float((v**2).sum() / s[0] ** 2), rel=1e-5)
    assert sig_sq == pytest.approx(float(s[0] ** 2), rel=1e-5)
    assert 1.0 - 1e-6 <= sr <= min(shape) * (1 + 1e-6)


def test_stable_rank_degenerate_is_none() -> None:
    assert stable_rank("gram", torch.zeros(3, 3), 0.0) == (None, None)
    with pytest.raises(CacheError):
        stable_rank("dense", torch.ones(3, 3), 1.0)


# ----------------------------------------------------------------------------- cache summary


def test_summarize_cache_against_raw_weights(tmp_path: Path) -> None:
    pair = factory.make_pair(
        tmp_path, arch="llama", same=("model.layers.1.self_attn.o_proj.weight",)
    )
    weights = [
        n
        for n in pair.base
        if n.endswith(("q_proj.weight", "k_proj.weight", "up_proj.weight", "o_proj.weight"))
    ]
    cache = build_cache(pair.base_dir, pair.aligned_dir, tmp_path / "cache", weights)
    s = summarize_cache(cache)
    assert [w.weight for w in s.weights] == sorted(
        weights, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")]
    )
    assert s.complete and s.dtype == "F32"
    assert s.tool_version == __import__("safelora_cli").__version__
    assert set(s.sources) == {"base", "aligned"}
    assert s.sources["base"]["path"] == str(pair.base_dir.resolve()) or s.sources["base"][
        "path"
    ].endswith("base")
    on_disk = sum(p.stat().st_size for p in cache.iterdir() if p.is_file())
    assert s.size_bytes == on_disk
    for w in s.weights:
        v = pair.aligned[w.weight].double() - pair.base[w.weight].double()
        assert (w.d_out, w.d_in) == tuple(v.shape)
        assert w.kind == ("gram" if v.shape[0] <= v.shape[1] else "factor")
        assert w.shape == ((v.shape[0], v.shape[0]) if w.kind == "gram" else tuple(v.shape))
        if w.weight.endswith("layers.1.self_attn.o_proj.weight"):
            assert w.norm_v == 0.0 and w.stable_rank is None
            continue
        assert w.norm_v == pytest.approx(float(torch.linalg.vector_norm(v)), rel=1e-6)
        assert w.stable_rank == pytest.approx(oracle_stable_rank(v), rel=1e-5)
    kinds = {w.kind for w in s.weights}
    assert kinds == {"gram", "factor"}
    js = s.to_json()
    assert js["count"] == len(weights) and json.loads(json.dumps(js)) == js


def test_summarize_cache_missing(tmp_path: Path) -> None:
    with pytest.raises(CacheError):
        summarize_cache(tmp_path / "nope")


# ----------------------------------------------------------------------------- adapter summary


def test_summarize_adapter_golden_case(tmp_path: Path) -> None:
    case = golden_case(tmp_path, extras=True)
    s = summarize_adapter(case.adapter_dir)
    names = [m.name for m in s.modules]
    assert names == [w.removesuffix(".weight") for w in sorted(GOLDEN_WEIGHTS, key=_nat)]
    by = {m.name: m for m in s.modules}
    k0 = by["model.layers.0.self_attn.k_proj"]
    assert (k0.rank, k0.alpha, k0.scale, k0.d_out, k0.d_in) == (2, 2.0, 1.0, 2, 4)
    v1 = by["model.layers.1.self_attn.v_proj"]
    assert (v1.rank, v1.scale, v1.d_out, v1.d_in, v1.dtype) == (1, 2.0, 8, 4, "F32")
    skipped = {sk.name: sk.reason for sk in s.skipped}
    assert set(skipped) == {"model.embed_tokens", "lm_head"}
    assert "embedding" in skipped["model.embed_tokens"].lower()
    assert "modules_to_save" in skipped["lm_head"]
    assert s.r == 1 and s.lora_alpha == 2.0 and not s.use_rslora
    js = s.to_json()
    assert js["projectable"] == 6 and len(js["skipped"]) == 2


def _nat(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def test_summarize_adapter_rslora_scale(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path)
    ad = factory.write_adapter(tmp_path / "ad", base=pair.base, r=4, alpha=8, use_rslora=True)
    s = summarize_adapter(ad)
    truth = factory.adapter_modules(ad)
    assert {m.name for m in s.modules} == set(truth)
    for m in s.modules:
        assert m.scale == pytest.approx(truth[m.name]["alpha"] / math.sqrt(truth[m.name]["r"]))
        assert (m.d_out, m.d_in) == (truth[m.name]["d_out"], truth[m.name]["d_in"])


@pytest.mark.parametrize("shape", [(5, 9), (9, 5)])
def test_stable_rank_does_not_depend_on_the_recorded_norm(shape: tuple[int, int]) -> None:
    """A float32 ||V||_F summed over millions of entries can be off in the 4th digit; the stable
    rank uses tr(C) (or ||F||_F^2) from the stored tensor instead, where ||V||_F cancels."""
    from safelora_cli.projector import build_projector

    v = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    p = build_projector("w", v, fan_in_fan_out=False, dtype=torch.float64)
    exact = oracle_stable_rank(v)
    for wrong in (p.norm_v * (1 + 1e-3), p.norm_v * (1 - 1e-3)):
        sig_sq, sr = stable_rank(p.kind, p.tensor, wrong)
        assert sr == pytest.approx(exact, rel=1e-6)  # float32 V inside build_projector
        # sigma_max^2 = lambda_max(C) ||V||_F is reported with the norm it was given.
        assert sig_sq == pytest.approx(float(torch.linalg.svdvals(v)[0] ** 2) * wrong / p.norm_v)
