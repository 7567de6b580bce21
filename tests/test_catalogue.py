"""The catalogue of malformed inputs (issue 6): every one is a clean error through the real CLI.

Each case builds a broken input inside a private copy of a tiny world (a Llama pair, a sharded
copy of the base, a PEFT adapter, a projection cache), runs one ``safelora`` command through
typer's CliRunner on :data:`safelora_cli.cli.app`, and asserts:

- the exit code (1 for input/run errors, 2 for usage errors);
- stderr is ``error: ...`` plus at most a few lines, naming the file or weight (``must``
  substrings) and carrying a hint; no traceback and no "internal error" (the CLI's catch-all
  for exceptions that are not SafeLoraError, i.e. bugs);
- nothing was written and no input changed: every file under the world (inputs, caches, any
  existing output) has the same bytes, size, mode and mtime afterwards, and no entry appeared
  or vanished anywhere under it (so no output, no cache and no temporary directory was left).

Pickle cases also check that nothing was unpickled (a pickle that would create a marker file).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from safelora_cli.cli import app
from tests import factory

# ----------------------------------------------------------------------------- the world

ALL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
Q_WEIGHT = "model.layers.0.self_attn.q_proj.weight"


@dataclass
class World:
    """Paths of one private copy of the test inputs (``root`` holds everything)."""

    root: Path
    base: Path
    aligned: Path
    sharded: Path  # the base again, as 3 shards + model.safetensors.index.json
    adapter: Path  # q_proj + v_proj, r=4
    cache: Path  # every 2-D weight of the pair, complete
    cache_q: Path  # q_proj weights only
    other_base: Path  # another model (different seed), same architecture
    other_aligned: Path
    small_adapter: Path  # an adapter trained on a model with another hidden size
    extra: dict[str, Path] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        """Where outputs go (must never appear)."""
        return self.root / "out"

    @property
    def new_cache(self) -> Path:
        return self.root / "new-cache"


def _compute(base: Path, aligned: Path, out: Path, targets: str) -> None:
    from safelora_cli.compute import compute_projections

    compute_projections(str(base), str(aligned), out, targets=targets, device="cpu")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("catalogue") / "world"
    root.mkdir()
    pair = factory.make_pair(root)
    sharded = factory.write_checkpoint(root / "sharded", pair.base, shards=3, config="llama")
    adapter = factory.write_adapter(root / "adapter", base=pair.base)
    _compute(pair.base_dir, pair.aligned_dir, root / "cache", ALL_TARGETS)
    _compute(pair.base_dir, pair.aligned_dir, root / "cache_q", "q_proj")
    other = factory.make_pair(root / "other", seed=7)
    small = factory.llama_weights(hidden=16, intermediate=24, heads=2, kv_heads=1)
    small_adapter = factory.write_adapter(root / "small_adapter", base=small)
    return World(
        root=root,
        base=pair.base_dir,
        aligned=pair.aligned_dir,
        sharded=sharded,
        adapter=adapter,
        cache=root / "cache",
        cache_q=root / "cache_q",
        other_base=other.base_dir,
        other_aligned=other.aligned_dir,
        small_adapter=small_adapter,
    )


@pytest.fixture
def world(pristine: World, tmp_path: Path) -> World:
    """A private copy (mtimes kept, so the caches' source fingerprints still match)."""
    root = tmp_path / "world"
    shutil.copytree(pristine.root, root, symlinks=True)

    def move(p: Path) -> Path:
        return root / p.relative_to(pristine.root)

    return World(
        root=root,
        base=move(pristine.base),
        aligned=move(pristine.aligned),
        sharded=move(pristine.sharded),
        adapter=move(pristine.adapter),
        cache=move(pristine.cache),
        cache_q=move(pristine.cache_q),
        other_base=move(pristine.other_base),
        other_aligned=move(pristine.other_aligned),
        small_adapter=move(pristine.small_adapter),
    )


def snapshot(root: Path) -> dict[str, Any]:
    """Everything under ``root``: per file sha256/size/mode/mtime, symlink targets, directories."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        for name in dirnames:
            p = d / name
            rel = str(p.relative_to(root))
            out[rel] = ("link", os.readlink(p)) if p.is_symlink() else ("dir",)
        for name in filenames:
            p = d / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
                continue
            st = p.stat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[rel] = ("file", digest, st.st_size, st.st_mode, st.st_mtime_ns)
    return out


# ----------------------------------------------------------------------------- helpers


def raw_safetensors(path: Path, header: Any, data: bytes = b"", *, length: int | None = None):
    """Write a safetensors file with an arbitrary header (a dict, or raw bytes)."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + hb + data)


def edit_tensors(path: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load a safetensors file, let ``fn`` edit the dict, write it back (format: pt)."""
    t = load_file(str(path))
    fn(t)
    save_file({k: v.contiguous() for k, v in t.items()}, str(path), metadata={"format": "pt"})


def edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    new = fn(data)
    path.write_text(json.dumps(data if new is None else new, indent=2))


class Evil:
    """A pickle that, if ever unpickled, creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def evil_pickle(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"model.layers.0.self_attn.q_proj.weight": Evil(marker)}, f)


def patch_p(w: World, *extra: Any, adapter: Path | None = None) -> list[str]:
    return ["patch", str(adapter or w.adapter), "-p", str(w.cache), "-o", str(w.out), *extra]


def patch_stream(w: World, base: Path, aligned: Path, *extra: Any) -> list[str]:
    return [
        "patch",
        str(w.adapter),
        "--base",
        str(base),
        "--aligned",
        str(aligned),
        "-o",
        str(w.out),
        *map(str, extra),
    ]


def compute(w: World, base: Any, aligned: Any, *extra: Any) -> list[str]:
    return [
        "compute-projections",
        str(base),
        str(aligned),
        "-o",
        str(w.new_cache),
        "--targets",
        "q_proj",
        "--device",
        "cpu",
        *map(str, extra),
    ]


# ----------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """One malformed input: ``build`` breaks the world and returns the argv."""

    id: str
    build: Callable[[World, pytest.MonkeyPatch], list[str]]
    code: int = 1
    must: tuple[str, ...] = ()  # substrings of stderr (file or weight names, the fix)
    absent: Callable[[World], list[Path]] | None = None  # extra paths that must not exist


CASES: list[Case] = []


def case(id: str, *, code: int = 1, must: tuple[str, ...] = ()) -> Callable[..., Any]:
    def deco(fn: Callable[[World, pytest.MonkeyPatch], list[str]]) -> Any:
        CASES.append(Case(id, fn, code, must))
        return fn

    return deco


# -- checkpoints --------------------------------------------------------------------------------


@case("ckpt-missing-base", must=("does-not-exist", "base model"))
def _(w: World, mp: Any) -> list[str]:
    return compute(w, w.root / "does-not-exist", w.aligned)


@case("ckpt-missing-aligned-streaming", must=("no-such-aligned",))
def _(w: World, mp: Any) -> list[str]:
    return patch_stream(w, w.base, w.root / "no-such-aligned")


@case("ckpt-index-parent-escape", must=("model.safetensors.index.json", "../"))
def _(w: World, mp: Any) -> list[str]:
    (w.root / "outside.safetensors").write_bytes((w.sharded / _shard(w, 0)).read_bytes())
    _rewrite_index(w, lambda s: "../outside.safetensors" if s == _shard(w, 0) else s)
    return compute(w, w.sharded, w.aligned)


@case("ckpt-index-absolute-path", must=("model.safetensors.index.json", "/etc/passwd"))
def _(w: World, mp: Any) -> list[str]:
    _rewrite_index(w, lambda s: "/etc/passwd" if s == _shard(w, 0) else s)
    return compute(w, w.sharded, w.aligned)


@case("ckpt-index-symlink-escape", must=("outside",))
def _(w: World, mp: Any) -> list[str]:
    target = w.root / "outside.safetensors"
    shard = w.sharded / _shard(w, 1)
    target.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(target)
    return compute(w, w.sharded, w.aligned)


@case("ckpt-missing-shard", must=("download or copy the missing shard",))
def _(w: World, mp: Any) -> list[str]:
    (w.sharded / _shard(w, 2)).unlink()
    return compute(w, w.sharded, w.aligned)


@case("ckpt-tensor-in-two-shards", must=(Q_WEIGHT, "both"))
def _(w: World, mp: Any) -> list[str]:
    # A stale shard holds q_proj again (the index still names its shard of record).
    q = load_file(str(w.base / "model.safetensors"))[Q_WEIGHT]
    edit_tensors(w.sharded / _shard(w, 2), lambda t: t.__setitem__(Q_WEIGHT, q))
    return compute(w, w.sharded, w.aligned)


@case("ckpt-index-duplicate-key", must=("model.safetensors.index.json", Q_WEIGHT))
def _(w: World, mp: Any) -> list[str]:
    # JSON keeps the last of two equal keys; the index must not silently pick one shard.
    idx = w.sharded / "model.safetensors.index.json"
    dup = f'"weight_map": {{\n    "{Q_WEIGHT}": "{_shard(w, 2)}",'
    idx.write_text(idx.read_text().replace('"weight_map": {', dup, 1))
    return compute(w, w.sharded, w.aligned)


@case("ckpt-index-lists-absent-tensor", must=("model.layers.9.mlp.up_proj.weight",))
def _(w: World, mp: Any) -> list[str]:
    def add(m: dict[str, str]) -> None:
        m["model.layers.9.mlp.up_proj.weight"] = _shard(w, 0)

    _rewrite_index_map(w, add)
    return compute(w, w.sharded, w.aligned)


@case("ckpt-index-broken-json", must=("model.safetensors.index.json",))
def _(w: World, mp: Any) -> list[str]:
    (w.sharded / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    return compute(w, w.sharded, w.aligned)


@case("ckpt-truncated-data", must=("model.safetensors", "truncated"))
def _(w: World, mp: Any) -> list[str]:
    f = w.aligned / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    return compute(w, w.base, w.aligned)


@case("ckpt-truncated-header", must=("model.safetensors",))
def _(w: World, mp: Any) -> list[str]:
    f = w.base / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:40])
    return compute(w, w.base, w.aligned)


