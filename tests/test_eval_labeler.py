"""`rlaif eval-labeler`: figures checked against fake labellers with known behaviour."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rlaif.cli import main
from rlaif.config import load_config
from rlaif.data.preferences import load_preferences
from rlaif.errors import UserError
from rlaif.labeler import seeded_order
from rlaif.stages import eval_labeler as ev
from tests.fake_lm import FakeLM, always_a

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT / "tests" / "fixtures" / "hh-rlhf-60.jsonl"


def test_position_biased_labeller(tmp_path: Path) -> None:
    prefs = load_preferences(HH, limit=40)
    cfg = load_config(None, ["constitution=paper", "label.principles=3", "seed=7"])
    lm = FakeLM(always_a(0.95))
    res = ev.evaluate(lm, cfg, prefs, ev.DEFAULT_METHODS, injection=False)
    assert res["n"] == 40
    # Always (A): right exactly when the seeded order put the human choice first.
    first = sum(seeded_order(7, p.id) == 0 for p in prefs) / 40
    assert 0.2 < first < 0.8  # the order really is drawn per pair
    assert res["acc_single"] == pytest.approx(first)
    # Both orders cancel to exactly 0.5: a tie, half credit, perfectly calibrated.
    assert res["acc_dual"] == pytest.approx(0.5) and res["acc_ensemble"] == pytest.approx(0.5)
    assert res["ece_dual"] == pytest.approx(0.0)
    assert res["order_flip"] == 1.0 and res["mean_pa"] == pytest.approx(0.95)
    assert res["acc_pointwise"] == pytest.approx(0.5)
    # 40 pairs x 3 principles x 2 orders multiple-choice questions + 80 pointwise questions.
    assert lm.questions == 40 * 3 * 2 + 80
    line = ev.result_line(res)
    assert line.startswith("RESULT eval-labeler n=40 acc_single=")
    assert "acc_cot" not in line and "order_flip=1.0000" in line


def test_judge_that_reads_the_answers() -> None:
    prefs = load_preferences(HH, limit=10)
    chosen = {p.chosen.strip() for p in prefs}

    def knows(prompt: str, choices: object) -> list[float]:
        from tests.fake_lm import options_of

        if list(choices) == [" Yes", " No"]:  # type: ignore[call-overload]
            answer = prompt.rsplit("Assistant: [[[", 1)[-1].split("]]]")[0]
            return [0.2, 0.8] if answer.strip() in chosen else [0.6, 0.4]
        a, _ = options_of(prompt)
        return [0.7, 0.3] if a[3:-3].strip() in chosen else [0.3, 0.7]

    cfg = load_config(None, ["constitution=paper", "label.principles=1"])
    # Escaping changes a few answers' text; compare on pairs whose text survives it unchanged.
    from rlaif import feedback as fb

    prefs = [p for p in prefs if fb.escape_answer(p.chosen.strip()) == p.chosen.strip()]
    res = ev.evaluate(FakeLM(knows), cfg, prefs, ("single", "dual", "pointwise"), injection=False)
    assert res["acc_single"] == 1.0 and res["acc_dual"] == 1.0 and res["acc_pointwise"] == 1.0
    assert res["order_flip"] == 0.0
    # Every label is 0.7 -> confidence 0.7, accuracy 1 -> ECE 0.3.
    assert res["ece_dual"] == pytest.approx(0.3)
    # pointwise: 0.5 + (0.8 - 0.4) / 2 = 0.7
    assert res["ece_pointwise"] == pytest.approx(0.3)
    # The per-pair probabilities behind the figures (the report's calibration plot reads them).
    assert res["probs_dual"] == pytest.approx([0.7] * len(prefs))
    assert res["probs_pointwise"] == pytest.approx([0.7] * len(prefs))


def test_cli_on_tiny_model(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "res.json"
    rc = main(
        ["eval-labeler", str(HH), f"model={tiny_model_dir}", "limit=4", "methods=single,dual,cot",
         "label.cot_max_new_tokens=4", "constitution=paper", f"out={out}"]
    )  # fmt: skip
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT eval-labeler n=4 acc_single=")
    assert "acc_dual=" in last and "acc_cot=" in last and "acc_pointwise" not in last
    data = json.loads(out.read_text())
    assert data["n"] == 4 and 0.0 <= data["acc_cot"] <= 1.0
    # the judgements were kept: one record per pair for multiple choice and for CoT
    from rlaif.store import JsonlStore

    assert len(JsonlStore(Path(data["records"]))) == 4 * 2


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing FILE"):
        ev.parse_args(["limit=3"])
    with pytest.raises(UserError, match="methods"):
        ev._methods("dual,magic")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b", "p_chosen": 1.5}\n')
    assert main(["eval-labeler", str(bad), "limit=2"]) == 2


def killed_run(
    answer: Any,
    after: int,
    cfg: Any,
    prefs: list[Any],
    methods: tuple[str, ...],
    injection: bool,
    records: Path,
) -> int:
    """Evaluate with a FakeLM killed (KeyboardInterrupt) at its first call once ``after``
    questions were asked; return how many judgements the records file kept."""
    from rlaif.store import JsonlStore

    class Dies(FakeLM):
        def choice_logprobs(self, prompts, choices):  # type: ignore[no-untyped-def]
            if self.questions >= after:
                raise KeyboardInterrupt
            return super().choice_logprobs(prompts, choices)

    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(Dies(answer), cfg, prefs, methods, injection, JsonlStore(records))
    return len(JsonlStore(records))


def test_killed_run_resumes_from_its_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that dies mid-way keeps what it judged; the rerun asks only the missing questions
    and gives the figures of an uninterrupted run."""
    from rlaif.store import JsonlStore
    from tests.fake_lm import options_of

    def prefers_short(prompt: str, choices: object) -> list[float]:
        """Judgements that differ from pair to pair: the shorter answer wins, by its share."""
        if list(choices) == [" Yes", " No"]:  # type: ignore[call-overload]
            return [0.3, 0.7] if len(prompt) % 3 else [0.6, 0.4]
        a, b = (len(t) for t in options_of(prompt))
        return [b / (a + b), a / (a + b)]

    monkeypatch.setattr(ev, "CHUNK", 8)
    prefs = load_preferences(HH, limit=24)
    cfg = load_config(None, ["constitution=paper", "label.principles=2", "seed=3"])
    methods = ("single", "dual", "ensemble", "pointwise")
    whole_lm = FakeLM(prefers_short)
    whole = ev.evaluate(whole_lm, cfg, prefs, methods, injection=False)

    records = tmp_path / "records.jsonl"
    # killed in the second chunk (48 questions a chunk)
    kept = killed_run(prefers_short, 60, cfg, prefs, methods, False, records)
    assert 0 < kept < 2 * 24  # some, not all, of the 24 x 2 kinds of judgement

    again_lm = FakeLM(prefers_short)
    again = ev.evaluate(again_lm, cfg, prefs, methods, False, JsonlStore(records))
    assert again == whole and 0.0 < whole["acc_dual"] < 1.0 and whole["order_flip"] < 1.0
    assert 0 < again_lm.questions < whole_lm.questions  # only what was missing
    assert len(JsonlStore(records)) == 2 * 24

    # Everything judged: a third run asks nothing; a larger limit asks only for the new pairs.
    idle = FakeLM(prefers_short)
    assert ev.evaluate(idle, cfg, prefs, methods, False, JsonlStore(records)) == whole
    assert idle.questions == 0
    more = FakeLM(prefers_short)
    ev.evaluate(more, cfg, load_preferences(HH, limit=30), methods, False, JsonlStore(records))
    assert more.questions == whole_lm.questions // 24 * 6


