"""Choosing the stored form of each projector (``auto|gram|factor``, issue 19).

Checked: the ``auto`` rule picks as docs/algorithm.md says for square, tall and wide weights
(on CPU and CUDA rates, and in the limits of free and of costly products); ``gram`` and
``factor`` are forced when asked; the flag is parsed and refused with a one-line error; and for
every choice (and for a cache whose entries mix both forms) the cosines, the selection and the
patched ``B`` agree with a float64 oracle formed from the definition (``tests.test_patch.oracle``:
``V = Wa - Wb`` in float64, ``C = V V^T / ||V||_F``) to 1e-5 relative.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from safelora_cli import projector
from safelora_cli.cli import app
from safelora_cli.errors import UsageError
from safelora_cli.projector import (
    FACTOR,
    GRAM,
    Rates,
    build_projector,
    check_representation,
    representation_for,
)
from tests.factory import make_pair, write_adapter
from tests.test_patch import oracle
from tests.test_scoring import oracle_select

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RTOL = 1e-5


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("shape", "device", "want"),
    [
        # Llama-2-7B on a CPU: a square weight costs the same bytes either way and the factor
        # needs no product, so factor; tall (up/gate): factor is smaller *and* free; wide
        # (down_proj, 4096 x 11008): the 2.7x smaller gram costs ~2.6 s of product at CPU
        # rates, more than writing and reading the 113 MB it saves.
        ((4096, 4096), "cpu", FACTOR),
        ((11008, 4096), "cpu", FACTOR),
        ((4096, 11008), "cpu", FACTOR),
        # On CUDA rates the product is ~20 ms: the wide gram wins, the square one does not.
        ((4096, 11008), "cuda", GRAM),
        ((4096, 4096), "cuda", FACTOR),
        ((11008, 4096), "cuda", FACTOR),
        ((1024, 8192), "cuda", GRAM),  # 70B GQA k/v: 8x smaller as a gram
        # Toy sizes: the costs differ by far less than a millisecond, so the smaller tensor,
        # gram on a tie (the rule of format version 1, which old caches followed).
        ((32, 32), "cpu", GRAM),
        ((16, 32), "cpu", GRAM),
        ((48, 32), "cpu", FACTOR),
        ((4, 4), "cuda", GRAM),
    ],
)
def test_auto_rule_picks_as_documented(shape: tuple[int, int], device: str, want: str) -> None:
    assert representation_for(*shape, "auto", device) == want


def test_auto_rule_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A free product gives the smaller tensor; a costly one gives factor everywhere."""
    shapes = [(64, 64), (256, 704), (704, 256), (1024, 4096), (4096, 1024), (300, 300)]
    monkeypatch.setitem(projector.RATES, "cpu", Rates(flops=1e30, write=1e6, read=1e6))
    for d_out, d_in in shapes:
        smaller = GRAM if d_out <= d_in else FACTOR
        assert representation_for(d_out, d_in) == smaller, (d_out, d_in)
    monkeypatch.setitem(projector.RATES, "cpu", Rates(flops=1e3, write=1e12, read=1e12))
    for d_out, d_in in shapes:
        assert representation_for(d_out, d_in) == FACTOR, (d_out, d_in)
    # Unknown device types count as CPU.
    assert representation_for(1024, 4096, "auto", "mps") == FACTOR


def test_forced_modes_and_check() -> None:
    assert representation_for(8, 4, "gram") == GRAM  # tall, gram even though it is larger
    assert representation_for(4, 8, "factor") == FACTOR
    assert check_representation("AUTO") == "auto"
    assert check_representation(" Gram ") == "gram"
    assert check_representation("factor") == "factor"
    with pytest.raises(UsageError, match="--representation 'fast' is not one of auto, gram"):
        check_representation("fast")
    with pytest.raises(ValueError):
        representation_for(4, 4, "fast")


