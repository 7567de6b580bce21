"""``safelora patch`` through typer's CliRunner: exit codes, JSON lines, summary, dry run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from safelora_cli.cli import app
from tests import factory
from tests.test_patch import build_cache, oracle
from tests.test_scoring import oracle_select


@pytest.fixture
def case(tmp_path: Path) -> dict[str, Any]:
    pair = factory.make_pair(tmp_path)
    ad = factory.write_adapter(tmp_path / "adapter", base=pair.base)
    ad2 = factory.write_adapter(tmp_path / "second", base=pair.base, seed=9)
    return {"pair": pair, "ad": ad, "ad2": ad2, "cache": build_cache(tmp_path, pair)}


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, ["patch", *map(str, args)])


def test_json_lines_follow_the_schema(case: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = invoke(case["ad"], case["ad2"], "-p", case["cache"], "-o", out, "--json", "-k", "2")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 2
    for line, ad in zip(lines, (case["ad"], case["ad2"]), strict=True):
        js = json.loads(line)
        for key in ("adapter", "output", "selection", "projected", "total", "pdst", "modules"):
            assert key in js
        assert js["adapter"] == str(ad)
        assert js["output"] == str((out / ad.name).resolve())
        assert js["selection"] == {"mode": "num_layers", "value": 2}
        want = oracle(case["pair"], ad, False)
        chosen = oracle_select({m: w["cos"] for m, w in want.items()}, "num_layers", 2)
        assert {m["name"] for m in js["modules"] if m["projected"]} == chosen
        assert js["projected"] == len(chosen) and js["total"] == len(want)
        for m in js["modules"]:
            assert set(m) >= {"name", "cosine", "projected", "reason"}
            assert m["cosine"] == pytest.approx(want[m["name"]]["cos"], rel=1e-5)
        # the report beside the adapter is the same object
        assert json.loads((out / ad.name / "safelora_report.json").read_text()) == js


def test_human_summary_on_stderr(case: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = invoke(case["ad"], "-p", case["cache"], "-o", out, "--fraction", "0.5")
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    assert "projected 2 of 4" in r.stderr
    assert "Pdst" in r.stderr and "lowest cosines" in r.stderr
    assert str(out.resolve()) in r.stderr.replace("\n", "")
    assert (out / "adapter_model.safetensors").is_file()


def test_quiet_prints_nothing(case: dict, tmp_path: Path) -> None:
    r = invoke(case["ad"], "-p", case["cache"], "-o", tmp_path / "out", "--quiet")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""


def test_dry_run(case: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = invoke(case["ad"], "-p", case["cache"], "-o", out, "--dry-run", "--json", "-t", "0.7")
    assert r.exit_code == 0, r.output
    js = json.loads(r.stdout)
    assert js["dry_run"] is True and js["selection"] == {"mode": "threshold", "value": 0.7}
    assert not out.exists()


def test_streaming_from_base_and_aligned(case: dict, tmp_path: Path) -> None:
    pair = case["pair"]
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = invoke(
        case["ad"],
        "--base",
        pair.base_dir,
        "--aligned",
        pair.aligned_dir,
        "-o",
        out,
        "--device",
        "cpu",
        "-k",
        "1",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "out"])  # no cache
    js = json.loads(r.stdout)
    assert js["projected"] == 1
    assert js["sources"]["base"]["path"] == str(pair.base_dir.resolve())
    new = load_file(str(out / "adapter_model.safetensors"))
    want = oracle(pair, case["ad"], False)
    [name] = [m["name"] for m in js["modules"] if m["projected"]]
    got = new[want[name]["key_b"]].double()
    assert torch.allclose(got, want[name]["cb"], rtol=1e-5, atol=1e-7)


def test_save_projections_builds_a_reusable_cache(case: dict, tmp_path: Path) -> None:
    pair = case["pair"]
    saved = tmp_path / "saved"
    args = ["--base", pair.base_dir, "--aligned", pair.aligned_dir, "--json", "-k", "2"]
    r = invoke(case["ad"], *args, "-o", tmp_path / "o1", "--save-projections", saved)
    assert r.exit_code == 0, r.output
    r2 = invoke(case["ad"], "-p", saved, "-o", tmp_path / "o2", "--json", "-k", "2")
    assert r2.exit_code == 0, r2.output
    a = load_file(str(tmp_path / "o1" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "o2" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    j1, j2 = json.loads(r.stdout), json.loads(r2.stdout)
    assert [m["cosine"] for m in j1["modules"]] == [m["cosine"] for m in j2["modules"]]
    assert j2["sources"]["cache"] == str(saved.resolve())


@pytest.mark.parametrize(
    ("extra", "code", "needle"),
    [
        (["-k", "2", "-t", "0.5"], 2, "mutually exclusive"),
        (["-f", "0"], 2, "--fraction"),
        (["--base", "x"], 2, "mutually exclusive"),
        (["-k", "0"], 2, "--num-layers"),
    ],
)
def test_usage_errors_exit_2(
    case: dict, tmp_path: Path, extra: list[str], code: int, needle: str
) -> None:
    r = invoke(case["ad"], "-p", case["cache"], "-o", tmp_path / "out", *extra)
    assert r.exit_code == code, r.output
    assert needle in r.stderr
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_no_source_is_a_usage_error(case: dict, tmp_path: Path) -> None:
    r = invoke(case["ad"], "-o", tmp_path / "out")
    assert r.exit_code == 2 and "-p CACHE" in r.stderr


def test_input_errors_exit_1(case: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    r = invoke(case["ad"], "-p", case["cache"], "-o", out)
    assert r.exit_code == 1 and "already exists" in r.stderr and "--force" in r.stderr
    r = invoke(case["ad"], "-p", case["cache"], "-o", case["ad"], "--force")
    assert r.exit_code == 1 and "input adapter" in r.stderr
    r = invoke(tmp_path / "nope", "-p", case["cache"], "-o", tmp_path / "o3")
    assert r.exit_code == 1 and r.stderr.startswith("error:")
    r = invoke(case["ad"], "-p", tmp_path / "nocache", "-o", tmp_path / "o4")
    assert r.exit_code == 1 and "error:" in r.stderr
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()
    assert len(r.stderr.strip().splitlines()) <= 2


def test_help_lists_the_flags() -> None:
    r = CliRunner().invoke(app, ["patch", "--help"])
    assert r.exit_code == 0
    for flag in (
        "--projections",
        "--base",
        "--aligned",
        "--output",
        "--num-layers",
        "--threshold",
        "--fraction",
        "--device",
        "--dry-run",
        "--force",
        "--json",
        "--save-projections",
    ):
        assert flag in r.stdout, flag
