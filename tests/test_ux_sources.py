"""What a new user runs into with sources (issue 18, items 2, 3, 4 and 9).

- Local path first: a mistyped path with a slash is named as a missing path before anything
  the Hub said (offline and online), with the closest existing name.
- The ``.bin`` hint works: its command, run literally in a shell on transformers-format pickles
  (single file, sharded with an index, tied embeddings, another file name), gives a
  checkpoint safelora reads with the same key names and values as the pickle.
- Cache identity by content: a byte-identical copy of the models is accepted (its tensors are
  checked against the digests recorded per entry); content that differs is refused naming both
  models and what differs in words; caches of older versions (mtime fingerprints) are still
  read when their files are untouched and refused with a rebuild hint otherwise.
- Wrong kind of input: an adapter or a cache given as a model, a cache or a model given as an
  adapter, is named as such. Swapping BASE and ALIGNED gives the same projector (checked
  against a float64 oracle).

Every refusal: exit 1, ``error: ...`` on one line plus a hint line, no traceback, nothing
written, inputs byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from safelora_cli.cache import MANIFEST, ProjectionCache
from safelora_cli.cli import app
from safelora_cli.compute import compute_projections
from safelora_cli.errors import CacheError, CheckpointError, SourceError
from safelora_cli.reader import convert_command
from safelora_cli.sources import SourceSpec, input_kind, open_model, resolve_adapter
from tests import factory

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"


def cli(*args: str):
    return runner.invoke(app, list(args))


def tree(root: Path) -> dict[str, tuple]:
    """Every file under ``root``: sha256, size, mtime (so "unchanged" means unchanged)."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            st = p.stat()
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
        else:
            out[rel] = ("dir",)
    return out


def refused(r, *words: str) -> str:
    """Assert a clean exit-1 refusal (one message line + one hint line); return the message."""
    assert r.exit_code == 1, (r.exit_code, r.stderr, r.stdout)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("  ")
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with models/{base,aligned}, adapters/qkv and a cache (cwd)."""
    pair = factory.make_pair(tmp_path / "models", layers=2)
    factory.write_adapter(tmp_path / "adapters" / "qkv", base=pair.base)
    compute_projections(
        str(pair.base_dir), str(pair.aligned_dir), tmp_path / "cache", targets="q_proj,v_proj"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------- 2. local first


def test_mistyped_adapter_path_is_named_before_the_hub(demo: Path) -> None:
    before = tree(demo)
    r = cli("patch", "adapters/qvv", "-p", "cache", "-o", "out")
    msg = refused(r, "adapter: no local path adapters/qvv (adapters/ has no qvv)", "Hub")
    assert msg.index("no local path") < msg.index("Hub")
    assert "HF_HUB_OFFLINE" in msg  # what was tried on the Hub, after the path
    assert "did you mean adapters/qkv?" in r.stderr.splitlines()[1]
    assert tree(demo) == before and not (demo / "out").exists()


def test_mistyped_model_path_is_named_before_the_hub(demo: Path) -> None:
    before = tree(demo)
    r = cli("compute-projections", "models/bsae", "models/aligned", "-o", "c2", "--targets", "q")
    msg = refused(r, "base model: no local path models/bsae (models/ has no bsae); as a Hub id:")
    assert "did you mean models/base?" in r.stderr
    assert msg.index("no local path") < msg.index("Hub repo models/bsae")
    # A path whose parent is missing too names the first missing part.
    r = cli("inspect", "nowhere/x", "-p", "cache")
    refused(r, "adapter: no local path nowhere/x (the current directory has no nowhere)")
    assert tree(demo) == before and not (demo / "c2").exists()


def test_local_first_also_online(demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online, with a Hub that cannot be reached (a closed port on 127.0.0.1)."""
    import huggingface_hub.constants as hc

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(SourceError) as ei:
        resolve_adapter("adapters/qvv")
    assert ei.value.message.startswith("adapter: no local path adapters/qvv (adapters/ has no")
    assert "; as a Hub id: " in ei.value.message
    assert ei.value.hint.startswith("did you mean adapters/qkv? for a Hub repo:")
    with pytest.raises(SourceError) as ei:
        open_model("models/alinged", label="aligned model")
    assert ei.value.message.startswith("aligned model: no local path models/alinged")
    assert "did you mean models/aligned?" in ei.value.hint


