"""Base-weight orientation follows the base model's layer class, as PEFT decides it.

A GPT-2 adapter whose config says ``fan_in_fan_out: false`` (saved by a tool other than PEFT)
still updates Conv1D weights stored ``[in, out]``. On the square ``attn.c_proj`` the wrong
orientation fits the shape, so only the base model's ``model_type`` can tell.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from safelora_cli.cli import app
from tests import factory

runner = CliRunner()


def _oracle_b(pair: factory.Pair, adapter: Path, module: str) -> torch.Tensor:
    """C B in float64 from the definition, with the GPT-2 weight transposed to [out, in]."""
    w = f"{module}.weight"
    v = (pair.aligned[w].double() - pair.base[w].double()).T
    c = v @ v.T / v.norm()
    b = load_file(str(adapter / "adapter_model.safetensors"))[
        f"base_model.model.{module}.lora_B.weight"
    ]
    return c @ b.double()


@pytest.mark.parametrize("route", ["cache", "streaming"])
def test_misdeclared_conv1d_adapter_is_projected_in_the_conv1d_orientation(
    tmp_path: Path, route: str
) -> None:
    pair = factory.make_pair(tmp_path, arch="gpt2")
    adapter = factory.write_adapter(
        tmp_path / "ad", base=pair.base, targets=("attn.c_proj",), fan_in_fan_out=True
    )
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["fan_in_fan_out"] = False  # what a non-PEFT tool might write
    cfg_path.write_text(json.dumps(cfg))

    out = tmp_path / "out"
    if route == "cache":
        cache = tmp_path / "cache"
        r = runner.invoke(
            app,
            [
                "compute-projections",
                str(pair.base_dir),
                str(pair.aligned_dir),
                "-o",
                str(cache),
                "--adapter",
                str(adapter),
                "--quiet",
            ],
        )
        assert r.exit_code == 0, r.output
        src = ["-p", str(cache)]
    else:
        src = ["--base", str(pair.base_dir), "--aligned", str(pair.aligned_dir)]
    r = runner.invoke(
        app, ["patch", str(adapter), *src, "--num-layers", "100", "-o", str(out), "--json"]
    )
    assert r.exit_code == 0, r.output
    got = load_file(str(out / "adapter_model.safetensors"))
    module = "transformer.h.0.attn.c_proj"
    expected = _oracle_b(pair, adapter, module)
    b_new = got[f"base_model.model.{module}.lora_B.weight"].double()
    assert torch.allclose(b_new, expected, rtol=1e-5, atol=1e-7)
    # The report says the orientation was taken from the base model, not from the config.
    report = json.loads(r.stdout.splitlines()[0])
    assert report["projected"] == report["total"] == 2
