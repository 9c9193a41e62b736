"""`rlaif label`: the stage with a fake feedback model, a tiny real model, and kill -9 resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlaif import feedback as fb
from rlaif.config import load_config
from rlaif.data.preferences import load_preferences
from rlaif.errors import UserError
from rlaif.stages import label
from tests.fake_lm import FakeLM, prefers_safe

ROOT = Path(__file__).resolve().parents[1]
HH = str(ROOT / "tests" / "fixtures" / "hh-rlhf-60.jsonl")


def _cfg(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            "label.policy=fake-policy",
            "feedback_model=fake-judge",
            f"label.prompts={HH}",
            "label.limit=6",
            "label.batch_pairs=4",
            f"label.helpful_pairs={HH}",
            "label.helpful_ratio=0.5",
            "constitution=paper",
            *extra,
        ],
    )


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeLM]:
    made: dict[str, FakeLM] = {}

    def make_lm(ref: str, _cfg: object) -> FakeLM:
        made[ref] = FakeLM(prefers_safe, name=ref)
        return made[ref]

    monkeypatch.setattr(label, "make_lm", make_lm)
    return made


def _jsonl(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stage_records_orders_principles_and_mixes_preferences(
    tmp_path: Path, fake: dict[str, FakeLM]
) -> None:
    cfg = _cfg(tmp_path, "label.principles=3", "label.few_shot=2")
    out = label.run(cfg)
    recs = _jsonl(tmp_path / "run" / "labels.jsonl")
    assert len(recs) == 6 and len({r["id"] for r in recs}) == 6
    # Answers from the policy, labels from the feedback model: separate models.
    assert fake["fake-policy"].generate_calls == 2 * 2  # two seeded passes x two chunks
    assert fake["fake-judge"].generate_calls == 0
    # 6 pairs x 3 principles x 2 orders, one choice_logprobs call per (pair, principle) (hf).
    assert fake["fake-judge"].questions == 36 and fake["fake-judge"].choice_calls == 18
    for r in recs:
        assert r["orders"] == [0, 1] and len(r["principles"]) == 3
        assert len({p["id"] for p in r["principles"]}) == 3
        a0, a1 = r["answers"]
        want = 0.8 if "safe" in a0 and "safe" not in a1 else 0.2 if "safe" in a1 else 0.5
        for p in r["principles"]:
            assert p["p_a"]["0"] == pytest.approx(want) and p["p_a"]["1"] == pytest.approx(1 - want)
            assert p["p"] == pytest.approx(fb.dual_order(p["p_a"]["0"], p["p_a"]["1"]))
        assert r["p"] == pytest.approx(want)
        assert r["policy"] == "fake-policy" and r["feedback_model"] == "fake-judge"
    prefs = load_preferences(out)
    ai = [p for p in prefs if p.source == "ai:harmless"]
    human = [p for p in prefs if p.source == "human:hh-rlhf"]
    assert len(ai) == 6 and len(human) == 3  # ratio 0.5
    assert all(p.p_chosen >= 0.5 for p in ai)
    assert all("safe" in p.chosen for p in ai if p.p_chosen > 0.5)
    manifest = json.loads((tmp_path / "run" / "manifests" / "label.json").read_text())
    assert manifest["stage"] == "label" and manifest["counts"]["ai"] == 6

    # A rerun does nothing new; other settings on the same run_dir are refused.
    label.run(cfg)
    assert len(_jsonl(tmp_path / "run" / "labels.jsonl")) == 6
    with pytest.raises(UserError, match="other label settings"):
        label.run(_cfg(tmp_path, "label.principles=1"))


def test_single_order_cot_and_pointwise(tmp_path: Path, fake: dict[str, FakeLM]) -> None:
    cfg = _cfg(tmp_path, "label.dual_order=false", "label.cot=true", "label.principles=1")
    label.run(cfg)
    recs = _jsonl(tmp_path / "run" / "labels.jsonl")
    assert {len(r["orders"]) for r in recs} == {1}
    assert {r["orders"][0] for r in recs} == {0, 1}  # drawn per pair, not always the same
    for r in recs:
        pr = r["principles"][0]
        assert set(pr["cot"]) == {str(r["orders"][0])}
        assert all(0.4 <= v <= 0.6 for v in pr["p_a"].values())  # clamped
    assert fake["fake-judge"].generate_calls == 2  # the reasoning, one call per chunk

    pw = _cfg(tmp_path / "pw", "label.mode=pointwise", "label.helpful_pairs=")
    label.run(pw)
    for r in _jsonl(tmp_path / "pw" / "run" / "labels.jsonl"):
        s1 = 0.3 if "risky" in r["answers"][0] else 0.9
        s2 = 0.3 if "risky" in r["answers"][1] else 0.9
        assert r["score_first"] == pytest.approx(s1) and r["score_second"] == pytest.approx(s2)
        assert r["p"] == pytest.approx(fb.pointwise_label(s1, s2))


def test_stackexchange_helpful_pairs(
    tmp_path: Path, fake: dict[str, FakeLM], shared_data: Path
) -> None:
    posts = shared_data / "stackexchange" / "coffee.Posts.xml"
    label.run(_cfg(tmp_path, f"label.helpful_pairs={posts}", "label.helpful_ratio=2"))
    prefs = load_preferences(tmp_path / "run" / "preferences.jsonl")
    human = [p for p in prefs if p.source.startswith("human:stackexchange")]
    assert len(human) == 12 and all(p.p_chosen == 1.0 for p in human)


def test_policy_defaults_to_sft_dir(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    with pytest.raises(UserError, match="rlaif sft"):
        label.policy_ref(cfg)
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text("{}")
    assert label.policy_ref(cfg) == str(tmp_path / "sft")


def _label_cmd(model: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "rlaif", "label",
        f"run_dir={run_dir}", f"label.policy={model}", f"feedback_model={model}",
        f"label.prompts={HH}", "label.limit=12", "label.batch_pairs=2", "label.max_new_tokens=4",
        "label.helpful_pairs=", "label.principles=2",
    ]  # fmt: skip


def test_resume_after_sigkill(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "RLAIF_LOG": "WARNING"}
    labels = run_dir / "labels.jsonl"
    proc = subprocess.Popen(
        _label_cmd(tiny_model_dir, run_dir), cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if labels.exists() and labels.read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be killed"
    before = labels.read_text().count("\n")
    assert 4 <= before < 12
    res = subprocess.run(
        _label_cmd(tiny_model_dir, run_dir), cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    recs = _jsonl(labels)
    assert len(recs) == 12 and len({r["id"] for r in recs}) == 12
    for r in recs:
        assert 0.0 <= r["p"] <= 1.0 and len(r["principles"]) == 2
    assert len(_jsonl(run_dir / "label_answers.jsonl")) == 12
    assert (run_dir / "manifests" / "label.json").exists()
    prefs = load_preferences(run_dir / "preferences.jsonl")
    assert all(0.5 <= p.p_chosen <= 1.0 for p in prefs)


def test_load_preferences_formats_and_errors(tmp_path: Path) -> None:
    hh = load_preferences(HH, limit=3)
    assert len(hh) == 3 and hh[0].source == "human:hh-rlhf" and hh[0].p_chosen == 1.0
    assert hh[0].prompt[-1]["role"] == "user" and hh[0].chosen != hh[0].rejected
    ours = tmp_path / "prefs.jsonl"
    ours.write_text(
        json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b",
                    "p_chosen": 0.7, "source": "ai:harmless"}) + "\n"
        + json.dumps({"prompt": "q2", "chosen": "c", "rejected": "d", "id": "x1"}) + "\n"
    )  # fmt: skip
    a, b = load_preferences(ours)
    assert a.p_chosen == 0.7 and a.source == "ai:harmless"
    assert b.id == "x1" and b.prompt == [{"role": "user", "content": "q2"}] and b.p_chosen == 1.0
    cases = {
        '{"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 1.5}': "must be in \\[0, 1\\]",
        '{"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": -0.1}': "must be in",
        '{"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": "high"}': "must be a number",
        '{"prompt": "q", "chosen": "a"}': "missing field 'rejected'",
        '{"chosen": "a", "rejected": "b", "p_chosen": 0.5}': "missing field 'prompt'",
        '{"chosen": "no turns", "rejected": "b"}': "not an hh-rlhf pair",
        '{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}': "prompt\\[0\\]",
        '{"prompt": [{"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"}': (
            "prompt\\[0\\] must be \\{role: system\\|user\\|assistant"
        ),
        '{"prompt": [], "chosen": "a", "rejected": "b"}': "'prompt' must be a non-empty list",
        "not json": "invalid JSON",
    }
    for i, (line, msg) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text('{"prompt": "ok", "chosen": "a", "rejected": "b"}\n' + line + "\n")
        with pytest.raises(UserError, match=f"{bad}:2: .*{msg}"):
            load_preferences(bad)
