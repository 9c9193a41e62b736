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
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from rlaif.checkpoint import list_checkpoints
from rlaif.cli import main
from rlaif.distributed import Dist, shard_bounds, shard_sizes
from rlaif.metrics import read_metrics
from tests.test_sft import state_dict, train_args, write_run_inputs

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CPU2 = ROOT / "configs" / "accelerate" / "cpu2.yaml"
FSDP_CPU2 = ROOT / "configs" / "accelerate" / "fsdp-cpu2.yaml"
ZERO2_CPU2 = ROOT / "configs" / "accelerate" / "zero2-cpu2.yaml"
ZERO3_CPU2 = ROOT / "configs" / "accelerate" / "zero3-cpu2.yaml"
SHARDING = {FSDP_CPU2: "fsdp2", ZERO2_CPU2: "zero2", ZERO3_CPU2: "zero3"}
LAYOUTS = pytest.mark.parametrize(
    "layout", [CPU2, *SHARDING], ids=["ddp", "fsdp", "zero2", "zero3"]
)
RTOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_cmd(
    args: list[str], program: tuple[str, ...] = ("-m", "rlaif"), layout: Path = CPU2
) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(layout),
        "--main_process_port", str(free_port()), *program, *args,
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def launch(args: list[str], layout: Path = CPU2) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        launch_cmd(args, layout=layout),
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def no_leftovers(run_dir: Path) -> None:
    """No half-built directory or temp file from a second writer anywhere in the run."""
    stray = [p for p in run_dir.rglob(".*") if p.name != ".pmp_pairs.key.json"]
    assert not stray, stray


def assert_half_held(stderr: str) -> None:
    """Really sharded: each of the 2 processes logged that it holds about half the weights."""
    held = re.findall(r"(?:FSDP2|DeepSpeed): .* \((\d+)%\)", stderr)
    assert len(held) == 2 and all(45 <= int(h) <= 55 for h in held), stderr[-2000:]


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
    assert dist.sums([1.5, -2.0]) == [1.5, -2.0] and dist.maxes([3, 7]) == [3, 7]
    rows = torch.tensor([1.0, 2.0])
    assert dist.gather(rows, 2) is rows
    assert dist.on_main(lambda: "written") == "written"
    model = torch.nn.Linear(2, 1)
    call, opt = dist.prepare(model, "optimizer")
    x = torch.ones(1, 2)
    assert opt == "optimizer" and torch.equal(call(x), model(x))


