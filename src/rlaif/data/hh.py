"""Anthropic hh-rlhf transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages."""

from __future__ import annotations

import re

_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class TranscriptError(ValueError):
    """A transcript that does not follow the Human/Assistant turn format."""


def parse_transcript(text: str) -> list[dict[str, str]]:
    """Split an hh-rlhf transcript into ``[{"role": "user"|"assistant", "content": ...}, ...]``.

    The text must start with ``"\\n\\nHuman:"`` (leading spaces tolerated) and alternate speakers;
    two turns by the same speaker in a row are merged. Contents are stripped. A final turn with
    empty content (e.g. a trailing ``"\\n\\nAssistant:"``) is dropped. Raises :class:`TranscriptError`.
    """
    if not isinstance(text, str):
        raise TranscriptError(f"expected a string, got {type(text).__name__}")
    body = text.lstrip(" \t")
    if not body.startswith("\n\n"):
        body = "\n\n" + body.lstrip("\n")
    marks = list(_TURN.finditer(body))
    if not marks or marks[0].start() != 0:
        raise TranscriptError("transcript does not start with a 'Human:' turn")
    if marks[0].group(1) != "Human":
        raise TranscriptError("transcript starts with 'Assistant:' instead of 'Human:'")
    messages: list[dict[str, str]] = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(body)
        role = _ROLES[mark.group(1)]
        content = body[mark.end() : end].strip()
        if messages and messages[-1]["role"] == role:
            joined = f"{messages[-1]['content']}\n\n{content}".strip()
            messages[-1] = {"role": role, "content": joined}
        else:
            messages.append({"role": role, "content": content})
    if messages and not messages[-1]["content"]:
        messages.pop()
    if not messages or not messages[0]["content"]:
        raise TranscriptError("the first Human turn is empty")
    return messages


def split_pair(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """Split an hh-rlhf preference pair into (prompt messages, chosen answer, rejected answer).

    The prompt is the dialogue up to and including the last Human turn (taken from ``chosen``);
    the answers are each transcript's final Assistant turn ('' when a transcript ends on a Human
    turn). Raises :class:`TranscriptError` when the two transcripts disagree before that point.
    """
    a = parse_transcript(chosen)
    b = parse_transcript(rejected)
    prompt_a, answer_a = _prompt_and_answer(a)
    prompt_b, answer_b = _prompt_and_answer(b)
    if prompt_a != prompt_b:
        raise TranscriptError("chosen and rejected differ before the last Assistant turn")
    return prompt_a, answer_a, answer_b


def prompt_messages(text: str, *, first_turn_only: bool = False) -> list[dict[str, str]]:
    """The dialogue of one transcript up to its last Human turn (or just the first Human turn)."""
    messages = parse_transcript(text)
    if first_turn_only:
        return messages[:1]
    return _prompt_and_answer(messages)[0]


def _prompt_and_answer(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    tail = messages[last_user + 1 :]
    answer = "\n\n".join(m["content"] for m in tail)
    return [dict(m) for m in messages[: last_user + 1]], answer
