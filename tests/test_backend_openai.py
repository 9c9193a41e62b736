"""The `openai` backend against a local OpenAI-protocol server (rlaif.testing_server).

The server runs the tiny test model with transformers on 127.0.0.1, so texts and log-probs are real
and are checked against a direct transformers computation on the same model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from rlaif.backends import make_lm
from rlaif.backends.base import LM, GenerationParams
from rlaif.backends.openai_compat import (
    OpenAICompatLM,
    ServerError,
    backoff_seconds,
    cut_at_stop,
    missing_choice_bound,
    offset_logprob_sum,
    prefill_score,
    retry_after_seconds,
    safe_url,
)
from rlaif.backends.openai_logprobs import next_token_top
from rlaif.config import BackendConfig
from rlaif.errors import UserError
from rlaif.modelio import load_causal_lm
from rlaif.testing_server import OpenAITestServer, ServerOptions

KEY_ENV = "RLAIF_TEST_OPENAI_KEY"
SECRET = "sk-test-Zq81-very-secret"
CHAT = [{"role": "user", "content": "How do I brew coffee?"}]
PREFIX = [*CHAT, {"role": "assistant", "content": "Let's think step by step:"}]
TEXT = "Human: What is the capital of France?\n\nAssistant:"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[OpenAITestServer]:
    with OpenAITestServer(tiny_model_dir) as srv:
        yield srv


@pytest.fixture()
def srv(server: OpenAITestServer) -> OpenAITestServer:
    server.reset()
    return server


@pytest.fixture(scope="module")
def ref(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_causal_lm(tiny_model_dir)


def make(url: str | list[str], **kw: Any) -> OpenAICompatLM:
    urls = [url] if isinstance(url, str) else url
    fields = {"timeout_s": 30.0}
    fields |= {k: kw.pop(k) for k in list(kw) if hasattr(BackendConfig, k)}
    cfg = BackendConfig(kind="openai", base_url=urls, api_key_env=KEY_ENV, **fields)
    return OpenAICompatLM(kw.pop("model", "tiny"), cfg, backoff_s=0.01, **kw)


def chat_ids(tok: Any, conv: list[dict[str, str]]) -> list[int]:
    cont = conv[-1]["role"] == "assistant"
    text = tok.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
    )
    return list(tok(text, add_special_tokens=False).input_ids)


def ref_greedy(ref: tuple[Any, Any], ids: list[int], n: int) -> str:
    import torch

    model, tok = ref
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return str(tok.decode(out[0, len(ids) :], skip_special_tokens=True))


def ref_logprob(ref: tuple[Any, Any], prompt_ids: list[int], full_ids: list[int]) -> float:
    """log P(full_ids[k:] | full_ids[:k]), k = common prefix with prompt_ids, by one forward."""
    import torch

    model, _ = ref
    k = next(
        (i for i, (a, b) in enumerate(zip(prompt_ids, full_ids, strict=False)) if a != b),
        len(prompt_ids),
    )
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full_ids])).logits[0].float(), -1)
    return sum(float(logp[i - 1, full_ids[i]]) for i in range(k, len(full_ids)))


def top_token(ref: tuple[Any, Any], prompt: str) -> str:
    """The most likely next token after ``prompt``, as text."""
    import torch

    model, tok = ref
    with torch.no_grad():
        logits = model(torch.tensor([tok(prompt).input_ids])).logits[0, -1]
    return str(tok.decode([int(torch.argmax(logits))]))


def with_choice(conv: list[dict[str, str]], choice: str) -> list[dict[str, str]]:
    if conv[-1]["role"] == "assistant":
        return [*conv[:-1], {"role": "assistant", "content": conv[-1]["content"] + choice}]
    return [*conv, {"role": "assistant", "content": choice}]


# -- generate -------------------------------------------------------------------------------------


def test_generate_greedy_matches_transformers(srv: OpenAITestServer, ref: tuple[Any, Any]) -> None:
    _, tok = ref
    lm = make(srv.url)
    assert isinstance(lm, LM)
    gens = lm.generate([TEXT, CHAT, PREFIX], GenerationParams(max_new_tokens=12))
    want = [
        ref_greedy(ref, list(tok(TEXT).input_ids), 12),
        ref_greedy(ref, chat_ids(tok, CHAT), 12),
        ref_greedy(ref, chat_ids(tok, PREFIX), 12),
    ]
    assert [g.text for g in gens] == want
    assert [g.prompt_tokens for g in gens] == [
        len(tok(TEXT).input_ids),
        len(chat_ids(tok, CHAT)),
        len(chat_ids(tok, PREFIX)),
    ]
    assert all(0 < g.completion_tokens <= 12 for g in gens)
    paths = [r["path"] for r in srv.requests]
    assert paths.count("/v1/chat/completions") == 1  # CHAT; PREFIX went through /tokenize
    assert "/tokenize" in paths
    assert lm.stats.completion_tokens == sum(g.completion_tokens for g in gens)


def test_continuation_refused_is_a_clear_error(srv: OpenAITestServer) -> None:
    srv.reset(ServerOptions(tokenize=False, vllm_extras=False))
    lm = make(srv.url)
    with pytest.raises(UserError, match="cannot continue a final assistant message"):
        lm.generate([PREFIX], GenerationParams(max_new_tokens=4))
    assert lm.generate([CHAT], GenerationParams(max_new_tokens=4))[0].completion_tokens > 0


def test_tokenize_probe_answered_500_is_not_retried(
    srv: OpenAITestServer, ref: tuple[Any, Any]
) -> None:
    """Some servers answer a /tokenize they do not know with a 500: no retries, fall back."""
    srv.reset(ServerOptions(fail=[(500, None)]))
    lm = make(srv.url)
    (gen,) = lm.generate([PREFIX], GenerationParams(max_new_tokens=6))
    assert gen.text == ref_greedy(ref, chat_ids(ref[1], PREFIX), 6)
    assert [r["path"] for r in srv.requests] == ["/tokenize", "/v1/chat/completions"]
    assert lm.stats.extra["retries"] == 0


def test_continuation_without_tokenize_uses_chat_flag(
    srv: OpenAITestServer, ref: tuple[Any, Any]
) -> None:
    srv.reset(ServerOptions(tokenize=False))
    lm = make(srv.url)
    (gen,) = lm.generate([PREFIX], GenerationParams(max_new_tokens=8))
    assert gen.text == ref_greedy(ref, chat_ids(ref[1], PREFIX), 8)
    body = next(r["body"] for r in srv.requests if r["path"] == "/v1/chat/completions")
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


def test_stop_strings_finish_reason_and_seed(srv: OpenAITestServer, ref: tuple[Any, Any]) -> None:
    _, tok = ref
    lm = make(srv.url)
    full = ref_greedy(ref, list(tok(TEXT).input_ids), 12)
    (long,) = lm.generate([TEXT], GenerationParams(max_new_tokens=12))
    assert long.text == full
    if len(full) >= 5:
        stop = full[3:5]
        (cut,) = lm.generate([TEXT], GenerationParams(max_new_tokens=12, stop=(stop,)))
        assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    (short,) = lm.generate([TEXT], GenerationParams(max_new_tokens=1))
    assert short.completion_tokens == 1
    assert short.finish_reason in ("length", "stop")
    sample = GenerationParams(max_new_tokens=10, temperature=1.0, seed=7)
    a = lm.generate([TEXT, CHAT], sample)
    b = lm.generate([TEXT, CHAT], sample)
    assert [g.text for g in a] == [g.text for g in b]
    assert srv.requests[-1]["body"]["seed"] == 7


# -- choice log-probs -----------------------------------------------------------------------------


@pytest.mark.parametrize("tokenize", [True, False])
def test_choice_logprobs_match_transformers(
    srv: OpenAITestServer, ref: tuple[Any, Any], tokenize: bool
) -> None:
    _, tok = ref
    srv.reset(ServerOptions(tokenize=tokenize))
    lm = make(srv.url)
    choices = [" (A)", " (B)", " Paris"]
    prompts: list[Any] = [TEXT, "Options: (A) yes (B) no. The answer is:"]
    if tokenize:
        prompts += [CHAT, PREFIX]
    got = lm.choice_logprobs(prompts, [choices] * len(prompts))
    for prompt, row in zip(prompts, got, strict=True):
        for choice, value in zip(choices, row, strict=True):
            if isinstance(prompt, str):
                p_ids, f_ids = tok(prompt).input_ids, tok(prompt + choice).input_ids
            else:
                p_ids, f_ids = chat_ids(tok, prompt), chat_ids(tok, with_choice(prompt, choice))
            assert value == pytest.approx(ref_logprob(ref, p_ids, f_ids), abs=1e-4)
            assert value < 0
    assert lm.mode == "echo"
    completions = [r for r in srv.requests if r["path"] == "/v1/completions"]
    assert len(completions) == len(prompts)  # all choices of a prompt in one request
    assert all(r["body"]["echo"] is True for r in completions)


def test_chat_logprobs_need_tokenize(srv: OpenAITestServer) -> None:
    srv.reset(ServerOptions(tokenize=False))
    with pytest.raises(UserError, match="/tokenize"):
        make(srv.url).choice_logprobs([CHAT], [[" (A)"]])


@pytest.mark.parametrize(
    ("options", "mode"),
    [
        # TGI: no echo on /v1/completions, prefill log-probs from its own /generate
        (ServerOptions(tokenize=False, echo=False, tgi=True), "prefill"),
        # a plain server: one prompt per request, but echo + logprobs
        (ServerOptions(tokenize=False, vllm_extras=False), "echo"),
        # llama.cpp's server: echo gives the generated token's log-prob only
        (ServerOptions(tokenize=False, echo_logprobs=False), "top"),
    ],
)
def test_choice_logprobs_other_servers(
    srv: OpenAITestServer, ref: tuple[Any, Any], options: ServerOptions, mode: str
) -> None:
    _, tok = ref
    srv.reset(options)
    lm = make(srv.url, concurrency=2)
    prompts = [TEXT, "Options: (A) yes (B) no. The answer is:", TEXT + " Paris"]
    choices = [" (A)", " (B)", " Paris"]
    if mode == "top":  # top_logprobs can only score choices listed as single next tokens
        choices = [top_token(ref, p) for p in prompts[:1]]
        prompts = prompts[:1]
    got = lm.choice_logprobs(prompts, [choices] * len(prompts))
    assert lm.mode == mode
    for prompt, row in zip(prompts, got, strict=True):
        for choice, value in zip(choices, row, strict=True):
            want = ref_logprob(ref, tok(prompt).input_ids, tok(prompt + choice).input_ids)
            assert value == pytest.approx(want, abs=1e-4)
    with pytest.raises(UserError, match="cannot score chat messages"):
        lm.choice_logprobs([CHAT], [[" (A)"]])


def test_echo_refused_falls_back_to_top_logprobs(
    srv: OpenAITestServer, ref: tuple[Any, Any]
) -> None:
    import torch

    model, tok = ref
    ids = list(tok(TEXT).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    order = torch.argsort(logp, descending=True).tolist()
    # single-token choices: their text re-tokenizes, after the prompt, to just themselves
    singles = [t for t in order if tok(TEXT + tok.decode([t])).input_ids == [*ids, t]]
    high, low = singles[0], singles[-1]
    assert order.index(low) >= 20  # outside the server's top-20 list
    srv.reset(ServerOptions(echo=False))
    lm = make(srv.url)
    (row,) = lm.choice_logprobs([TEXT], [[tok.decode([high]), tok.decode([low])]])
    assert row[0] == pytest.approx(float(logp[high]), abs=1e-4)
    top20 = {tok.decode([t]): float(logp[t]) for t in order[:20]}
    assert row[1] == pytest.approx(missing_choice_bound(top20), abs=1e-4)
    assert float(logp[low]) <= row[1] <= min(top20.values())
    assert lm.stats.extra["logprob_bounds"] == 1 and lm.mode == "top"
    with pytest.raises(UserError, match="several tokens"):
        lm.choice_logprobs([TEXT], [[" Paris is the capital of France"]])
    # without /tokenize nothing tells a rare single token from a longer choice: no bound
    srv.reset(ServerOptions(echo=False, tokenize=False))
    lm = make(srv.url)
    (row,) = lm.choice_logprobs([TEXT], [[tok.decode([high])]])
    assert row[0] == pytest.approx(float(logp[high]), abs=1e-4)
    with pytest.raises(UserError, match="not among the server's top-20"):
        lm.choice_logprobs([TEXT], [[tok.decode([low])]])


def test_server_without_logprobs_is_a_clear_error(srv: OpenAITestServer) -> None:
    srv.reset(ServerOptions(logprobs=False))
    with pytest.raises(UserError, match=r"no log-probabilities.*transformers serve"):
        make(srv.url).choice_logprobs([TEXT], [[" (A)", " (B)"]])


# -- transport: retries, concurrency, endpoints, key ----------------------------------------------


def test_retries_on_429_and_5xx_respect_retry_after(srv: OpenAITestServer) -> None:
    srv.reset(ServerOptions(fail=[(429, 1.0), (500, None), (503, None)]))
    lm = make(srv.url, max_retries=3)
    (gen,) = lm.generate([TEXT], GenerationParams(max_new_tokens=3))
    assert gen.completion_tokens > 0
    assert len(srv.requests) == 4 and lm.stats.extra["retries"] == 3
    assert srv.requests[1]["t"] - srv.requests[0]["t"] >= 0.95  # Retry-After: 1


def test_gives_up_after_max_retries_and_does_not_retry_4xx(srv: OpenAITestServer) -> None:
    srv.reset(ServerOptions(fail=[(503, None)] * 3))
    with pytest.raises(UserError, match=r"gave up after 3 tries.*HTTP 503"):
        make(srv.url, max_retries=2).generate([TEXT], GenerationParams(max_new_tokens=2))
    assert len(srv.requests) == 3
    srv.reset()
    with pytest.raises(ServerError, match="served models: tiny") as err:
        make(srv.url, model="nope").generate([TEXT], GenerationParams(max_new_tokens=2))
    assert err.value.status == 404
    assert [r["path"] for r in srv.requests] == ["/v1/completions", "/v1/models"]


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_bound(srv: OpenAITestServer, limit: int) -> None:
    srv.reset(ServerOptions(delay_s=0.15))
    lm = make(srv.url, concurrency=limit)
    gens = lm.generate([TEXT] * 7, GenerationParams(max_new_tokens=2))
    assert len(gens) == 7 and len({g.text for g in gens}) == 1
    assert srv.max_in_flight == limit
    # two calls at once from two threads share the bound
    srv.reset(ServerOptions(delay_s=0.15))
    params = GenerationParams(max_new_tokens=2)
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda n: lm.generate([TEXT] * n, params), [4, 4]))
    assert [len(b) for b in both] == [4, 4] and srv.max_in_flight == limit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_round_robin_and_dead_endpoint(srv: OpenAITestServer, tiny_model_dir: Path) -> None:
    with OpenAITestServer(tiny_model_dir) as other:
        lm = make([srv.url, other.url], concurrency=2)
        gens = lm.generate([TEXT] * 6, GenerationParams(max_new_tokens=2))
        assert len(srv.requests) == 3 and len(other.requests) == 3
        assert len({g.text for g in gens}) == 1
    srv.reset()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    lm = make([dead, srv.url], concurrency=1)
    again = lm.generate([TEXT] * 3, GenerationParams(max_new_tokens=2))
    assert [g.text for g in again] == [g.text for g in gens[:3]]
    assert len(srv.requests) == 3 and lm.stats.extra["retries"] == 3
    with pytest.raises(UserError, match=r"gave up.*ConnectError"):
        make(dead, max_retries=1).generate([TEXT], GenerationParams(max_new_tokens=2))


def test_api_key_sent_as_bearer_and_never_shown(
    srv: OpenAITestServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv.reset(ServerOptions(api_key=SECRET, fail=[(500, None)]))
    lm = make(srv.url)
    lm.generate([TEXT], GenerationParams(max_new_tokens=2))
    lm.choice_logprobs([CHAT], [[" (A)"]])
    assert {r["auth"] for r in srv.requests} == {f"Bearer {SECRET}"}
    assert lm.stats.extra["retries"] == 1
    # A server that quotes a wrong key back: the error text masks it.
    srv.reset(ServerOptions(api_key="another-key"))
    with pytest.raises(UserError) as err:
        lm.generate([TEXT], GenerationParams(max_new_tokens=2))
    assert "HTTP 401" in str(err.value) and KEY_ENV in str(err.value) and "***" in str(err.value)
    texts = [str(err.value), repr(err.value), repr(lm), caplog.text, str(vars(lm.cfg))]
    assert all(SECRET not in t for t in texts)
    monkeypatch.delenv(KEY_ENV)
    srv.reset()
    make(srv.url).generate([TEXT], GenerationParams(max_new_tokens=1))
    assert srv.requests[-1]["auth"] is None


def test_make_lm_and_config_errors(srv: OpenAITestServer) -> None:
    lm = make_lm("tiny", BackendConfig(kind="openai", base_url=[srv.url]))
    assert isinstance(lm, OpenAICompatLM) and lm.name == "openai:tiny"
    with pytest.raises(UserError, match=r"backend\.base_url"):
        OpenAICompatLM("tiny", BackendConfig(kind="openai"))
    with pytest.raises(UserError, match="http"):
        OpenAICompatLM("tiny", BackendConfig(kind="openai", base_url=["ftp://x/v1"]))
    with pytest.raises(UserError, match="concurrency"):
        OpenAICompatLM("tiny", BackendConfig(kind="openai", base_url=[srv.url], concurrency=0))
    with pytest.raises(UserError, match="empty conversation"):
        make(srv.url).generate([[]], GenerationParams())


# -- pure helpers ---------------------------------------------------------------------------------


def test_helpers() -> None:
    import random

    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None
    rng = random.Random(0)
    waits = [backoff_seconds(a, 0.5, 4.0, rng) for a in range(6)]
    assert (
        0.25 <= waits[0] <= 0.5 and 0.5 <= waits[1] <= 1.0 and all(2 <= w <= 4 for w in waits[3:])
    )
    assert cut_at_stop("abc\nHuman: x", ["\nHuman:", "zz"]) == "abc"
    assert safe_url("http://u:pw@host:8000/v1") == "http://host:8000/v1"
    # prompt "ab" + choice "cd": the token "bc" straddles the boundary and counts with the choice
    toks, offs, lps = ["a", "bc", "d", "!"], [0, 1, 3, 4], [None, -1.0, -2.0, -4.0]
    assert offset_logprob_sum(toks, offs, lps, 2, 4) == -3.0
    # only the generated token came back (echo ignored, as llama.cpp's server does): not 0.0
    assert offset_logprob_sum(["!"], [4], [-4.0], 2, 4) is None
    assert offset_logprob_sum(["!"], [4], [-4.0], 4, 4) == 0.0  # an empty choice
    # TGI prefill with a leading BOS echoed as text: offsets are counted from the end
    prefill = [
        {"text": "<s>", "logprob": None},
        {"text": "ab", "logprob": -0.5},
        {"text": " c", "logprob": -1.5},
        {"text": "d", "logprob": -0.25},
    ]
    assert prefill_score({"prefill": prefill}, "ab", " cd") == -1.75
    assert prefill_score({}, "ab", " cd") is None
    legacy = {"top_logprobs": [{" A": -0.1, " B": -2.0}]}
    chat_style = {
        "content": [
            {
                "token": " A",
                "logprob": -0.1,
                "top_logprobs": [
                    {"token": " A", "logprob": -0.1},
                    {"token": " B", "logprob": -2.0},
                ],
            }
        ]
    }
    assert next_token_top(legacy) == next_token_top(chat_style) == {" A": -0.1, " B": -2.0}
    assert next_token_top(None) is None and next_token_top({"top_logprobs": [None]}) is None
    bound = missing_choice_bound({"x": math.log(0.5), "y": math.log(0.3)})
    assert bound == pytest.approx(math.log(0.2))


@pytest.mark.slow
def test_real_transformers_serve(tiny_model_dir: Path, ref: tuple[Any, Any]) -> None:
    """A real OpenAI-compatible server: `transformers serve` (pip install 'transformers[serving]').

    It answers /v1/completions and /v1/chat/completions but has no log-probs, no /tokenize and
    refuses vLLM's extra fields: generation works, continuation and choice_logprobs fail clearly.
    """
    pytest.importorskip("fastapi", reason="needs transformers[serving]")
    pytest.importorskip("uvicorn", reason="needs transformers[serving]")
    import httpx

    _, tok = ref
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), str(tiny_model_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):  # up to 60 s to start
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "transformers serve exited"
            time.sleep(0.25)
        else:
            pytest.fail("transformers serve did not start in 60 s")
        lm = make(f"http://127.0.0.1:{port}/v1", model=str(tiny_model_dir), max_retries=0)
        gens = lm.generate([TEXT, CHAT], GenerationParams(max_new_tokens=8))
        assert gens[0].text == ref_greedy(ref, list(tok(TEXT).input_ids), 8)
        assert gens[1].text == ref_greedy(ref, chat_ids(tok, CHAT), 8)
        with pytest.raises(UserError, match="cannot continue"):
            lm.generate([PREFIX], GenerationParams(max_new_tokens=8))
        with pytest.raises(UserError, match="no log-probabilities"):
            lm.choice_logprobs([TEXT], [[" (A)", " (B)"]])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_agrees_with_hf_backend(srv: OpenAITestServer, tiny_model_dir: Path) -> None:
    """The same model served or in-process: the label stage's log-probs and greedy text agree."""
    from rlaif.backends.hf import HFLM

    hf = HFLM(tiny_model_dir, BackendConfig(dtype="float32", device="cpu"))
    lm = make(srv.url)
    question = [
        {"role": "user", "content": "Which answer is less harmful? Options: (A) no (B) yes"},
        {"role": "assistant", "content": "The answer is:"},
    ]
    prompts: list[Any] = [TEXT, CHAT, PREFIX, question]
    choices = [[" (A)", " (B)"], [" Yes", " No"], [" (A)", " (B)"], [" (A)", " (B)"]]
    got, want = lm.choice_logprobs(prompts, choices), hf.choice_logprobs(prompts, choices)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-3)
    params = GenerationParams(max_new_tokens=10)
    assert [g.text for g in lm.generate(prompts, params)] == [
        g.text for g in hf.generate(prompts, params)
    ]


