"""``safelora inspect`` through the CLI: golden plain tables, JSON vs a float64 oracle, the gate.

Golden files (tests/golden/) were written from the hand-computed table in
``tests.test_inspect.golden_case`` (every cosine, norm and Pdst there is a small fraction);
the CliRunner's stdout is not a terminal, so the output is the plain rendering.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from safelora_cli import __version__
from safelora_cli.cli import app
from tests import factory
from tests.test_inspect import GOLDEN_WEIGHTS, build_cache, golden_case

GOLDEN = Path(__file__).parent / "golden"
ANSI = re.compile(r"\x1b\[")

runner = CliRunner()


def invoke(args: list[str]):
    return runner.invoke(app, ["inspect", *args])


def golden(name: str) -> str:
    return (GOLDEN / name).read_text()


@pytest.fixture
def case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    c = golden_case(tmp_path)
    monkeypatch.chdir(tmp_path)  # relative arguments keep tmp paths out of the output
    return c


def _check_plain(out: str) -> None:
    assert not ANSI.search(out), "colour codes in plain output"
    assert not re.search(r"[\u2500-\u257f]", out), "box drawing in plain output"
    assert max(len(line) for line in out.splitlines()) <= 80


# ----------------------------------------------------------------------------- golden tables


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["adapter", "-p", "cache", "--num-layers", "2"], "score_layer_k2.txt"),
        (
            ["adapter", "--base", "base", "--aligned", "aligned", "--sort", "cosine", "-t", "0.5"],
            "score_cosine_threshold.txt",
        ),
        (["adapter", "-p", "cache", "--top", "2", "-k", "1"], "score_top2_k1.txt"),
    ],
)
def test_similarity_table_golden(case, args: list[str], name: str) -> None:
    r = invoke(args)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == golden(name)
    _check_plain(r.stdout)


def test_cache_and_streaming_give_the_same_table(case) -> None:
    a = invoke(["adapter", "-p", "cache", "--sort", "cosine", "-t", "0.5"])
    b = invoke(
        ["adapter", "--base", "base", "--aligned", "aligned", "--sort", "cosine", "-t", "0.5"]
    )
    assert a.exit_code == b.exit_code == 0
    assert a.stdout == b.stdout


def _skipped_by_name(out: str) -> tuple[dict[str, str], str]:
    """Parse the skipped block (reason lines indented 2, wrapped; names indented 4) into
    ``{name: reason}``, and the output with every reason replaced by ``<reason>``."""
    reasons: dict[str, str] = {}
    kept: list[str] = []
    pending: list[str] = []  # reason lines not yet followed by names
    current = ""
    for line in out.splitlines():
        if line.startswith("  ") and not line.startswith("    "):
            if not pending:
                kept.append("  <reason>:")
            pending.append(line.strip())
            continue
        if line.startswith("    "):
            if pending:
                current, pending = " ".join(pending).removesuffix(":"), []
            for name in line.strip().rstrip(",").split(", "):
                reasons[name] = current
        kept.append(line)
    return reasons, "\n".join(kept) + "\n"


def test_adapter_alone_golden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    golden_case(tmp_path, extras=True)
    monkeypatch.chdir(tmp_path)
    r = invoke(["adapter"])
    assert r.exit_code == 0, r.stderr
    _check_plain(r.stdout)
    # The skip reasons are adapter.py's wording; check their substance, not their phrasing.
    reasons, normalised = _skipped_by_name(r.stdout)
    assert "modules_to_save" in reasons["lm_head"]
    assert "embedding" in reasons["model.embed_tokens"].lower()
    assert normalised == golden("adapter_alone.txt")


def test_cache_alone_golden(case, tmp_path: Path) -> None:
    r = invoke(["-p", "cache"])
    assert r.exit_code == 0, r.stderr
    _check_plain(r.stdout)
    size = sum(p.stat().st_size for p in (tmp_path / "cache").iterdir())
    size_text = f"{size / 1e3:.1f} kB" if size >= 1000 else f"{size} B"
    assert f"6 weights, {size_text} on disk" in r.stdout
    out = r.stdout.replace(size_text, "<SIZE>").replace(__version__, "<VERSION>")
    out = out.replace(str(tmp_path.resolve()), "<TMP>").replace(str(tmp_path), "<TMP>")
    assert out == golden("cache.txt")


def test_cache_alone_json(case) -> None:
    r = invoke(["-p", "cache", "--json"])
    assert r.exit_code == 0, r.stderr
    (line,) = r.stdout.splitlines()
    js = json.loads(line)
    assert js["count"] == 6 and js["tool_version"] == __version__ and js["complete"] is True
    assert [w["weight"] for w in js["weights"]] == sorted(
        GOLDEN_WEIGHTS, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")]
    )


def test_adapter_alone_json(case) -> None:
    r = invoke(["adapter", "--json"])
    assert r.exit_code == 0, r.stderr
    js = json.loads(r.stdout)
    assert js["projectable"] == 6 and js["skipped"] == []
    k0 = next(m for m in js["modules"] if m["name"] == "model.layers.0.self_attn.k_proj")
    assert (k0["rank"], k0["scale"], k0["shape"]) == (2, 1.0, [2, 4])


# ----------------------------------------------------------------------------- the gate


@pytest.mark.parametrize(
    ("threshold", "code"),
    [("0.5", 3), ("0.38463", 3), ("0.38462", 0), ("0.3", 0), ("-1", 0), ("1", 3)],
)
def test_gate_exit_codes(case, threshold: str, code: int) -> None:
    # Defined cosines: 0.6, 0.6, 1.0 and 5/13 = 0.38462 (rounded to 5 decimals, as displayed).
    r = invoke(["adapter", "-p", "cache", "--fail-below", threshold])
    assert r.exit_code == code, r.stderr
    assert r.stdout.startswith("adapter: adapter\n")  # the table is printed either way
    if code == 3:
        first = r.stderr.splitlines()[0]
        assert first.startswith(f"error: gate --fail-below {float(threshold):g}:")
        assert "model.layers.1.self_attn.v_proj 0.38462" in first
        # Undefined cosines (V = 0, B A = 0) are never gated.
        assert "model.layers.1.self_attn.q_proj" not in first
        assert "model.layers.1.self_attn.k_proj" not in first
    else:
        assert r.stderr == ""


def test_gate_with_json_prints_json_first(case) -> None:
    r = invoke(["adapter", "-p", "cache", "--json", "--fail-below", "0.5"])
    assert r.exit_code == 3
    js = json.loads(r.stdout)
    assert js["adapter"] == "adapter"
    assert "0.38462" in r.stderr and "1 of 4 modules" in r.stderr


def test_gate_message_names_worst_first(case) -> None:
    r = invoke(["adapter", "-p", "cache", "--fail-below", "0.9"])
    assert r.exit_code == 3
    line = r.stderr.splitlines()[0]
    assert "3 of 4 modules" in line
    assert (
        line.index("v_proj 0.38462") < line.index("k_proj 0.60000") < line.index("q_proj 0.60000")
    )


@pytest.mark.parametrize(
    "args",
    [
        ["adapter", "-p", "cache", "--sort", "name"],
        ["adapter", "-p", "cache", "--top", "0"],
        ["adapter", "-p", "cache", "--fail-below", "1.5"],
        ["adapter", "-p", "cache", "-k", "2", "-t", "0.5"],
        ["adapter", "-p", "cache", "--fraction", "0"],
        ["adapter", "-p", "cache", "--base", "base", "--aligned", "aligned"],
        ["adapter", "--base", "base"],
        ["adapter", "--fail-below", "0.5"],
        ["adapter", "--sort", "cosine"],
        ["-p", "cache", "--num-layers", "3"],
        ["-p", "cache", "--base", "base", "--aligned", "aligned"],
        ["--base", "base", "--aligned", "aligned"],
    ],
)
def test_usage_errors_exit_2(case, args: list[str]) -> None:
    r = invoke(args)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stdout == ""


def test_missing_cache_exit_1(case) -> None:
    r = invoke(["-p", "nope"])
    assert r.exit_code == 1
    assert "nope" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- JSON vs oracle


def _oracle(base, aligned, tensors, module, *, r, alpha):
    """Float64 dense oracle from the definitions (DESIGN §1)."""
    w = f"{module}.weight"
    v = aligned[w].double() - base[w].double()
    nv = float(torch.linalg.norm(v))
    c = v @ v.T / nv if nv > 0 else torch.zeros(v.shape[0], v.shape[0], dtype=torch.float64)
    a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
    b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
    dw = b @ a
    cdw = c @ dw
    n1, n2 = float(torch.linalg.norm(cdw)), float(torch.linalg.norm(dw))
    cos = None if n1 == 0 or n2 == 0 else float((cdw * dw).sum()) / (n1 * n2)
    return {"cos": cos, "norm_dw": alpha / r * n2, "c": c, "b": b, "nv": nv}


def test_json_matches_float64_oracle_several_adapters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = factory.make_pair(tmp_path, same=("model.layers.1.self_attn.v_proj.weight",), scale=0.05)
    targets = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    ad1 = factory.write_adapter(
        tmp_path / "ad1", base=pair.base, targets=targets, r=4, alpha=8, zero_b=("0.mlp.up_proj",)
    )
    ad2 = factory.write_adapter(
        tmp_path / "ad2", base=pair.base, targets=("q_proj", "v_proj"), r=2, alpha=4, seed=5
    )
    weights = [n for n in pair.base if n.endswith(tuple(t + ".weight" for t in targets))]
    build_cache(pair.base_dir, pair.aligned_dir, tmp_path / "cache", weights)
    monkeypatch.chdir(tmp_path)
    r = invoke(["ad1", "ad2", "-p", "cache", "--json", "--fraction", "0.3"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    from safetensors.torch import load_file

    for line, ad, (rank, alpha) in zip(lines, (ad1, ad2), ((4, 8), (2, 4)), strict=True):
        js = json.loads(line)
        assert js["adapter"] == ad.name and js["output"] is None
        assert js["selection"] == {"mode": "fraction", "value": 0.3}
        tensors = load_file(str(ad / "adapter_model.safetensors"))
        truth = factory.adapter_modules(ad)
        assert {m["name"] for m in js["modules"]} == set(truth)
        oracle = {
            name: _oracle(pair.base, pair.aligned, tensors, name, r=rank, alpha=alpha)
            for name in truth
        }
        # Selection restated from DESIGN §1: 5-decimal rounding, K = ceil(f N), t = K-th smallest.
        defined = {n: round(o["cos"], 5) for n, o in oracle.items() if o["cos"] is not None}
        k = math.ceil(0.3 * len(defined))
        t = sorted(defined.values())[k - 1]
        chosen = {n for n, c in defined.items() if c <= t}
        dists = []
        for m in js["modules"]:
            o = oracle[m["name"]]
            if o["cos"] is None:
                assert m["cosine"] is None and m["projected"] is False and m["reason"]
            else:
                assert m["cosine"] == pytest.approx(o["cos"], rel=1e-5, abs=1e-6)
            assert m["norm_dw"] == pytest.approx(o["norm_dw"], rel=1e-5, abs=1e-9)
            assert m["norm_v"] == pytest.approx(o["nv"], rel=1e-5, abs=1e-9)
            assert m["projected"] == (m["name"] in chosen)
            cb = o["c"] @ o["b"]
            final = cb.float().double() if m["name"] in chosen else o["b"]
            dists.append(1.0 / (1.0 + float(torch.linalg.norm(final - cb))))
        assert js["projected"] == len(chosen) and js["total"] == len(truth)
        assert js["threshold"] == pytest.approx(t)
        assert js["pdst"] == pytest.approx(sum(dists) / len(dists), rel=1e-5)
        names = {m["name"] for m in js["modules"]}
        assert "model.layers.1.self_attn.v_proj" in names  # V = 0 there: cosine null
    # The degenerate modules are really there: one V = 0, one B = 0.
    js1 = json.loads(lines[0])
    nulls = {m["name"] for m in js1["modules"] if m["cosine"] is None}
    assert nulls == {"model.layers.1.self_attn.v_proj", "model.layers.0.mlp.up_proj"}


def test_json_schema_matches_patch_dry_run(case, tmp_path: Path) -> None:
    """inspect --json and patch --dry-run --json agree on every field but the output path."""
    a = invoke(["adapter", "-p", "cache", "--json", "-k", "2"])
    assert a.exit_code == 0, a.stderr
    p = runner.invoke(
        app, ["patch", "adapter", "-p", "cache", "-o", "out", "--dry-run", "--json", "-k", "2"]
    )
    assert p.exit_code == 0, p.stderr
    ja, jp = json.loads(a.stdout), json.loads(p.stdout)
    assert list(ja) == list(jp)
    for key in ("output", "dry_run"):
        ja.pop(key), jp.pop(key)
    assert ja == jp


# ----------------------------------------------------------------------------- 7B-sized tables


def _seven_b_report(selection_flags: tuple[int | None, float | None, float | None]):
    """A Llama-7B-shaped report: 32 layers x 7 modules = 224 rows, made-up cosines."""
    from safelora_cli.scoring import REASON_ORTHOGONAL, AdapterReport, ModuleScore
    from safelora_cli.selection import Selection, select

    shapes = {
        "self_attn.q_proj": (4096, 4096),
        "self_attn.k_proj": (1024, 4096),
        "self_attn.v_proj": (1024, 4096),
        "self_attn.o_proj": (4096, 4096),
        "mlp.gate_proj": (14336, 4096),
        "mlp.up_proj": (14336, 4096),
        "mlp.down_proj": (4096, 14336),
    }
    mods = []
    for layer in range(32):
        for j, (short, (d_out, d_in)) in enumerate(shapes.items()):
            name = f"model.layers.{layer}.{short}"
            cos = None if (layer, j) == (5, 2) else ((layer * 7 + j) * 0.618034) % 1.0
            mods.append(
                ModuleScore(
                    name,
                    f"{name}.weight",
                    layer,
                    1024,
                    1 / math.sqrt(2),
                    d_out,
                    d_in,
                    "BF16",
                    12345.6 / 10**j,
                    1.0,
                    cos,
                )
            )
    sel = Selection.from_flags(*selection_flags)
    d = select({m.name: m.cosine for m in mods}, sel)
    for m in mods:
        m.projected = m.name in d.projected
        if not m.projected:
            m.reason = "cosine above" if m.cosine is not None else REASON_ORTHOGONAL
    return AdapterReport("llama-7b-lora", "llama-7b-lora", sel, d, mods)


def test_224_modules_fit_80_columns_grouped_by_layer(capsys: pytest.CaptureFixture) -> None:
    from safelora_cli.commands.inspect import _render_reports

    _render_reports([_seven_b_report((None, None, 0.1))], "layer", None)
    out = capsys.readouterr().out
    _check_plain(out)
    lines = out.splitlines()
    rows = [ln for ln in lines if re.match(r"^\s+\d+  \S", ln)]
    assert len(rows) == 224
    assert lines.count("") == 31  # one blank line between each of the 32 layers
    assert "    0  mlp.gate_proj     14336x4096" in out
    assert "selection: --fraction 0.1 -> K = 23 of 223" in out
    projected = [ln for ln in rows if ln.endswith("  yes")]
    summary = next(ln for ln in lines if ln.startswith("projected "))
    assert (
        summary
        == f"projected {len(projected)} of 224 modules (1 without a cosine, never projected)"
    )
    assert len(projected) >= 23


def test_top_keeps_the_lowest_and_says_what_is_hidden(capsys: pytest.CaptureFixture) -> None:
    from safelora_cli.commands.inspect import _render_reports

    rep = _seven_b_report((10, None, None))
    _render_reports([rep], "cosine", 10)
    out = capsys.readouterr().out
    _check_plain(out)
    rows = [ln for ln in out.splitlines() if re.match(r"^\s+\d+  \S", ln)]
    assert len(rows) == 10
    cos = [float(ln.split()[6]) for ln in rows]
    assert cos == sorted(cos)
    lowest = sorted(round(m.cosine, 5) for m in rep.modules if m.cosine is not None)[:10]
    assert cos == lowest
    assert all(ln.endswith("  yes") for ln in rows)  # --num-layers 10: exactly these
    assert "(214 more rows not shown: --top 10 lists the 10 lowest cosines)" in out


def test_terminal_rendering_is_a_rich_table_within_80_columns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    from rich.console import Console

    from safelora_cli import render
    from safelora_cli.commands import inspect as cmd

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80, color_system="standard")
    monkeypatch.setattr(render, "is_plain", lambda stderr=False: False)
    monkeypatch.setattr(render, "out_console", lambda: console)
    rows = [["    0", "mlp.gate_proj", "14336x4096", "16", "2", "123.5", "0.12345", "yes"]]
    cmd._emit_table(cmd.SCORE_COLS, [rows], [[None] * 6 + ["red", "bold green"]])
    out = buf.getvalue()
    assert ANSI.search(out)  # colour on a terminal
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert "mlp.gate_proj" in plain and "14336x4096" in plain and "…" not in plain
    assert max(len(ln.rstrip()) for ln in plain.splitlines()) <= 80
    # Cells are text, never rich markup: a note marker prints as it is.
    buf.truncate(0)
    buf.seek(0)
    cmd._emit_table(cmd.ADAPTER_COLS, [[["1", "mlp.up_proj", "8x4", "2", "4", "2", "F32", "[1]"]]])
    assert "[1]" in buf.getvalue()


# ----------------------------------------------------------------------------- Conv1D, states


def test_gpt2_conv1d_cache_and_scores_against_oracle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPT-2 stores W^T: V is transposed before anything; c_attn (96 x 32) is a factor entry."""
    from safetensors.torch import load_file

    pair = factory.make_pair(tmp_path, arch="gpt2")
    ad = factory.write_adapter(
        tmp_path / "ad", base=pair.base, targets=("c_attn", "c_proj"), fan_in_fan_out=True
    )
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(
        app, ["compute-projections", "base", "aligned", "-o", "cache", "--adapter", "ad", "-q"]
    )
    assert r.exit_code == 0, r.stderr
    c = invoke(["-p", "cache", "--json"])
    assert c.exit_code == 0, c.stderr
    weights = {w["weight"]: w for w in json.loads(c.stdout)["weights"]}
    assert set(weights) == {f"{m}.weight" for m in factory.adapter_modules(ad)}
    for name, w in weights.items():
        v = (pair.aligned[name].double() - pair.base[name].double()).T  # linear orientation
        assert w["shape"] == list(v.shape) and w["fan_in_fan_out"] is True
        assert w["kind"] == ("factor" if v.shape[0] > v.shape[1] else "gram")
        s = torch.linalg.svdvals(v)
        assert w["stable_rank"] == pytest.approx(float((v**2).sum() / s[0] ** 2), rel=1e-5)
    assert weights["transformer.h.0.attn.c_attn.weight"]["kind"] == "factor"

    j = invoke(["ad", "-p", "cache", "--json", "-t", "1"])
    assert j.exit_code == 0, j.stderr
    tensors = load_file("ad/adapter_model.safetensors")
    for m in json.loads(j.stdout)["modules"]:
        w = m["name"] + ".weight"
        v = (pair.aligned[w].double() - pair.base[w].double()).T
        cmat = v @ v.T / torch.linalg.norm(v)
        dw = (
            tensors[f"base_model.model.{m['name']}.lora_B.weight"].double()
            @ tensors[f"base_model.model.{m['name']}.lora_A.weight"].double()
        )
        cdw = cmat @ dw
        cos = float((cdw * dw).sum() / (torch.linalg.norm(cdw) * torch.linalg.norm(dw)))
        assert m["cosine"] == pytest.approx(cos, rel=1e-5)
        assert (m["d_out"], m["d_in"]) == tuple(v.shape)


