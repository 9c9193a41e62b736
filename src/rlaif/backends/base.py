"""The narrow language-model interface every stage talks to.

A *conversation* is a list of chat messages ``{"role": "system"|"user"|"assistant", "content": str}``
or a plain string (completion mode: the text is the prompt as is). When a conversation ends with an
``assistant`` message, backends *continue* that message instead of opening a new turn (used for
answer prefixes such as ``"Let's think step by step:"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Message = dict[str, str]
Conversation = list[Message] | str


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings for one ``generate`` call."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    """Generation ends at the first of these strings; the string itself is not returned."""
    seed: int | None = None
    """Seed for sampling; with the same seed and inputs the same text comes back."""


@dataclass(frozen=True)
class Generation:
    """One completion."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    """``"stop"`` (EOS or a stop string) or ``"length"`` (hit ``max_new_tokens``)."""


@dataclass
class BackendStats:
    """Counters a backend keeps for progress bars and benchmarks."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    calls: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class LM(Protocol):
    """What a stage needs from a language model."""

    name: str
    stats: BackendStats

    def generate(
        self, conversations: Sequence[Conversation], params: GenerationParams
    ) -> list[Generation]:
        """Complete every conversation (batched by the backend); results in input order."""
        ...

    def choice_logprobs(
        self, prompts: Sequence[Conversation], choices: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Sum of token log-probabilities of each candidate continuation of each prompt.

        ``choices[i]`` are the candidates for ``prompts[i]`` (e.g. ``[" (A)", " (B)"]``); the result
        ``[i][j]`` is ``log P(choices[i][j] | prompts[i])``.
        """
        ...
