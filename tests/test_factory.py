"""The test factory writes what it says (real HF/PEFT file layouts, shapes, orientation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests import factory


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}, h.metadata()  # noqa: SIM118


def test_llama_weights_gqa_shapes() -> None:
    w = factory.llama_weights()
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)
    assert w["model.layers.0.self_attn.v_proj.weight"].shape == (16, 32)
    assert w["model.layers.1.mlp.down_proj.weight"].shape == (32, 48)
    assert w["lm_head.weight"].shape == (64, 32)


def test_gpt2_weights_conv1d_orientation() -> None:
    w = factory.gpt2_weights()
    assert w["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert w["transformer.h.1.mlp.c_fc.weight"].shape == (32, 128)
    assert w["transformer.h.1.mlp.c_proj.weight"].shape == (128, 32)


def test_aligned_from_same_names_identical() -> None:
    base = factory.llama_weights()
    same = "model.layers.0.self_attn.q_proj.weight"
    al = factory.aligned_from(base, same=[same])
    assert torch.equal(al[same], base[same])
    assert not torch.equal(
        al["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shards", [1, 3])
def test_write_checkpoint_layout(tmp_path: Path, shards: int, dtype: torch.dtype) -> None:
    pair = factory.make_pair(tmp_path, shards=shards, dtype=dtype)
    seen: dict[str, torch.Tensor] = {}
    if shards == 1:
        t, meta = _read(pair.base_dir / "model.safetensors")
        assert meta == {"format": "pt"}
        seen.update(t)
    else:
        index = json.loads((pair.base_dir / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert files == [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in (1, 2, 3)]
        total = 0
        for f in files:
            t, meta = _read(pair.base_dir / f)
            assert meta == {"format": "pt"}
            assert all(index["weight_map"][k] == f for k in t)
            total += sum(v.numel() * v.element_size() for v in t.values())
            seen.update(t)
        assert index["metadata"]["total_size"] == total
    assert set(seen) == set(pair.base)
    assert all(v.dtype == dtype for v in seen.values())
    assert all(torch.equal(seen[k], pair.base[k]) for k in seen)
    assert json.loads((pair.aligned_dir / "config.json").read_text())["model_type"] == "llama"


def test_write_adapter_keys_shapes_and_patterns(tmp_path: Path) -> None:
    base = factory.llama_weights()
    d = factory.write_adapter(
        tmp_path / "a",
        base=base,
        rank_pattern={"model.layers.1.self_attn.q_proj": 2},
        alpha_pattern={r"v_\w+": 3},
        zero_b=["layers.0.self_attn.v_proj"],
    )
    t, meta = _read(d / "adapter_model.safetensors")
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert meta == {"format": "pt"} and cfg["peft_type"] == "LORA"
    truth = factory.adapter_modules(d)
    assert list(truth) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert truth["model.layers.1.self_attn.q_proj"]["r"] == 2
    assert truth["model.layers.1.self_attn.v_proj"]["alpha"] == 3
    pre = "base_model.model.model.layers"
    assert t[f"{pre}.1.self_attn.q_proj.lora_A.weight"].shape == (2, 32)
    assert t[f"{pre}.0.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    assert not t[f"{pre}.0.self_attn.v_proj.lora_B.weight"].any()
    assert t[f"{pre}.1.self_attn.v_proj.lora_B.weight"].abs().min() > 0


def test_write_adapter_conv1d_and_extras(tmp_path: Path) -> None:
    base = factory.gpt2_weights()
    d = factory.write_adapter(
        tmp_path / "g",
        base=base,
        targets=("c_attn",),
        fan_in_fan_out=True,
        adapter_name="x",
        use_dora=True,
        embedding=True,
        lora_bias=True,
        bin=True,
    )
    assert not (d / "adapter_model.safetensors").exists()
    t = torch.load(d / "adapter_model.bin", weights_only=True)
    pre = "base_model.model.transformer"
    assert t[f"{pre}.h.0.attn.c_attn.lora_A.x.weight"].shape == (4, 32)
    assert t[f"{pre}.h.0.attn.c_attn.lora_B.x.weight"].shape == (96, 4)
    assert t[f"{pre}.h.0.attn.c_attn.lora_B.x.bias"].shape == (96,)
    assert t[f"{pre}.h.0.attn.c_attn.lora_magnitude_vector.x.weight"].shape == (96,)
    assert t[f"{pre}.wte.lora_embedding_A.x"].shape == (4, 64)
    assert json.loads((d / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_peft_llama_case(peft_llama_case: factory.PeftCase) -> None:
    c = peft_llama_case
    assert (c.base_dir / "model.safetensors").exists()
    assert (c.aligned_dir / "config.json").exists()
    t, _ = _read(c.adapter_dir / "adapter_model.safetensors")
    b = t["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    assert b.shape == (16, 4) and b.abs().min() > 0
    assert c.base["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)
    diff = (
        c.aligned["model.layers.1.mlp.up_proj.weight"] - c.base["model.layers.1.mlp.up_proj.weight"]
    )
    assert diff.abs().max() > 0
    assert c.lora_layer("model.layers.0.self_attn.q_proj").scaling["default"] == 2.0


def test_peft_gpt2_case(peft_gpt2_case: factory.PeftCase) -> None:
    c = peft_gpt2_case
    t, _ = _read(c.adapter_dir / "adapter_model.safetensors")
    assert t["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert t["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"].shape == (96, 4)
    assert c.base["transformer.h.1.attn.c_attn.weight"].shape == (32, 96)
    cfg = json.loads((c.adapter_dir / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
