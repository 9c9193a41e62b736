from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from rlaif.backends.base import BackendStats, Conversation, Generation, GenerationParams
from rlaif.config import load_config
from rlaif.constitution import load_constitution
from rlaif.errors import UserError
from rlaif.stages import revise
from rlaif.stages.revise import Step, build_chat, build_text, degenerate

ROOT = Path(__file__).resolve().parents[1]


class FakeLM:
    """Deterministic stand-in for a model: echoes what it was asked, records every call."""

    name = "fake"

    def __init__(self, bad_revision_for: str = "") -> None:
        self.stats = BackendStats()
        self.calls: list[tuple[list[Conversation], GenerationParams]] = []
        self.bad = bad_revision_for

    def generate(
        self, conversations: Sequence[Conversation], params: GenerationParams
    ) -> list[Generation]:
        self.calls.append((list(conversations), params))
        out = []
        for conv in conversations:
            text = conv if isinstance(conv, str) else conv[-1]["content"]
            asked = conv if isinstance(conv, str) else conv[0]["content"] if len(conv) else ""
            if text.endswith("Critique:"):
                reply = (
                    f" The answer could be kinder (turn {len(self.calls)}).\n\nRevisionRequest: x"
                )
            elif text.endswith("Revision:"):
                reply = (
                    "  "
                    if self.bad and self.bad in str(conv)
                    else f" A kinder answer {len(self.calls)}."
                )
            else:
                reply = f" Initial answer to: {asked[-20:]}"
            cuts = [k for k in (reply.find(s) for s in params.stop) if k >= 0]
            reply = reply[: min(cuts)] if cuts else reply  # the Protocol applies stop strings
            self.stats.completion_tokens += len(reply.split())
            out.append(Generation(reply, 10, len(reply.split())))
        return out

    def choice_logprobs(
        self, prompts: Sequence[Conversation], choices: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        return [[0.0 for _ in c] for c in choices]


def _cfg(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            "revise.prompts=tests/fixtures/hh-rlhf-60.jsonl",
            "revise.limit=10",
            "revise.rounds=3",
            "revise.chunk_size=4",
            "revise.helpful_prompts=../shared/data/stackexchange/coffee.Posts.xml",
            "revise.helpful_limit=5",
            *extra,
        ],
    )


def test_prompt_forms_follow_the_paper() -> None:
    c = load_constitution("default")
    p = c.principles[0]
    dialogue = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    text = build_text(c.few_shot[:1], Step(dialogue, p.critique))
    assert text.endswith(
        f"\n\nHuman: Q?\n\nAssistant: A.\n\nCritiqueRequest: {p.critique}\n\nCritique:"
    )
    assert text.startswith("\n\nHuman: " + c.few_shot[0].messages[0]["content"])
    assert f"Revision: {c.few_shot[0].revision}" in text
    chat = build_chat(c.few_shot[:2], Step(dialogue, p.critique, "Too blunt.", p.revision))
    assert chat[-1] == {"role": "assistant", "content": "Revision:"}
    assert chat[-2] == {"role": "user", "content": f"RevisionRequest: {p.revision}"}
    assert chat[-3] == {"role": "assistant", "content": "Critique: Too blunt."}
    assert chat[-4]["content"].endswith(f"Assistant: A.\n\nCritiqueRequest: {p.critique}")
    assert len(chat) == 4 * 3 and chat[3]["content"] == f"Revision: {c.few_shot[0].revision}"


def test_degenerate_outputs() -> None:
    assert degenerate("") == "empty"
    assert degenerate(":::::::::::") == "no-text"
    assert degenerate("It is a lie. " * 20) == "repetitive"
    assert (
        degenerate(
            "Please rewrite the answer to remove harm", "Please rewrite the answer to remove harm."
        )
        == "echo"
    )
    example = "They aren't. Studies across many countries find no meaningful difference at all."
    assert degenerate(example, "", [example + " More."]) == "copy"
    assert degenerate("I can't help with that, but here is a safer idea: talk to them.") is None


