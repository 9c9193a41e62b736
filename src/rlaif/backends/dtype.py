"""Choosing the compute dtype: a short matmul probe instead of guessing from CPU flags.

bf16 matmuls are several times faster than fp32 on CPUs with AMX or AVX512-BF16 and several times
*slower* on AVX2-only CPUs (no native bf16 path). Flags do not tell the whole story (oneDNN kernels,
virtualised CPUs hiding flags), so ``pick_dtype("auto", "cpu")`` times both and keeps the faster.
The probe takes well under a second and runs once per process and device.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING

from rlaif.errors import UserError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")

# A decode-like shape: a batch of 64 rows through a 1024 x 2048 projection (0.27 GFLOP).
PROBE_SHAPE = (64, 1024, 2048)
# bf16 must beat fp32 by this factor: it costs a little accuracy, so a tie goes to fp32.
BF16_MIN_SPEEDUP = 1.2


def dtype_from_name(name: str) -> torch.dtype:
    import torch

    if name not in DTYPE_NAMES:
        raise UserError(
            f"backend.dtype: expected one of auto, {', '.join(DTYPE_NAMES)}; got {name!r}"
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def time_matmul(
    dtype: torch.dtype,
    device: str = "cpu",
    shape: tuple[int, int, int] = PROBE_SHAPE,
    reps: int = 3,
    budget_s: float = 0.3,
) -> float:
    """Best-of-``reps`` seconds for one ``(m, k) @ (k, n)`` matmul in ``dtype``.

    Stops early once ``budget_s`` is spent (a slow dtype needs no more reps to lose).
    """
    import torch

    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.nn.functional.linear(a, b)  # warm-up: kernel selection, first-touch allocations
    sync()
    best = float("inf")
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best


@functools.cache
def probe(device: str = "cpu") -> dict[str, float]:
    """Seconds per probe matmul for fp32 and bf16 on ``device`` (cached per process)."""
    import torch

    return {
        "float32": time_matmul(torch.float32, device),
        "bfloat16": time_matmul(torch.bfloat16, device),
    }


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else is returned as is."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(pref: str, device: str) -> torch.dtype:
    """The compute dtype for ``pref`` ('auto' or a dtype name) on ``device``.

    'auto': on CUDA, bf16 where supported (else fp32); on CPU, the faster of fp32 and bf16 by the
    matmul probe, bf16 only when it wins by at least ``BF16_MIN_SPEEDUP``.
    """
    import torch

    if pref != "auto":
        return dtype_from_name(pref)
    device = resolve_device(device)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device != "cpu":
        return torch.float32
    t = probe(device)
    return torch.bfloat16 if t["float32"] > BF16_MIN_SPEEDUP * t["bfloat16"] else torch.float32
