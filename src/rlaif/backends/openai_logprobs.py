"""Reading choice log-probabilities out of server answers (pure functions, no HTTP).

Three kinds of answer carry them:

- ``/v1/completions`` with ``echo`` + ``logprobs`` (vLLM, llama.cpp's server, OpenAI's legacy API):
  the prompt's own tokens come back with ``token_logprobs``; the choice's tokens are those past
  the prompt, found by token ids (:func:`echo_ids_score`) or by ``text_offset``
  (:func:`echo_text_score`);
- TGI's ``/generate`` with ``decoder_input_details``: the ``prefill`` tokens with their log-probs
  (:func:`prefill_score`);
- the next token's ``top_logprobs`` (:func:`top_score`): single-token choices only.

Each returns None when the answer holds no usable log-probs, so the caller can try the next kind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

NO_LOGPROBS = (
    "the server returned no log-probabilities ({where}); choice_logprobs (used by label and "
    "evaluate) needs a server that has them, such as vLLM, TGI or llama.cpp's server "
    "(`transformers serve` has none)"
)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token-id lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _number(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


def offset_logprob_sum(
    tokens: Sequence[str],
    offsets: Sequence[int],
    logprobs: Sequence[float | None],
    lo: int,
    hi: int,
) -> float | None:
    """Sum of the log-probs of the tokens whose text overlaps characters ``[lo, hi)``.

    A token that straddles ``lo`` (part prompt, part choice) counts with the choice. None when one
    of those tokens has no log-prob (it is the very first token: an empty prompt), or when no
    token covers a non-empty choice (a server that ignores ``echo`` but still answers with the
    generated token's log-prob: summing nothing would silently score every choice 0).
    """
    total, seen = 0.0, False
    for tok, start, lp in zip(tokens, offsets, logprobs, strict=False):
        if start < hi and start + max(len(tok), 1) > lo:
            value = _number(lp)
            if value is None:
                return None
            total, seen = total + value, True
    return total if seen or hi <= lo else None


def echo_ids_score(
    row: dict[str, Any], prompt_ids: Sequence[int], sent: Sequence[int]
) -> float | None:
    """log P(choice) from an echoed completion of the token ids ``sent`` (= prompt + choice)."""
    lp = row.get("logprobs") or {}
    values = lp.get("token_logprobs")
    if not values or len(values) < len(sent):
        return None  # no log-probs, or the prompt was not echoed
    start = max(common_prefix(prompt_ids, sent), 1)
    picked = [_number(v) for v in values[start : len(sent)]]
    return None if any(v is None for v in picked) else sum(v for v in picked if v is not None)


def echo_text_score(row: dict[str, Any], prompt: str, choice: str) -> float | None:
    """log P(choice) from an echoed completion of the text ``prompt + choice``, by text offsets."""
    lp = row.get("logprobs") or {}
    values, tokens, offsets = lp.get("token_logprobs"), lp.get("tokens"), lp.get("text_offset")
    if not values or tokens is None or offsets is None:
        return None
    if not str(row.get("text", "")).startswith(prompt + choice):
        return None  # echo was ignored
    return offset_logprob_sum(tokens, offsets, values, len(prompt), len(prompt) + len(choice))


def prefill_score(details: dict[str, Any], prompt: str, choice: str) -> float | None:
    """log P(choice) from TGI's ``details.prefill`` for the input ``prompt + choice``.

    Offsets are counted back from the end, so a leading special token (a BOS TGI adds and
    echoes as text) does not shift the choice.
    """
    prefill = details.get("prefill")
    if not prefill:
        return None
    texts = [str(t.get("text", "")) for t in prefill]
    starts, pos = [], 0
    for t in texts:
        starts.append(pos)
        pos += len(t)
    shift = pos - len(prompt) - len(choice)
    offsets = [s - shift for s in starts]
    values = [t.get("logprob") for t in prefill]
    return offset_logprob_sum(texts, offsets, values, len(prompt), len(prompt) + len(choice))


def next_token_top(logprobs: dict[str, Any] | None) -> dict[str, float] | None:
    """The first position's top-k ``{token: logprob}``, legacy or chat-style ``logprobs``."""
    if not logprobs:
        return None
    tops = logprobs.get("top_logprobs")
    if isinstance(tops, list) and tops and isinstance(tops[0], dict) and tops[0]:
        return {str(k): float(v) for k, v in tops[0].items()}
    content = logprobs.get("content")  # {"content": [{"token", "logprob", "top_logprobs": [...]}]}
    if isinstance(content, list) and content and content[0].get("top_logprobs"):
        return {str(t["token"]): float(t["logprob"]) for t in content[0]["top_logprobs"]}
    return None


def missing_choice_bound(top: dict[str, float]) -> float:
    """Upper bound on log P of a token absent from a top-k list: below every listed one, and
    below the mass they leave."""
    left = 1.0 - sum(math.exp(v) for v in top.values())
    return min(min(top.values()), math.log(left) if left > 0 else -math.inf)


def top_score(top: dict[str, float], choice: str) -> tuple[float, bool]:
    """(log P(choice), whether it is only an upper bound) from the next token's top-k list."""
    if choice in top:
        return top[choice], False
    return missing_choice_bound(top), True
