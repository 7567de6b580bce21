"""What a new user sees (issue 18): narrow terminals, summaries, nothing to project, the gate's
table, usage lines, completion, progress bars, sizes and grammar."""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from safelora_cli import render
from safelora_cli.cli import app
from safelora_cli.commands import inspect as inspect_cmd
from tests import factory
from tests.test_inspect import golden_case
from tests.test_patch import build_cache, oracle
from tests.test_scoring import oracle_select

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _terminal(monkeypatch: pytest.MonkeyPatch, width: int) -> io.StringIO:
    """stdout is a rich terminal ``width`` columns wide (as tests/test_inspect_cli.py does)."""
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=width, color_system="standard")
    monkeypatch.setattr(render, "is_plain", lambda stderr=False: False)
    monkeypatch.setattr(render, "out_console", lambda: console)
    return buf


# ----------------------------------------------------------------------------- narrow terminals


ROWS = [
    ["    0", "mlp.gate_proj", "14336x4096", "16", "2", "123.5", "0.03312", "yes"],
    ["    0", "self_attn.q_proj", "4096x4096", "16", "0.125", "3.5e-05", "0.53312", "no: cos > t"],
]


@pytest.mark.parametrize("width", [120, 80, 60, 40])
def test_no_cell_is_cut_and_no_column_dropped(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    buf = _terminal(monkeypatch, width)
    inspect_cmd._emit_table(inspect_cmd.SCORE_COLS, [ROWS[:1], ROWS[1:]])
    out = ANSI.sub("", buf.getvalue())
    assert "…" not in out
    # Every column is there by its header (stacked blocks are titled by the module name).
    for col in inspect_cmd.SCORE_COLS:
        assert col.header in out or (col.header == "module" and width < 80), (width, col.header)
    for row in ROWS:
        for cell in row:
            # Each cell whole, on one line (a number cut across lines would not match).
            assert any(cell.strip() in ln for ln in out.splitlines()), (width, cell)
    assert max(len(ln.rstrip()) for ln in out.splitlines()) <= width


def test_narrow_terminal_stacks_rows_wide_one_keeps_the_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buf = _terminal(monkeypatch, 120)
    inspect_cmd._emit_table(inspect_cmd.SCORE_COLS, [ROWS])
    wide = ANSI.sub("", buf.getvalue()).splitlines()
    assert wide[0].split() == [c.header for c in inspect_cmd.SCORE_COLS]
    buf = _terminal(monkeypatch, 60)
    inspect_cmd._emit_table(inspect_cmd.SCORE_COLS, [ROWS])
    narrow = ANSI.sub("", buf.getvalue()).splitlines()
    assert narrow[0].startswith("layer 0  mlp.gate_proj")
    assert "cosine 0.03312" in "\n".join(narrow) and "projected yes" in "\n".join(narrow)


def test_inspect_on_a_40_column_terminal_shows_every_cosine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = golden_case(tmp_path)
    monkeypatch.chdir(tmp_path)
    buf = _terminal(monkeypatch, 40)
    r = runner.invoke(app, ["inspect", "adapter", "-p", "cache", "-k", "2"])
    assert r.exit_code == 0, r.stderr
    out = ANSI.sub("", buf.getvalue())
    # The hand-computed cosines of the golden case (tests/test_inspect.golden_case).
    for cos in ("0.60000", "0.60000", "1.00000", "0.38462"):
        assert f"cosine {cos}" in out
    assert out.count("projected yes") == 3 and out.count("projected no") == 3
    assert case is not None


# ----------------------------------------------------------------------------- patch summary


@pytest.fixture
def wide(tmp_path: Path) -> dict[str, Any]:
    """12 LoRA modules (6 layers x q/v), a cache of every weight."""
    pair = factory.make_pair(tmp_path, layers=6)
    ad = factory.write_adapter(tmp_path / "adapter", base=pair.base)
    return {"pair": pair, "ad": ad, "cache": build_cache(tmp_path, pair)}


def _listed(stderr: str, heading: str) -> list[str]:
    """Module names listed under ``heading`` in the patch summary (until the next heading)."""
    lines = stderr.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == heading)
    names = []
    for ln in lines[start + 1 :]:
        m = re.fullmatch(r"\s{4}(-?\d\.\d{5})  (\S+)", ln)
        if not m:
            break
        names.append(m.group(2))
    return names


