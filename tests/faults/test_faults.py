"""Fault injection: each stage is SIGKILLed at random moments and rerun.

After the reruns: no record is missing or duplicated, every JSONL line parses, checkpoints load,
and (greedy decoding) the final outputs equal those of an uninterrupted run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.harness import by_id, jsonl_records, kill_randomly, rlaif

KILLS = 5  # per stage in the default run; the slow marker multiplies it


def _revise_args(model: Path, prompts: Path, run: Path) -> list[str]:
    return [
        "revise",
        f"model={model}",
        f"run_dir={run}",
        f"revise.prompts={prompts}",
        "revise.limit=12",
        "revise.rounds=2",
        "revise.max_new_tokens=8",
        "revise.few_shot=0",
        "revise.chunk_size=2",
        "revise.helpful_prompts=",
        "backend.dtype=float32",
    ]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory, fixtures: Path) -> Path:
    return fixtures / "hh-rlhf-60.jsonl"


def _timed(args: list[str]) -> float:
    t0 = time.monotonic()
    rlaif(args)
    return time.monotonic() - t0


@pytest.mark.parametrize("kills", [KILLS, pytest.param(4 * KILLS, marks=pytest.mark.slow)])
def test_revise_survives_kills(
    kills: int, tiny_model_dir: Path, prompts: Path, tmp_path: Path
) -> None:
    ref_run = tmp_path / "ref"
    seconds = _timed(_revise_args(tiny_model_dir, prompts, ref_run))
    ref = by_id(jsonl_records(ref_run / "revisions.jsonl"))
    landed = 0
    # Each cycle kills a fresh run until it completes on its own; cycles repeat until enough kills
    # landed (a resumed run has less left to do, so later kills often find it finished).
    for cycle in range(8):
        run = tmp_path / f"killed-{cycle}"
        report = kill_randomly(
            _revise_args(tiny_model_dir, prompts, run),
            kills=kills - landed,
            seed=cycle,
            window=(0.3, seconds),
        )
        landed += report.kills
        rlaif(_revise_args(tiny_model_dir, prompts, run))
        got = by_id(jsonl_records(run / "revisions.jsonl"))
        assert len(got) == 12 and got == ref, f"cycle {cycle}: outputs differ after kills"
        if landed >= kills:
            break
    assert landed >= kills
