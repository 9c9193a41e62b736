"""Stage 1, ``rlaif revise``: answer red-team prompts, then critique and revise the answers.

For every prompt: an initial answer; then ``rounds`` rounds, each with a principle drawn at random
(seeded per prompt and round) from the constitution: the model critiques its current answer after
``CritiqueRequest: ... Critique:`` and rewrites it after ``RevisionRequest: ... Revision:``, with
the constitution's few-shot examples in front (the paper's form). Each round sees the dialogue
with the *current* answer, so the context does not grow with the number of rounds.

Every step runs as one batched ``generate`` call over all prompts of a chunk; a chunk's records are
appended (flushed, fsynced) to ``revisions.jsonl`` when it completes, so a killed run resumes where
it stopped. The same model then answers the helpfulness prompts (``helpful.jsonl``).
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif.backends.base import LM, Conversation, GenerationParams
from rlaif.config import ReviseConfig, RunConfig
from rlaif.configspec import to_dict
from rlaif.constitution import Constitution, FewShot, Principle, load_constitution
from rlaif.data.prompts import PromptItem, load_prompts
from rlaif.errors import UserError
from rlaif.manifest import hash_inputs, read_manifest, write_manifest
from rlaif.store import JsonlStore, ensure_dir, record_id

log = logging.getLogger(__name__)

ANSWER_STOPS = ("\n\nHuman:", "\n\nCritiqueRequest:", "\nHuman:")
CRITIQUE_STOPS = ("\n\nRevisionRequest:", "\n\nRevision:", "\n\nHuman:", "\n\nCritiqueRequest:")
REVISION_STOPS = ("\n\nCritiqueRequest:", "\n\nHuman:", "\n\nRevisionRequest:", "\n\nCritique:")
_LABEL = re.compile(r"^\s*(Critique|Revision|Assistant)\s*:\s*", re.IGNORECASE)


# ---------------------------------------------------------------------------- prompt building


def transcript(messages: Sequence[dict[str, str]]) -> str:
    """Messages as the paper's ``\\n\\nHuman: ...\\n\\nAssistant: ...`` text."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages)


@dataclass(frozen=True)
class Step:
    """The texts of one critique/revision round, for building its two prompts."""

    dialogue: list[dict[str, str]]
    """The prompt messages followed by the assistant's current answer."""
    critique_request: str
    critique: str | None = None
    revision_request: str = ""


def _shot_step(shot: FewShot) -> tuple[Step, str]:
    step = Step(shot.messages, shot.critique_request, shot.critique, shot.revision_request)
    return step, shot.revision


def build_text(shots: Sequence[FewShot], step: Step) -> str:
    """Completion-mode prompt (the paper's form): few-shot dialogues, then this round's request."""
    parts: list[str] = []
    for shot in shots:
        s, revision = _shot_step(shot)
        parts.append(_text_round(s) + f" {revision}")
    parts.append(_text_round(step))
    return "".join(parts)


def _text_round(step: Step) -> str:
    out = f"{transcript(step.dialogue)}\n\nCritiqueRequest: {step.critique_request}\n\nCritique:"
    if step.critique is not None:
        out += f" {step.critique}\n\nRevisionRequest: {step.revision_request}\n\nRevision:"
    return out


def build_chat(shots: Sequence[FewShot], step: Step) -> list[dict[str, str]]:
    """Chat-mode prompt: each few-shot example as earlier turns, then this round; the last
    assistant message (``Critique:`` / ``Revision:``) is continued by the backend."""
    msgs: list[dict[str, str]] = []
    for shot in shots:
        s, revision = _shot_step(shot)
        msgs += _chat_round(s)
        msgs[-1] = {"role": "assistant", "content": f"Revision: {revision}"}
    return msgs + _chat_round(step)


