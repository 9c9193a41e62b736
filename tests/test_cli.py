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


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RLAIF_PROGRESS_S", "abc"),
        ("RLAIF_PROGRESS_S", "-5"),
        ("RLAIF_PROGRESS_S", "nan"),
        ("RLAIF_LOG", "loud"),
    ],
)
def test_a_bad_environment_setting_is_one_line_before_any_work(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Named in one line with exit 2 before the config is even read (the config file here does
    not exist, and that is not what the error says); ``--help`` still works."""
    monkeypatch.setenv(name, value)
    assert main(["revise", "no-such-config.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"rlaif revise: error: {name}={value!r}: " + err.split(": ", 3)[3]
    assert len(err.splitlines()) == 1 and "no-such-config" not in err
    assert main(["revise", "--help"]) == 0


def test_good_environment_settings_pass(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RLAIF_PROGRESS_S", "2.5")
    monkeypatch.setenv("RLAIF_LOG", "warning")
    assert main(["revise", "no-such-config.yaml"]) == 2
    assert "no-such-config.yaml: no such file" in capsys.readouterr().err
