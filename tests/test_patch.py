"""patch.py: projected tensors against a float64 dense oracle, byte-identical carry-over, output
rules, atomic writes and batch all-or-nothing (DESIGN §1, §2, §6).

The oracle reads the factory's tensors, forms ``V`` (transposed for Conv1D) and
``C = V V^T / ||V||_F`` in float64 and the dense ``C B A`` / ``B A`` products from the
definition; the code under test never forms them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safelora_cli import __version__
from safelora_cli import patch as patch_mod
from safelora_cli.errors import (
    AdapterError,
    CacheError,
    OutputError,
    SafeLoraError,
    UsageError,
)
from safelora_cli.patch import patch_adapters
from safelora_cli.selection import Selection
from tests import factory
from tests.test_scoring import oracle_select

# ----------------------------------------------------------------------------- helpers


def two_d(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tensors.items() if v.dim() == 2 and "embed" not in k and "wte" not in k]


def build_cache(
    tmp: Path, pair: Any, *, weights: Iterable[str] | None = None, name: str = "cache"
) -> Path:
    """A projection cache holding ``weights`` (default: every 2-D weight) of ``pair``."""
    from safelora_cli.cache import ProjectionCache
    from safelora_cli.projector import alignment_delta, build_projector
    from safelora_cli.sources import open_model

    rb, bspec = open_model(str(pair.base_dir), label="base model")
    ra, aspec = open_model(str(pair.aligned_dir), label="aligned model")
    rb.close()
    ra.close()
    fif = bool(getattr(pair, "fan_in_fan_out", False))
    path = tmp / name
    with ProjectionCache.create_or_resume(path, bspec, aspec) as c:
        for w in weights if weights is not None else two_d(pair.base):
            v = alignment_delta(pair.base[w], pair.aligned[w], fan_in_fan_out=fif)
            c.put(build_projector(w, v, fan_in_fan_out=fif))
        c.finish()
    return path


def oracle(pair: Any, adapter_dir: Path, fif: bool) -> dict[str, dict[str, Any]]:
    """Per module: C B (float64), cosine from the dense products, and the keys."""
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out: dict[str, dict[str, Any]] = {}
    for key in tensors:
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        kb = key.replace(".lora_A.", ".lora_B.")
        a, b = tensors[key].double(), tensors[kb].double()
        w = f"{module}.weight"
        wb, wa = pair.base[w].double(), pair.aligned[w].double()
        if fif:
            wb, wa = wb.T, wa.T
        v = wa - wb
        n = torch.linalg.matrix_norm(v)
        c = v @ v.T / n if n > 0 else torch.zeros(v.shape[0], v.shape[0], dtype=torch.float64)
        ba, cba = b @ a, c @ b @ a
        nba, ncba = torch.linalg.matrix_norm(ba), torch.linalg.matrix_norm(cba)
        cos = None if nba == 0 or ncba == 0 else float((cba * ba).sum() / (nba * ncba))
        out[module] = {"cb": c @ b, "cos": cos, "key_a": key, "key_b": kb, "b": tensors[kb]}
    return out


def raw_tensors(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The header and each tensor's raw bytes of a safetensors file (read independently)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    raw = {
        k: body[v["data_offsets"][0] : v["data_offsets"][1]]
        for k, v in header.items()
        if k != "__metadata__"
    }
    return header, raw


def run_patch(adapters: list[Path] | Path, out: Path, **kw: Any):
    ads = [str(a) for a in (adapters if isinstance(adapters, list) else [adapters])]
    return patch_adapters(ads, out, **kw)


def siblings(p: Path) -> list[str]:
    return sorted(x.name for x in p.parent.iterdir()) if p.parent.exists() else []


LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_ALL = ("c_attn", "c_proj", "c_fc")
MODES = [
    ("num_layers", 1),
    ("num_layers", 3),
    ("num_layers", 100),
    ("threshold", 0.2),
    ("threshold", -1.0),
    ("fraction", 0.3),
    ("fraction", 1.0),
]


# ----------------------------------------------------------------------------- oracle


LAYOUTS = {
    "llama-gqa-qv": ("llama", ("q_proj", "v_proj")),
    "llama-all-linear": ("llama", LLAMA_ALL),
    "gpt2-conv1d": ("gpt2", GPT2_ALL),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A pair, an adapter on it and a cache, built once per layout (read-only for the tests)."""
    arch, targets = LAYOUTS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    pair = factory.make_pair(tmp, arch=arch)
    fif = pair.fan_in_fan_out
    ad = factory.write_adapter(tmp / "adapter", base=pair.base, targets=targets, fan_in_fan_out=fif)
    return ad, build_cache(tmp, pair), oracle(pair, ad, fif)


