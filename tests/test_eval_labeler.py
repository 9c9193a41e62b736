"""`rlaif eval-labeler`: figures checked against fake labellers with known behaviour."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing FILE"):
        ev.parse_args(["limit=3"])
    with pytest.raises(UserError, match="methods"):
        ev._methods("dual,magic")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b", "p_chosen": 1.5}\n')
    assert main(["eval-labeler", str(bad), "limit=2"]) == 2