def test_records_file_follows_the_settings(tmp_path: Path, tiny_model_dir: Path) -> None:
    lm = FakeLM(always_a(0.5))
    base = load_config(None, ["constitution=paper", f"feedback_model={tiny_model_dir}"])
    path = ev.default_records(base, lm)
    assert path == ev.default_records(base, lm) and path.suffix == ".jsonl"
    for change in ("label.principles=3", "seed=1", "label.delimit=false", "constitution=default"):
        other = load_config(
            None, ["constitution=paper", f"feedback_model={tiny_model_dir}", change]
        )
        assert ev.default_records(other, lm) != path, change


def test_offset_judges_a_later_slice_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``offset=10 limit=5`` judges pairs 11-15 of the file: the figures of those five pairs."""
    from rlaif import backends
    from tests.fake_lm import options_of

    def prefers_short(prompt: str, choices: object) -> list[float]:
        if list(choices) == [" Yes", " No"]:  # type: ignore[call-overload]
            return [0.3, 0.7] if len(prompt) % 3 else [0.6, 0.4]
        a, b = (len(t) for t in options_of(prompt))
        return [b / (a + b), a / (a + b)]

    monkeypatch.setattr(backends, "make_lm", lambda ref, backend: FakeLM(prefers_short))
    out = tmp_path / "res.json"
    args = ["eval-labeler", str(HH), "offset=10", "limit=5", "constitution=paper"]
    assert main([*args, f"records={tmp_path / 'r.jsonl'}", f"out={out}"]) == 0
    got = json.loads(out.read_text())
    cfg = load_config(None, ["constitution=paper"])
    methods = ev.DEFAULT_METHODS
    want = ev.evaluate(
        FakeLM(prefers_short), cfg, load_preferences(HH, limit=15)[10:], methods, False
    )
    assert got["n"] == 5 and got["offset"] == 10
    assert {k: got[k] for k in want} == json.loads(json.dumps(want))
    first = ev.evaluate(FakeLM(prefers_short), cfg, load_preferences(HH, limit=5), methods, False)
    assert first != want  # another slice, other figures
    assert ev.select_pairs(HH, 58, 0) == load_preferences(HH)[58:]  # no limit: to the end
    capsys.readouterr()
    assert main(["eval-labeler", str(HH), "offset=60", "constitution=paper"]) == 2
    assert "offset=60" in capsys.readouterr().err


def test_killed_injection_measurement_resumes(tmp_path: Path) -> None:
    """injection=true keeps its judgements in the records file too: a killed measurement,
    rerun, asks only what is missing and gives the uninterrupted figures."""
    from rlaif.store import JsonlStore
    from tests.fake_lm import gullible

    prefs = load_preferences(HH, limit=10)
    cfg = load_config(None, ["constitution=paper", "label.principles=1", "seed=2"])
    methods = ("dual",)
    whole_lm = FakeLM(gullible)
    whole = ev.evaluate(whole_lm, cfg, prefs, methods, injection=True)
    assert whole["inj_flip_before"] > 0.4 and whole["inj_flip_after"] == 0.0

    records = tmp_path / "records.jsonl"
    # killed after the 20 dual questions, inside the injection measurement
    kept = killed_run(gullible, 20 + 30, cfg, prefs, methods, True, records)
    assert 10 < kept < 10 + 10 * len(ev.INJECTION_RUNS)
    again_lm = FakeLM(gullible)
    assert ev.evaluate(again_lm, cfg, prefs, methods, True, JsonlStore(records)) == whole
    assert 0 < again_lm.questions < whole_lm.questions - 20  # neither dual nor done injections
    assert len(JsonlStore(records)) == 10 + 10 * len(ev.INJECTION_RUNS)
    idle = FakeLM(gullible)
    assert ev.evaluate(idle, cfg, prefs, methods, True, JsonlStore(records)) == whole
    assert idle.questions == 0