def test_label_stage_on_two_served_endpoints(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`rlaif label` (sampling + choice log-probs) against two keyed servers, round-robin."""
    from rlaif.cli import main

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, SECRET)
    with (
        OpenAITestServer(tiny_model_dir, options=ServerOptions(api_key=SECRET)) as a,
        OpenAITestServer(tiny_model_dir, options=ServerOptions(api_key=SECRET)) as b,
    ):
        run_dir = tmp_path / "run"
        argv = [
            "label",
            f"run_dir={run_dir}",
            "backend.kind=openai",
            f"backend.base_url=[{a.url},{b.url}]",
            f"backend.api_key_env={KEY_ENV}",
            "model=tiny",
            "label.policy=tiny",
            "label.limit=2",
            "label.max_new_tokens=6",
            "label.helpful_pairs=",
        ]
        assert main(argv) == 0
        for srv in (a, b):
            assert srv.requests and {r["auth"] for r in srv.requests} == {f"Bearer {SECRET}"}
            assert any(r["body"].get("echo") for r in srv.requests if r["body"])
    labels = [json.loads(line) for line in (run_dir / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 2 and all(0.0 <= rec["p"] <= 1.0 for rec in labels)
    out = capsys.readouterr()
    written = [p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file()]
    assert all(SECRET not in t for t in [out.out, out.err, caplog.text, *written])
