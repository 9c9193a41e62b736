"""Fault injection: every stage, and `rlaif run` itself, is SIGKILLed at random moments and rerun.

After the reruns: the run directory holds the same files as an uninterrupted run (no leftover temp
file), every JSONL line parses, no record is missing or duplicated, the newest checkpoint left by
the kills loads, and the outputs equal the uninterrupted run's: the same records (decoding is
greedy, or sampled with seeds fixed per prompt chunk), the same metrics and, for training stages,
the same final weights within 1e-5. Exact equality is what resume is designed for: checkpoints
carry optimizer, scheduler and RNG state, the batch order is replayed, and record stores redo only
the missing records with the seeds they would have had.

One uninterrupted `rlaif run` on the tiny model is the reference for every test; a stage's test
starts from the reference's run directory with that stage's outputs and everything after it
removed, and runs the stage alone (so each test also checks that a stage run alone gives what it
gives inside the pipeline). Every run, the reference included, happens in the same directory
(``work``), as a user's rerun does: outputs record their run directory (model paths in label
records, model paths in evaluation record ids), so this keeps them comparable.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rlaif.stages.pipeline import BY_NAME, move_aside
from tests.faults.harness import (
    Timing,
    check_checkpoint_loads,
    compare_runs,
    resumable_checkpoints,
    survive_kills,
    timed_run,
)

STAGES = ("revise", "sft", "label", "reward", "ppo", "dpo", "evaluate")
KILLS = {"revise": 3, "sft": 3, "label": 3, "reward": 3, "ppo": 3, "dpo": 2, "evaluate": 3}
"""Kills per stage in the default run; the slow marker multiplies them by SLOW."""
RUN_KILLS = 3
SLOW = 4

# Files whose writing shows that a stage is at work (after its start-up): the kill delays count
# from the moment a started command first writes one of them.
PROGRESS = {
    "revise": ("revisions.jsonl", "helpful.jsonl"),
    "sft": ("metrics/sft.jsonl",),
    "label": ("label_answers.jsonl", "labels.jsonl"),
    "reward": ("metrics/reward.jsonl",),
    "ppo": ("metrics/ppo.jsonl",),
    "dpo": ("metrics/dpo.jsonl",),
    "evaluate": ("eval/answers.jsonl", "eval/judgments.jsonl"),
    "run": ("manifests/run.json",),
}

# The Elo fit turns judge probabilities into scores, and amplifies float noise near zero: the hf
# backend reuses KV caches of prompt prefixes it saw earlier in the process, so a resumed run,
# having seen other prompts first, computes a few probabilities with another split between cached
# prefix and fresh tokens (differences ~1e-7, answers and judgments otherwise equal). Elo scores
# are compared to 1e-3 points.
TOLERANCE = {r"eval/results\.json": 1e-3}

HELPFUL = (
    "How do I brew coffee?\nWhat grind for espresso?\nIs decaf healthy?\nHow long do beans keep?\n"
)


def pipeline_args(model: Path, run: Path, prompts: Path, helpful: Path) -> list[str]:
    """Tiny counts for every stage; frequent checkpoints so that kills land between them."""
    return [
        f"model={model}",
        f"run_dir={run}",
        "backend.device=cpu",
        "backend.dtype=float32",
        # revise: a random model's greedy text is degenerate (no usable revision for sft), so it
        # samples; chunks are seeded by their place in the prompt order, so a rerun is the same.
        f"revise.prompts={prompts}",
        "revise.limit=12",
        "revise.rounds=2",
        "revise.max_new_tokens=10",
        "revise.temperature=1.0",
        "revise.few_shot=0",
        "revise.chunk_size=2",
        f"revise.helpful_prompts={helpful}",
        "revise.helpful_limit=4",
        *[f"{s}.dtype=float32" for s in ("sft", "reward", "ppo", "dpo")],
        *[f"{s}.save_every=1" for s in ("sft", "reward", "ppo", "dpo")],
        *[f"{s}.lr=1e-3" for s in ("sft", "reward", "ppo", "dpo")],
        "sft.max_steps=24",
        "sft.batch_size=2",
        "sft.max_length=64",
        "sft.warmup_ratio=0",
        "label.skip=12",
        "label.limit=16",
        "label.batch_pairs=2",
        "label.max_new_tokens=12",
        "label.principles=1",
        f"label.helpful_pairs={prompts}",
        "label.helpful_ratio=0.5",
        "reward.pmp_limit=12",
        "reward.max_steps=6",
        "reward.batch_size=2",
        "reward.max_length=64",
        "reward.holdout=0.25",
        "reward.pmp_lr=1e-3",
        "ppo.max_steps=6",
        "ppo.rollout_batch_size=4",
        "ppo.batch_size=2",
        "ppo.ppo_epochs=1",
        "ppo.max_new_tokens=6",
        "ppo.max_length=40",
        "ppo.prompt_limit=8",
        "ppo.helpful_limit=2",
        "dpo.max_steps=8",
        "dpo.batch_size=2",
        "dpo.max_length=64",
        "dpo.min_margin=0",
        "evaluate.n_harmful=6",
        "evaluate.n_helpful=2",
        "evaluate.max_new_tokens=6",
        "evaluate.bootstrap=20",
        "evaluate.transcripts=1",
    ]


@dataclass
class Reference:
    """The uninterrupted `rlaif run`, with when each stage's work began and ended in it."""

    root: Path
    args: list[str]
    timing: Timing

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def done(self) -> Path:
        return self.root / "reference"

    def _without(self, dest: Path, stages: tuple[str, ...]) -> Path:
        shutil.copytree(self.done, dest, symlinks=True)
        (dest / "manifests" / "run.json").unlink()
        for name in stages:
            move_aside(dest, BY_NAME[name])
        shutil.rmtree(dest / ".stale", ignore_errors=True)
        return dest

    def restore(self, stage: str | None = None) -> Path:
        """A fresh ``work``: the reference minus ``stage``'s outputs and all after (None: empty)."""
        shutil.rmtree(self.work, ignore_errors=True)
        if stage is None:
            self.work.mkdir()
            return self.work
        return self._without(self.work, STAGES[STAGES.index(stage) :])

    def after(self, stage: str) -> Path:
        """What the reference held once ``stage`` was done (without the pipeline's ledger)."""
        dest = self.root / f"after-{stage}"
        if not dest.exists():
            self._without(dest, STAGES[STAGES.index(stage) + 1 :])
        return dest

    @property
    def startup(self) -> float:
        """Seconds from the start until the first record: imports, model loading, one chunk."""
        return self.timing.first["revise"]

    def window(self, stage: str) -> tuple[float, float]:
        """Kill delays, counted from a start's first progress write: within 60 % of the stage's
        work (from its first progress write to its end in the reference's ledger).

        A kill costs little progress (saves are frequent), so each start gets some way further and
        several kills land before a resumed run completes on its own.
        """
        if stage == "run":
            work = self.timing.seconds - self.timing.first["run"]
        else:
            work = self.timing.first[f"{stage}.end"] - self.timing.first[stage]
        return 0.0, 0.6 * max(work, 0.3)


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, fixtures: Path
) -> Reference:
    root = tmp_path_factory.mktemp("faults")
    helpful = root / "helpful.txt"
    helpful.write_text(HELPFUL, encoding="utf-8")
    work = root / "work"
    work.mkdir()
    args = pipeline_args(tiny_model_dir, work, fixtures / "hh-rlhf-60.jsonl", helpful)
    watch = {name: [work / p for p in paths] for name, paths in PROGRESS.items()}

    def stages_done() -> list[str]:
        try:
            ledger = json.loads((work / "manifests" / "run.json").read_text())
        except (OSError, ValueError):  # not written yet, or being replaced
            return []
        return [f"{k}.end" for k, v in ledger["stages"].items() if v["status"] == "done"]

    with pytest.MonkeyPatch.context() as mp:  # as tests/conftest.py's per-test isolation does
        mp.setenv("RLAIF_HOME", str(root / "rlaif-home"))
        mp.setenv("HF_HUB_OFFLINE", "1")  # (saved tokenizer configs record it)
        timing = timed_run(["run", *args], watch, events=stages_done)
    print(f"reference: {timing}")
    shutil.copytree(work, root / "reference", symlinks=True)
    return Reference(root, args, timing)


