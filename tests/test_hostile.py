"""Hostile inputs, numeric and textual (issue 15, categories 1, 2, 6, 9): every case runs the
real CLI and asserts the exit code, the message, that nothing was written and that every input
is byte-identical afterwards (``tests.test_catalogue.snapshot`` of the whole world).

- 1 The gate fails closed: adapters rescaled to the ends of the float64 range score exactly as
  the honest adapter (against a float64 oracle from the definition), updates whose cosine
  cannot be computed (overflowing, cancelling, orthogonal to the alignment subspace, a
  corrupt cache entry) never pass ``--fail-below`` and never print NaN/Infinity in ``--json``.
- 2 Results fit their dtype: a projected ``B`` that overflows fp16/bf16 is an error before
  anything is written.
- 6 Hostile strings: catastrophic-backtracking ``rank_pattern`` keys end within the bound;
  control characters and rich markup in keys and paths are escaped in every message and table.
- 9 Environment: stray ``WORLD_SIZE``/``RANK`` and a process group that never forms end with a
  clear error within a bounded time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from safelora_cli.cli import app
from tests import factory
from tests.test_catalogue import snapshot

REPO = Path(__file__).resolve().parent.parent
Q = "model.layers.0.self_attn.q_proj"
QW = f"{Q}.weight"
KEY_A = f"base_model.model.{Q}.lora_A.weight"
KEY_B = f"base_model.model.{Q}.lora_B.weight"
CONTROL = [chr(c) for c in range(0x20)] + ["\x7f", "\x9b", "\u202e", "\u2066", "\u200b"]


@dataclass
class W:
    root: Path
    base: Path
    aligned: Path
    adapter: Path
    cache: Path

    @property
    def out(self) -> Path:
        return self.root / "out"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> W:
    from safelora_cli.compute import compute_projections

    root = tmp_path_factory.mktemp("hostile") / "world"
    root.mkdir()
    pair = factory.make_pair(root)
    adapter = factory.write_adapter(root / "adapter", base=pair.base)
    compute_projections(
        str(pair.base_dir), str(pair.aligned_dir), root / "cache", targets="q_proj,v_proj"
    )
    return W(root, pair.base_dir, pair.aligned_dir, adapter, root / "cache")


@pytest.fixture
def w(pristine: W, tmp_path: Path) -> W:
    root = tmp_path / "world"
    shutil.copytree(pristine.root, root, symlinks=True)
    return W(*(root / p.relative_to(pristine.root) for p in (pristine.root, pristine.base,
             pristine.aligned, pristine.adapter, pristine.cache)))  # fmt: skip


def _no_constants(name: str) -> Any:
    raise AssertionError(f"--json printed the non-JSON literal {name}")


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    """Strict JSON (no NaN / Infinity literals), one object per line."""
    return [json.loads(ln, parse_constant=_no_constants) for ln in text.splitlines() if ln]


def run(w: W, argv: list[str], *, code: int, must: tuple[str, ...] = (), env=None) -> Any:
    """Run the CLI; assert exit code, a clean short stderr, inputs unchanged, nothing new."""
    before = snapshot(w.root)
    r = CliRunner().invoke(app, [str(a) for a in argv], env=env)
    after = snapshot(w.root)
    err = r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == code, f"exit {r.exit_code}, want {code}\n{err}\n{r.stdout}"
    assert "Traceback" not in err and "internal error" not in err, err
    for s in must:
        assert s in err, f"{s!r} not in stderr:\n{err}"
    if code != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert 1 <= len(lines) <= 3 and lines[0].startswith("error: "), err
        assert sum(ln.startswith("error:") for ln in lines) == 1, err
    assert after == before, "the run changed or created files"
    assert not w.out.exists()
    if "--json" in argv:
        parse_json_lines(r.stdout)
    return r


def rewrite_adapter(d: Path, fn: Any, dtype: torch.dtype | None = None) -> None:
    f = d / "adapter_model.safetensors"
    t = load_file(str(f))
    if dtype is not None:
        t = {k: v.to(dtype) for k, v in t.items()}
    fn(t)
    save_file({k: v.contiguous() for k, v in t.items()}, str(f), metadata={"format": "pt"})


def oracle_cosines(base: Path, aligned: Path, adapter: Path) -> dict[str, float]:
    """cos(C B A, B A) from the definition, all in float64, dense d_out x d_in products."""
    wb = load_file(str(base / "model.safetensors"))
    wa = load_file(str(aligned / "model.safetensors"))
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for k in ad:
        if ".lora_A." not in k:
            continue
        m = k.removeprefix("base_model.model.").split(".lora_A.")[0]
        v = wa[f"{m}.weight"].double() - wb[f"{m}.weight"].double()
        c = v @ v.T / torch.linalg.matrix_norm(v)
        u = ad[k.replace("lora_A", "lora_B")].double() @ ad[k].double()
        cu = c @ u
        out[m] = float(
            (cu * u).sum() / (torch.linalg.matrix_norm(cu) * torch.linalg.matrix_norm(u))
        )
    return out


def cosines(stdout: str) -> dict[str, float | None]:
    [rep] = parse_json_lines(stdout)
    return {m["name"]: m["cosine"] for m in rep["modules"]}


# ----------------------------------------------------------------------------- 1: fail closed


@pytest.mark.parametrize(
    ("sb", "sa"),
    [(1e-200, 1e200), (1e150, 1e150), (1e-150, 1e-150), (2.0**-1000, 2.0**-60)],
    ids=["tiny-B-huge-A", "both-huge", "both-tiny", "subnormal-products"],
)
def test_rescaled_adapter_scores_as_the_honest_one(w: W, sb: float, sa: float) -> None:
    """The same update at any stored magnitude: the same cosines (~1e-6) and the same gate."""
    honest = oracle_cosines(w.base, w.aligned, w.adapter)
    r0 = run(w, ["inspect", w.adapter, "-p", w.cache, "--json"], code=0)
    rewrite_adapter(
        w.adapter,
        lambda t: [t.__setitem__(k, v * (sb if ".lora_B." in k else sa)) for k, v in t.items()],
        dtype=torch.float64,
    )
    r = run(w, ["inspect", w.adapter, "-p", w.cache, "--json"], code=0)
    got, base_run = cosines(r.stdout), cosines(r0.stdout)
    assert set(got) == set(honest)
    for m, want in honest.items():
        assert got[m] is not None, f"{m} reported without a cosine"
        assert got[m] == pytest.approx(base_run[m], abs=1e-6)
        assert got[m] == pytest.approx(want, abs=1e-5)
    gate = min(honest.values()) + 1e-3
    r = run(w, ["inspect", w.adapter, "-p", w.cache, "--fail-below", gate], code=3)
    assert "gate --fail-below" in r.stderr


def test_update_beyond_float64_is_an_error_not_a_pass(w: W) -> None:
    # ||s B A|| ~ 1e400: NaN traces used to be clamped to cosine 1.0 and passed the gate.
    rewrite_adapter(
        w.adapter, lambda t: [t.__setitem__(k, v * 1e200) for k, v in t.items()], torch.float64
    )
    argv = ["inspect", w.adapter, "-p", w.cache, "--fail-below", "0.1", "--json"]
    r = run(w, argv, code=1, must=("adapter_model.safetensors", "float64", "module model.layers"))
    assert r.stdout == ""


def test_cancelling_update_is_an_error_not_untrained(w: W) -> None:
    def cancel(t: dict[str, torch.Tensor]) -> None:
        b, a = t[KEY_B], t[KEY_A]
        t[KEY_B] = torch.cat([b[:, :2], b[:, :2]], dim=1)  # B = [b1 b2 b1 b2]
        t[KEY_A] = torch.cat([a[:2], -a[:2]])  # A = [a1; a2; -a1; -a2]: B A = 0, B, A != 0

    rewrite_adapter(w.adapter, cancel)
    argv = ["inspect", w.adapter, "-p", w.cache, "--fail-below", "-1"]
    run(w, argv, code=1, must=(Q, "cancels", "adapter_model.safetensors"))


def _orthogonal_world(w: W) -> None:
    """q_proj's V = u w^T exactly (u = all ones), B's columns exactly orthogonal to u."""
    for d in (w.base, w.aligned):
        t = load_file(str(d / "model.safetensors"))
        d_out, d_in = t[QW].shape
        if d == w.base:
            t[QW] = torch.zeros(d_out, d_in)
        else:
            signs = torch.tensor([(-1.0) ** i for i in range(d_in)])
            t[QW] = torch.ones(d_out, 1) @ (0.5 * signs[None, :])
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})

    def ortho(t: dict[str, torch.Tensor]) -> None:
        d_out, r = t[KEY_B].shape
        b = torch.zeros(d_out, r)
        for j in range(r):
            b[2 * j, j], b[2 * j + 1, j] = 1.0, -1.0
        t[KEY_B] = b

    rewrite_adapter(w.adapter, ortho)


def test_update_orthogonal_to_the_alignment_subspace_fails_the_gate(w: W) -> None:
    _orthogonal_world(w)
    models = ["--base", w.base, "--aligned", w.aligned]
    r = run(w, ["inspect", w.adapter, *models, "--json"], code=0)
    assert cosines(r.stdout)[Q] is None  # no cosine, and said why
    [rep] = parse_json_lines(r.stdout)
    assert "orthogonal" in next(m["reason"] for m in rep["modules"] if m["name"] == Q)
    # Every other module passes at -1; the orthogonal one must still fail the gate.
    r = run(w, ["inspect", w.adapter, *models, "--fail-below", "-1"], code=3, must=(Q,))
    assert "no cosine" in r.stderr


def _entry_file(cache: Path, weight: str) -> Path:
    manifest = json.loads((cache / "manifest.json").read_text())
    return cache / manifest["weights"][weight]["file"]


def test_nan_in_a_cache_entry_is_an_error_naming_the_weight(w: W) -> None:
    from safelora_cli.reader import read_header

    f = _entry_file(w.cache, QW)
    info = next(iter(read_header(f).tensors.values()))
    raw = bytearray(f.read_bytes())
    raw[info.start : info.start + 4] = b"\x00\x00\xc0\x7f"  # float32 NaN
    st = f.stat()
    f.write_bytes(bytes(raw))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    argv = ["inspect", w.adapter, "-p", w.cache, "--json", "--fail-below", "-1"]
    r = run(w, argv, code=1, must=(QW,))
    assert "NaN" in r.stderr and r.stdout == ""


def test_non_finite_norm_in_the_manifest_never_reaches_the_json(w: W) -> None:
    p = w.cache / "manifest.json"
    m = json.loads(p.read_text())
    m["weights"][QW]["norm_v"] = 1.0  # replaced by the literal below
    p.write_text(json.dumps(m, indent=2).replace('"norm_v": 1.0', '"norm_v": Infinity', 1))
    r = run(w, ["inspect", w.adapter, "-p", w.cache, "--json"], code=1, must=(QW,))
    assert r.stdout == ""


# ----------------------------------------------------------------------------- 2: dtype fit


def _big_delta(w: W, factor: float) -> None:
    """Make q_proj's alignment delta huge, so that C = V V^T / ||V|| is large."""
    t = load_file(str(w.aligned / "model.safetensors"))
    b = load_file(str(w.base / "model.safetensors"))
    t[QW] = b[QW] + factor * torch.randn(t[QW].shape, generator=torch.Generator().manual_seed(3))
    save_file(t, str(w.aligned / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("dtype", "code", "delta", "b_scale"),
    [(torch.float16, "F16", 100.0, 2000.0), (torch.bfloat16, "BF16", 1000.0, 3e37)],
)
def test_projected_b_that_overflows_its_dtype_is_refused_before_writing(
    w: W, dtype: torch.dtype, code: str, delta: float, b_scale: float
) -> None:
    _big_delta(w, delta)

    def scale(t: dict[str, torch.Tensor]) -> None:
        b = t[KEY_B].double()
        t[KEY_B] = (b / b.abs().max() * b_scale).to(dtype)
        assert bool(torch.isfinite(t[KEY_B]).all())

    rewrite_adapter(w.adapter, scale, dtype=dtype)
    argv = ["patch", w.adapter, "--base", w.base, "--aligned", w.aligned, "-o", w.out, "-t", "1"]
    r = run(w, argv, code=1, must=(Q, code, "does not fit", "Nothing was written"))
    assert "Inf" not in r.stdout
    # --dry-run says the same (it is the same computation); inspect only reports cosines.
    run(w, [*argv, "--dry-run"], code=1, must=(Q, code))


# ----------------------------------------------------------------------------- 6: strings


def _add_lora(t: dict[str, torch.Tensor], module: str, like: str = Q) -> None:
    t[f"base_model.model.{module}.lora_A.weight"] = t[KEY_A].clone()
    t[f"base_model.model.{module}.lora_B.weight"] = t[KEY_B].clone()


def test_catastrophic_rank_pattern_ends_within_the_bound(w: W) -> None:
    cfg = w.adapter / "adapter_config.json"
    c = json.loads(cfg.read_text())
    c["rank_pattern"] = {"(a+)+$": 4}
    cfg.write_text(json.dumps(c))
    rewrite_adapter(w.adapter, lambda t: _add_lora(t, "model.layers.0." + "a" * 40 + "!"))
    t0 = time.monotonic()
    run(
        w,
        ["inspect", w.adapter, "-p", w.cache],
        code=1,
        must=("rank_pattern", "adapter_config.json", "(a+)+$", "took more than 1 s"),
        env={"SAFELORA_REGEX_TIMEOUT": "1"},
    )
    assert time.monotonic() - t0 < 30


def test_regex_pattern_keys_keep_peft_semantics(w: W) -> None:
    """A real regex key goes through the bounded matcher and picks what PEFT picks."""
    pattern = {r"layers\.[0-9]+\.self_attn\.q_proj": 32, "v_proj": 2}
    cfg = w.adapter / "adapter_config.json"
    c = json.loads(cfg.read_text())
    c["alpha_pattern"] = pattern
    cfg.write_text(json.dumps(c))
    r = run(w, ["inspect", w.adapter, "-p", w.cache, "--json"], code=0)
    [rep] = parse_json_lines(r.stdout)
    for m in rep["modules"]:
        _, alpha = factory.resolve_rank_alpha(
            m["name"], r=4, alpha=8, rank_pattern={}, alpha_pattern=pattern
        )
        assert m["scale"] == pytest.approx(alpha / 4), m["name"]
    assert {m["scale"] for m in rep["modules"]} == {8.0, 0.5}


FORGED = "x\x1b[2J\x1b]0;pwned\x07\r\nerror: forged\u202eevil"


def _assert_escaped(text: str) -> None:
    bad = [c for c in CONTROL if c in text and c != "\n"]
    assert not bad, f"raw control characters {bad!r} in {text!r}"
    assert not any(ln.startswith("error: forged") for ln in text.splitlines()), text


def test_control_characters_in_a_tensor_key_are_escaped_in_the_error(w: W) -> None:
    rewrite_adapter(
        w.adapter,
        lambda t: t.__setitem__(f"base_model.model.{FORGED}.lora_B.weight", t[KEY_B].clone()),
    )
    r = run(w, ["inspect", w.adapter, "-p", w.cache], code=1, must=("no matching lora_A",))
    _assert_escaped(r.stderr)
    assert "\\x1b[2J" in r.stderr and "\\u202e" in r.stderr and "\\x0d\\x0aerror" in r.stderr


def test_control_characters_in_a_path_are_escaped(w: W) -> None:
    bad = w.root / "ad\x1b]0;pwned\x07\nerror: forged"
    bad.mkdir()
    r = run(w, ["inspect", bad, "-p", w.cache], code=1, must=("adapter_config.json",))
    _assert_escaped(r.stderr)
    assert "\\x1b]0;pwned\\x07\\x0aerror: forged" in r.stderr


def test_control_characters_in_names_are_escaped_in_tables(w: W) -> None:
    extra = f"base_model.model.model.layers.0.{FORGED}.weight"
    rewrite_adapter(w.adapter, lambda t: t.__setitem__(extra, torch.zeros(2, 2)))
    r = run(w, ["inspect", w.adapter], code=0)
    _assert_escaped(r.stdout)
    assert "\\x1b[2J" in r.stdout
    r = run(w, ["inspect", w.adapter, "-p", w.cache], code=0)
    _assert_escaped(r.stdout)
    r = run(w, ["inspect", w.adapter, "-p", w.cache, "--json"], code=0)
    [rep] = parse_json_lines(r.stdout)  # JSON escapes them itself, and round-trips
    assert any(FORGED in s["name"] for s in rep["skipped"])


def test_rich_markup_in_names_is_printed_literally(w: W, tmp_path: Path) -> None:
    marked = w.root / "[bold red]ad[/bold red]"
    shutil.copytree(w.adapter, marked)
    before = snapshot(w.root)
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["patch", str(marked), "-p", str(w.cache), "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert "[bold red]ad[/bold red]" in r.stderr
    assert snapshot(w.root) == before and (out / "adapter_model.safetensors").is_file()


def test_safe_text_escapes_every_control_and_keeps_text() -> None:
    from safelora_cli.render import safe_text

    for c in CONTROL:
        esc = safe_text(f"a{c}b")
        assert c not in esc and esc.startswith("a\\") and esc.endswith("b"), repr(esc)
    assert safe_text("model.layers.0.q_proj [1] é 中文 ü") == "model.layers.0.q_proj [1] é 中文 ü"
    assert safe_text("\udcff") == "\\udcff"  # an undecodable byte of a file name
    assert safe_text("\U000e0001") == "\\U000e0001"  # a tag character (format, invisible)


# ----------------------------------------------------------------------------- 9: environment


def _cli(
    w: W, env: dict[str, str], timeout: float = 120
) -> tuple[subprocess.CompletedProcess, float]:
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR",
            "MASTER_PORT", "LOCAL_RANK", "SAFELORA_DEBUG")}  # fmt: skip
    t0 = time.monotonic()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "safelora_cli",
            "patch",
            str(w.adapter),
            "-p",
            str(w.cache),
            "-o",
            str(w.out),
            "--device",
            "cpu",
        ],
        env={**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    return p, time.monotonic() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("env", "must"),
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT are not"),
        ({"WORLD_SIZE": "2", "RANK": "one"}, "RANK='one' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "RANK='5'"),
        (
            {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"},
            "MASTER_PORT='http'",
        ),
    ],
    ids=["no-master", "rank-not-int", "rank-too-big", "port-not-int"],
)
def test_stray_launcher_environment_is_a_clear_error(w: W, env: dict, must: str) -> None:
    before = snapshot(w.root)
    p, took = _cli(w, env)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and must in lines[0], p.stderr
    assert "accelerate launch or torchrun" in lines[1]
    assert snapshot(w.root) == before and took < 60


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_group_that_never_forms_fails_within_the_timeout(w: W, rank: str) -> None:
    before = snapshot(w.root)
    env = {"WORLD_SIZE": "2", "RANK": rank, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "SAFELORA_DIST_INIT_TIMEOUT": "1"}  # fmt: skip
    p, took = _cli(w, env)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 2, p.stderr  # the c10d connection log is not shown
    assert lines[0].startswith(
        f"error: rank {rank} of 2: the process group did not form within 1 s"
    )
    assert "SAFELORA_DIST_INIT_TIMEOUT" in lines[1]
    assert snapshot(w.root) == before
    assert took < 60, took


def test_invalid_dist_timeout_is_a_clear_error(w: W) -> None:
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "SAFELORA_DIST_INIT_TIMEOUT": "nan"}  # fmt: skip
    p, _ = _cli(w, env)
    assert p.returncode == 1 and "SAFELORA_DIST_INIT_TIMEOUT='nan'" in p.stderr, p.stderr
    assert math.isfinite(1.0)


