"""The full-load way: how the official Safe LoRA code works, as a short script.

Usage: ``python bench/full_load.py BASE_DIR ALIGNED_DIR ADAPTER_DIR... -o OUT
[--targets q_proj,v_proj] [--num-layers 10] [--stats S.json]``

Like the official implementation (``SafeLoRA.get_aligned_matrix`` / ``projected_weighted``), it
holds both models whole in memory (every shard through ``safetensors.torch.load_file``), builds
every projector ``C = V V^T / ||V||_F`` up front and keeps them all in a list, then for each
adapter forms the dense ``d_out x d_in`` products ``C B A`` and ``B A`` for the cosine, rounds it to
5 decimals, projects the ``--num-layers`` lowest (``B' = C B``) and writes the new adapter.

It is generous to the official code: the official code loads both models with
``AutoModelForCausalLM.from_pretrained`` in its default float32 (twice the RAM of a bf16
checkpoint) and keeps the projectors on the model's device; this script keeps the checkpoint
dtype and uses no transformers model objects.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import procstats
import torch
from safetensors.torch import load_file, save_file


def load_whole(d: Path) -> tuple[dict[str, torch.Tensor], int]:
    idx = d / "model.safetensors.index.json"
    files = (
        sorted({d / f for f in json.loads(idx.read_text())["weight_map"].values()})
        if idx.exists()
        else [d / "model.safetensors"]
    )
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    # Touch every tensor once: a load that only maps pages would not be "in RAM".
    nbytes = 0
    for t in sd.values():
        if t.numel():
            t.view(-1)[:: max(1, 4096 // t.element_size())].sum()
        nbytes += t.nbytes
    return sd, nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=Path)
    ap.add_argument("aligned", type=Path)
    ap.add_argument("adapters", type=Path, nargs="+")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--num-layers", type=int, default=10)
    ap.add_argument("--stats")
    a = ap.parse_args()
    t0 = time.perf_counter()
    base, nb = load_whole(a.base)
    aligned, na = load_whole(a.aligned)
    suffixes = tuple(f".{t}.weight" for t in a.targets.split(","))
    projectors: dict[str, torch.Tensor] = {}
    for name, wb in base.items():
        if name.endswith(suffixes):
            v = aligned[name].float() - wb.float()
            projectors[name] = (v @ v.T) / torch.linalg.vector_norm(v)
    cache_bytes = sum(p.nbytes for p in projectors.values())
    read = nb + na
    t_proj = time.perf_counter() - t0
    many = len(a.adapters) > 1
    for ad in a.adapters:
        f = ad / "adapter_model.safetensors"
        lora = load_file(f)
        read += f.stat().st_size
        cos: dict[str, float] = {}
        new_b: dict[str, torch.Tensor] = {}
        for key in lora:
            if not key.endswith(".lora_B.weight"):
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
            b, aa = lora[key].float(), lora[key.replace("lora_B", "lora_A")].float()
            c = projectors[module + ".weight"]
            cb = c @ b
            fw, ori = (cb @ aa).reshape(1, -1), (b @ aa).reshape(1, -1)
            cos[key] = round(float(torch.nn.functional.cosine_similarity(fw, ori)), 5)
            new_b[key] = cb.to(lora[key].dtype)
        k = min(a.num_layers, len(cos))
        thr = sorted(cos.values())[k - 1] if k else float("-inf")
        out_sd = dict(lora)
        for key, c in cos.items():
            if c <= thr:
                out_sd[key] = new_b[key]
        out = a.output / ad.name if many else a.output
        out.mkdir(parents=True, exist_ok=True)
        for extra in ad.iterdir():
            if extra.is_file() and extra.name != "adapter_model.safetensors":
                shutil.copy2(extra, out / extra.name)
        save_file(out_sd, out / "adapter_model.safetensors", metadata={"format": "pt"})
    procstats.dump(
        a.stats,
        bytes_read=read,
        cache_bytes=cache_bytes,
        weights=len(projectors),
        projectors_s=t_proj,
        in_process_s=time.perf_counter() - t0,
    )


if __name__ == "__main__":
    main()
