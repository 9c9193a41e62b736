"""heap.configure: 'keep' serves large tensors from the heap (no fresh mmap per tensor)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from rlaif import heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates and frees a 64 MB tensor, then prints by how much a second one grows glibc's count of
# bytes in mmapped blocks: 0 when it came from the heap, its size when glibc mapped it.
CHILD = """
import ctypes, sys
import torch
from rlaif import heap
print(heap.configure(sys.argv[1]))
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
a = torch.ones(16 * 2**20)
del a
before = libc.mallinfo2().hblkhd
b = torch.ones(16 * 2**20)
print(libc.mallinfo2().hblkhd - before)
"""


def _child(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int]:
    import os

    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run_env.pop("LD_PRELOAD", None)
    run_env.update(env or {})
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=run_env, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere configure() is a no-op")
def test_keep_serves_large_tensors_from_the_heap() -> None:
    applied, mapped = _child("keep")
    assert applied and mapped == 0
    applied, mapped = _child("system")
    assert not applied and mapped >= 64 * 2**20
    # a user's own allocator setting wins
    applied, mapped = _child("keep", {"MALLOC_MMAP_THRESHOLD_": "1048576"})
    assert not applied and mapped >= 64 * 2**20


def test_user_choice_and_bad_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*heap.USER_SETTINGS, "LD_PRELOAD", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert heap.user_choice() is None
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    assert heap.user_choice() == "GLIBC_TUNABLES"
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert heap.user_choice() == "LD_PRELOAD"
    with pytest.raises(ValueError, match="keep"):
        heap.configure("fast")
