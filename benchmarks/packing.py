"""PPO's forwards with the batch packed (real tokens only) against the padded batch.

    flock /tmp/rlaif-heavy.lock .venv/bin/python benchmarks/packing.py

One process, the default model (SmolLM2-135M) as policy and as value function (a PM on the same
backbone), 8 real red-team prompts (hh-rlhf harmless-base, chat template, left-padded) and
answers of three length mixes: all at the limit (what `benchmarks/ppo.py`'s episodes look like),
12-48 tokens, and 12-128 tokens. For each mix, the policy's and the value function's forward +
backward (the update) and their no-grad forwards (the rollouts) are timed in turns, packed then
padded, ``--reps`` times; best and median are reported. The padded side is the same code with
packing switched off, the way TRL's PPO (and ours before) run these forwards. Answer tokens are
random: the arithmetic does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SHARED_DATA, report

MIXES = {
    "full48": (48, [48] * 8),
    "mixed48": (48, [48, 40, 30, 48, 20, 48, 35, 12]),
    "mixed128": (128, [128, 60, 30, 90, 20, 128, 45, 12]),
}


def _episodes(tok: Any, width: int, lengths: list[int]) -> Any:
    import torch

    from rlaif.data.prompts import load_prompts
    from rlaif.rl.rollout import Samples

    items = load_prompts(
        SHARED_DATA / "hh-rlhf" / "harmless-base-dev.jsonl.gz",
        first_turn_only=True,
        shuffle=False,
        limit=len(lengths),
    )
    texts = [
        tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
        for p in items
    ]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    plen = max(map(len, ids))
    q = torch.zeros(len(ids), plen, dtype=torch.long)
    qm = torch.zeros_like(q)
    for i, x in enumerate(ids):
        q[i, plen - len(x) :] = torch.tensor(x)
        qm[i, plen - len(x) :] = 1
    gen = torch.Generator().manual_seed(0)
    r = torch.randint(100, tok.vocab_size - 1, (len(ids), width), generator=gen)
    rm = torch.zeros_like(r)
    for i, n in enumerate(lengths):
        rm[i, :n] = 1
    return Samples(q, qm, r * rm, rm, torch.zeros(len(ids), dtype=torch.bool))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()

    import torch

    from rlaif import heap
    from rlaif.attention import use_short_attention
    from rlaif.config import BackendConfig
    from rlaif.modelio import load_causal_lm
    from rlaif.models import resolve_model
    from rlaif.pm import new_pm
    from rlaif.stages import ppo_loop

    heap.configure(BackendConfig().heap)
    model_dir = resolve_model(a.model, pull=False)
    policy, tok = load_causal_lm(model_dir)
    value = new_pm(model_dir, seed=0)
    use_short_attention(policy)
    use_short_attention(value)
    packs = ppo_loop.packs

    def update(s: Any) -> None:
        ppo_loop.policy_logprobs(policy, s, 0.7, True)[0].sum().backward()
        ppo_loop.value_estimates(value, s).sum().backward()
        policy.zero_grad(set_to_none=True)
        value.zero_grad(set_to_none=True)

    @torch.no_grad()
    def rollout(s: Any) -> None:
        ppo_loop.policy_logprobs(policy, s, 0.7)
        ppo_loop.value_estimates(value, s)

    figures: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for name, (width, lengths) in MIXES.items():
        s = _episodes(tok, width, lengths)
        real, total = int(s.attention_mask.sum()), s.attention_mask.numel()
        times: dict[str, list[float]] = {}
        for rep in range(a.reps + 1):  # the first round warms up and is not counted
            for side in ("packed", "padded"):
                ppo_loop.packs = packs if side == "packed" else (lambda m: False)  # type: ignore[assignment]
                for phase, fn in (("update", update), ("rollout", rollout)):
                    t0 = time.perf_counter()
                    fn(s)
                    if rep:
                        times.setdefault(f"{phase}_{side}", []).append(time.perf_counter() - t0)
        ppo_loop.packs = packs  # type: ignore[assignment]
        best = {k: min(v) for k, v in times.items()}
        details[name] = {
            "real_tokens": real,
            "padded_tokens": total,
            "best_s": best,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
        }
        for phase in ("update", "rollout"):
            speed = best[f"{phase}_padded"] / best[f"{phase}_packed"]
            figures[f"{phase}_speedup_{name}"] = round(speed, 3)
        figures[f"fill_{name}"] = round(real / total, 3)
        print(name, details[name], flush=True)
    report("packing", figures, details)


if __name__ == "__main__":
    main()
