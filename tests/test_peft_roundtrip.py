"""A real round trip: a peft adapter on a tiny transformers model is patched, loads with
``PeftModel.from_pretrained`` on the aligned model, and ``merge_and_unload`` gives
``W_aligned + s * B' A`` with ``B' = C B`` from a float64 oracle (DESIGN §1).

PEFT merges into the weights of the model the adapter is loaded on; Safe LoRA's adapters are
fine-tunes of the aligned model, so that is the aligned checkpoint here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from safelora_cli.patch import patch_adapters
from safelora_cli.selection import Selection
from tests import factory
from tests.test_patch import oracle

pytest.importorskip("peft")
pytest.importorskip("transformers")


def _roundtrip(case: factory.PeftCase, out: Path, fif: bool, **source: Any) -> None:
    from peft import PeftModel

    [rep] = patch_adapters(
        [str(case.adapter_dir)], out, selection=Selection("fraction", 0.5), **source
    )
    assert 0 < rep.projected < rep.total
    want = oracle(_Pair(case.base, case.aligned), case.adapter_dir, fif)
    assert {m.name for m in rep.modules} == set(want)

    aligned = type(case.base_model).from_pretrained(str(case.aligned_dir)).eval()
    merged = PeftModel.from_pretrained(aligned, str(out)).merge_and_unload()
    sd = merged.state_dict()
    written = load_file(str(out / "adapter_model.safetensors"))
    for m in rep.modules:
        w = want[m.name]
        a = written[w["key_a"]].double()
        b_final = w["cb"] if m.projected else w["b"].double()
        if m.projected:
            assert not torch.allclose(w["cb"], w["b"].double(), atol=1e-3)
        # The scale is PEFT's own (the LoRA layer of the peft model that saved the adapter).
        s = case.lora_layer(m.name).scaling["default"]
        assert s == pytest.approx(m.scale)
        w_aligned = case.aligned[f"{m.name}.weight"].double()
        delta = s * b_final @ a
        expect = w_aligned + (delta.T if fif else delta)
        got = sd[f"{m.name}.weight"].double()
        assert torch.allclose(got, expect, rtol=0, atol=2e-6), (
            m.name,
            float((got - expect).abs().max()),
        )


class _Pair:
    def __init__(self, base: dict, aligned: dict) -> None:
        self.base, self.aligned = base, aligned


def test_llama_roundtrip_through_peft(peft_llama_case: factory.PeftCase, tmp_path: Path) -> None:
    case = peft_llama_case
    _roundtrip(
        case,
        tmp_path / "out",
        False,
        base=str(case.base_dir),
        aligned=str(case.aligned_dir),
        device="cpu",
    )


def test_gpt2_conv1d_roundtrip_through_peft(
    peft_gpt2_case: factory.PeftCase, tmp_path: Path
) -> None:
    case = peft_gpt2_case
    _roundtrip(
        case,
        tmp_path / "out",
        True,
        base=str(case.base_dir),
        aligned=str(case.aligned_dir),
        device="cpu",
    )
