"""``patch-model`` (issue 16) against an independent float64 oracle, on real transformers trios.

Every expected number comes from :func:`tests.model_trio.oracle` (DESIGN §1 formulas in
float64 on the stored tensors) and :func:`tests.model_trio.expected_selection` (the official
selection written out); tensors are compared as raw bytes parsed by the test's own header
reader. Trios are built once per module and never modified (tests copy what they change).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from safelora_cli.cli import app
from tests import model_trio as mt

runner = CliRunner()


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: Any) -> Any:
    r = cli(*args)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    return r


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory: pytest.TempPathFactory) -> mt.Trio:
    return mt.llama_trio(tmp_path_factory.mktemp("llama_bf16"), dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def llama_fp32(tmp_path_factory: pytest.TempPathFactory) -> mt.Trio:
    return mt.llama_trio(tmp_path_factory.mktemp("llama_fp32"), dtype=torch.float32, seed=3)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> mt.Trio:
    return mt.gpt2_trio(tmp_path_factory.mktemp("gpt2"), dtype=torch.float32, shard="60KB")


def _cache(trio: mt.Trio, where: Path, targets: str) -> Path:
    cache = where / "cache"
    if not cache.exists():
        ok("compute-projections", trio.base, trio.aligned, "-o", cache, "--targets", targets, "-q")
    return cache


@pytest.fixture(scope="module")
def llama_bf16_cache(llama_bf16: mt.Trio) -> Path:
    return _cache(llama_bf16, llama_bf16.base.parent, mt.ALL_LLAMA)


@pytest.fixture(scope="module")
def gpt2_cache(gpt2: mt.Trio) -> Path:
    return _cache(gpt2, gpt2.base.parent, mt.ALL_GPT2)


def check_output(
    trio: mt.Trio,
    out: Path,
    report: dict[str, Any],
    *,
    conv1d: bool,
    mode: str,
    value: float,
    rel: float,
    only: set[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Everything the issue promises about OUT, against the oracle."""
    ref = mt.oracle(trio, conv1d=conv1d, only=only)
    cos = {n.removesuffix(".weight"): r["cos"] for n, r in ref.items()}
    want = mt.expected_selection(cos, mode, value)
    # The JSON object: schema, one entry per target, cosines, selection.
    assert {"model", "output", "selection", "projected", "total", "modules"} <= set(report)
    assert report["selection"] == {"mode": mode, "value": value}
    assert report["output"] == str(out.resolve())
    assert report["total"] == len(ref) and report["projected"] == len(want)
    got = {m["name"]: m for m in report["modules"]}
    assert set(got) == set(cos)
    for name, m in got.items():
        assert set(m) >= {"name", "cosine", "projected", "reason"}
        if cos[name] is None:
            assert m["cosine"] is None and not m["projected"]
        else:
            assert m["cosine"] == pytest.approx(cos[name], abs=2e-6)
        assert m["projected"] == (name in want), name
        assert (m["reason"] is None) == m["projected"]
    assert {m["name"] for m in report["modules"] if m["projected"]} == want
    # Files: every input file, same shard names, index byte for byte, a report on top.
    inp = {p.name for p in trio.finetuned.iterdir()}
    assert {p.name for p in out.iterdir()} == inp | {"safelora_report.json"}
    for f in ("config.json", "tokenizer_config.json", "model.safetensors.index.json"):
        if (trio.finetuned / f).exists():
            assert (out / f).read_bytes() == (trio.finetuned / f).read_bytes(), f
    card = (out / "README.md").read_text()  # the input's card plus safelora's section
    assert "# a tiny full fine-tune" in card and "<!-- safelora:begin -->" in card
    assert "library_name: transformers" in card and f"{len(want)} of {len(ref)} weights" in card
    assert json.loads((out / "safelora_report.json").read_text())["projected"] == len(want)
    # Shards: same names, order, dtypes, shapes; metadata kept plus provenance.
    src, dst = mt.raw(trio.finetuned), mt.raw(out)
    assert set(src) == set(dst)
    for f in sorted(trio.finetuned.glob("*.safetensors")):
        assert mt.order(out / f.name) == mt.order(f)
        meta_in = mt.header(f)[0].get("__metadata__", {})
        meta_out = mt.header(out / f.name)[0]["__metadata__"]
        assert {k: meta_out[k] for k in meta_in} == meta_in
        assert json.loads(meta_out["safelora.projected"]) == sorted(want, key=_natural)
    for name, (shard, dtype, shape, data) in src.items():
        oshard, odtype, oshape, odata = dst[name]
        assert (oshard, odtype, oshape) == (shard, dtype, shape), name
        if name.removesuffix(".weight") not in want:
            assert odata == data, f"{name} is not byte-identical"
            continue
        # Projected: W_aligned + C dW, cast once to the stored dtype.
        exp = ref[name]["new"]
        t = torch.frombuffer(bytearray(odata), dtype=ref[name]["dtype"]).reshape(shape)
        err = (t.to(torch.float64) - exp).abs()
        assert float(err.max()) <= rel * float(exp.abs().max()), name
        if ref[name]["dtype"] == torch.bfloat16:
            # One rounding of the float64 result: nearly every value is exactly bf16(oracle);
            # the rest sit at a rounding boundary within float32 C's error.
            same = (t == exp.to(torch.bfloat16)).double().mean()
            assert float(same) >= 0.99, (name, float(same))
        assert odata != data
    return ref


