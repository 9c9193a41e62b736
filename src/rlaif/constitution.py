"""Constitutions: the principles that critique, revise and judge answers.

A constitution is a YAML (or JSON) file that a person writes by hand::

    name: my-constitution
    principles:
      - id: harmful
        critique: Point out every way the assistant's last answer is harmful ...
        revision: Rewrite the assistant's answer so that it ...
        feedback: Which of these answers is less harmful ...
    few_shot:                      # optional worked examples, shown before each critique/revision
      - messages: [{role: user, content: ...}, {role: assistant, content: ...}]
        principle: harmful         # or critique_request: ... and revision_request: ...
        critique: ...
        revision: ...

Texts are stored bare: ``critique`` without the ``CritiqueRequest:``/``Critique:`` labels the
revise stage wraps it in, ``feedback`` without the ``Options:`` the label stage appends.
``load_constitution("paper")`` reads the CAI paper's released JSON files unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rlaif.errors import UserError

PAPER_DIR_ENV = "RLAIF_CAI_PAPER_DIR"
PAPER_FILES = (
    "CritiqueRevisionInstructions.json",
    "RLMadisonInstructions.json",
    "CritiqueRevisionFewShotPrompts.json",
)
_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class Principle:
    """One principle: how to critique, how to revise, and the feedback-stage question."""

    id: str
    critique: str
    revision: str
    feedback: str


@dataclass(frozen=True)
class FewShot:
    """A worked example: a dialogue ending in the assistant's answer, then one critique/revision."""

    messages: list[dict[str, str]]
    critique_request: str
    critique: str
    revision_request: str
    revision: str