def test_incomplete_cache_is_shown_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safelora_cli.cache import ProjectionCache
    from safelora_cli.projector import alignment_delta, build_projector
    from safelora_cli.sources import open_model

    case = golden_case(tmp_path)
    rb, sb = open_model(str(case.base_dir), label="base model")
    ra, sa = open_model(str(case.aligned_dir), label="aligned model")
    cache = ProjectionCache.create_or_resume(tmp_path / "partial", sb, sa)
    w = GOLDEN_WEIGHTS[0]
    cache.put(
        build_projector(
            w, alignment_delta(rb.load(w), ra.load(w), fan_in_fan_out=False), fan_in_fan_out=False
        )
    )
    cache.close()  # no finish(): an interrupted compute-projections run
    rb.close()
    ra.close()
    monkeypatch.chdir(tmp_path)
    r = invoke(["-p", "partial"])
    assert r.exit_code == 0, r.stderr
    assert "incomplete (resume: rerun compute-projections)" in r.stdout
    assert "1 weights" in r.stdout
    # Scoring against it is refused (patch would refuse it too).
    s = invoke(["adapter", "-p", "partial"])
    assert s.exit_code == 1 and "incomplete" in s.stderr


def test_missing_adapter_exit_1(case) -> None:
    r = invoke(["no-such-adapter", "-p", "cache"])
    assert r.exit_code == 1
    assert "no-such-adapter" in r.stderr and "Traceback" not in r.stderr
    r = invoke(["no-such-adapter"])
    assert r.exit_code == 1 and "no-such-adapter" in r.stderr


