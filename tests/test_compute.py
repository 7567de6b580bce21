"""compute-projections: targets, streaming, prefetch overlap, cache life, bad input (issue 3)."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from safelora_cli import compute as compute_mod
from safelora_cli import sources as sources_mod
from safelora_cli.cache import MANIFEST, ProjectionCache
from safelora_cli.compute import (
    StreamingProjectorSource,
    check_pairs,
    compute_projections,
    parse_device,
    schedule,
)
from safelora_cli.errors import CacheError, CheckpointError, UsageError
from safelora_cli.projector import FACTOR, GRAM
from safelora_cli.reader import CheckpointReader
from safelora_cli.sources import open_model
from tests import factory

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
WAIT = 10.0  # deadlock guard for event waits, never a timing assertion


def oracle_err(got: torch.Tensor, wb: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, fifo: bool):
    """Error of ``got`` against C @ B in float64 from the definition (V = Wa - Wb in linear
    orientation, C = V V^T / ||V||_F), as ``||got - C B||_F / (||C||_2 ||B||_F)`` (see
    tests/test_projector.py::cb_error for why this scale)."""
    v = wa.to(torch.float64) - wb.to(torch.float64)
    if fifo:
        v = v.T
    c = v @ v.T / torch.linalg.norm(v)
    want = c @ b.to(torch.float64)
    scale = torch.linalg.matrix_norm(c, ord=2) * torch.linalg.norm(b.to(torch.float64))
    return float(torch.linalg.norm(got.double() - want) / scale)


# ----------------------------------------------------------------------------- numerics


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    d_out=st.integers(1, 40),
    d_in=st.integers(1, 40),
    r=st.integers(1, 5),
    dtype=st.sampled_from(sorted(DTYPES)),
    fifo=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(d_out=48, d_in=16, r=4, dtype="f32", fifo=False, seed=1)  # MLP up/gate: factor
@example(d_out=16, d_in=32, r=4, dtype="bf16", fifo=False, seed=2)  # GQA k/v: gram
@example(d_out=96, d_in=32, r=3, dtype="f16", fifo=True, seed=3)  # GPT-2 c_attn (Conv1D)
@example(d_out=32, d_in=128, r=2, dtype="bf16", fifo=True, seed=4)  # GPT-2 mlp.c_proj
def test_cache_reproduces_cb(d_out: int, d_in: int, r: int, dtype: str, fifo: bool, seed: int):
    """Through files and the cache: C B within 1e-6 of the float64 oracle (GQA, MLP, Conv1D)."""
    g = torch.Generator().manual_seed(seed)
    if fifo:  # GPT-2 Conv1D: stored [in, out], orientation from config.json's model_type
        name, cfg = "transformer.h.0.attn.c_attn.weight", {"model_type": "gpt2"}
        shape = (d_in, d_out)
    else:
        name, cfg = "model.layers.0.self_attn.k_proj.weight", {"model_type": "llama"}
        shape = (d_out, d_in)
    wb = torch.randn(shape, generator=g).to(DTYPES[dtype])
    wa = (wb.float() + 0.05 * torch.randn(shape, generator=g)).to(DTYPES[dtype])
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        factory.write_checkpoint(t / "b", {name: wb}, config=cfg)
        factory.write_checkpoint(t / "a", {name: wa}, config=cfg)
        compute_projections(str(t / "b"), str(t / "a"), t / "c", targets=name, device="cpu")
        cache = ProjectionCache.open(t / "c")
        e = cache.entry(name)
        assert (e.d_out, e.d_in, e.fan_in_fan_out) == (d_out, d_in, fifo)
        assert e.kind == (GRAM if d_out <= d_in else FACTOR) and e.dtype == "F32"
        b = torch.randn(d_out, r, generator=g)
        got = cache.get(name, fan_in_fan_out=fifo).apply(b)
        assert oracle_err(got, wb, wa, b, fifo) < 1e-6


# ----------------------------------------------------------------------------- targets


def test_adapter_targets_are_the_weights_behind_its_modules(
    tmp_path: Path, llama_pair: factory.Pair, llama_adapter: Path
) -> None:
    truth = factory.adapter_modules(llama_adapter)
    s = compute_projections(
        str(llama_pair.base_dir),
        str(llama_pair.aligned_dir),
        tmp_path / "c",
        adapters=[str(llama_adapter)],
        device="cpu",
    )
    cache = ProjectionCache.open(tmp_path / "c")
    assert set(cache.weights()) == {f"{m}.weight" for m in truth}
    assert s.computed == len(truth) and s.skipped == 0
    for m, info in truth.items():
        e = cache.entry(f"{m}.weight")
        assert (e.d_out, e.d_in) == (info["d_out"], info["d_in"])
    assert s.cache_bytes == cache.size_bytes()
    expected_read = sum(
        llama_pair.base[f"{m}.weight"].numel() * 4 * 2 for m in truth
    )  # fp32, both sides
    assert s.bytes_read == expected_read


def test_real_peft_gpt2_adapter_conv1d(tmp_path: Path, peft_gpt2_case: Any) -> None:
    case = peft_gpt2_case
    compute_projections(
        str(case.base_dir),
        str(case.aligned_dir),
        tmp_path / "c",
        adapters=[str(case.adapter_dir)],
        device="cpu",
    )
    cache = ProjectionCache.open(tmp_path / "c")
    ws = cache.weights()
    assert ws and all(w.endswith("attn.c_attn.weight") for w in ws)
    for w in ws:
        pr = cache.get(w, fan_in_fan_out=True)
        stored = case.base[w]  # [in, out]
        assert (pr.d_out, pr.d_in) == (stored.shape[1], stored.shape[0])
        b = torch.randn(pr.d_out, 3, dtype=torch.float64)
        assert oracle_err(pr.apply(b), case.base[w], case.aligned[w], b, True) < 1e-6


def test_targets_suffix_and_regex(tmp_path: Path, llama_pair: factory.Pair) -> None:
    args = (str(llama_pair.base_dir), str(llama_pair.aligned_dir))
    compute_projections(*args, tmp_path / "s", targets="self_attn.q_proj,v_proj", device="cpu")
    want = [n for n in llama_pair.base if n.endswith(("self_attn.q_proj.weight", ".v_proj.weight"))]
    assert set(ProjectionCache.open(tmp_path / "s").weights()) == set(want)
    compute_projections(
        *args, tmp_path / "r", targets=r"re:layers\.1\..*(up|down)_proj", device="cpu"
    )
    assert ProjectionCache.open(tmp_path / "r").weights() == [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ]


def test_neither_adapter_nor_targets_is_usage_error(
    tmp_path: Path, llama_pair: factory.Pair
) -> None:
    with pytest.raises(UsageError):
        compute_projections(str(llama_pair.base_dir), str(llama_pair.aligned_dir), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_targets_matching_nothing_is_usage_error(tmp_path: Path, llama_pair: factory.Pair):
    with pytest.raises(UsageError, match="matches no 2-D weight"):
        compute_projections(
            str(llama_pair.base_dir), str(llama_pair.aligned_dir), tmp_path / "c", targets="norm"
        )
    with pytest.raises(UsageError, match="regex"):
        compute_projections(
            str(llama_pair.base_dir), str(llama_pair.aligned_dir), tmp_path / "c", targets="re:(("
        )
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- streaming


class CountingReader:
    """Wraps a CheckpointReader; counts loads per name (and can slow them down)."""

    def __init__(self, inner: CheckpointReader, loads: Counter, hook: Any = None):
        self.inner = inner
        self.loads = loads
        self.hook = hook

    def _count(self, name: str) -> None:
        if self.hook:
            self.hook(self.inner.label, name)
        self.loads[(self.inner.label, name)] += 1

    def load(self, name: str, **kw: Any) -> torch.Tensor:
        self._count(name)
        return self.inner.load(name, **kw)

    def load_into(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        self._count(name)
        return self.inner.load_into(name, buf)

    def __contains__(self, name: object) -> bool:
        return name in self.inner

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)


def patch_open_model(monkeypatch: pytest.MonkeyPatch, loads: Counter, hook: Any = None) -> None:
    real = sources_mod.open_model

    def fake(*a: Any, **kw: Any):
        r, s = real(*a, **kw)
        return CountingReader(r, loads, hook), s

    monkeypatch.setattr(sources_mod, "open_model", fake)


def test_each_tensor_read_once_and_later_runs_read_only_missing(
    tmp_path: Path, llama_pair: factory.Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: Counter = Counter()
    patch_open_model(monkeypatch, loads)
    args = (str(llama_pair.base_dir), str(llama_pair.aligned_dir), tmp_path / "c")
    s1 = compute_projections(*args, targets="q_proj", device="cpu")
    q = [n for n in llama_pair.base if n.endswith("q_proj.weight")]
    assert loads == Counter({(side, n): 1 for n in q for side in ("base model", "aligned model")})
    loads.clear()
    s2 = compute_projections(*args, targets="q_proj,o_proj", device="cpu")
    o = [n for n in llama_pair.base if n.endswith("o_proj.weight")]
    assert loads == Counter({(side, n): 1 for n in o for side in ("base model", "aligned model")})
    assert (s2.computed, s2.skipped) == (len(o), len(q))
    assert s2.bytes_read == sum(llama_pair.base[n].numel() * 4 * 2 for n in o)
    loads.clear()
    s3 = compute_projections(*args, targets="q_proj,o_proj", device="cpu")
    assert not loads and s3.computed == 0 and s3.bytes_read == 0
    assert s1.computed == len(q)


def test_prefetch_overlaps_reading_with_compute(
    tmp_path: Path, llama_pair: factory.Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next pair is read while the current one is computed, and never more than one ahead.

    A deliberately slow reader: loading pair i+1 blocks until pair i's projector is being
    built, and building pair i's projector blocks until pair i+1's load has started. A
    sequential implementation deadlocks (caught by the guard); a pipelined one proceeds.
    """
    targets = [n for n in llama_pair.base if n.endswith(("q_proj.weight", "o_proj.weight"))]
    from safelora_cli.naming import natural_sorted

    order = natural_sorted(targets)
    idx = {n: i for i, n in enumerate(order)}
    load_started = [threading.Event() for _ in order]
    computing = [threading.Event() for _ in order]
    log: list[str] = []
    lock = threading.Lock()
    in_flight = {"now": 0, "max": 0}
    failures: list[str] = []

    def hook(label: str, name: str) -> None:
        i = idx[name]
        with lock:
            log.append(f"load {i} {label}")
        if label == "base model":
            with lock:
                in_flight["now"] += 1
                in_flight["max"] = max(in_flight["max"], in_flight["now"])
            load_started[i].set()
            if i > 0 and not computing[i - 1].wait(WAIT):
                failures.append(f"load {i} did not overlap compute {i - 1}")

    real_build = compute_mod.build_projector

    def slow_build(weight: str, v: torch.Tensor, **kw: Any):
        i = idx[weight]
        with lock:
            log.append(f"compute {i}")
            in_flight["now"] -= 1
        computing[i].set()
        if i + 1 < len(order) and not load_started[i + 1].wait(WAIT):
            failures.append(f"compute {i} did not overlap load {i + 1}")
        return real_build(weight, v, **kw)

    loads: Counter = Counter()
    patch_open_model(monkeypatch, loads, hook)
    monkeypatch.setattr(compute_mod, "build_projector", slow_build)
    s = compute_projections(
        str(llama_pair.base_dir),
        str(llama_pair.aligned_dir),
        tmp_path / "c",
        targets="q_proj,o_proj",
        device="cpu",
    )
    assert not failures, failures
    assert s.computed == len(order)
    # Bounded prefetch: at most the current pair and the next one are loaded and not consumed.
    assert in_flight["max"] <= 2
    # Pairs are read in order, each side once.
    assert [e for e in log if e.startswith("load") and "base" in e] == [
        f"load {i} base model" for i in range(len(order))
    ]


