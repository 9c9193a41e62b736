"""Helpers shared by the benchmarks: peak RSS, timing, isolated child processes, the RESULT line.

Every benchmark ends with one line ``RESULT <name> key=value ...`` and writes the same figures as
JSON to ``benchmarks/results/<name>.json``. Run them under the shared lock so timings are clean:
``flock /tmp/rlaif-heavy.lock .venv/bin/python benchmarks/<name>.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """``with timer() as t: ...`` then ``t["s"]`` holds the elapsed seconds."""
    box: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - t0


def in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh (spawned) process and return its dict, plus its peak RSS.

    A fresh process per variant keeps each variant's peak memory its own and its warm caches
    from helping the next one. ``fn`` must be importable (defined at module level).
    """
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_with_rss, fn, *args).result()


def _with_rss(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    out = fn(*args)
    out.setdefault("peak_rss_mb", round(peak_rss_mb(), 1))
    return out


def machine() -> dict[str, Any]:
    """A short description of the machine the figures come from."""
    import os

    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["isa"] = sorted(f for f in flags if f.startswith(("avx", "amx")))
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v).replace(" ", "_")


def report(name: str, figures: dict[str, Any], details: dict[str, Any] | None = None) -> Path:
    """Write ``figures`` (+ ``details``) to results/<name>.json and print the RESULT line last."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "name": name,
        "figures": figures,
        "details": details or {},
        "machine": machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"RESULT {name} " + " ".join(f"{k}={_fmt(v)}" for k, v in figures.items()), flush=True)
    return path


def prompt_tokens(model_dir: str, prompts: list[Any]) -> int:
    """Prompt tokens as every variant feeds them (chat template, no extra special tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    return sum(len(tok(str(t), add_special_tokens=False)["input_ids"]) for t in texts)