def test_missing_path_that_is_no_hub_id_gets_a_guess(demo: Path) -> None:
    r = cli("inspect", "adapters/qkv/", "-p", "cache")  # a trailing slash is fine (exists)
    assert r.exit_code == 0, r.stderr
    r = cli("inspect", "adapters/q kv", "-p", "cache")
    refused(r, "'adapters/q kv' does not exist (adapters/ has no q kv)")
    assert "did you mean adapters/qkv?" in r.stderr


# ----------------------------------------------------------------------------- 3. .bin hint


def _pickled_model(d: Path, *, tied: bool, shard: str | None) -> dict[str, torch.Tensor]:
    """A tiny random LlamaForCausalLM saved pickled, as transformers 4 wrote it.

    ``save_pretrained(safe_serialization=False)``; transformers >= 5 ignores the flag and
    writes safetensors, so then the pickles are written the way transformers 4 did: the full
    state dict (tied tensors share storage) through torch.save, split with huggingface_hub's
    ``split_torch_state_dict_into_shards`` (``pytorch_model-0000k-of-0000n.bin`` plus
    ``pytorch_model.bin.index.json``) when ``shard`` (a max shard size) is given.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(d, safe_serialization=False, **kw)
    if not list(d.glob("*.bin")):
        for f in [*d.glob("*.safetensors"), *d.glob("*.safetensors.index.json")]:
            f.unlink()
        sd = model.state_dict()
        split = split_torch_state_dict_into_shards(
            sd, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=shard or "10GB"
        )
        for fname, names in split.filename_to_tensors.items():
            torch.save({n: sd[n] for n in names}, d / fname)
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.bin")):
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    assert "lm_head.weight" in state and "model.embed_tokens.weight" in state
    return state


def _run_literally(hint: str, cwd: Path) -> None:
    """Run the command a hint suggests exactly as printed, in a shell whose python is ours."""
    cmd = hint[hint.index("python -c ") :]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("PYTHONPATH", None)  # the command needs only torch and safetensors
    r = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("tied", "shard"),
    [(True, None), (False, "20KB")],
    # Tied: lm_head shares the embedding's storage in one pickle (safetensors refuses shared
    # tensors unless copied). Each case starts a python with torch: kept to two.
    ids=["single-tied", "sharded"],
)
def test_bin_hint_converts_keeping_key_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tied: bool, shard: str | None
) -> None:
    d = tmp_path / "my model"  # a space: the printed command must quote the path
    state = _pickled_model(d, tied=tied, shard=shard)
    if shard:
        assert (d / "pytorch_model.bin.index.json").is_file()
    before = tree(d)
    monkeypatch.chdir(tmp_path)
    r = cli("compute-projections", "my model", "my model", "-o", "c", "--targets", "q_proj")
    refused(r, "pytorch_model", "pickled")
    hint = r.stderr.splitlines()[1].strip()
    assert "AutoModel" not in hint and "python -c " in hint
    assert tree(d) == before and not (tmp_path / "c").exists()

    _run_literally(hint, tmp_path)
    reader, _ = open_model(str(d), label="base model")
    with reader:
        assert set(reader.names()) == set(state)  # same key names: model. prefix, lm_head
        for k, v in state.items():
            assert torch.equal(reader.load(k), v), k
    # The .bin files are untouched; the new ones sit beside them.
    assert all(tree(d)[k] == v for k, v in before.items())
    if shard:
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(state)
        assert len(set(index["weight_map"].values())) > 1
    r = cli("compute-projections", "my model", "my model", "-o", "c", "--targets", "q_proj")
    assert r.exit_code == 0, r.stderr  # accepted (V = 0 here: degenerate, still cached)


def test_bin_hint_for_another_file_name(tmp_path: Path) -> None:
    f = tmp_path / "weights.pt"
    state = {"model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8)}
    state["lm_head.weight"] = state["model.layers.0.self_attn.q_proj.weight"][:, :4]  # a view
    torch.save(state, f)
    with pytest.raises(CheckpointError) as ei:
        open_model(str(f), label="base model")
    assert "weights.pt" in ei.value.message
    _run_literally(ei.value.hint, tmp_path)
    reader, _ = open_model(str(tmp_path / "weights.safetensors"), label="base model")
    with reader:
        assert set(reader.names()) == set(state)
        assert all(torch.equal(reader.load(k), v) for k, v in state.items())


def test_errors_page_shows_the_conversion_command() -> None:
    """The docs give the very command the hint prints (they cannot go stale)."""
    page = (ROOT / "docs" / "errors.md").read_text()
    assert convert_command(Path("DIR")) in page


# ----------------------------------------------------------------------------- 4. identity


def _entry_sha(model: Path, weight: str) -> str:
    """SHA-256 of ``weight``'s bytes in ``model``, located from the header by hand."""
    for f in sorted(model.glob("*.safetensors")):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        if weight in header:
            b, e = header[weight]["data_offsets"]
            return hashlib.sha256(raw[8 + n + b : 8 + n + e]).hexdigest()
    raise KeyError(weight)


