"""Choosing the compute dtype: a short matmul probe instead of guessing from CPU flags.

bf16 matmuls are several times faster than fp32 on CPUs with AMX or AVX512-BF16 and several times
*slower* on AVX2-only CPUs (no native bf16 path). Flags do not tell the whole story (oneDNN kernels,
virtualised CPUs hiding flags), so ``pick_dtype("auto", "cpu")`` times both and keeps the faster.
The probe takes well under a second and runs once per process and device.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING

from rlaif.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DTYPE_NAMES = ("float32", "bfloat16", "float16")

# A decode-like shape: a batch of 64 rows through a 1024 x 2048 projection (0.27 GFLOP).
PROBE_SHAPE = (64, 1024, 2048)
# bf16 must beat fp32 by this factor: it costs a little accuracy, so a tie goes to fp32.
BF16_MIN_SPEEDUP = 1.2
MIN_ROUNDS = 3


def dtype_from_name(name: str) -> torch.dtype:
    import torch

    if name not in DTYPE_NAMES:
        raise UserError(
            f"backend.dtype: expected one of auto, {', '.join(DTYPE_NAMES)}; got {name!r}"
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def time_matmuls(
    dtypes: tuple[torch.dtype, ...],
    device: str = "cpu",
    shape: tuple[int, int, int] = PROBE_SHAPE,
    rounds: int = 7,
    budget_s: float = 1.0,
) -> list[float]:
    """Best seconds for one ``(m, k) @ (k, n)`` matmul in each of ``dtypes``, timed in turn.

    Each round times every dtype once, one after the other, so a burst of other work on a busy
    machine (a page-cache flush after a download, a neighbour's job) falls on both sides instead
    of deciding the comparison; the best of the rounds is kept. After ``MIN_ROUNDS`` the rounds
    stop once ``budget_s`` is spent.
    """
    import torch

    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a32 = torch.randn(m, k, generator=gen)
    b32 = torch.randn(n, k, generator=gen)
    args = [(a32.to(device=device, dtype=d), b32.to(device=device, dtype=d)) for d in dtypes]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for a, b in args:  # warm-up: kernel selection, first-touch allocations
        torch.nn.functional.linear(a, b)
    sync()
    best = [float("inf")] * len(dtypes)
    start = time.perf_counter()
    for r in range(rounds):
        for i, (a, b) in enumerate(args):
            t0 = time.perf_counter()
            torch.nn.functional.linear(a, b)
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
        if r + 1 >= MIN_ROUNDS and time.perf_counter() - start > budget_s:
            break
    return best


@functools.cache
def probe(device: str = "cpu") -> dict[str, float]:
    """Seconds per probe matmul for fp32 and bf16 on ``device`` (cached per process)."""
    import torch

    threads = torch.get_num_threads()
    if device == "cpu":
        # One core: what bf16 buys is a property of the core, and a single thread does not
        # stall at OpenMP barriers while other jobs hold the other cores (with both threads,
        # a busy machine made bf16's ~1 ms matmul look slower than fp32's in 2 probes of 6).
        torch.set_num_threads(1)
    try:
        fp32, bf16 = time_matmuls((torch.float32, torch.bfloat16), device)
    finally:
        torch.set_num_threads(threads)
    t = {"float32": fp32, "bfloat16": bf16}
    log.info(
        "dtype probe on %s: a matmul takes %.2f ms in fp32, %.2f ms in bf16; 'auto' means %s "
        "here (a dtype setting of float32 or bfloat16 overrides it)",
        device,
        fp32 * 1e3,
        bf16 * 1e3,
        "bfloat16" if _bf16_wins(t) else "float32",
    )
    return t


def _bf16_wins(t: dict[str, float]) -> bool:
    return t["float32"] > BF16_MIN_SPEEDUP * t["bfloat16"]


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
    return torch.bfloat16 if _bf16_wins(t) else torch.float32
