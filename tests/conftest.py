"""Shared pytest fixtures: offline Hugging Face environment and tiny checkpoint pairs.

Fixtures (see tests/factory.py for the objects they return):
    offline_hf (autouse)  HF_HUB_OFFLINE=1, HF_HOME / HF_HUB_CACHE under tmp, no token.
    llama_pair            factory.make_pair(tmp_path, arch="llama") (fp32, single file, GQA)
    gpt2_pair             factory.make_pair(tmp_path, arch="gpt2") (Conv1D)
    llama_adapter         write_adapter on llama_pair.base (q_proj, v_proj; r=4, alpha=8)
    gpt2_adapter          write_adapter on gpt2_pair.base (c_attn; fan_in_fan_out)
    peft_llama_case       factory.peft_llama(...) built once per session (read-only: don't edit)
    peft_gpt2_case        factory.peft_gpt2(...) built once per session (read-only: don't edit)
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest

# Test modules import the factory as ``from tests import factory``; make that work under a bare
# ``pytest`` too (which puts only tests/ itself on sys.path).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests import factory  # noqa: E402

# Also offline at import time: huggingface_hub reads some settings once, when first imported
# (during collection), so the per-test fixture alone could come too late for it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="safelora-hf-home-")
os.environ.pop("HF_HUB_CACHE", None)

# A test run started in the background of a non-interactive shell (or under nohup) inherits
# SIGINT/SIGHUP ignored, and so would every safelora child it starts: safelora keeps an ignored
# signal ignored, as nohup asks, so the signal tests would see no interruption. Handled here,
# the signals reach the children at their default (a handler is reset by exec, an ignore is not).
for _sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    if signal.getsignal(_sig) is signal.SIG_IGN:
        signal.signal(_sig, signal.default_int_handler if _sig == signal.SIGINT else signal.SIG_DFL)


@pytest.fixture(autouse=True)
def offline_hf(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs offline with its own empty HF home (nothing downloaded, no real token)."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("SAFELORA_DEBUG", raising=False)
    return home


@pytest.fixture
def llama_pair(tmp_path: Path) -> factory.Pair:
    # Own subdirectory: a test may use llama_pair and gpt2_pair together.
    return factory.make_pair(tmp_path / "llama", arch="llama")


@pytest.fixture
def gpt2_pair(tmp_path: Path) -> factory.Pair:
    return factory.make_pair(tmp_path / "gpt2", arch="gpt2")


@pytest.fixture
def llama_adapter(tmp_path: Path, llama_pair: factory.Pair) -> Path:
    return factory.write_adapter(tmp_path / "adapter", base=llama_pair.base)


@pytest.fixture
def gpt2_adapter(tmp_path: Path, gpt2_pair: factory.Pair) -> Path:
    return factory.write_adapter(
        tmp_path / "adapter", base=gpt2_pair.base, targets=("c_attn",), fan_in_fan_out=True
    )


@pytest.fixture(scope="session")
def peft_llama_case(tmp_path_factory: pytest.TempPathFactory) -> factory.PeftCase:
    """A real peft adapter on a tiny Llama (GQA), q_proj+v_proj, r=4, alpha=8. Read-only."""
    return factory.peft_llama(tmp_path_factory.mktemp("peft_llama"))


@pytest.fixture(scope="session")
def peft_gpt2_case(tmp_path_factory: pytest.TempPathFactory) -> factory.PeftCase:
    """A real peft adapter on a tiny GPT-2 (Conv1D c_attn, fan_in_fan_out). Read-only."""
    return factory.peft_gpt2(tmp_path_factory.mktemp("peft_gpt2"))