def test_byte_identical_copy_is_accepted(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path / "orig", layers=2, shards=2)
    cache = tmp_path / "cache"
    compute_projections(str(pair.base_dir), str(pair.aligned_dir), cache, targets="q_proj")
    m = json.loads((cache / MANIFEST).read_text())
    for w, e in m["weights"].items():
        assert e["source_sha256"] == {
            "base": _entry_sha(pair.base_dir, w),
            "aligned": _entry_sha(pair.aligned_dir, w),
        }
    # cp -r: same bytes, new mtimes, another path.
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "orig", copy, copy_function=shutil.copyfile)
    assert (copy / "base" / "model-00001-of-00002.safetensors").stat().st_mtime_ns != (
        pair.base_dir / "model-00001-of-00002.safetensors"
    ).stat().st_mtime_ns
    cb, ca = str(copy / "base"), str(copy / "aligned")
    s = compute_projections(cb, ca, cache, targets="q_proj,v_proj")
    assert s.skipped == 2 and s.computed == 2
    # The two cached entries were checked against the copy: their tensors were read.
    q_bytes = 2 * sum(pair.base[w].numel() * 4 for w in pair.base if w.endswith("q_proj.weight"))
    v_bytes = 2 * sum(pair.base[w].numel() * 4 for w in pair.base if w.endswith("v_proj.weight"))
    assert s.bytes_read == q_bytes + v_bytes
    # From the very files recorded: nothing is read again.
    s = compute_projections(cb, ca, cache, targets="q_proj,v_proj")
    assert s.computed == 0 and s.bytes_read == 0
    r = cli("compute-projections", cb, ca, "-o", str(cache), "--targets", "q_proj,v_proj")
    assert r.exit_code == 0, r.stderr


