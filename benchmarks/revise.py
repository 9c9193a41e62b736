"""Stage 1 (`rlaif revise`) against a naive per-prompt sequential loop.

Both sides run the same critique -> revision loop (same model, prompts, principles, rounds, few-shot
examples, greedy decoding, stop strings) from :func:`rlaif.stages.revise.revise_chunk`:

- ``stage``: the real ``rlaif revise`` stage (``revise.run``), every step one batched call over all
  prompts on the ``hf`` backend (its dtype probe, shared-prefix KV cache, own decode loop);
- ``naive``: one prompt at a time, each step a ``model.generate`` call in fp32 with batch 1 and
  transformers' own ``stop_strings``.

Each side runs in a fresh process (its own peak RSS). The naive side may run on the first
``--naive-prompts`` prompts only: it is sequential, so its prompts/s does not depend on how many.

    flock /tmp/rlaif-heavy.lock .venv/bin/python benchmarks/revise.py [--prompts 32 --rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, in_child, report

PROMPTS = str(ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz")


def _overrides(args: dict[str, Any], run_dir: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"model={args['model']}",
        f"revise.prompts={PROMPTS}",
        "revise.first_turn_only=true",
        f"revise.limit={args['prompts']}",
        f"revise.rounds={args['rounds']}",
        f"revise.few_shot={args['few_shot']}",
        f"revise.max_new_tokens={args['max_new_tokens']}",
        f"revise.chunk_size={args['prompts']}",
        "revise.temperature=0",
        "revise.helpful_prompts=",
    ]


class NaiveLM:
    """``model.generate`` per conversation, fp32, batch 1 (the LM protocol, no batching)."""

    def __init__(self, model_dir: Path) -> None:
        import torch

        from rlaif.backends.base import BackendStats
        from rlaif.modelio import load_causal_lm

        self.model, self.tok = load_causal_lm(model_dir, dtype=torch.float32)
        self.name = model_dir.name
        self.stats = BackendStats()

    def generate(self, conversations: Sequence[Any], params: Any) -> list[Any]:
        import torch

        from rlaif.backends.base import Generation

        out = []
        for conv in conversations:
            cont = not isinstance(conv, str) and conv[-1]["role"] == "assistant"
            text = (
                conv
                if isinstance(conv, str)
                else self.tok.apply_chat_template(
                    conv,
                    tokenize=False,
                    add_generation_prompt=not cont,
                    continue_final_message=cont,
                )
            )
            enc = self.tok(text, return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                gen = self.model.generate(
                    **enc,
                    max_new_tokens=params.max_new_tokens,
                    do_sample=False,
                    stop_strings=list(params.stop),
                    tokenizer=self.tok,
                    pad_token_id=self.tok.pad_token_id,
                )
            new = gen[0, enc["input_ids"].shape[1] :].tolist()
            reply = self.tok.decode(new, skip_special_tokens=True)
            cuts = [k for k in (reply.find(s) for s in params.stop) if k >= 0]
            reply = reply[: min(cuts)] if cuts else reply
            self.stats.completion_tokens += len(new)
            out.append(Generation(reply, enc["input_ids"].shape[1], len(new)))
        return out

    def choice_logprobs(self, prompts: Any, choices: Any) -> list[list[float]]:
        raise NotImplementedError


def run_stage(args: dict[str, Any]) -> dict[str, Any]:
    from rlaif.config import load_config
    from rlaif.stages import revise

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, _overrides(args, tmp))
        t0 = time.perf_counter()
        lm = revise._make_lm(cfg)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = revise.run(cfg, lm=lm)
        secs = time.perf_counter() - t0
        import json

        recs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    return {
        "prompts": len(recs),
        "seconds": secs,
        "load_s": load_s,
        "new_tokens": lm.stats.completion_tokens,
        "dtype": str(getattr(lm, "dtype", "")).removeprefix("torch."),
        "finals": {r["id"]: r["final"] for r in recs},
    }


def run_naive(args: dict[str, Any]) -> dict[str, Any]:
    from rlaif.config import load_config
    from rlaif.constitution import load_constitution
    from rlaif.data.prompts import load_prompts
    from rlaif.models import resolve_model
    from rlaif.stages.revise import Settings, revise_chunk

    cfg = load_config(None, _overrides(args, "unused"))
    rc = cfg.revise
    items = load_prompts(rc.prompts, first_turn_only=True, limit=rc.limit, seed=cfg.seed)
    items = items[: args["naive_prompts"]]
    lm = NaiveLM(resolve_model(cfg.model))
    st = Settings(rc.rounds, rc.few_shot, rc.max_new_tokens, 0.0, 1.0, "chat", cfg.seed)
    constitution = load_constitution(cfg.constitution)
    finals = {}
    t0 = time.perf_counter()
    from tqdm import tqdm

    for item in tqdm(items, desc="naive", unit="prompt"):
        rec = revise_chunk(lm, [item], constitution, st, chunk_seed=0)[0]  # type: ignore[arg-type]
        finals[rec["id"]] = rec["final"]
    return {
        "prompts": len(items),
        "seconds": time.perf_counter() - t0,
        "new_tokens": lm.stats.completion_tokens,
        "finals": finals,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--few-shot", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--naive-prompts", type=int, default=0, help="naive side on this many (0: all)")
    ns = ap.parse_args(argv)
    args = {k: v for k, v in vars(ns).items()}
    args["naive_prompts"] = ns.naive_prompts or ns.prompts
    stage = in_child(run_stage, args)
    naive = in_child(run_naive, args)
    stage_ps = stage["prompts"] / stage["seconds"]
    naive_ps = naive["prompts"] / naive["seconds"]
    same = [pid for pid in naive["finals"] if naive["finals"][pid] == stage["finals"].get(pid)]
    figures = {
        "model": ns.model,
        "prompts": ns.prompts,
        "rounds": ns.rounds,
        "max_new_tokens": ns.max_new_tokens,
        "stage_prompts_s": round(stage_ps, 4),
        "naive_prompts_s": round(naive_ps, 4),
        "speedup": round(stage_ps / naive_ps, 2),
        "stage_tok_s": round(stage["new_tokens"] / stage["seconds"], 1),
        "naive_tok_s": round(naive["new_tokens"] / naive["seconds"], 1),
        "stage_peak_rss_mb": stage["peak_rss_mb"],
        "naive_peak_rss_mb": naive["peak_rss_mb"],
    }
    details = {
        "stage": {k: v for k, v in stage.items() if k != "finals"},
        "naive": {k: v for k, v in naive.items() if k != "finals"},
        "naive_prompts": naive["prompts"],
        "same_final_text": f"{len(same)}/{len(naive['finals'])}",
        "few_shot": ns.few_shot,
    }
    report("revise", figures, details)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
