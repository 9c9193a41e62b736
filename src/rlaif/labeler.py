"""The AI labeller: asks a feedback model to compare (or score) answers, batched.

Used by ``rlaif label`` and ``rlaif eval-labeler``. Every comparison of a batch of pairs — all
pairs x principles x orders — goes to the backend in one ``choice_logprobs`` call (the backend
batches it and shares the common prompt prefix); the arithmetic lives in :mod:`rlaif.feedback`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif import feedback as fb
from rlaif.backends.base import LM, Conversation, GenerationParams, Message
from rlaif.config import LabelConfig
from rlaif.errors import UserError


@dataclass(frozen=True)
class Comparison:
    """Two answers to one prompt and the principles (id, question) to judge them by."""

    prompt: list[Message]
    first: str
    second: str
    principles: tuple[tuple[str, str], ...]


def seeded_order(seed: int, key: str) -> int:
    """0 or 1, reproducible from (seed, key): the order a single-order label uses."""
    digest = hashlib.sha256(f"order:{seed}:{key}".encode()).digest()
    return digest[0] & 1


def draw_principles(
    principles: Sequence[tuple[str, str]], k: int, seed: int, key: str
) -> tuple[tuple[str, str], ...]:
    """``k`` distinct principles drawn at random (reproducible from seed and key); 0 or >= all: all."""
    if k <= 0 or k >= len(principles):
        return tuple(principles)
    ranked = sorted(
        range(len(principles)),
        key=lambda i: hashlib.sha256(f"principle:{seed}:{key}:{i}".encode()).digest(),
    )
    return tuple(principles[i] for i in sorted(ranked[:k]))


def _read_json_list(path: str, what: str) -> list[Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{p}: no such file ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{p}: cannot read {what} ({exc.__class__.__name__})") from None
    if not isinstance(data, list):
        raise UserError(f"{p}: expected a JSON list ({what})")
    return data


def load_few_shot(path: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` comparison examples ``{prompt, corrects, incorrects}`` of ``path``."""
    if n <= 0:
        return []
    items = _read_json_list(path, "label.few_shot_file")
    for i, item in enumerate(items[:n]):
        ok = (
            isinstance(item, dict)
            and isinstance(item.get("prompt"), str)
            and all(isinstance(item.get(k), list) and item[k] for k in ("corrects", "incorrects"))
        )
        if not ok:
            raise UserError(
                f"{path}: item [{i}] must be {{prompt: str, corrects: [..], incorrects: [..]}}"
            )
    return items[:n]


def load_cot_few_shot(path: str, n: int) -> list[str]:
    """The first ``n`` chain-of-thought example texts of ``path`` (items ``{prompt: str}``)."""
    if n <= 0:
        return []
    items = _read_json_list(path, "label.cot_few_shot_file")
    out: list[str] = []
    for i, item in enumerate(items[:n]):
        text = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(text, str) or "So the answer is:" not in text:
            raise UserError(f"{path}: item [{i}] is not a chain-of-thought example")
        out.append(text)
    return out