def test_launched_command_destroys_its_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launched command leaves no process group for the interpreter's shutdown to tear down,
    on success and after a user error alike; an unlaunched one touches no group."""
    import torch.distributed as tdist

    def group() -> None:
        store = tdist.FileStore(str(tmp_path / f"store{len(list(tmp_path.iterdir()))}"), 1)
        tdist.init_process_group("gloo", store=store, rank=0, world_size=1)

    monkeypatch.setenv("RLAIF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    group()
    try:
        assert main(["--version"]) == 0 and tdist.is_initialized()  # no command ran: untouched
        assert main(["models", "list"]) == 0 and tdist.is_initialized()  # not launched
    finally:
        tdist.destroy_process_group()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv, code in ((["models", "list"], 0), (["sft", str(tmp_path / "none.yaml")], 2)):
        group()
        assert main(argv) == code
        assert not tdist.is_initialized(), argv


def test_ppo_losses_of_shards_add_up_to_the_batch() -> None:
    """Each rank divides by the global micro-batch's token count: the ranks' losses and stats
    then sum to the one-process values, whatever the answer lengths on each rank."""
    import torch

    from rlaif.rl.advantages import masked_mean
    from rlaif.rl.losses import clipped_value_loss, ppo_policy_loss

    gen = torch.Generator().manual_seed(0)
    lp, old, adv, v, ov, ret = (torch.randn(5, 7, generator=gen) for _ in range(6))
    lengths = torch.tensor([7, 1, 4, 2, 6])  # 20 tokens: 12 on the first rank, 8 on the second
    mask = (torch.arange(7) < lengths[:, None]).long()
    whole_pg, whole_st = ppo_policy_loss(lp, old, adv, mask, 0.2)
    whole_vf, whole_frac = clipped_value_loss(v, ov, ret, mask, 0.2)
    pg = vf = ent = torch.tensor(0.0)
    approx = clip = frac = 0.0
    for rows in (slice(0, 3), slice(3, 5)):
        p, st = ppo_policy_loss(lp[rows], old[rows], adv[rows], mask[rows], 0.2, count=20.0)
        f, fr = clipped_value_loss(v[rows], ov[rows], ret[rows], mask[rows], 0.2, count=20.0)
        pg, vf, ent = pg + p, vf + f, ent + masked_mean(lp[rows], mask[rows], count=20.0)
        approx, clip, frac = approx + st.approx_kl, clip + st.clipfrac, frac + fr
    assert torch.allclose(pg, whole_pg) and torch.allclose(vf, whole_vf)
    assert torch.allclose(ent, masked_mean(lp, mask))
    assert approx == pytest.approx(whole_st.approx_kl) and clip == pytest.approx(whole_st.clipfrac)
    assert frac == pytest.approx(whole_frac)
    # what DDP would average without the global count: each rank's own token mean
    own = [
        ppo_policy_loss(lp[r], old[r], adv[r], mask[r], 0.2)[0] for r in (slice(0, 3), slice(3, 5))
    ]
    assert not torch.allclose((own[0] + own[1]) / 2, whole_pg)


def test_padded_samples_keep_every_token_in_place() -> None:
    import torch

    from rlaif.rl.rollout import Samples

    s = Samples(
        torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]]),
        torch.tensor([[3, 4], [2, 0]]), torch.tensor([[1, 1], [1, 0]]),
        torch.tensor([True, False]),
    )  # fmt: skip
    w = s.padded(5, 4, pad_id=0)
    assert w.query_ids.tolist() == [[0, 0, 0, 5, 6], [0, 0, 7, 8, 9]]
    assert w.query_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    assert w.response_ids.tolist() == [[3, 4, 0, 0], [2, 0, 0, 0]]
    assert torch.equal(w.response_lengths, s.response_lengths)
    assert torch.equal(w.truncated, s.truncated)
    with pytest.raises(ValueError, match="narrower"):
        s.padded(2, 4, pad_id=0)


# ---------------------------------------------------------------- 1 vs 2 processes


@LAYOUTS
def test_sft_two_processes_match_one(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path, layout: Path
) -> None:
    """DDP, and FSDP (weights and optimizer state sharded, gathered for the checkpoints and the
    export): the same curve and final weights as one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        write_run_inputs(d, fixtures)  # 21 examples: batches of 4, 4, 4, 4, 4 and 1 per epoch
    extra = {"sft.max_steps": 6, "sft.grad_accum": 2, "sft.save_every": 3}
    assert main(["sft", *train_args(one, tiny_model_dir, **extra)]) == 0
    res = launch(
        ["sft", *train_args(two, tiny_model_dir, **{**extra, "sft.batch_size": 2})], layout
    )
    if layout in (FSDP_CPU2, ZERO3_CPU2):
        assert_half_held(res.stderr)

    a = read_metrics(one / "metrics" / "sft.jsonl")
    b = read_metrics(two / "metrics" / "sft.jsonl")
    assert [r["step"] for r in a] == list(range(1, 7))
    assert_same_curve(a, b, ["loss", "grad_norm", "lr"])
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]  # the same global batches
    wa, wb = state_dict(one / "sft"), state_dict(two / "sft")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    man = json.loads((two / "manifests" / "sft.json").read_text())
    assert man["config"]["processes"] == 2 and man["steps"] == 6
    assert man["config"].get("sharding") == SHARDING.get(layout)
    assert not (two / "checkpoints" / "sft").exists()
    no_leftovers(two)


