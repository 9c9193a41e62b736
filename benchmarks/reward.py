"""Preference-model training: ours (`rlaif.stages.reward_train`) vs TRL's RewardTrainer.

Same model (SmolLM2-135M-Instruct from the rlaif cache), same hh-rlhf pairs (hard labels, only pairs
whose two conversations fit in ``--max-length`` tokens, since TRL drops longer ones), batch 8,
one epoch over ``--steps * 8`` pairs, lr 1e-5, fp32 weights. Each side runs in its own fresh
process, so peak RSS is its own. TRL runs as configured in the issue: fp32, gradient checkpointing
off. Ours: chosen + rejected in one forward pass, length-bucketed batches, bf16 autocast where the
start-up probe finds it faster (``--dtype`` to force).

    flock /tmp/rlaif-heavy.lock .venv/bin/python benchmarks/reward.py --steps 5

Prints ``RESULT reward pairs_per_s_ours=... pairs_per_s_trl=... speedup=... rss_ratio=...``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, in_child, report


def load_pairs(model_dir: str, n: int, max_length: int) -> list[dict[str, Any]]:
    """The first ``n`` hh-rlhf dev pairs whose chosen and rejected both fit in ``max_length``."""
    from transformers import AutoTokenizer

    from rlaif.data.preferences import parse_preference

    tok = AutoTokenizer.from_pretrained(model_dir)
    out: list[dict[str, Any]] = []
    path = SHARED_DATA / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            p = parse_preference(json.loads(line), f"{path}:{i}").to_json()
            lens = [
                len(tok.apply_chat_template([*p["prompt"], {"role": "assistant", "content": a}]))
                for a in (p["chosen"], p["rejected"])
            ]
            if max(lens) <= max_length - 8:
                out.append(p)
            if len(out) >= n:
                break
    return out


def run_ours(
    model_dir: str,
    pairs: list[dict[str, Any]],
    max_length: int,
    dtype: Literal["auto", "float32", "bfloat16"],
) -> dict[str, Any]:
    import dataclasses

    import torch

    from rlaif.config import RewardConfig
    from rlaif.stages.reward_train import train_pm
    from rlaif.train_common import autocast_dtype

    cfg = dataclasses.replace(
        RewardConfig(), batch_size=8, max_length=max_length, lr=1e-5, warmup_ratio=0.0,
        dtype=dtype, save_every=10**9, epochs=1.0,
    )  # fmt: skip
    amp = autocast_dtype(cfg, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.jsonl"
        t0 = time.perf_counter()
        _, stats = train_pm(
            Path(model_dir), pairs, cfg, loss_kind="ranking", phase="bench",
            ckpt_root=Path(tmp) / "ckpt", metrics_path=metrics,
        )  # fmt: skip
        total = time.perf_counter() - t0
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    train_s = len(pairs) / rows[-1]["pairs_per_s"]  # the loop's own clock: steps only
    return {
        "pairs_per_s": len(pairs) / train_s,
        "train_s": train_s,
        "total_s": total,
        "losses": [r["loss"] for r in rows],
        "tokens_per_s": rows[-1]["tokens_per_s"],
        "autocast": str(amp).replace("torch.", "") if amp else "none",
        "threads": torch.get_num_threads(),
        "steps": stats["steps"],
    }


def run_trl(model_dir: str, pairs: list[dict[str, Any]], max_length: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    class Clock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.begin: float | None = None
            self.end = 0.0
            self.losses: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.begin is None:
                self.begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.end = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tok.pad_token_id
    data = Dataset.from_list(
        [
            {
                "prompt": p["prompt"],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
            for p in pairs
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        args = RewardConfig(
            output_dir=tmp, per_device_train_batch_size=8, max_length=max_length,
            learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0, num_train_epochs=1,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
            gradient_checkpointing=False, bf16=False, fp16=False, seed=0,
        )  # fmt: skip
        clock = Clock()
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[clock]
        )
        trainer.train()
    assert clock.begin is not None
    train_s = clock.end - clock.begin
    return {
        "pairs_per_s": len(pairs) / train_s,
        "train_s": train_s,
        "total_s": time.perf_counter() - t0,
        "losses": clock.losses,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps of 8 pairs (one epoch)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--skip-trl", action="store_true", help="only time ours")
    args = ap.parse_args()

    from rlaif.models import resolve_model

    model_dir = str(resolve_model(args.model, pull=False))
    pairs = load_pairs(model_dir, args.steps * 8, args.max_length)
    ours = in_child(run_ours, model_dir, pairs, args.max_length, args.dtype)
    print(f"ours: {json.dumps(ours)}", flush=True)
    figures: dict[str, Any] = {
        "pairs": len(pairs),
        "pairs_per_s_ours": round(ours["pairs_per_s"], 3),
        "rss_ours_mb": ours["peak_rss_mb"],
        "autocast_ours": ours["autocast"],
    }
    details: dict[str, Any] = {"ours": ours, "model": model_dir, "max_length": args.max_length}
    if not args.skip_trl:
        trl = in_child(run_trl, model_dir, pairs, args.max_length)
        print(f"trl: {json.dumps(trl)}", flush=True)
        details["trl"] = trl
        mean_ours = sum(ours["losses"]) / len(ours["losses"])
        mean_trl = sum(trl["losses"]) / len(trl["losses"])
        figures.update(
            pairs_per_s_trl=round(trl["pairs_per_s"], 3),
            rss_trl_mb=trl["peak_rss_mb"],
            speedup=round(ours["pairs_per_s"] / trl["pairs_per_s"], 2),
            rss_ratio=round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 3),
            mean_loss_ours=round(mean_ours, 4),
            mean_loss_trl=round(mean_trl, 4),
        )
    report("reward", figures, details)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