def test_streaming_source_matches_cache(
    tmp_path: Path, gpt2_pair: factory.Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    compute_projections(
        str(gpt2_pair.base_dir),
        str(gpt2_pair.aligned_dir),
        tmp_path / "c",
        targets="c_attn,c_fc",
        device="cpu",
    )
    cache = ProjectionCache.open(tmp_path / "c")
    rb, _ = open_model(str(gpt2_pair.base_dir), label="base model")
    ra, _ = open_model(str(gpt2_pair.aligned_dir), label="aligned model")
    src = StreamingProjectorSource(rb, ra, device="cpu")
    reqs = [(w, True) for w in reversed(cache.weights())]
    got = list(src.projectors(reqs))
    assert [p.weight for p in got] == [w for w, _ in reqs]
    for p in got:
        c = cache.get(p.weight, fan_in_fan_out=True)
        assert torch.equal(p.tensor, c.tensor) and p.norm_v == c.norm_v and p.kind == c.kind
    one = src.get(reqs[0][0], fan_in_fan_out=True)
    assert torch.equal(one.tensor, got[0].tensor)
    assert src.bytes_read > 0
    with pytest.raises(CheckpointError, match=r"nope\.weight"):
        src.get("nope.weight")
    with pytest.raises(CheckpointError, match=r"not 2-D|only 2-D"):
        src.require([("transformer.h.0.ln_1.weight", False)])


def test_schedule_alternates_and_keeps_every_target() -> None:
    from safelora_cli.targets import Target

    g = [Target(f"g{i}", False, 4, 8) for i in range(4)]
    f = [Target(f"f{i}", False, 8, 4) for i in range(2)]
    order = schedule([g[0], f[0], f[1], g[1], g[2], g[3]])
    assert [t.weight for t in order] == ["g0", "f0", "g1", "f1", "g2", "g3"]
    assert schedule([]) == [] and schedule(f) == f


def test_progress_events(tmp_path: Path, llama_pair: factory.Pair) -> None:
    events: list[tuple] = []

    class Rec:
        def start(self, total: int, description: str) -> None:
            events.append(("start", total))

        def advance(self, units: int = 1, nbytes: int = 0) -> None:
            events.append(("advance", units, nbytes))

        def finish(self) -> None:
            events.append(("finish",))

    s = compute_projections(
        str(llama_pair.base_dir),
        str(llama_pair.aligned_dir),
        tmp_path / "c",
        targets="q_proj,up_proj",
        progress=Rec(),
    )
    assert events[0] == ("start", s.computed) and events[-1] == ("finish",)
    adv = events[1:-1]
    assert len(adv) == s.computed and all(e[1] == 1 for e in adv)
    assert sum(e[2] for e in adv) == s.bytes_read


def test_parse_device() -> None:
    assert parse_device("cpu").type == "cpu"
    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "cuda:0:1", "mps"):
        with pytest.raises(UsageError):
            parse_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA"):
            parse_device("cuda")
    else:
        with pytest.raises(UsageError, match="no CUDA device"):
            parse_device(f"cuda:{torch.cuda.device_count()}")


