"""The docs cannot rot: their examples run, their flags exist, their links resolve.

Conventions in README.md and docs/*.md (docs/index.md repeats them for writers):

- A fenced ```` ```console ```` block is run. Each ``$ `` line is a command (a trailing ``\\``
  continues it on the next line); the lines after it, up to the next command, are its output
  and are compared with what it prints (:func:`output_matches`): its stdout, its stderr, or
  both (either order), line by line. A line ``...`` stands for any number of lines, ``...``
  inside a line for any text; absolute paths under the work tree are written
  ``/home/me/safelora/...``; times (``1.2 s``) and byte counts (``3.4 MB``) are not compared.
  A command without output lines is not compared. A command is expected to exit 0, or the
  code given by a trailing ``# exit N`` comment.
- A fenced ```` ```python ```` block right after the line ``<!-- docs-test: run -->`` is run
  as a script and must exit 0 (other python blocks are sketches, e.g. signatures).
- A console block right after the line ``<!-- docs-test: skip -->`` is not run (Hub ids,
  GPUs); ```` ```bash ````, ```` ```yaml ```` and other blocks never are. But every ``safelora``
  invocation in any block must name an existing subcommand and only options it has.

Runnable examples use the files ``make demo`` builds (``demo/base``, ``demo/aligned``,
``demo/adapters/benign-chat``, ``demo/adapters/drifted-chat``): each page runs, top to bottom,
in a fresh copy of that tree built by :func:`safelora_cli.demo.build`, so a page must create
what it uses (its own ``compute-projections`` first). Plain ``safelora`` commands run in
process (fast); anything with shell syntax runs under ``bash`` with ``safelora`` and ``python``
on ``PATH``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from safelora_cli import errors as errors_mod
from safelora_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SKIP_MARK = "<!-- docs-test: skip -->"
RUN_MARK = "<!-- docs-test: run -->"
EXIT_RE = re.compile(r"#\s*exit\s+(\d+)\s*$")
SHELL_OPS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "(", ")", "2>", "$(", "`"}


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: bool
    run_mark: bool

    @property
    def runnable(self) -> bool:
        if self.lang == "console":
            return not self.skip
        return self.lang == "python" and self.run_mark

    @property
    def where(self) -> str:
        return f"{_rel(self.page)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Fenced code blocks of a markdown page, in order."""
    out: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(2), m.group(3).lower()
        mark = lines[i - 1].strip() if i > 0 else ""
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            indent = m.group(1)
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        text = "\n".join(body)
        out.append(Block(page, start + 1, lang, text, mark == SKIP_MARK, mark == RUN_MARK))
        i += 1
    return out


def console_commands(text: str) -> list[tuple[str, int]]:
    """``$ `` commands of a console block (continuations joined) with their expected exit code."""
    cmds: list[tuple[str, int]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        if not line.startswith("$ "):
            continue
        cmd = line[2:]
        while cmd.endswith("\\") and i < len(lines):
            cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
            i += 1
        m = EXIT_RE.search(cmd)
        cmds.append((cmd, int(m.group(1)) if m else 0))
    return cmds


@dataclass(frozen=True)
class Step:
    """One ``$ `` command of a console block, its expected exit code and the output shown."""

    cmd: str
    code: int
    expected: tuple[str, ...]


def console_steps(text: str) -> list[Step]:
    """The commands of a console block with the output lines the page shows after each."""
    steps: list[Step] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        if not line.startswith("$ "):
            continue
        cmd = line[2:]
        while cmd.endswith("\\") and i < len(lines):
            cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
            i += 1
        out: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            out.append(lines[i].rstrip())
            i += 1
        while out and not out[-1]:
            out.pop()
        m = EXIT_RE.search(cmd)
        steps.append(Step(cmd, int(m.group(1)) if m else 0, tuple(out)))
    return steps


# What a page writes for the work tree, and what is not compared: durations and byte counts
# (they change with the machine and with compression, not with the code's results).
PAGE_ROOT = "/home/me/safelora"
_TIME = re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s)\b")
_SIZE = re.compile(r"\b\d+(?:[.,]\d+)?\s?(?:B|kB|KB|MB|GB|TB|KiB|MiB|GiB|bytes)\b")