def test_loop_batches_every_step_and_records_rounds(tmp_path: Path) -> None:
    lm = FakeLM()
    cfg = _cfg(tmp_path)
    out = revise.run(cfg, lm=lm)
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(recs) == 10 and len({r["id"] for r in recs}) == 10
    # 3 chunks (4+4+2) x (answer + 3 x (critique, revision)) calls, then the helpful prompts in chunks of 4.
    sizes = [len(convs) for convs, _ in lm.calls]
    assert sizes == [4] * 7 + [4] * 7 + [2] * 7 + [4, 1]
    c = load_constitution("default")
    for r in recs:
        assert set(r) >= {"id", "prompt", "initial", "rounds", "final", "model", "seed"}
        assert r["prompt"][-1]["role"] == "user" and r["initial"].startswith("Initial answer")
        assert [x["principle"] for x in r["rounds"]] == [c.draw(0, r["id"], k).id for k in range(3)]
        assert all(x["critique"].startswith("The answer could be kinder") for x in r["rounds"])
        assert all("RevisionRequest" not in x["critique"] for x in r["rounds"])  # stop string cut
        assert r["final"] == r["rounds"][-1]["revision"]
    stops = {p.stop for _, p in lm.calls}
    assert any("\n\nRevisionRequest:" in s for s in stops)
    helpful = [json.loads(x) for x in (tmp_path / "run" / "helpful.jsonl").read_text().splitlines()]
    assert len(helpful) == 5 and set(helpful[0]) >= {"id", "prompt", "answer", "model", "seed"}
    manifest = json.loads((tmp_path / "run" / "manifests" / "revise.json").read_text())
    assert manifest["complete"] and manifest["constitution"]["sha256"] == c.sha256
    assert manifest["counts"] == {"revisions": 10, "helpful": 5}
    assert manifest["versions"]["rlaif"]
    # A rerun does nothing new; a changed setting is refused instead of mixing records.
    lm2 = FakeLM()
    revise.run(cfg, lm=lm2)
    assert lm2.calls == []
    with pytest.raises(UserError, match=r"revise\.json.*rounds=3, not 2"):
        revise.run(_cfg(tmp_path, "revise.rounds=2"), lm=FakeLM())


def test_bad_revision_is_recorded_and_previous_answer_kept(tmp_path: Path) -> None:
    lm = FakeLM(bad_revision_for="Initial answer")
    recs = [
        json.loads(x)
        for x in revise.run(_cfg(tmp_path, "revise.rounds=1"), lm=lm).read_text().splitlines()
    ]
    assert all(r["rounds"][0]["status"] == "empty" for r in recs)
    assert all(r["final"] == r["initial"] for r in recs)


def test_text_format_and_principle_subset(tmp_path: Path) -> None:
    lm = FakeLM()
    cfg = _cfg(tmp_path, "revise.format=text", "revise.principles=[empathy]", "revise.rounds=1")
    recs = [json.loads(x) for x in revise.run(cfg, lm=lm).read_text().splitlines()]
    assert all(isinstance(c, str) for convs, _ in lm.calls for c in convs)
    assert {r["rounds"][0]["principle"] for r in recs} == {"empathy"}
    with pytest.raises(UserError, match="no principle 'nope'"):
        revise.run(_cfg(tmp_path, "revise.principles=[nope]"), lm=FakeLM())


def test_revise_on_tiny_model_via_cli(tmp_path: Path, tiny_model_dir: Path) -> None:
    from rlaif.cli import main

    run_dir = tmp_path / "cli"
    args = [
        "revise", str(ROOT / "configs" / "demo.yaml"), f"model={tiny_model_dir}",
        f"run_dir={run_dir}", "revise.limit=8", "revise.rounds=2", "revise.max_new_tokens=8",
        "revise.helpful_limit=3", "revise.prompts=tests/fixtures/hh-rlhf-60.jsonl",
        "revise.first_turn_only=true", "revise.few_shot=1", "backend.dtype=float32",
    ]  # fmt: skip
    assert main(args) == 0
    recs = [json.loads(x) for x in (run_dir / "revisions.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and all(len(r["rounds"]) == 2 for r in recs)
    assert len((run_dir / "helpful.jsonl").read_text().splitlines()) == 3


def test_resume_after_sigkill(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir = tmp_path / "killed"
    out = run_dir / "revisions.jsonl"
    cmd = [
        sys.executable, "-m", "rlaif", "revise", f"model={tiny_model_dir}", f"run_dir={run_dir}",
        "revise.prompts=tests/fixtures/hh-rlhf-60.jsonl", "revise.limit=16", "revise.rounds=2",
        "revise.chunk_size=1", "revise.max_new_tokens=6", "revise.helpful_prompts=",
        "revise.first_turn_only=true", "revise.few_shot=0", "backend.dtype=float32",
    ]  # fmt: skip
    env = {**os.environ, "RLAIF_LOG": "WARNING"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines_before = out.read_bytes().count(b"\n")
    assert 2 <= lines_before < 16
    with open(out, "ab") as fh:  # and a record torn mid-write, as a kill during a write leaves it
        fh.write(b'{"id": "torn", "prompt": [{"role": "us')
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = out.read_text(encoding="utf-8").splitlines()
    recs = [json.loads(x) for x in lines]  # every line is whole JSON
    assert len(recs) == 16 and len({r["id"] for r in recs}) == 16
    assert all(len(r["rounds"]) == 2 for r in recs)