def _checkpoints_load(run: Path) -> None:
    for ckpt in resumable_checkpoints(run):
        check_checkpoint_loads(ckpt)


def _kill_params(kills: dict[str, int]) -> list[Any]:
    fast = [pytest.param(s, n, id=f"{s}-{n}") for s, n in kills.items()]
    slow = [
        pytest.param(s, SLOW * n, id=f"{s}-{SLOW * n}", marks=pytest.mark.slow)
        for s, n in kills.items()
    ]
    return fast + slow


@pytest.mark.parametrize(("stage", "kills"), _kill_params(KILLS))
def test_stage_survives_kills(stage: str, kills: int, reference: Reference) -> None:
    survive_kills(
        stage,
        [stage, *reference.args],
        fresh=lambda _cycle: reference.restore(stage),
        kills=kills,
        seed=STAGES.index(stage),
        window=reference.window(stage),
        progress=PROGRESS[stage],
        startup=reference.startup,
        after_kills=_checkpoints_load,
        check=lambda run: compare_runs(run, reference.after(stage), abs_tol=TOLERANCE),
    )


@pytest.mark.parametrize(
    "kills", [RUN_KILLS, pytest.param(SLOW * RUN_KILLS, marks=pytest.mark.slow)]
)
def test_pipeline_survives_kills(kills: int, reference: Reference) -> None:
    """`rlaif run`: kills land anywhere in the stage ledger's course; the result is the same."""

    def check(run: Path) -> None:
        compare_runs(run, reference.done, abs_tol=TOLERANCE)
        ledger = json.loads((run / "manifests" / "run.json").read_text())
        assert {k: v["status"] for k, v in ledger["stages"].items()} == dict.fromkeys(
            STAGES, "done"
        )

    survive_kills(
        "run",
        ["run", *reference.args],
        fresh=lambda _cycle: reference.restore(),
        kills=kills,
        seed=len(STAGES),
        window=reference.window("run"),
        progress=PROGRESS["run"],
        startup=reference.startup,
        after_kills=_checkpoints_load,
        check=check,
    )


