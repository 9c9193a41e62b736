"""Started by tests/test_distributed.py under `accelerate launch` (2 CPU processes): PPO's NaN guard
when only ONE rank sees the bad value. Every rank must stop at the same step with the same message
(a rank that went on alone would wait forever in the next collective).

Usage: ``dist_ppo_worker.py MODEL_DIR OUT_DIR``; each rank writes ``OUT_DIR/rank<R>.json``:
``{"reward": message, "loss": message}`` (the TrainingDiverged message, or "finished").
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any


def poison_at(loss_fn: Any, call: int) -> Any:
    """``loss_fn`` whose ``call``-th call returns an infinite loss."""
    calls = {"n": 0}

    def poisoned(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        loss, st = loss_fn(*args, **kw)
        return (loss * math.inf if calls["n"] == call else loss), st

    return poisoned


def run(model_dir: Path, out: Path) -> tuple[int, dict[str, str]]:
    from rlaif.distributed import setup
    from rlaif.errors import TrainingDiverged
    from rlaif.stages import ppo_loop
    from tests.test_ppo import SMALL, TargetTokenReward, prompts, tiny_models

    dist, _ = setup("cpu")
    pc = replace(SMALL, rollout_batch_size=2, batch_size=1)  # SMALL's global batch on 2 ranks
    real_loss = ppo_loop.ppo_policy_loss
    results: dict[str, str] = {}
    for where in ("reward", "loss"):
        models = tiny_models(model_dir)
        if dist.rank == 1 and where == "reward":  # the third PM call is step 3's
            models.scorer = TargetTokenReward(models.tokenizer, fail_at_call=3, fail="nan")
        # 2 epochs x 2 micro-batches per step: call 9 is the first of step 3
        bad_loss = dist.rank == 1 and where == "loss"
        ppo_loop.ppo_policy_loss = poison_at(real_loss, 9) if bad_loss else real_loss
        try:
            ppo_loop.train(
                models, prompts(), pc, seed=0, ckpt_root=out / where / "ck",
                metrics_path=out / where / "m.jsonl", dist=dist,
            )  # fmt: skip
            results[where] = "finished"
        except TrainingDiverged as exc:
            results[where] = str(exc)
        dist.release()
    ppo_loop.ppo_policy_loss = real_loss
    return dist.rank, results


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    out_dir = Path(sys.argv[2])
    rank, res = run(Path(sys.argv[1]), out_dir)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res))
