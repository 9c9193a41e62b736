"""Where freed tensor memory goes: kept in the process heap for reuse, or handed back at once.

PyTorch has no caching allocator for CPU tensors: every tensor is a ``malloc`` and every free a
``free``. glibc serves a large block (above a threshold that adapts up to 32 MB) with a fresh
``mmap`` and unmaps it when it is freed, so the next tensor of that size starts as untouched pages
and pays one page fault per 4 KiB as it is first written. A training step makes and drops
hundreds of such tensors (vocabulary-wide logits, embedding gradients, weight casts), and on a
2-core CPU those faults took a third of a PPO forward + backward (measured in docs/ppo.md).

``keep`` tells glibc (``mallopt``) to serve every block from the heap and never to trim it, so
freed memory is reused without faulting. Peak resident memory is the heap's high-water mark
either way; what changes is that memory freed after the peak stays with the process. ``system``
leaves glibc's defaults. Either is a no-op off glibc, and ``keep`` stands down when the user has
already chosen an allocator (``LD_PRELOAD``) or set glibc's own ``MALLOC_*`` variables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt takes an int: the largest trim threshold it can be given (2 GiB)
NEVER_TRIM = 2**31 - 1
USER_SETTINGS = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)

_applied: str | None = None


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def user_choice() -> str | None:
    """The environment setting that overrides ours (its name), or None."""
    if os.environ.get("LD_PRELOAD", "").strip():
        return "LD_PRELOAD"
    for name in USER_SETTINGS:
        if name in os.environ:
            return name
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def configure(mode: str) -> bool:
    """Apply ``mode`` ('keep' or 'system') to this process; return whether glibc was changed.

    Idempotent; 'system' after 'keep' does not undo it (glibc's adaptive threshold cannot be
    restored once set), so call it once, before the large allocations of a run.
    """
    global _applied
    if mode not in ("keep", "system"):
        raise ValueError(f"heap mode must be 'keep' or 'system', got {mode!r}")
    if mode == "system" or _applied == "keep":
        return False
    libc = _glibc()
    if libc is None:
        log.debug("heap: not glibc, allocator left as it is")
        return False
    other = user_choice()
    if other is not None:
        log.info("heap: %s is set, so the allocator is left as the environment chose", other)
        return False
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    if ok:
        _applied = "keep"
        log.debug("heap: freed tensor memory is kept in the process heap for reuse")
    return bool(ok)