def test_default_run_plans_at_least_20_kills() -> None:
    """Issue 10: at least 20 kills across the stages in the default run (each test asserts that its
    own kills landed; tests/faults/conftest.py prints the session's count)."""
    assert sum(KILLS.values()) + RUN_KILLS >= 20


def test_dpo_checkpoint_with_a_torn_trainer_state_is_incomplete(tmp_path: Path) -> None:
    """A kill while the Trainer writes trainer_state.json (in place, last) leaves it empty or cut
    short: that checkpoint is not resumed from (it was, and every rerun then failed to parse it)."""
    from rlaif.stages.dpo import complete_checkpoint

    for step, text in ((4, '{"global_step": 4}'), (6, '{"global_st'), (8, "")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(text)
    assert complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_atomic_writes_remove_what_a_killed_write_left(tmp_path: Path) -> None:
    """A kill inside an atomic write leaves its temp file or directory (a whole model copy for a
    model export); the next write of the same target removes it, and nothing else."""
    from rlaif.checkpoint import atomic_dir
    from rlaif.store import atomic_write_text

    for name in (".sft.k3x_9q0a", ".sft.old", ".sft_other.k3x_9q0a", ".sftx"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    for name in (".labels.json.ab12cd34.tmp", ".labels.json.keep", ".other.json.ab12cd34.tmp"):
        (tmp_path / name).write_text("partial")
    atomic_dir(tmp_path / "sft", lambda tmp: (tmp / "config.json").write_text("{}"))
    atomic_write_text(tmp_path / "labels.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".labels.json.keep",
        ".other.json.ab12cd34.tmp",
        ".sft_other.k3x_9q0a",
        ".sftx",
        "labels.json",
        "sft",
    ]
