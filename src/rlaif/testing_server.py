"""A small OpenAI-protocol server for tests, backed by a local transformers model.

It speaks the subset of the protocol that vLLM's server speaks and the ``openai`` backend uses:
``GET /v1/models``, ``POST /v1/completions`` (string, token-id or list prompts; ``echo``;
``logprobs`` with ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``; ``stop``,
``seed``, ``temperature``, ``top_p``, ``max_tokens``), ``POST /v1/chat/completions`` (with vLLM's
``add_generation_prompt`` and ``continue_final_message``) and vLLM's ``POST /tokenize`` and
``POST /detokenize``. Log-probs are the model's real ones (before temperature, as vLLM's default).

Switches in :class:`ServerOptions` make it behave like other servers (no log-probs as with
``transformers serve``, ``echo`` refused, no ``/tokenize``) or fail on purpose (429/5xx with
``Retry-After``, a delay per request to watch concurrency). Loopback only; one thread per request.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rlaif.modelio import load_causal_lm


@dataclass
class ServerOptions:
    """How the test server behaves."""

    api_key: str | None = None
    """When set, requests need ``Authorization: Bearer <key>``; a wrong key gets a 401 that quotes
    the key it got (the worst case, to check that clients mask it)."""
    logprobs: bool = True
    """False: answers carry ``logprobs: null`` whatever was asked (like ``transformers serve``)."""
    echo: bool = True
    """False: ``echo: true`` is refused with a 400."""
    echo_logprobs: bool = True
    """False: ``echo`` returns the prompt's text but log-probs of the generated tokens only (what
    llama.cpp's server does)."""
    tokenize: bool = True
    """False: no ``/tokenize`` or ``/detokenize`` (404), like servers without vLLM's extras."""
    fail: list[tuple[int, float | None]] = field(default_factory=list)
    """Answer the next requests with these (status, Retry-After seconds or None), in order."""
    delay_s: float = 0.0
    """Seconds each request waits before it is served (outside the model lock)."""
    max_logprobs: int = 20
    """Most top log-probs per position (vLLM's default limit)."""
    vllm_extras: bool = True
    """False: refuse what plain servers refuse (like `transformers serve`): chat requests with
    ``continue_final_message``/``add_generation_prompt`` (422), list prompts (400)."""
    tgi: bool = False
    """Also answer TGI's ``POST /generate`` (``details`` with ``prefill`` log-probs)."""


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class OpenAITestServer:
    """``with OpenAITestServer(model_dir) as srv:``; ``srv.url`` is ``http://127.0.0.1:PORT/v1``."""

    def __init__(
        self, model_dir: Path, name: str = "tiny", options: ServerOptions | None = None
    ) -> None:
        self.model, self.tok = load_causal_lm(Path(model_dir))
        # transformers renamed `past_key_values` to `cache` in 5.x
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.name = name
        self.options = options or ServerOptions()
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> OpenAITestServer:
        handler = type("Handler", (_Handler,), {"app": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self, options: ServerOptions | None = None) -> None:
        """New options; forget recorded requests and the in-flight maximum."""
        with self._lock:
            self.options = options or ServerOptions()
            self.requests.clear()
            self.max_in_flight = 0

    # -- dispatch -------------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str], body: Any) -> Any:
        with self._lock:
            self.requests.append(
                {
                    "method": method,
                    "path": path,
                    "auth": headers.get("authorization"),
                    "body": body,
                    "t": time.monotonic(),
                }
            )
            failure = self.options.fail.pop(0) if self.options.fail else None
        if failure is not None:
            status, after = failure
            extra = {"Retry-After": f"{after:g}"} if after is not None else {}
            raise _HTTPError(status, f"injected failure {status}", extra)
        key = self.options.api_key
        if key is not None and headers.get("authorization") != f"Bearer {key}":
            raise _HTTPError(401, f"invalid API key: got {headers.get('authorization')!r}")
        if self.options.delay_s:
            time.sleep(self.options.delay_s)
        if method == "GET" and path == "/v1/models":
            return {"object": "list", "data": [{"id": self.name, "object": "model"}]}
        routes = {
            "/v1/completions": self._completions,
            "/v1/chat/completions": self._chat,
        }
        if self.options.tokenize:
            routes |= {"/tokenize": self._tokenize, "/detokenize": self._detokenize}
        if self.options.tgi:
            routes["/generate"] = self._tgi_generate
        if method != "POST" or path not in routes:
            raise _HTTPError(404, f"no route {method} {path}")
        if not isinstance(body, dict):
            raise _HTTPError(400, "expected a JSON object")
        if path.startswith("/v1/") and body.get("model") != self.name:
            raise _HTTPError(404, f"The model `{body.get('model')}` does not exist.")
        with self._model_lock:
            return routes[path](body)

    # -- endpoints ------------------------------------------------------------------------------

    def _tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        if "messages" in body:
            text = self.tok.apply_chat_template(
                body["messages"],
                tokenize=False,
                add_generation_prompt=body.get("add_generation_prompt", True),
                continue_final_message=body.get("continue_final_message", False),
            )
            ids = self.tok(text, add_special_tokens=body.get("add_special_tokens", False)).input_ids
        else:
            ids = self.tok(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
            ids = ids.input_ids
        return {"count": len(ids), "max_model_len": 2048, "tokens": list(ids)}

    def _detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": self.tok.decode(body["tokens"])}

    def _tgi_generate(self, body: dict[str, Any]) -> dict[str, Any]:
        """TGI's native endpoint: ``{"inputs", "parameters"}`` -> ``generated_text``, details."""
        params = dict(body.get("parameters") or {})
        ids = list(self.tok(body["inputs"]).input_ids)
        sample = bool(params.get("do_sample"))
        req = {
            "max_tokens": params.get("max_new_tokens", 20),
            "stop": params.get("stop"),
            "temperature": float(params.get("temperature") or 1.0) if sample else 0.0,
            "seed": params.get("seed"),
        }
        gen_ids, text, finish, steps = self._generate(ids, req, 0)
        details: dict[str, Any] = {
            "finish_reason": "length" if finish == "length" else "eos_token",
            "generated_tokens": len(gen_ids),
            "seed": None,
        }
        if params.get("decoder_input_details"):
            vals, _ = self._prompt_logprobs(ids, 0)
            strs, _ = _incremental_strings(self.tok, ids, 0)
            details["prefill"] = [
                {"id": i, "text": t, "logprob": v} for i, t, v in zip(ids, strs, vals, strict=True)
            ]
        g_strs, _ = _incremental_strings(self.tok, gen_ids, 0)
        details["tokens"] = [
            {"id": i, "text": t, "logprob": lp, "special": i == self.tok.eos_token_id}
            for i, t, (lp, _) in zip(gen_ids, g_strs, steps, strict=True)
        ]
        if not self.options.logprobs:
            details.pop("prefill", None)
        return {"generated_text": text, "details": details if params.get("details") else None}

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        extras = {"continue_final_message", "add_generation_prompt"} & set(body)
        if extras and not self.options.vllm_extras:
            raise _HTTPError(422, f"Unexpected fields in the request: {sorted(extras)}")
        cont = bool(body.get("continue_final_message", False))
        text = self.tok.apply_chat_template(
            body["messages"],
            tokenize=False,
            add_generation_prompt=body.get("add_generation_prompt", not cont),
            continue_final_message=cont,
        )
        ids = self.tok(text, add_special_tokens=False).input_ids
        gen_ids, gen_text, finish, _ = self._generate(ids, body, 0)
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": gen_text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": _usage(len(ids), len(gen_ids)),
        }

    def _completions(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) and not self.options.vllm_extras:
            raise _HTTPError(400, "prompt must be a string.")
        if isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and isinstance(prompt[0], int)
        ):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt:
            prompts = list(prompt)
        else:
            raise _HTTPError(400, "'prompt' must be a string, token ids or a non-empty list")
        if int(body.get("n", 1)) != 1:
            raise _HTTPError(400, "only n=1 is supported")
        echo = bool(body.get("echo", False))
        if echo and not self.options.echo:
            raise _HTTPError(400, "echo is not supported")
        k = body.get("logprobs")
        if k is not None and int(k) > self.options.max_logprobs:
            raise _HTTPError(400, f"logprobs must be at most {self.options.max_logprobs}")
        choices, n_prompt, n_gen = [], 0, 0
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                enc = self.tok(p, return_offsets_mapping=True)
                ids, text = list(enc.input_ids), p
                strs = [p[s:e] for s, e in enc.offset_mapping]
                offs = [s for s, _ in enc.offset_mapping]
            else:
                ids, text = [int(t) for t in p], self.tok.decode(p)
                strs, offs = _incremental_strings(self.tok, ids, 0)
            gen_ids, gen_text, finish, steps = self._generate(ids, body, k or 0)
            lp: dict[str, Any] | None = None
            if k is not None and self.options.logprobs:
                g_strs, g_offs = _incremental_strings(self.tok, gen_ids, len(text) if echo else 0)
                tokens, offsets = g_strs, g_offs
                vals: list[float | None] = [s[0] for s in steps]
                tops: list[dict[str, float] | None] = [s[1] for s in steps]
                if echo and self.options.echo_logprobs:
                    p_vals, p_tops = self._prompt_logprobs(ids, int(k))
                    tokens, offsets = strs + tokens, offs + offsets
                    vals, tops = p_vals + vals, p_tops + tops
                lp = {
                    "tokens": tokens,
                    "token_logprobs": vals,
                    "top_logprobs": tops,
                    "text_offset": offsets,
                }
            choices.append(
                {
                    "index": i,
                    "text": (text if echo else "") + gen_text,
                    "logprobs": lp,
                    "finish_reason": finish,
                }
            )
            n_prompt, n_gen = n_prompt + len(ids), n_gen + len(gen_ids)
        return {
            "id": f"cmpl-{len(self.requests)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": _usage(n_prompt, n_gen),
        }

    # -- model ----------------------------------------------------------------------------------

    def _top(self, logp: Any, k: int, chosen: int) -> dict[str, float]:
        import torch

        idx = torch.topk(logp, k).indices.tolist() if k > 0 else []
        return {self.tok.decode([t]): float(logp[t]) for t in [*idx, chosen]}

    def _prompt_logprobs(
        self, ids: list[int], k: int
    ) -> tuple[list[float | None], list[dict[str, float] | None]]:
        import torch

        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        vals: list[float | None] = [None]
        tops: list[dict[str, float] | None] = [None]
        for i in range(1, len(ids)):
            vals.append(float(logp[i - 1, ids[i]]))
            tops.append(self._top(logp[i - 1], k, ids[i]))
        return vals, tops

    def _generate(
        self, ids: list[int], body: dict[str, Any], k: int
    ) -> tuple[list[int], str, str, list[tuple[float, dict[str, float]]]]:
        """Decode up to max_tokens; returns (new ids, text, finish_reason, per-step log-probs)."""
        import torch

        max_tokens = int(body["max_tokens"]) if body.get("max_tokens") is not None else 16
        temperature = float(body.get("temperature", 1.0))
        top_p = float(body.get("top_p", 1.0))
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        gen = torch.Generator()
        gen.manual_seed(int(body["seed"]) if body.get("seed") is not None else time.time_ns())
        eos = self.tok.eos_token_id
        out: list[int] = []
        steps: list[tuple[float, dict[str, float]]] = []
        text, finish = "", "length"
        past, cur = None, torch.tensor([ids])
        with torch.no_grad():
            for _ in range(max_tokens):
                res = self.model(input_ids=cur, use_cache=True, **{self._cache_arg: past})
                past = res[self._cache_arg]
                logp = torch.log_softmax(res.logits[0, -1].float(), dim=-1)
                if temperature <= 0:
                    tok_id = int(torch.argmax(logp))
                else:
                    probs = torch.softmax(logp / temperature, dim=-1)
                    if top_p < 1.0:
                        sp, si = torch.sort(probs, descending=True)
                        keep = torch.cumsum(sp, 0) - sp < top_p
                        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
                    tok_id = int(torch.multinomial(probs, 1, generator=gen))
                out.append(tok_id)
                steps.append((float(logp[tok_id]), self._top(logp, k, tok_id)))
                if tok_id == eos:
                    finish = "stop"
                    break
                text = self.tok.decode(out, skip_special_tokens=True)
                hits = [text.find(s) for s in stop if s and s in text]
                if hits:
                    text, finish = text[: min(hits)], "stop"
                    break
                cur = torch.tensor([[tok_id]])
        return out, text, finish, steps


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _incremental_strings(tok: Any, ids: list[int], start: int) -> tuple[list[str], list[int]]:
    """Each token's text as it extends the decoded string, and its character offset."""
    strs, offs, prev = [], [], ""
    for i in range(len(ids)):
        cur = tok.decode(ids[: i + 1], skip_special_tokens=False)
        strs.append(cur[len(prev) :])
        offs.append(start + len(prev))
        prev = cur
    return strs, offs


class _Handler(BaseHTTPRequestHandler):
    app: OpenAITestServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet in tests
        return

    def _serve(self, method: str) -> None:
        body: Any = None
        length = int(self.headers.get("content-length") or 0)
        status, extra, payload = 200, {}, None
        app = self.app
        with app._lock:
            app.in_flight += 1
            app.max_in_flight = max(app.max_in_flight, app.in_flight)
        try:
            if length:
                body = json.loads(self.rfile.read(length))
            headers = {k.lower(): v for k, v in self.headers.items()}
            payload = app.handle(method, self.path, headers, body)
        except _HTTPError as exc:
            status, extra = exc.status, exc.headers
            payload = {"error": {"message": exc.message, "type": "invalid_request_error"}}
        except Exception as exc:
            status = 500
            payload = {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}}
        finally:
            with app._lock:
                app.in_flight -= 1
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")
