"""Tiny checkpoints and PEFT adapters for tests (nothing is downloaded).

Synthetic part (torch + safetensors only)::

    llama_weights(*, layers=2, hidden=32, intermediate=48, heads=4, kv_heads=2, vocab=64,
                  dtype=torch.float32, seed=0) -> dict[str, Tensor]
        Real Llama names, linear orientation [out, in]; GQA: k/v_proj are [kv_heads*head_dim,
        hidden] = [16, 32] (narrower than q). Also embed_tokens, norms, model.norm, lm_head.
    gpt2_weights(*, layers=2, hidden=32, vocab=64, positions=16, dtype=torch.float32, seed=0)
        Real GPT-2 names (``transformer.h.{i}.attn.c_attn.weight`` ...), Conv1D orientation
        [in, out]: c_attn [32, 96], attn.c_proj [32, 32], mlp.c_fc [32, 128], mlp.c_proj
        [128, 32]; biases, wte, wpe, ln_1/ln_2/ln_f. No lm_head (tied, as HF saves it).
    aligned_from(base, *, scale=0.05, seed=1, same=()) -> dict
        Perturbed copy of ``base`` (same dtypes); names in ``same`` are identical (V = 0).
        Only floating tensors with >= 2 dims are perturbed, others are copied.
    write_checkpoint(dir, tensors, *, shards=1, dtype=None, config=None) -> Path
        ``model.safetensors`` or ``model-0000k-of-0000N.safetensors`` shards plus
        ``model.safetensors.index.json`` ({"metadata": {"total_size"}, "weight_map"}), file
        metadata {"format": "pt"}; writes ``config.json`` when ``config`` is given (a dict, or
        "llama"/"gpt2" for a matching tiny config). Returns ``dir``.
    llama_config(...) / gpt2_config(...) -> dict      HF-style config.json contents.
    make_pair(tmp_path, *, arch="llama", shards=1, dtype=torch.float32, layers=2,
              scale=0.05, same=(), **kw) -> Pair
        Pair(base_dir, aligned_dir, base, aligned, arch, fan_in_fan_out); writes
        ``tmp_path/base`` and ``tmp_path/aligned`` with config.json. ``base``/``aligned`` are
        the tensors as written (already cast to ``dtype``). ``kw`` goes to the weights builder.
    write_adapter(dir, *, base, targets=("q_proj", "v_proj"), r=4, alpha=8, dtype=torch.float32,
                  seed=0, adapter_name=None, fan_in_fan_out=False, use_rslora=False,
                  rank_pattern=None, alpha_pattern=None, zero_b=(), extra_tensors=None,
                  config_overrides=None, use_dora=False, modules_to_save=None,
                  embedding=False, lora_bias=False, bin=False, layers=None) -> Path
        PEFT LoRA directory: ``adapter_config.json`` (real PEFT keys) and
        ``adapter_model.safetensors`` ({"format": "pt"}) or legacy ``adapter_model.bin``
        (torch.save). One module per 2-D base weight whose module name ends in a target
        (``layers`` restricts to those layer indices). Keys
        ``base_model.model.<module>.lora_A.weight`` [r, d_in] and ``lora_B.weight`` [d_out, r]
        (``.lora_A.<adapter_name>.weight`` when ``adapter_name`` is given). B is random nonzero
        except modules whose name ends in an entry of ``zero_b``. Shapes from ``base``: with
        ``fan_in_fan_out`` the base weight is [in, out] and A/B stay linear orientation.
        Per-module rank/alpha follow PEFT's own pattern resolution (``resolve_rank_alpha``).
        ``use_dora`` adds ``lora_magnitude_vector`` [d_out]; ``embedding`` adds
        ``lora_embedding_A`` [r, vocab] / ``lora_embedding_B`` [hidden, r] on the embedding
        plus its full copy ``<embedding>.base_layer.weight`` (as PEFT's save_embedding_layers);
        ``modules_to_save`` (module names, e.g. ["lm_head"]) adds full copies saved as PEFT does
        (``base_model.model.lm_head.weight``); ``lora_bias`` adds ``lora_B.bias`` [d_out].
        ``extra_tensors`` are added verbatim (they may override generated keys).
    adapter_modules(dir) -> dict[str, dict]   ground truth recorded by write_adapter
        (module -> {"r", "alpha", "d_out", "d_in"}), kept in memory (not in the directory).
    resolve_rank_alpha(module, *, r, alpha, rank_pattern, alpha_pattern) -> (r, alpha)
        PEFT's resolution (peft.utils.other.get_pattern_key), imported from peft.

Real transformers/peft part (imports transformers and peft lazily)::

    peft_llama(tmp_path, *, targets=("q_proj", "v_proj"), r=4, alpha=8, seed=0,
               use_rslora=False, rank_pattern=None, alpha_pattern=None, **lora_kw) -> PeftCase
    peft_gpt2(tmp_path, *, targets=("c_attn",), r=4, alpha=8, seed=0, **lora_kw) -> PeftCase
        A tiny random LlamaForCausalLM (hidden 32, 2 layers, 4 heads, 2 kv heads) or
        GPT2LMHeadModel (Conv1D) saved with save_pretrained(safe_serialization=True) to
        ``tmp_path/base``; an aligned perturbed copy in ``tmp_path/aligned`` (same config);
        a real peft LoRA adapter (get_peft_model + LoraConfig, lora_B re-initialised to random
        nonzero values) saved with save_pretrained to ``tmp_path/adapter``.
        PeftCase(base_dir, aligned_dir, adapter_dir, base_model, peft_model, base, aligned)
        where ``base``/``aligned`` are the state dicts as written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from safelora_cli.naming import layer_index, natural_sorted

FORMAT_PT = {"format": "pt"}

# write_adapter's ground truth, kept out of the adapter directory (patch copies every file).
_TRUTH: dict[str, dict[str, dict[str, Any]]] = {}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape: Sequence[int], g: torch.Generator, std: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32) * std


# ----------------------------------------------------------------------------- weights


def llama_weights(
    *,
    layers: int = 2,
    hidden: int = 32,
    intermediate: int = 48,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Llama-named tensors, linear orientation [out, in], GQA k/v [kv_heads*head_dim, hidden]."""
    g = _gen(seed)
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _rand((vocab, hidden), g)}
    for i in range(layers):
        p = f"model.layers.{i}"
        t[f"{p}.self_attn.q_proj.weight"] = _rand((hidden, hidden), g)
        t[f"{p}.self_attn.k_proj.weight"] = _rand((kv, hidden), g)
        t[f"{p}.self_attn.v_proj.weight"] = _rand((kv, hidden), g)
        t[f"{p}.self_attn.o_proj.weight"] = _rand((hidden, hidden), g)
        t[f"{p}.mlp.gate_proj.weight"] = _rand((intermediate, hidden), g)
        t[f"{p}.mlp.up_proj.weight"] = _rand((intermediate, hidden), g)
        t[f"{p}.mlp.down_proj.weight"] = _rand((hidden, intermediate), g)
        t[f"{p}.input_layernorm.weight"] = 1 + _rand((hidden,), g, 0.01)
        t[f"{p}.post_attention_layernorm.weight"] = 1 + _rand((hidden,), g, 0.01)
    t["model.norm.weight"] = 1 + _rand((hidden,), g, 0.01)
    t["lm_head.weight"] = _rand((vocab, hidden), g)
    return {k: v.to(dtype) for k, v in t.items()}


