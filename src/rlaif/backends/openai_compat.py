"""The ``openai`` backend: any OpenAI-compatible server (vLLM, TGI, llama.cpp server, ...).

``generate``: chat messages go to ``/v1/chat/completions``, plain strings to ``/v1/completions``.
A conversation that ends with an assistant message is *continued*: the server renders it with its
own chat template through vLLM's ``/tokenize`` (``continue_final_message``) and the token ids go to
``/v1/completions``. A server without ``/tokenize`` gets ``/v1/chat/completions`` with vLLM's
``continue_final_message`` flag; one that refuses the flag cannot continue a message (UserError).

``choice_logprobs``: the first of these the server supports, found on the first call and kept —
``echo`` + ``logprobs`` on ``/v1/completions`` (vLLM, llama.cpp, all choices of a prompt in one
request), TGI's ``/generate`` prefill log-probs, the next token's ``top_logprobs`` (single-token
choices only). A server with none of them (``transformers serve``) is a UserError.

Transport (endpoints round-robin, retries, the key, concurrency) is in
:mod:`rlaif.backends.openai_http`; reading log-probs out of answers in
:mod:`rlaif.backends.openai_logprobs`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from rlaif.backends.base import BackendStats, Conversation, Generation, GenerationParams, Message
from rlaif.backends.openai_http import (
    BadAnswer,
    Endpoints,
    ServerError,
    backoff_seconds,
    retry_after_seconds,
    safe_url,
)
from rlaif.backends.openai_logprobs import (
    NO_LOGPROBS,
    common_prefix,
    echo_ids_score,
    echo_text_score,
    missing_choice_bound,
    next_token_top,
    offset_logprob_sum,
    prefill_score,
    top_score,
)
from rlaif.config import BackendConfig
from rlaif.errors import UserError

__all__ = [
    "OpenAICompatLM",
    "ServerError",
    "backoff_seconds",
    "cut_at_stop",
    "missing_choice_bound",
    "offset_logprob_sum",
    "prefill_score",
    "retry_after_seconds",
    "safe_url",
]

log = logging.getLogger(__name__)
MODES = ("echo", "prefill", "top")
# statuses meaning "this server does not do that" while an optional endpoint or field is probed
NO_SUCH_ENDPOINT = (400, 404, 405, 422, 500, 501)
REFUSED = {"echo": (400, 422), "prefill": NO_SUCH_ENDPOINT, "top": (400, 422)}


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first stop string (servers already do this; some keep the stop)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


def _check_conversation(conv: Conversation) -> None:
    if isinstance(conv, str):
        return
    if not conv:
        raise UserError("openai backend: got an empty conversation (no messages)")
    for m in conv:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"openai backend: a message needs 'role' and 'content', got {m!r:.80}")


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UserError("openai backend: the server's answer has no 'choices'")
    return choices[0]


class OpenAICompatLM:
    """An OpenAI-compatible server behind the :class:`~rlaif.backends.base.LM` protocol.

    ``model`` is the name the server knows the model by (``GET /v1/models`` lists them).
    """

    def __init__(
        self,
        model: str,
        cfg: BackendConfig,
        *,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        top_logprobs: int = 20,
    ) -> None:
        self.model = model
        self.name = f"openai:{model}"
        self.cfg = cfg
        self.stats = BackendStats(extra={"retries": 0.0, "logprob_bounds": 0.0})
        self.http = Endpoints(
            cfg, model, self.stats, backoff_s=backoff_s, max_backoff_s=max_backoff_s
        )
        self.top_logprobs = top_logprobs
        self._lock = self.http.lock
        self._post = self.http.post
        self._probe_lock = threading.Lock()
        self._has_tokenize: bool | None = None  # vLLM's /tokenize (chat template on the server)
        self._list_ok: bool | None = None  # several prompts in one /v1/completions request
        self.mode: str | None = None  # how choice_logprobs reads log-probs (one of MODES)

    def __repr__(self) -> str:
        urls = ", ".join(safe_url(u) for u in self.http.urls)
        return f"OpenAICompatLM(model={self.model!r}, base_url=[{urls}])"

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> OpenAICompatLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- chat templates (server side) -------------------------------------------------------------

    def _tokenize(self, body: dict[str, Any]) -> list[int] | None:
        """Token ids from the server's ``/tokenize`` (vLLM), or None when it has none."""
        if self._has_tokenize is False:
            return None
        try:
            probe = self._has_tokenize is None
            data = self._post(
                "/tokenize", {"model": self.model, **body}, root=True, retry_500=not probe
            )
            tokens = data.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise BadAnswer("/tokenize answered without a 'tokens' list of ids")
            if not tokens and (body.get("prompt") or body.get("messages")):
                raise BadAnswer("/tokenize answered no tokens (another server's schema?)")
        except (ServerError, BadAnswer) as exc:
            refused = not isinstance(exc, ServerError) or exc.status in NO_SUCH_ENDPOINT
            if self._has_tokenize or not refused:
                raise
            with self._lock:
                if self._has_tokenize is None:
                    log.warning("openai backend: no usable vLLM /tokenize endpoint (%s)", exc)
                self._has_tokenize = False
            return None
        self._has_tokenize = True
        return tokens

    def _render(self, conv: list[Message]) -> list[int] | None:
        """The chat rendered by the server's template; a final assistant message is continued."""
        cont = conv[-1]["role"] == "assistant"
        body = {"messages": conv, "add_generation_prompt": not cont, "add_special_tokens": False}
        return self._tokenize({**body, "continue_final_message": cont})

    def _prompt_ids(self, prompt: Conversation, choice: str | None) -> list[int] | None:
        """Token ids of ``prompt`` (+ ``choice`` as the start of the answer) via /tokenize."""
        if isinstance(prompt, str):
            return self._tokenize({"prompt": prompt + (choice or ""), "add_special_tokens": True})
        conv = [dict(m) for m in prompt]
        if choice is not None:
            if conv[-1]["role"] == "assistant":
                conv[-1]["content"] += choice
            else:
                conv.append({"role": "assistant", "content": choice})
        return self._render(conv)

    # -- generate -------------------------------------------------------------------------------

    def generate(
        self, conversations: Sequence[Conversation], params: GenerationParams
    ) -> list[Generation]:
        convs = list(conversations)
        for c in convs:
            _check_conversation(c)
        start = time.perf_counter()
        out = self.http.map(lambda c: self._generate_one(c, params), convs, desc="generate")
        with self._lock:
            self.stats.seconds += time.perf_counter() - start
        return out

    def _generate_one(self, conv: Conversation, params: GenerationParams) -> Generation:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        chat = False
        if isinstance(conv, str):
            data = self._post("/completions", {**body, "prompt": conv})
        elif conv[-1]["role"] == "assistant" and (ids := self._render(conv)) is not None:
            data = self._post("/completions", {**body, "prompt": ids})
        elif conv[-1]["role"] == "assistant":
            chat = True
            flags = {"continue_final_message": True, "add_generation_prompt": False}
            try:
                data = self._post("/chat/completions", {**body, **flags, "messages": conv})
            except ServerError as exc:
                if exc.status not in (400, 422):
                    raise
                raise UserError(
                    f"{exc}; this server cannot continue a final assistant message: it has no "
                    "vLLM /tokenize endpoint to render its chat template and refuses vLLM's "
                    "continue_final_message flag (use vLLM, or plain-string prompts)"
                ) from None
        else:
            chat = True
            data = self._post("/chat/completions", {**body, "messages": conv})
        choice = _first_choice(data)
        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        usage = data.get("usage") or {}
        gen = Generation(
            text=cut_at_stop(str(text or ""), params.stop),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
        )
        with self._lock:
            self.stats.prompt_tokens += gen.prompt_tokens
            self.stats.completion_tokens += gen.completion_tokens
        return gen

    # -- choice log-probs -----------------------------------------------------------------------

    def choice_logprobs(
        self, prompts: Sequence[Conversation], choices: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        if len(prompts) != len(choices):
            raise ValueError(f"{len(prompts)} prompts but {len(choices)} choice lists")
        items = [(p, list(c)) for p, c in zip(prompts, choices, strict=True)]
        for p, _ in items:
            _check_conversation(p)
        start = time.perf_counter()
        out = self.http.map(self._score_one, items, desc="choice log-probs")
        with self._lock:
            self.stats.seconds += time.perf_counter() - start
        return out

    def _score_one(self, item: tuple[Conversation, list[str]]) -> list[float]:
        prompt, cands = item
        if not cands:
            return []
        if self.mode is None:
            with self._probe_lock:  # the first prompt finds the way; the others wait for it
                if self.mode is None:
                    return self._probe(prompt, cands)
        scores = self._score_with(self.mode, prompt, cands)
        if scores is None:
            raise UserError(NO_LOGPROBS.format(where=f"{self.mode} answer"))
        return scores

    def _probe(self, prompt: Conversation, cands: list[str]) -> list[float]:
        for mode in MODES:
            try:
                scores = self._score_with(mode, prompt, cands)
            except ServerError as exc:
                if exc.status not in REFUSED[mode]:
                    raise
                log.info("openai backend: log-probs by %s refused (%s)", mode, exc)
                continue
            if scores is not None:
                log.info("openai backend: choice log-probs by %s", mode)
                self.mode = mode
                return scores
        where = "asked by echo, TGI prefill and top_logprobs"
        raise UserError(f"{safe_url(self.http.urls[0])}: " + NO_LOGPROBS.format(where=where))

    def _score_with(self, mode: str, prompt: Conversation, cands: list[str]) -> list[float] | None:
        if mode == "echo":
            return self._score_echo(prompt, cands)
        if mode == "prefill":
            return self._score_prefill(prompt, cands)
        return self._score_top(prompt, cands)

    def _chat_unsupported(self) -> UserError:
        return UserError(
            f"{safe_url(self.http.urls[0])}: the server has no vLLM /tokenize endpoint to render "
            "chat prompts with its template, so choice_logprobs cannot score chat messages "
            "there; use vLLM, or plain-string prompts (label.chat=false)"
        )

    def _complete(self, prompts: list[Any], body: dict[str, Any]) -> list[dict[str, Any]]:
        """One /v1/completions choice per prompt: all in one request where the server allows."""
        body = {"model": self.model, **body}
        if self._list_ok is not False and len(prompts) > 1:
            try:
                data = self._post("/completions", {**body, "prompt": prompts})
            except ServerError as exc:
                if self._list_ok or exc.status not in (400, 422):
                    raise
                self._list_ok = False  # e.g. `transformers serve`: "prompt must be a string"
            else:
                self._list_ok = True
                self._count_prompt_tokens(data)
                rows = data.get("choices")
                got = len(rows) if isinstance(rows, list) else 0
                if not isinstance(rows, list) or got != len(prompts):
                    raise UserError(f"sent {len(prompts)} prompts in one request, got {got} back")
                return sorted(rows, key=lambda c: int(c.get("index", 0)))
        out = []
        for p in prompts:
            data = self._post("/completions", {**body, "prompt": p})
            self._count_prompt_tokens(data)
            out.append(_first_choice(data))
        return out

    def _score_echo(self, prompt: Conversation, cands: list[str]) -> list[float] | None:
        """Echo prompt + choice with log-probs and sum those of the tokens past the prompt."""
        base = self._prompt_ids(prompt, None)
        if base is None and not isinstance(prompt, str):
            raise self._chat_unsupported()
        sent: list[Any]
        if base is not None:
            sent = [self._prompt_ids(prompt, c) or [] for c in cands]
        else:
            sent = [str(prompt) + c for c in cands]
        body = {"max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
        scores = []
        for cand, s, row in zip(cands, sent, self._complete(sent, body), strict=True):
            if base is not None:
                value = echo_ids_score(row, base, s)
            else:
                value = echo_text_score(row, str(prompt), cand)
            if value is None:
                return None
            scores.append(value)
        return scores

    def _score_prefill(self, prompt: Conversation, cands: list[str]) -> list[float] | None:
        """TGI: ``/generate`` with ``decoder_input_details`` gives the input's log-probs."""
        if not isinstance(prompt, str):  # TGI has no vLLM /tokenize to apply the template
            if self.mode == "prefill":
                raise self._chat_unsupported()
            return None
        scores = []
        for cand in cands:
            params = {"max_new_tokens": 1, "details": True, "decoder_input_details": True}
            body = {"inputs": prompt + cand, "parameters": params}
            data = self._post("/generate", body, root=True, retry_500=self.mode is not None)
            details = data.get("details") or {}
            value = prefill_score(details, prompt, cand)
            if value is None:
                return None
            with self._lock:
                self.stats.prompt_tokens += len(details.get("prefill") or [])
            scores.append(value)
        return scores

    def _score_top(self, prompt: Conversation, cands: list[str]) -> list[float] | None:
        """The next token's top_logprobs; every choice must be a single token."""
        ids = self._prompt_ids(prompt, None)
        if ids is None and not isinstance(prompt, str):
            raise self._chat_unsupported()
        body = {"max_tokens": 1, "temperature": 0.0, "logprobs": self.top_logprobs}
        (row,) = self._complete([ids if ids is not None else prompt], body)
        top = next_token_top(row.get("logprobs"))
        if top is None:
            return None
        scores = []
        for cand in cands:
            value, bounded = top_score(top, cand)
            if bounded:
                # Only a choice known to be one token may be bounded: a longer one is never
                # listed, and its bound would be wrong.
                with_cand = self._prompt_ids(prompt, cand) if ids is not None else None
                if with_cand is None or len(with_cand) - common_prefix(ids or [], with_cand) > 1:
                    raise UserError(
                        f"choice {cand!r} is not among the server's top-{self.top_logprobs} "
                        "next tokens, and the server gives neither echo nor prefill log-probs: "
                        "only single-token choices can be scored from top_logprobs"
                        + ("" if with_cand is None else " (it is several tokens long)")
                    )
                with self._lock:
                    self.stats.extra["logprob_bounds"] += 1
            scores.append(value)
        return scores

    def _count_prompt_tokens(self, data: dict[str, Any]) -> None:
        usage = data.get("usage") or {}
        with self._lock:
            self.stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