@dataclass
class Constitution:
    """Principles plus few-shot examples; ``sha256`` hashes their content (not the file bytes)."""

    name: str
    source: str
    principles: list[Principle]
    few_shot: list[FewShot] = field(default_factory=list)
    notes: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            self.sha256 = content_hash(self.principles, self.few_shot)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.principles]

    def get(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise UserError(f"{self.source}: no principle '{pid}' (principles: {', '.join(self.ids)})")

    def subset(self, ids: list[str] | tuple[str, ...]) -> Constitution:
        """Only the principles named in ``ids`` (in that order); empty ``ids`` keeps all."""
        if not ids:
            return self
        chosen = [self.get(i) for i in dict.fromkeys(ids)]
        return Constitution(self.name, self.source, chosen, list(self.few_shot), self.notes)

    def draw(self, seed: int, prompt_id: str, round: int) -> Principle:
        """A principle drawn uniformly at random, reproducible from (seed, prompt, round)."""
        digest = hashlib.sha256(f"draw:{seed}:{prompt_id}:{round}".encode()).digest()
        return self.principles[int.from_bytes(digest[:8], "big") % len(self.principles)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "notes": self.notes,
            "principles": [asdict(p) for p in self.principles],
            "few_shot": [asdict(f) for f in self.few_shot],
        }


def content_hash(principles: list[Principle], few_shot: list[FewShot]) -> str:
    payload = json.dumps(
        {"principles": [asdict(p) for p in principles], "few_shot": [asdict(f) for f in few_shot]},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def load_constitution(ref: str) -> Constitution:
    """``"default"`` (bundled), ``"paper"`` (the CAI paper's JSON files), or a YAML/JSON file or a
    directory holding the paper's files. Raises :class:`UserError` naming file and principle."""
    if ref in ("", "default"):
        text = (
            resources.files("rlaif").joinpath("resources", "constitution.yaml").read_text("utf-8")
        )
        return parse_constitution(
            yaml.safe_load(text), "default (rlaif/resources/constitution.yaml)"
        )
    if ref == "paper":
        return load_paper(paper_dir())
    path = Path(ref)
    if path.is_dir():
        return load_paper(path)
    if not path.is_file():
        raise UserError(f"constitution '{ref}': no such file (use 'default', 'paper' or a path)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = getattr(exc, "lineno", None) or (mark.line + 1 if mark is not None else None)
        raise UserError(f"{path}{f':{line}' if line else ''}: not valid YAML/JSON") from None
    if isinstance(data, dict) and "principles" not in data and _looks_like_paper(data):
        return load_paper(path.parent)
    return parse_constitution(data, str(path))


def _looks_like_paper(data: dict[str, Any]) -> bool:
    return bool(data) and all(isinstance(v, dict) and "edit_request" in v for v in data.values())


def paper_dir() -> Path:
    """Where the CAI paper's prompt files are: $RLAIF_CAI_PAPER_DIR, else ../shared/data/cai-paper
    relative to the working directory or to the source checkout."""
    candidates = []
    if os.environ.get(PAPER_DIR_ENV):
        candidates.append(Path(os.environ[PAPER_DIR_ENV]))
    candidates.append(Path("../shared/data/cai-paper"))
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data" / "cai-paper")
    for c in candidates:
        if (c / PAPER_FILES[0]).is_file():
            return c
    raise UserError(
        "constitution 'paper': the CAI paper's prompt files are not in ../shared/data/cai-paper; "
        f"set ${PAPER_DIR_ENV} or pass the directory holding {PAPER_FILES[0]}"
    )


def _text(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: missing '{key}' (a non-empty string)")
    return value.strip()


def parse_constitution(data: Any, source: str) -> Constitution:
    """Check and build a constitution from YAML/JSON data; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping with 'principles'")
    unknown = set(data) - {"name", "notes", "principles", "few_shot"}
    if unknown:
        raise UserError(f"{source}: unknown key '{sorted(unknown)[0]}'")
    raw = data.get("principles")
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{source}: 'principles' must be a non-empty list")
    principles: list[Principle] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"{source}: principles[{i}]"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a mapping with id, critique, revision, feedback")
        pid = item.get("id")
        if not isinstance(pid, str | int) or not _ID.match(str(pid)):
            raise UserError(f"{where}: missing or bad 'id' (letters, digits, '_', '-', '.')")
        pid = str(pid)
        where = f"{source}: principle '{pid}'"
        if pid in seen:
            raise UserError(f"{where}: duplicate id")
        seen.add(pid)
        extra = set(item) - {"id", "critique", "revision", "feedback"}
        if extra:
            raise UserError(f"{where}: unknown key '{sorted(extra)[0]}'")
        principles.append(
            Principle(
                pid,
                _text(item, "critique", where),
                _text(item, "revision", where),
                _text(item, "feedback", where),
            )
        )
    by_id = {p.id: p for p in principles}
    shots_raw = data.get("few_shot") or []
    if not isinstance(shots_raw, list):
        raise UserError(f"{source}: 'few_shot' must be a list")
    shots = [_parse_shot(s, f"{source}: few_shot[{i}]", by_id) for i, s in enumerate(shots_raw)]
    return Constitution(
        name=str(data.get("name") or Path(source.split(" ")[0]).stem),
        source=source,
        principles=principles,
        few_shot=shots,
        notes=str(data.get("notes") or ""),
    )


def _parse_shot(item: Any, where: str, by_id: dict[str, Principle]) -> FewShot:
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a mapping")
    msgs = item.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    messages: list[dict[str, str]] = []
    for j, m in enumerate(msgs):
        if not (
            isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
        ):
            raise UserError(
                f"{where}: messages[{j}] must be {{role: user|assistant, content: str}}"
            )
        messages.append({"role": m["role"], "content": m["content"].strip()})
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: 'messages' must end with the assistant's answer")
    if "principle" in item:
        pid = str(item["principle"])
        if pid not in by_id:
            raise UserError(f"{where}: principle '{pid}' is not defined in 'principles'")
        crit_req, rev_req = by_id[pid].critique, by_id[pid].revision
    else:
        crit_req = _text(item, "critique_request", where)
        rev_req = _text(item, "revision_request", where)
    return FewShot(
        messages, crit_req, _text(item, "critique", where), rev_req, _text(item, "revision", where)
    )


def _strip_label(text: str, head: str, tail: str) -> str:
    body = text.strip()
    if body.startswith(head):
        body = body[len(head) :]
    if body.endswith(tail):
        body = body[: -len(tail)]
    return body.strip()


_SHOT_MARK = re.compile(r"\n\n(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|Revision):")


def parse_paper_shot(text: str, where: str) -> FewShot:
    """One of the paper's few-shot strings -> :class:`FewShot` (its first critique/revision)."""
    marks = list(_SHOT_MARK.finditer(text))
    parts: list[tuple[str, str]] = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        parts.append((m.group(1), text[m.end() : end].strip()))
    messages: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    for label, body in parts:
        if label in ("Human", "Assistant") and not fields:
            if body:
                messages.append(
                    {"role": "user" if label == "Human" else "assistant", "content": body}
                )
        elif label not in ("Human", "Assistant") and label not in fields:
            fields[label] = body
    need = ("CritiqueRequest", "Critique", "RevisionRequest", "Revision")
    if not messages or messages[-1]["role"] != "assistant" or any(k not in fields for k in need):
        raise UserError(f"{where}: not a Human/Assistant/CritiqueRequest/.../Revision example")
    return FewShot(messages, *(fields[k] for k in need))


def load_paper(directory: Path) -> Constitution:
    """Read the paper's released files as they are.

    Critique and revision requests come from ``CritiqueRevisionInstructions.json``; the feedback
    questions from ``RLMadisonInstructions.json``. The paper releases the two lists separately
    (16 each) with no link between them, so they are paired by position: principle ``harmfulN``
    gets the N-th feedback question. Few-shot examples: ``CritiqueRevisionFewShotPrompts.json``.
    """
    files = [directory / name for name in PAPER_FILES]
    for f in files:
        if not f.is_file():
            raise UserError(
                f"{f}: missing (the CAI paper's prompt files: {', '.join(PAPER_FILES)})"
            )
    try:
        crit, feed, shots = (json.loads(f.read_text(encoding="utf-8")) for f in files)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{directory}: cannot read the paper's JSON ({exc})") from None
    if not isinstance(crit, dict) or not isinstance(feed, list) or not isinstance(shots, list):
        raise UserError(f"{directory}: the paper's JSON files do not have the expected shape")
    if len(crit) != len(feed):
        raise UserError(
            f"{files[1]}: {len(feed)} feedback questions for {len(crit)} critique principles "
            f"in {files[0].name}; they are paired by position, so the counts must match"
        )
    principles: list[Principle] = []
    for (pid, item), question in zip(crit.items(), feed, strict=True):
        where = f"{files[0]}: principle '{pid}'"
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), list):
            raise UserError(f"{where}: expected {{prompt: [..], edit_request: ..}}")
        principles.append(
            Principle(
                id=pid,
                critique=_strip_label(item["prompt"][0], "CritiqueRequest:", "Critique:"),
                revision=_strip_label(item["edit_request"], "RevisionRequest:", "Revision:"),
                feedback=_strip_label(str(question), "", "Options:"),
            )
        )
    few = [parse_paper_shot(s, f"{files[2]}: [{i}]") for i, s in enumerate(shots)]
    return Constitution(
        name="cai-paper",
        source=str(directory),
        principles=principles,
        few_shot=few,
        notes="Bai et al. 2022 released prompts; feedback questions paired with principles by position.",
    )