@pytest.mark.parametrize(("mode", "value"), MODES, ids=[f"{m}={v}" for m, v in MODES])
def test_patch_matches_dense_oracle(tmp_path: Path, layout: tuple, mode: str, value: float) -> None:
    ad, cache, want = layout
    out = tmp_path / "out"
    [rep] = run_patch(ad, out, projections=cache, selection=Selection(mode, value))
    chosen = oracle_select({m: w["cos"] for m, w in want.items()}, mode, value)
    assert {m.name for m in rep.modules if m.projected} == chosen
    assert rep.total == len(want) and rep.projected == len(chosen)

    header, raw = raw_tensors(out / "adapter_model.safetensors")
    _, raw_in = raw_tensors(ad / "adapter_model.safetensors")
    new = load_file(str(out / "adapter_model.safetensors"))
    dists = []
    for ms in rep.modules:
        w = want[ms.name]
        assert ms.cosine == pytest.approx(w["cos"], rel=1e-5, abs=1e-6)
        assert raw[w["key_a"]] == raw_in[w["key_a"]]
        if ms.name in chosen:
            got = new[w["key_b"]].double()
            err = torch.linalg.matrix_norm(got - w["cb"]) / torch.linalg.matrix_norm(w["cb"])
            assert err < 1e-5, (ms.name, float(err))
            final = got
        else:
            assert raw[w["key_b"]] == raw_in[w["key_b"]]
            final = w["b"].double()
        dists.append(1 / (1 + float(torch.linalg.matrix_norm(final - w["cb"]))))
    assert rep.pdst == pytest.approx(sum(dists) / len(dists), rel=1e-5)
    assert header.keys() == raw_tensors(ad / "adapter_model.safetensors")[0].keys()