def test_several_adapters_one_table_each(case, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(tmp_path / "adapter", tmp_path / "adapter2")
    r = invoke(["adapter", "adapter2", "-p", "cache", "-k", "2"])
    assert r.exit_code == 0, r.stderr
    first, second = r.stdout.split("\n\nadapter: ")
    assert first + "\n" == golden("score_layer_k2.txt")
    assert "adapter: " + second == golden("score_layer_k2.txt").replace(
        "adapter: adapter\n", "adapter: adapter2\n", 1
    )


def test_hub_source_shows_repo_revision_and_commit() -> None:
    from safelora_cli.commands.inspect import _source_text

    spec = {
        "kind": "hub",
        "arg": "org/base",
        "repo_id": "org/base",
        "revision": "v1",
        "commit": "a" * 40,
        "path": "/hf/snap",
    }
    assert _source_text(spec) == f"org/base@v1 (commit {'a' * 40})"
    spec["revision"] = None
    assert _source_text(spec) == f"org/base@main (commit {'a' * 40})"
    assert _source_text({"kind": "local", "arg": "b", "path": "/abs/b"}) == "/abs/b"


def test_skipped_and_notes_grouped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DoRA modules share one reason line; a note shared by every module is printed once."""
    pair = factory.make_pair(tmp_path)
    factory.write_adapter(tmp_path / "dora", base=pair.base, use_dora=True)
    factory.write_adapter(tmp_path / "bias", base=pair.base, lora_bias=True)
    monkeypatch.chdir(tmp_path)
    r = invoke(["dora"])
    assert r.exit_code == 0, r.stderr
    _check_plain(r.stdout)
    reasons, normalised = _skipped_by_name(r.stdout)
    names = set(factory.adapter_modules(tmp_path / "dora"))
    assert set(reasons) == names and len(set(reasons.values())) == 1
    assert "dora" in next(iter(reasons.values())).lower()
    assert normalised.count("<reason>") == 1  # one reason block for all four modules
    b = invoke(["bias"])
    assert b.exit_code == 0, b.stderr
    _check_plain(b.stdout)
    rows = [ln for ln in b.stdout.splitlines() if re.match(r"^\s+\d+  \S", ln)]
    assert len(rows) == 4 and all(ln.endswith("  [1]") for ln in rows)
    (note,) = [ln for ln in b.stdout.splitlines() if ln.startswith("[1] ")]
    assert "bias" in note and note.endswith("(4 modules)")