def _chat_round(step: Step) -> list[dict[str, str]]:
    ask = f"{transcript(step.dialogue).strip()}\n\nCritiqueRequest: {step.critique_request}"
    msgs = [{"role": "user", "content": ask}, {"role": "assistant", "content": "Critique:"}]
    if step.critique is not None:
        msgs[-1] = {"role": "assistant", "content": f"Critique: {step.critique}"}
        msgs += [
            {"role": "user", "content": f"RevisionRequest: {step.revision_request}"},
            {"role": "assistant", "content": "Revision:"},
        ]
    return msgs


# ---------------------------------------------------------------------------- output checks


def clean(text: str) -> str:
    """Trim whitespace and a label the model repeated (``Revision: ...``)."""
    return _LABEL.sub("", text.strip(), count=1).strip()


def degenerate(text: str, request: str = "", examples: Sequence[str] = ()) -> str | None:
    """Why an output is unusable, or None when it is fine: 'empty', 'no-text' (no letters),
    'repetitive' (mostly repeated word 3-grams, or highly compressible), 'echo' (repeats the
    request) or 'copy' (copies a few-shot example's text instead of answering this prompt)."""
    body = text.strip()
    if not body:
        return "empty"
    if not any(ch.isalpha() for ch in body) or (len(body) >= 8 and len(set(body)) <= 3):
        return "no-text"
    words = body.lower().split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    if len(grams) >= 12 and len(set(grams)) / len(grams) < 0.5:
        return "repetitive"
    raw = body.encode("utf-8")
    if len(raw) >= 200 and len(zlib.compress(raw)) / len(raw) < 0.12:
        return "repetitive"
    norm = " ".join(words)
    if request and len(norm) > 20 and norm in " ".join(request.lower().split()):
        return "echo"
    if norm.startswith(("critiquerequest:", "revisionrequest:")):
        return "echo"
    if len(norm) > 40 and any(norm[:80] in " ".join(e.lower().split()) for e in examples):
        return "copy"
    return None


# ---------------------------------------------------------------------------- the loop


@dataclass
class Settings:
    """What shapes each record; a resumed run must use the same."""

    rounds: int
    few_shot: int
    max_new_tokens: int
    temperature: float
    top_p: float
    fmt: str
    seed: int