def normalise(text: str, root: Path | None = None) -> list[str]:
    """Lines of output or of a page, with the work tree, times and sizes made comparable."""
    if root is not None:
        for r in sorted({str(root), str(root.resolve())}, key=len, reverse=True):
            text = text.replace(r, PAGE_ROOT)
    text = _SIZE.sub("<size>", _TIME.sub("<time>", text))
    lines = [ln.rstrip() for ln in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _pattern(expected: Sequence[str]) -> re.Pattern[str]:
    parts = []
    for line in expected:
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(r"[^\n]*".join(re.escape(p) for p in line.split("...")) + r"\n")
    return re.compile("".join(parts))


def output_matches(expected: Sequence[str], out: str, err: str, root: Path | None) -> bool:
    """True when the page's lines match stdout, stderr, or both together (either order)."""
    if not expected:
        return True
    pat = _pattern(normalise("\n".join(expected)))
    o, e = normalise(out, root), normalise(err, root)
    cands = (o, e, o + e, e + o)
    return any(pat.fullmatch("".join(ln + "\n" for ln in c)) for c in cands)


def shell_text(block: Block) -> str:
    """The shell text of a block, continuations joined, prompts and sample output dropped."""
    if block.lang == "console":
        return "\n".join(c for c, _ in console_commands(block.text))
    if block.lang in {"bash", "sh", "shell", "yaml", "yml"}:
        return re.sub(r"\\\n\s*", " ", block.text)
    return ""


def safelora_invocations(text: str) -> list[list[str]]:
    """Argument lists of every ``safelora ...`` call in shell text (up to a shell operator)."""
    calls: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("- run:") or line.startswith("run:"):
            line = line.split(":", 1)[1].strip()
        if "safelora" not in line:
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        try:
            tokens = list(lex)
        except ValueError:
            continue
        for j, tok in enumerate(tokens):
            if tok != "safelora":
                continue
            args: list[str] = []
            for t in tokens[j + 1 :]:
                if t in SHELL_OPS or set(t) <= set("|&;<>()"):
                    break
                args.append(t)
            calls.append(args)
    return calls


def _cli_options() -> dict[str, set[str]]:
    """Subcommand -> every option spelling it accepts (plus the root's own options)."""
    group = typer.main.get_command(app)
    ctx = typer.Context(group)
    out: dict[str, set[str]] = {}
    for name in group.list_commands(ctx):  # type: ignore[attr-defined]
        cmd = group.get_command(ctx, name)  # type: ignore[attr-defined]
        opts: set[str] = set()
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option":
                opts.update(p.opts)
                opts.update(p.secondary_opts)
        out[name] = opts
    root_opts: set[str] = set()
    for p in group.params:
        root_opts.update(p.opts)
    out[""] = root_opts
    return out


OPTIONS = _cli_options()


def _is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- static checks


@pytest.mark.parametrize("page", _pages(), ids=_rel)
def test_every_safelora_call_uses_real_subcommands_and_options(page: Path) -> None:
    problems: list[str] = []
    for block in blocks(page):
        for args in safelora_invocations(shell_text(block)):
            if not args or args[0].startswith("-"):
                bad = [a for a in args if a.startswith("-") and a not in OPTIONS[""]]
                bad = [a for a in bad if a not in ("-h", "--help")]
                if bad:
                    problems.append(f"{block.where}: safelora {' '.join(args)}: unknown {bad}")
                continue
            sub, rest = args[0], args[1:]
            if sub not in OPTIONS or sub == "":
                problems.append(f"{block.where}: unknown subcommand {sub!r}")
                continue
            for tok in rest:
                if not tok.startswith("-") or tok == "-" or _is_number(tok):
                    continue
                flag = tok.split("=", 1)[0]
                if flag not in OPTIONS[sub] and flag not in ("-h", "--help"):
                    problems.append(f"{block.where}: safelora {sub}: no option {flag}")
    assert not problems, "\n".join(problems)


def _strip_code(text: str) -> str:
    return re.sub(r"^(```|~~~).*?^(```|~~~)", "", text, flags=re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page (lower case, punctuation dropped, spaces to -)."""
    out: set[str] = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _strip_code(page.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("page", _pages(), ids=_rel)
def test_relative_links_resolve(page: Path) -> None:
    text = _strip_code(page.read_text(encoding="utf-8"))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{_rel(page)}: broken links {broken}"


def test_anchor_slugs_follow_github(tmp_path: Path) -> None:
    page = tmp_path / "probe.md"
    page.write_text(
        "# GPU or CPU?\n## Disk and memory for 7B and 70B models\n```\n# not a heading\n```\n"
    )
    assert anchors(page) == {"gpu-or-cpu", "disk-and-memory-for-7b-and-70b-models"}


def _resolve(dotted: str) -> object | None:
    """The object ``dotted`` (``safelora_cli.mod.attr...``) names; None when there is none."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return None
            obj = getattr(obj, attr)
        return obj
    return None


@pytest.mark.parametrize("page", _pages(), ids=_rel)
def test_python_names_in_docs_exist(page: Path) -> None:
    """Every ``safelora_cli.x.y`` a page names (prose or code) exists and has a docstring."""
    names = set(re.findall(r"\bsafelora_cli(?:\.[A-Za-z_]\w*)+", page.read_text(encoding="utf-8")))
    objs = {n: _resolve(n) for n in names}
    missing = sorted(n for n, o in objs.items() if o is None)
    assert not missing, f"{_rel(page)} names {missing}, which do not exist"
    undocumented = sorted(
        n
        for n, o in objs.items()
        if callable(o) and not (getattr(o, "__doc__", None) or "").strip()
    )
    assert not undocumented, f"{_rel(page)} points readers to {undocumented}: no docstring"


def test_index_links_every_page() -> None:
    """docs/index.md reaches every page, and README.md reaches the index."""
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = {t.split("#", 1)[0] for t in re.findall(r"\]\(([^)\s]+)\)", index)}
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert not pages - linked, f"docs/index.md does not link {sorted(pages - linked)}"
    assert "docs/index.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_make_targets_in_docs_exist() -> None:
    """Every ``make TARGET`` a page shows is a target of the Makefile."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, flags=re.M))
    shown = set()
    for page in _pages():
        for block in blocks(page):
            shown.update(re.findall(r"\bmake ([a-z][\w-]*)", block.text))
        shown.update(re.findall(r"`make ([a-z][\w-]*)", page.read_text(encoding="utf-8")))
    assert {"demo", "test"} <= shown
    assert not shown - targets, f"docs show make targets the Makefile lacks: {shown - targets}"


def test_compute_projections_page_lists_every_flag() -> None:
    text = (DOCS / "compute-projections.md").read_text(encoding="utf-8")
    long_flags = {o for o in OPTIONS["compute-projections"] if o.startswith("--")}
    missing = sorted(f for f in long_flags if f not in text and f != "--help")
    assert not missing, f"docs/compute-projections.md does not document {missing}"


def test_every_flag_is_documented_somewhere() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in _pages())
    missing = sorted(
        f"{sub} {flag}"
        for sub, flags in OPTIONS.items()
        for flag in flags
        if sub and flag.startswith("--") and flag != "--help" and flag not in text
    )
    assert not missing, f"flags no page mentions: {missing}"


def test_errors_page_covers_every_error_class_and_exit_code() -> None:
    text = (DOCS / "errors.md").read_text(encoding="utf-8")
    classes = [
        name
        for name, obj in vars(errors_mod).items()
        if isinstance(obj, type) and issubclass(obj, errors_mod.SafeLoraError)
    ]
    assert "SafeLoraError" in classes and len(classes) >= 7
    missing = [c for c in classes if c not in text]
    assert not missing, f"docs/errors.md does not mention {missing}"
    for code in (
        errors_mod.EXIT_OK,
        errors_mod.EXIT_ERROR,
        errors_mod.EXIT_USAGE,
        errors_mod.EXIT_GATE,
    ):
        assert re.search(rf"\b{code}\b", text), f"docs/errors.md does not mention exit code {code}"


def test_convention_parser_reads_what_it_should() -> None:
    """The extractor itself: continuations, exit comments, shell operators, skip marks."""
    text = "$ safelora patch a \\\n    -p c -o o  # exit 2\nsample output\n$ ls demo | wc -l\n"
    assert console_commands(text) == [
        ("safelora patch a -p c -o o  # exit 2", 2),
        ("ls demo | wc -l", 0),
    ]
    calls = safelora_invocations("x=1 && safelora inspect a -p c --json | tee r.jsonl # note")
    assert calls == [["inspect", "a", "-p", "c", "--json"]]
    assert safelora_invocations("      - run: safelora inspect a --fail-below 0.2") == [
        ["inspect", "a", "--fail-below", "0.2"]
    ]
    simple = simple_command("X=1 safelora inspect a -p c --json > out.jsonl  # exit 3")
    assert simple == Simple(
        {"X": "1"}, ["safelora", "inspect", "a", "-p", "c", "--json"], "out.jsonl"
    )
    py = simple_command("""python -c "import json; print(json.dumps({'a': 1}))" """)
    assert py is not None and py.argv[2] == "import json; print(json.dumps({'a': 1}))"
    assert simple_command("for a in x/*; do safelora patch $a; done") is None
    assert simple_command("safelora inspect a | head") is None
    assert _resolve("safelora_cli.selection.Selection.from_flags") is not None
    assert _resolve("safelora_cli.selection.no_such_name") is None
    assert _resolve("safelora_cli.no_such_module") is None


def test_output_comparison_catches_a_changed_number(tmp_path: Path) -> None:
    """What the page shows must be what the command prints, up to times, sizes and paths."""
    page = console_steps(
        "$ safelora patch a -p c -o o\n"
        "a: projected 3 of 8 modules; Pdst 0.9796\n"
        "  ...\n"
        "  written to /home/me/safelora/demo/o in 1.5 s (12.3 MB)\n"
        "$ ls\n"
    )
    assert [s.cmd for s in page] == ["safelora patch a -p c -o o", "ls"]
    assert page[1].expected == ()
    want = page[0].expected
    printed = (
        "a: projected 3 of 8 modules; Pdst {}\n  x\n  y\n  written to {}/demo/o in 0.2 s (9.9 kB)\n"
    )
    assert output_matches(want, "", printed.format("0.9796", tmp_path), tmp_path)
    assert not output_matches(want, "", printed.format("0.9793", tmp_path), tmp_path)
    assert not output_matches(want, "", printed.format("0.9796", "/elsewhere"), tmp_path)
    # stdout or stderr alone, or both in either order; "..." inside a line is any text.
    assert output_matches(['{"pdst": 1.0, ...}'], '{"pdst": 1.0, "k": 3}\n', "note\n", None)
    assert not output_matches(['{"pdst": 1.0, ...}'], '{"pdst": 0.99, "k": 3}\n', "", None)
    assert output_matches(["out", "err"], "out\n", "err\n", None)
    assert not output_matches(["out"], "out\nmore\n", "", None)


# ----------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inputs ``make demo`` builds, once per module; pages run in copies of it."""
    from safelora_cli.demo import build

    root = tmp_path_factory.mktemp("docs_demo")
    # Built from its parent with a relative path, as `make demo` does from the repository root,
    # so the adapters' base_model_name_or_path reads "demo/aligned" as the pages show.
    here = Path.cwd()
    os.chdir(root)
    try:
        build(Path("demo"))
    finally:
        os.chdir(here)
    return root


def _shim_dir(where: Path) -> Path:
    """``safelora`` and ``python`` on PATH for shell examples, both this interpreter."""
    bin_dir = where / "_bin"
    bin_dir.mkdir(exist_ok=True)
    for name, target in (("safelora", "-m safelora_cli"), ("python", "")):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" {target} "$@"\n')
        script.chmod(0o755)
    return bin_dir


@dataclass(frozen=True)
class Simple:
    """A command the test can run in process: env assignments, argv, optional ``> file``."""

    env: dict[str, str]
    argv: list[str]
    redirect: str | None


def simple_command(cmd: str) -> Simple | None:
    """``[VAR=value ...] safelora|python -c ... [> file]``, or None for anything shell-like."""
    if "$" in cmd or "`" in cmd:
        return None
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError:
        return None
    redirect = None
    if len(tokens) >= 2 and tokens[-2] == ">":
        redirect, tokens = tokens[-1], tokens[:-2]
    env: dict[str, str] = {}
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        key, _, value = tokens.pop(0).partition("=")
        env[key] = value
    if not tokens or any(t in SHELL_OPS or set(t) <= set("|&;<>()") for t in tokens):
        return None
    if tokens[0] == "safelora" or (
        tokens[0] == "python" and len(tokens) == 3 and tokens[1] == "-c"
    ):
        return Simple(env, tokens, redirect)
    return None


def _run_python(code: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``code`` as ``__main__`` in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    rc = 0
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                exec(compile(code, "<docs example>", "exec"), {"__name__": "__main__"})
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:
                traceback.print_exc()
                rc = 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, out.getvalue(), err.getvalue()


def _check_output(
    where: str, cmd: str, rc: int, want: int, out: str, err: str, *, json_lines: bool = False
) -> list[str]:
    problems: list[str] = []
    tail = "\n".join(err.strip().splitlines()[-6:])
    if rc != want:
        problems.append(f"{where}: `{cmd}` exited {rc}, the page says {want}\n{tail}")
        return problems
    if "Traceback" in err:
        problems.append(f"{where}: `{cmd}` printed a traceback\n{tail}")
    if rc not in (0, 3) and "error:" not in err.lower():
        problems.append(f"{where}: `{cmd}` failed without an `error:` line\n{tail}")
    if json_lines and rc in (0, 3):
        for line in out.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                problems.append(f"{where}: `{cmd}` printed a non-JSON line: {line[:80]!r}")
                break
            if not isinstance(obj, dict):
                problems.append(f"{where}: `{cmd}` printed JSON that is not an object")
    return problems


def _runnable_pages() -> list[Path]:
    return [p for p in _pages() if any(b.runnable for b in blocks(p))]


@pytest.mark.parametrize("page", _runnable_pages(), ids=_rel)
def test_page_examples_run(
    page: Path, demo_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    shutil.copytree(demo_tree, work)
    bin_dir = _shim_dir(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("SAFELORA_DEBUG", None)
    monkeypatch.chdir(work)
    runner = CliRunner()
    problems: list[str] = []
    for block in blocks(page):
        if not block.runnable:
            continue
        if block.lang == "python":
            rc, out, err = _run_python(block.text, {})
            problems += _check_output(block.where, "python block", rc, 0, out, err)
            continue
        for step in console_steps(block.text):
            cmd, want = step.cmd, step.code
            simple = simple_command(cmd)
            if simple is None:
                res = subprocess.run(
                    ["bash", "-c", cmd],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                rc, out, err = res.returncode, res.stdout, res.stderr
            elif simple.argv[0] == "python":
                rc, out, err = _run_python(simple.argv[2], simple.env)
            else:
                result = runner.invoke(app, simple.argv[1:], env=simple.env)
                rc, out, err = result.exit_code, result.stdout, result.stderr
                if result.exception is not None and not isinstance(result.exception, SystemExit):
                    err += f"\nTraceback: {type(result.exception).__name__}: {result.exception}"
            if simple is not None and simple.redirect is not None:
                (work / simple.redirect).write_text(out)
            json_lines = simple is not None and "--json" in simple.argv
            problems += _check_output(block.where, cmd, rc, want, out, err, json_lines=json_lines)
            if not output_matches(step.expected, out, err, work):
                shown = "\n".join(normalise(out + err, work))
                problems.append(
                    f"{block.where}: `{cmd}` printed something else than the page shows.\n"
                    f"page:\n" + "\n".join(step.expected) + f"\nprinted:\n{shown}"
                )
    assert not problems, "\n\n".join(problems)