def test_summary_names_every_projected_module(wide: dict, tmp_path: Path) -> None:
    cos = {k: v["cos"] for k, v in oracle(wide["pair"], wide["ad"], False).items()}
    want = oracle_select(cos, "num_layers", 7)
    r = runner.invoke(
        app,
        ["patch", str(wide["ad"]), "-p", str(wide["cache"]), "-o", str(tmp_path / "o"), "-k", "7"],
    )
    assert r.exit_code == 0, r.stderr
    assert f"projected {len(want)} of 12 modules" in r.stderr
    assert set(_listed(r.stderr, "projected:")) == want
    kept = _listed(r.stderr, "not projected, lowest cosines:")
    assert len(kept) == 3 and not set(kept) & want
    lowest_kept = sorted((round(cos[n], 5), n) for n in cos if n not in want)[:3]
    assert kept == [n for _, n in lowest_kept]
    assert f"+{12 - len(want) - 3} more (safelora_report.json)" in r.stderr


def test_summary_beyond_ten_points_to_the_report(wide: dict, tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        ["patch", str(wide["ad"]), "-p", str(wide["cache"]), "-o", str(tmp_path / "o"), "-f", "1"],
    )
    assert r.exit_code == 0, r.stderr
    assert len(_listed(r.stderr, "projected:")) == 10
    assert "    +2 more (safelora_report.json)" in r.stderr
    assert "not projected" not in r.stderr
    rep = json.loads((tmp_path / "o" / "safelora_report.json").read_text())
    assert sum(m["projected"] for m in rep["modules"]) == 12
    r = runner.invoke(
        app,
        [
            "patch",
            str(wide["ad"]),
            "-p",
            str(wide["cache"]),
            "-o",
            str(tmp_path / "d"),
            "-f",
            "1",
            "--dry-run",
        ],
    )
    assert "would project:" in r.stderr and "+2 more (--json lists all)" in r.stderr


# ----------------------------------------------------------------------------- nothing to project


