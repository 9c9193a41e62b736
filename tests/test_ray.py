"""``backend.executor: ray``: RayLM on a local Ray (2 CPUs) against the in-process backends."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlaif.backends import GenerationParams, make_lm
from rlaif.backends.hf import HFLM
from rlaif.backends.openai_compat import OpenAICompatLM
from rlaif.backends.ray_lm import RayLM, check_ray_config, shard_bounds
from rlaif.config import BackendConfig
from rlaif.errors import UserError
from rlaif.testing_server import OpenAITestServer, ServerOptions

ray = pytest.importorskip("ray", reason="the 'ray' extra: pip install -e '.[ray]'")

ROOT = Path(__file__).resolve().parents[1]
CONVS: list[Any] = [
    [{"role": "user", "content": f"Question {i}: how do I brew {w} coffee?"}]
    for i, w in enumerate(["good", "strong", "cheap", "cold", "quick", "iced", "sweet"])
]
CONVS.append("Human: What is the capital of France?\n\nAssistant:")
CONVS.append([*CONVS[0], {"role": "assistant", "content": "Let's think step by step:"}])
CHOICES = [[" (A)", " (B)"], [" yes", " no", " maybe"]] * 4 + [[" (A)", " (B)"]]
KEY_ENV = "RLAIF_TEST_RAY_KEY"


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> Iterator[None]:
    """One local Ray for the whole module (starting one takes seconds)."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local(tiny_model_dir: Path) -> HFLM:
    return HFLM(tiny_model_dir, BackendConfig(max_batch_size=4, dtype="float32"))


def flat(rows: list[list[float]]) -> list[float]:
    return [x for r in rows for x in r]


def ray_cfg(**kw: Any) -> BackendConfig:
    # float32 on both sides: the dtype probe of 'auto' may pick differently in each process
    return BackendConfig(executor="ray", max_batch_size=4, dtype="float32", **kw)


def test_shard_bounds() -> None:
    assert shard_bounds(0, 3) == []
    assert shard_bounds(2, 5) == [(0, 1), (1, 2)]
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    for n in range(1, 30):
        for k in range(1, 6):
            b = shard_bounds(n, k)
            assert b[0][0] == 0 and b[-1][1] == n and len(b) == min(n, k)
            assert all(x[1] == y[0] for x, y in itertools.pairwise(b))
            assert max(s - a for a, s in b) - min(s - a for a, s in b) <= 1


def test_config_errors() -> None:
    with pytest.raises(UserError, match=r"backend\.ray_actors"):
        check_ray_config(ray_cfg(ray_actors=0))
    with pytest.raises(UserError, match=r"backend\.ray_max_restarts"):
        check_ray_config(ray_cfg(ray_max_restarts=-1))
    with pytest.raises(UserError, match=r"backend\.base_url"):
        RayLM("tiny", ray_cfg(kind="openai"))
    with pytest.raises(UserError, match="nope"):
        make_lm("/nope/model", ray_cfg())


@pytest.fixture(scope="class")
def hf_lm(tiny_model_dir: Path) -> Iterator[RayLM]:
    """Two hf actors shared by the tests of TestHFActors (each actor start costs seconds); they
    stop at the end of the class, so the 2 CPUs are free again for the tests after it."""
    lm = make_lm(str(tiny_model_dir), ray_cfg(ray_actors=2, ray_max_restarts=2))
    assert isinstance(lm, RayLM)
    yield lm
    lm.close()


def _kill_when_busy(pid: int, done: threading.Event, killed: list[float]) -> None:
    """SIGKILL ``pid`` once it has burnt CPU on the call (so the kill lands mid-call)."""
    import psutil

    proc = psutil.Process(pid)
    start = sum(proc.cpu_times()[:2])
    while not done.is_set():
        if sum(proc.cpu_times()[:2]) - start >= 0.05:
            os.kill(pid, signal.SIGKILL)
            killed.append(time.monotonic())
            return
        time.sleep(0.002)


