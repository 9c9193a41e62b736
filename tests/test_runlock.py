"""One writer per run directory (rlaif.runlock): a second command refuses in one line; a killed
holder leaves no stale lock; processes forked by the holder do not keep it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from rlaif.cli import main
from rlaif.errors import UserError
from rlaif.runlock import LOCK_NAME, hold

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from rlaif.runlock import hold
    with hold(Path(sys.argv[1]), "rlaif sft"):
        if sys.argv[2] == "fork":
            child = os.fork()
            if child == 0:
                time.sleep(120)
                os._exit(0)
            print("child", child, flush=True)
        print("held", flush=True)
        time.sleep(120)
    """
)


@contextmanager
def holder(run_dir: Path, fork: bool = False) -> Iterator[tuple[subprocess.Popen[str], int | None]]:
    """Another process holding ``run_dir``'s lock (and its forked child's pid, when asked)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), "fork" if fork else "plain"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    child = None
    try:
        line = proc.stdout.readline().split()
        if fork:
            child = int(line[1])
            line = proc.stdout.readline().split()
        assert line == ["held"], line
        yield proc, child
    finally:
        proc.kill()
        proc.wait()
        if child is not None:
            kill_quietly(child)


def kill_quietly(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_second_command_refuses_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    run_dir = tmp_path / "run"
    with holder(run_dir) as (proc, _):
        code = main(["revise", f"run_dir={run_dir}"])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"rlaif revise: error: {run_dir}: in use by another rlaif command")
        assert f"pid {proc.pid} on " in err and "'rlaif sft'" in err
        with pytest.raises(UserError, match="in use"), hold(run_dir, "rlaif ppo"):
            pass
    assert not (run_dir / "revisions.jsonl").exists()  # refused before any work


def test_a_killed_holder_leaves_no_stale_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    with holder(tmp_path) as (proc, _):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with hold(tmp_path, "rlaif sft"):  # taken at once: the kernel dropped the dead one's
            info = (tmp_path / LOCK_NAME).read_text()
        assert f'"pid": {os.getpid()}' in info


def test_processes_forked_by_the_holder_do_not_keep_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    with holder(tmp_path, fork=True) as (proc, child):
        assert child is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the forked child still runs ...
        with hold(tmp_path, "rlaif sft"):  # ... and the lock is free
            pass


def test_released_when_the_command_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    with hold(tmp_path, "rlaif sft"):
        pass
    with holder(tmp_path):  # another process takes it after this one's command ended
        pass


def test_launched_workers_leave_it_to_rank_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with holder(tmp_path / "run"), hold(tmp_path / "run", "rlaif sft"):
        pass  # rank 1 runs beside rank 0, which holds the lock
    for world, rank in (("2", "0"), ("1", "1")):  # rank 0 of a launch; a stray RANK alone
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("RANK", rank)
        with (
            holder(tmp_path / "run"),
            pytest.raises(UserError, match="in use"),
            hold(tmp_path / "run", "rlaif sft"),
        ):
            pass


def test_a_nested_hold_keeps_the_outer_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rlaif run` holds the lock while its stages run in the same process: a hold inside it must
    not open and close the file again (closing any descriptor drops a process's POSIX locks)."""
    monkeypatch.delenv("RANK", raising=False)
    with hold(tmp_path, "rlaif run"):
        with hold(tmp_path, "rlaif sft"):
            pass
        probe = subprocess.run(
            [sys.executable, "-c", HOLDER, str(tmp_path), "plain"],
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.returncode != 0 and "in use" in probe.stderr, probe.stderr[-500:]


def test_an_unwritable_run_dir_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with (
        pytest.raises(UserError, match=r"afile.*cannot write"),
        hold(tmp_path / "afile" / "run", "rlaif sft"),
    ):
        pass
