"""The CLI frame: version, help, lazy imports, and the one error-to-exit-code mapping."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from safelora_cli import __version__
from safelora_cli.cli import app, cli_errors
from safelora_cli.errors import (
    AdapterError,
    CacheError,
    CheckpointError,
    GateError,
    OutputError,
    SafeLoraError,
    SourceError,
    UsageError,
)

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"safelora {__version__}"


def test_help_lists_the_three_subcommands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("compute-projections", "patch", "inspect"):
        assert name in result.stdout


def test_python_dash_m_works() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "safelora_cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == f"safelora {__version__}"


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from safelora_cli.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "for sub in ('compute-projections', 'patch', 'inspect'):\n"
        "    try:\n        app([sub, '--help'])\n    except SystemExit:\n        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stderr.strip().splitlines()[-1] == "NOTORCH"


def _app_raising(exc: BaseException) -> typer.Typer:
    t = typer.Typer(pretty_exceptions_enable=False)

    @t.command()
    @cli_errors
    def boom() -> None:
        raise exc

    return t


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (CheckpointError("bad header in /x/model.safetensors", hint="Re-download it."), 1),
        (SourceError("no such path or repo id: foo"), 1),
        (AdapterError("adapter_config.json is missing in /a", hint="Point at a PEFT dir."), 1),
        (CacheError("cache /c was built from other weights"), 1),
        (OutputError("/o exists", hint="Use --force."), 1),
        (UsageError("--num-layers and --threshold are mutually exclusive."), 2),
        (GateError("cosine 0.1 below 0.2 in model.layers.0.q_proj"), 3),
    ],
)
def test_library_errors_map_to_exit_codes_and_short_messages(exc: SafeLoraError, code: int) -> None:
    result = runner.invoke(_app_raising(exc), [])
    assert result.exit_code == code
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"error: {exc.message}"
    assert len(lines) == (2 if exc.hint else 1)
    assert "Traceback" not in result.output


def test_unexpected_exception_is_one_clean_message() -> None:
    result = runner.invoke(_app_raising(ZeroDivisionError("boom")), [])
    assert result.exit_code == 1
    assert "internal error: ZeroDivisionError: boom" in result.stderr
    assert "SAFELORA_DEBUG=1" in result.stderr
    assert "Traceback" not in result.stderr


def test_oserror_names_the_file() -> None:
    exc = OSError(28, "No space left on device", "/out/adapter_model.safetensors")
    result = runner.invoke(_app_raising(exc), [])
    assert result.exit_code == 1
    assert "No space left on device: /out/adapter_model.safetensors" in result.stderr


def test_debug_env_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFELORA_DEBUG", "1")
    result = runner.invoke(_app_raising(CacheError("corrupt")), [])
    assert result.exit_code == 1
    assert isinstance(result.exception, CacheError)


def test_usage_error_from_typer_is_exit_2() -> None:
    result = runner.invoke(app, ["patch", "--no-such-flag"])
    assert result.exit_code == 2


def test_console_script_reports_errors_without_traceback(tmp_path: os.PathLike) -> None:
    env = dict(os.environ, SAFELORA_DEBUG="0")
    out = subprocess.run(
        [sys.executable, "-m", "safelora_cli", "inspect", "-p", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode in (1, 2)
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") or "Usage" in out.stderr
