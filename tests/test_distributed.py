"""Data-parallel training under `accelerate launch` (configs/accelerate/cpu2.yaml: 2 CPU processes,
gloo) against the same run in one process, plus the pure helpers of rlaif.distributed.

The 1-process run uses ``batch_size=4``, the 2-process run ``batch_size=2`` per process: the same
global batch of 4, drawn from the same seeded stream, so DDP's averaged gradient is the
one-process gradient up to the order of float32 additions. Those rounding differences (about
1e-7 relative) carry through a few Adam steps; ``RTOL`` is 1e-4, a thousand times that, while
the loss moves by more than 1e-3 relative from one step to the next, so a wrong gradient scale,
a lost or doubled shard, or a skipped sync still fails. The data sets do not divide into global
batches of 4, so one micro-batch per epoch has a single row and one process gets a placeholder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from rlaif.cli import main
from rlaif.distributed import Dist, shard_bounds, shard_sizes
from rlaif.metrics import read_metrics
from tests.test_sft import state_dict, train_args, write_run_inputs

ROOT = Path(__file__).resolve().parents[1]
CPU2 = ROOT / "configs" / "accelerate" / "cpu2.yaml"
RTOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_cmd(args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU2),
        "--main_process_port", str(free_port()), "-m", "rlaif", *args,
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def launch(args: list[str]) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        launch_cmd(args), env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def no_leftovers(run_dir: Path) -> None:
    """No half-built directory or temp file from a second writer anywhere in the run."""
    stray = [p for p in run_dir.rglob(".*") if p.name != ".pmp_pairs.key.json"]
    assert not stray, stray


def assert_same_curve(
    one: list[dict[str, Any]], two: list[dict[str, Any]], keys: list[str]
) -> None:
    assert [r["step"] for r in two] == [r["step"] for r in one]  # one row per step, no duplicate
    for a, b in zip(one, two, strict=True):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=RTOL, abs=1e-6), (a["step"], k, a[k], b[k])


# ---------------------------------------------------------------- pure helpers


def test_shards_cover_the_batch_in_order() -> None:
    assert (
        shard_sizes(5, 2) == [3, 2] and shard_sizes(1, 2) == [1, 0] and shard_sizes(4, 4) == [1] * 4
    )
    for n in range(0, 9):
        for world in (1, 2, 3):
            spans = [shard_bounds(n, world, r) for r in range(world)]
            assert [i for a, b in spans for i in range(a, b)] == list(range(n))


def test_one_process_dist_passes_through() -> None:
    import torch

    dist = Dist()
    assert (dist.rank, dist.world, dist.main) == (0, 1, True)
    assert dist.shard([7, 3, 5]) == ([7, 3, 5], True)
    assert dist.sum(2.5) == 2.5
    rows = torch.tensor([1.0, 2.0])
    assert dist.gather(rows, 2) is rows
    assert dist.on_main(lambda: "written") == "written"
    model = torch.nn.Linear(2, 1)
    call, opt = dist.prepare(model, "optimizer")
    x = torch.ones(1, 2)
    assert opt == "optimizer" and torch.equal(call(x), model(x))


def test_ppo_refuses_to_run_data_parallel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["ppo", f"run_dir={tmp_path}"]) == 2
    assert "ppo: runs in one process only" in capsys.readouterr().err


# ---------------------------------------------------------------- 1 vs 2 processes


def test_sft_two_processes_match_one(tmp_path: Path, tiny_model_dir: Path, fixtures: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        write_run_inputs(d, fixtures)  # 21 examples: batches of 4, 4, 4, 4, 4 and 1 per epoch
    extra = {"sft.max_steps": 6, "sft.grad_accum": 2, "sft.save_every": 3}
    assert main(["sft", *train_args(one, tiny_model_dir, **extra)]) == 0
    launch(["sft", *train_args(two, tiny_model_dir, **{**extra, "sft.batch_size": 2})])

    a = read_metrics(one / "metrics" / "sft.jsonl")
    b = read_metrics(two / "metrics" / "sft.jsonl")
    assert [r["step"] for r in a] == list(range(1, 7))
    assert_same_curve(a, b, ["loss", "grad_norm", "lr"])
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]  # the same global batches
    wa, wb = state_dict(one / "sft"), state_dict(two / "sft")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    man = json.loads((two / "manifests" / "sft.json").read_text())
    assert man["config"]["processes"] == 2 and man["steps"] == 6
    assert not (two / "checkpoints" / "sft").exists()
    no_leftovers(two)


def test_reward_two_processes_match_one(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path
) -> None:
    from rlaif.data.preferences import load_preferences

    one, two = tmp_path / "one", tmp_path / "two"
    prefs = [
        {**p.to_json(), "p_chosen": 0.7, "source": "ai:harmless"}
        for p in load_preferences(fixtures / "hh-rlhf-60.jsonl", limit=10)  # 9 train: 4, 4, 1
    ]
    for d in (one, two):
        d.mkdir()
        (d / "preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))

    def args(run_dir: Path, batch: int) -> list[str]:
        return [
            "reward", f"model={tiny_model_dir}", f"run_dir={run_dir}", "backend.device=cpu",
            "reward.dtype=float32", "reward.lr=2e-3", "reward.warmup_ratio=0",
            "reward.max_steps=3", "reward.grad_accum=2", f"reward.batch_size={batch}",
            "reward.max_length=64", "reward.max_pass_tokens=128", "reward.pmp_limit=16",
            "reward.holdout=0.25",
        ]  # fmt: skip

    assert main(args(one, 4)) == 0
    launch(args(two, 2))

    a = read_metrics(one / "metrics" / "reward.jsonl")
    b = read_metrics(two / "metrics" / "reward.jsonl")
    assert [(r["phase"], r["step"]) for r in a] == [("pmp", 1), ("pmp", 2), ("pm", 3), ("pm", 4)]
    assert [r["phase"] for r in b] == [r["phase"] for r in a]
    assert_same_curve(a, b, ["loss", "accuracy", "margin", "grad_norm", "lr"])
    man = json.loads((two / "manifests" / "reward.json").read_text())
    assert man["config"]["processes"] == 2 and "heldout" in man["finetune"]
    for phase in ("pmp", "pm"):
        ha = json.loads((one / phase / "pm.json").read_text())
        hb = json.loads((two / phase / "pm.json").read_text())
        assert hb["steps"] == ha["steps"]
    assert not (two / "checkpoints").exists() or not any((two / "checkpoints").iterdir())
    no_leftovers(two)


@pytest.mark.slow
def test_killed_two_process_run_resumes(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path
) -> None:
    """SIGKILL the whole 2-process group after its first checkpoint; the rerun resumes on 2."""
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        write_run_inputs(d, fixtures)
    extra = {"sft.max_steps": 40, "sft.save_every": 2}
    assert main(["sft", *train_args(one, tiny_model_dir, **extra)]) == 0
    args = ["sft", *train_args(two, tiny_model_dir, **{**extra, "sft.batch_size": 2})]
    proc = subprocess.Popen(
        launch_cmd(args), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt_root = two / "checkpoints" / "sft"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(ckpt_root.glob("step-*")):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    # torchrun starts its workers in their own sessions: kill each, not just the launcher's group.
    family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    proc.wait()
    assert not (two / "manifests" / "sft.json").exists(), "killed too late: the run had finished"
    killed_at = max(int(p.name.split("-")[1]) for p in ckpt_root.glob("step-*"))
    assert 0 < killed_at < 40
    res = launch(args)
    assert f"resuming from {ckpt_root}" in res.stderr
    a = read_metrics(one / "metrics" / "sft.jsonl")
    b = read_metrics(two / "metrics" / "sft.jsonl")
    assert_same_curve(a, b, ["loss", "grad_norm"])
    no_leftovers(two)


@pytest.mark.slow
def test_dpo_two_processes_match_one(tmp_path: Path, tiny_model_dir: Path, fixtures: Path) -> None:
    from tests.test_dpo import dpo_args, write_preferences

    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        write_preferences(d, fixtures)
    extra = {"dpo.max_steps": 4, "dpo.save_every": 2}
    assert main(["dpo", *dpo_args(one, tiny_model_dir, **extra)]) == 0
    launch(["dpo", *dpo_args(two, tiny_model_dir, **{**extra, "dpo.batch_size": 2})])
    a = read_metrics(one / "metrics" / "dpo.jsonl")
    b = read_metrics(two / "metrics" / "dpo.jsonl")
    assert_same_curve(a, b, ["loss"])
    assert json.loads((two / "manifests" / "dpo.json").read_text())["config"]["processes"] == 2
    no_leftovers(two)
