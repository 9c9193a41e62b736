"""Kill a real `rlaif` subprocess with SIGKILL at random moments, rerun it, and check the result.

The loop every fault test shares is :func:`survive_kills`: start the command, SIGKILL it after a
seeded random delay, start it again (it resumes), and so on until enough kills landed; then run it
to completion and compare what it wrote with an uninterrupted run (:func:`compare_runs`).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

LANDED: Counter[str] = Counter()
"""SIGKILLs that hit a running process in this pytest session, per test label (the suite's count)."""

# Metric fields that measure the clock, not the computation: they differ between any two runs.
# Also TRL's cumulative `num_tokens` (dpo): the DPOTrainer counts it in memory and does not save
# it in its checkpoints, so a resumed run counts from zero again (the loss, rewards, gradients and
# weights resume exactly).
VOLATILE = re.compile(r"(^time$|_s$|_per_s|per_second|runtime|^seconds$|^num_tokens$)")


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
class Timing:
    seconds: float
    """Wall time of the whole command, start-up included."""
    first: dict[str, float]
    """Per watched group: seconds from the start until one of its paths was first written."""


def _written_since(paths: list[Path], t0: float) -> bool:
    for p in paths:
        try:
            if p.stat().st_mtime >= t0:
                return True
        except FileNotFoundError:
            continue
    return False


def timed_run(
    args: list[str],
    watch: dict[str, list[Path]],
    *,
    events: Callable[[], Iterable[str]] = lambda: (),
    timeout: float = 600,
) -> Timing:
    """Run the command to completion, noting when each group of ``watch`` paths was first written
    and when each name that ``events()`` returns was first returned (polled every 10 ms)."""
    t_wall, t0 = time.time(), time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlaif", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    first: dict[str, float] = {}
    while proc.poll() is None:
        for name, paths in watch.items():
            if name not in first and _written_since(paths, t_wall):
                first[name] = time.monotonic() - t0
        for name in events():
            first.setdefault(name, time.monotonic() - t0)
        if time.monotonic() - t0 > timeout:
            proc.kill()
        time.sleep(0.01)
    seconds = time.monotonic() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise AssertionError(f"rlaif {' '.join(args)} exited {proc.returncode}:\n{err[-3000:]}")
    for name, paths in watch.items():
        if name not in first and _written_since(paths, t_wall):
            first[name] = seconds
    for name in events():
        first.setdefault(name, seconds)
    return Timing(seconds, first)


@dataclass
class KillReport:
    kills: int = 0
    """SIGKILLs delivered while the process was still running."""
    in_startup: int = 0
    """Of those, kills aimed at start-up (before any progress file was written)."""
    completed: bool = False
    """The last start finished on its own (exit status 0) before its kill time."""


def kill_randomly(
    args: list[str],
    *,
    kills: int,
    seed: int,
    window: tuple[float, float],
    progress: Iterable[Path] = (),
    startup: float = 0.0,
    max_tries: int = 0,
) -> KillReport:
    """Start the command and SIGKILL it at a random moment, ``kills`` times; each start resumes.

    With ``progress`` paths, the delay (uniform in ``window`` seconds) counts from the moment one
    of them is written by this start, so that kills land during work whatever the start-up costs
    on a loaded machine; the second start and every fifth after it (when ``startup`` > 0) are
    instead killed at a random moment of their start-up (between 20 % and 100 % of ``startup``
    seconds), where a resumed run repairs and reloads what the kill before left. Without
    ``progress``, the delay counts from the start. Stops early when a start completes on its own.
    """
    rng = random.Random(seed)
    watch = list(progress)
    report = KillReport()
    tries = 0
    while report.kills < kills and tries < (max_tries or kills * 3):
        tries += 1
        early = startup > 0 and tries % 5 == 2
        delay = rng.uniform(0.2 * startup, startup) if early else rng.uniform(*window)
        t_wall = time.time()
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rlaif", *args],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=_env(),
            )
            started = time.monotonic()
            if watch and not early:
                while proc.poll() is None and not _written_since(watch, t_wall):
                    time.sleep(0.01)
                started = time.monotonic()
            while proc.poll() is None and time.monotonic() < started + delay:
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                report.kills += 1
                report.in_startup += early
                continue
            err.seek(0)
            if proc.returncode != 0:
                text = err.read().decode(errors="replace")[-3000:]
                raise AssertionError(f"rlaif {' '.join(args)} exited {proc.returncode}:\n{text}")
        report.completed = True
        break  # the work is done: nothing left to interrupt
    return report


