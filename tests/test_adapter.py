"""adapter.py: PEFT LoRA directories -> typed modules, against the factory's and PEFT's truth."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from safelora_cli.adapter import (
    REASON_DORA,
    REASON_EMBEDDING,
    REASON_MODULES_TO_SAVE,
    Adapter,
    base_fan_in_fan_out,
    load_adapter,
    pattern_key,
    read_adapter,
)
from safelora_cli.errors import AdapterError, SafeLoraError
from safelora_cli.naming import natural_sorted
from tests import factory

Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


def _key(module: str, part: str, name: str | None = None) -> str:
    mid = f"{part}.{name}" if name else part
    return f"base_model.model.{module}.{mid}.weight"


def _check_against_truth(ad: Adapter, truth: dict, *, rslora: bool = False) -> None:
    assert [m.name for m in ad.modules] == list(truth)
    for m in ad.modules:
        t = truth[m.name]
        assert (m.rank, m.d_out, m.d_in) == (t["r"], t["d_out"], t["d_in"])
        assert m.alpha == t["alpha"]
        want = t["alpha"] / math.sqrt(t["r"]) if rslora else t["alpha"] / t["r"]
        assert m.scale == pytest.approx(want, rel=1e-12)
        assert m.weight_name == m.name + ".weight"


# ----------------------------------------------------------------------------- synthetic


def test_llama_gqa_modules_shapes_and_values(tmp_path: Path) -> None:
    base = factory.llama_weights()
    d = factory.write_adapter(tmp_path / "a", base=base, targets=("q_proj", "k_proj", "v_proj"))
    with load_adapter(d) as ad:
        _check_against_truth(ad, factory.adapter_modules(d))
        assert ad.skipped == []
        assert not ad.is_legacy_bin and ad.metadata() == {"format": "pt"}
        stored = load_file(str(d / "adapter_model.safetensors"))
        k0 = next(m for m in ad.modules if m.name.endswith("0.self_attn.k_proj"))
        assert (k0.d_out, k0.d_in) == (16, 32)  # GQA: k narrower than q
        for m in ad.modules:
            assert not m.fan_in_fan_out and m.dtype == "F32" and m.note is None
            assert torch.equal(ad.load_a(m), stored[m.key_a])
            assert torch.equal(ad.load_b(m), stored[m.key_b])
            assert ad.load_b(m, dtype=torch.float64).dtype == torch.float64
        assert ad.source is not None and ad.source.kind == "local"
        assert set(ad.tensor_names()) == set(stored)


def test_natural_order(tmp_path: Path) -> None:
    base = factory.llama_weights(layers=12)
    d = factory.write_adapter(tmp_path / "a", base=base, targets=("q_proj",))
    ad = read_adapter(d)
    layers = [int(m.name.split(".")[2]) for m in ad.modules]
    assert layers == list(range(12))


@pytest.mark.parametrize("dtype,code", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_half_dtypes(tmp_path: Path, dtype: torch.dtype, code: str) -> None:
    base = factory.llama_weights()
    d = factory.write_adapter(tmp_path / "a", base=base, dtype=dtype)
    ad = read_adapter(d)
    assert {m.dtype for m in ad.modules} == {code}
    assert ad.load_b(ad.modules[0]).dtype == dtype


def test_adapter_name_left_in_keys(tmp_path: Path) -> None:
    base = factory.llama_weights()
    d = factory.write_adapter(tmp_path / "a", base=base, adapter_name="default")
    ad = read_adapter(d)
    _check_against_truth(ad, factory.adapter_modules(d))
    assert ad.modules[0].key_a == _key(Q0, "lora_A", "default")


def test_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    base = factory.gpt2_weights()
    d = factory.write_adapter(
        tmp_path / "a", base=base, targets=("c_attn", "c_fc"), fan_in_fan_out=True
    )
    ad = read_adapter(d)
    _check_against_truth(ad, factory.adapter_modules(d))
    c_attn = ad.modules[0]
    assert c_attn.name == "transformer.h.0.attn.c_attn"
    # Base weight is [in, out] = [32, 96]; A/B stay linear orientation.
    assert base["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert (c_attn.d_out, c_attn.d_in, c_attn.fan_in_fan_out) == (96, 32, True)
    assert ad.load_a(c_attn).shape == (4, 32) and ad.load_b(c_attn).shape == (96, 4)


def test_rslora_scale(tmp_path: Path) -> None:
    base = factory.llama_weights()
    d = factory.write_adapter(tmp_path / "a", base=base, r=16, alpha=8, use_rslora=True)
    ad = read_adapter(d)
    _check_against_truth(ad, factory.adapter_modules(d), rslora=True)
    assert ad.modules[0].scale == pytest.approx(8 / 4)


PATTERNS = [
    ({Q1: 2}, {}),
    ({"q_proj": 2}, {"v_proj": 3}),
    ({r"layers\.1\..*": 6}, {r"layers\.0\.self_attn\.(q|v)_proj": 20}),
    ({"self_attn.v_proj": 2, "v_proj": 8}, {"1.self_attn.q_proj": 1.5}),
    ({"_proj": 2}, {"proj": 3}),  # must match whole dotted components: neither applies
    ({".*": 3}, {"layers.1.self_attn.v_proj": 16, ".*": 4}),  # first key in order wins
]


@pytest.mark.parametrize("rank_pattern,alpha_pattern", PATTERNS)
def test_rank_and_alpha_patterns_resolve_as_peft(
    tmp_path: Path, rank_pattern: dict, alpha_pattern: dict
) -> None:
    base = factory.llama_weights()
    d = factory.write_adapter(
        tmp_path / "a", base=base, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
    )
    # The factory resolves ranks with peft's own get_pattern_key: an independent oracle.
    _check_against_truth(read_adapter(d), factory.adapter_modules(d))


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(
        st.sampled_from(
            [
                "q_proj",
                "proj",
                r"\d\.self_attn\.q_proj",
                "layers",
                ".*",
                "v_proj",
                r"layers\.1\..*",
                "self_attn.q_proj",
                "model",
                "a.q_proj",
                "1",
                r"(q|v)_proj",
            ]
        ),
        max_size=4,
        unique=True,
    ),
    module=st.sampled_from([Q0, V1, "lm_head", "model.layers.10.mlp.up_proj", "q_proj"]),
)
def test_pattern_key_matches_peft(keys: list[str], module: str) -> None:
    from peft.utils.other import get_pattern_key

    got = pattern_key(keys, module)
    want = get_pattern_key(keys, module)
    assert (got if got is not None else module) == want


def test_dora_modules_skipped(tmp_path: Path) -> None:
    base = factory.llama_weights()
    d = factory.write_adapter(tmp_path / "a", base=base, use_dora=True)
    ad = read_adapter(d)
    assert ad.modules == []
    assert [s.name for s in ad.skipped] == [Q0, V0, Q1, V1]
    for s in ad.skipped:
        assert s.reason == REASON_DORA
        assert f"base_model.model.{s.name}.lora_magnitude_vector" in s.keys
        assert _key(s.name, "lora_A") in s.keys


def test_use_dora_without_magnitude_still_skipped(tmp_path: Path) -> None:
    base = factory.llama_weights()
    d = factory.write_adapter(tmp_path / "a", base=base, config_overrides={"use_dora": True})
    ad = read_adapter(d)
    assert ad.modules == [] and {s.reason for s in ad.skipped} == {REASON_DORA}


def test_embedding_lora_and_modules_to_save_skipped(tmp_path: Path) -> None:
    base = factory.llama_weights()
    extra = {"base_model.model.model.norm.modules_to_save.default.weight": torch.ones(32)}
    d = factory.write_adapter(
        tmp_path / "a",
        base=base,
        embedding=True,
        modules_to_save=["lm_head"],
        extra_tensors=extra,
    )
    ad = read_adapter(d)
    _check_against_truth(ad, factory.adapter_modules(d))
    by = {s.name: s for s in ad.skipped}
    assert set(by) == {"lm_head", "model.embed_tokens", "model.norm"}
    assert by["lm_head"].reason == REASON_MODULES_TO_SAVE
    assert by["lm_head"].keys == ("base_model.model.lm_head.weight",)
    assert by["model.norm"].reason == REASON_MODULES_TO_SAVE
    emb = by["model.embed_tokens"]
    assert emb.reason == REASON_EMBEDDING
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in emb.keys
    assert "base_model.model.model.embed_tokens.base_layer.weight" in emb.keys


def test_lora_b_bias_keeps_module_with_note(tmp_path: Path) -> None:
    base = factory.llama_weights()
    d = factory.write_adapter(tmp_path / "a", base=base, lora_bias=True)
    ad = read_adapter(d)
    _check_against_truth(ad, factory.adapter_modules(d))
    assert all(m.note and "lora_B.bias" in m.note for m in ad.modules)
    assert ad.skipped == []


def test_other_bias_tensors_are_reported(tmp_path: Path) -> None:
    base = factory.llama_weights()
    extra = {
        f"base_model.model.{Q0}.base_layer.bias": torch.zeros(32),  # bias="all" style
        "base_model.model.model.layers.0.input_layernorm.bias": torch.zeros(32),
    }
    d = factory.write_adapter(tmp_path / "a", base=base, extra_tensors=extra)
    ad = read_adapter(d)
    q0 = ad.modules[0]
    assert q0.name == Q0 and q0.note is not None and "base_layer.bias" in q0.note
    (s,) = ad.skipped
    assert s.name == "model.layers.0.input_layernorm" and "bias" in s.reason


def test_full_weight_copy_beside_lora_is_not_projected(tmp_path: Path) -> None:
    base = factory.llama_weights()
    extra = {f"base_model.model.{Q0}.base_layer.weight": base[Q0 + ".weight"]}
    d = factory.write_adapter(tmp_path / "a", base=base, extra_tensors=extra)
    ad = read_adapter(d)
    assert Q0 not in [m.name for m in ad.modules]
    assert [s.name for s in ad.skipped] == [Q0]


def test_conv_lora_skipped(tmp_path: Path) -> None:
    base = factory.llama_weights()
    conv = "model.vision.conv1"
    extra = {
        _key(conv, "lora_A"): torch.randn(4, 3, 3, 3),
        _key(conv, "lora_B"): torch.randn(8, 4, 1, 1),
    }
    d = factory.write_adapter(tmp_path / "a", base=base, extra_tensors=extra)
    ad = read_adapter(d)
    (s,) = ad.skipped
    assert s.name == conv and "convolution" in s.reason
    assert len(ad.modules) == 4


def test_legacy_bin(tmp_path: Path) -> None:
    base = factory.llama_weights()
    d = factory.write_adapter(tmp_path / "a", base=base, bin=True)
    ad = read_adapter(d)
    assert ad.is_legacy_bin and ad.weights_path.name == "adapter_model.bin"
    _check_against_truth(ad, factory.adapter_modules(d))
    stored = torch.load(d / "adapter_model.bin", weights_only=True)
    m = ad.modules[1]
    assert torch.equal(ad.load_b(m), stored[m.key_b]) and m.dtype == "F32"
    assert ad.metadata() == {}


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("pwned",))


def test_legacy_bin_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    base = factory.llama_weights()
    d = factory.write_adapter(tmp_path / "a", base=base, bin=True)
    with open(d / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(AdapterError, match="weights_only"):
        read_adapter(d)
    torch.save({"a": [1, 2]}, d / "adapter_model.bin")
    with pytest.raises(AdapterError, match="not a state dict"):
        read_adapter(d)


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    base = factory.llama_weights()
    d = factory.write_adapter(tmp_path / "a", base=base)
    (d / "adapter_model.bin").write_bytes(b"not a pickle")
    assert read_adapter(d).weights_path.name == "adapter_model.safetensors"


# ----------------------------------------------------------------------------- errors


def _adapter(tmp_path: Path, **kw: object) -> Path:
    return factory.write_adapter(tmp_path / "a", base=factory.llama_weights(), **kw)


def _rewrite(d: Path, change: dict[str, torch.Tensor | None]) -> None:
    t = load_file(str(d / "adapter_model.safetensors"))
    for k, v in change.items():
        if v is None:
            del t[k]
        else:
            t[k] = v
    save_file(t, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})


def _one_line(e: SafeLoraError) -> None:
    assert "\n" not in e.message and e.hint and "\n" not in e.hint


def test_error_no_config(tmp_path: Path) -> None:
    d = _adapter(tmp_path)
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"no adapter_config\.json") as ei:
        read_adapter(d)
    _one_line(ei.value)


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", "JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"peft_type": "IA3", "r": 4}', "peft_type is 'IA3'"),
        ('{"r": 4}', "peft_type is None"),
        ('{"peft_type": "LORA", "r": 0}', "r must be a positive integer"),
        ('{"peft_type": "LORA", "lora_alpha": "x"}', "lora_alpha"),
        ('{"peft_type": "LORA", "rank_pattern": {"(": 2}}', "not a valid regex"),
        ('{"peft_type": "LORA", "rank_pattern": {"q_proj": 0}}', "rank_pattern"),
        ('{"peft_type": "LORA", "layer_replication": [[0, 2]]}', "layer_replication"),
        ('{"peft_type": "LORA", "target_parameters": ["w"]}', "target_parameters"),
    ],
)
def test_error_bad_config(tmp_path: Path, text: str, match: str) -> None:
    d = _adapter(tmp_path)
    (d / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterError, match=match) as ei:
        read_adapter(d)
    _one_line(ei.value)
    assert "adapter_config.json" in ei.value.message


def test_error_no_weights(tmp_path: Path) -> None:
    d = _adapter(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    torch.save({}, d / "adapter_model.pt")  # other pickles are never read
    with pytest.raises(AdapterError, match=r"no adapter_model\.safetensors"):
        read_adapter(d)


def test_error_corrupt_safetensors(tmp_path: Path) -> None:
    d = _adapter(tmp_path)
    (d / "adapter_model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(AdapterError):
        read_adapter(d)


@pytest.mark.parametrize(
    "drop,match", [("lora_B", "no matching lora_B"), ("lora_A", "no matching lora_A")]
)
def test_error_unpaired(tmp_path: Path, drop: str, match: str) -> None:
    d = _adapter(tmp_path)
    _rewrite(d, {_key(V1, drop): None})
    with pytest.raises(AdapterError, match=match) as ei:
        read_adapter(d)
    assert V1 in ei.value.message


def test_error_rank_mismatch_between_a_and_b(tmp_path: Path) -> None:
    d = _adapter(tmp_path)
    _rewrite(d, {_key(Q1, "lora_B"): torch.randn(32, 3)})
    with pytest.raises(AdapterError, match="rank 4 in lora_A") as ei:
        read_adapter(d)
    assert Q1 in ei.value.message


def test_error_rank_disagrees_with_config(tmp_path: Path) -> None:
    d = _adapter(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 8
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="config says r = 8"):
        read_adapter(d)
    cfg["r"] = 4
    cfg["rank_pattern"] = {"v_proj": 2}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=f"{V0} has rank 4.*r = 2"):
        read_adapter(d)


def test_error_no_lora_tensors(tmp_path: Path) -> None:
    d = _adapter(tmp_path, targets=("nothing",), modules_to_save=["lm_head"])
    with pytest.raises(AdapterError, match="no LoRA tensors"):
        read_adapter(d)


def test_error_malformed_shapes_and_dtypes(tmp_path: Path) -> None:
    d = _adapter(tmp_path)
    _rewrite(d, {_key(Q0, "lora_A"): torch.randn(4)})
    with pytest.raises(AdapterError, match="expected 2-D"):
        read_adapter(d)
    d2 = factory.write_adapter(tmp_path / "b", base=factory.llama_weights())
    _rewrite(d2, {_key(Q0, "lora_A"): torch.ones(4, 32, dtype=torch.int8)})
    with pytest.raises(AdapterError, match="must be float"):
        read_adapter(d2)


def test_error_several_adapters_in_one_file(tmp_path: Path) -> None:
    d = _adapter(tmp_path, adapter_name="default")
    t = load_file(str(d / "adapter_model.safetensors"))
    _rewrite(
        d,
        {
            _key(Q0, "lora_A", "other"): t[_key(Q0, "lora_A", "default")],
            _key(Q0, "lora_B", "other"): t[_key(Q0, "lora_B", "default")],
        },
    )
    with pytest.raises(AdapterError, match="several adapters"):
        read_adapter(d)


def test_error_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SafeLoraError):
        load_adapter(tmp_path / "nope")
    with pytest.raises(AdapterError):
        read_adapter(tmp_path / "nope")


# ----------------------------------------------------------------------------- real peft


def _check_peft(case: factory.PeftCase, ad: Adapter, names: list[str]) -> None:
    assert [m.name for m in ad.modules] == names
    for m in ad.modules:
        layer = case.lora_layer(m.name)
        assert m.rank == layer.r["default"]
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        a = layer.lora_A["default"].weight.detach()
        b = layer.lora_B["default"].weight.detach()
        assert torch.equal(ad.load_a(m), a) and torch.equal(ad.load_b(m), b)
        assert (m.d_out, m.d_in) == (b.shape[0], a.shape[1])
        # PEFT's own delta weight (base-weight orientation) equals scale * B @ A.
        delta = layer.get_delta_weight("default").detach().double()
        mine = m.scale * (ad.load_b(m, dtype=torch.float64) @ ad.load_a(m, dtype=torch.float64))
        torch.testing.assert_close(delta, mine.T if m.fan_in_fan_out else mine)
        base_w = case.base[m.weight_name]
        assert base_w.shape == ((m.d_in, m.d_out) if m.fan_in_fan_out else (m.d_out, m.d_in))


def test_real_peft_llama(peft_llama_case: factory.PeftCase) -> None:
    ad = load_adapter(peft_llama_case.adapter_dir)
    _check_peft(peft_llama_case, ad, [Q0, V0, Q1, V1])
    assert [(m.d_out, m.d_in) for m in ad.modules] == [(32, 32), (16, 32)] * 2  # GQA
    assert ad.skipped == [] and not any(m.fan_in_fan_out for m in ad.modules)


def test_real_peft_gpt2(peft_gpt2_case: factory.PeftCase) -> None:
    ad = load_adapter(peft_gpt2_case.adapter_dir)
    _check_peft(peft_gpt2_case, ad, [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)])
    assert all(m.fan_in_fan_out and (m.d_out, m.d_in) == (96, 32) for m in ad.modules)


def test_real_peft_patterns_and_rslora(tmp_path: Path) -> None:
    case = factory.peft_llama(
        tmp_path,
        targets=("q_proj", "v_proj", "up_proj"),
        r=4,
        alpha=8,
        use_rslora=True,
        rank_pattern={"layers.1.self_attn.q_proj": 2, r"mlp\.up_\w+": 6},
        alpha_pattern={r"layers\.0\..*_proj": 5, "v_proj": 3},
    )
    ad = load_adapter(case.adapter_dir)
    names = [
        f"model.layers.{i}.{m}"
        for i in (0, 1)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")
    ]
    _check_peft(case, ad, natural_sorted(names))  # mlp.up_proj sorts before self_attn
    assert len({m.scale for m in ad.modules}) > 2


def test_real_peft_dora_embedding_modules_to_save(tmp_path: Path) -> None:
    dora = factory.peft_llama(tmp_path / "dora", use_dora=True)
    ad = load_adapter(dora.adapter_dir)
    assert ad.modules == [] and {s.reason for s in ad.skipped} == {REASON_DORA}
    emb = factory.peft_llama(
        tmp_path / "emb", targets=("q_proj", "embed_tokens"), modules_to_save=["lm_head"]
    )
    ad = load_adapter(emb.adapter_dir)
    _check_peft(emb, ad, [Q0, Q1])
    reasons = {s.name: s.reason for s in ad.skipped}
    assert reasons == {"lm_head": REASON_MODULES_TO_SAVE, "model.embed_tokens": REASON_EMBEDDING}
    bias = factory.peft_llama(tmp_path / "bias", targets=("v_proj",), lora_bias=True)
    ad = load_adapter(bias.adapter_dir)
    _check_peft(bias, ad, [V0, V1])
    assert all(m.note and "lora_B.bias" in m.note for m in ad.modules)


def test_base_orientation_follows_peft_layer_class(tmp_path: Path) -> None:
    # fan_in_fan_out=False on GPT-2: PEFT flips it on for Conv1D (with a warning) and saves
    # True; other tools may leave the stale False in the config, as simulated here.
    case = factory.peft_gpt2(tmp_path, targets=("c_attn", "c_proj"), fan_in_fan_out=False)
    cfg_path = case.adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["fan_in_fan_out"] is True
    cfg_path.write_text(json.dumps({**cfg, "fan_in_fan_out": False}))
    ad = load_adapter(case.adapter_dir)
    assert not any(m.fan_in_fan_out for m in ad.modules)
    for m in ad.modules:
        shape = tuple(case.base[m.weight_name].shape)
        assert base_fan_in_fan_out(m, shape, model_type="gpt2") is True
        layer = case.lora_layer(m.name)
        assert layer.fan_in_fan_out is True
        delta = layer.get_delta_weight("default").detach().double()
        mine = m.scale * (ad.load_b(m, dtype=torch.float64) @ ad.load_a(m, dtype=torch.float64))
        torch.testing.assert_close(delta, mine.T)
        if m.d_out != m.d_in:  # c_attn: the shape alone tells
            assert base_fan_in_fan_out(m, shape) is True
    c_proj = next(m for m in ad.modules if m.name.endswith("attn.c_proj"))
    assert base_fan_in_fan_out(c_proj, (32, 32)) is False  # square: the config decides


def test_base_orientation_linear_and_mismatch(tmp_path: Path) -> None:
    base = factory.llama_weights()
    d = factory.write_adapter(tmp_path / "a", base=base, config_overrides={"fan_in_fan_out": True})
    ad = read_adapter(d)
    v0 = ad.modules[1]
    assert v0.fan_in_fan_out  # as the config says ...
    # ... but Llama layers are nn.Linear, for which PEFT turns fan_in_fan_out off.
    assert base_fan_in_fan_out(v0, (16, 32), model_type="llama") is False
    assert base_fan_in_fan_out(v0, (16, 32)) is False  # shape [16, 32] only fits [out, in]
    with pytest.raises(AdapterError, match=r"base weight .* has shape \[32, 32\]"):
        base_fan_in_fan_out(v0, (32, 32), model_type="llama")
