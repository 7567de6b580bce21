"""``make demo`` end to end: the README promises it works on a fresh machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_demo_runs_every_step_and_writes_two_patched_adapters(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-m", "safelora_cli.demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("benign-chat", "drifted-chat"):
        d = tmp_path / "demo" / "patched" / name
        assert (d / "adapter_model.safetensors").is_file()
        report = json.loads((d / "safelora_report.json").read_text())
        assert report["projected"] == 3 and report["total"] == 8
    assert "=== 4. patch both adapters" in out.stdout
    model = tmp_path / "demo" / "patched-model"
    report = json.loads((model / "safelora_report.json").read_text())
    assert report["projected"] == 3 and report["total"] == 8  # q_proj, v_proj of 4 layers
    assert "=== 5. patch a full fine-tune" in out.stdout
