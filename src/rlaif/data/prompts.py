"""Prompt sources for generation stages: JSONL (prompt / messages / hh-rlhf), TXT, CSV, Posts.xml.

Every source becomes a list of :class:`PromptItem` (chat messages ending on a user turn), keyed by
a hash of the messages, de-duplicated, shuffled with a seed and cut to a limit.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif.data.hh import TranscriptError, prompt_messages
from rlaif.errors import UserError
from rlaif.store import read_jsonl, record_id

_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptItem:
    """One prompt: ``messages`` end with a user turn; ``id`` is a hash of them."""

    id: str
    messages: list[dict[str, str]]
    source: str
    """Where it came from, as ``file:line``."""


def prompt_id(messages: list[dict[str, str]]) -> str:
    """The content hash that keys a prompt's records in every stage."""
    return record_id([[m["role"], m["content"]] for m in messages])


def load_prompts(
    path: str | Path,
    *,
    column: str = "Behavior",
    first_turn_only: bool = False,
    limit: int = 0,
    shuffle: bool = True,
    seed: int = 0,
) -> list[PromptItem]:
    """Read prompts from ``path``; raise :class:`UserError` naming the file and line on bad input.

    Formats by extension: ``.jsonl``/``.jsonl.gz`` (objects with ``prompt`` (str), ``messages``
    (chat list) or hh-rlhf ``chosen``/``rejected`` transcripts, taken up to the last Human turn, or
    only the first with ``first_turn_only``); ``.txt`` (one prompt a line, blank lines skipped);
    ``.csv`` (the named ``column``); ``.xml`` (a Stack Exchange ``Posts.xml``: its questions).
    Duplicates keep their first occurrence; then a seeded shuffle; then ``limit`` (0: all).
    """
    path = Path(path)
    name = path.name.lower()
    if not path.exists():
        raise UserError(f"{path}: no such prompt file")
    if name.endswith((".jsonl", ".jsonl.gz")):
        raw = _from_jsonl(path, first_turn_only)
    elif name.endswith(".txt"):
        raw = _from_txt(path)
    elif name.endswith(".csv"):
        raw = _from_csv(path, column)
    elif name.endswith(".xml"):
        raw = _from_posts_xml(path)
    else:
        raise UserError(
            f"{path}: unknown prompt file type (use .jsonl, .jsonl.gz, .txt, .csv or .xml)"
        )
    items: list[PromptItem] = []
    seen: set[str] = set()
    for messages, where in raw:
        pid = prompt_id(messages)
        if pid in seen:
            continue
        seen.add(pid)
        items.append(PromptItem(pid, messages, where))
    if not items:
        raise UserError(f"{path}: no prompts found")
    if shuffle:
        random.Random(f"prompts:{seed}").shuffle(items)
    if limit > 0:
        items = items[:limit]
    return items


def _from_jsonl(path: Path, first_turn_only: bool) -> list[tuple[list[dict[str, str]], str]]:
    out: list[tuple[list[dict[str, str]], str]] = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        if "messages" in obj:
            messages = _check_messages(obj["messages"], where)
        elif "prompt" in obj:
            text = obj["prompt"]
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{where}: 'prompt' must be a non-empty string")
            messages = [{"role": "user", "content": text.strip()}]
        elif "chosen" in obj:
            if not isinstance(obj["chosen"], str):
                raise UserError(f"{where}: 'chosen' must be a transcript string")
            try:
                messages = prompt_messages(obj["chosen"], first_turn_only=first_turn_only)
            except TranscriptError as exc:
                raise UserError(f"{where}: bad hh-rlhf transcript: {exc}") from None
        else:
            raise UserError(f"{where}: expected a 'prompt', 'messages' or 'chosen' field")
        if first_turn_only and "chosen" not in obj:
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages = messages[: first + 1]
        out.append((messages, where))
    return out


def chat_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """``value`` as a non-empty list of ``{role: system|user|assistant, content: str}``; a
    one-line UserError naming ``where`` and ``field`` otherwise."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: '{field}' must be a non-empty list of chat messages")
    messages: list[dict[str, str]] = []
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or m.get("role") not in _ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise UserError(
                f"{where}: {field}[{i}] must be {{role: system|user|assistant, content: str}}"
            )
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _check_messages(value: Any, where: str) -> list[dict[str, str]]:
    messages = chat_messages(value, where, "messages")
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()  # a prompt ends on the user's turn; a trailing answer is not part of it
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise UserError(f"{where}: 'messages' has no user turn to answer")
    return messages


def _from_txt(path: Path) -> list[tuple[list[dict[str, str]], str]]:
    out: list[tuple[list[dict[str, str]], str]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            out.append(([{"role": "user", "content": line.strip()}], f"{path}:{n}"))
    return out


def _from_csv(path: Path, column: str) -> list[tuple[list[dict[str, str]], str]]:
    out: list[tuple[list[dict[str, str]], str]] = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, strict=True)
            header = reader.fieldnames or []
            if column not in header:
                raise UserError(
                    f"{path}:1: no column '{column}' (columns: {', '.join(header) or 'none'})"
                )
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    raise UserError(f"{where}: more fields than the header has")
                value = row.get(column)
                if value is None:
                    raise UserError(f"{where}: fewer fields than the header has")
                if not value.strip():
                    raise UserError(f"{where}: empty '{column}'")
                out.append(([{"role": "user", "content": value.strip()}], where))
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    return out


def _from_posts_xml(path: Path) -> list[tuple[list[dict[str, str]], str]]:
    try:
        from rlaif.data.stackexchange import load_questions
    except ImportError:
        raise UserError(f"{path}: Stack Exchange reading is not available in this build") from None
    out: list[tuple[list[dict[str, str]], str]] = []
    for q in load_questions(path):
        # ``text`` already starts with the title (see rlaif.data.stackexchange.load_questions).
        content = str(q.get("text") or q.get("title") or "").strip()
        if content:
            out.append(([{"role": "user", "content": content}], f"{path}#post{q.get('id')}"))
    return out
