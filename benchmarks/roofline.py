"""This machine's ceilings: peak fp32 and bf16 matmul GFLOP/s and memory bandwidth GB/s.

    flock /tmp/rlaif-heavy.lock .venv/bin/python benchmarks/roofline.py

Matmul: square and decode-shaped products (best of several reps per shape, best shape wins).
Bandwidth: a copy of a 256 MiB buffer (read + write counted) and a sum over it (read only);
the better of the two is reported. Other benchmarks (generation.py) divide their throughput by
these figures.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, report

SHAPES = [(1024, 1024, 1024), (2048, 2048, 2048), (256, 2048, 2048), (64, 576, 1536)]


def matmul_gflops(dtype: Any, reps: int = 5) -> dict[str, float]:
    """Best GFLOP/s per shape ``m x k x n`` for ``dtype``."""
    import torch

    out: dict[str, float] = {}
    for m, k, n in SHAPES:
        a = torch.randn(m, k).to(dtype)
        b = torch.randn(n, k).to(dtype)
        torch.nn.functional.linear(a, b)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.nn.functional.linear(a, b)
            best = min(best, time.perf_counter() - t0)
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
    return out


def bandwidth_gbps(mib: int = 256, reps: int = 5) -> dict[str, float]:
    """Memory bandwidth from a buffer copy (read + write) and a sum (read)."""
    import torch

    n = mib * 1024 * 1024 // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    dst.copy_(src)
    copy = read = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        copy = min(copy, time.perf_counter() - t0)
        t0 = time.perf_counter()
        src.sum()
        read = min(read, time.perf_counter() - t0)
    nbytes = n * 4
    return {"copy": 2 * nbytes / copy / 1e9, "read": nbytes / read / 1e9}


def measure() -> dict[str, Any]:
    import torch

    fp32 = matmul_gflops(torch.float32)
    bf16 = matmul_gflops(torch.bfloat16)
    bw = bandwidth_gbps()
    return {
        "fp32_gflops": max(fp32.values()),
        "bf16_gflops": max(bf16.values()),
        "mem_gbps": max(bw.values()),
        "shapes": {"float32": fp32, "bfloat16": bf16},
        "bandwidth": bw,
    }


def load_or_measure() -> dict[str, Any]:
    """The figures from results/roofline.json when present, else measured now."""
    import json

    path = RESULTS / "roofline.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        return {**data["figures"], **data.get("details", {})}
    return measure()


def main() -> int:
    m = measure()
    fastest = "bfloat16" if m["bf16_gflops"] > m["fp32_gflops"] else "float32"
    figures = {
        "fp32_gflops": round(m["fp32_gflops"], 1),
        "bf16_gflops": round(m["bf16_gflops"], 1),
        "mem_gbps": round(m["mem_gbps"], 2),
        "fastest": fastest,
        "bf16_over_fp32": round(m["bf16_gflops"] / m["fp32_gflops"], 2),
    }
    report("roofline", figures, {"shapes": m["shapes"], "bandwidth": m["bandwidth"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