def test_fraction_rounds_up_and_count_ties_project(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path)
    # Every layer's q_proj gets the same V, A and B: all cosines tie.
    w0 = "model.layers.0.self_attn.q_proj.weight"
    for i in range(1, 2):
        w = f"model.layers.{i}.self_attn.q_proj.weight"
        pair.base[w] = pair.base[w0].clone()
        pair.aligned[w] = pair.aligned[w0].clone()
    ad = factory.write_adapter(tmp_path / "adapter", base=pair.base, targets=("q_proj",))
    tensors = load_file(str(ad / "adapter_model.safetensors"))
    for part in ("lora_A", "lora_B"):
        src = f"base_model.model.model.layers.0.self_attn.q_proj.{part}.weight"
        tensors[src.replace("layers.0", "layers.1")] = tensors[src].clone()
    save_file(tensors, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    cache = build_cache(tmp_path, pair)
    [rep] = run_patch(ad, tmp_path / "o1", projections=cache, selection=Selection("num_layers", 1))
    assert rep.projected == 2 and rep.ties == 1
    [rep] = run_patch(ad, tmp_path / "o2", projections=cache, selection=Selection("fraction", 0.4))
    assert rep.decision.k == 1  # ceil(0.4 * 2)


def test_degenerate_modules_are_reported_and_left_alone(tmp_path: Path) -> None:
    same = ("model.layers.0.self_attn.q_proj.weight",)
    pair = factory.make_pair(tmp_path, same=same)
    ad = factory.write_adapter(
        tmp_path / "adapter", base=pair.base, zero_b=("layers.1.self_attn.v_proj",)
    )
    cache = build_cache(tmp_path, pair)
    out = tmp_path / "out"
    [rep] = run_patch(ad, out, projections=cache, selection=Selection("threshold", 1.0))
    by = {m.name: m for m in rep.modules}
    v0 = by["model.layers.0.self_attn.q_proj"]
    b0 = by["model.layers.1.self_attn.v_proj"]
    assert v0.cosine is None and not v0.projected and "no alignment signal" in v0.reason
    assert b0.cosine is None and not b0.projected and "untrained" in b0.reason
    assert rep.projected == rep.total - 2
    _, raw = raw_tensors(out / "adapter_model.safetensors")
    _, raw_in = raw_tensors(ad / "adapter_model.safetensors")
    for k in raw:
        if "layers.0.self_attn.q_proj" in k or "layers.1.self_attn.v_proj" in k:
            assert raw[k] == raw_in[k]
    js = json.loads((out / "safelora_report.json").read_text())
    assert {m["name"]: m["cosine"] for m in js["modules"]}[v0.name] is None


# ----------------------------------------------------------------------------- output files


def test_every_file_carried_over_and_metadata(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path, dtype=torch.bfloat16)
    ad = factory.write_adapter(
        tmp_path / "adapter",
        base=pair.base,
        dtype=torch.bfloat16,
        use_dora=False,
        modules_to_save=["lm_head"],
        lora_bias=True,
    )
    (ad / "README.md").write_text("# my adapter\n")
    (ad / "tokenizer.json").write_bytes(b'{"x": 1}')
    (ad / "sub").mkdir()
    (ad / "sub" / "notes.txt").write_bytes(os.urandom(64))
    (ad / ".git").mkdir()
    (ad / ".git" / "HEAD").write_text("ref")
    cache = build_cache(tmp_path, pair)
    out = tmp_path / "out"
    [rep] = run_patch(ad, out, projections=cache, selection=Selection("num_layers", 2))

    for f in ("adapter_config.json", "tokenizer.json", "sub/notes.txt"):
        assert (out / f).read_bytes() == (ad / f).read_bytes(), f
    # README.md is not copied but rewritten as the model card: the input's text is kept.
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "# my adapter\n" in card and "safelora" in card
    assert not (out / ".git").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "adapter_config.json",
            "README.md",
            "tokenizer.json",
            "sub",
            "adapter_model.safetensors",
            "safelora_report.json",
        ]
    )
    h_out, raw_out = raw_tensors(out / "adapter_model.safetensors")
    h_in, raw_in = raw_tensors(ad / "adapter_model.safetensors")

    def by_offset(h: dict) -> list[str]:
        return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])

    assert by_offset(h_out) == by_offset(h_in)  # same keys, same tensor order
    projected_keys = {m.key_b for m in rep.modules if m.projected}
    assert len(projected_keys) == 2
    for k, v in h_in.items():
        if k == "__metadata__":
            continue
        assert h_out[k]["dtype"] == v["dtype"] == "BF16"
        assert h_out[k]["shape"] == v["shape"]
        if k not in projected_keys:
            assert raw_out[k] == raw_in[k], k
        else:
            assert raw_out[k] != raw_in[k]
    meta = h_out["__metadata__"]
    assert meta["format"] == "pt"
    assert meta["safelora.version"] == __version__
    assert json.loads(meta["safelora.projected"]) == sorted(
        (m.name for m in rep.modules if m.projected), key=[m.name for m in rep.modules].index
    )
    sel = json.loads(meta["safelora.selection"])
    assert sel["mode"] == "num_layers" and sel["value"] == 2
    srcs = json.loads(meta["safelora.sources"])
    assert srcs["base"]["path"] == str(pair.base_dir.resolve())
    assert srcs["aligned"]["path"] == str(pair.aligned_dir.resolve())
    # modules_to_save copies and lora_B.bias are reported / carried over unchanged
    assert any("modules_to_save" in s.reason for s in rep.skipped)
    # the file loads with safetensors itself
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(raw_in)


def test_skipped_modules_carried_over_with_reasons(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path)
    ad = factory.write_adapter(tmp_path / "adapter", base=pair.base, embedding=True, use_dora=False)
    cache = build_cache(tmp_path, pair)
    out = tmp_path / "out"
    [rep] = run_patch(ad, out, projections=cache, selection=Selection("fraction", 1.0))
    skipped = {s.name: s for s in rep.skipped}
    assert any("embedding" in s.reason for s in skipped.values())
    _, raw_out = raw_tensors(out / "adapter_model.safetensors")
    _, raw_in = raw_tensors(ad / "adapter_model.safetensors")
    for s in rep.skipped:
        for k in s.keys:
            assert raw_out[k] == raw_in[k]
    js = json.loads((out / "safelora_report.json").read_text())
    assert js["skipped"] and all(x["reason"] for x in js["skipped"])