class Labeler:
    """Soft labels from a feedback model, configured by a :class:`LabelConfig`."""

    def __init__(
        self,
        lm: LM,
        cfg: LabelConfig,
        *,
        few_shot: Sequence[dict[str, Any]] = (),
        cot_few_shot: Sequence[str] = (),
        seed: int = 0,
        per_pair_calls: bool = False,
    ) -> None:
        self.lm = lm
        self.per_pair_calls = per_pair_calls
        """One backend call per pair (its orders and principles share the conversation's KV prefix
        in the ``hf`` backend) instead of one call for all pairs (best for served endpoints)."""
        self.cfg = cfg
        self.few_shot = list(few_shot)
        self.cot_few_shot = list(cot_few_shot)
        self.seed = seed
        bounds = [float(x) for x in cfg.cot_clamp]
        if len(bounds) != 2 or not 0.0 <= bounds[0] <= bounds[1] <= 1.0:
            raise UserError(f"label.cot_clamp: expected [low, high] in [0, 1], got {cfg.cot_clamp}")
        self.clamp_bounds = (bounds[0], bounds[1])

    @classmethod
    def from_config(
        cls, lm: LM, cfg: LabelConfig, seed: int, per_pair_calls: bool = False
    ) -> Labeler:
        return cls(
            lm,
            cfg,
            per_pair_calls=per_pair_calls,
            few_shot=load_few_shot(cfg.few_shot_file, cfg.few_shot),
            cot_few_shot=load_cot_few_shot(
                cfg.cot_few_shot_file, cfg.cot_few_shot if cfg.cot else 0
            ),
            seed=seed,
        )

    # ---- prompts ---------------------------------------------------------------------------

    def mc_prompt(self, comp: Comparison, principle: str, order: int, *, cot: bool) -> Conversation:
        a, b = (comp.first, comp.second) if order == 0 else (comp.second, comp.first)
        delimit = self.cfg.delimit
        question = fb.mc_question(comp.prompt, principle, a, b, delimit=delimit)
        if cot:
            shots = fb.cot_few_shot_pairs(self.cot_few_shot, principle)
            return fb.as_prompt(question, fb.COT_CUE, chat=self.cfg.chat, shots=shots)
        shots = fb.few_shot_pairs(self.few_shot, principle, delimit=delimit)
        return fb.as_prompt(question, fb.ANSWER_CUE, chat=self.cfg.chat, shots=shots)

    # ---- comparisons -----------------------------------------------------------------------

    def compare(
        self, comps: Sequence[Comparison], orders: Sequence[Sequence[int]], *, cot: bool = False
    ) -> list[dict[str, Any]]:
        """Label each comparison in the orders given for it (``orders[i]``, e.g. ``(0, 1)``).

        Returns per comparison ``{"p": P(first better), "principles": [{"id", "p_a": {order:
        P(A)}, "p"}, ...]}`` (+ ``"cot": {order: reasoning}`` per principle with ``cot``).
        """
        jobs: list[tuple[int, int, int]] = []  # (comparison, principle, order)
        prompts: list[Conversation] = []
        for ci, comp in enumerate(comps):
            for pi, (_, text) in enumerate(comp.principles):
                for order in orders[ci]:
                    jobs.append((ci, pi, order))
                    prompts.append(self.mc_prompt(comp, text, order, cot=cot))
        reasons: list[str] = [""] * len(prompts)
        if cot and prompts:
            params = GenerationParams(
                max_new_tokens=self.cfg.cot_max_new_tokens, temperature=0.0, stop=fb.COT_STOPS
            )
            reasons = [fb.trim_cot(g.text) for g in self.lm.generate(prompts, params)]
            prompts = [fb.cot_continuation(p, r) for p, r in zip(prompts, reasons, strict=True)]
        lps = self._logprobs(prompts, [(ci, pi) for ci, pi, _ in jobs])
        out: list[dict[str, Any]] = [
            {"principles": [{"id": pid, "p_a": {}} for pid, _ in c.principles]} for c in comps
        ]
        for (ci, pi, order), lp, reason in zip(jobs, lps, reasons, strict=True):
            p_a = fb.normalise(lp[0], lp[1])
            if cot:
                p_a = fb.clamp(p_a, *self.clamp_bounds)
                out[ci]["principles"][pi].setdefault("cot", {})[str(order)] = reason
            out[ci]["principles"][pi]["p_a"][str(order)] = p_a
        for rec in out:
            for pr in rec["principles"]:
                firsts = [fb.first_better(p, int(o)) for o, p in pr["p_a"].items()]
                pr["p"] = sum(firsts) / len(firsts)
            rec["p"] = fb.ensemble([pr["p"] for pr in rec["principles"]])
        return out

    def _logprobs(
        self, prompts: list[Conversation], groups: list[tuple[int, int]]
    ) -> list[list[float]]:
        """Option log-probs of every prompt; one backend call per group with ``per_pair_calls``.

        A group is one (pair, principle): its orders share everything up to the options, and the
        ``hf`` backend's cross-call prefix store finds what it shares with earlier groups (the
        conversation, under another principle; the principle's few-shot items, for another pair).
        """
        if not prompts:
            return []
        if not self.per_pair_calls or len(set(groups)) * 2 > len(prompts):
            # Fewer than two questions per group share nothing worth a call of its own.
            return self.lm.choice_logprobs(prompts, [fb.CHOICES] * len(prompts))
        out: list[list[float]] = []
        start = 0
        while start < len(prompts):
            end = start
            while end < len(prompts) and groups[end] == groups[start]:
                end += 1
            out += self.lm.choice_logprobs(prompts[start:end], [fb.CHOICES] * (end - start))
            start = end
        return out

    # ---- pointwise -------------------------------------------------------------------------

    def pointwise_scores(self, items: Sequence[tuple[list[Message], str]]) -> list[float]:
        """P("No") to the pointwise question for each (prompt, answer); duplicates asked once."""
        index: dict[str, int] = {}
        prompts: list[Conversation] = []
        keys: list[str] = []
        for prompt, answer in items:
            key = json.dumps([prompt, answer], sort_keys=True)
            keys.append(key)
            if key not in index:
                index[key] = len(prompts)
                q = fb.pointwise_question(
                    prompt, answer, self.cfg.pointwise_question, delimit=self.cfg.delimit
                )
                prompts.append(fb.as_prompt(q, fb.ANSWER_CUE, chat=self.cfg.chat))
        lps = self.lm.choice_logprobs(prompts, [fb.YES_NO] * len(prompts)) if prompts else []
        scores = [fb.pointwise_score(lp[0], lp[1]) for lp in lps]
        return [scores[index[k]] for k in keys]

    def pointwise(self, comps: Sequence[Comparison]) -> list[dict[str, Any]]:
        """``{"p", "score_first", "score_second"}`` per comparison, from the two pointwise scores."""
        flat: list[tuple[list[Message], str]] = []
        for c in comps:
            flat += [(c.prompt, c.first), (c.prompt, c.second)]
        s = self.pointwise_scores(flat)
        return [
            {
                "p": fb.pointwise_label(s[2 * i], s[2 * i + 1]),
                "score_first": s[2 * i],
                "score_second": s[2 * i + 1],
            }
            for i in range(len(comps))
        ]

    def n_queries(self, comps: Sequence[Comparison], orders: Sequence[Sequence[int]]) -> int:
        """How many option questions :meth:`compare` asks for these comparisons."""
        return sum(len(c.principles) * len(o) for c, o in zip(comps, orders, strict=True))