def _changed_copy(src: Path, dst: Path, weight: str) -> None:
    """``src`` copied to ``dst`` with ``weight``'s values changed (same header, same size)."""
    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        raw = bytearray(f.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        if weight not in header:
            continue
        b, _ = header[weight]["data_offsets"]
        raw[8 + n + b] ^= 0x01  # one bit of the first element
        f.write_bytes(bytes(raw))


def test_other_values_same_layout_is_refused_in_words(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path, layers=2)
    cache = tmp_path / "cache"
    compute_projections(str(pair.base_dir), str(pair.aligned_dir), cache, targets="q_proj")
    other = tmp_path / "aligned-2"
    _changed_copy(pair.aligned_dir, other, Q0)
    before_cache, before_in = tree(cache), tree(tmp_path / "aligned-2")
    r = cli(
        "compute-projections",
        str(pair.base_dir),
        str(other),
        "-o",
        str(cache),
        "--targets",
        "v_proj",
    )
    msg = refused(
        r,
        f"the aligned model {other} is not the model it was built from ({pair.aligned_dir})",
        f"{Q0} has other values",
    )
    assert "mtime" not in msg and "!=" not in msg
    assert f"pass the aligned model the cache was built from ({pair.aligned_dir})" in r.stderr
    assert "-o NEW_DIR" in r.stderr
    assert tree(cache) == before_cache and tree(other) == before_in
    # The hint works: a new cache elsewhere.
    r = cli(
        "compute-projections", str(pair.base_dir), str(other), "-o", str(tmp_path / "new"),
        "--targets", "q_proj",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    # A weight the cache does not hold may differ: the cache does not depend on it.
    third = tmp_path / "aligned-3"
    _changed_copy(pair.aligned_dir, third, V1)
    r = cli(
        "compute-projections",
        str(pair.base_dir),
        str(third),
        "-o",
        str(cache),
        "--targets",
        "q_proj",
    )
    assert r.exit_code == 0, r.stderr


def test_other_header_is_refused_naming_the_shard(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path / "p", layers=2, shards=2)
    cache = tmp_path / "cache"
    compute_projections(str(pair.base_dir), str(pair.aligned_dir), cache, targets="q_proj")
    before = tree(cache)
    # The same model re-saved in another dtype: same names, other headers and sizes.
    half = factory.write_checkpoint(
        tmp_path / "half", pair.aligned, shards=2, dtype=torch.float16, config="llama"
    )
    r = cli(
        "compute-projections",
        str(pair.base_dir),
        str(half),
        "-o",
        str(cache),
        "--targets",
        "q_proj",
    )
    refused(
        r,
        f"the aligned model {half} is not the model it was built from ({pair.aligned_dir})",
        "its shard model-00001-of-00002.safetensors has another size",
        "its tensors changed",
    )
    # Same sizes, another header (a tensor renamed to a name of the same length).
    renamed = {
        ("model.layers.0.mlp.up_proj.weighX" if k == UP0 else k): v for k, v in pair.aligned.items()
    }
    ren = factory.write_checkpoint(tmp_path / "ren", renamed, shards=2, config="llama")
    r = cli(
        "compute-projections", str(pair.base_dir), str(ren), "-o", str(cache), "--targets", "q_proj"
    )
    refused(r, "model-00001-of-00002.safetensors has a different header (its tensors changed)")
    # Re-sharded: the shards' names differ.
    three = factory.write_checkpoint(tmp_path / "three", pair.aligned, shards=3, config="llama")
    r = cli(
        "compute-projections",
        str(pair.base_dir),
        str(three),
        "-o",
        str(cache),
        "--targets",
        "q_proj",
    )
    refused(r, "its shard model-00001-of-00002.safetensors is missing")
    assert tree(cache) == before


def test_model_changed_in_place_is_refused(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path, layers=2)
    cache = tmp_path / "cache"
    compute_projections(str(pair.base_dir), str(pair.aligned_dir), cache, targets="q_proj")
    before = tree(cache)
    factory.write_checkpoint(pair.base_dir, {**pair.base, "extra.weight": torch.ones(2, 2)})
    r = cli(
        "compute-projections", str(pair.base_dir), str(pair.aligned_dir), "-o", str(cache),
        "--targets", "q_proj",
    )  # fmt: skip
    refused(r, f"the base model {pair.base_dir} changed since the cache was built from it")
    assert "build a new cache elsewhere (-o NEW_DIR)" in r.stderr
    assert tree(cache) == before


def _make_legacy(cache: Path, base: Path, aligned: Path) -> None:
    """Turn a cache into what safelora 0.1.0 wrote: mtime fingerprints, no entry digests."""
    m = json.loads((cache / MANIFEST).read_text())
    for side, d in (("base", base), ("aligned", aligned)):
        files = {
            f.name: {"size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
            for f in sorted(d.iterdir())
            if f.name.endswith((".safetensors", ".index.json"))
        }
        m["fingerprints"][side] = {"kind": "local", "files": files}
        m["sources"][side]["files"] = files
    for e in m["weights"].values():
        del e["source_sha256"]
    (cache / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")


def test_old_cache_is_read_or_refused_with_a_rebuild_hint(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path / "p", layers=2)
    cache = tmp_path / "cache"
    b, a = str(pair.base_dir), str(pair.aligned_dir)
    compute_projections(b, a, cache, targets="q_proj")
    _make_legacy(cache, pair.base_dir, pair.aligned_dir)
    # Untouched files: read and added to as before.
    s = compute_projections(b, a, cache, targets="q_proj,v_proj")
    assert s.skipped == 2 and s.computed == 2
    assert ProjectionCache.open(cache).has(V1)
    before = tree(cache)
    copy = tmp_path / "copy"
    shutil.copytree(pair.aligned_dir, copy, copy_function=shutil.copyfile)
    r = cli("compute-projections", b, str(copy), "-o", str(cache), "--targets", "q_proj")
    refused(r, "built by an older safelora", f"{copy} differ")
    hint = r.stderr.splitlines()[1]
    assert f"rebuild it: delete {cache} or choose a new -o" in hint
    assert tree(cache) == before
    # The hint works.
    shutil.rmtree(cache)
    r = cli("compute-projections", b, str(copy), "-o", str(cache), "--targets", "q_proj")
    assert r.exit_code == 0, r.stderr


def test_hub_and_local_are_named(tmp_path: Path, llama_pair: factory.Pair) -> None:
    rb, sb = open_model(str(llama_pair.base_dir), label="base model")
    ra, sa = open_model(str(llama_pair.aligned_dir), label="aligned model")
    rb.close()
    ra.close()
    hub = SourceSpec("org/m", "hub", "/x", "org/m", None, "c" * 40, {"model.safetensors": {}})
    with ProjectionCache.create_or_resume(tmp_path / "c", hub, sa) as c:
        c.finish()
    with pytest.raises(CacheError) as ei:
        ProjectionCache.create_or_resume(tmp_path / "c", sb, sa)
    assert ei.value.message.endswith(
        f"it was built from the base model Hub repo org/m@cccccccccccc, not from {sb.path}"
    )
    assert "pass the base model the cache was built from (Hub repo org/m@" in ei.value.hint
    moved = SourceSpec("org/m", "hub", "/x", "org/m", "main", "d" * 40, {})
    with pytest.raises(CacheError) as ei:
        ProjectionCache.create_or_resume(tmp_path / "c", moved, sa)
    assert "org/m is now at commit dddddddddddd (the repo changed)" in ei.value.message
    assert ei.value.hint.startswith(f"pass --revision-base {'c' * 40}")


# ----------------------------------------------------------------------------- 9. wrong kind


def test_kinds_are_recognised(demo: Path) -> None:
    assert input_kind(demo / "adapters" / "qkv") == "adapter"
    assert input_kind(demo / "adapters" / "qkv" / "adapter_model.safetensors") == "adapter"
    assert input_kind(demo / "cache") == "cache"
    assert input_kind(demo / "models" / "base") == "model"
    assert input_kind(demo) is None


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["compute-projections", "adapters/qkv", "models/aligned", "-o", "c2", "--targets=q"],
            ["base model: adapters/qkv is a LoRA adapter (it has adapter_config.json), not a "
             "model; pass it as ADAPTER"],
        ),
        (
            ["compute-projections", "models/base", "adapters/qkv/", "-o", "c2", "--targets=q"],
            ["aligned model: adapters/qkv/ is a LoRA adapter"],
        ),
        (
            ["patch", "adapters/qkv", "--base", "adapters/qkv/adapter_model.safetensors",
             "--aligned", "models/aligned", "-o", "out"],
            ["base model: adapters/qkv/adapter_model.safetensors is a LoRA adapter"],
        ),
        (
            ["compute-projections", "cache", "models/aligned", "-o", "c2", "--targets=q"],
            ["base model: cache is a projection cache (it has manifest.json), not a model; "
             "pass it with -p"],
        ),
        (
            ["patch", "cache", "-p", "cache", "-o", "out"],
            ["adapter: cache is a projection cache (it has manifest.json), not a LoRA adapter; "
             "pass it with -p"],
        ),
        (
            ["inspect", "cache"],
            ["adapter: cache is a projection cache"],
        ),
        (
            ["inspect", "models/base", "-p", "cache"],
            ["models/base is a model checkpoint, not a LoRA adapter; scoring it as a full "
             "fine-tune needs --aligned ALIGNED"],
        ),
    ],
    ids=["adapter-as-base", "adapter-as-aligned", "adapter-file-as-base", "cache-as-base",
         "cache-as-adapter", "cache-as-adapter-inspect", "model-as-adapter"],
)  # fmt: skip
def test_wrong_kind_is_named(demo: Path, args: list[str], words: list[str]) -> None:
    before = tree(demo)
    r = cli(*args)
    refused(r, *words)
    assert tree(demo) == before  # nothing written (no c2/ or out/), inputs unchanged


def test_cache_hint_shows_what_it_holds(demo: Path) -> None:
    r = cli("inspect", "cache")
    hint = r.stderr.splitlines()[1].strip()
    assert hint.startswith("`safelora inspect -p cache` shows what it holds")
    r = cli("inspect", "-p", "cache")
    assert r.exit_code == 0, r.stderr


def test_swapping_base_and_aligned_gives_the_same_projector(tmp_path: Path) -> None:
    """C = V V^T / ||V||_F is unchanged by V -> -V (docs/faq.md); a float64 oracle agrees."""
    pair = factory.make_pair(tmp_path, layers=2)
    b, a = str(pair.base_dir), str(pair.aligned_dir)
    compute_projections(b, a, tmp_path / "ba", targets="q_proj,k_proj,up_proj")
    compute_projections(a, b, tmp_path / "ab", targets="q_proj,k_proj,up_proj")
    one, two = ProjectionCache.open(tmp_path / "ba"), ProjectionCache.open(tmp_path / "ab")
    assert one.weights() == two.weights() and UP0 in one.weights()
    for w in one.weights():
        v = pair.aligned[w].double() - pair.base[w].double()
        oracle = v @ v.T / torch.linalg.matrix_norm(v)
        c1, c2 = (_full_c(src.get(w)) for src in (one, two))
        torch.testing.assert_close(c1, oracle, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(c2, c1, rtol=0, atol=0)  # same numbers, not just close
        assert one.entry(w).norm_v == two.entry(w).norm_v
    # The factor form stores F = V / sqrt(||V||): its sign flips, C = F F^T does not.
    assert one.entry(UP0).kind == "factor"
    assert torch.equal(one.get(UP0).tensor, -two.get(UP0).tensor)


def _full_c(pr) -> torch.Tensor:
    t = pr.tensor.double()
    return t if pr.kind == "gram" else t @ t.T


def test_journalled_entries_are_checked_too(tmp_path: Path) -> None:
    """A killed multi-process run's journal is adopted on resume: from a copy, it is checked."""
    from safelora_cli.compute import _PairStream, parse_device

    pair = factory.make_pair(tmp_path / "p", layers=2)
    cache = tmp_path / "cache"
    rb, sb = open_model(str(pair.base_dir), label="base model")
    ra, sa = open_model(str(pair.aligned_dir), label="aligned model")
    with rb, ra:
        from safelora_cli.targets import resolve_targets

        q0, v1 = (t for t in resolve_targets(rb, targets="q_proj,v_proj") if t.weight in (Q0, V1))
        owner = ProjectionCache.create_or_resume(cache, sb, sa)
        worker = ProjectionCache.worker(cache, owner.manifest, rank=1)
        stream = _PairStream(rb, ra, parse_device("cpu"), digests={})
        assert stream.digests is not None
        owner.put(stream.compute([stream.load(q0)]), source_sha256=stream.digests[Q0])
        # Rank 1's entry records digests of other weights than these.
        worker.put(stream.compute([stream.load(v1)]), source_sha256=("1" * 64, "1" * 64))
        owner.close()
    assert (cache / ".journal-1.json").is_file()
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "p", copy, copy_function=shutil.copyfile)
    before = tree(cache)
    rb, sb = open_model(str(copy / "base"), label="base model")
    ra, sa = open_model(str(copy / "aligned"), label="aligned model")
    with rb, ra, pytest.raises(CacheError) as ei:
        ProjectionCache.create_or_resume(cache, sb, sa, readers=(rb, ra))
    assert f"{V1} has other values" in ei.value.message  # the journalled entry
    assert tree(cache) == before
    # With the digests the entry really had, it is adopted.
    j = json.loads((cache / ".journal-1.json").read_text())
    j["weights"][V1]["source_sha256"] = {
        "base": _entry_sha(pair.base_dir, V1),
        "aligned": _entry_sha(pair.aligned_dir, V1),
    }
    (cache / ".journal-1.json").write_text(json.dumps(j))
    rb, sb = open_model(str(copy / "base"), label="base model")
    ra, sa = open_model(str(copy / "aligned"), label="aligned model")
    with rb, ra, ProjectionCache.create_or_resume(cache, sb, sa, readers=(rb, ra)) as c:
        assert c.has(Q0) and c.has(V1)


def test_save_projections_records_source_digests(tmp_path: Path) -> None:
    """``patch --save-projections`` writes entries a copy of the models can be checked by."""
    pair = factory.make_pair(tmp_path / "p", layers=2)
    adapter = factory.write_adapter(tmp_path / "lora", base=pair.base)
    b, a, cache = str(pair.base_dir), str(pair.aligned_dir), tmp_path / "cache"
    r = cli("patch", str(adapter), "--base", b, "--aligned", a, "-o", str(tmp_path / "out"),
            "--save-projections", str(cache), "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    m = json.loads((cache / MANIFEST).read_text())
    assert m["weights"]
    for w, e in m["weights"].items():
        want = {"base": _entry_sha(pair.base_dir, w), "aligned": _entry_sha(pair.aligned_dir, w)}
        assert e["source_sha256"] == want, w
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "p", copy, copy_function=shutil.copyfile)
    r = cli("compute-projections", str(copy / "base"), str(copy / "aligned"), "-o", str(cache),
            "--adapter", str(adapter), "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr


def test_pair_stream_digests_on_the_device_path(tmp_path: Path) -> None:
    """The non-CPU branch (CUDA) hashes on its own threads: same digests as the files' bytes."""
    from safelora_cli.compute import _PairStream
    from safelora_cli.targets import resolve_targets

    pair = factory.make_pair(tmp_path, layers=2)
    rb, _ = open_model(str(pair.base_dir), label="base model")
    ra, _ = open_model(str(pair.aligned_dir), label="aligned model")
    with rb, ra:
        ts = resolve_targets(rb, targets="q_proj,up_proj")
        # "meta" takes the device branch of load() without a GPU; compute() is not called.
        stream = _PairStream(rb, ra, torch.device("meta"), digests={})
        try:
            for t in ts:
                stream.load(t)
            for t in ts:
                want = (_entry_sha(pair.base_dir, t.weight), _entry_sha(pair.aligned_dir, t.weight))
                assert stream.take_digests(t.weight) == want
            assert stream.take_digests(ts[0].weight) is None  # taken once
        finally:
            stream.close()
        cpu = _PairStream(rb, ra, torch.device("cpu"), digests={})
        cpu.load(ts[0])
        want = (_entry_sha(pair.base_dir, ts[0].weight), _entry_sha(pair.aligned_dir, ts[0].weight))
        assert cpu.take_digests(ts[0].weight) == want