def test_dora_adapter_modules_are_skipped_not_projected(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path)
    ad = factory.write_adapter(tmp_path / "adapter", base=pair.base, use_dora=True)
    cache = build_cache(tmp_path, pair)
    try:
        reps = run_patch(
            ad, tmp_path / "out", projections=cache, selection=Selection("fraction", 1.0)
        )
    except AdapterError as e:  # refusing (with a reason) is also allowed by DESIGN §2
        assert "DoRA" in str(e) or "dora" in str(e).lower()
        assert not (tmp_path / "out").exists()
        return
    [rep] = reps
    assert rep.skipped and all("DoRA" in s.reason for s in rep.skipped)
    _, raw_out = raw_tensors(tmp_path / "out" / "adapter_model.safetensors")
    _, raw_in = raw_tensors(ad / "adapter_model.safetensors")
    assert raw_out == raw_in


def test_two_runs_give_byte_identical_adapters(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path)
    ad = factory.write_adapter(tmp_path / "adapter", base=pair.base)
    cache = build_cache(tmp_path, pair)
    out = tmp_path / "out"
    run_patch(ad, out, projections=cache, selection=Selection("num_layers", 2))
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    run_patch(ad, out, projections=cache, selection=Selection("num_layers", 2), force=True)
    second = {p.name: p.read_bytes() for p in out.iterdir()}
    assert first == second
    other = tmp_path / "other"
    run_patch(ad, other, projections=cache, selection=Selection("num_layers", 2))
    assert (other / "adapter_model.safetensors").read_bytes() == first["adapter_model.safetensors"]


def test_legacy_bin_input_becomes_safetensors(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path)
    ad = factory.write_adapter(tmp_path / "adapter", base=pair.base, bin=True)
    ref = factory.write_adapter(tmp_path / "ref", base=pair.base)  # same seed: same tensors
    cache = build_cache(tmp_path, pair)
    sel = Selection("num_layers", 2)
    run_patch(ad, tmp_path / "out", projections=cache, selection=sel)
    run_patch(ref, tmp_path / "out_ref", projections=cache, selection=sel)
    assert not (tmp_path / "out" / "adapter_model.bin").exists()
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "out_ref" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for k in got:
        assert torch.equal(got[k], want[k]), k
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path)
    ad = factory.write_adapter(tmp_path / "adapter", base=pair.base)
    cache = build_cache(tmp_path, pair)
    before = sorted(os.listdir(tmp_path))
    [rep] = run_patch(ad, tmp_path / "out", projections=cache, dry_run=True)
    assert sorted(os.listdir(tmp_path)) == before
    assert rep.dry_run and rep.output == str((tmp_path / "out").resolve())
    assert rep.selection == Selection("num_layers", 10)
    assert rep.to_json()["dry_run"] is True


# ----------------------------------------------------------------------------- sources