@LAYOUTS
def test_reward_two_processes_match_one(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path, layout: Path
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
    launch(args(two, 2), layout)

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


PPO_KEYS = [
    "reward", "score", "kl", "beta", "entropy", "approx_kl", "policy_loss", "value_loss",
    "explained_variance", "grad_norm_policy", "grad_norm_value", "lr",
]  # fmt: skip


def ppo_args(run_dir: Path, policy: Path, pm_dir: Path, **over: Any) -> list[str]:
    """A 3-step PPO run on the tiny model: per step 6 episodes in one process (3 per process in
    two), 2 epochs of mini-batches of 4 then 2 (micro-batches of 2), an entropy bonus, adaptive
    KL with a short horizon and a target near the measured KL so that beta moves unclipped, the
    value head calibrated from the global scores.

    ``lr`` is 3e-4: Adam's first steps are close to ``lr * sign(gradient)``, so a gradient entry
    near zero whose sign flips with float rounding moves its weight by ``2 * lr``; at 1e-3 that
    grew the 1- vs 2-process differences to 2e-5 relative in 3 steps, at 3e-4 they stay near 1e-7.
    """
    values = {
        "ppo.policy": policy, "ppo.pm": pm_dir, "ppo.prompts": FIXTURES / "hh-rlhf-60.jsonl",
        "ppo.helpful_prompts": "none", "ppo.max_steps": 3, "ppo.rollout_batch_size": 6,
        "ppo.batch_size": 2, "ppo.grad_accum": 2, "ppo.ppo_epochs": 2, "ppo.max_new_tokens": 6,
        "ppo.max_length": 40, "ppo.dtype": "float32", "ppo.lr": 3e-4, "ppo.entropy_coef": 0.01,
        "ppo.kl_horizon": 20, "ppo.target_kl": 1.0, "ppo.save_every": 2, **over,
    }  # fmt: skip
    return [
        "ppo",
        f"run_dir={run_dir}",
        "backend.device=cpu",
        *(f"{k}={v}" for k, v in values.items()),
    ]


def early_stopping_policy(tiny_model_dir: Path, out: Path) -> Path:
    """The tiny model with its end-of-turn logit raised (the token's tied embedding row set along
    the mean final hidden state), so that sampled answers end early about one time in four:
    answers of different lengths, where the random model alone always runs to max_new_tokens."""
    import torch

    from rlaif.backends.hf import HFLM
    from rlaif.checkpoint import save_model_dir
    from rlaif.data.prompts import load_prompts
    from rlaif.modelio import load_causal_lm

    model, tok = load_causal_lm(tiny_model_dir)
    lm = HFLM.from_objects(model, tok)
    rows = [lm.encode(p.messages) for p in load_prompts(FIXTURES / "hh-rlhf-60.jsonl", limit=10)]
    with torch.no_grad():
        hidden = torch.cat(
            [model.model(input_ids=torch.tensor([r])).last_hidden_state[0] for r in rows]
        )
        mean = hidden.mean(0)
        model.get_output_embeddings().weight[tok.eos_token_id] = 1.6 * mean / mean.norm()
    return save_model_dir(out, model, tok)


@pytest.mark.parametrize("layout", [CPU2, FSDP_CPU2], ids=["ddp", "fsdp"])
def test_ppo_two_processes_match_one(tmp_path: Path, tiny_model_dir: Path, layout: Path) -> None:
    """DDP, and FSDP (policy and value sharded; the rollouts gather them, the value head is
    calibrated in its shards). Rollouts are sampled (temperature 1) with per-row seeds that
    follow the global row, so both layouts sample the same episodes (answers of different lengths: the rewards agree to 1e-6);
    every statistic is over the global batch and the update sees the same global mini-batches,
    so the curves match up to float rounding (see RTOL). Quantities that are differences of
    nearly equal numbers (``kl``, ``approx_kl``, ``policy_loss`` near 0) fall back on the 1e-6
    absolute tolerance, a few float32 rounding steps of log-probs near -6."""
    from rlaif.pm import new_pm

    policy = early_stopping_policy(tiny_model_dir, tmp_path / "policy")
    pm_dir = tmp_path / "pm"
    new_pm(tiny_model_dir).save_pretrained(pm_dir)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(ppo_args(one, policy, pm_dir)) == 0
    per_process = {"ppo.rollout_batch_size": 3, "ppo.batch_size": 1}
    res = launch(ppo_args(two, policy, pm_dir, **per_process), layout)
    if layout == FSDP_CPU2:
        assert_half_held(res.stderr)

    a = read_metrics(one / "metrics" / "ppo.jsonl")
    b = read_metrics(two / "metrics" / "ppo.jsonl")
    assert [r["step"] for r in a] == [1, 2, 3]
    assert any(0 < r["truncated"] < 1 for r in a)  # answers of different lengths
    for key in ("response_length", "truncated", "episodes"):  # the same episodes, step by step
        assert [r[key] for r in b] == [r[key] for r in a], key
    assert_same_curve(a, b, PPO_KEYS)
    assert a[-1]["beta"] != a[0]["beta"] and a[-1]["kl"] != a[0]["kl"]  # the curves move
    wa, wb = state_dict(one / "rl"), state_dict(two / "rl")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    man = json.loads((two / "manifests" / "ppo.json").read_text())
    assert man["config"]["processes"] == 2 and man["steps"] == 3
    assert man["config"].get("sharding") == SHARDING.get(layout)
    assert sorted(p.name for p in (two / "checkpoints" / "ppo").iterdir()) == [
        "step-000002",
        "step-000003",
    ]
    no_leftovers(two)


def test_ppo_nan_on_one_rank_stops_both(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A NaN reward, or an inf loss, on rank 1 only: both ranks stop at that step with the same
    message (rank 0 saw nothing wrong locally), rank 0 keeps the last good checkpoint."""
    worker = (str(ROOT / "tests" / "dist_ppo_worker.py"),)
    res = subprocess.run(
        launch_cmd([str(tiny_model_dir), str(tmp_path)], worker),
        env={**env(), "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"},
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    for where in ("reward", "loss"):
        assert re.search(r"step 3 .*last good checkpoint kept: .*step-000002", ranks[0][where])
        assert [s for s, _ in list_checkpoints(tmp_path / where / "ck")] == [1, 2]
        assert [r["step"] for r in read_metrics(tmp_path / where / "m.jsonl")] == [1, 2]


def wait_for_first_checkpoint(proc: subprocess.Popen[bytes], ckpt_root: Path) -> None:
    """Poll until a checkpoint appears under ``ckpt_root`` (the run must still be going)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(ckpt_root.glob("step-*")):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)


def kill_after_first_checkpoint(
    args: list[str], run_dir: Path, stage: str, layout: Path = CPU2
) -> int:
    """Launch ``args`` on 2 processes, SIGKILL the launcher and both workers as soon as a
    checkpoint appears; return the step of the newest checkpoint left."""
    proc = subprocess.Popen(
        launch_cmd(args, layout=layout),
        env=env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt_root = run_dir / "checkpoints" / stage
    wait_for_first_checkpoint(proc, ckpt_root)
    # torchrun starts its workers in their own sessions: kill each, not just the launcher's group.
    family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    proc.wait()
    assert not (run_dir / "manifests" / f"{stage}.json").exists(), "killed too late: it finished"
    return max(int(p.name.split("-")[1]) for p in ckpt_root.glob("step-*"))


def test_workers_stop_when_the_launcher_is_killed(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path
) -> None:
    """A SIGKILL to `accelerate launch` alone, which it cannot pass on to the workers torchrun
    started in sessions of their own: the kernel SIGTERMs them (distributed.follow_launcher),
    so none goes on writing the run directory, and its lock is free for the rerun."""
    from rlaif.runlock import hold

    run = tmp_path / "run"
    write_run_inputs(run, fixtures)
    # about 500 steps: left alone, the workers would go on for many seconds and finish the run
    extra = {"sft.max_steps": 2000, "sft.epochs": 100, "sft.save_every": 2, "sft.batch_size": 2}
    proc = subprocess.Popen(
        launch_cmd(["sft", *train_args(run, tiny_model_dir, **extra)]),
        env=env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_first_checkpoint(proc, run / "checkpoints" / "sft")
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) >= 2, workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    assert not alive, f"{len(alive)} workers outlived their launcher"
    assert not (run / "manifests" / "sft.json").exists(), "the workers ran on to the end"
    with hold(run, "rlaif sft"):
        pass


@pytest.mark.parametrize(
    "layout,lora",
    [
        pytest.param(CPU2, False, id="ddp", marks=pytest.mark.slow),
        pytest.param(FSDP_CPU2, True, id="fsdp-lora"),
        pytest.param(ZERO2_CPU2, False, id="zero2"),
        pytest.param(ZERO3_CPU2, True, id="zero3-lora"),
    ],
)
def test_killed_two_process_run_resumes(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path, layout: Path, lora: bool
) -> None:
    """SIGKILL the whole 2-process group after its first checkpoint; the rerun resumes on 2.

    Under FSDP the checkpoint holds the weights gathered from the shards and the optimizer
    state by parameter name; the resumed run reloads both into its shards (with LoRA: the
    adapters and their Adam moments) and ends on the one-process curve."""
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        write_run_inputs(d, fixtures)
    extra: dict[str, Any] = {"sft.max_steps": 40, "sft.save_every": 2}
    if lora:
        # no dropout: its masks are drawn per process, so they differ from one process's
        extra |= {"sft.lora": "true", "sft.lora_r": 4, "sft.lora_dropout": 0.0}
    assert main(["sft", *train_args(one, tiny_model_dir, **extra)]) == 0
    args = ["sft", *train_args(two, tiny_model_dir, **{**extra, "sft.batch_size": 2})]
    killed_at = kill_after_first_checkpoint(args, two, "sft", layout)
    assert 0 < killed_at < 40
    res = launch(args, layout)
    assert f"resuming from {two / 'checkpoints' / 'sft'}" in res.stderr
    a = read_metrics(one / "metrics" / "sft.jsonl")
    b = read_metrics(two / "metrics" / "sft.jsonl")
    assert_same_curve(a, b, ["loss", "grad_norm"])
    no_leftovers(two)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(CPU2, id="ddp", marks=pytest.mark.slow),
        pytest.param(FSDP_CPU2, id="fsdp"),  # shards gathered into checkpoints and reloaded
    ],
)
def test_killed_two_process_ppo_resumes(tmp_path: Path, tiny_model_dir: Path, layout: Path) -> None:
    """PPO with LoRA on 2 processes, SIGKILLed after its first checkpoint, resumes on 2 from the
    step it saved (adapters, value, optimizer, beta, reward moments) and ends on the curve of an
    uninterrupted one-process run. Under FSDP the checkpoint holds the gathered weights and the
    optimizer state by parameter name, and each process reloads its shard of both."""
    from rlaif.pm import new_pm

    policy = early_stopping_policy(tiny_model_dir, tmp_path / "policy")
    pm_dir = tmp_path / "pm"
    new_pm(tiny_model_dir).save_pretrained(pm_dir)
    one, two = tmp_path / "one", tmp_path / "two"
    extra = {"ppo.max_steps": 10, "ppo.save_every": 2, "ppo.lora": "true", "ppo.lora_r": 4}
    assert main(ppo_args(one, policy, pm_dir, **extra)) == 0
    per_process = {"ppo.rollout_batch_size": 3, "ppo.batch_size": 1}
    args = ppo_args(two, policy, pm_dir, **extra, **per_process)
    killed_at = kill_after_first_checkpoint(args, two, "ppo", layout)
    assert 0 < killed_at < 10
    res = launch(args, layout)
    assert f"resuming from {two / 'checkpoints' / 'ppo'}" in res.stderr
    a = read_metrics(one / "metrics" / "ppo.jsonl")
    b = read_metrics(two / "metrics" / "ppo.jsonl")
    # what a resume restores: weights, optimizer, beta, reward moments (float drift grows with
    # the steps, so fewer keys than the 3-step comparison)
    assert_same_curve(a, b, ["reward", "score", "kl", "beta", "value_loss", "grad_norm_policy"])
    no_leftovers(two)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(CPU2, id="ddp", marks=pytest.mark.slow),
        pytest.param(ZERO2_CPU2, id="zero2", marks=pytest.mark.slow),
        pytest.param(ZERO3_CPU2, id="zero3"),  # the gathered export too
    ],
)
def test_dpo_two_processes_match_one(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path, layout: Path
) -> None:
    """TRL's trainer under DDP and DeepSpeed (which it sets up itself) on 2 CPU processes."""
    from tests.test_dpo import dpo_args, write_preferences

    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        write_preferences(d, fixtures)
    extra = {"dpo.max_steps": 4, "dpo.save_every": 2}
    assert main(["dpo", *dpo_args(one, tiny_model_dir, **extra)]) == 0
    res = launch(["dpo", *dpo_args(two, tiny_model_dir, **{**extra, "dpo.batch_size": 2})], layout)
    a = read_metrics(one / "metrics" / "dpo.jsonl")
    b = read_metrics(two / "metrics" / "dpo.jsonl")
    assert_same_curve(a, b, ["loss"])
    # the exported model (gathered from the shards under ZeRO-3) is the one-process model
    wa, wb, w0 = state_dict(one / "dpo"), state_dict(two / "dpo"), state_dict(tiny_model_dir)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert max(float((wa[k] - w0[k]).abs().max()) for k in wa) > 1e-4  # and training moved it
    config = json.loads((two / "manifests" / "dpo.json").read_text())["config"]
    assert config["processes"] == 2 and config.get("sharding") == SHARDING.get(layout)
    if layout in SHARDING:
        assert res.stderr.count(f"dpo: trained by DeepSpeed {SHARDING[layout]}") == 2
    no_leftovers(two)


