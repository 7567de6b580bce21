"""The model card (README.md) of a patched adapter, read back with huggingface_hub's own loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from typer.testing import CliRunner

from safelora_cli.cli import app
from safelora_cli.errors import AdapterError
from safelora_cli.modelcard import BEGIN, END, render_card
from tests import factory
from tests.test_patch import build_cache, oracle
from tests.test_scoring import oracle_select

runner = CliRunner()

EXISTING = """---
license: apache-2.0
language:
- en
tags:
- chat
- safelora
datasets:
- my-org/my-data
---

# My chat adapter

Trained on my data. Some **markdown** stays as it is.
"""


@pytest.fixture
def case(tmp_path: Path) -> dict[str, Any]:
    pair = factory.make_pair(tmp_path)
    ad = factory.write_adapter(tmp_path / "adapter", base=pair.base)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "my-org/llama-chat"
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return {"pair": pair, "ad": ad, "cache": build_cache(tmp_path, pair)}


def _patch(case: dict, out: Path, *extra: str) -> Any:
    return runner.invoke(
        app, ["patch", str(case["ad"]), "-p", str(case["cache"]), "-o", str(out), *extra]
    )


def test_card_without_an_input_readme(case: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _patch(case, out, "-k", "2")
    assert r.exit_code == 0, r.stderr
    meta = metadata_load(out / "README.md")
    assert meta is not None
    assert meta["base_model"] == "my-org/llama-chat"
    assert meta["library_name"] == "peft"
    assert meta["tags"] == ["safelora", "safe-lora"]
    text = (out / "README.md").read_text()
    assert "arXiv 2405.16833" in text and "NeurIPS 2024" in text and "Hsu et al." in text
    assert "`--num-layers 2`" in text
    # Which modules: those the selection rules pick from float64 oracle cosines.
    cos = {k: v["cos"] for k, v in oracle(case["pair"], case["ad"], False).items()}
    want = oracle_select(cos, "num_layers", 2)
    assert f"Projected: {len(want)} of {len(cos)} LoRA modules" in text
    for name, c in cos.items():
        verdict = "yes" if name in want else "no: above the threshold"
        assert f"| `{name}` | {round(c, 5):.5f} | {verdict} |" in text
    rep = json.loads((out / "safelora_report.json").read_text())
    assert f"Pdst {rep['pdst']:.4f}" in text
    assert "a local checkpoint (`" in text and str(tmp_path) not in text  # no absolute paths


def test_existing_card_keeps_text_and_keys_and_gains_tags(case: dict, tmp_path: Path) -> None:
    (case["ad"] / "README.md").write_text(EXISTING)
    out = tmp_path / "out"
    r = _patch(case, out)
    assert r.exit_code == 0, r.stderr
    meta = metadata_load(out / "README.md")
    assert meta is not None
    assert meta["license"] == "apache-2.0"
    assert meta["language"] == ["en"]
    assert meta["datasets"] == ["my-org/my-data"]
    assert meta["tags"] == ["chat", "safelora", "safe-lora"]  # no duplicate, author's first
    assert meta["base_model"] == "my-org/llama-chat" and meta["library_name"] == "peft"
    body = ModelCard((out / "README.md").read_text()).text
    original = ModelCard(EXISTING).text
    assert body.startswith(original.rstrip("\n"))
    assert body.count(BEGIN) == 1 and body.rstrip().endswith(END)
    # The input is untouched.
    assert (case["ad"] / "README.md").read_text() == EXISTING


def test_patching_a_patched_adapter_replaces_the_section(case: dict, tmp_path: Path) -> None:
    (case["ad"] / "README.md").write_text(EXISTING)
    assert _patch(case, tmp_path / "once", "-k", "1").exit_code == 0
    twice = runner.invoke(
        app,
        [
            "patch",
            str(tmp_path / "once"),
            "-p",
            str(case["cache"]),
            "-o",
            str(tmp_path / "twice"),
            "-k",
            "3",
        ],
    )
    assert twice.exit_code == 0, twice.stderr
    text = (tmp_path / "twice" / "README.md").read_text()
    assert text.count(BEGIN) == text.count(END) == 1
    assert "`--num-layers 3`" in text and "`--num-layers 1`" not in text
    assert "# My chat adapter" in text
    assert metadata_load(tmp_path / "twice" / "README.md")["tags"].count("safelora") == 1


def test_card_is_byte_identical_across_runs(case: dict, tmp_path: Path) -> None:
    (case["ad"] / "README.md").write_text(EXISTING)
    assert _patch(case, tmp_path / "a").exit_code == 0
    assert _patch(case, tmp_path / "b").exit_code == 0
    assert (tmp_path / "a" / "README.md").read_bytes() == (
        tmp_path / "b" / "README.md"
    ).read_bytes()


def test_a_local_base_model_path_stays_out_of_the_front_matter() -> None:
    card = render_card(
        None, base_model="/home/me/models/llama", library_name="peft", section="## x\n"
    )
    assert "base_model" not in card.split("---")[1]
    author = "---\nbase_model: their/model\nlibrary_name: transformers\n---\nhi\n"
    card = render_card(author, base_model="my/model", library_name="peft", section="## x\n")
    meta = ModelCard(card).data.to_dict()
    assert meta["base_model"] == "their/model" and meta["library_name"] == "transformers"
    card = render_card(
        None, base_model="org/full", library_name="transformers", tags=("safelora",), section="s"
    )
    assert ModelCard(card).data.to_dict() == {
        "base_model": "org/full",
        "library_name": "transformers",
        "tags": ["safelora"],
    }


def test_a_readme_without_front_matter_keeps_its_text() -> None:
    card = render_card("# Hello\n\ntext\n", base_model="o/m", library_name="peft", section="## s")
    c = ModelCard(card)
    assert c.text.startswith("# Hello\n\ntext\n") and "## s" in c.text
    assert c.data.to_dict()["tags"] == ["safelora", "safe-lora"]


@pytest.mark.parametrize("bad", ["---\nfoo: [1, 2\n---\nx\n", "---\n- a\n- b\n---\nx\n"])
def test_broken_front_matter_is_refused_and_nothing_written(
    case: dict, tmp_path: Path, bad: str
) -> None:
    with pytest.raises(AdapterError, match="front matter"):
        render_card(bad, base_model=None, library_name="peft", section="s")
    (case["ad"] / "README.md").write_text(bad)
    out = tmp_path / "out"
    r = _patch(case, out)
    assert r.exit_code == 1 and "README.md" in r.stderr.splitlines()[0]
    assert "Traceback" not in r.stderr and not out.exists()
    assert not [p for p in tmp_path.iterdir() if "safelora-tmp" in p.name]


def test_non_utf8_readme_is_refused(case: dict, tmp_path: Path) -> None:
    (case["ad"] / "README.md").write_bytes(b"# caf\xe9\n")
    r = _patch(case, tmp_path / "out")
    assert r.exit_code == 1 and "UTF-8" in r.stderr and not (tmp_path / "out").exists()
