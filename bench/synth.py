"""Synthetic Llama-shaped base/aligned checkpoint pairs and PEFT LoRA adapters for the benchmarks.

Shapes follow Llama-2-7B (``hidden 4096, intermediate 11008, 32 heads, vocab 32000``) scaled to a
chosen width: ``intermediate = round(width * 11008 / 4096 / 64) * 64``, one head per 128 columns,
no GQA (k/v are ``width x width`` as in Llama-2-7B). Checkpoints are written the way
``save_pretrained`` writes them: ``model-0000k-of-0000N.safetensors`` shards (at least two) plus
``model.safetensors.index.json`` and ``config.json``, bf16 (or fp32) like real checkpoints.

Values come from one pool of Gaussian numbers (generating fresh randoms for billions of weights on
2 cores would dominate the benchmark); each tensor is a slice of the pool at its own offset, so
tensors differ from each other. The aligned model equals ``base + noise`` on the q/v
projections (an alignment delta with half the weights' std) and is an unrelated pool slice
elsewhere. Content does not change any cost measured here; only shapes and dtypes do.

A finished pair carries ``synth.json`` (its parameters); a later call with the same parameters
reuses it, so repeated ``make bench`` runs do not rewrite gigabytes.

Public API::

    Shape(width, layers, intermediate, heads, vocab, dtype)      frozen dataclass
    llama_shape(width, layers, *, dtype="bf16", vocab=32000) -> Shape
    weight_shapes(shape) -> list[tuple[str, tuple[int, ...]]]       checkpoint order
    target_weights(shape, targets=("q_proj", "v_proj")) -> list[str]
    write_safetensors(path, items, *, metadata=None) -> int          bytes written
    make_pair(root, shape, *, seed=0) -> Pair          Pair(base_dir, aligned_dir, shape, bytes)
    make_adapters(root, shape, n, *, r=16, alpha=32, targets=..., dtype="f32", seed=0)
        -> list[Path]

Command line (what ``run_all.py`` calls, so the driver itself never imports torch)::

    python bench/synth.py PLAN.json     # {"root": ..., "pairs": [{"width", "layers", "vocab",
                                        #  "dtype", "adapters": [[dir, n], ...]}]}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FORMAT_PT = {"format": "pt"}
# dtype key -> (torch attribute, safetensors code). torch is imported only where tensors are made,
# so the benchmark driver can use the shapes without loading torch (see harness.py on why).
DTYPES: dict[str, tuple[str, str]] = {
    "bf16": ("bfloat16", "BF16"),
    "f16": ("float16", "F16"),
    "f32": ("float32", "F32"),
}


def _torch_dtype(key: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPES[key][0])


POOL_ELEMENTS = 1 << 25  # 32 Mi Gaussian numbers: 64 MiB in bf16
TARGETS = ("q_proj", "v_proj")
SHARD_LIMIT = 2 << 30  # HF's default max_shard_size is 5 GB; 2 GiB gives several shards at 4096
SYNTH_VERSION = 1


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: every weight in linear orientation ``[out, in]``."""

    width: int
    layers: int
    intermediate: int
    heads: int
    vocab: int
    dtype: str  # key of DTYPES

    @property
    def tag(self) -> str:
        return f"llama-w{self.width}-L{self.layers}-{self.dtype}-v{self.vocab}"


def llama_shape(width: int, layers: int, *, dtype: str = "bf16", vocab: int = 32000) -> Shape:
    """Llama-2-7B proportions at ``width`` (width 4096 gives the real 7B layer)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    inter = max(64, round(width * 11008 / 4096 / 64) * 64)
    return Shape(width, layers, inter, max(1, width // 128), vocab, dtype)


def weight_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint, in the order transformers saves a Llama."""
    w, i = shape.width, shape.intermediate
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, w))]
    for n in range(shape.layers):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (w, w)),
            (f"{p}.self_attn.k_proj.weight", (w, w)),
            (f"{p}.self_attn.v_proj.weight", (w, w)),
            (f"{p}.self_attn.o_proj.weight", (w, w)),
            (f"{p}.mlp.gate_proj.weight", (i, w)),
            (f"{p}.mlp.up_proj.weight", (i, w)),
            (f"{p}.mlp.down_proj.weight", (w, i)),
            (f"{p}.input_layernorm.weight", (w,)),
            (f"{p}.post_attention_layernorm.weight", (w,)),
        ]
    out += [("model.norm.weight", (w,)), ("lm_head.weight", (shape.vocab, w))]
    return out