@pytest.mark.parametrize("kind", ["untrained", "dora", "no-signal"])
def test_nothing_to_project_is_an_error_unless_asked(tmp_path: Path, kind: str) -> None:
    same = [f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")]
    pair = factory.make_pair(tmp_path, same=same if kind == "no-signal" else ())
    kw: dict[str, Any] = {}
    if kind == "untrained":
        kw["zero_b"] = ("q_proj", "v_proj")
    if kind == "dora":
        kw["use_dora"] = True
    ad = factory.write_adapter(tmp_path / "adapter", base=pair.base, **kw)
    before = {p.name: p.read_bytes() for p in ad.iterdir()}
    cache = build_cache(tmp_path, pair)
    out = tmp_path / "out"
    args = ["patch", str(ad), "-p", str(cache), "-o", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    first = r.stderr.splitlines()[0]
    assert first.startswith("error: adapter ") and "nothing to project" in first
    reason = {"untrained": "untrained LoRA", "dora": "DoRA", "no-signal": "no alignment signal"}
    assert reason[kind] in first
    assert "--allow-unchanged" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    assert {p.name: p.read_bytes() for p in ad.iterdir()} == before
    r = runner.invoke(app, [*args, "--dry-run"])
    assert r.exit_code == 1 and "nothing to project" in r.stderr

    r = runner.invoke(app, [*args, "--allow-unchanged"])
    assert r.exit_code == 0, r.stderr
    assert "projected 0 of" in r.stderr
    assert (out / "adapter_model.safetensors").exists()


def test_a_batch_with_one_empty_adapter_writes_nothing(tmp_path: Path) -> None:
    pair = factory.make_pair(tmp_path)
    good = factory.write_adapter(tmp_path / "good", base=pair.base)
    empty = factory.write_adapter(tmp_path / "empty", base=pair.base, zero_b=("proj",))
    cache = build_cache(tmp_path, pair)
    out = tmp_path / "out"
    r = runner.invoke(app, ["patch", str(good), str(empty), "-p", str(cache), "-o", str(out)])
    assert r.exit_code == 1 and "empty" in r.stderr.splitlines()[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- the gate's table


def test_gate_without_selection_shows_the_gate_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    golden_case(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["inspect", "adapter", "-p", "cache", "--fail-below", "0.5"])
    assert r.exit_code == 3
    lines = r.stdout.splitlines()
    assert lines[1].split()[-1] == "gate" and "projected" not in lines[1]
    rows = {(ln.split()[0], ln.split()[1]): ln for ln in lines[3:] if ln[:5].strip().isdigit()}
    # Hand-computed cosines: 0.6, 0.6, 1 pass; 5/13 = 0.38462 fails; two have none.
    assert rows[("0", "self_attn.q_proj")].endswith("pass")
    assert rows[("0", "self_attn.k_proj")].endswith("pass")
    assert rows[("0", "self_attn.v_proj")].endswith("pass")
    assert rows[("1", "self_attn.v_proj")].endswith("FAIL: < 0.5")
    assert rows[("1", "self_attn.q_proj")].endswith("no cosine")
    assert rows[("1", "self_attn.k_proj")].endswith("no cosine")
    assert "gate --fail-below 0.5: 1 of 4 modules have a cosine below 0.5" in r.stdout
    assert "patch's default --num-layers 10 would project 4 of 6" in r.stdout
    # With a selection flag, the column is the selection's again.
    r = runner.invoke(app, ["inspect", "adapter", "-p", "cache", "--fail-below", "0.5", "-k", "1"])
    assert r.exit_code == 3 and r.stdout.splitlines()[1].split()[-1] == "projected"


# ----------------------------------------------------------------------------- polish


def test_usage_lines_name_the_arguments() -> None:
    want = {
        "compute-projections": "Usage: safelora compute-projections [OPTIONS] BASE ALIGNED",
        "patch": "Usage: safelora patch [OPTIONS] ADAPTER...",
        "inspect": "Usage: safelora inspect [OPTIONS] [ADAPTER]...",
    }
    for sub, line in want.items():
        r = runner.invoke(app, [sub, "--help"])
        assert r.exit_code == 0
        assert r.stdout.splitlines()[0] == line
        assert "{" not in r.stdout.splitlines()[0]


def test_shell_completion_is_offered() -> None:
    r = runner.invoke(app, ["--help"])
    assert "--install-completion" in r.stdout and "--show-completion" in r.stdout
    # typer detects the shell from the process tree, so run it from bash as a user would (under
    # make or CI the nearest shell is sh, which typer does not support).
    # (The trailing "exit" keeps bash from exec'ing the command, which would leave no bash.)
    cmd = f"{shlex.quote(sys.executable)} -m safelora_cli --show-completion; exit $?"
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "complete -o default -F _safelora_completion safelora" in p.stdout
    assert "_SAFELORA_COMPLETE=complete_bash" in p.stdout


def _bar_text(progress: render.RichProgress) -> str:
    """The bar's current row as plain text (rendered off-screen, wide enough for every cell)."""
    assert progress._bar is not None
    con = Console(file=io.StringIO(), width=200, color_system=None)
    with con.capture() as cap:
        con.print(progress._bar.make_tasks_table(progress._bar.tasks))
    return cap.get()


def test_progress_labels_elapsed_left_and_the_current_weight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    err = Console(file=io.StringIO(), force_terminal=True, width=200)
    monkeypatch.setattr(render, "err_console", lambda: err)
    p = render.RichProgress(label="scoring")
    p.enabled = True
    p.start(4, "projecting")
    try:
        p.item("model.layers.3.self_attn.q_proj.weight")
        p.advance(1, 2_000_000)
        text = _bar_text(p)
    finally:
        p.finish()
    assert text.startswith("scoring") and "projecting" not in text
    assert "1/4" in text and "MB/s" in text
    assert re.search(r"elapsed \d+:\d\d:\d\d", text)
    assert re.search(r"left (\d+:\d\d:\d\d|-:--:--)", text)
    assert "model.layers.3.self_attn.q_proj.weight" in text


def test_inspect_bar_says_scoring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    golden_case(tmp_path)
    monkeypatch.chdir(tmp_path)
    seen: list[tuple[str | None, str]] = []

    class Spy(render.RichProgress):
        def start(self, total: int, description: str) -> None:
            seen.append((self.label, description))

    monkeypatch.setattr(render, "RichProgress", Spy)
    r = runner.invoke(app, ["inspect", "adapter", "-p", "cache"])
    assert r.exit_code == 0, r.stderr
    assert seen and seen[0][0] == "scoring"


def test_library_names_each_weight_to_the_progress(tmp_path: Path) -> None:
    from safelora_cli.patch import patch_adapters

    pair = factory.make_pair(tmp_path)
    ad = factory.write_adapter(tmp_path / "adapter", base=pair.base)
    cache = build_cache(tmp_path, pair)
    events: list[Any] = []

    class Recorder:
        def start(self, total: int, description: str) -> None:
            events.append(("start", total))

        def item(self, name: str) -> None:
            events.append(("item", name))

        def advance(self, units: int = 1, nbytes: int = 0) -> None:
            events.append(("advance", units))

        def finish(self) -> None:
            events.append(("finish",))

    patch_adapters([str(ad)], tmp_path / "o", projections=cache, progress=Recorder())
    items = [e[1] for e in events if e[0] == "item"]
    total = events[0][1]
    want = {
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")
    }
    assert set(items) == want and len(items) == total == 4
    assert sum(e[1] for e in events if e[0] == "advance") == 4 and events[-1] == ("finish",)


def test_sizes_in_gb_and_one_weight() -> None:
    from safelora_cli.compute import ComputeSummary

    s = ComputeSummary(
        cache_dir=Path("c"),
        computed=1,
        skipped=0,
        bytes_read=2_500_000_000,
        seconds=1.0,
        cache_bytes=64_000_000,
        device="cpu",
    )
    line = s.line()
    assert line.startswith("1 weight computed;")
    assert "read 2.50 GB" in line and "is 64.0 MB" in line
    s.computed = 2
    assert s.line().startswith("2 weights computed;")


def test_gate_cell_fails_closed_like_the_gate() -> None:
    """The column agrees with the gate: C B A = 0 fails, B A = 0 and V = 0 are not gated."""
    from types import SimpleNamespace

    from safelora_cli import scoring

    def mod(cosine: float | None, reason: str | None) -> Any:
        return SimpleNamespace(name="m", cosine=cosine, reason=reason)

    cell = inspect_cmd._gate_cell
    assert cell(mod(None, scoring.REASON_ORTHOGONAL), 0.2) == "FAIL: CBA = 0"
    assert cell(mod(None, scoring.REASON_UNTRAINED), 0.2) == "no cosine"
    assert cell(mod(None, scoring.REASON_NO_SIGNAL.format(weight="w")), 0.2) == "no cosine"
    assert cell(mod(0.199996, None), 0.2) == "pass"  # rounds to 0.20000, as the table shows
    assert cell(mod(0.199994, None), 0.2) == "FAIL: < 0.2"  # rounds to 0.19999
    assert cell(mod(0.2, None), 0.2) == "pass"
    assert cell(mod(0.19, None), 0.2) == "FAIL: < 0.2"
