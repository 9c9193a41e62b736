"""Soft-label arithmetic and the multiple-choice prompt, against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest

from rlaif import feedback as fb

PROMPT = [{"role": "user", "content": "How do I pick a lock?"}]


def test_normalise_hand_values() -> None:
    # P(A) = 0.3 / (0.3 + 0.1) = 0.75 from log-probs of 0.3 and 0.1.
    assert fb.normalise(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    # e^-1 / (e^-1 + e^-2) = 0.36788 / 0.50321 = 0.731059
    assert fb.normalise(-1.0, -2.0) == pytest.approx(0.731059, abs=1e-6)
    assert fb.normalise(-2.0, -1.0) == pytest.approx(1 - 0.731059, abs=1e-6)
    assert fb.normalise(-5.0, -5.0) == 0.5
    # No overflow with very unequal log-probs.
    assert fb.normalise(0.0, -1000.0) == pytest.approx(1.0)
    assert fb.normalise(-1000.0, 0.0) == pytest.approx(0.0)


def test_dual_order_averaging() -> None:
    # Order 0 says P(A)=0.9 (first answer at A); order 1 says P(A)=0.7 (first answer at B):
    # P(first better) = (0.9 + (1 - 0.7)) / 2 = 0.6.
    assert fb.dual_order(0.9, 0.7) == pytest.approx(0.6)
    assert fb.first_better(0.7, 1) == pytest.approx(0.3)
    assert fb.first_better(0.7, 0) == pytest.approx(0.7)
    # A labeller that always answers (A) with 0.95 says nothing once both orders are averaged.
    assert fb.dual_order(0.95, 0.95) == pytest.approx(0.5)
    # A labeller that is consistent across orders keeps its verdict.
    assert fb.dual_order(0.8, 0.2) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        fb.first_better(0.5, 2)


def test_ensemble_and_clamp() -> None:
    assert fb.ensemble([0.6, 0.8, 0.7]) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        fb.ensemble([])
    assert fb.clamp(0.9) == 0.6
    assert fb.clamp(0.1) == 0.4
    assert fb.clamp(0.55) == 0.55
    assert fb.clamp(0.99, 0.3, 0.7) == 0.7
    with pytest.raises(ValueError):
        fb.clamp(0.5, 0.6, 0.4)


def test_pointwise() -> None:
    # P(No) = 0.6 / (0.2 + 0.6) = 0.75.
    assert fb.pointwise_score(math.log(0.2), math.log(0.6)) == pytest.approx(0.75)
    # 0.5 + (0.75 - 0.25) / 2 = 0.75; equal scores tie at 0.5; extremes reach 0 and 1.
    assert fb.pointwise_label(0.75, 0.25) == pytest.approx(0.75)
    assert fb.pointwise_label(0.4, 0.4) == pytest.approx(0.5)
    assert fb.pointwise_label(1.0, 0.0) == 1.0
    assert fb.pointwise_label(0.0, 1.0) == 0.0


def test_accuracy_ece_order_flip() -> None:
    # verdicts 1, 0, 0.5 (tie), 1 -> 2.5 / 4
    assert fb.accuracy([0.9, 0.2, 0.5, 0.6]) == pytest.approx(0.625)
    # confidences 0.9 (right), 0.8 (right), 0.7 (wrong), each its own bin:
    # (|1 - 0.9| + |1 - 0.8| + |0 - 0.7|) / 3 = 1.0 / 3
    assert fb.expected_calibration_error([0.9, 0.8, 0.3]) == pytest.approx(1 / 3)
    # Two pairs in one bin: mean confidence 0.9, accuracy 0.5 -> 0.4.
    assert fb.expected_calibration_error([0.9, 0.1]) == pytest.approx(0.4)
    assert fb.order_flip(0.9, 0.8)  # A both times: verdict flips with the order
    assert not fb.order_flip(0.9, 0.1)


def test_question_text_is_the_papers_form() -> None:
    q = fb.mc_question(
        PROMPT,
        "\nPlease choose the more harmless response. Options:",
        "I can't help.",
        "Use a pin.",
        delimit=False,
    )
    assert q == (
        "Consider the following conversation between a human and an assistant:\n\n"
        "Human: How do I pick a lock?\n\n"
        "Please choose the more harmless response.\n"
        "Options:\n(A) I can't help.\n(B) Use a pin."
    )
    chat = fb.as_prompt(q, fb.ANSWER_CUE, chat=True)
    assert chat == [
        {"role": "user", "content": q},
        {"role": "assistant", "content": "The answer is:"},
    ]
    plain = fb.as_prompt(q, fb.ANSWER_CUE, chat=False, shots=[("Q1", "The answer is: (B)")])
    assert (
        plain
        == f"Human: Q1\n\nAssistant: The answer is: (B)\n\nHuman: {q}\n\nAssistant: The answer is:"
    )


def test_escape_neutralises_template_lookalikes() -> None:
    text = "Sure. The answer is: (A)\nOptions: [[[x]]] so the answer is:(b)"
    assert (
        fb.escape_answer(text) == "Sure. The answer is - [A]\nOptions - [[x]] so the answer is -[b]"
    )
    q = fb.mc_question(PROMPT, "Pick one.", text, "No.", delimit=True)
    assert q.count("Options:") == 1
    assert q.count("(A)") == 1 and q.count("(B)") == 1
    assert "(A) [[[Sure." in q and "(B) [[[No.]]]" in q
    options = q.split("Options:\n", 1)[1]
    assert options.count("[[[") == 2 and options.count("]]]") == 2
    assert options.endswith("(B) [[[No.]]]")
    # An answer ending in a bracket cannot merge with the closing quote.
    assert fb.format_answer("see [1]", True) == "[[[see [1] ]]]"


def test_few_shot_from_paper_files(shared_data) -> None:  # type: ignore[no-untyped-def]
    items = json.loads((shared_data / "cai-paper" / "RLMadisonFewShotPrompts.json").read_text())
    shots = fb.few_shot_pairs(items, "Which is less harmful?", delimit=False)
    assert [a for _, a in shots] == [
        "The answer is: (A)",
        "The answer is: (B)",
        "The answer is: (A)",
        "The answer is: (B)",
        "The answer is: (A)",
    ]
    # Example 0 puts the correct answer at (A), example 1 at (B).
    assert "(A) You should not get involved in robbery" in shots[0][0]
    assert "(B) Oh no, please seek professional help" in shots[1][0]
    cot = json.loads((shared_data / "cai-paper" / "RLMadisonPrecogFewShotPrompts.json").read_text())
    cshots = fb.cot_few_shot_pairs([c["prompt"] for c in cot], "Which is less harmful?")
    assert len(cshots) == 6
    assert cshots[0][1].endswith("So the answer is: (B)")
    assert "Which is less harmful?" in cshots[0][0] and "{}" not in cshots[0][0]
    assert not cshots[0][0].startswith("\n") and "Assistant:" not in cshots[0][1]


def test_cot_trim_and_continuation() -> None:
    assert fb.trim_cot(" (A) is rude. So the answer is: (B)\n\nHuman: hi") == "(A) is rude."
    conv = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": fb.COT_CUE}]
    out = fb.cot_continuation(conv, "B is kinder.")
    assert out[-1]["content"] == "Let's think step by step: B is kinder.\n\nSo the answer is:"
    assert conv[-1]["content"] == fb.COT_CUE  # not mutated
    assert fb.cot_continuation("X:", "") == "X: So the answer is:"
