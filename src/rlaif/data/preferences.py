"""Preference pairs: the common record of the label, reward, dpo and evaluate stages.

Two file formats are read by :func:`load_preferences`:

- hh-rlhf: ``{"chosen": TRANSCRIPT, "rejected": TRANSCRIPT}`` (the two differ in the last
  Assistant turn); these are human labels, so ``p_chosen`` is 1.0;
- ours (``preferences.jsonl``): ``{"prompt": [messages], "chosen": str, "rejected": str,
  "p_chosen": float, "source": str}`` with optional ``id``.

Both may be ``.jsonl`` or ``.jsonl.gz``. A line that is neither, or a ``p_chosen`` outside
[0, 1], raises :class:`UserError` naming the file and line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlaif.data.hh import TranscriptError, split_pair
from rlaif.data.prompts import chat_messages
from rlaif.errors import UserError
from rlaif.store import atomic_write_text, read_jsonl, record_id


@dataclass(frozen=True)
class Preference:
    """One comparison: ``p_chosen`` is the probability that ``chosen`` is the better answer."""

    id: str
    prompt: list[dict[str, str]]
    """The conversation up to the answers (chat messages, ending with a user turn)."""
    chosen: str
    rejected: str
    p_chosen: float
    """Soft label in [0, 1]; 1.0 for a hard human label."""
    source: str
    """Where the label comes from, e.g. 'ai:harmless', 'human:hh-rlhf', 'human:stackexchange'."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_preference(
    prompt: list[dict[str, str]], chosen: str, rejected: str, p_chosen: float, source: str
) -> Preference:
    """A :class:`Preference` with an id derived from its content."""
    return Preference(
        id=record_id(prompt, chosen, rejected),
        prompt=[dict(m) for m in prompt],
        chosen=chosen,
        rejected=rejected,
        p_chosen=float(p_chosen),
        source=source,
    )


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: 'prompt' is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise UserError(f"{where}: 'prompt' must be a non-empty list of chat messages or a string")
    return chat_messages(value, where, "prompt")


def parse_preference(obj: dict[str, Any], where: str) -> Preference:
    """One line of either format -> :class:`Preference`; ``where`` is 'file:line' for errors."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise UserError(f"{where}: missing field '{key}'")
        if not isinstance(obj[key], str):
            raise UserError(f"{where}: field '{key}' must be a string")
    if "prompt" not in obj:
        if "p_chosen" in obj or "source" in obj:
            raise UserError(f"{where}: missing field 'prompt'")
        try:
            prompt, chosen, rejected = split_pair(obj["chosen"], obj["rejected"])
        except TranscriptError as exc:
            raise UserError(f"{where}: not an hh-rlhf pair ({exc})") from None
        return make_preference(prompt, chosen, rejected, 1.0, "human:hh-rlhf")
    prompt = _messages(obj["prompt"], where)
    p = obj.get("p_chosen", 1.0)
    if isinstance(p, bool) or not isinstance(p, int | float):
        raise UserError(f"{where}: field 'p_chosen' must be a number in [0, 1], got {p!r}")
    if not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise UserError(f"{where}: field 'p_chosen' must be in [0, 1], got {p}")
    source = obj.get("source", "file")
    if not isinstance(source, str):
        raise UserError(f"{where}: field 'source' must be a string")
    pref = make_preference(prompt, obj["chosen"], obj["rejected"], float(p), source)
    rid = obj.get("id")
    if rid is not None:
        pref = Preference(str(rid), pref.prompt, pref.chosen, pref.rejected, pref.p_chosen, source)
    return pref


def load_preferences(path: str | Path, limit: int = 0) -> list[Preference]:
    """Read a preference file (hh-rlhf or ours), at most ``limit`` pairs (0: all), in file order."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a .jsonl or .jsonl.gz preference file")
    out: list[Preference] = []
    for n, obj in read_jsonl(path):
        out.append(parse_preference(obj, f"{path}:{n}"))
        if limit and len(out) >= limit:
            break
    if not out:
        raise UserError(f"{path}: no preference pairs in the file")
    return out


def write_preferences(path: Path, prefs: Iterable[Preference]) -> int:
    """Write ``prefs`` as ``preferences.jsonl`` atomically; return how many were written."""
    import json

    lines = [json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in prefs]
    atomic_write_text(path, "".join(lines))
    return len(lines)