@case("ckpt-too-short", must=("model.safetensors", "too short"))
def _(w: World, mp: Any) -> list[str]:
    (w.base / "model.safetensors").write_bytes(b"\x01\x02")
    return compute(w, w.base, w.aligned)


@case("ckpt-garbage-header", must=("model.safetensors", "JSON"))
def _(w: World, mp: Any) -> list[str]:
    raw_safetensors(w.base / "model.safetensors", b"\xff\xfe garbage {{{ \x00" * 4)
    return compute(w, w.base, w.aligned)


@case("ckpt-oversized-header-length", must=("model.safetensors", "header length"))
def _(w: World, mp: Any) -> list[str]:
    raw_safetensors(w.base / "model.safetensors", b"{}", length=2**62)
    return compute(w, w.base, w.aligned)


@case("ckpt-absurd-shape", must=("model.safetensors", Q_WEIGHT))
def _(w: World, mp: Any) -> list[str]:
    hdr = {Q_WEIGHT: {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}
    raw_safetensors(w.base / "model.safetensors", hdr, b"\x00" * 16)
    return compute(w, w.base, w.aligned)


@case("ckpt-shape-mismatch", must=(Q_WEIGHT, "shape"))
def _(w: World, mp: Any) -> list[str]:
    def shrink(t: dict[str, torch.Tensor]) -> None:
        t[Q_WEIGHT] = t[Q_WEIGHT][:16].clone()

    edit_tensors(w.aligned / "model.safetensors", shrink)
    return compute(w, w.base, w.aligned)


@case("ckpt-dtype-mismatch-int", must=(Q_WEIGHT, "I8"))
def _(w: World, mp: Any) -> list[str]:
    def quantise(t: dict[str, torch.Tensor]) -> None:
        t[Q_WEIGHT] = (t[Q_WEIGHT] * 100).to(torch.int8)

    edit_tensors(w.aligned / "model.safetensors", quantise)
    return compute(w, w.base, w.aligned)


@case("ckpt-nan-in-aligned", must=(Q_WEIGHT, "NaN"))
def _(w: World, mp: Any) -> list[str]:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[Q_WEIGHT][3, 5] = float("nan")

    edit_tensors(w.aligned / "model.safetensors", poison)
    return compute(w, w.base, w.aligned)


@case("ckpt-inf-in-base-streaming", must=(Q_WEIGHT, "Inf"))
def _(w: World, mp: Any) -> list[str]:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[Q_WEIGHT][0, 0] = float("inf")

    edit_tensors(w.base / "model.safetensors", poison)
    return patch_stream(w, w.base, w.aligned)


@case("ckpt-pickle-only", must=("pytorch_model.bin", "safetensors"))
def _(w: World, mp: Any) -> list[str]:
    (w.base / "model.safetensors").unlink()
    evil_pickle(w.base / "pytorch_model.bin", w.root / "PWNED")
    return compute(w, w.base, w.aligned)


@case("ckpt-pickle-file-arg", must=("model.pt", "safetensors"))
def _(w: World, mp: Any) -> list[str]:
    evil_pickle(w.root / "model.pt", w.root / "PWNED")
    return compute(w, w.root / "model.pt", w.aligned)


@case("ckpt-bad-config-json", must=("config.json",))
def _(w: World, mp: Any) -> list[str]:
    (w.base / "config.json").write_text('{"model_type": "llama",,}')
    return compute(w, w.base, w.aligned)


@case("ckpt-target-missing-in-aligned", must=(Q_WEIGHT,))
def _(w: World, mp: Any) -> list[str]:
    edit_tensors(w.aligned / "model.safetensors", lambda t: t.pop(Q_WEIGHT))
    return compute(w, w.base, w.aligned)


# -- hub -----------------------------------------------------------------------------------------


@case("hub-model-not-cached-offline", must=("nobody/no-such-model", "HF_HUB_OFFLINE"))
def _(w: World, mp: Any) -> list[str]:
    return compute(w, "nobody/no-such-model", w.aligned)


@case("hub-adapter-not-cached-offline", must=("nobody/no-such-adapter",))
def _(w: World, mp: Any) -> list[str]:
    return patch_p(w, adapter=Path("nobody/no-such-adapter"))


def cache_repo(repo_id: str, src: Path, *, skip: tuple[str, ...] = ()) -> Path:
    """Lay ``src`` out in the (test's own, empty) HF cache as huggingface_hub does."""
    commit = "c0ffee" * 6 + "c0ff"
    repo = Path(os.environ["HF_HUB_CACHE"]) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.name not in skip:
            blob = repo / "blobs" / f"{commit[:8]}-{f.name}"
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


@case("hub-needed-shard-not-cached-offline", must=("org/sharded", "HF_HUB_OFFLINE"))
def _(w: World, mp: Any) -> list[str]:
    # Index and config cached, but the shard holding layer 0's q_proj is not.
    shard = _index(w)["weight_map"][Q_WEIGHT]
    cache_repo("org/sharded", w.sharded, skip=(shard,))
    return compute(w, "org/sharded", w.aligned)


@case("hub-revision-not-cached-offline", must=("org/cached", "v9"))
def _(w: World, mp: Any) -> list[str]:
    cache_repo("org/cached", w.base)
    return compute(w, "org/cached", w.aligned, "--revision-base", "v9")


@case("hub-repo-with-only-pickles", must=("org/pickles", "safetensors"))
def _(w: World, mp: Any) -> list[str]:
    d = w.root / "pickles"
    d.mkdir()
    evil_pickle(d / "pytorch_model.bin", w.root / "PWNED")
    (d / "config.json").write_text('{"model_type": "llama"}')
    cache_repo("org/pickles", d)
    return compute(w, "org/pickles", w.aligned)


# -- adapters ------------------------------------------------------------------------------------


@case("adapter-missing-dir", must=("no-such-adapter",))
def _(w: World, mp: Any) -> list[str]:
    return patch_p(w, adapter=w.root / "no-such-adapter")


@case("adapter-no-config", must=("adapter_config.json",))
def _(w: World, mp: Any) -> list[str]:
    (w.adapter / "adapter_config.json").unlink()
    return patch_p(w)


@case("adapter-broken-json", must=("adapter_config.json",))
def _(w: World, mp: Any) -> list[str]:
    (w.adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    return patch_p(w)


@case("adapter-config-not-lora", must=("adapter_config.json", "peft_type"))
def _(w: World, mp: Any) -> list[str]:
    edit_json(w.adapter / "adapter_config.json", lambda c: c.__setitem__("peft_type", "IA3"))
    return patch_p(w)


@case("adapter-config-bad-rank", must=("adapter_config.json", "r must be"))
def _(w: World, mp: Any) -> list[str]:
    edit_json(w.adapter / "adapter_config.json", lambda c: c.__setitem__("r", -4))
    return patch_p(w)


@case("adapter-no-weights", must=("adapter_model.safetensors",))
def _(w: World, mp: Any) -> list[str]:
    (w.adapter / "adapter_model.safetensors").unlink()
    return patch_p(w)


@case("adapter-missing-lora-B", must=("lora_A", "lora_B", "v_proj"))
def _(w: World, mp: Any) -> list[str]:
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    edit_tensors(w.adapter / "adapter_model.safetensors", lambda t: t.pop(key))
    return patch_p(w)


@case("adapter-inconsistent-ranks", must=("q_proj", "rank"))
def _(w: World, mp: Any) -> list[str]:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    def cut(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key][:, :3].clone()

    edit_tensors(w.adapter / "adapter_model.safetensors", cut)
    return patch_p(w)


@case("adapter-rank-disagrees-with-config", must=("r = 8",))
def _(w: World, mp: Any) -> list[str]:
    edit_json(w.adapter / "adapter_config.json", lambda c: c.__setitem__("r", 8))
    return patch_p(w)


@case("adapter-shapes-do-not-fit-cache", must=("q_proj",))
def _(w: World, mp: Any) -> list[str]:
    return patch_p(w, adapter=w.small_adapter)


@case("adapter-shapes-do-not-fit-model", must=("q_proj",))
def _(w: World, mp: Any) -> list[str]:
    return [
        "patch",
        str(w.small_adapter),
        "--base",
        str(w.base),
        "--aligned",
        str(w.aligned),
        "-o",
        str(w.out),
    ]


@case("adapter-no-lora-tensors", must=("adapter_model.safetensors", "no LoRA tensors"))
def _(w: World, mp: Any) -> list[str]:
    def strip(t: dict[str, torch.Tensor]) -> None:
        for k in list(t):
            del t[k]
        t["base_model.model.lm_head.weight"] = torch.zeros(4, 4)

    edit_tensors(w.adapter / "adapter_model.safetensors", strip)
    return patch_p(w)


@case("adapter-nan-in-lora-B", must=("v_proj", "NaN"))
def _(w: World, mp: Any) -> list[str]:
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[key][2, 1] = float("nan")

    edit_tensors(w.adapter / "adapter_model.safetensors", poison)
    return patch_p(w)


@case("adapter-inf-in-lora-A-inspect", must=("q_proj", "Inf"))
def _(w: World, mp: Any) -> list[str]:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[key][0, 3] = float("-inf")

    edit_tensors(w.adapter / "adapter_model.safetensors", poison)
    return ["inspect", str(w.adapter), "-p", str(w.cache), "--json"]


@case("adapter-nan-with-save-projections", must=("v_proj", "NaN"))
def _(w: World, mp: Any) -> list[str]:
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    edit_tensors(w.adapter / "adapter_model.safetensors", lambda t: t[key].fill_(float("nan")))
    return [*patch_stream(w, w.base, w.aligned), "--save-projections", str(w.new_cache)]


@case("adapter-garbage-weights", must=("adapter_model.safetensors",))
def _(w: World, mp: Any) -> list[str]:
    (w.adapter / "adapter_model.safetensors").write_bytes(os.urandom(300))
    return patch_p(w)


@case("adapter-evil-pickle-bin", must=("adapter_model.bin", "weights_only"))
def _(w: World, mp: Any) -> list[str]:
    (w.adapter / "adapter_model.safetensors").unlink()
    evil_pickle(w.adapter / "adapter_model.bin", w.root / "PWNED")
    return patch_p(w)


@case("adapter-weights-not-in-base", must=("q_proj",))
def _(w: World, mp: Any) -> list[str]:
    def rename(t: dict[str, torch.Tensor]) -> None:
        for k in list(t):
            t[k.replace("layers.0.", "layers.7.")] = t.pop(k)

    edit_tensors(w.adapter / "adapter_model.safetensors", rename)
    return patch_stream(w, w.base, w.aligned)


@case("adapter-file-symlink-escapes", must=("notes.txt",))
def _(w: World, mp: Any) -> list[str]:
    # A file of the adapter directory links outside it: patch copies every file of the adapter,
    # so following the link would copy (leak) a file the adapter does not contain.
    secret = w.root / "secret.txt"
    secret.write_text("not part of the adapter")
    (w.adapter / "notes.txt").symlink_to(secret)
    return patch_p(w)


@case("adapter-dir-symlink-loop", must=("loop",))
def _(w: World, mp: Any) -> list[str]:
    (w.adapter / "loop").symlink_to(w.adapter, target_is_directory=True)
    return patch_p(w)


@case("adapter-inspect-missing-lora-B", must=("lora_B",))
def _(w: World, mp: Any) -> list[str]:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    edit_tensors(w.adapter / "adapter_model.safetensors", lambda t: t.pop(key))
    return ["inspect", str(w.adapter)]


@case("adapter-inspect-shapes-do-not-fit-cache", must=("q_proj",))
def _(w: World, mp: Any) -> list[str]:
    return ["inspect", str(w.small_adapter), "-p", str(w.cache)]


# -- caches --------------------------------------------------------------------------------------


@case("cache-corrupt-manifest", must=("manifest.json", "compute-projections"))
def _(w: World, mp: Any) -> list[str]:
    (w.cache / "manifest.json").write_text('{"format": "safelora-projection-cache", ')
    return patch_p(w)


@case("cache-manifest-path-escape", must=("manifest.json",))
def _(w: World, mp: Any) -> list[str]:
    def escape(m: dict[str, Any]) -> None:
        m["weights"][Q_WEIGHT]["file"] = "../../adapter/adapter_model.safetensors"

    edit_json(w.cache / "manifest.json", escape)
    return patch_p(w)


@case("cache-missing-dir", must=("no-cache", "compute-projections"))
def _(w: World, mp: Any) -> list[str]:
    return ["patch", str(w.adapter), "-p", str(w.root / "no-cache"), "-o", str(w.out)]


@case("cache-built-from-other-weights", must=("base model", "is not the model it was built from"))
def _(w: World, mp: Any) -> list[str]:
    return [
        "compute-projections",
        str(w.other_base),
        str(w.other_aligned),
        "-o",
        str(w.cache),
        "--targets",
        "q_proj",
        "--device",
        "cpu",
    ]


@case("cache-entries-missing-for-adapter", must=("v_proj", "compute-projections"))
def _(w: World, mp: Any) -> list[str]:
    return ["patch", str(w.adapter), "-p", str(w.cache_q), "-o", str(w.out)]


@case("cache-interrupted", must=("incomplete", "compute-projections"))
def _(w: World, mp: Any) -> list[str]:
    edit_json(w.cache / "manifest.json", lambda m: m.__setitem__("state", "in_progress"))
    return patch_p(w)


@case("cache-entry-file-truncated", must=(Q_WEIGHT.removesuffix(".weight"),))
def _(w: World, mp: Any) -> list[str]:
    m = json.loads((w.cache / "manifest.json").read_text())
    f = w.cache / m["weights"][Q_WEIGHT]["file"]
    f.write_bytes(f.read_bytes()[:-64])
    return patch_p(w)


@case("cache-entry-file-missing", must=(Q_WEIGHT.removesuffix(".weight"),))
def _(w: World, mp: Any) -> list[str]:
    m = json.loads((w.cache / "manifest.json").read_text())
    (w.cache / m["weights"][Q_WEIGHT]["file"]).unlink()
    return patch_p(w)


@case("cache-corrupt-manifest-inspect", must=("manifest.json",))
def _(w: World, mp: Any) -> list[str]:
    (w.cache / "manifest.json").write_bytes(b"\x00\xff not json")
    return ["inspect", "-p", str(w.cache)]


@case("cache-future-format-version", must=("format version", "upgrade"))
def _(w: World, mp: Any) -> list[str]:
    edit_json(w.cache / "manifest.json", lambda m: m.__setitem__("format_version", 99))
    return patch_p(w)


# -- output --------------------------------------------------------------------------------------


@case("output-exists", must=("already exists", "--force"))
def _(w: World, mp: Any) -> list[str]:
    w.out.mkdir()
    (w.out / "keep.txt").write_text("mine")
    return patch_p(w)


@case("output-equals-input", must=("input",))
def _(w: World, mp: Any) -> list[str]:
    return ["patch", str(w.adapter), "-p", str(w.cache), "-o", str(w.adapter), "--force"]


@case("output-inside-input", must=("input",))
def _(w: World, mp: Any) -> list[str]:
    return ["patch", str(w.adapter), "-p", str(w.cache), "-o", str(w.adapter / "sub")]


@case("output-force-unrelated-dir", must=("not an adapter directory",))
def _(w: World, mp: Any) -> list[str]:
    w.out.mkdir()
    (w.out / "thesis.tex").write_text("precious")
    return patch_p(w, "--force")


@case("output-under-regular-file", must=("a-file", "not a directory"))
def _(w: World, mp: Any) -> list[str]:
    (w.root / "a-file").write_text("x")
    return ["patch", str(w.adapter), "-p", str(w.cache), "-o", str(w.root / "a-file" / "out")]


@case("output-not-writable", must=("Permission denied",))
def _(w: World, mp: Any) -> list[str]:
    def deny(path: Any, *a: Any, **k: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    mp.setattr(os, "mkdir", deny)  # the staging directory beside the output cannot be made
    return patch_p(w)


@case("output-disk-full-patch", must=("No space left", "disk space", "out"))
def _(w: World, mp: Any) -> list[str]:
    _fail_fsync(mp, after=1)
    return patch_p(w)


@case("output-disk-full-compute", must=("No space left", "disk space", "new-cache"))
def _(w: World, mp: Any) -> list[str]:
    _fail_fsync(mp, after=3)
    return compute(w, w.base, w.aligned)


@case("output-cache-under-regular-file", must=("a-file", "not a directory"))
def _(w: World, mp: Any) -> list[str]:
    (w.root / "a-file").write_text("x")
    argv = compute(w, w.base, w.aligned)
    argv[argv.index("-o") + 1] = str(w.root / "a-file" / "cache")
    return argv


@case("output-cache-is-unrelated-dir", must=("not a projection cache",))
def _(w: World, mp: Any) -> list[str]:
    w.new_cache.mkdir()
    (w.new_cache / "notes.txt").write_text("mine")
    return compute(w, w.base, w.aligned)


@case("output-equals-cache", must=("cache",))
def _(w: World, mp: Any) -> list[str]:
    return ["patch", str(w.adapter), "-p", str(w.cache), "-o", str(w.cache), "--force"]


@case("output-inside-cache", must=("cache",))
def _(w: World, mp: Any) -> list[str]:
    return ["patch", str(w.adapter), "-p", str(w.cache), "-o", str(w.cache / "patched")]


@case("output-inside-base-model", must=("base",))
def _(w: World, mp: Any) -> list[str]:
    return [*patch_stream(w, w.base, w.aligned)[:-1], str(w.base / "patched")]


@case("output-cache-is-base-model", must=("base",))
def _(w: World, mp: Any) -> list[str]:
    argv = compute(w, w.base, w.aligned)
    argv[argv.index("-o") + 1] = str(w.base)
    return argv


# -- flags ---------------------------------------------------------------------------------------


@case("flags-cache-and-models", code=2, must=("--projections", "--base"))
def _(w: World, mp: Any) -> list[str]:
    return patch_p(w, "--base", str(w.base), "--aligned", str(w.aligned))


@case("flags-two-selections", code=2, must=("--num-layers", "--threshold"))
def _(w: World, mp: Any) -> list[str]:
    return patch_p(w, "-k", "2", "-t", "0.5")


@case("flags-num-layers-zero", code=2, must=("--num-layers",))
def _(w: World, mp: Any) -> list[str]:
    return patch_p(w, "--num-layers", "0")


@case("flags-fraction-above-one", code=2, must=("--fraction",))
def _(w: World, mp: Any) -> list[str]:
    return patch_p(w, "--fraction", "1.5")


@case("flags-threshold-nan", code=2, must=("--threshold",))
def _(w: World, mp: Any) -> list[str]:
    return patch_p(w, "--threshold", "nan")


@case("flags-bad-device", code=2, must=("--device", "tpu"))
def _(w: World, mp: Any) -> list[str]:
    return patch_p(w, "--device", "tpu")


@case("flags-device-not-present", code=2, must=("cuda:99",))
def _(w: World, mp: Any) -> list[str]:
    return patch_p(w, "--device", "cuda:99")


@case("flags-base-without-aligned", code=2, must=("--aligned",))
def _(w: World, mp: Any) -> list[str]:
    return ["patch", str(w.adapter), "--base", str(w.base), "-o", str(w.out)]


@case("flags-no-projector-source", code=2, must=("-p",))
def _(w: World, mp: Any) -> list[str]:
    return ["patch", str(w.adapter), "-o", str(w.out)]


@case("flags-compute-nothing-to-do", code=2, must=("--adapter", "--targets"))
def _(w: World, mp: Any) -> list[str]:
    return [
        "compute-projections",
        str(w.base),
        str(w.aligned),
        "-o",
        str(w.new_cache),
        "--device",
        "cpu",
    ]


@case("flags-revision-with-cache", code=2, must=("--revision-base",))
def _(w: World, mp: Any) -> list[str]:
    return patch_p(w, "--revision-base", "main")


@case("flags-revision-on-local-path", must=("--revision", "local path"))
def _(w: World, mp: Any) -> list[str]:
    return compute(w, w.base, w.aligned, "--revision-base", "v1")


@case("flags-save-projections-with-cache", code=2, must=("--save-projections",))
def _(w: World, mp: Any) -> list[str]:
    return patch_p(w, "--save-projections", str(w.new_cache))


@case("flags-same-adapter-twice", code=2, must=("adapter",))
def _(w: World, mp: Any) -> list[str]:
    return ["patch", str(w.adapter), str(w.adapter), "-p", str(w.cache), "-o", str(w.out)]


@case("flags-unknown-option", code=2, must=("--bogus",))
def _(w: World, mp: Any) -> list[str]:
    return patch_p(w, "--bogus")


@case("flags-fail-below-out-of-range", code=2, must=("--fail-below",))
def _(w: World, mp: Any) -> list[str]:
    return ["inspect", str(w.adapter), "-p", str(w.cache), "--fail-below", "7"]


@case("flags-bad-targets-regex", code=2, must=("--targets",))
def _(w: World, mp: Any) -> list[str]:
    argv = compute(w, w.base, w.aligned)
    argv[argv.index("--targets") + 1] = "^model\\.(q_proj"
    return argv


# ----------------------------------------------------------------------------- case helpers


def _index(w: World) -> dict[str, Any]:
    return json.loads((w.sharded / "model.safetensors.index.json").read_text())


def _shard(w: World, k: int) -> str:
    return sorted(set(_index(w)["weight_map"].values()))[k]


def _rewrite_index(w: World, fn: Callable[[str], str]) -> None:
    idx = _index(w)
    idx["weight_map"] = {n: fn(s) for n, s in idx["weight_map"].items()}
    (w.sharded / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))


def _rewrite_index_map(w: World, fn: Callable[[dict[str, str]], Any]) -> None:
    idx = _index(w)
    fn(idx["weight_map"])
    (w.sharded / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))


def _fail_fsync(mp: pytest.MonkeyPatch, *, after: int) -> None:
    """``os.fsync`` succeeds ``after`` times, then fails with ENOSPC (a full disk)."""
    real = os.fsync
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    mp.setattr(os, "fsync", fsync)


# ----------------------------------------------------------------------------- the test


def test_catalogue_is_large_enough() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_a_clean_error(
    c: Case, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = c.build(world, monkeypatch)
    before = snapshot(world.root)
    r = CliRunner().invoke(app, argv)
    monkeypatch.undo()  # restore os.fsync & co. before inspecting the filesystem
    after = snapshot(world.root)
    err = r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"unhandled {r.exception!r}\n{err}"
    )
    assert r.exit_code == c.code, f"exit {r.exit_code}, want {c.code}\n{err}"
    assert "Traceback" not in err and "Traceback" not in r.stdout
    assert "internal error" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 5, err
    assert any(ln.startswith("error:") or ln.startswith("Error:") for ln in lines), err
    if c.code == 1:
        assert len(lines) >= 2, f"no hint line:\n{err}"
    for s in c.must:
        assert s in err, f"{s!r} not in stderr:\n{err}"
    assert r.stdout == "" or c.code == 2, r.stdout
    assert after == before, _diff(before, after)
    assert not (world.root / "PWNED").exists(), "a pickle was executed"


def _diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    added = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"added {added}, removed {gone}, changed {changed}"


def test_closed_stdout_pipe_ends_quietly(pristine: World) -> None:
    """``safelora inspect ... | head``: the reader goes away; no traceback, no error noise."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SAFELORA_DEBUG", None)
    argv = ["inspect", str(pristine.adapter), "-p", str(pristine.cache)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "safelora_cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child's first write: every write hits EPIPE
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert err == ""
    assert code == 141  # what a shell reports for a command ended by a closed pipe