def gpt2_weights(
    *,
    layers: int = 2,
    hidden: int = 32,
    vocab: int = 64,
    positions: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """GPT-2-named tensors; Conv1D weights in [in, out] orientation (c_attn is [h, 3h])."""
    g = _gen(seed)
    t: dict[str, torch.Tensor] = {
        "transformer.wte.weight": _rand((vocab, hidden), g),
        "transformer.wpe.weight": _rand((positions, hidden), g),
    }
    for i in range(layers):
        p = f"transformer.h.{i}"
        t[f"{p}.ln_1.weight"] = 1 + _rand((hidden,), g, 0.01)
        t[f"{p}.ln_1.bias"] = _rand((hidden,), g, 0.01)
        t[f"{p}.attn.c_attn.weight"] = _rand((hidden, 3 * hidden), g)
        t[f"{p}.attn.c_attn.bias"] = _rand((3 * hidden,), g, 0.01)
        t[f"{p}.attn.c_proj.weight"] = _rand((hidden, hidden), g)
        t[f"{p}.attn.c_proj.bias"] = _rand((hidden,), g, 0.01)
        t[f"{p}.ln_2.weight"] = 1 + _rand((hidden,), g, 0.01)
        t[f"{p}.ln_2.bias"] = _rand((hidden,), g, 0.01)
        t[f"{p}.mlp.c_fc.weight"] = _rand((hidden, 4 * hidden), g)
        t[f"{p}.mlp.c_fc.bias"] = _rand((4 * hidden,), g, 0.01)
        t[f"{p}.mlp.c_proj.weight"] = _rand((4 * hidden, hidden), g)
        t[f"{p}.mlp.c_proj.bias"] = _rand((hidden,), g, 0.01)
    t["transformer.ln_f.weight"] = 1 + _rand((hidden,), g, 0.01)
    t["transformer.ln_f.bias"] = _rand((hidden,), g, 0.01)
    return {k: v.to(dtype) for k, v in t.items()}


def aligned_from(
    base: Mapping[str, torch.Tensor],
    *,
    scale: float = 0.05,
    seed: int = 1,
    same: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """A perturbed copy of ``base`` (dtypes kept); names in ``same`` stay identical (V = 0)."""
    g = _gen(seed)
    same = set(same)
    out: dict[str, torch.Tensor] = {}
    for name in natural_sorted(base):
        t = base[name]
        if name in same or t.dim() < 2 or not t.is_floating_point():
            out[name] = t.clone()
        else:
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * scale
            out[name] = (t.float() + noise).to(t.dtype)
    return out


# ----------------------------------------------------------------------------- checkpoints


def llama_config(
    *,
    layers: int = 2,
    hidden: int = 32,
    intermediate: int = 48,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 64,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """A config.json for :func:`llama_weights` (loadable by transformers' LlamaConfig)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def gpt2_config(
    *,
    layers: int = 2,
    hidden: int = 32,
    vocab: int = 64,
    positions: int = 16,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """A config.json for :func:`gpt2_weights` (loadable by transformers' GPT2Config)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": hidden,
        "n_layer": layers,
        "n_head": 4,
        "n_positions": positions,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def write_checkpoint(
    dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    shards: int = 1,
    dtype: torch.dtype | None = None,
    config: Mapping[str, Any] | str | None = None,
) -> Path:
    """Write ``tensors`` as an HF safetensors checkpoint (single file or ``shards`` shards)."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    names = natural_sorted(tensors)
    data = {
        n: (tensors[n].to(dtype) if dtype is not None else tensors[n]).contiguous() for n in names
    }
    if shards <= 1:
        save_file(data, str(d / "model.safetensors"), metadata=FORMAT_PT)
    else:
        # Contiguous runs in natural order, so a layer's weights sit mostly in one shard.
        per = -(-len(names) // shards)
        weight_map: dict[str, str] = {}
        total = 0
        for k in range(shards):
            chunk = names[k * per : (k + 1) * per]
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: data[n] for n in chunk}, str(d / fname), metadata=FORMAT_PT)
            for n in chunk:
                weight_map[n] = fname
                total += data[n].numel() * data[n].element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        if isinstance(config, str):
            kind = config
            cfg = llama_config() if kind == "llama" else gpt2_config()
        else:
            cfg = dict(config)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


@dataclass
class Pair:
    """A base/aligned checkpoint pair on disk and the tensors written."""

    base_dir: Path
    aligned_dir: Path
    base: dict[str, torch.Tensor]
    aligned: dict[str, torch.Tensor]
    arch: str
    fan_in_fan_out: bool


def make_pair(
    tmp_path: str | Path,
    *,
    arch: str = "llama",
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    layers: int = 2,
    scale: float = 0.05,
    same: Iterable[str] = (),
    seed: int = 0,
    **kw: Any,
) -> Pair:
    """Write ``tmp_path/base`` and ``tmp_path/aligned`` (with config.json) and return a Pair."""
    tmp = Path(tmp_path)
    if arch == "llama":
        base = llama_weights(layers=layers, dtype=dtype, seed=seed, **kw)
        cfg_kw = {k: v for k, v in kw.items() if k != "seed"}
        cfg = llama_config(layers=layers, dtype=dtype, **cfg_kw)
    elif arch == "gpt2":
        base = gpt2_weights(layers=layers, dtype=dtype, seed=seed, **kw)
        cfg = gpt2_config(layers=layers, dtype=dtype, **kw)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    aligned = aligned_from(base, scale=scale, seed=seed + 1, same=same)
    base_dir = write_checkpoint(tmp / "base", base, shards=shards, config=cfg)
    aligned_dir = write_checkpoint(tmp / "aligned", aligned, shards=shards, config=cfg)
    return Pair(base_dir, aligned_dir, base, aligned, arch, arch == "gpt2")


# ----------------------------------------------------------------------------- adapters


def resolve_rank_alpha(
    module: str,
    *,
    r: int,
    alpha: float,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> tuple[int, float]:
    """Rank and alpha of ``module`` exactly as PEFT resolves them (its own get_pattern_key)."""
    from peft.utils.other import get_pattern_key

    rp = dict(rank_pattern or {})
    ap = dict(alpha_pattern or {})
    rr = rp.get(get_pattern_key(rp.keys(), module), r)
    aa = ap.get(get_pattern_key(ap.keys(), module), alpha)
    return rr, aa


def _lora_key(module: str, part: str, adapter_name: str | None, suffix: str = "weight") -> str:
    mid = f"{part}.{adapter_name}" if adapter_name else part
    return (
        f"base_model.model.{module}.{mid}.{suffix}"
        if suffix
        else f"base_model.model.{module}.{mid}"
    )


def adapter_config(
    *,
    targets: Sequence[str],
    r: int,
    alpha: float,
    fan_in_fan_out: bool = False,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_dora: bool = False,
    modules_to_save: Sequence[str] | None = None,
    lora_bias: bool = False,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """An adapter_config.json as PEFT 0.21 writes it for a LoRA adapter."""
    return {
        "alpha_pattern": dict(alpha_pattern or {}),
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "corda_config": None,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": lora_bias,
        "lora_dropout": 0.0,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "r": r,
        "rank_pattern": dict(rank_pattern or {}),
        "revision": None,
        "target_modules": list(targets),
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_dora": use_dora,
        "use_rslora": use_rslora,
    }


def write_adapter(
    dir: str | Path,
    *,
    base: Mapping[str, torch.Tensor],
    targets: Sequence[str] = ("q_proj", "v_proj"),
    r: int = 4,
    alpha: float = 8,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    adapter_name: str | None = None,
    fan_in_fan_out: bool = False,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    zero_b: Iterable[str] = (),
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    use_dora: bool = False,
    modules_to_save: Sequence[str] | None = None,
    embedding: bool = False,
    lora_bias: bool = False,
    bin: bool = False,
    layers: Iterable[int] | None = None,
) -> Path:
    """Write a PEFT LoRA adapter directory for the modules of ``base`` named by ``targets``."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    g = _gen(seed)
    zero_b = tuple(zero_b)
    layer_set = set(layers) if layers is not None else None
    tensors: dict[str, torch.Tensor] = {}
    truth: dict[str, dict[str, Any]] = {}
    for wname in natural_sorted(base):
        w = base[wname]
        if not wname.endswith(".weight") or w.dim() != 2:
            continue
        module = wname[: -len(".weight")]
        if not any(module == t or module.endswith("." + t) for t in targets):
            continue
        if layer_set is not None and layer_index(module) not in layer_set:
            continue
        d_out, d_in = (w.shape[1], w.shape[0]) if fan_in_fan_out else (w.shape[0], w.shape[1])
        rr, aa = resolve_rank_alpha(
            module, r=r, alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
        )
        a = _rand((rr, d_in), g, 0.2)
        b = _rand((d_out, rr), g, 0.2)
        if any(module.endswith(z) for z in zero_b):
            b = torch.zeros_like(b)
        tensors[_lora_key(module, "lora_A", adapter_name)] = a.to(dtype)
        tensors[_lora_key(module, "lora_B", adapter_name)] = b.to(dtype)
        if lora_bias:
            tensors[_lora_key(module, "lora_B", adapter_name, "bias")] = _rand(
                (d_out,), g, 0.01
            ).to(dtype)
        if use_dora:
            # PEFT saves the magnitude as "<module>.lora_magnitude_vector" (adapter name removed
            # from "lora_magnitude_vector.default.weight").
            key = (
                f"base_model.model.{module}.lora_magnitude_vector.{adapter_name}.weight"
                if adapter_name
                else f"base_model.model.{module}.lora_magnitude_vector"
            )
            tensors[key] = (w.float().norm(dim=1 if not fan_in_fan_out else 0)).to(dtype)
        truth[module] = {"r": rr, "alpha": aa, "d_out": d_out, "d_in": d_in}
    if embedding:
        emb = next(
            n for n in natural_sorted(base) if n.endswith(("embed_tokens.weight", "wte.weight"))
        )
        module = emb[: -len(".weight")]
        vocab, hidden = base[emb].shape
        tensors[_lora_key(module, "lora_embedding_A", adapter_name, "")] = _rand(
            (r, vocab), g, 0.2
        ).to(dtype)
        tensors[_lora_key(module, "lora_embedding_B", adapter_name, "")] = _rand(
            (hidden, r), g, 0.2
        ).to(dtype)
        # PEFT also saves the full embedding when it is a target (save_embedding_layers).
        tensors[f"base_model.model.{module}.base_layer.weight"] = base[emb].clone().to(dtype)
    for m in modules_to_save or ():
        for wname in natural_sorted(base):
            if wname.startswith(m + ".") or wname[: wname.rfind(".")].endswith("." + m):
                tensors[f"base_model.model.{wname}"] = base[wname].clone().to(dtype)
    tensors.update(dict(extra_tensors or {}))

    targets_cfg = list(targets)
    if embedding:
        targets_cfg.append("embed_tokens" if "embed_tokens" in emb else "wte")
    cfg = adapter_config(
        targets=targets_cfg,
        r=r,
        alpha=alpha,
        fan_in_fan_out=fan_in_fan_out,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_dora=use_dora,
        modules_to_save=modules_to_save,
        lora_bias=lora_bias,
    )
    cfg.update(dict(config_overrides or {}))
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    data = {k: v.contiguous() for k, v in tensors.items()}
    if bin:
        torch.save(data, d / "adapter_model.bin")
    else:
        save_file(data, str(d / "adapter_model.safetensors"), metadata=FORMAT_PT)
    _TRUTH[str(d.resolve())] = truth
    return d


def adapter_modules(dir: str | Path) -> dict[str, dict[str, Any]]:
    """The ground truth :func:`write_adapter` recorded: module -> {r, alpha, d_out, d_in}."""
    return _TRUTH[str(Path(dir).resolve())]


# ----------------------------------------------------------------------------- real peft


@dataclass
class PeftCase:
    """A tiny transformers base model, its aligned copy and a real peft LoRA adapter on disk.

    ``peft_model`` wraps ``base_model`` (peft injected LoRA layers into it in place); ``base`` /
    ``aligned`` are the state dicts as written (``save_pretrained(safe_serialization=True)``).
    """

    base_dir: Path
    aligned_dir: Path
    adapter_dir: Path
    base_model: Any
    peft_model: Any
    base: dict[str, torch.Tensor]
    aligned: dict[str, torch.Tensor]

    def lora_layer(self, module: str) -> Any:
        """The peft LoRA layer wrapping base-model module ``module`` (has ``.scaling``, ``.r``)."""
        return self.peft_model.base_model.model.get_submodule(module)


def _read_dir(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _peft_case(
    tmp_path: str | Path,
    model: Any,
    *,
    seed: int,
    scale: float,
    lora_kw: dict[str, Any],
) -> PeftCase:
    from peft import LoraConfig, get_peft_model

    tmp = Path(tmp_path)
    base_dir, aligned_dir, adapter_dir = tmp / "base", tmp / "aligned", tmp / "adapter"
    model.save_pretrained(str(base_dir), safe_serialization=True)
    g = _gen(seed + 1)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for v in sd.values():
            if v.dim() >= 2 and v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=g, dtype=v.dtype) * scale)
    aligned_model = type(model)(model.config)
    aligned_model.load_state_dict(sd)
    aligned_model.save_pretrained(str(aligned_dir), safe_serialization=True)
    del aligned_model

    peft_model = get_peft_model(model, LoraConfig(**lora_kw))
    gb = _gen(seed + 2)
    with torch.no_grad():
        # peft initialises B to zero; an untrained adapter has no cosine, so give B values.
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=gb, dtype=p.dtype) * 0.2)
    peft_model.save_pretrained(str(adapter_dir))
    return PeftCase(
        base_dir,
        aligned_dir,
        adapter_dir,
        model,
        peft_model,
        _read_dir(base_dir),
        _read_dir(aligned_dir),
    )


def peft_llama(
    tmp_path: str | Path,
    *,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    r: int = 4,
    alpha: float = 8,
    seed: int = 0,
    scale: float = 0.05,
    **lora_kw: Any,
) -> PeftCase:
    """A tiny random LlamaForCausalLM (GQA) + aligned copy + real peft LoRA adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    kw = {"r": r, "lora_alpha": alpha, "target_modules": list(targets), **lora_kw}
    return _peft_case(tmp_path, model, seed=seed, scale=scale, lora_kw=kw)


def peft_gpt2(
    tmp_path: str | Path,
    *,
    targets: Sequence[str] = ("c_attn",),
    r: int = 4,
    alpha: float = 8,
    seed: int = 0,
    scale: float = 0.05,
    **lora_kw: Any,
) -> PeftCase:
    """A tiny random GPT2LMHeadModel (Conv1D) + aligned copy + real peft LoRA adapter
    (``fan_in_fan_out=True``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=16,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    kw = {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "fan_in_fan_out": True,
        **lora_kw,
    }
    return _peft_case(tmp_path, model, seed=seed, scale=scale, lora_kw=kw)