# ----------------------------------------------------------------------------- cache life


def test_killed_run_resumes_to_the_same_cache(
    tmp_path: Path, llama_pair: factory.Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = (str(llama_pair.base_dir), str(llama_pair.aligned_dir))
    compute_projections(*args, tmp_path / "clean", targets="q_proj,v_proj,up_proj", device="cpu")

    real_put = ProjectionCache.put
    calls = {"n": 0}

    def dying_put(self: ProjectionCache, pr: Any, **kw: Any):
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process is killed mid-run
        calls["n"] += 1
        return real_put(self, pr, **kw)

    monkeypatch.setattr(ProjectionCache, "put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        compute_projections(*args, tmp_path / "c", targets="q_proj,v_proj,up_proj", device="cpu")
    m = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert m["state"] == "in_progress" and len(m["weights"]) == 3
    with pytest.raises(CacheError, match="incomplete"):
        ProjectionCache.open(tmp_path / "c")
    monkeypatch.setattr(ProjectionCache, "put", real_put)
    loads: Counter = Counter()
    patch_open_model(monkeypatch, loads)
    s = compute_projections(*args, tmp_path / "c", targets="q_proj,v_proj,up_proj", device="cpu")
    assert s.skipped == 3 and s.computed == 3 and len(loads) == 6
    clean = {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir()}
    resumed = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    assert clean == resumed


def test_cache_from_other_weights_is_refused(tmp_path: Path) -> None:
    p1 = factory.make_pair(tmp_path / "one", seed=0)
    p2 = factory.make_pair(tmp_path / "two", seed=5)
    compute_projections(str(p1.base_dir), str(p1.aligned_dir), tmp_path / "c", targets="q_proj")
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    with pytest.raises(CacheError, match=r"aligned model .* is not the model it was built from"):
        compute_projections(str(p1.base_dir), str(p2.aligned_dir), tmp_path / "c", targets="q_proj")
    after = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    assert before == after


def test_degenerate_weight_is_cached_and_reported(tmp_path: Path) -> None:
    same = ["model.layers.0.self_attn.q_proj.weight"]
    pair = factory.make_pair(tmp_path, same=same)
    s = compute_projections(
        str(pair.base_dir), str(pair.aligned_dir), tmp_path / "c", targets="q_proj"
    )
    assert s.degenerate == same
    pr = ProjectionCache.open(tmp_path / "c").get(same[0])
    assert pr.degenerate and not torch.isnan(pr.tensor).any()
    assert "no alignment signal" in s.line()


# ----------------------------------------------------------------------------- bad input


def _pair_dirs(tmp_path: Path, base: dict, aligned: dict) -> tuple[str, str]:
    factory.write_checkpoint(tmp_path / "b", base, config="llama")
    factory.write_checkpoint(tmp_path / "a", aligned, config="llama")
    return str(tmp_path / "b"), str(tmp_path / "a")


def test_missing_from_one_side(tmp_path: Path) -> None:
    base = factory.llama_weights(layers=1)
    aligned = factory.aligned_from(base)
    name = "model.layers.0.self_attn.v_proj.weight"
    del aligned[name]
    b, a = _pair_dirs(tmp_path, base, aligned)
    with pytest.raises(CheckpointError) as ei:
        compute_projections(b, a, tmp_path / "c", targets="v_proj")
    assert name in str(ei.value) and str(tmp_path / "a") in str(ei.value)
    assert not (tmp_path / "c").exists()


def test_shapes_differ(tmp_path: Path) -> None:
    base = factory.llama_weights(layers=1)
    aligned = factory.aligned_from(base)
    name = "model.layers.0.self_attn.q_proj.weight"
    aligned[name] = torch.zeros(32, 31)
    b, a = _pair_dirs(tmp_path, base, aligned)
    with pytest.raises(CheckpointError) as ei:
        compute_projections(b, a, tmp_path / "c", targets="q_proj")
    msg = str(ei.value)
    assert name in msg and str(tmp_path / "a") in msg and str(tmp_path / "b") in msg
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_delta(tmp_path: Path, bad: float) -> None:
    base = factory.llama_weights(layers=2)
    aligned = factory.aligned_from(base)
    name = "model.layers.1.self_attn.q_proj.weight"
    aligned[name][3, 4] = bad
    b, a = _pair_dirs(tmp_path, base, aligned)
    with pytest.raises(CheckpointError) as ei:
        compute_projections(b, a, tmp_path / "c", targets="q_proj")
    msg = str(ei.value)
    assert name in msg and str(tmp_path / "a") in msg and str(tmp_path / "b") in msg
    # A cache created by the failed run is removed ...
    assert not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    # ... an existing one keeps its valid entries and stays usable.
    compute_projections(b, a, tmp_path / "c", targets="v_proj")
    with pytest.raises(CheckpointError):
        compute_projections(b, a, tmp_path / "c", targets="q_proj")
    cache = ProjectionCache.open(tmp_path / "c")
    assert "model.layers.0.self_attn.q_proj.weight" in cache.weights()
    assert name not in cache.weights()


def test_non_2d_target_behind_an_adapter(tmp_path: Path) -> None:
    base = factory.llama_weights(layers=1)
    adapter = factory.write_adapter(tmp_path / "ad", base=base, targets=("q_proj",))
    name = "model.layers.0.self_attn.q_proj.weight"
    bad = dict(base)
    bad[name] = base[name].reshape(32, 32, 1)
    b, a = _pair_dirs(tmp_path, bad, factory.aligned_from(bad))
    with pytest.raises(CheckpointError) as ei:
        compute_projections(b, a, tmp_path / "c", adapters=[str(adapter)])
    assert name in str(ei.value) and "2-D" in str(ei.value)
    assert not (tmp_path / "c").exists()


def test_check_pairs_non_2d_and_non_float(tmp_path: Path) -> None:
    t = {"x.weight": torch.ones(2, 2, 2), "y.weight": torch.ones(2, 2, dtype=torch.int32)}
    b, a = _pair_dirs(tmp_path, t, t)
    rb = CheckpointReader.open(b, label="base model")
    ra = CheckpointReader.open(a, label="aligned model")
    with pytest.raises(CheckpointError, match=r"x\.weight.*2-D"):
        check_pairs(rb, ra, ["x.weight"])
    with pytest.raises(CheckpointError, match=r"y\.weight.*I32"):
        check_pairs(rb, ra, ["y.weight"])


# ----------------------------------------------------------------------------- hub


def _hub_snapshot(root: Path, repo: str, src: Path, files: list[str]) -> str:
    commit = ("a" if "base" in repo else "b") * 40
    folder = root / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for f in files:
        shutil.copy(src / f, snap / f)
    return commit


def test_hub_fetches_only_needed_shards(tmp_path: Path, offline_hf: Path) -> None:
    """Offline, with only the shard holding the targets in the Hub cache: it must suffice."""
    pair = factory.make_pair(tmp_path / "src", shards=2)
    idx = json.loads((pair.base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    target = "model.layers.0.self_attn.q_proj.weight"
    needed = {idx[target]}
    assert len(set(idx.values())) == 2
    hub = offline_hf / "hub"
    files = ["config.json", "model.safetensors.index.json", *needed]
    _hub_snapshot(hub, "org/base", pair.base_dir, files)
    _hub_snapshot(hub, "org/aligned", pair.aligned_dir, files)
    layer0_q = "re:layers\\.0\\.self_attn\\.q_proj"
    s = compute_projections("org/base", "org/aligned", tmp_path / "c", targets=layer0_q)
    cache = ProjectionCache.open(tmp_path / "c")
    assert cache.weights() == [target] and s.computed == 1
    src = cache.sources
    assert src["base"]["kind"] == "hub" and src["base"]["commit"] == "a" * 40
    assert "org/base" in cache.add_command()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tmp_path: Path, gpt2_pair: factory.Pair) -> None:
    args = (str(gpt2_pair.base_dir), str(gpt2_pair.aligned_dir))
    compute_projections(*args, tmp_path / "cpu", targets="c_attn,c_fc,c_proj", device="cpu")
    s = compute_projections(*args, tmp_path / "gpu", targets="c_attn,c_fc,c_proj", device="cuda")
    assert s.device.startswith("cuda")
    cpu, gpu = ProjectionCache.open(tmp_path / "cpu"), ProjectionCache.open(tmp_path / "gpu")
    assert cpu.weights() == gpu.weights()
    for w in cpu.weights():
        a, b = cpu.get(w, fan_in_fan_out=True), gpu.get(w, fan_in_fan_out=True)
        assert a.kind == b.kind and a.norm_v == pytest.approx(b.norm_v, rel=1e-6)
        assert torch.allclose(a.tensor, b.tensor, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- targets unit


def _module(name: str) -> Any:
    from safelora_cli.adapter import LoraModule

    return LoraModule(name, "a", "b", 4, 8.0, 2.0, False, 16, 32, "F32")


def test_weight_for_module_exact_prefix_and_ambiguous() -> None:
    from safelora_cli.errors import AdapterError
    from safelora_cli.targets import weight_for_module

    names = {"model.layers.0.q.weight", "model.language_model.layers.1.q.weight"}
    assert weight_for_module(_module("model.layers.0.q"), names, source_label="x") == (
        "model.layers.0.q.weight"
    )
    # Differs only by the model prefix (vision-language checkpoints): one candidate, matched.
    assert (
        weight_for_module(_module("language_model.model.layers.1.q"), names, source_label="x")
        == "model.language_model.layers.1.q.weight"
    )
    two = {"a.layers.0.q.weight", "b.layers.0.q.weight"}
    with pytest.raises(AdapterError, match="several weights of ckpt"):
        weight_for_module(_module("c.layers.0.q"), two, source_label="ckpt")
    with pytest.raises(AdapterError, match=r"ckpt has no weight m\.layers\.7\.q\.weight"):
        weight_for_module(_module("m.layers.7.q"), names, source_label="ckpt")


def test_parse_targets_suffixes_and_regex() -> None:
    from safelora_cli.targets import is_regex, parse_targets

    suff = parse_targets("q_proj, self_attn.v_proj")
    assert suff("model.layers.0.self_attn.q_proj.weight")
    assert suff("model.layers.0.self_attn.v_proj.weight")
    assert not suff("model.layers.0.self_attn.xq_proj.weight")  # dot boundary
    assert not suff("model.layers.0.mlp.v_proj.weight")
    assert is_regex("re:q") and is_regex(r"layers\.1") and not is_regex("q_proj,v_proj")
    rx = parse_targets(r"layers\.(0|2)\.self_attn\.q")
    assert rx("model.layers.2.self_attn.q_proj.weight")
    assert not rx("model.layers.1.self_attn.q_proj.weight")
    for bad in ("", " , "):
        with pytest.raises(UsageError):
            parse_targets(bad)


def test_conv1d_orientation_needs_config(tmp_path: Path) -> None:
    base = factory.gpt2_weights(layers=1)
    factory.write_checkpoint(tmp_path / "b", base)  # no config.json
    factory.write_checkpoint(tmp_path / "a", factory.aligned_from(base))
    with pytest.raises(UsageError, match=r"config\.json"):
        compute_projections(
            str(tmp_path / "b"), str(tmp_path / "a"), tmp_path / "c", targets="c_fc"
        )
    assert not (tmp_path / "c").exists()