def target_weights(shape: Shape, targets: Sequence[str] = TARGETS) -> list[str]:
    """Names of the 2-D weights a q/v LoRA adapter wraps, in checkpoint order."""
    return [
        n
        for n, s in weight_shapes(shape)
        if len(s) == 2 and any(n.endswith(f".{t}.weight") for t in targets)
    ]


def config_json(shape: Shape) -> dict:
    """config.json as transformers writes it for a LlamaForCausalLM of this shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.width,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[shape.dtype],
    }


# --- writing safetensors -------------------------------------------------------------------------


def write_safetensors(
    path: Path,
    items: Iterable[tuple[str, tuple[int, ...], str, Iterator[torch.Tensor] | torch.Tensor]],
    *,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file from ``(name, shape, dtype_code, data)`` without holding it whole.

    ``data`` is a tensor or an iterator of 1-D contiguous chunks whose sizes add up to the shape.
    The header is laid out first (sizes are known from the shapes), then each tensor's bytes are
    streamed; the layout is the format's: 8-byte little-endian header length, JSON header padded
    with spaces to 8 bytes, data in header order. Returns the file size.
    """
    import torch

    items = list(items)
    header: dict[str, object] = {"__metadata__": dict(metadata or FORMAT_PT)}
    off = 0
    for name, shp, code, _ in items:
        size = {"BF16": 2, "F16": 2, "F32": 4}[code] * math.prod(shp)
        header[name] = {"dtype": code, "shape": list(shp), "data_offsets": [off, off + size]}
        off += size
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _name, _shp, _code, data in items:
            chunks = [data] if isinstance(data, torch.Tensor) else data
            for c in chunks:
                f.write(c.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    tmp.replace(path)
    return 8 + len(hb) + off


# --- the pool ------------------------------------------------------------------------------------


class _Pool:
    """A fixed block of Gaussian numbers; ``take(key, n)`` yields n of them from a keyed offset."""

    def __init__(self, dtype: torch.dtype, seed: int) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        self.data = (torch.randn(POOL_ELEMENTS, generator=g) * 0.02).to(dtype)

    def offset(self, key: str) -> int:
        h = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") % POOL_ELEMENTS

    def chunks(self, key: str, n: int) -> Iterator[torch.Tensor]:
        """n numbers starting at key's offset, wrapping around, as views (no copy)."""
        o = self.offset(key)
        while n > 0:
            k = min(n, POOL_ELEMENTS - o)
            yield self.data[o : o + k]
            n -= k
            o = 0

    def tensor(self, key: str, n: int) -> torch.Tensor:
        import torch

        return torch.cat(list(self.chunks(key, n)))


@dataclass(frozen=True)
class Pair:
    base_dir: Path
    aligned_dir: Path
    shape: Shape
    model_bytes: int  # size of one checkpoint's shards


def _shard_plan(sizes: list[int]) -> list[list[int]]:
    """Group tensor indices into contiguous shards: at least two, each under SHARD_LIMIT."""
    total = sum(sizes)
    n = max(2, math.ceil(total / SHARD_LIMIT))
    target = total / n
    plan: list[list[int]] = [[]]
    acc = 0
    for i, s in enumerate(sizes):
        if plan[-1] and acc + s > target and len(plan) < n:
            plan.append([])
            acc = 0
        plan[-1].append(i)
        acc += s
    return plan


def _write_checkpoint(d: Path, shape: Shape, data_for: Any) -> int:
    d.mkdir(parents=True, exist_ok=True)
    code = DTYPES[shape.dtype][1]
    el = {"BF16": 2, "F16": 2, "F32": 4}[code]
    ws = weight_shapes(shape)
    plan = _shard_plan([math.prod(s) * el for _, s in ws])
    weight_map: dict[str, str] = {}
    total = 0
    for k, idx in enumerate(plan, start=1):
        fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        items = [(ws[i][0], ws[i][1], code, data_for(ws[i][0], ws[i][1])) for i in idx]
        total += write_safetensors(d / fname, items)
        for i in idx:
            weight_map[ws[i][0]] = fname
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (d / "config.json").write_text(json.dumps(config_json(shape), indent=2))
    return total


def make_pair(root: str | Path, shape: Shape, *, seed: int = 0) -> Pair:
    """Write (or reuse) ``root/<tag>/{base,aligned}``; returns their paths and sizes."""
    top = Path(root) / shape.tag
    stamp = top / "synth.json"
    want = {"version": SYNTH_VERSION, "seed": seed, **asdict(shape)}
    if stamp.exists():
        got = json.loads(stamp.read_text())
        if {k: v for k, v in got.items() if k != "model_bytes"} == want:
            return Pair(top / "base", top / "aligned", shape, got["model_bytes"])
    if top.exists():
        shutil.rmtree(top)
    import torch

    dt = _torch_dtype(shape.dtype)
    pool = _Pool(dt, seed)
    targets = set(target_weights(shape))

    def base_data(name: str, shp: tuple[int, ...]) -> Iterator[torch.Tensor]:
        if len(shp) == 1:  # norms: ones, as initialised
            return iter([torch.ones(shp, dtype=dt)])
        return pool.chunks("base:" + name, math.prod(shp))

    def aligned_data(name: str, shp: tuple[int, ...]) -> Iterator[torch.Tensor]:
        if len(shp) == 1:
            return iter([torch.ones(shp, dtype=dt)])
        n = math.prod(shp)
        if name in targets:
            return iter([pool.tensor("base:" + name, n) + 0.5 * pool.tensor("delta:" + name, n)])
        return pool.chunks("aligned:" + name, n)

    size = _write_checkpoint(top / "base", shape, base_data)
    _write_checkpoint(top / "aligned", shape, aligned_data)
    stamp.write_text(json.dumps({**want, "model_bytes": size}, indent=2))
    return Pair(top / "base", top / "aligned", shape, size)


def adapter_config(*, r: int, alpha: float, targets: Sequence[str], base: str | None) -> dict:
    """adapter_config.json with the keys PEFT 0.21 writes for a plain LoRA adapter."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def make_adapters(
    root: str | Path,
    shape: Shape,
    n: int,
    *,
    r: int = 16,
    alpha: float = 32,
    targets: Sequence[str] = TARGETS,
    dtype: str = "f32",
    seed: int = 0,
    base: str | None = None,
) -> list[Path]:
    """Write ``n`` PEFT LoRA adapters ``root/adapter-000 ...`` on ``targets`` (fresh randoms).

    Keys ``base_model.model.<module>.lora_A.weight`` ``[r, d_in]`` and ``lora_B.weight``
    ``[d_out, r]``, B nonzero (a trained adapter), ``{"format": "pt"}`` metadata.
    """
    import torch

    root = Path(root)
    dt, code = _torch_dtype(dtype), DTYPES[dtype][1]
    shapes = dict(weight_shapes(shape))
    out = []
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        d = root / f"adapter-{k:03d}"
        d.mkdir(parents=True, exist_ok=True)
        items = []
        for w in target_weights(shape, targets):
            d_out, d_in = shapes[w]
            mod = "base_model.model." + w.removesuffix(".weight")
            a = (torch.randn(r, d_in, generator=g) / math.sqrt(d_in)).to(dt)
            b = (torch.randn(d_out, r, generator=g) * 0.01).to(dt)
            items += [(f"{mod}.lora_A.weight", (r, d_in), code, a)]
            items += [(f"{mod}.lora_B.weight", (d_out, r), code, b)]
        write_safetensors(d / "adapter_model.safetensors", items)
        cfg = adapter_config(r=r, alpha=alpha, targets=targets, base=base)
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        (d / "README.md").write_text(f"synthetic LoRA adapter {k} for {shape.tag}\n")
        out.append(d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="write the synthetic pairs and adapters of a plan")
    ap.add_argument("plan", type=Path)
    plan = json.loads(ap.parse_args().plan.read_text())
    for p in plan["pairs"]:
        shape = llama_shape(p["width"], p["layers"], dtype=p.get("dtype", "bf16"), vocab=p["vocab"])
        make_pair(plan["root"], shape)
        for d, n in p.get("adapters", []):
            if not all(
                (Path(d) / f"adapter-{k:03d}" / "adapter_config.json").exists() for k in range(n)
            ):
                make_adapters(d, shape, n)
        print(f"ready: {shape.tag}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
