"""Kill a real `rlaif` subprocess with SIGKILL at random moments, rerun it, and check the result."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def rlaif(args: list[str], *, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m rlaif ARGS` to completion; fail loudly with its stderr on a non-zero exit."""
    res = subprocess.run(
        [sys.executable, "-m", "rlaif", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )
    if res.returncode != 0:
        raise AssertionError(
            f"rlaif {' '.join(args)} exited {res.returncode}:\n{res.stderr[-3000:]}"
        )
    return res


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RLAIF_LOG", "WARNING")
    return env


@dataclass
class KillReport:
    kills: int = 0
    """SIGKILLs delivered while the process was still running."""
    finished_early: int = 0
    """Attempts where the process had already finished when its kill time came."""


def kill_randomly(
    args: list[str], *, kills: int, seed: int, window: tuple[float, float], max_tries: int = 0
) -> KillReport:
    """Start the command and SIGKILL it after a random delay in ``window`` seconds, ``kills`` times.

    Each start resumes from what the killed ones left. Returns how many kills landed.
    """
    rng = random.Random(seed)
    report = KillReport()
    tries = 0
    while report.kills < kills and tries < (max_tries or kills * 3):
        tries += 1
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlaif", *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_env(),
        )
        deadline = time.monotonic() + rng.uniform(*window)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            report.kills += 1
        else:
            report.finished_early += 1
            break  # the work is done: nothing left to interrupt
    return report


def jsonl_records(path: Path, key: str = "id") -> list[dict[str, Any]]:
    """Every line parses and every key is unique; the records in file order."""
    recs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{path}:{n}: empty line"
        recs.append(json.loads(line))  # raises on a broken line
    ids = [r[key] for r in recs]
    assert len(ids) == len(set(ids)), f"{path}: duplicated records"
    return recs


def by_id(recs: list[dict[str, Any]], drop: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    return {r["id"]: {k: v for k, v in r.items() if k not in drop} for r in recs}