@pytest.mark.parametrize("scale", [1e-24, 1e20], ids=["tiny-delta", "huge-delta"])
def test_alignment_delta_far_from_unit_scale_is_scored_not_called_zero(w: W, scale: float) -> None:
    """float32 squares of V's entries under/overflow: V must not read as 0 (or as Inf)."""
    g = torch.Generator().manual_seed(11)
    tb = load_file(str(w.base / "model.safetensors"))
    ta = load_file(str(w.aligned / "model.safetensors"))
    tb[QW] = scale * torch.randn(tb[QW].shape, generator=g)
    ta[QW] = tb[QW] + 0.1 * scale * torch.randn(tb[QW].shape, generator=g)
    save_file(tb, str(w.base / "model.safetensors"), metadata={"format": "pt"})
    save_file(ta, str(w.aligned / "model.safetensors"), metadata={"format": "pt"})
    want = oracle_cosines(w.base, w.aligned, w.adapter)
    models = ["--base", w.base, "--aligned", w.aligned]
    r = run(w, ["inspect", w.adapter, *models, "--json"], code=0)
    got = cosines(r.stdout)
    assert got[Q] is not None, "a nonzero alignment delta was reported as V = 0"
    assert got[Q] == pytest.approx(want[Q], abs=1e-5)
    gate = want[Q] + 1e-3
    run(w, ["inspect", w.adapter, *models, "--fail-below", gate], code=3, must=(Q,))


def test_nan_in_a_cache_entry_is_an_error_in_the_cache_summary(w: W) -> None:
    from safelora_cli.reader import read_header

    f = _entry_file(w.cache, QW)
    info = next(iter(read_header(f).tensors.values()))
    raw = bytearray(f.read_bytes())
    raw[info.start + 8 : info.start + 12] = b"\x00\x00\x80\x7f"  # float32 +Inf
    st = f.stat()
    f.write_bytes(bytes(raw))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    for extra in ([], ["--json"]):
        r = run(w, ["inspect", "-p", w.cache, *extra], code=1, must=(QW, "NaN or Inf"))
        assert r.stdout == ""