def survive_kills(
    label: str,
    args: list[str],
    *,
    fresh: Callable[[int], Path],
    kills: int,
    seed: int,
    window: tuple[float, float],
    after_kills: Callable[[Path], None],
    check: Callable[[Path], None],
    progress: Iterable[str] = (),
    startup: float = 0.0,
    max_cycles: int = 8,
) -> int:
    """Kill-and-resume cycles until ``kills`` SIGKILLs landed; return how many did.

    A cycle starts from ``fresh(cycle)`` (a new run directory holding the stage's inputs), kills
    the command as often as it can before the work completes on its own (see
    :func:`kill_randomly`; ``progress`` paths are relative to the run directory), calls
    ``after_kills`` on what the kills left, runs the command to completion and calls ``check`` on
    the result. A kill landing after the last save only repeats work, so a cycle may end early;
    then another starts.
    """
    landed = 0
    for cycle in range(max_cycles):
        run = fresh(cycle)
        t0 = time.monotonic()
        report = kill_randomly(
            args,
            kills=kills - landed,
            seed=seed * 1000 + cycle,
            window=window,
            progress=[run / p for p in progress],
            startup=startup,
        )
        landed += report.kills
        LANDED[label] += report.kills
        after_kills(run)
        t1 = time.monotonic()
        if not report.completed:
            rlaif(args)
        print(  # shown by pytest -s or on failure
            f"{label} cycle {cycle}: {report.kills} kills ({report.in_startup} in start-up), "
            f"{'completed on its own' if report.completed else 'rerun'} "
            f"{t1 - t0:.1f} s + {time.monotonic() - t1:.1f} s, window {window[0]:.1f}-{window[1]:.1f} s"
        )
        try:
            check(run)
        except AssertionError as exc:
            raise AssertionError(f"{label}, cycle {cycle} ({landed} kills so far): {exc}") from exc
        if landed >= kills:
            break
    assert landed >= kills, f"{label}: only {landed} of {kills} kills landed in {max_cycles} cycles"
    return landed


# ---------------------------------------------------------------------------- reading outputs


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


def _files(run: Path, ignore: tuple[str, ...]) -> set[str]:
    out = set()
    for p in run.rglob("*"):
        rel = p.relative_to(run).as_posix()
        if (
            p.is_file()
            and not rel.startswith(".stale/")
            and not any(re.fullmatch(pat, rel) for pat in ignore)
        ):
            out.add(rel)
    return out


def _same_jsonl(path: Path, ref: Path, abs_tol: float) -> None:
    first = json.loads(ref.read_text(encoding="utf-8").splitlines()[0])
    key = "id" if "id" in first else "step"
    got, want = jsonl_records(path, key), jsonl_records(ref, key)
    assert [r[key] for r in sorted(got, key=lambda r: r[key])] == sorted(r[key] for r in want), (
        f"{path.name}: records missing or extra"
    )
    if key == "step":  # training metrics: every step once, in order, same numbers
        assert [r["step"] for r in got] == [r["step"] for r in want], f"{path}: steps out of order"
    index = {r[key]: r for r in want}
    for rec in got:
        _same_values(rec, index[rec[key]], f"{path.name}[{rec[key]}]", abs_tol)


