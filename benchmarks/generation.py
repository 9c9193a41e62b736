"""Greedy generation throughput: the naive per-prompt loop against the ``hf`` backend.

    flock /tmp/rlaif-heavy.lock .venv/bin/python benchmarks/generation.py

SmolLM2-135M-Instruct (``rlaif models pull smollm2-135m``), 64 prompts from
../shared/data/hh-rlhf (the dialogue up to the last Human turn, through the chat template),
128 new tokens, greedy. Each variant runs in its own process (own peak RSS, no shared warm-up):

- ``naive``: ``model.generate`` one prompt at a time, fp32 (the baseline);
- ``hf_generate``: ``model.generate`` on length-sorted left-padded batches of 32, fp32;
- ``ours``: the ``hf`` backend with ``dtype=auto`` (the probe's pick), freed memory kept in the
  heap (``heap: keep``) as every ``rlaif`` command sets it;
- ``ours_fp32``: the ``hf`` backend forced to fp32.

Figures: new tokens/s of each, ``speedup`` (ours over naive), ``same_outputs`` (share of the
greedy texts identical to the naive ones), peak RSS, and the share of the roofline reached
(roofline tok/s = the fastest dtype's peak matmul GFLOP/s / (2 x parameters) GFLOP per token).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SHARED_DATA, in_child, prompt_tokens, report

VARIANTS = ("naive", "hf_generate", "ours", "ours_fp32")


def load_prompts(n: int) -> list[list[dict[str, str]]]:
    from rlaif.data.hh import prompt_messages

    path = SHARED_DATA / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    out: list[list[dict[str, str]]] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            out.append(prompt_messages(json.loads(line)["chosen"]))
            if len(out) == n:
                break
    return out


def _hf_generate(model_dir: str, prompts: list[Any], new: int, batch: int) -> dict[str, Any]:
    """``model.generate`` in fp32: one prompt at a time (batch 1) or left-padded batches."""
    import torch
    from tqdm import tqdm

    from rlaif.modelio import load_causal_lm

    model, tok = load_causal_lm(Path(model_dir), dtype=torch.float32)
    tok.padding_side = "left"
    texts = [
        str(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)) for p in prompts
    ]
    order = sorted(range(len(texts)), key=lambda i: -len(tok(texts[i])["input_ids"]))
    outs: list[str] = [""] * len(texts)
    n_new = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in tqdm(range(0, len(order), batch), desc=f"generate batch={batch}", disable=None):
            idx = order[s : s + batch]
            enc = tok(
                [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
            )
            gen = model.generate(
                **enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id
            )
            for row, i in enumerate(idx):
                new_ids = gen[row, enc["input_ids"].shape[1] :].tolist()
                eos = model.generation_config.eos_token_id
                eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
                cut = next((k + 1 for k, t in enumerate(new_ids) if t in eos_ids), len(new_ids))
                n_new += cut
                outs[i] = tok.decode(new_ids[:cut], skip_special_tokens=True)
    return {"texts": outs, "new_tokens": n_new, "seconds": time.perf_counter() - t0}


def _ours(model_dir: str, prompts: list[Any], new: int, dtype: str, batch: int) -> dict[str, Any]:
    from rlaif import heap
    from rlaif.backends.base import GenerationParams
    from rlaif.backends.hf import HFLM
    from rlaif.config import BackendConfig

    cfg = BackendConfig(dtype=dtype, max_batch_size=batch, max_batch_tokens=1 << 20)  # type: ignore[arg-type]
    heap.configure(cfg.heap)  # as every `rlaif` command does (docs/backends.md, "heap")
    lm = HFLM(model_dir, cfg)
    t0 = time.perf_counter()
    gens = lm.generate(prompts, GenerationParams(max_new_tokens=new, temperature=0.0))
    secs = time.perf_counter() - t0
    return {
        "texts": [g.text for g in gens],
        "new_tokens": sum(g.completion_tokens for g in gens),
        "seconds": secs,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "backend_stats": dict(lm.stats.extra),
    }


def run_variant(
    name: str, model_dir: str, prompts: list[Any], new: int, batch: int
) -> dict[str, Any]:
    if name == "naive":
        return _hf_generate(model_dir, prompts, new, 1)
    if name == "hf_generate":
        return _hf_generate(model_dir, prompts, new, 32)
    if name == "ours":
        return _ours(model_dir, prompts, new, "auto", batch)
    if name == "ours_fp32":
        return _ours(model_dir, prompts, new, "float32", batch)
    raise ValueError(name)


def fp32_floor_s(model_dir: str, n_prompt: int, n_new: int, fp32_gflops: float) -> float:
    """Seconds the weight matmuls alone take at the fp32 roofline: a lower bound for any exact
    (fp32) generation of these tokens. A prompt token costs 2 x the non-embedding parameters
    (no logits), a new token 2 x all of them (the LM head included); attention is left out."""
    import json as _json

    cfg = _json.loads((Path(model_dir) / "config.json").read_text())
    total = param_count(model_dir)
    embed = int(cfg["vocab_size"]) * int(cfg["hidden_size"])  # = the LM head's matmul size
    body = total - embed - (0 if cfg.get("tie_word_embeddings") else embed)
    flop = 2 * body * n_prompt + 2 * (body + embed) * n_new
    return flop / (fp32_gflops * 1e9)


def param_count(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                total += _numel(st, k)
    return total


def _numel(st: Any, key: str) -> int:
    n = 1
    for d in st.get_slice(key).get_shape():
        n *= int(d)
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64, help="max_batch_size of our backend")
    ap.add_argument("--variants", default="naive,hf_generate,ours,ours_fp32")
    ap.add_argument("--name", default="generation", help="results/<name>.json and RESULT name")
    ap.add_argument(
        "--naive-cache",
        default="",
        help="reuse naive results from this JSON (development only; written if absent)",
    )
    args = ap.parse_args(argv)

    from rlaif.models import resolve_model

    model_dir = str(resolve_model(args.model))
    prompts = load_prompts(args.prompts)
    results: dict[str, dict[str, Any]] = {}
    for name in args.variants.split(","):
        cache = Path(args.naive_cache) if name == "naive" and args.naive_cache else None
        if cache and cache.is_file():
            results[name] = json.loads(cache.read_text())
        else:
            results[name] = in_child(
                run_variant, name, model_dir, prompts, args.new_tokens, args.batch
            )
            if cache:
                cache.write_text(json.dumps(results[name]))
        r = results[name]
        r["tok_s"] = r["new_tokens"] / r["seconds"]
        print(
            f"{name}: {r['new_tokens']} new tokens in {r['seconds']:.1f} s = "
            f"{r['tok_s']:.1f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MiB",
            flush=True,
        )

    from roofline import load_or_measure

    roof = load_or_measure()
    gflop_per_token = 2 * param_count(model_dir) / 1e9
    roof_tok_s = max(roof["fp32_gflops"], roof["bf16_gflops"]) / gflop_per_token
    base = results.get("naive")
    figures: dict[str, Any] = {}
    for name, r in results.items():
        figures[f"{name}_tok_s"] = round(r["tok_s"], 1)
    for name, r in results.items():
        if base is not None and name != "naive":
            same = sum(a == b for a, b in zip(r["texts"], base["texts"], strict=True))
            figures[f"{name}_speedup"] = round(r["tok_s"] / base["tok_s"], 2)
            figures[f"{name}_same_outputs"] = round(same / len(base["texts"]), 3)
    main_name = "ours" if "ours" in results else next(iter(results))
    if f"{main_name}_speedup" in figures:
        figures["speedup"] = figures[f"{main_name}_speedup"]
        figures["same_outputs"] = figures[f"{main_name}_same_outputs"]
    figures["dtype"] = results[main_name].get("dtype", "float32")
    figures["peak_rss_mb"] = round(results[main_name]["peak_rss_mb"], 0)
    figures["roofline_tok_s"] = round(roof_tok_s, 0)
    if base is not None:
        n_prompt = prompt_tokens(model_dir, prompts)
        floor = fp32_floor_s(model_dir, n_prompt, base["new_tokens"], roof["fp32_gflops"])
        figures["fp32_floor_s"] = round(floor, 1)
        figures["fp32_max_speedup"] = round(base["seconds"] / floor, 1)
        figures["prompt_tokens"] = n_prompt
    figures["roofline_share"] = round(results[main_name]["tok_s"] / roof_tok_s, 3)
    details = {
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "gflop_per_token": gflop_per_token,
        "roofline": {k: roof[k] for k in ("fp32_gflops", "bf16_gflops", "mem_gbps")},
        "variants": {n: {k: v for k, v in r.items() if k != "texts"} for n, r in results.items()},
    }
    report(args.name, figures, details)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
