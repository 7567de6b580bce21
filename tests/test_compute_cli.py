"""``safelora compute-projections`` on the command line: exit codes, summary, quiet (DESIGN §6)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from safelora_cli.cache import MANIFEST, ProjectionCache
from safelora_cli.cli import app
from tests import factory

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["compute-projections", *args])


def test_success_prints_summary_on_stderr(
    tmp_path: Path, llama_pair: factory.Pair, llama_adapter: Path
) -> None:
    out = tmp_path / "cache"
    r = run(
        str(llama_pair.base_dir),
        str(llama_pair.aligned_dir),
        "-o",
        str(out),
        "-a",
        str(llama_adapter),
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    n = len(factory.adapter_modules(llama_adapter))
    assert f"{n} weights computed" in lines[0] and "read" in lines[0] and str(out) in lines[0]
    assert " s " in lines[0] and ("MB" in lines[0] or "kB" in lines[0])
    assert json.loads((out / MANIFEST).read_text())["state"] == "complete"
    # Again: nothing to do, said so.
    r = run(
        str(llama_pair.base_dir),
        str(llama_pair.aligned_dir),
        "-o",
        str(out),
        "-a",
        str(llama_adapter),
    )
    assert r.exit_code == 0 and f"{n} already cached" in r.stderr


def test_quiet_prints_nothing(tmp_path: Path, llama_pair: factory.Pair) -> None:
    r = run(
        str(llama_pair.base_dir),
        str(llama_pair.aligned_dir),
        "-o",
        str(tmp_path / "c"),
        "--targets",
        "q_proj",
        "--quiet",
    )
    assert r.exit_code == 0 and r.stderr == "" and r.stdout == ""
    assert ProjectionCache.open(tmp_path / "c").weights()


def test_usage_errors_exit_2(tmp_path: Path, llama_pair: factory.Pair) -> None:
    base, aligned = str(llama_pair.base_dir), str(llama_pair.aligned_dir)
    for extra in ([], ["--targets", "q_proj", "--device", "tpu"], ["--targets", "nothing_here"]):
        r = run(base, aligned, "-o", str(tmp_path / "c"), *extra)
        assert r.exit_code == 2, (extra, r.stderr)
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "c").exists()


def test_input_errors_exit_1_with_one_or_two_lines(tmp_path: Path, llama_pair: factory.Pair):
    base = factory.llama_weights(layers=1)
    aligned = factory.aligned_from(base)
    del aligned["model.layers.0.self_attn.q_proj.weight"]
    factory.write_checkpoint(tmp_path / "b", base)
    factory.write_checkpoint(tmp_path / "a", aligned)
    r = run(
        str(tmp_path / "b"), str(tmp_path / "a"), "-o", str(tmp_path / "c"), "--targets", "q_proj"
    )
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2 and "model.layers.0.self_attn.q_proj.weight" in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists()


def test_adapter_for_another_model_is_refused(tmp_path: Path, llama_pair: factory.Pair) -> None:
    gpt2_adapter = factory.write_adapter(
        tmp_path / "gad", base=factory.gpt2_weights(), targets=("c_attn",), fan_in_fan_out=True
    )
    r = run(
        str(llama_pair.base_dir),
        str(llama_pair.aligned_dir),
        "-o",
        str(tmp_path / "c"),
        "-a",
        str(gpt2_adapter),
    )
    assert r.exit_code == 1
    assert "transformer.h.0.attn.c_attn" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists()