def _same_values(got: Any, want: Any, where: str, abs_tol: float = 1e-6) -> None:
    """Equal, except floats: within 1e-4 relative or ``abs_tol``; clock fields skipped."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys differ"
        for k in want:
            if not VOLATILE.search(k):
                _same_values(got[k], want[k], f"{where}.{k}", abs_tol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same_values(g, w, f"{where}[{i}]", abs_tol)
    elif isinstance(want, float) and isinstance(got, float | int):
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=abs_tol), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _same_tensors(path: Path, ref: Path) -> None:
    import torch
    from safetensors.torch import load_file

    got, want = load_file(str(path)), load_file(str(ref))
    assert set(got) == set(want), f"{path}: other tensors"
    for name, w in want.items():
        assert torch.allclose(got[name].float(), w.float(), atol=1e-5, rtol=1e-4), (
            f"{path}: {name} differs from the uninterrupted run"
        )


def compare_runs(
    run: Path,
    ref: Path,
    *,
    ignore: tuple[str, ...] = (),
    abs_tol: dict[str, float] | None = None,
) -> None:
    """What ``run`` holds equals what the uninterrupted ``ref`` holds.

    The same files (no leftover temp file or torn checkpoint; ``ignore`` holds regexes of relative
    paths only one side has); every JSONL file parses, with no record missing or duplicated and
    the same records; every safetensors file holds the same weights (within 1e-5); every JSON file
    outside ``manifests/`` (which note times and argv) is equal. Floats compare within 1e-4
    (relative), or within ``abs_tol[regex]`` (absolute) in files whose relative path matches.
    """
    files = _files(run, ignore)
    assert files == _files(ref, ignore), (
        f"other files than the uninterrupted run: "
        f"extra {sorted(files - _files(ref, ignore))}, missing {sorted(_files(ref, ignore) - files)}"
    )
    for rel in sorted(files):
        path, want = run / rel, ref / rel
        tol = max([t for pat, t in (abs_tol or {}).items() if re.fullmatch(pat, rel)], default=1e-6)
        if rel.endswith(".jsonl"):
            _same_jsonl(path, want, tol)
        elif rel.endswith(".safetensors"):
            _same_tensors(path, want)
        elif rel.endswith(".json") and not rel.startswith("manifests/"):
            _same_values(json.loads(path.read_text()), json.loads(want.read_text()), rel, tol)
    for rel in files:
        if rel.startswith("manifests/"):
            json.loads((run / rel).read_text())  # complete and parseable


# ---------------------------------------------------------------------------- checkpoints


def resumable_checkpoints(run: Path) -> list[Path]:
    """Per checkpoint root under ``run/checkpoints``, the checkpoint a rerun would resume from.

    rlaif's own checkpoints are ``step-N`` directories, published complete by a rename; DPO's are
    the Trainer's ``checkpoint-N``, complete once ``trainer_state.json`` is written.
    """
    from rlaif.checkpoint import latest_checkpoint

    found: list[Path] = []
    root = run / "checkpoints"
    for stage_root in sorted(root.iterdir()) if root.is_dir() else []:
        if not stage_root.is_dir():
            continue
        ours = latest_checkpoint(stage_root)
        trainer = [
            (int(p.name.split("-")[1]), p)
            for p in stage_root.glob("checkpoint-*")
            if (p / "trainer_state.json").is_file()
        ]
        if ours is not None:
            found.append(ours)
        elif trainer:
            found.append(max(trainer)[1])
    return found


def check_checkpoint_loads(ckpt: Path) -> None:
    """Every weight, optimizer-state and JSON file of ``ckpt`` loads; a model directory loads."""
    import torch
    from safetensors.torch import load_file
    from transformers.trainer_pt_utils import safe_globals

    for path in sorted(ckpt.rglob("*")):
        if path.suffix == ".safetensors":
            assert load_file(str(path)), f"{path}: no tensors"
        elif path.suffix in (".pt", ".pth"):
            with safe_globals():  # numpy RNG state in the Trainer's rng_state.pth, as it loads it
                torch.load(path, weights_only=True)
        elif path.suffix == ".json":
            json.loads(path.read_text())
    if (ckpt / "pm.json").is_file():
        from rlaif.pm import load_pm

        load_pm(ckpt)
    elif (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file():
        from rlaif.modelio import load_causal_lm

        load_causal_lm(ckpt)