@pytest.mark.parametrize("shape", [(6, 6), (3, 7), (9, 4)])
@pytest.mark.parametrize("mode", ["gram", "factor"])
def test_build_projector_forced_form_matches_float64_oracle(
    shape: tuple[int, int], mode: str
) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    v = torch.randn(shape, generator=g)
    b = torch.randn(shape[0], 3, generator=g)
    pr = build_projector("w", v.clone(), fan_in_fan_out=False, representation=mode)
    assert pr.kind == mode
    assert tuple(pr.tensor.shape) == (shape[0], shape[0] if mode == GRAM else shape[1])
    v64 = v.double()
    want = v64 @ v64.T / torch.linalg.norm(v64) @ b.double()
    got = pr.apply(b)
    assert float(torch.linalg.norm(got - want) / torch.linalg.norm(want)) < RTOL


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-layer Llama pair (q/o 32x32, k/v 16x32, gate/up 48x32, down 32x48) and an adapter
    on all seven linear weights."""
    tmp = tmp_path_factory.mktemp("repr")
    pair = make_pair(tmp)
    ad = write_adapter(tmp / "ad", base=pair.base, targets=LINEAR, r=4, seed=3)
    return {"tmp": tmp, "pair": pair, "ad": ad}


def _cli(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def _kinds(cache: Path) -> dict[str, str]:
    m = json.loads((cache / "manifest.json").read_text())
    return {w: e["representation"] for w, e in m["weights"].items()}


def _check_against_oracle(case: dict, out: Path, report: dict, k: int) -> None:
    """Cosines, the selection and every patched B against the float64 oracle."""
    want = oracle(case["pair"], case["ad"], False)
    got = {m["name"]: m for m in report["modules"]}
    assert set(got) == set(want)
    for name, w in want.items():
        assert math.isclose(got[name]["cosine"], w["cos"], rel_tol=RTOL), name
    chosen = oracle_select({m: w["cos"] for m, w in want.items()}, "num_layers", k)
    assert {n for n, m in got.items() if m["projected"]} == chosen
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for name, w in want.items():
        b = tensors[w["key_b"]].double()
        ref = w["cb"] if name in chosen else w["b"].double()
        err = float(torch.linalg.norm(b - ref) / torch.linalg.norm(ref))
        assert err < RTOL, (name, err)


@pytest.mark.parametrize("mode", ["auto", "gram", "factor"])
def test_each_choice_patches_like_the_oracle(case: dict, mode: str) -> None:
    tmp, pair = case["tmp"], case["pair"]
    cache, out = tmp / f"cache-{mode}", tmp / f"out-{mode}"
    b, a = str(pair.base_dir), str(pair.aligned_dir)
    r = _cli("compute-projections", b, a, "-o", str(cache), "--targets", ",".join(LINEAR),
             "--device", "cpu", "--representation", mode, "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    kinds = _kinds(cache)
    assert len(kinds) == 2 * 7
    shapes = {w: tuple(t.shape) for w, t in pair.base.items() if w in kinds}
    for w, kind in kinds.items():
        d_out, d_in = shapes[w]
        # Toy sizes under auto: the smaller tensor, gram on a tie (see the rule test).
        expect = {"gram": GRAM, "factor": FACTOR}.get(mode, GRAM if d_out <= d_in else FACTOR)
        assert kind == expect, (w, kind)
    r = _cli("patch", str(case["ad"]), "-p", str(cache), "-o", str(out), "-k", "5", "--json")
    assert r.exit_code == 0, r.output
    _check_against_oracle(case, out, json.loads(r.stdout.splitlines()[0]), 5)


def test_auto_at_width_512_stores_factors_for_square_weights(tmp_path: Path) -> None:
    """At CPU rates a 512 x 512 product (~2 ms) outweighs anything a gram saves (equal bytes),
    as does the 512 x 1408 down_proj's (~5 ms against ~3 ms of bytes); k/v (128 x 512, GQA)
    differ by far less than a millisecond and stay grams (the smaller tensor)."""
    pair = make_pair(tmp_path, layers=1, hidden=512, intermediate=1408, heads=4, kv_heads=1)
    ad = write_adapter(tmp_path / "ad", base=pair.base, targets=LINEAR, r=4, seed=5)
    cache, out = tmp_path / "cache", tmp_path / "out"
    r = _cli("compute-projections", str(pair.base_dir), str(pair.aligned_dir), "-o", str(cache),
             "--targets", ",".join(LINEAR), "--device", "cpu", "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    kinds = {w.split(".")[-2]: k for w, k in _kinds(cache).items()}
    assert kinds == {"q_proj": FACTOR, "o_proj": FACTOR, "gate_proj": FACTOR, "up_proj": FACTOR,
                     "down_proj": FACTOR, "k_proj": GRAM, "v_proj": GRAM}  # fmt: skip
    r = _cli("patch", str(ad), "-p", str(cache), "-o", str(out), "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    _check_against_oracle({"pair": pair, "ad": ad}, out, json.loads(r.stdout.splitlines()[0]), 3)


def test_mixed_cache_patches_like_the_oracle(case: dict) -> None:
    """One cache built in three runs with different forcings: square weights in both forms."""
    tmp, pair = case["tmp"], case["pair"]
    cache, out = tmp / "cache-mixed", tmp / "out-mixed"
    b, a = str(pair.base_dir), str(pair.aligned_dir)
    runs = [("q_proj,gate_proj", "gram"), ("o_proj,k_proj,down_proj", "factor"),
            (",".join(LINEAR), "auto")]  # fmt: skip
    for targets, mode in runs:
        r = _cli("compute-projections", b, a, "-o", str(cache), "--targets", targets,
                 "--representation", mode, "--device", "cpu", "--quiet")  # fmt: skip
        assert r.exit_code == 0, r.output
    kinds = _kinds(cache)
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == GRAM
    assert kinds["model.layers.0.mlp.gate_proj.weight"] == GRAM  # tall, forced
    assert kinds["model.layers.1.self_attn.o_proj.weight"] == FACTOR  # square, forced
    assert kinds["model.layers.1.mlp.down_proj.weight"] == FACTOR  # wide, forced
    assert kinds["model.layers.0.mlp.up_proj.weight"] == FACTOR  # auto, tall
    r = _cli("patch", str(case["ad"]), "-p", str(cache), "-o", str(out), "-k", "6", "--json")
    assert r.exit_code == 0, r.output
    _check_against_oracle(case, out, json.loads(r.stdout.splitlines()[0]), 6)


def test_patch_on_the_fly_with_a_forced_form(case: dict) -> None:
    tmp, pair = case["tmp"], case["pair"]
    out, saved = tmp / "out-fly", tmp / "saved-fly"
    r = _cli("patch", str(case["ad"]), "--base", str(pair.base_dir), "--aligned",
             str(pair.aligned_dir), "-o", str(out), "-k", "4", "--json", "--device", "cpu",
             "--representation", "factor", "--save-projections", str(saved))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert set(_kinds(saved).values()) == {FACTOR}
    _check_against_oracle(case, out, json.loads(r.stdout.splitlines()[0]), 4)


def test_bad_representation_flags(case: dict) -> None:
    """Usage errors (exit 2, as every UsageError): one line, nothing written."""
    tmp, pair = case["tmp"], case["pair"]
    b, a = str(pair.base_dir), str(pair.aligned_dir)
    cache = tmp / "never"
    r = _cli("compute-projections", b, a, "-o", str(cache), "--targets", "q_proj",
             "--representation", "fast")  # fmt: skip
    assert r.exit_code == 2
    assert "error: --representation 'fast' is not one of auto, gram, factor" in r.output
    assert "Traceback" not in r.output and not cache.exists()
    good = tmp / "cache-gram"  # made by the parametrized test above, or made here
    if not good.exists():
        assert (
            _cli("compute-projections", b, a, "-o", str(good), "--targets", "q_proj").exit_code == 0
        )
    before = (good / "manifest.json").read_bytes()
    out = tmp / "never-out"
    r = _cli("patch", str(case["ad"]), "-p", str(good), "-o", str(out), "--representation", "gram")
    assert r.exit_code == 2
    assert "error: --representation gram applies to --base/--aligned, not to -p." in r.output
    assert not out.exists() and (good / "manifest.json").read_bytes() == before
    r = _cli("patch", str(case["ad"]), "--base", b, "--aligned", a, "-o", str(out),
             "--representation", "nope")  # fmt: skip
    assert r.exit_code == 2 and "is not one of auto, gram, factor" in r.output
    assert not out.exists()


@pytest.mark.parametrize("mode", ["gram", "factor"])
def test_inspect_on_the_fly_with_a_forced_form(case: dict, mode: str) -> None:
    """inspect ADAPTER --base/--aligned takes --representation too; -p refuses it."""
    pair = case["pair"]
    r = _cli("inspect", str(case["ad"]), "--base", str(pair.base_dir), "--aligned",
             str(pair.aligned_dir), "--json", "--representation", mode)  # fmt: skip
    assert r.exit_code == 0, r.output
    got = {m["name"]: m["cosine"] for m in json.loads(r.stdout)["modules"]}
    want = oracle(pair, case["ad"], False)
    assert set(got) == set(want)
    for name, w in want.items():
        assert math.isclose(got[name], w["cos"], rel_tol=RTOL), name
    cache = case["tmp"] / "cache-inspect"
    if not cache.exists():
        r = _cli("compute-projections", str(pair.base_dir), str(pair.aligned_dir), "-o",
                 str(cache), "--targets", "q_proj", "--quiet")  # fmt: skip
        assert r.exit_code == 0, r.output
    r = _cli("inspect", str(case["ad"]), "-p", str(cache), "--representation", mode)
    assert r.exit_code == 2
    assert f"error: --representation {mode} applies to --base/--aligned, not to -p." in r.output


@pytest.mark.parametrize(
    ("shape", "want"),
    [
        # Applied to a whole dW (patch-model), the product is 2 d_out^2 d_in (gram, after
        # forming V V^T once) against 4 d_out d_in^2 (factor): gram unless the weight is tall.
        ((4096, 4096), GRAM),
        ((11008, 4096), FACTOR),
        ((4096, 11008), GRAM),
        ((1024, 8192), GRAM),
    ],
)
def test_auto_for_a_full_update_follows_the_product(shape: tuple[int, int], want: str) -> None:
    d_out, d_in = shape
    for device in ("cpu", "cuda"):
        assert representation_for(d_out, d_in, "auto", device, columns=d_in) == want
    # The adapter rule (rank-16 B) is unchanged by it: on a CPU every 7B-size weight is a factor.
    assert representation_for(4096, 4096, "auto", "cpu") == FACTOR


def test_patch_model_on_the_fly_uses_the_full_update_rule(tmp_path: Path) -> None:
    """A 512 x 512 weight: a factor for adapters on a CPU (see the width-512 test above), a
    gram when built on the fly for patch-model (``full_update``); both give C dW to float32
    precision (the projector is formed from float32 V) against a float64 oracle."""
    from safetensors.torch import save_file

    from safelora_cli.compute import StreamingProjectorSource
    from safelora_cli.reader import CheckpointReader

    g = torch.Generator().manual_seed(11)
    name = "model.layers.0.self_attn.q_proj.weight"
    wb = torch.randn(512, 512, generator=g)
    wa = wb + 0.05 * torch.randn(512, 512, generator=g)
    for which, w in (("b", wb), ("a", wa)):
        save_file({name: w}, str(tmp_path / f"{which}.safetensors"))
    dw = 0.01 * torch.randn(512, 512, generator=g, dtype=torch.float64)
    v = (wa - wb).double()
    want = (v @ v.T / torch.linalg.matrix_norm(v)) @ dw
    kinds = {}
    for full in (False, True):
        with (
            CheckpointReader.open(tmp_path / "b.safetensors", label="base model") as rb,
            CheckpointReader.open(tmp_path / "a.safetensors", label="aligned model") as ra,
        ):
            src = StreamingProjectorSource(rb, ra, device="cpu", full_update=full)
            p = src.get(name)
        kinds[full] = p.kind
        got = p.apply(dw)
        assert float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want)) < 1e-6
    assert kinds == {False: FACTOR, True: GRAM}
