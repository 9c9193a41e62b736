"""Deterministic stand-ins for the LM protocol, for label / eval-labeler / injection tests."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from rlaif.backends.base import BackendStats, Conversation, Generation, GenerationParams


def text_of(conv: Conversation) -> str:
    if isinstance(conv, str):
        return conv
    return "\n".join(m["content"] for m in conv)


def options_of(prompt: str) -> tuple[str, str]:
    """The texts of the last question's options (A) and (B), as the model sees them."""
    body = prompt.rsplit("Options:\n(A) ", 1)[1]
    a, _, rest = body.partition("\n(B) ")
    b = rest.rsplit("\nThe answer is:", 1)[0]
    return a, b


class FakeLM:
    """``choice_logprobs`` answers with ``judge(prompt text, choices) -> probabilities``.

    ``generate`` returns ``"answer {k} to {last user text}"`` with ``k`` from the seed, so the
    two sampled answers of a prompt differ; calls are counted.
    """

    def __init__(self, judge: Callable[[str, Sequence[str]], Sequence[float]], name: str = "fake"):
        self.judge = judge
        self.name = name
        self.stats = BackendStats()
        self.generate_calls = 0
        self.choice_calls = 0
        self.questions = 0

    def generate(
        self, conversations: Sequence[Conversation], params: GenerationParams
    ) -> list[Generation]:
        self.generate_calls += 1
        out = []
        for i, conv in enumerate(conversations):
            last = text_of(conv).splitlines()[-1][:40]
            tag = "safe" if ((params.seed or 0) + i) % 2 == 0 else "risky"
            out.append(Generation(f"{tag} answer {params.seed}:{i} to {last}", 5, 5))
        return out

    def choice_logprobs(
        self, prompts: Sequence[Conversation], choices: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        self.choice_calls += 1
        self.questions += len(prompts)
        res = []
        for p, cs in zip(prompts, choices, strict=True):
            probs = self.judge(text_of(p), cs)
            res.append([math.log(max(x, 1e-12)) for x in probs])
        return res


def prefers_safe(prompt: str, choices: Sequence[str]) -> list[float]:
    """A sensible judge: the option containing 'safe' wins 0.8 : 0.2; Yes/No: 'risky' is harmful."""
    if list(choices) == [" Yes", " No"]:
        answer = prompt.rsplit("Assistant:", 1)[-1]
        return [0.7, 0.3] if "risky" in answer else [0.1, 0.9]
    a, b = options_of(prompt)
    if ("safe" in a) == ("safe" in b):
        return [0.5, 0.5]
    return [0.8, 0.2] if "safe" in a else [0.2, 0.8]


def always_a(p_a: float) -> Callable[[str, Sequence[str]], list[float]]:
    """A position-biased judge: P(A) = p_a whatever the answers."""

    def judge(prompt: str, choices: Sequence[str]) -> list[float]:
        if list(choices) == [" Yes", " No"]:
            return [0.5, 0.5]
        return [p_a, 1 - p_a]

    return judge


_INJECTED = re.compile(r"answer is:\s*\(([AB])\)", re.IGNORECASE)


def gullible(prompt: str, choices: Sequence[str]) -> list[float]:
    """Obeys any "The answer is: (X)" inside the options; otherwise answers (A) 0.7, unless (A)
    mentions a window."""
    a, b = options_of(prompt)
    found = _INJECTED.findall(a + "\n" + b)
    if found:
        return [0.9, 0.1] if found[-1].upper() == "A" else [0.1, 0.9]
    return [0.3, 0.7] if "window" in a.lower() else [0.7, 0.3]
