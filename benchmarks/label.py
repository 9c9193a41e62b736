"""AI-feedback labelling throughput: the naive loop against the ``label`` stage's labeller.

    flock /tmp/rlaif-heavy.lock .venv/bin/python benchmarks/label.py

SmolLM2-135M-Instruct (``rlaif models pull smollm2-135m``) labels the first ``--pairs`` human pairs
of ../shared/data/hh-rlhf under ``--principles`` principles of the bundled constitution, in both
orders (the paper's multiple-choice form, through the chat template, answers delimited). Each
variant runs in its own process (own peak RSS):

- ``naive``: one comparison, one order at a time, a fresh full forward per option (fp32);
  each variant first runs one short untimed warm-up forward;
- ``ours``: :class:`rlaif.labeler.Labeler` on the ``hf`` backend as the stage runs it (one backend
  call per pair: its orders and principles share the conversation's KV prefix), ``dtype=auto``
  (``--ours-dtype float32`` to compare at the naive loop's dtype);
- ``ours_flat``: the same, but all pairs in one backend call (length-sorted batches).

``--few-shot N`` puts the paper's first N solved comparisons (RLMadisonFewShotPrompts, written
with the same principle) in front of every question, as the stage does with ``label.few_shot``;
results then go to ``results/label-few-shot-N.json``.

A dual-order comparison is one pair under one principle, asked in both orders. Figures:
comparisons/s of each, ``speedup`` (ours over naive), ``max_abs_diff`` of the soft labels against
the naive ones and ``same_verdict`` (share of equal verdicts), peak RSS.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SHARED_DATA, in_child, report

VARIANTS = ("naive", "ours", "ours_flat")


def comparisons(n: int, k: int, seed: int = 0) -> list[Any]:
    from rlaif.constitution import load_constitution
    from rlaif.data.preferences import load_preferences
    from rlaif.labeler import Comparison, draw_principles

    prefs = load_preferences(SHARED_DATA / "hh-rlhf" / "harmless-base-dev.jsonl.gz", limit=n)
    principles = [(p.id, p.feedback) for p in load_constitution("default").principles]
    return [
        Comparison(p.prompt, p.chosen, p.rejected, draw_principles(principles, k, seed, p.id))
        for p in prefs
    ]


def _label_config(shots: int) -> Any:
    from rlaif.config import LabelConfig

    return LabelConfig(
        few_shot=shots,
        few_shot_file=str(SHARED_DATA / "cai-paper" / "RLMadisonFewShotPrompts.json"),
    )


def _naive(model_dir: str, n: int, k: int, shots: int) -> dict[str, Any]:
    """Per (pair, principle, order, option): render, tokenize, one full forward, sum log-probs."""
    import torch
    from tqdm import tqdm

    from rlaif import feedback as fb
    from rlaif.labeler import Labeler
    from rlaif.modelio import load_causal_lm

    comps = comparisons(n, k)
    model, tok = load_causal_lm(Path(model_dir), dtype=torch.float32)
    builder = Labeler.from_config(None, _label_config(shots), seed=0)  # type: ignore[arg-type]  # prompts only
    labels: list[float] = []
    with torch.inference_mode():  # warm-up: one forward, not timed
        model(torch.tensor([tok("Hello there", add_special_tokens=False)["input_ids"]]))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for comp in tqdm(comps, desc="naive", unit="pair"):
            per_principle = []
            for _, text in comp.principles:
                p_a = []
                for order in (0, 1):
                    conv = builder.mc_prompt(comp, text, order, cot=False)
                    prompt = str(
                        tok.apply_chat_template(conv, tokenize=False, continue_final_message=True)
                    )
                    ids = tok(prompt, add_special_tokens=False)["input_ids"]
                    lps = []
                    for choice in fb.CHOICES:
                        full = tok(prompt + choice, add_special_tokens=False)["input_ids"]
                        opt = full[len(ids) :]
                        logits = model(torch.tensor([full])).logits[0].float()
                        logp = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)
                        lps.append(float(logp.gather(1, torch.tensor(opt)[:, None]).sum()))
                    p_a.append(fb.normalise(lps[0], lps[1]))
                per_principle.append(fb.dual_order(p_a[0], p_a[1]))
            labels.append(fb.ensemble(per_principle))
    secs = time.perf_counter() - t0
    return {"seconds": secs, "comparisons_s": n * k / secs, "labels": labels}


def _ours(
    model_dir: str,
    n: int,
    k: int,
    shots: int,
    per_pair: bool,
    dtype: Literal["auto", "float32", "bfloat16", "float16"],
) -> dict[str, Any]:
    from rlaif.backends.hf import HFLM
    from rlaif.config import BackendConfig
    from rlaif.labeler import Labeler

    comps = comparisons(n, k)
    lm = HFLM(model_dir, BackendConfig(dtype=dtype))
    labeler = Labeler.from_config(lm, _label_config(shots), seed=0, per_pair_calls=per_pair)
    lm.choice_logprobs(["Hello there"], [[" (A)", " (B)"]])  # warm-up, not timed
    t0 = time.perf_counter()
    out = labeler.compare(comps, [(0, 1)] * len(comps))
    secs = time.perf_counter() - t0
    return {
        "seconds": secs,
        "comparisons_s": n * k / secs,
        "labels": [o["p"] for o in out],
        "dtype": str(lm.dtype).removeprefix("torch."),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--principles", type=int, default=2)
    ap.add_argument(
        "--few-shot", type=int, default=0, help="the paper's solved comparisons put in front"
    )
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--ours-dtype",
        default="auto",
        help="backend.dtype of ours (auto: the start-up probe's pick, as the stage runs it)",
    )
    args = ap.parse_args()
    from rlaif.models import resolve_model

    model_dir = str(resolve_model(args.model, pull=False))
    variants = [v for v in args.variants.split(",") if v]
    res: dict[str, dict[str, Any]] = {}
    for v in variants:
        if v == "naive":
            res[v] = in_child(_naive, model_dir, args.pairs, args.principles, args.few_shot)
        elif v in ("ours", "ours_flat"):
            res[v] = in_child(
                _ours,
                model_dir, args.pairs, args.principles, args.few_shot, v == "ours", args.ours_dtype,
            )  # fmt: skip
        else:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        print(
            f"{v}: {res[v]['comparisons_s']:.3f} comparisons/s, {res[v]['seconds']:.1f} s, "
            f"peak RSS {res[v]['peak_rss_mb']:.0f} MiB",
            file=sys.stderr,
        )
    figures: dict[str, Any] = {
        "model": args.model,
        "pairs": args.pairs,
        "principles": args.principles,
        "few_shot": args.few_shot,
    }
    for v, r in res.items():
        figures[f"{v}_comparisons_s"] = round(r["comparisons_s"], 3)
        figures[f"{v}_peak_rss_mb"] = r["peak_rss_mb"]
    if "naive" in res and "ours" in res:
        a, b = res["naive"]["labels"], res["ours"]["labels"]
        figures["speedup"] = round(res["ours"]["comparisons_s"] / res["naive"]["comparisons_s"], 2)
        figures["max_abs_diff"] = round(max(abs(x - y) for x, y in zip(a, b, strict=True)), 5)
        figures["same_verdict"] = round(
            sum((x > 0.5) == (y > 0.5) for x, y in zip(a, b, strict=True)) / len(a), 4
        )
        figures["ours_dtype"] = res["ours"]["dtype"]
    name = "label" if args.few_shot == 0 else f"label-few-shot-{args.few_shot}"
    report(name, figures, {v: {k: r[k] for k in r if k != "labels"} for v, r in res.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
