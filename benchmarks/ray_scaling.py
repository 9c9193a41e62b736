"""Generation throughput with ``backend.executor: ray``: 1 actor against 2 actors.

    flock /tmp/rlaif-heavy.lock .venv/bin/python benchmarks/ray_scaling.py

SmolLM2-135M-Instruct, prompts from ../shared/data/hh-rlhf (the dialogue up to the last Human
turn, through the chat template), greedy, one ``generate`` call over all of them, after a short
warm-up call. Each variant runs in its own process with its own local Ray (``num_cpus`` = this
machine's cores), so the CPUs are split the same way a real run would split them:

- ``local``: the ``hf`` backend in the driver, torch with every core (no Ray);
- ``ray1``: one actor with ``ray_cpus_per_actor`` = all cores (one replica, that many threads);
- ``ray2``: two actors with half the cores each (two replicas, each half the threads).

Figures per variant: prompts/s and new tokens/s of the timed call, the actors' start-up seconds
(Ray start + model load, paid once per stage), and ``same_outputs`` (share of texts equal to
``local``'s).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import in_child, report
from generation import load_prompts

VARIANTS = ("local", "ray1", "ray2")


def run_variant(
    name: str, model_dir: str, prompts: list[Any], new: int, batch: int, dtype: str
) -> dict[str, Any]:
    """One variant in this (fresh) process: start, warm up, then time one ``generate`` call."""
    from rlaif.backends import make_lm
    from rlaif.backends.base import GenerationParams
    from rlaif.config import BackendConfig

    cpus = os.cpu_count() or 1
    actors = {"local": 0, "ray1": 1, "ray2": 2}[name]
    cfg = BackendConfig(
        dtype=dtype,  # type: ignore[arg-type]
        max_batch_size=batch,
        max_batch_tokens=1 << 20,
        executor="ray" if actors else "local",
        ray_actors=max(1, actors),
        ray_cpus_per_actor=cpus / max(1, actors),
    )
    t0 = time.perf_counter()
    if actors:
        import ray

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    lm = make_lm(model_dir, cfg)
    params = GenerationParams(max_new_tokens=new, temperature=0.0)
    lm.generate(prompts[: max(2, actors)], GenerationParams(max_new_tokens=4))  # warm-up
    start_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    gens = lm.generate(prompts, params)
    secs = time.perf_counter() - t1
    if actors:
        import ray

        ray.shutdown()
    new_tokens = sum(g.completion_tokens for g in gens)
    return {
        "texts": [g.text for g in gens],
        "seconds": secs,
        "start_s": start_s,
        "new_tokens": new_tokens,
        "prompts_s": len(prompts) / secs,
        "tok_s": new_tokens / secs,
        "actors": actors,
        "threads_per_replica": cpus // max(1, actors),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="max_batch_size of each replica")
    ap.add_argument("--dtype", default="float32", help="one dtype for every variant")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)

    from rlaif.models import resolve_model

    model_dir = str(resolve_model(args.model))
    prompts = load_prompts(args.prompts)
    results: dict[str, dict[str, Any]] = {}
    for name in args.variants.split(","):
        r = in_child(run_variant, name, model_dir, prompts, args.new_tokens, args.batch, args.dtype)
        results[name] = r
        print(
            f"{name}: {len(prompts)} prompts, {r['new_tokens']} new tokens in "
            f"{r['seconds']:.1f} s = {r['prompts_s']:.2f} prompts/s, {r['tok_s']:.1f} tok/s "
            f"(start-up {r['start_s']:.1f} s)",
            flush=True,
        )
    figures: dict[str, Any] = {}
    base = results.get("local")
    for name, r in results.items():
        figures[f"{name}_prompts_s"] = round(r["prompts_s"], 3)
        figures[f"{name}_tok_s"] = round(r["tok_s"], 1)
        figures[f"{name}_start_s"] = round(r["start_s"], 1)
        if base is not None and name != "local":
            same = sum(a == b for a, b in zip(r["texts"], base["texts"], strict=True))
            figures[f"{name}_same_outputs"] = round(same / len(prompts), 3)
    if "ray1" in results and "ray2" in results:
        figures["ray2_over_ray1"] = round(results["ray2"]["tok_s"] / results["ray1"]["tok_s"], 2)
    details = {
        "model": args.model,
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "dtype": args.dtype,
        "variants": {n: {k: v for k, v in r.items() if k != "texts"} for n, r in results.items()},
    }
    report("ray_scaling", figures, details)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
