"""``backend.executor: ray``: any backend's calls sharded over Ray actors.

:class:`RayLM` implements the :class:`~rlaif.backends.base.LM` protocol, so the stages use it
unchanged. It starts ``ray_actors`` actors, each holding one replica of the configured backend
(an ``hf`` model, or an ``openai`` client calling served endpoints), and splits the list of every
``generate`` / ``choice_logprobs`` call into contiguous shards, one per live actor; the answers come
back in input order.

Failures: an actor that dies (its process killed, its node lost) is restarted by Ray up to
``ray_max_restarts`` times and the shard it was working on is run again on the restarted actor
(Ray's ``max_task_retries``). An actor that is gone for good is dropped and its shard goes to a
live one; only when no actor is left does the call fail. The calls have no side effects (the stages
write records in the driver after each call), so a retried shard does no work twice that is kept.

Seeded sampling gives the same texts as the ``hf`` backend in one process: row ``i`` of a call is
sampled with the seed the local backend would give row ``i``, whatever shard it lands in.

Ray is imported only when a :class:`RayLM` is built (``pip install 'rlaif[ray]'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rlaif.backends.base import BackendStats, Conversation, Generation, GenerationParams
from rlaif.config import BackendConfig
from rlaif.errors import UserError

log = logging.getLogger(__name__)

# The hf backend seeds row i of a call with base_seed * SEED_STRIDE + i (rlaif.backends.hf).
SEED_STRIDE = 1_000_003
# Object store of a Ray started here: the shards are text, so a small one is plenty.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


def shard_bounds(n: int, k: int) -> list[tuple[int, int]]:
    """``range(n)`` cut into at most ``k`` contiguous, non-empty ``(start, stop)`` slices.

    Slice sizes differ by at most one; the first ones get the extra items.
    """
    if n <= 0:
        return []
    k = max(1, min(k, n))
    base, extra = divmod(n, k)
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(k):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def check_ray_config(cfg: BackendConfig) -> None:
    """UserError naming the field when a ``ray_*`` setting is out of range."""
    if cfg.ray_actors < 1:
        raise UserError(f"backend.ray_actors: must be >= 1, got {cfg.ray_actors}")
    if cfg.ray_cpus_per_actor < 0 or cfg.ray_gpus_per_actor < 0:
        raise UserError("backend.ray_cpus_per_actor / ray_gpus_per_actor: must be >= 0")
    if cfg.ray_max_restarts < 0:
        raise UserError(f"backend.ray_max_restarts: must be >= 0, got {cfg.ray_max_restarts}")
    if cfg.kind not in ("hf", "openai"):
        raise UserError(f"backend.kind: expected 'hf' or 'openai', got {cfg.kind!r}")


class Replica:
    """One backend replica; Ray runs one per actor (``ray.remote(Replica)``)."""

    def __init__(
        self, model_ref: str, path: str, cfg: BackendConfig, api_key: str | None = None
    ) -> None:
        cfg = replace(cfg, executor="local")
        self.is_hf = cfg.kind == "hf"
        self.lm: Any
        if self.is_hf:
            import torch

            from rlaif.backends.hf import HFLM
            from rlaif.models import resolve_model

            if cfg.ray_cpus_per_actor >= 1:
                torch.set_num_threads(int(cfg.ray_cpus_per_actor))
            # the driver's resolved directory when this node sees it, else resolve (pull) here
            where = Path(path) if path and Path(path).is_dir() else resolve_model(model_ref)
            self.lm = HFLM(where, cfg)
        else:
            from rlaif.backends.openai_compat import OpenAICompatLM

            if api_key:
                os.environ[cfg.api_key_env] = api_key
            self.lm = OpenAICompatLM(model_ref, cfg)

    def info(self) -> dict[str, Any]:
        """Where this replica runs and what the driver needs to know about the model."""
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "name": self.lm.name,
            "has_template": bool(getattr(self.lm, "has_template", True)),
            "calls": self.lm.stats.calls,
            "prompt_tokens": self.lm.stats.prompt_tokens,
        }

    def generate(
        self, conversations: Sequence[Conversation], params: GenerationParams, offset: int
    ) -> list[Generation]:
        """The local backend's ``generate`` on one shard; ``offset``: the shard's first row."""
        if not self.is_hf:
            return list(self.lm.generate(conversations, params))
        lm = self.lm
        base = params.seed if params.seed is not None else 0
        seeds = [base * SEED_STRIDE + offset + j for j in range(len(conversations))]
        return lm.generate(conversations, params, seeds)  # type: ignore[no-any-return]

    def choice_logprobs(
        self, prompts: Sequence[Conversation], choices: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        return [list(r) for r in self.lm.choice_logprobs(prompts, choices)]


def init_ray(cfg: BackendConfig) -> None:
    """Join the cluster ``cfg.ray_address`` names, or start a local Ray ('').

    A Ray already initialised in this process (a test's, a notebook's) is used as it is.
    """
    import ray

    if ray.is_initialized():
        return
    if cfg.ray_address:
        log.info("ray: joining the cluster at %s", cfg.ray_address)
        ray.init(address=cfg.ray_address)
        return
    need = cfg.ray_actors * cfg.ray_cpus_per_actor
    have = os.cpu_count() or 1
    if need > have:
        raise UserError(
            f"backend.ray_actors x ray_cpus_per_actor: {need:g} CPUs asked of a local Ray, this "
            f"machine has {have}; lower them or join a cluster with backend.ray_address"
        )
    log.info("ray: starting a local Ray (%d CPUs)", have)
    ray.init(
        address="local",
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
    )


class RayLM:
    """``cfg.kind``'s backend for ``model_ref``, one replica per Ray actor, calls sharded."""

    def __init__(self, model_ref: str, cfg: BackendConfig) -> None:
        check_ray_config(cfg)
        try:
            import ray
        except ImportError:
            raise UserError(
                "backend.executor: 'ray' needs Ray; install it with pip install 'rlaif[ray]'"
            ) from None
        self.cfg = cfg
        self.model_ref = model_ref
        self.stats = BackendStats()
        path = ""
        api_key: str | None = None
        if cfg.kind == "hf":
            from rlaif.modelio import check_model_dir
            from rlaif.models import resolve_model

            # user mistakes (unknown model, pickle weights) show up here, not inside an actor
            resolved = check_model_dir(resolve_model(model_ref), allow_pickle=cfg.allow_pickle)
            path, self.name = str(resolved), resolved.name
        else:
            from rlaif.backends.openai_compat import OpenAICompatLM

            OpenAICompatLM(model_ref, cfg).close()  # checks base_url and the rest here
            self.name = f"openai:{model_ref}"
            # actors on other nodes do not see this process's environment
            api_key = os.environ.get(cfg.api_key_env) or None
        init_ray(cfg)
        self._check_resources()
        actor = ray.remote(Replica).options(  # type: ignore[attr-defined]
            num_cpus=cfg.ray_cpus_per_actor,
            num_gpus=cfg.ray_gpus_per_actor,
            max_restarts=cfg.ray_max_restarts,
            max_task_retries=cfg.ray_max_restarts,
            # the driver shows progress; the actors' bars would only clutter its log
            runtime_env={"env_vars": {"TQDM_DISABLE": "1"}},
        )
        log.info("ray: starting %d actors for %s", cfg.ray_actors, self.name)
        self.actors: list[Any] = [
            actor.remote(model_ref, path, cfg, api_key) for _ in range(cfg.ray_actors)
        ]
        self.dead: set[int] = set()
        refs = [a.info.remote() for a in self.actors]
        t0 = time.monotonic()
        while len(ray.wait(refs, num_returns=len(refs), timeout=30)[0]) < len(refs):
            log.warning(
                "ray: actors for %s not all up after %.0f s; waiting for free resources (%s)",
                self.name,
                time.monotonic() - t0,
                ray.available_resources(),
            )
        try:
            infos = ray.get(refs)
        except ray.exceptions.RayError as err:
            self.close()
            raise RuntimeError(f"ray: the actors for {self.name} failed to start: {err}") from err
        self.has_template = bool(infos[0]["has_template"])
        self.hosts = sorted({str(i["host"]) for i in infos})

    def __repr__(self) -> str:
        live = len(self.actors) - len(self.dead)
        return f"RayLM({self.name!r}, actors={live}, hosts={self.hosts})"

    def _check_resources(self) -> None:
        import ray

        have = ray.cluster_resources()
        for key, per in (
            ("CPU", self.cfg.ray_cpus_per_actor),
            ("GPU", self.cfg.ray_gpus_per_actor),
        ):
            need = per * self.cfg.ray_actors
            if need > have.get(key, 0.0):
                log.warning(
                    "ray: %d actors need %g %s, the cluster has %g now; they wait for more nodes",
                    self.cfg.ray_actors,
                    need,
                    key,
                    have.get(key, 0.0),
                )

    def pids(self) -> list[int]:
        """Process id of every live actor (tests use it to kill one)."""
        import ray

        live = [a for k, a in enumerate(self.actors) if k not in self.dead]
        return [int(i["pid"]) for i in ray.get([a.info.remote() for a in live])]

    def close(self) -> None:
        """Stop the actors (their replicas' memory is freed); the Ray session stays up."""
        import ray

        if ray.is_initialized():
            for a in getattr(self, "actors", []):
                ray.kill(a, no_restart=True)
        self.actors = []

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit Ray may be gone already
            self.close()

    # ---- calls ---------------------------------------------------------------------------

    def _run(
        self, method: str, n: int, args: Callable[[int, int], tuple[Any, ...]], desc: str
    ) -> list[Any]:
        """``actor.method(*args(start, stop))`` for each shard of ``range(n)``; results joined."""
        import ray
        from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

        from rlaif.progress import progress

        live = [k for k in range(len(self.actors)) if k not in self.dead]
        if not live:
            raise RuntimeError(f"ray: every actor of {self.name} has died")
        bounds = shard_bounds(n, len(live))
        pending: dict[Any, tuple[int, int]] = {}
        tries = [0] * len(bounds)

        def submit(i: int, k: int) -> None:
            ref = getattr(self.actors[k], method).remote(*args(*bounds[i]))
            pending[ref] = (i, k)

        for i in range(len(bounds)):
            submit(i, live[i])
        parts: list[list[Any]] = [[] for _ in bounds]
        bar = progress(total=n, desc=f"{desc} x{len(live)} actors", unit="seq", leave=False)
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i, k = pending.pop(done[0])
                try:
                    parts[i] = ray.get(done[0])
                except RayTaskError as err:  # the backend raised: show its own error
                    if isinstance(err.cause, UserError):
                        raise err.cause from None
                    raise
                except RayActorError as err:
                    # Ray already restarted and retried as configured; move the shard on
                    if isinstance(err, ActorDiedError):
                        self.dead.add(k)
                    live = [j for j in range(len(self.actors)) if j not in self.dead]
                    tries[i] += 1
                    if not live or tries[i] > len(self.actors) * (self.cfg.ray_max_restarts + 1):
                        msg = f"ray: shard {bounds[i]} of {desc} failed: {err}"
                        raise RuntimeError(msg) from err
                    log.warning("ray: actor %d lost (%s); shard %s moves on", k, err, bounds[i])
                    submit(i, live[(k + tries[i]) % len(live)])
                    continue
                bar.update(bounds[i][1] - bounds[i][0])
        finally:
            bar.close()
        return [x for part in parts for x in part]

    def generate(
        self, conversations: Sequence[Conversation], params: GenerationParams
    ) -> list[Generation]:
        """Complete every conversation, shards on all live actors; results in input order."""
        t0 = time.perf_counter()
        convs = list(conversations)
        if params.seed is None and params.temperature > 0:
            params = replace(params, seed=random.randrange(2**31 - 1))
        out: list[Generation] = self._run(
            "generate",
            len(convs),
            lambda a, b: (convs[a:b], params, a),
            f"generate {self.name}",
        )
        st = self.stats
        st.prompt_tokens += sum(g.prompt_tokens for g in out)
        st.completion_tokens += sum(g.completion_tokens for g in out)
        st.seconds += time.perf_counter() - t0
        st.calls += 1
        if st.seconds > 0:
            st.extra["completion_tokens_per_s"] = st.completion_tokens / st.seconds
        return out

    def choice_logprobs(
        self, prompts: Sequence[Conversation], choices: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """Log-probs of each prompt's choices, shards on all live actors; input order."""
        if len(prompts) != len(choices):
            raise ValueError("choice_logprobs: prompts and choices differ in length")
        t0 = time.perf_counter()
        ps, cs = list(prompts), [list(c) for c in choices]
        out: list[list[float]] = self._run(
            "choice_logprobs", len(ps), lambda a, b: (ps[a:b], cs[a:b]), f"score {self.name}"
        )
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        return out