def test_missing_cache_entry_names_the_command(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path)
    ad = factory.write_adapter(tmp_path / "adapter", base=pair.base)
    cache = build_cache(tmp_path, pair, weights=["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(CacheError) as ei:
        run_patch(ad, tmp_path / "out", projections=cache)
    assert "compute-projections" in str(ei.value)
    assert not (tmp_path / "out").exists()


def test_cache_entries_read_once_for_a_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safelora_cli.cache import ProjectionCache

    pair = factory.make_pair(tmp_path)
    a1 = factory.write_adapter(tmp_path / "a1", base=pair.base, seed=1)
    a2 = factory.write_adapter(tmp_path / "a2", base=pair.base, seed=2, targets=("q_proj",))
    cache = build_cache(tmp_path, pair)
    calls: list[str] = []
    orig = ProjectionCache.get

    def counting(self: Any, weight: str, **kw: Any) -> Any:
        calls.append(weight)
        return orig(self, weight, **kw)

    monkeypatch.setattr(ProjectionCache, "get", counting)
    reps = run_patch([a1, a2], tmp_path / "out", projections=cache)
    assert sorted(calls) == sorted(set(calls))
    assert set(calls) == {f"{m.name}.weight" for m in reps[0].modules}
    assert len(calls) < len(two_d(pair.base))  # only what the adapters need
    assert (tmp_path / "out" / "a1" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "a2" / "adapter_model.safetensors").is_file()
    assert [r.output for r in reps] == [str((tmp_path / "out" / n).resolve()) for n in ("a1", "a2")]


def test_streaming_source_matches_cache(tmp_path: Path) -> None:
    pytest.importorskip("safelora_cli.compute")
    pair = factory.make_pair(tmp_path, arch="gpt2")
    ad = factory.write_adapter(
        tmp_path / "adapter", base=pair.base, targets=GPT2_ALL, fan_in_fan_out=True
    )
    cache = build_cache(tmp_path, pair)
    sel = Selection("num_layers", 3)
    [r1] = run_patch(ad, tmp_path / "o1", projections=cache, selection=sel)
    [r2] = run_patch(
        ad,
        tmp_path / "o2",
        base=str(pair.base_dir),
        aligned=str(pair.aligned_dir),
        selection=sel,
        device="cpu",
    )
    assert [m.projected for m in r1.modules] == [m.projected for m in r2.modules]
    for m1, m2 in zip(r1.modules, r2.modules, strict=True):
        assert m1.cosine == pytest.approx(m2.cosine, rel=1e-6)
    a = load_file(str(tmp_path / "o1" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "o2" / "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-8), k


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({}, "no projector source"),
        ({"base": "b"}, "--aligned is missing"),
        ({"aligned": "a"}, "--base is missing"),
        ({"projections": Path("c"), "base": "b", "aligned": "a"}, "mutually exclusive"),
        ({"projections": Path("c"), "revision_base": "main"}, "revision"),
    ],
)
def test_flag_errors(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        patch_adapters([str(tmp_path)], tmp_path / "out", **kw)


# ----------------------------------------------------------------------------- output rules


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Any, Path, Path]:
    pair = factory.make_pair(tmp_path)
    ad = factory.write_adapter(tmp_path / "adapter", base=pair.base)
    return pair, ad, build_cache(tmp_path, pair)


def test_output_may_not_be_or_overlap_an_input(setup: Any, tmp_path: Path) -> None:
    _, ad, cache = setup
    for out in (ad, ad / "inner", tmp_path, ad / ".." / "adapter"):
        with pytest.raises(OutputError):
            run_patch(ad, out, projections=cache, force=True)
    assert not (ad / "inner").exists()


def test_existing_output_needs_force(setup: Any, tmp_path: Path) -> None:
    _, ad, cache = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    with pytest.raises(OutputError, match="already exists"):
        run_patch(ad, out, projections=cache)
    assert (out / "adapter_config.json").read_text() == "{}"
    run_patch(ad, out, projections=cache, force=True)
    assert (out / "adapter_config.json").read_bytes() == (ad / "adapter_config.json").read_bytes()
    assert siblings(out) == sorted(["adapter", "aligned", "base", "cache", "out"])


def test_force_never_replaces_an_unrelated_directory(setup: Any, tmp_path: Path) -> None:
    _, ad, cache = setup
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="not an adapter"):
        run_patch(ad, out, projections=cache, force=True)
    assert (out / "thesis.tex").read_text() == "years of work"
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        run_patch(ad, f, projections=cache, force=True)


def test_duplicate_names_in_a_batch(setup: Any, tmp_path: Path) -> None:
    pair, ad, cache = setup
    other = factory.write_adapter(tmp_path / "x" / "adapter", base=pair.base, seed=3)
    with pytest.raises(UsageError, match="both be written"):
        run_patch([ad, other], tmp_path / "out", projections=cache)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- atomicity


def _boom(*a: Any, **k: Any) -> None:
    raise OSError(28, "No space left on device")


def test_failed_write_leaves_nothing(
    setup: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ad, cache = setup
    monkeypatch.setattr(patch_mod, "_write_safetensors", _boom)
    out = tmp_path / "deep" / "out"
    with pytest.raises(OSError):
        run_patch(ad, out, projections=cache)
    assert not out.exists() and not (tmp_path / "deep").exists()
    assert not [p for p in tmp_path.iterdir() if "safelora" in p.name]


def test_failed_forced_write_keeps_the_old_output(
    setup: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ad, cache = setup
    out = tmp_path / "out"
    run_patch(ad, out, projections=cache, selection=Selection("num_layers", 1))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(patch_mod, "_write_safetensors", _boom)
    with pytest.raises(OSError):
        run_patch(ad, out, projections=cache, force=True, selection=Selection("num_layers", 3))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert siblings(out) == sorted(["adapter", "aligned", "base", "cache", "out"])


@pytest.mark.parametrize("existing", [False, True])
def test_batch_is_all_or_nothing(
    setup: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    pair, ad, cache = setup
    ad2 = factory.write_adapter(tmp_path / "second", base=pair.base, seed=5)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    orig = patch_mod._write_safetensors
    seen: list[Path] = []

    def second_fails(s: Any, dest: Path) -> None:
        seen.append(dest)
        if len(seen) == 2:
            _boom()
        orig(s, dest)

    monkeypatch.setattr(patch_mod, "_write_safetensors", second_fails)
    with pytest.raises(OSError):
        run_patch([ad, ad2], out, projections=cache, force=existing)
    assert len(seen) == 2
    if existing:
        assert list(out.iterdir()) == []
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "safelora" in p.name]


def test_failed_rename_rolls_back_the_batch(
    setup: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair, ad, cache = setup
    ad2 = factory.write_adapter(tmp_path / "second", base=pair.base, seed=5)
    out = tmp_path / "out"
    run_patch([ad, ad2], out, projections=cache, selection=Selection("num_layers", 1))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    from safelora_cli import fsio

    real_exchange = fsio.exchange

    def flaky(src: Any, dst: Any) -> bool:
        # --force swaps each staged directory with its target (RENAME_EXCHANGE).
        if str(dst) == str(out / "second") and ".safelora-tmp-" in str(src):
            raise OSError(5, "I/O error")
        return real_exchange(src, dst)

    monkeypatch.setattr(fsio, "exchange", flaky)
    with pytest.raises(OSError):
        run_patch(
            [ad, ad2], out, projections=cache, force=True, selection=Selection("num_layers", 4)
        )
    monkeypatch.setattr(fsio, "exchange", real_exchange)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "second"]


def test_broken_adapter_in_a_batch_fails_with_its_name(setup: Any, tmp_path: Path) -> None:
    pair, ad, cache = setup
    broken = factory.write_adapter(tmp_path / "broken", base=pair.base, seed=4)
    t = load_file(str(broken / "adapter_model.safetensors"))
    t.pop(next(k for k in t if ".lora_B." in k))
    save_file(t, str(broken / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterError) as ei:
        run_patch([ad, broken], tmp_path / "out", projections=cache)
    assert "broken" in str(ei.value)
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_model_is_refused(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path)
    other = factory.make_pair(tmp_path / "wide", hidden=64, intermediate=96)
    ad = factory.write_adapter(tmp_path / "adapter", base=other.base)
    cache = build_cache(tmp_path, pair)
    with pytest.raises(SafeLoraError, match="q_proj"):
        run_patch(ad, tmp_path / "out", projections=cache)
    assert not (tmp_path / "out").exists()


def test_batch_names_hub_adapters_by_repository(tmp_path: Path) -> None:
    from types import SimpleNamespace

    hub = SimpleNamespace(
        path=tmp_path / "snapshots" / ("a" * 40),
        source=SimpleNamespace(kind="hub", repo_id="org/my-lora"),
    )
    local = SimpleNamespace(path=tmp_path / "adapters" / "other", source=None)
    plan = patch_mod.plan_outputs([hub, local], tmp_path / "out", force=False)
    assert [t.name for t in plan.targets] == ["my-lora", "other"]
    assert plan.batch and plan.root == (tmp_path / "out").resolve()


def test_copy_helper_follows_symlinks(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path)
    real = factory.write_adapter(tmp_path / "real", base=pair.base)
    snap = tmp_path / "snap" / "adapter"
    snap.mkdir(parents=True)
    for f in real.iterdir():
        (snap / f.name).symlink_to(f)
    cache = build_cache(tmp_path, pair)
    run_patch(snap, tmp_path / "out", projections=cache)
    cfg = tmp_path / "out" / "adapter_config.json"
    assert not cfg.is_symlink() and cfg.read_bytes() == (real / "adapter_config.json").read_bytes()
    shutil.rmtree(real)  # the output does not depend on the input
    assert load_file(str(tmp_path / "out" / "adapter_model.safetensors"))


def test_failed_run_removes_the_cache_it_was_saving(
    setup: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair, ad, _ = setup
    monkeypatch.setattr(patch_mod, "_write_safetensors", _boom)
    kw = {"base": str(pair.base_dir), "aligned": str(pair.aligned_dir), "device": "cpu"}
    with pytest.raises(OSError):
        run_patch(ad, tmp_path / "out", save_projections=tmp_path / "saved", **kw)
    assert not (tmp_path / "saved").exists() and not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="dry-run"):
        run_patch(ad, tmp_path / "out", save_projections=tmp_path / "s2", dry_run=True, **kw)
    assert not (tmp_path / "s2").exists()
