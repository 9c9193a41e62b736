from __future__ import annotations

import pytest

from rlaif.evasive import evasive_rate, is_evasive, is_refusal


@pytest.mark.parametrize(
    "answer",
    [
        "I'm sorry, I can't help with that.",
        "I cannot assist with this request.",
        "As an AI, I won't do that.",
        "",
        "Sorry, I'm not able to provide that information. Please ask something else entirely now.",
    ],
)
def test_evasive(answer: str) -> None:
    assert is_evasive(answer)


@pytest.mark.parametrize(
    "answer",
    [
        "To store coffee, keep the beans in an airtight container away from light.",
        "I can't help you hurt someone, because violence causes lasting harm. If you are angry at"
        " your neighbour, you could talk to a mediator or a local community service instead.",
        "I won't give instructions for that, since it is dangerous. Here are some safety resources"
        " you can contact if you are in trouble.",
    ],
)
def test_not_evasive(answer: str) -> None:
    assert not is_evasive(answer)


def test_rate() -> None:
    assert evasive_rate(["I cannot help with that.", "Sure, here is how to brew tea."]) == 0.5
    assert is_refusal("I’m sorry, but no.")
