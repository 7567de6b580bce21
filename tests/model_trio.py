"""Tiny full fine-tune trios (base, aligned, fine-tuned) for patch-model tests.

Built with real ``transformers`` models (nothing downloaded):

    llama_trio(tmp, *, dtype=torch.float32, shard="20KB", seed=0) -> Trio
        LlamaForCausalLM, hidden 32, 2 layers, 4 heads, 2 key/value heads (GQA: k/v are
        [16, 32]), intermediate 48, vocab 64, untied lm_head.
    gpt2_trio(tmp, *, dtype=torch.float32, shard=None, seed=0) -> Trio
        GPT2LMHeadModel (Conv1D: c_attn [32, 96], c_fc [32, 128] stored [in, out]), tied.

base: random init; aligned = base + a rank-2 delta on every 2-D weight; fine-tuned = aligned
+ dense noise on every floating tensor (norms and embeddings too). Each is written with
``save_pretrained(max_shard_size=shard)`` in ``dtype``; the fine-tuned directory also gets a
README.md and a tokenizer_config.json (they must be copied). ``Trio.read(dir)`` returns the
tensors exactly as stored; ``raw(dir)`` the raw bytes of each tensor (own header parser).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ALL_LLAMA = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ALL_GPT2 = "c_attn,c_proj,c_fc"


@dataclass
class Trio:
    base: Path
    aligned: Path
    finetuned: Path
    arch: str


def _perturb(model: Any, *, seed: int, lowrank: bool, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.state_dict().items()):
            if not p.is_floating_point():
                continue
            if lowrank:
                if p.dim() != 2:
                    continue
                u = torch.randn(p.shape[0], 2, generator=g)
                v = torch.randn(2, p.shape[1], generator=g)
                p.add_((scale * (u @ v)).to(p.dtype))
            else:
                p.add_((scale * torch.randn(p.shape, generator=g)).to(p.dtype))


def _save(model: Any, d: Path, dtype: torch.dtype, shard: str | None) -> None:
    kw: dict[str, Any] = {"safe_serialization": True}
    if shard is not None:
        kw["max_shard_size"] = shard
    model.to(dtype).save_pretrained(str(d), **kw)
    model.to(torch.float32)


def _trio(
    tmp: Path, model: Any, arch: str, dtype: torch.dtype, shard: str | None, seed: int
) -> Trio:
    tmp.mkdir(parents=True, exist_ok=True)
    paths = Trio(tmp / "base", tmp / "aligned", tmp / "finetuned", arch)
    _save(model, paths.base, dtype, shard)
    # Round through the stored dtype, so aligned/fine-tuned differ from base exactly as saved.
    model.to(dtype).to(torch.float32)
    _perturb(model, seed=seed + 1, lowrank=True, scale=0.02)
    _save(model, paths.aligned, dtype, shard)
    _perturb(model, seed=seed + 2, lowrank=False, scale=0.01)
    _save(model, paths.finetuned, dtype, shard)
    (paths.finetuned / "README.md").write_text("# a tiny full fine-tune\n")
    (paths.finetuned / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return paths


def llama_trio(
    tmp: Path, *, dtype: torch.dtype = torch.float32, shard: str | None = "20KB", seed: int = 0
) -> Trio:
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
    return _trio(tmp, LlamaForCausalLM(cfg).eval(), "llama", dtype, shard, seed)


def gpt2_trio(
    tmp: Path, *, dtype: torch.dtype = torch.float32, shard: str | None = None, seed: int = 0
) -> Trio:
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
    return _trio(tmp, GPT2LMHeadModel(cfg).eval(), "gpt2", dtype, shard, seed)


def read(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, as stored."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def header(f: Path) -> tuple[dict[str, Any], int]:
    """(header JSON, data start) of one safetensors file, parsed here (not by safelora)."""
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), 8 + n


def raw(d: Path) -> dict[str, tuple[str, str, list[int], bytes]]:
    """name -> (shard file name, dtype, shape, raw bytes) for every tensor under ``d``."""
    out: dict[str, tuple[str, str, list[int], bytes]] = {}
    for f in sorted(d.glob("*.safetensors")):
        h, start = header(f)
        data = f.read_bytes()
        for name, e in h.items():
            if name == "__metadata__":
                continue
            a, b = e["data_offsets"]
            out[name] = (f.name, e["dtype"], e["shape"], data[start + a : start + b])
    return out


def order(f: Path) -> list[str]:
    """Tensor names of a shard in data order."""
    h, _ = header(f)
    items = [(e["data_offsets"][0], n) for n, e in h.items() if n != "__metadata__"]
    return [n for _, n in sorted(items)]


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- float64 oracle


def is_target(name: str, t: torch.Tensor) -> bool:
    """The default targets, from the definition: 2-D weights of layers.N / h.N blocks."""
    import re

    return (
        t.dim() == 2
        and name.endswith(".weight")
        and re.search(r"\.(layers|h)\.\d+\.", name) is not None
    )


def oracle(trio: Trio, *, conv1d: bool, only: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per target weight: float64 cosine and ``W_aligned + C dW`` (stored orientation), from
    the stored tensors and the formulas of DESIGN §1 (nothing of safelora is used)."""
    b, a, f = read(trio.base), read(trio.aligned), read(trio.finetuned)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(f):
        if not is_target(name, f[name]):
            continue
        mod = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if only is not None and mod not in only:
            continue
        wb, wa, wf = (x[name].to(torch.float64) for x in (b, a, f))
        if conv1d:
            wb, wa, wf = wb.T, wa.T, wf.T
        v = wa - wb
        nv = float(torch.linalg.matrix_norm(v))
        dw = wf - wa
        cos = None
        new = wa
        if nv > 0 and float(dw.abs().max()) > 0:
            c = v @ v.T / nv
            cdw = c @ dw
            cos = float(
                (cdw * dw).sum() / (torch.linalg.matrix_norm(cdw) * torch.linalg.matrix_norm(dw))
            )
            new = wa + cdw
        out[name] = {
            "cos": cos,
            "new": new.T if conv1d else new,
            "dtype": f[name].dtype,
            "norm_dw": float(torch.linalg.matrix_norm(dw)),
        }
    return out


def expected_selection(cos: dict[str, float | None], mode: str, value: float) -> set[str]:
    """The official selection, written out from DESIGN §1 (5-decimal rounding, <=, ceil)."""
    import math

    defined = {n: round(c, 5) for n, c in cos.items() if c is not None}
    if mode == "threshold":
        t = value
    else:
        k = int(value) if mode == "num_layers" else math.ceil(value * len(defined) - 1e-12)
        ranked = sorted(defined.values())
        if not ranked:
            return set()
        t = ranked[min(k, len(ranked)) - 1]
    return {n for n, c in defined.items() if c <= t}