def _natural(name: str) -> tuple:
    from safelora_cli.naming import natural_key

    return natural_key(name)


def loads_and_runs(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape[-1] == 64 and bool(torch.isfinite(logits).all())


# ----------------------------------------------------------------------------- oracle runs


def test_llama_bf16_sharded_from_a_cache_num_layers(
    llama_bf16: mt.Trio, llama_bf16_cache: Path, tmp_path: Path
) -> None:
    before = mt.tree(llama_bf16.finetuned)
    out = tmp_path / "out"
    r = ok(
        "patch-model",
        llama_bf16.finetuned,
        "--aligned",
        llama_bf16.aligned,
        "-p",
        llama_bf16_cache,
        "-o",
        out,
        "-k",
        3,
        "--json",
    )
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    # bf16: the float64 W_aligned + C dW rounded once; one bf16 step (2^-8 relative) at most.
    check_output(
        llama_bf16, out, json.loads(lines[0]), conv1d=False, mode="num_layers", value=3, rel=2**-8
    )
    assert len(list(out.glob("model-*.safetensors"))) >= 2  # really sharded
    assert mt.tree(llama_bf16.finetuned) == before
    loads_and_runs(out)


def test_default_is_num_layers_10_and_fraction_is_ceil(
    llama_bf16: mt.Trio, llama_bf16_cache: Path, tmp_path: Path
) -> None:
    r = ok(
        "patch-model",
        llama_bf16.finetuned,
        "--aligned",
        llama_bf16.aligned,
        "-p",
        llama_bf16_cache,
        "-o",
        tmp_path / "a",
        "--json",
    )
    check_output(
        llama_bf16,
        tmp_path / "a",
        json.loads(r.stdout),
        conv1d=False,
        mode="num_layers",
        value=10,
        rel=2**-8,
    )
    r = ok(
        "patch-model",
        llama_bf16.finetuned,
        "--aligned",
        llama_bf16.aligned,
        "-p",
        llama_bf16_cache,
        "-o",
        tmp_path / "b",
        "-f",
        0.3,
        "--json",
    )
    rep = json.loads(r.stdout)
    assert rep["k"] == math.ceil(0.3 * 14)
    check_output(
        llama_bf16, tmp_path / "b", rep, conv1d=False, mode="fraction", value=0.3, rel=2**-8
    )


def test_llama_fp32_on_the_fly_threshold_equals_the_cache_form(
    llama_fp32: mt.Trio, tmp_path: Path
) -> None:
    ref = mt.oracle(llama_fp32, conv1d=False)
    cosines = sorted(round(r["cos"], 5) for r in ref.values() if r["cos"] is not None)
    t = cosines[len(cosines) // 2]
    out = tmp_path / "fly"
    r = ok(
        "patch-model",
        llama_fp32.finetuned,
        "--aligned",
        llama_fp32.aligned,
        "--base",
        llama_fp32.base,
        "-o",
        out,
        "-t",
        t,
        "--json",
    )
    # fp32: float32 dW and C, float64 products; ~1e-6 of the weights' scale.
    check_output(
        llama_fp32, out, json.loads(r.stdout), conv1d=False, mode="threshold", value=t, rel=1e-5
    )
    cache = _cache(llama_fp32, tmp_path, mt.ALL_LLAMA)
    ok(
        "patch-model",
        llama_fp32.finetuned,
        "--aligned",
        llama_fp32.aligned,
        "-p",
        cache,
        "-o",
        tmp_path / "cached",
        "-t",
        t,
        "-q",
    )
    a = mt.raw(out)
    b = mt.raw(tmp_path / "cached")
    rep_a = json.loads((out / "safelora_report.json").read_text())
    rep_b = json.loads((tmp_path / "cached" / "safelora_report.json").read_text())
    assert [m["projected"] for m in rep_a["modules"]] == [m["projected"] for m in rep_b["modules"]]
    for name in a:
        x = torch.frombuffer(bytearray(a[name][3]), dtype=torch.float32)
        y = torch.frombuffer(bytearray(b[name][3]), dtype=torch.float32)
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7), name
    loads_and_runs(out)


def test_gpt2_conv1d_is_transposed_and_written_back(
    gpt2: mt.Trio, gpt2_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    r = ok(
        "patch-model",
        gpt2.finetuned,
        "--aligned",
        gpt2.aligned,
        "-p",
        gpt2_cache,
        "-o",
        out,
        "-f",
        0.5,
        "--json",
    )
    rep = json.loads(r.stdout)
    assert all(m["fan_in_fan_out"] for m in rep["modules"])
    c_attn = next(m for m in rep["modules"] if m["name"].endswith("attn.c_attn"))
    assert (c_attn["d_out"], c_attn["d_in"]) == (96, 32)  # linear orientation
    check_output(gpt2, out, rep, conv1d=True, mode="fraction", value=0.5, rel=1e-5)
    # Without the transpose the oracle disagrees: the test can fail.
    wrong = mt.oracle(gpt2, conv1d=False)
    assert any(
        w["cos"] is not None and abs(w["cos"] - m["cosine"]) > 1e-3
        for m in rep["modules"]
        for n, w in wrong.items()
        if n == m["weight"]
    )
    loads_and_runs(out)


def test_targets_narrow_the_weights(
    llama_bf16: mt.Trio, llama_bf16_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    r = ok(
        "patch-model",
        llama_bf16.finetuned,
        "--aligned",
        llama_bf16.aligned,
        "-p",
        llama_bf16_cache,
        "-o",
        out,
        "--targets",
        "q_proj,v_proj",
        "-k",
        2,
        "--json",
    )
    rep = json.loads(r.stdout)
    assert {m["name"].rsplit(".", 1)[-1] for m in rep["modules"]} == {"q_proj", "v_proj"}
    check_output(
        llama_bf16,
        out,
        rep,
        conv1d=False,
        mode="num_layers",
        value=2,
        rel=2**-8,
        only={"q_proj", "v_proj"},
    )


def test_untouched_weight_and_no_alignment_signal_have_no_cosine(
    llama_fp32: mt.Trio, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    ft = tmp_path / "ft"
    al = tmp_path / "al"
    shutil.copytree(llama_fp32.finetuned, ft)
    shutil.copytree(llama_fp32.aligned, al)
    same_ft = "model.layers.0.self_attn.o_proj.weight"  # dW = 0
    no_v = "model.layers.1.mlp.down_proj.weight"  # V = 0 (aligned = base here)
    base = mt.read(llama_fp32.base)
    aligned = mt.read(llama_fp32.aligned)
    idx = json.loads((ft / "model.safetensors.index.json").read_text())["weight_map"]
    for d, name, value in ((ft, same_ft, aligned[same_ft]), (al, no_v, base[no_v])):
        f = d / idx[name]
        tensors = load_file(str(f))
        tensors[name] = value.clone()
        save_file(tensors, str(f), metadata={"format": "pt"})
    r = ok(
        "patch-model",
        ft,
        "--aligned",
        al,
        "--base",
        llama_fp32.base,
        "-o",
        tmp_path / "out",
        "-t",
        1.0,
        "--json",
    )
    mods = {m["weight"]: m for m in json.loads(r.stdout)["modules"]}
    assert mods[same_ft]["cosine"] is None and not mods[same_ft]["projected"]
    assert "not fine-tuned" in mods[same_ft]["reason"]
    assert mods[no_v]["cosine"] is None and not mods[no_v]["projected"]
    assert "no alignment signal" in mods[no_v]["reason"]
    assert sum(m["projected"] for m in mods.values()) == len(mods) - 2


def test_dry_run_writes_nothing_and_force_rules(
    llama_bf16: mt.Trio, llama_bf16_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = [
        "patch-model",
        llama_bf16.finetuned,
        "--aligned",
        llama_bf16.aligned,
        "-p",
        llama_bf16_cache,
        "-o",
        out,
        "-k",
        2,
    ]
    r = ok(*args, "--dry-run", "--json")
    assert json.loads(r.stdout)["dry_run"] is True and not out.exists()
    assert not list(tmp_path.iterdir())
    ok(*args, "-q")
    first = mt.tree(out)
    r = cli(*args)
    assert r.exit_code == 1 and "already exists" in r.stderr
    ok(*args, "--force", "-q")
    assert mt.tree(out) == first  # deterministic: the same bytes again
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    r = cli(*args[:-4], "-o", other, "--force")
    assert r.exit_code == 1 and "will not replace" in r.stderr
    assert (other / "keep.txt").read_text() == "mine"
    model = tmp_path / "someones-model"  # a model directory safelora did not write
    shutil.copytree(llama_bf16.finetuned, model)
    r = cli(*args[:-4], "-o", model, "--force")
    assert r.exit_code == 1 and "will not replace" in r.stderr
    assert mt.tree(model) == mt.tree(llama_bf16.finetuned)


# ----------------------------------------------------------------------------- bad inputs


def _refused(r: Any, *needles: str) -> None:
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_bad_inputs_exit_1_write_nothing_and_leave_inputs_alone(
    llama_bf16: mt.Trio, llama_bf16_cache: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    from tests import factory

    t = llama_bf16
    inputs = [t.base, t.aligned, t.finetuned, llama_bf16_cache]
    before = {str(p): mt.tree(p) for p in inputs}
    out = tmp_path / "out"
    # Missing --aligned.
    _refused(cli("patch-model", t.finetuned, "-p", llama_bf16_cache, "-o", out), "--aligned")
    # FINETUNED == ALIGNED.
    _refused(
        cli("patch-model", t.aligned, "--aligned", t.aligned, "-p", llama_bf16_cache, "-o", out),
        "same checkpoint",
    )
    # A LoRA adapter as FINETUNED.
    adapter = factory.write_adapter(tmp_path / "adapter", base=mt.read(t.base))
    _refused(
        cli("patch-model", adapter, "--aligned", t.aligned, "-p", llama_bf16_cache, "-o", out),
        "LoRA adapter",
        "safelora patch",
    )
    # Mismatched names: ALIGNED lacks a target.
    al = tmp_path / "al-names"
    shutil.copytree(t.aligned, al)
    idx_path = al / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    gone = "model.layers.1.self_attn.k_proj.weight"
    f = al / idx["weight_map"].pop(gone)
    tensors = load_file(str(f))
    del tensors[gone]
    save_file(tensors, str(f), metadata={"format": "pt"})
    idx_path.write_text(json.dumps(idx))
    _refused(
        cli("patch-model", t.finetuned, "--aligned", al, "--base", t.base, "-o", out),
        gone,
        "missing from the aligned model",
    )
    # Mismatched shapes.
    al2 = tmp_path / "al-shapes"
    shutil.copytree(t.aligned, al2)
    idx = json.loads((al2 / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.up_proj.weight"
    f = al2 / idx[name]
    tensors = load_file(str(f))
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(f), metadata={"format": "pt"})
    _refused(
        cli("patch-model", t.finetuned, "--aligned", al2, "--base", t.base, "-o", out),
        name,
        "shape",
    )
    # A cache lacking targets names the command that adds them.
    small = tmp_path / "small-cache"
    ok("compute-projections", t.base, t.aligned, "-o", small, "--targets", "q_proj", "-q")
    _refused(
        cli("patch-model", t.finetuned, "--aligned", t.aligned, "-p", small, "-o", out),
        "compute-projections",
        "--targets",
    )
    # A cache built from another aligned model (same names and shapes, other target values):
    # the header digests match, so the target tensors' digests must catch it.
    al3 = tmp_path / "al-other"
    shutil.copytree(t.aligned, al3)
    q0 = "model.layers.0.self_attn.q_proj.weight"
    f = al3 / idx[q0]
    tensors = load_file(str(f))
    tensors[q0] += 1
    save_file(tensors, str(f), metadata={"format": "pt"})
    _refused(
        cli("patch-model", t.finetuned, "--aligned", al3, "-p", llama_bf16_cache, "-o", out),
        "is not the model it was built from",
        q0,
    )
    # Another copy differing only in a non-target tensor: the cached projectors are exactly
    # those of this aligned model, so the cache is accepted.
    al4 = tmp_path / "al-embed"
    shutil.copytree(t.aligned, al4)
    f = al4 / idx["model.embed_tokens.weight"]
    tensors = load_file(str(f))
    tensors["model.embed_tokens.weight"] += 1
    save_file(tensors, str(f), metadata={"format": "pt"})
    r = cli(
        "patch-model",
        t.finetuned,
        "--aligned",
        al4,
        "-p",
        llama_bf16_cache,
        "-o",
        out,
        "--dry-run",
    )
    assert r.exit_code == 0, r.stderr
    # NaN in a fine-tuned weight.
    ft = tmp_path / "ft-nan"
    shutil.copytree(t.finetuned, ft)
    idx = json.loads((ft / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.q_proj.weight"
    f = ft / idx[name]
    tensors = load_file(str(f))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(f), metadata={"format": "pt"})
    _refused(
        cli("patch-model", ft, "--aligned", t.aligned, "-p", llama_bf16_cache, "-o", out),
        "NaN",
        name,
    )
    # The output may not be an input.
    _refused(
        cli(
            "patch-model",
            t.finetuned,
            "--aligned",
            t.aligned,
            "-p",
            llama_bf16_cache,
            "-o",
            t.finetuned / "sub",
        ),
        "overlaps",
    )
    assert not out.exists()
    assert {str(p): mt.tree(p) for p in inputs} == before
    # Usage: both sources, or none (exit 2).
    r = cli(
        "patch-model",
        t.finetuned,
        "--aligned",
        t.aligned,
        "-p",
        llama_bf16_cache,
        "--base",
        t.base,
        "-o",
        out,
    )
    assert r.exit_code == 2 and "mutually exclusive" in r.stderr
    r = cli("patch-model", t.finetuned, "--aligned", t.aligned, "-o", out)
    assert r.exit_code == 2 and "no projector source" in r.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- inspect


def test_inspect_a_full_model_table_json_and_gate(
    llama_bf16: mt.Trio, llama_bf16_cache: Path, tmp_path: Path
) -> None:
    t = llama_bf16
    args = ["inspect", t.finetuned, "--aligned", t.aligned, "-p", llama_bf16_cache, "-k", 3]
    r = ok(*args, "--json")
    rep = json.loads(r.stdout)
    r2 = ok(
        "patch-model",
        t.finetuned,
        "--aligned",
        t.aligned,
        "-p",
        llama_bf16_cache,
        "-o",
        tmp_path / "o",
        "-k",
        3,
        "--dry-run",
        "--json",
    )
    patched = json.loads(r2.stdout)
    assert rep["modules"] == patched["modules"]  # inspect scores what patch-model projects
    ref = mt.oracle(t, conv1d=False)
    for m in rep["modules"]:
        assert m["cosine"] == pytest.approx(ref[m["weight"]]["cos"], abs=2e-6)
    table = ok(*args).stdout
    assert (
        "model: " in table and "self_attn.q_proj" in table and "projected 3 of 14 modules" in table
    )
    lowest = min(round(m["cosine"], 5) for m in rep["modules"] if m["cosine"] is not None)
    r = cli(*args, "--fail-below", lowest + 0.01)
    assert r.exit_code == 3 and "below" in r.stderr
    ok(*args, "--fail-below", lowest - 0.01)
    # The same through --base: the positional is a local model, not an adapter.
    r = ok("inspect", t.finetuned, "--aligned", t.aligned, "--base", t.base, "-k", 3, "--json")
    assert [m["projected"] for m in json.loads(r.stdout)["modules"]] == [
        m["projected"] for m in rep["modules"]
    ]
    # A full model without --aligned: a clear error, not an adapter error.
    r = cli("inspect", t.finetuned, "-p", llama_bf16_cache)
    _refused(r, "--aligned")


# ----------------------------------------------------------------------------- library units


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])  # gram and factor
def test_update_math_is_scale_safe_against_float64(scale: float, shape: tuple[int, int]) -> None:
    from safelora_cli.projector import (
        build_projector,
        projected_weight,
        update_scale,
        update_sums,
    )
    from safelora_cli.scoring import update_cosine, update_norm

    g = torch.Generator().manual_seed(0)
    v = torch.randn(*shape, generator=g, dtype=torch.float64)
    dw = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    c = v @ v.T / torch.linalg.matrix_norm(v)
    # The oracle avoids overflow by construction only at moderate scales: scale it out.
    ref_cd = c @ (dw / scale) * scale
    ref_cos = float(
        ((ref_cd / scale) * (dw / scale)).sum()
        / (torch.linalg.matrix_norm(ref_cd / scale) * torch.linalg.matrix_norm(dw / scale))
    )
    proj = build_projector("w", v.float(), fan_in_fan_out=False)
    sums = update_sums(proj, dw, block=7)  # several column blocks, float64 dW
    assert update_cosine(sums) == pytest.approx(ref_cos, abs=1e-6)
    assert update_norm(sums) == pytest.approx(
        float(torch.linalg.matrix_norm(dw / scale)) * scale, rel=1e-12
    )
    w_al = torch.randn(shape[1], shape[0], generator=g, dtype=torch.float64) * scale
    new = projected_weight(proj, w_al, dw, fan_in_fan_out=True, dtype=torch.float64, block=5)
    ref_new = (w_al.T + ref_cd).T
    assert torch.allclose(new / scale, ref_new / scale, rtol=1e-6, atol=1e-6)
    zero = update_sums(proj, torch.zeros(*shape))
    assert zero.scale == 0.0 and update_cosine(zero) is None
    bad = dw.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        update_scale(bad)
    bad[0, 0] = float("-inf")
    with pytest.raises(ValueError):
        update_sums(proj, bad)


def test_default_targets_skip_embeddings_lm_head_and_norms() -> None:
    from safelora_cli.model_patch import is_block_weight

    assert is_block_weight("model.layers.0.self_attn.q_proj.weight")
    assert is_block_weight("transformer.h.11.mlp.c_fc.weight")
    assert is_block_weight("encoder.blocks.2.attn.qkv.weight")
    for n in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "transformer.wte.weight",
        "transformer.h.0.ln_1.weight",
        "model.layers.0.self_attn.q_proj.bias",
    ):
        assert not is_block_weight(n), n


def test_selection_ties_and_reasons_follow_the_official_rules() -> None:
    from safelora_cli.model_patch import ModelModuleScore, decide
    from safelora_cli.selection import Selection

    def m(name: str, cos: float | None, why: str | None = None) -> ModelModuleScore:
        return ModelModuleScore(
            name, name + ".weight", 0, 4, 4, "BF16", False, cos, 1.0, 1.0, degenerate=why
        )

    # 0.300004 and 0.299996 both round to 0.30000: tied with the 2nd lowest, both projected.
    scores = [m("a", 0.1), m("b", 0.300004), m("c", 0.299996), m("d", 0.5), m("e", None, "dW")]
    rep = decide("x", "x", scores, Selection.from_flags(2, None, None))
    assert {s.name for s in rep.modules if s.projected} == {"a", "b", "c"}
    assert rep.decision.threshold == 0.3 and rep.ties == 1
    assert rep.modules[3].reason.startswith("cosine 0.50000 is above")
    assert rep.modules[4].reason == "dW" and not rep.modules[4].projected
    rep = decide(
        "x",
        "x",
        [m(s.name, s.cosine, s.degenerate) for s in scores],
        Selection.from_flags(50, None, None),
    )
    assert rep.projected == 4  # K > N projects every weight with a cosine
    rep = decide("x", "x", [m("e", None, "dW")], Selection.from_flags(None, None, 0.5))
    assert rep.projected == 0 and rep.decision.threshold is None


def test_single_file_index_argument_and_stray_weights(tmp_path: Path) -> None:
    trio = mt.llama_trio(tmp_path / "single", shard=None, seed=9)
    assert (trio.finetuned / "model.safetensors").is_file()
    (trio.finetuned / "pytorch_model.bin").write_bytes(b"stale unpatched weights")
    common = ["--aligned", trio.aligned, "--base", trio.base, "-k", 2, "-q"]
    ok("patch-model", trio.finetuned, *common, "-o", tmp_path / "dir")
    names = {p.name for p in (tmp_path / "dir").iterdir()}
    assert "pytorch_model.bin" not in names and "tokenizer_config.json" in names
    ok("patch-model", trio.finetuned / "model.safetensors", *common, "-o", tmp_path / "file")
    assert {p.name for p in (tmp_path / "file").iterdir()} == {
        "model.safetensors",
        "safelora_report.json",
    }
    assert mt.raw(tmp_path / "file") == mt.raw(tmp_path / "dir")


def test_an_index_file_argument_stands_for_its_directory(
    llama_bf16: mt.Trio, llama_bf16_cache: Path, tmp_path: Path
) -> None:
    idx = llama_bf16.finetuned / "model.safetensors.index.json"
    args = ["--aligned", llama_bf16.aligned, "-p", llama_bf16_cache, "-k", 2, "-q"]
    ok("patch-model", idx, *args, "-o", tmp_path / "a")
    ok("patch-model", llama_bf16.finetuned, *args, "-o", tmp_path / "b")
    a, b = mt.tree(tmp_path / "a"), mt.tree(tmp_path / "b")
    assert set(a) == set(b) and "model.safetensors.index.json" in a
    assert mt.raw(tmp_path / "a") == mt.raw(tmp_path / "b")  # metadata names the argument


def test_patch_model_help_imports_no_torch_and_lists_every_flag() -> None:
    import subprocess
    import sys

    code = (
        "import sys\nfrom safelora_cli.cli import app\n"
        "try:\n    app(['patch-model', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stderr.strip().splitlines()[-1] == "NOTORCH", out.stderr
    for flag in (
        "--aligned",
        "--projections",
        "--base",
        "--num-layers",
        "--threshold",
        "--fraction",
        "--targets",
        "--device",
        "--dry-run",
        "--force",
        "--json",
        "--quiet",
        "--revision",
        "--revision-aligned",
        "--revision-base",
        "--output",
    ):
        assert flag in out.stdout, flag


def test_inspect_refuses_model_flags_for_an_adapter(tmp_path: Path) -> None:
    from tests import factory

    pair = factory.make_pair(tmp_path / "pair")
    adapter = factory.write_adapter(tmp_path / "adapter", base=pair.base)
    r = cli(
        "inspect",
        adapter,
        "--base",
        pair.base_dir,
        "--aligned",
        pair.aligned_dir,
        "--targets",
        "q_proj",
    )
    assert r.exit_code == 2 and "--targets" in r.stderr


def _cache_repo(repo_id: str, src: Path, commit: str) -> None:
    """Lay ``src`` out as huggingface_hub's cache does (blobs + snapshot symlinks), offline."""
    import os

    repo = Path(os.environ["HF_HUB_CACHE"]) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = repo / "blobs" / f"{commit[:8]}-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_from_the_offline_cache(llama_bf16: mt.Trio, tmp_path: Path) -> None:
    _cache_repo("org/finetuned", llama_bf16.finetuned, "a" * 40)
    _cache_repo("org/aligned", llama_bf16.aligned, "b" * 40)
    common = ["--base", llama_bf16.base, "-k", 3, "--json"]
    r = ok(
        "patch-model", "org/finetuned", "--aligned", "org/aligned", *common, "-o", tmp_path / "hub"
    )
    rep = json.loads(r.stdout)
    assert rep["sources"]["finetuned"]["commit"] == "a" * 40
    assert rep["sources"]["aligned"]["repo_id"] == "org/aligned"
    ok(
        "patch-model",
        llama_bf16.finetuned,
        "--aligned",
        llama_bf16.aligned,
        *common,
        "-o",
        tmp_path / "local",
    )
    assert mt.raw(tmp_path / "hub") == mt.raw(tmp_path / "local")
    assert (tmp_path / "hub" / "config.json").read_bytes() == (
        llama_bf16.finetuned / "config.json"
    ).read_bytes()
    assert not any(p.is_symlink() for p in (tmp_path / "hub").iterdir())


def test_a_failed_write_leaves_no_partial_output_and_keeps_the_old_one(
    llama_bf16: mt.Trio, llama_bf16_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safelora_cli.model_patch as mp

    out = tmp_path / "out"
    args = [
        "patch-model",
        llama_bf16.finetuned,
        "--aligned",
        llama_bf16.aligned,
        "-p",
        llama_bf16_cache,
        "-o",
        out,
        "-q",
    ]
    real = mp.write_safetensors
    calls = []

    def failing(dest: Path, *a: Any, **kw: Any) -> None:
        calls.append(dest.name)
        if len(calls) == 2:  # the second shard: the first is already staged
            raise OSError(28, "No space left on device")
        real(dest, *a, **kw)

    monkeypatch.setattr(mp, "write_safetensors", failing)
    r = cli(*args)
    _refused(r, "No space left", str(out.resolve()))
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(mp, "write_safetensors", real)
    ok(*args, "-k", 1)
    before = mt.tree(out)
    calls.clear()
    monkeypatch.setattr(mp, "write_safetensors", failing)
    _refused(cli(*args, "--force"), "No space left")
    assert mt.tree(out) == before  # the previous output is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_update_the_projector_maps_to_zero_has_no_cosine_and_fails_the_gate(
    tmp_path: Path,
) -> None:
    from tests import factory

    base = factory.llama_weights(layers=1)
    w = "model.layers.0.self_attn.q_proj.weight"
    aligned = {k: v.clone() for k, v in base.items()}
    finetuned = {k: v.clone() for k, v in base.items()}
    aligned[w][0] += 0.5  # V lives in row 0 only
    finetuned[w] = aligned[w].clone()
    finetuned[w][1] += 0.5  # dW in row 1 only: V^T dW = 0 exactly, so C dW = 0
    for name, t in base.items():  # every other target: an ordinary update
        if name != w and t.dim() == 2 and ".layers." in name:
            aligned[name] = t + 0.01 * torch.randn(
                t.shape, generator=torch.Generator().manual_seed(1)
            )
            finetuned[name] = aligned[name] + 0.01
    dirs = {}
    for key, tensors in (("base", base), ("aligned", aligned), ("ft", finetuned)):
        dirs[key] = factory.write_checkpoint(tmp_path / key, tensors, config="llama")
    common = ["--aligned", dirs["aligned"], "--base", dirs["base"]]
    r = ok("patch-model", dirs["ft"], *common, "-o", tmp_path / "out", "-t", 1.0, "--json")
    m = next(x for x in json.loads(r.stdout)["modules"] if x["weight"] == w)
    assert m["cosine"] is None and not m["projected"] and "orthogonal" in m["reason"]
    assert mt.raw(tmp_path / "out")[w] == mt.raw(dirs["ft"])[w]  # carried over unchanged
    table = ok("inspect", dirs["ft"], *common).stdout
    assert "no: CdW = 0" in table
    r = cli("inspect", dirs["ft"], *common, "--fail-below", -1.0)  # fails closed
    assert r.exit_code == 3 and "self_attn.q_proj" in r.stderr


def test_summary_names_every_projected_weight_then_the_margin(
    llama_bf16: mt.Trio, llama_bf16_cache: Path, tmp_path: Path
) -> None:
    """Issue 18 item 6 for patch-model: 12 of 14 projected -> the first ten named, "+2 more",
    then the unprojected ones labelled as such (the oracle's order, lowest cosine first)."""
    t = llama_bf16
    r = ok(
        "patch-model", t.finetuned, "--aligned", t.aligned, "-p", llama_bf16_cache,
        "-o", tmp_path / "out", "--num-layers", "12",
    )  # fmt: skip
    cos = {n: o["cos"] for n, o in mt.oracle(t, conv1d=False).items()}
    assert len(cos) == 14 and None not in cos.values()
    ranked = sorted(cos, key=lambda n: cos[n])
    lines = r.stderr.splitlines()
    assert "projected 12 of 14 weights" in lines[0]
    i = lines.index("  projected:")
    named = [ln.split()[1] for ln in lines[i + 1 : i + 11]]
    assert named == [n.removesuffix(".weight") for n in ranked[:10]]
    assert lines[i + 11].strip() == "+2 more (safelora_report.json)"
    j = lines.index("  not projected, lowest cosines:")
    assert [ln.split()[1] for ln in lines[j + 1 : j + 3]] == [
        n.removesuffix(".weight") for n in ranked[12:]
    ]


def test_control_characters_in_weight_names_are_escaped(tmp_path: Path) -> None:
    """A weight name from a checkpoint header reaches the summary escaped (issue 15 §6)."""
    from safetensors.torch import save_file

    evil = "model.layers.0.q\x1b]0;pwned\x07\x1b[2J.weight"
    g = torch.Generator().manual_seed(5)
    base = {evil: torch.randn(8, 8, generator=g), "model.layers.1.q.weight": torch.randn(8, 8)}
    aligned = {k: v + 0.1 * torch.randn(8, 8, generator=g) for k, v in base.items()}
    ft = {k: v + 0.1 * torch.randn(8, 8, generator=g) for k, v in aligned.items()}
    paths = {}
    for name, tensors in (("base", base), ("aligned", aligned), ("ft", ft)):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        paths[name] = d
    r = ok(
        "patch-model", paths["ft"], "--aligned", paths["aligned"], "--base", paths["base"],
        "-o", tmp_path / "out", "--num-layers", "1",
    )  # fmt: skip
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in r.stderr


def test_a_projected_weight_that_overflows_float16_is_refused(tmp_path: Path) -> None:
    """Issue 15 §2 for patch-model: V = 60000 I gives C = 21213 I (float64, by hand), so
    W_aligned + C dW = 60000 + 21213 * 64 is far beyond float16's 65504: exit 1, the weight
    and the dtype named, no output and no staging left, inputs untouched."""
    from safetensors.torch import save_file

    name = "model.layers.0.self_attn.q_proj.weight"
    eye = torch.eye(8, dtype=torch.float32)
    trees = {
        "base": torch.zeros(8, 8),
        "aligned": 60000 * eye,
        "ft": 60064 * eye,  # 60064 is a float16 value: dW = 64 I exactly
    }
    paths = {}
    for which, w in trees.items():
        d = tmp_path / which
        d.mkdir()
        save_file({name: w.to(torch.float16)}, str(d / "model.safetensors"), {"format": "pt"})
        paths[which] = d
    before = {k: (v / "model.safetensors").read_bytes() for k, v in paths.items()}
    out = tmp_path / "out"
    for extra in ([], ["--force"]):
        r = cli(
            "patch-model", paths["ft"], "--aligned", paths["aligned"], "--base", paths["base"],
            "-o", out, "--num-layers", "1", *extra,
        )  # fmt: skip
        _refused(r, name, "does not fit F16", "65504")
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned", "base", "ft"]
    assert {k: (v / "model.safetensors").read_bytes() for k, v in paths.items()} == before


@pytest.mark.parametrize("mode", ["gram", "factor"])
def test_representation_on_the_fly_matches_the_oracle(
    llama_fp32: mt.Trio, tmp_path: Path, mode: str
) -> None:
    """``--representation`` applies wherever projectors are built on the fly (issue 19):
    patch-model --base and inspect FINETUNED --base give the oracle's cosines either way."""
    t = llama_fp32
    ref = mt.oracle(t, conv1d=False)
    cosines = sorted(round(r["cos"], 5) for r in ref.values() if r["cos"] is not None)
    thr = cosines[len(cosines) // 2]
    out = tmp_path / "out"
    args = ("--aligned", t.aligned, "--base", t.base, "--representation", mode)
    r = ok("patch-model", t.finetuned, *args, "-o", out, "-t", thr, "--json")
    check_output(t, out, json.loads(r.stdout), conv1d=False, mode="threshold", value=thr, rel=1e-5)
    r = ok("inspect", t.finetuned, *args, "--json")
    got = {m["name"] + ".weight": m["cosine"] for m in json.loads(r.stdout)["modules"]}
    for name, want in ref.items():
        assert math.isclose(got[name], want["cos"], rel_tol=1e-5), name


def test_representation_with_a_cache_is_a_usage_error(
    llama_bf16: mt.Trio, llama_bf16_cache: Path, tmp_path: Path
) -> None:
    t = llama_bf16
    out = tmp_path / "out"
    for cmd in (("patch-model", "-o", out), ("inspect",)):
        r = cli(cmd[0], t.finetuned, "--aligned", t.aligned, "-p", llama_bf16_cache,
                "--representation", "gram", *cmd[1:])  # fmt: skip
        assert r.exit_code == 2, r.stderr
        assert "--representation gram applies to --base/--aligned, not to -p." in r.stderr
        assert not out.exists()
