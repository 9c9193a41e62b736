"""SFT examples for SL-CAI: prompt -> revised answer, mixed with helpfulness samples, tokenized.

Inputs (both written by `rlaif revise`):

- ``revisions.jsonl``: ``{"id", "prompt": [messages], "initial": str, "rounds": [{"principle",
  "critique", "revision", "status", "finish_reason"}, ...], ...}``. A round whose revision is empty
  or whose ``status`` is not ``"ok"`` (revise marks 'empty', 'repetitive', 'echo') is skipped: the
  example uses the last good revision. A record with no good round gives no example.
- ``helpful.jsonl``: ``{"id", "prompt": [messages], "answer": str, "status", "finish_reason"}``.

An answer cut off at the token limit (``finish_reason == "length"``) is trained on without the
end-of-turn tokens, so the model does not learn to stop in mid-sentence.

Tokenization applies the model's chat template; the labels are -100 everywhere except the
assistant turn (its text and the template's end-of-turn tokens), so the loss covers the response
only.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif.errors import UserError
from rlaif.store import read_jsonl

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class SFTExample:
    """One training pair: ``prompt`` (chat messages ending on a user turn) -> ``response``."""

    id: str
    prompt: list[dict[str, str]]
    response: str
    source: str
    """'revision' (final), 'revision:<k>' (round k, with every_round) or 'helpful'."""
    complete: bool = True
    """False when the answer was cut off at the token limit: no end-of-turn tokens are trained."""


def _prompt(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: 'prompt' must be a non-empty list of chat messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise UserError(f"{where}: prompt[{i}] must be {{'role': str, 'content': str}}")
        out.append({"role": str(m["role"]), "content": m["content"]})
    return out


def good_round(rnd: Any) -> bool:
    """A round that produced a usable revision (not empty, not flagged degenerate)."""
    if not isinstance(rnd, dict):
        return False
    text = rnd.get("revision")
    if not isinstance(text, str) or not text.strip():
        return False
    return rnd.get("status", "ok") == "ok" and not rnd.get("degenerate")


def _complete(rec: dict[str, Any]) -> bool:
    return rec.get("finish_reason") != "length"


def revision_examples(
    records: Iterable[tuple[str, dict[str, Any]]], every_round: bool
) -> list[SFTExample]:
    """Examples from revision records given as ``(where, record)``; records with no good round are skipped."""
    out: list[SFTExample] = []
    skipped = 0
    for where, rec in records:
        for key in ("id", "prompt", "rounds"):
            if key not in rec:
                raise UserError(f"{where}: missing field '{key}' (expected a revision record)")
        if not isinstance(rec["rounds"], list):
            raise UserError(f"{where}: field 'rounds' must be a list")
        prompt = _prompt(rec["prompt"], where)
        good = [(k, r) for k, r in enumerate(rec["rounds"]) if good_round(r)]
        if not good:
            skipped += 1
            continue
        rid = str(rec["id"])
        if every_round:
            out += [
                SFTExample(
                    f"{rid}:{k}", prompt, r["revision"].strip(), f"revision:{k}", _complete(r)
                )
                for k, r in good
            ]
        else:
            last = good[-1][1]
            out.append(
                SFTExample(rid, prompt, last["revision"].strip(), "revision", _complete(last))
            )
    if skipped:
        log.warning("sft: %d revision record(s) had no usable revision and were skipped", skipped)
    return out


def helpful_examples(records: Iterable[tuple[str, dict[str, Any]]]) -> list[SFTExample]:
    """Examples from helpfulness records ``{"id", "prompt", "answer"}``; empty or degenerate answers
    (``status`` other than 'ok') are skipped."""
    out: list[SFTExample] = []
    for where, rec in records:
        for key in ("id", "prompt", "answer"):
            if key not in rec:
                raise UserError(f"{where}: missing field '{key}' (expected a helpfulness record)")
        answer = rec["answer"]
        if not isinstance(answer, str):
            raise UserError(f"{where}: field 'answer' must be a string")
        if answer.strip() and rec.get("status", "ok") == "ok":
            prompt = _prompt(rec["prompt"], where)
            out.append(
                SFTExample(str(rec["id"]), prompt, answer.strip(), "helpful", _complete(rec))
            )
    return out


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path}:{n}", obj) for n, obj in read_jsonl(path)]


def helpful_count(n_revision: int, n_helpful: int, ratio: float) -> int:
    """Helpfulness examples to take so they make up ``ratio`` of the mix (capped by supply).

    >>> helpful_count(30, 100, 0.25)
    10
    """
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"sft.helpful_ratio: expected a number in [0, 1), got {ratio}")
    if n_revision == 0:
        return n_helpful if ratio > 0 else 0
    want = round(n_revision * ratio / (1.0 - ratio))
    return min(want, n_helpful)


def mix(
    revisions: list[SFTExample], helpful: list[SFTExample], ratio: float, seed: int
) -> list[SFTExample]:
    """All revision examples plus a seeded sample of helpfulness examples (``ratio`` of the total)."""
    n = helpful_count(len(revisions), len(helpful), ratio)
    if ratio > 0 and n < round(len(revisions) * ratio / (1.0 - ratio)):
        log.warning("sft: only %d helpfulness samples for helpful_ratio=%s; using all", n, ratio)
    picked = random.Random(seed).sample(helpful, n) if n < len(helpful) else list(helpful)
    return revisions + picked


# ---------------------------------------------------------------- tokenization


def chat_parts(tok: Any, prompt: list[dict[str, str]], response: str) -> tuple[str, str]:
    """(prompt text with the generation header, response text with the end-of-turn tokens)."""
    if not getattr(tok, "chat_template", None):
        raise UserError(
            "sft: the model's tokenizer has no chat template (tokenizer_config.json "
            "'chat_template'); use an instruct/chat model or add a template"
        )
    head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(
        [*prompt, {"role": "assistant", "content": response}], tokenize=False
    )
    if full.startswith(head):
        return head, full[len(head) :]
    # Templates that render the prompt differently once an answer follows: train on the answer
    # plus EOS after the generation-prompt rendering, which is what the model sees when sampling.
    return head, response + (tok.eos_token or "")


def truncate(
    prompt_ids: list[int], response_ids: list[int], max_length: int
) -> tuple[list[int], list[int]]:
    """Fit into ``max_length``: cut the prompt from the left; cut the response only when it alone
    would leave less than a quarter of the budget to the prompt.

    >>> truncate([1, 2, 3, 4], [5, 6], 4)
    ([3, 4], [5, 6])
    """
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    keep_prompt = max(max_length - len(response_ids), min(len(prompt_ids), max_length // 4))
    response_ids = response_ids[: max_length - keep_prompt]
    return prompt_ids[len(prompt_ids) - keep_prompt :], response_ids


def encode(tok: Any, ex: SFTExample, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example; labels are IGNORE on the prompt part."""
    head, tail = chat_parts(tok, ex.prompt, ex.response)
    if not ex.complete and ex.response in tail:  # cut off: train no end-of-turn tokens
        tail = tail[: tail.index(ex.response) + len(ex.response)]
    p_ids = tok(head, add_special_tokens=False)["input_ids"]
    r_ids = tok(tail, add_special_tokens=False)["input_ids"]
    p_ids, r_ids = truncate(p_ids, r_ids, max_length)
    return p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (IGNORE on padding)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
