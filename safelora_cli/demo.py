"""``make demo``: a tiny synthetic base/aligned pair and two adapters, end to end, offline.

Writes everything under ``demo/`` (git-ignored) and runs the real command line on it:
compute-projections, inspect, then patch with both adapters in one call, then patch-model on a
tiny full fine-tune of the aligned model (``demo/finetuned``) with the same cache.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

LAYERS = 4
HIDDEN = 64
KV = 32  # grouped-query attention: k/v narrower than q
INTER = 96
RANK = 4


def _linear_shapes() -> dict[str, tuple[int, int]]:
    """Llama-style linear weights ``[d_out, d_in]`` of the tiny model."""
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes[f"{p}.self_attn.q_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}.self_attn.k_proj.weight"] = (KV, HIDDEN)
        shapes[f"{p}.self_attn.v_proj.weight"] = (KV, HIDDEN)
        shapes[f"{p}.self_attn.o_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}.mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}.mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}.mlp.down_proj.weight"] = (HIDDEN, INTER)
    return shapes


def build(root: Path) -> dict[str, Path]:
    """Write the tiny pair, a full fine-tune and two adapters under ``root``; return paths."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(128, HIDDEN, generator=g)
    }
    for name, shape in _linear_shapes().items():
        base[name] = torch.randn(*shape, generator=g) / HIDDEN**0.5
    for i in range(LAYERS):
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN)
    base["model.norm.weight"] = torch.ones(HIDDEN)
    # The aligned sibling differs by a low-rank "alignment" update per weight.
    aligned = {}
    for name, w in base.items():
        if w.dim() == 2 and "layers" in name:
            u = torch.randn(w.shape[0], 2, generator=g)
            v = torch.randn(2, w.shape[1], generator=g)
            aligned[name] = w + 0.05 * (u @ v) / HIDDEN**0.5
        else:
            aligned[name] = w.clone()
    # A full fine-tune of the aligned model: dense noise on every weight (patch-model's input).
    # Its own generator: the adapters below stay what they were before it existed.
    g_ft = torch.Generator().manual_seed(1)
    finetuned = {
        name: w + 0.01 * torch.randn(w.shape, generator=g_ft) / HIDDEN**0.5
        for name, w in aligned.items()
    }
    config = {"model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS}
    paths = {"base": root / "base", "aligned": root / "aligned", "finetuned": root / "finetuned"}
    for key, tensors in (("base", base), ("aligned", aligned), ("finetuned", finetuned)):
        paths[key].mkdir(parents=True)
        save_file(
            {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
            str(paths[key] / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (paths[key] / "config.json").write_text(json.dumps(config, indent=2))
    (paths["finetuned"] / "README.md").write_text(
        "# finetuned\nA tiny synthetic full fine-tune of demo/aligned.\n"
    )

    # Two adapters on q_proj and v_proj. "benign" keeps most updates inside the alignment
    # directions; "drifted" is random, so many of its modules leave the subspace.
    for adapter, inside in (("benign-chat", 0.9), ("drifted-chat", 0.0)):
        tensors = {}
        for i in range(LAYERS):
            for mod in ("q_proj", "v_proj"):
                w = f"model.layers.{i}.self_attn.{mod}.weight"
                d_out, d_in = base[w].shape
                delta = aligned[w] - base[w]
                u, _, _ = torch.linalg.svd(delta, full_matrices=False)
                b_in = u[:, :RANK] @ torch.randn(RANK, RANK, generator=g)
                b_out = torch.randn(d_out, RANK, generator=g)
                mix = inside if (i + (mod == "v_proj")) % 3 else inside / 3
                key = f"base_model.model.model.layers.{i}.self_attn.{mod}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, d_in, generator=g) / d_in**0.5
                tensors[f"{key}.lora_B.weight"] = (mix * b_in + (1 - mix) * b_out) * 0.01
        d = root / "adapters" / adapter
        d.mkdir(parents=True)
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(paths["aligned"]),
            "r": RANK,
            "lora_alpha": 2 * RANK,
            "lora_dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"],
            "fan_in_fan_out": False,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        (d / "README.md").write_text(f"# {adapter}\nA tiny synthetic LoRA adapter for the demo.\n")
        paths[adapter] = d
    return paths


def _run(step: str, args: list[str]) -> bool:
    """Run one ``safelora`` command, echoing it; False when the subcommand is missing."""
    print(f"\n=== {step}\n$ safelora {' '.join(args)}", flush=True)
    out = subprocess.run([sys.executable, "-m", "safelora_cli", *args], text=True)
    if out.returncode != 0:
        print(f"(step '{step}' exited {out.returncode})", flush=True)
    return out.returncode == 0


def main() -> None:
    """Build the demo under ./demo and run the three subcommands on it."""
    root = Path("demo")
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    print("Building a tiny bf16 base/aligned pair (4 layers, GQA) and two adapters in demo/ ...")
    p = build(root)
    a, b = str(p["benign-chat"]), str(p["drifted-chat"])
    cache = str(root / "cache")
    ok = _run(
        "1. compute the projectors the two adapters need",
        [
            "compute-projections",
            str(p["base"]),
            str(p["aligned"]),
            "-o",
            cache,
            "--adapter",
            a,
            "--adapter",
            b,
        ],
    )
    ok &= _run("2. what the cache holds", ["inspect", "-p", cache])
    ok &= _run(
        "3. how far each module of the drifted adapter left the alignment subspace",
        ["inspect", b, "-p", cache, "--num-layers", "3", "--sort", "cosine"],
    )
    ok &= _run(
        "4. patch both adapters in one call (3 lowest-cosine modules each)",
        ["patch", a, b, "-p", cache, "--num-layers", "3", "-o", str(root / "patched")],
    )
    ok &= _run(
        "5. patch a full fine-tune of the aligned model (patch-model, same cache)",
        [
            "patch-model",
            str(p["finetuned"]),
            "--aligned",
            str(p["aligned"]),
            "-p",
            cache,
            "--targets",
            "q_proj,v_proj",
            "--num-layers",
            "3",
            "-o",
            str(root / "patched-model"),
        ],
    )
    print(f"\nDone in {time.perf_counter() - t0:.1f} s.")
    print(f"  inputs:       {root}/base, {root}/aligned, {root}/adapters/*")
    print(f"  cache:        {cache}")
    print(
        f"  new adapters: {root}/patched/benign-chat, {root}/patched/drifted-chat "
        "(each with safelora_report.json)"
    )
    print(f"  new model:    {root}/patched-model (from {root}/finetuned)")
    if not ok:
        print("Some steps failed (see above).", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
