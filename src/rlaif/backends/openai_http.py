"""HTTP side of the ``openai`` backend: endpoints round-robin, retries, the API key, a thread pool.

Kept apart from :mod:`rlaif.backends.openai_compat` (which maps the LM protocol onto the OpenAI
API) so that the transport rules live in one small place:

- the key comes only from the environment variable ``backend.api_key_env``, goes out only as an
  ``Authorization: Bearer`` header, and is masked (``***``) in every error and log line;
- connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter, or
  after the server's ``Retry-After`` when it sends one; other 4xx answers are not retried;
- each attempt goes to the next ``backend.base_url`` in turn, so a dead endpoint is skipped;
- at most ``backend.concurrency`` requests are in flight (a thread pool per call, and a semaphore
  over all calls of one backend).
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

from rlaif.backends.base import BackendStats
from rlaif.config import BackendConfig
from rlaif.errors import UserError
from rlaif.progress import progress

log = logging.getLogger("rlaif.backends.openai_compat")
T = TypeVar("T")
R = TypeVar("R")


class ServerError(UserError):
    """A request the server answered with a 4xx status other than 429 (not retried)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BadAnswer(UserError):
    """A 2xx answer that is not a JSON object (e.g. another server's endpoint of the same name)."""


def safe_url(url: str) -> str:
    """``url`` without any ``user:password@`` part."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': half of ``base * 2**attempt`` fixed, half random."""
    delay = min(cap, base * 2.0**attempt)
    return delay / 2 + rng.uniform(0.0, delay / 2)


def error_text(resp: httpx.Response) -> str:
    """The message of an error answer, one line, at most 300 characters."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip().replace("\n", " ")[:300] or resp.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data.get("message", data.get("detail", data)))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err).replace("\n", " ")[:300]
    return str(data)[:300]


class Endpoints:
    """One or more OpenAI-compatible base URLs behind one retrying ``post``."""

    def __init__(
        self,
        cfg: BackendConfig,
        model: str,
        stats: BackendStats,
        *,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        if not cfg.base_url:
            raise UserError(
                "backend.base_url: the 'openai' backend needs at least one endpoint, "
                "e.g. base_url: [http://127.0.0.1:8000/v1]"
            )
        for url in cfg.base_url:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise UserError(f"backend.base_url: expected an http(s) URL, got {safe_url(url)!r}")
        if cfg.concurrency < 1:
            raise UserError(f"backend.concurrency: expected at least 1, got {cfg.concurrency}")
        if cfg.max_retries < 0:
            raise UserError(f"backend.max_retries: expected 0 or more, got {cfg.max_retries}")
        self.cfg, self.model, self.stats = cfg, model, stats
        self.urls = [u.rstrip("/") for u in cfg.base_url]
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.lock = threading.Lock()
        # bounds requests in flight per backend, also across calls made from several threads
        self._slots = threading.BoundedSemaphore(cfg.concurrency)
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self._key = key  # kept only to mask it out of error text
        self._client = httpx.Client(
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=httpx.Timeout(cfg.timeout_s),
            limits=httpx.Limits(max_connections=cfg.concurrency * len(self.urls)),
        )
        self._turn = 0
        self._rng = random.Random()
        quiet = logging.getLogger("httpx")  # one INFO line per request would flood the CLI
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.WARNING)
        stats.extra.setdefault("retries", 0.0)

    def __repr__(self) -> str:
        return f"Endpoints([{', '.join(safe_url(u) for u in self.urls)}])"

    def close(self) -> None:
        self._client.close()

    def mask(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _next_base(self) -> str:
        with self.lock:
            base = self.urls[self._turn % len(self.urls)]
            self._turn += 1
        return base

    def post(
        self, path: str, body: dict[str, Any], *, root: bool = False, retry_500: bool = True
    ) -> dict[str, Any]:
        """POST ``body`` to ``<base>/<path>`` (``root``: without the ``/v1``), with retries.

        ``retry_500=False`` (probing an optional endpoint): 500 and 501 raise at once, as some
        servers answer a request they do not understand with a 500.
        """
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            base = self._next_base()
            prefix = base[: -len("/v1")] if root and base.endswith("/v1") else base
            url = prefix + path
            wait_hint: float | None = None
            try:
                with self._slots:
                    resp = self._client.post(url, json=body)
            except httpx.TransportError as exc:
                last = f"{safe_url(url)}: {type(exc).__name__}: {self.mask(str(exc))[:200]}"
            else:
                with self.lock:
                    self.stats.calls += 1
                if resp.status_code < 400:
                    return self._json(resp, url)
                last = f"{safe_url(url)}: HTTP {resp.status_code}: {self.mask(error_text(resp))}"
                if resp.status_code in (401, 403):
                    state = "set" if self._key else "not set"
                    last += f" (the API key comes from ${self.cfg.api_key_env}, which is {state})"
                if resp.status_code == 404 and not root:
                    last += self._served_hint(base)
                status = resp.status_code
                if (status < 500 and status != 429) or (not retry_500 and status in (500, 501)):
                    raise ServerError(status, last)
                wait_hint = retry_after_seconds(resp.headers.get("retry-after"))
            if attempt == self.cfg.max_retries:
                break
            wait = backoff_seconds(attempt, self.backoff_s, self.max_backoff_s, self._rng)
            if wait_hint is not None:
                wait = min(wait_hint, 300.0)
            log.warning("openai backend: %s; retry %d in %.2fs", last, attempt + 1, wait)
            with self.lock:
                self.stats.extra["retries"] += 1
            time.sleep(wait)
        raise UserError(f"openai backend: gave up after {self.cfg.max_retries + 1} tries: {last}")

    @staticmethod
    def _json(resp: httpx.Response, url: str) -> dict[str, Any]:
        try:
            data = resp.json()
        except ValueError:
            raise BadAnswer(f"{safe_url(url)}: the answer is not JSON") from None
        if not isinstance(data, dict):
            raise BadAnswer(f"{safe_url(url)}: expected a JSON object in the answer")
        return data

    def _served_hint(self, base: str) -> str:
        """' (served models: a, b)' from GET /models, to explain a 404; '' if that fails too."""
        try:
            data = self._client.get(base + "/models").json()
            names = [str(m["id"]) for m in data["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return ""
        return f" (model {self.model!r}; served models: {', '.join(names) or 'none'})"

    def map(self, fn: Callable[[T], R], items: list[T], desc: str) -> list[R]:
        """``[fn(x) for x in items]`` with at most ``concurrency`` calls in flight, in order."""
        if not items:
            return []
        out: list[Any] = [None] * len(items)
        workers = min(self.cfg.concurrency, len(items))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlaif-openai")
        try:
            futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
            with progress(total=len(items), desc=desc, unit="req", leave=False) as bar:
                for fut in as_completed(futures):
                    out[futures[fut]] = fut.result()
                    bar.update(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return out
