from __future__ import annotations

import subprocess
import sys

import pytest

from rlaif import __version__
from rlaif.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_unknown_command_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["modles"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'models'" in err and len(err.strip().splitlines()) == 1


def test_console_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rlaif", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: rlaif" in out.stdout and "models" in out.stdout