class TestHFActors:
    """RayLM over hf replicas of the tiny model, against the same model in this process."""

    def test_same_results_as_local_and_both_actors_work(self, hf_lm: RayLM, local: HFLM) -> None:
        lm = hf_lm
        assert lm.has_template and lm.name == local.name
        before = ray.get([a.info.remote() for a in lm.actors])
        greedy = GenerationParams(max_new_tokens=12)
        sampled = GenerationParams(max_new_tokens=12, temperature=1.0, seed=7, stop=("e",))
        for params in (greedy, sampled):
            assert lm.generate(CONVS, params) == local.generate(CONVS, params)
        got = lm.choice_logprobs(CONVS, CHOICES)
        want = local.choice_logprobs(CONVS, CHOICES)
        assert [len(r) for r in got] == [len(c) for c in CHOICES]
        # other batch mates (another shard) move the sums in the 4th digit; rows differ by > 0.01
        assert flat(got) == pytest.approx(flat(want), abs=2e-3)
        after = ray.get([a.info.remote() for a in lm.actors])
        assert len({i["pid"] for i in after}) == 2
        # every call was split over both actors
        assert all(a["calls"] - b["calls"] == 3 for a, b in zip(after, before, strict=True))
        assert all(
            a["prompt_tokens"] > b["prompt_tokens"] for a, b in zip(after, before, strict=True)
        )
        assert lm.stats.completion_tokens > 0 and lm.stats.calls >= 3
        assert lm.generate([], greedy) == [] and lm.choice_logprobs([], []) == []

    def test_actor_killed_mid_call_is_replaced(self, hf_lm: RayLM, local: HFLM) -> None:
        lm = hf_lm
        params = GenerationParams(max_new_tokens=64)
        convs = CONVS * 8
        want = local.generate(convs, params)
        victim = lm.pids()[0]
        done, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_when_busy, args=(victim, done, killed))
        killer.start()
        try:
            got = lm.generate(convs, params)
        finally:
            ended = time.monotonic()
            done.set()
            killer.join()
        assert killed and killed[0] < ended, "the actor was not killed during the call"
        assert got == want  # the killed actor's shard was run again, nothing lost
        pids = lm.pids()
        assert len(pids) == 2 and victim not in pids and not lm.dead
        assert lm.generate(convs[:3], params) == want[:3]  # the restarted actor keeps working

    def test_actor_gone_for_good_moves_its_shard(self, hf_lm: RayLM, local: HFLM) -> None:
        lm = hf_lm
        params = GenerationParams(max_new_tokens=4)
        ray.kill(lm.actors[1], no_restart=True)
        assert lm.generate(CONVS, params) == local.generate(CONVS, params)
        assert lm.dead == {1} and len(lm.pids()) == 1
        assert lm.generate(CONVS[:2], params) == local.generate(CONVS[:2], params)


def test_openai_actors_call_served_endpoints(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk-ray-test-key"
    monkeypatch.setenv(KEY_ENV, secret)  # only the driver has it: the actors get it from RayLM
    opts = ServerOptions(api_key=secret)
    with (
        OpenAITestServer(tiny_model_dir, options=opts) as one,
        OpenAITestServer(tiny_model_dir, options=opts) as two,
    ):
        cfg = ray_cfg(kind="openai", base_url=[one.url, two.url], api_key_env=KEY_ENV, ray_actors=2)
        lm = make_lm("tiny", cfg)
        assert isinstance(lm, RayLM) and lm.name == "openai:tiny"
        direct = OpenAICompatLM("tiny", BackendConfig(**{**vars(cfg), "executor": "local"}))
        params = GenerationParams(max_new_tokens=6)
        convs, choices = CONVS[:4], CHOICES[:4]
        assert lm.generate(convs, params) == direct.generate(convs, params)
        got = lm.choice_logprobs(convs, choices)
        assert flat(got) == pytest.approx(flat(direct.choice_logprobs(convs, choices)), abs=1e-5)
        assert one.requests and two.requests  # round-robin over both endpoints
        assert {r["auth"] for r in one.requests + two.requests} == {f"Bearer {secret}"}
        lm.close()


def test_revise_cli_with_ray_executor(tmp_path: Path, tiny_model_dir: Path) -> None:
    from rlaif.cli import main

    def run(run_dir: Path, *extra: str) -> list[dict[str, Any]]:
        args = [
            "revise", str(ROOT / "configs" / "demo.yaml"), f"model={tiny_model_dir}",
            f"run_dir={run_dir}", "revise.limit=6", "revise.rounds=1", "revise.max_new_tokens=8",
            "revise.helpful_prompts=", "revise.chunk_size=3",
            "revise.prompts=tests/fixtures/hh-rlhf-60.jsonl", "backend.max_batch_size=4", *extra,
        ]  # fmt: skip
        assert main(args) == 0
        text = (run_dir / "revisions.jsonl").read_text(encoding="utf-8")
        return [json.loads(x) for x in text.splitlines()]

    on_ray = run(
        tmp_path / "ray",
        "backend.executor=ray",
        "backend.ray_actors=2",
    )
    assert len(on_ray) == 6 and all(len(r["rounds"]) == 1 for r in on_ray)
    here = run(tmp_path / "local")

    def strip(recs: list[dict[str, Any]]) -> list[Any]:
        return [{k: v for k, v in r.items() if k not in ("seconds", "time")} for r in recs]

    assert strip(on_ray) == strip(here)