def test_unsupported_sharding_is_refused_in_one_line(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path
) -> None:
    """`ppo` does not run under DeepSpeed; `dpo`'s trainer shards with FSDP on GPUs only
    (accelerate would quietly fall back to DDP on CPUs): both stop at the start with one line
    saying so. Every process reaches that line, but the launcher stops the others (SIGTERM) as
    soon as the first one exits, so a process a moment behind may never write it (seen in 1 of
    3 runs on 2 cores): at least one line, at most one per process."""
    from rlaif.pm import new_pm
    from tests.test_dpo import dpo_args, write_preferences

    pm_dir = tmp_path / "pm"
    new_pm(tiny_model_dir).save_pretrained(pm_dir)
    write_preferences(tmp_path / "d", fixtures)
    cases = {
        "accelerate DeepSpeed, `rlaif ppo`: the stage runs DDP or FSDP 2": (
            ppo_args(tmp_path / "p", tiny_model_dir, pm_dir),
            ZERO2_CPU2,
        ),
        "accelerate FSDP on CPUs: the trainer runs it on GPUs only": (
            ["dpo", *dpo_args(tmp_path / "d", tiny_model_dir)],
            FSDP_CPU2,
        ),
    }
    for message, (args, layout) in cases.items():
        res = subprocess.run(
            launch_cmd(args, layout=layout), env=env(), capture_output=True, text=True,
            timeout=600, cwd=ROOT,
        )  # fmt: skip
        assert res.returncode != 0
        # one line per process that got there (writes may share a line of the shared stderr)
        assert 1 <= res.stderr.count(f"error: {message}") <= 2, res.stderr[-3000:]
        assert not (tmp_path / "p" / "checkpoints").exists()
