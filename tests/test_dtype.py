"""The dtype probe: explicit names pass through, 'auto' times fp32 against bf16 and keeps the faster."""

from __future__ import annotations

import time

import pytest
import torch

from rlaif.backends import dtype as dt
from rlaif.errors import UserError


def test_explicit_names() -> None:
    assert dt.pick_dtype("float32", "cpu") is torch.float32
    assert dt.pick_dtype("bfloat16", "cpu") is torch.bfloat16
    assert dt.pick_dtype("float16", "cpu") is torch.float16


def test_bad_name_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"backend\.dtype"):
        dt.pick_dtype("fp8", "cpu")


def test_auto_follows_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dt, "probe", lambda device="cpu": {"float32": 1.0, "bfloat16": 0.2})
    assert dt.pick_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(dt, "probe", lambda device="cpu": {"float32": 0.1, "bfloat16": 0.8})
    assert dt.pick_dtype("auto", "cpu") is torch.float32
    # a near tie goes to fp32 (bf16 costs accuracy)
    monkeypatch.setattr(dt, "probe", lambda device="cpu": {"float32": 1.0, "bfloat16": 0.9})
    assert dt.pick_dtype("auto", "cpu") is torch.float32


def test_real_probe_is_fast_cached_and_consistent() -> None:
    dt.probe.cache_clear()
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    timings = dt.probe("cpu")
    assert time.perf_counter() - t0 < 1.5
    assert set(timings) == {"float32", "bfloat16"}
    assert all(0 < v < 1 for v in timings.values())
    assert dt.probe("cpu") is timings  # cached per process
    assert torch.get_num_threads() == threads  # timed on one thread, then put back
    faster_bf16 = timings["float32"] > dt.BF16_MIN_SPEEDUP * timings["bfloat16"]
    assert dt.pick_dtype("auto", "cpu") is (torch.bfloat16 if faster_bf16 else torch.float32)


def test_time_matmuls_returns_a_duration_per_dtype() -> None:
    # Only that it measures something: comparing two timings is flaky on a loaded machine.
    secs = dt.time_matmuls((torch.float32, torch.bfloat16), shape=(8, 64, 64), budget_s=0.0)
    assert len(secs) == 2 and all(0 < s < 60 for s in secs)


def test_probe_takes_turns_so_a_burst_cannot_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dtypes are timed in alternation, at least MIN_ROUNDS times each, best kept: a stall
    in one round (here the first bf16 call, 50x slow) does not make bf16 look slow."""
    calls: list[torch.dtype] = []
    clock = [0.0]
    cost = {torch.float32: 4.0, torch.bfloat16: 1.0}

    def fake_linear(a: torch.Tensor, b: torch.Tensor) -> None:
        calls.append(a.dtype)
        timed = calls[2:]  # after one warm-up call each
        stall = 50.0 if a.dtype == torch.bfloat16 and timed.count(torch.bfloat16) == 1 else 1.0
        clock[0] += cost[a.dtype] * stall * 1e-3

    monkeypatch.setattr(torch.nn.functional, "linear", fake_linear)
    monkeypatch.setattr(dt.time, "perf_counter", lambda: clock[0])
    secs = dt.time_matmuls((torch.float32, torch.bfloat16), budget_s=0.0)
    assert calls[2:8] == [torch.float32, torch.bfloat16] * dt.MIN_ROUNDS
    assert secs == pytest.approx([4e-3, 1e-3])


def test_resolve_device() -> None:
    assert dt.resolve_device("cpu") == "cpu"
    assert dt.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


class _Rank:
    """A stand-in for :class:`rlaif.distributed.Dist` on one rank: the main rank runs
    ``on_main``'s function, another rank gets what the main rank broadcast."""

    def __init__(self, main: bool, broadcast: object = None) -> None:
        self.main, self.broadcast = main, broadcast

    def on_main(self, fn: object) -> object:
        return fn() if self.main else self.broadcast  # type: ignore[operator]


def test_launched_ranks_take_the_main_ranks_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a ``dist``, only the main rank probes; another rank takes its answer even where its
    own probe would have answered otherwise (ranks sharing cores time differently)."""
    from rlaif.config import SFTConfig
    from rlaif.train_common import autocast_dtype

    monkeypatch.setattr(dt, "probe", lambda device="cpu": {"float32": 1.0, "bfloat16": 0.2})
    cfg = SFTConfig(dtype="auto")
    assert autocast_dtype(cfg, "cpu", _Rank(main=True)) is torch.bfloat16  # type: ignore[arg-type]

    def fails(device: str = "cpu") -> dict[str, float]:
        raise AssertionError("a rank other than the main one probed")

    monkeypatch.setattr(dt, "probe", fails)
    assert autocast_dtype(cfg, "cpu", _Rank(main=False, broadcast=torch.bfloat16)) is torch.bfloat16  # type: ignore[arg-type]
    assert autocast_dtype(cfg, "cpu", _Rank(main=False, broadcast=None)) is None  # type: ignore[arg-type]
    # an explicit dtype needs no probe and no broadcast
    assert autocast_dtype(SFTConfig(dtype="float32"), "cpu", _Rank(main=False, broadcast=1)) is None  # type: ignore[arg-type]
