"""Progress bars: drawn in place on a terminal, plain lines in a log, off on request."""

from __future__ import annotations

import io

import pytest

from rlaif.progress import log_interval, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_plain_line_per_new_count(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLAIF_PROGRESS_S", "0")
    bar = progress(total=3, desc="label", unit="pair")
    for _ in range(3):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(" [")[0] for line in lines] == [f"label: {n}/3" for n in (0, 1, 2, 3)]
    assert lines[-1].endswith("pair/s]")


def test_a_short_loop_in_a_log_writes_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RLAIF_PROGRESS_S", raising=False)  # 60 s
    assert sum(progress(range(50), desc="quick")) == sum(range(50))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("how", ["env", "show"])
def test_bars_can_be_turned_off(
    how: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLAIF_PROGRESS_S", "0")
    if how == "env":
        monkeypatch.setenv("RLAIF_PROGRESS", "off")
    assert list(progress(range(4), desc="x", show=how != "show")) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_redrawn_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    monkeypatch.setenv("RLAIF_PROGRESS_S", "0")
    for _ in progress(range(3), desc="sft", mininterval=0):
        pass
    out = term.getvalue()
    assert "\r" in out and "sft: 100%|" in out


def test_a_postfix_in_a_log_waits_for_the_next_timed_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """tqdm redraws on every set_postfix; in a log that would be a line per training step."""
    monkeypatch.setenv("RLAIF_PROGRESS_S", "3600")
    bar = progress(total=5, desc="sft", unit="step")
    for step in range(5):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
        bar.set_postfix_str(f"step {step}")
    bar.close()
    assert capsys.readouterr().err == ""


def test_nested_bars_in_a_log_write_no_cursor_moves(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLAIF_PROGRESS_S", "0")
    outer = progress(total=2, desc="revise", unit="prompt")
    for _ in range(2):
        for _ in progress(range(2), desc="generate", unit="seq", leave=False):
            pass
        outer.update(1)
    outer.close()
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err
    assert "revise: 2/2" in err and "generate: 2/2" in err


@pytest.mark.parametrize("value", ["abc", "-1", "inf", "nan", ""])
def test_a_bad_interval_is_a_user_error_naming_the_variable(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlaif.errors import UserError

    monkeypatch.setenv("RLAIF_PROGRESS_S", value)
    with pytest.raises(UserError, match="RLAIF_PROGRESS_S="):
        log_interval()
    monkeypatch.setenv("RLAIF_PROGRESS_S", "0.5")
    assert log_interval() == 0.5