def revise_chunk(
    lm: LM,
    items: Sequence[PromptItem],
    constitution: Constitution,
    st: Settings,
    *,
    chunk_seed: int,
    on_step: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the whole critique -> revision loop for ``items``, every step batched; return records."""
    shots = constitution.few_shot[: st.few_shot]
    chat = st.fmt == "chat"
    shot_texts = [t for s in shots for t in (s.critique, s.revision)]

    def params(stop: tuple[str, ...], step: int) -> GenerationParams:
        seed = chunk_seed * 1009 + step
        return GenerationParams(st.max_new_tokens, st.temperature, st.top_p, stop, seed)

    def ask(convs: list[Conversation], stop: tuple[str, ...], step: int, label: str) -> list[Any]:
        out = lm.generate(convs, params(stop, step))
        if on_step is not None:
            on_step(label)
        return out

    first: list[Conversation] = [
        list(it.messages) if chat else transcript(it.messages) + "\n\nAssistant:" for it in items
    ]
    gens = ask(first, ANSWER_STOPS, 0, "answer")
    answers = [clean(g.text) for g in gens]
    records: list[dict[str, Any]] = [
        {
            "id": it.id,
            "prompt": it.messages,
            "source": it.source,
            "initial": a,
            "initial_status": degenerate(a) or "ok",
            "initial_finish": g.finish_reason,
            "rounds": [],
        }
        for it, a, g in zip(items, answers, gens, strict=True)
    ]
    current = list(answers)
    for r in range(st.rounds):
        drawn: list[Principle] = [constitution.draw(st.seed, it.id, r) for it in items]
        steps = [
            Step([*it.messages, {"role": "assistant", "content": cur}], p.critique)
            for it, cur, p in zip(items, current, drawn, strict=True)
        ]
        convs = [build_chat(shots, s) if chat else build_text(shots, s) for s in steps]
        crit = ask(convs, CRITIQUE_STOPS, 2 * r + 1, f"round {r + 1} critique")
        critiques = [clean(g.text) for g in crit]
        steps = [
            Step(s.dialogue, s.critique_request, c, p.revision)
            for s, c, p in zip(steps, critiques, drawn, strict=True)
        ]
        convs = [build_chat(shots, s) if chat else build_text(shots, s) for s in steps]
        rev = ask(convs, REVISION_STOPS, 2 * r + 2, f"round {r + 1} revision")
        for i, (p, c, g) in enumerate(zip(drawn, critiques, rev, strict=True)):
            text = clean(g.text)
            status = degenerate(text, p.revision, shot_texts) or "ok"
            if status == "ok":
                current[i] = text  # a bad revision is recorded, and the previous answer kept
            records[i]["rounds"].append(
                {
                    "principle": p.id,
                    "critique": c,
                    "critique_status": degenerate(c, p.critique, shot_texts) or "ok",
                    "revision": text,
                    "status": status,
                    "finish_reason": g.finish_reason,
                }
            )
    for rec, cur in zip(records, current, strict=True):
        rec["final"] = cur
    return records


def answer_chunk(
    lm: LM, items: Sequence[PromptItem], st: Settings, *, chunk_seed: int
) -> list[dict[str, Any]]:
    """Plain answers to helpfulness prompts, batched."""
    chat = st.fmt == "chat"
    convs: list[Conversation] = [
        list(it.messages) if chat else transcript(it.messages) + "\n\nAssistant:" for it in items
    ]
    params = GenerationParams(
        st.max_new_tokens, st.temperature, st.top_p, ANSWER_STOPS, chunk_seed * 1009 + 7
    )
    out = []
    for it, g in zip(items, lm.generate(convs, params), strict=True):
        text = clean(g.text)
        out.append(
            {
                "id": it.id,
                "prompt": it.messages,
                "source": it.source,
                "answer": text,
                "status": degenerate(text) or "ok",
                "finish_reason": g.finish_reason,
            }
        )
    return out


# ---------------------------------------------------------------------------- the stage


def _chunks(items: list[PromptItem], size: int) -> list[tuple[int, list[PromptItem]]]:
    return [(i // size, items[i : i + size]) for i in range(0, len(items), size)]


def _check_resume(path: Path, settings: dict[str, Any], have: int) -> None:
    old = read_manifest(path)
    if not have or old is None or "settings" not in old:
        return
    for key, value in settings.items():
        if old["settings"].get(key) != value:
            raise UserError(
                f"{path}: this run dir holds {have} records made with {key}="
                f"{old['settings'].get(key)!r}, not {value!r}; use another run_dir or remove it"
            )


def _resolve_format(cfg: ReviseConfig, lm: LM) -> str:
    if cfg.format != "auto":
        return cfg.format
    return "chat" if getattr(lm, "has_template", True) else "text"


def run(cfg: RunConfig, lm: LM | None = None) -> Path:
    """Run stage 1 for ``cfg``; return the path of ``revisions.jsonl``."""
    from rlaif.progress import progress

    rc = cfg.revise
    constitution = load_constitution(cfg.constitution).subset(rc.principles)
    prompts = load_prompts(
        rc.prompts,
        column=rc.prompt_column,
        first_turn_only=rc.first_turn_only,
        limit=rc.limit,
        shuffle=rc.shuffle,
        seed=cfg.seed,
    )
    helpful: list[PromptItem] = []
    if rc.helpful_prompts:
        helpful = load_prompts(rc.helpful_prompts, limit=rc.helpful_limit, seed=cfg.seed)
    run_dir = ensure_dir(cfg.run_path)
    store = JsonlStore(run_dir / "revisions.jsonl")
    hstore = JsonlStore(run_dir / "helpful.jsonl")
    mpath = run_dir / "manifests" / "revise.json"
    todo = [p for p in prompts if p.id not in store]
    htodo = [p for p in helpful if p.id not in hstore]
    lm = lm if lm is not None else _make_lm(cfg)
    st = Settings(
        rc.rounds, rc.few_shot, rc.max_new_tokens, rc.temperature, rc.top_p,
        _resolve_format(rc, lm), cfg.seed,
    )  # fmt: skip
    settings = {
        **to_dict(st),
        "model": cfg.model,
        "constitution": constitution.sha256,
        "principles": constitution.ids,
    }
    _check_resume(mpath, settings, len(store) + len(hstore))
    config = {"model": cfg.model, "constitution": cfg.constitution, "seed": cfg.seed}
    config |= {"backend": to_dict(cfg.backend), "revise": to_dict(rc)}
    sources = {"prompts": rc.prompts, "helpful_prompts": rc.helpful_prompts}
    inputs = hash_inputs({k: v for k, v in sources.items() if v})

    def manifest(done: bool, seconds: float) -> None:
        extra = {
            "settings": settings,
            "model": {"ref": cfg.model, "name": lm.name},
            "constitution": {"ref": cfg.constitution, "sha256": constitution.sha256},
            "complete": done,
            "counts": {"revisions": len(store), "helpful": len(hstore)},
            "seconds": round(seconds, 3),
            "tokens": {"prompt": lm.stats.prompt_tokens, "completion": lm.stats.completion_tokens},
        }
        write_manifest(mpath, stage="revise", config=config, inputs=inputs, extra=extra)

    t0 = time.perf_counter()
    manifest(False, 0.0)
    if len(todo) < len(prompts) or len(htodo) < len(helpful):
        log.info(
            "revise: resuming: %d/%d prompts and %d/%d helpful prompts already done",
            len(prompts) - len(todo), len(prompts), len(helpful) - len(htodo), len(helpful),
        )  # fmt: skip
    base_tokens = lm.stats.completion_tokens
    bar = progress(total=len(prompts) + len(helpful), desc="revise", unit="prompt")
    bar.update(len(prompts) - len(todo) + len(helpful) - len(htodo))

    def on_step(label: str) -> None:
        secs = max(time.perf_counter() - t0, 1e-9)
        tok_s = (lm.stats.completion_tokens - base_tokens) / secs
        bar.set_postfix(step=label, tok_s=f"{tok_s:.1f}")

    tag = {"model": cfg.model, "seed": cfg.seed, "constitution": constitution.sha256}
    # Chunk over the full, stable prompt order so a chunk's sampling seed does not depend on resume.
    for index, chunk in _chunks(prompts, rc.chunk_size):
        pending = [p for p in chunk if p.id not in store]
        if not pending:
            continue
        recs = revise_chunk(
            lm, pending, constitution, st, chunk_seed=_seed(cfg.seed, index), on_step=on_step
        )
        store.append({**r, **tag} for r in recs)
        bar.update(len(pending))
    for index, chunk in _chunks(helpful, rc.chunk_size):
        pending = [p for p in chunk if p.id not in hstore]
        if not pending:
            continue
        recs = answer_chunk(lm, pending, st, chunk_seed=_seed(cfg.seed + 1, index))
        hstore.append({**r, "model": cfg.model, "seed": cfg.seed} for r in recs)
        bar.update(len(pending))
        on_step("helpful answers")
    bar.close()
    manifest(True, time.perf_counter() - t0)
    log.info(
        "revise: %d revision records, %d helpful samples in %s", len(store), len(hstore), run_dir
    )
    return store.path


def _seed(seed: int, index: int) -> int:
    return int(record_id("chunk", seed, index), 16) % (2**31)


def _make_lm(cfg: RunConfig) -> LM:
    from rlaif.backends import make_lm

    return make_lm(cfg.model, cfg.backend)
