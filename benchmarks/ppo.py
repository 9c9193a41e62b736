"""PPO: ours (`rlaif.stages.ppo_loop`) vs TRL 1.12.0's PPOTrainer (`trl.experimental.ppo`).

TRL 1.12.0 is the last release that still ships a PPO trainer; it runs in its own virtualenv,
``benchmarks/.venv-trl112``, which this script creates on first use: a plain venv with
``trl==1.12.0`` installed (``--no-deps``) and a ``.pth`` line that reuses the torch / transformers /
accelerate / datasets of the project's ``.venv`` (TRL 1.12.0 runs unmodified on transformers 5.24;
pip must not pull a second, CUDA-sized torch).

Both sides get the same inputs: policy SmolLM2-135M-Instruct (the rlaif cache), a reward model and
a value model that are that backbone plus one scalar head (seeded, identical on both sides; TRL
reads it as ``LlamaForSequenceClassification``, ours as an rlaif PM directory), the first
``--episodes`` red-team prompts of hh-rlhf (first Human turn, chat template), ``--batch`` episodes
per PPO step, ``--tokens`` new tokens at most, temperature 0.7, 4 PPO epochs of one mini-batch,
clip 0.2, value clip 0.2, vf_coef 0.1, fixed KL coefficient 0.05 (k1), missing-EOS penalty 1,
lr 3e-6, fp32 weights and compute. Each side runs in its own fresh process, so peak RSS is its own;
episodes/s counts the training call only (model loading excluded; our figure includes writing the
final checkpoint, TRL writes none). Before either side, a throwaway process writes up to 16 GiB
(``--warm-gib``), so that on a virtual machine with lazily backed memory neither side pays the
first touches of pages for the other.

    flock /tmp/rlaif-heavy.lock .venv/bin/python benchmarks/ppo.py

Prints ``RESULT ppo episodes_per_s_ours=... episodes_per_s_trl=... speedup=... rss_ratio=...``,
and, after both sides, the run's floor (``ppo_floor``): ``matmul_floor_s`` (the fp32 weight
matmuls that an exact PPO of our run's episodes must do, each shape timed on this machine),
``matmul_share_ours`` (that floor over our time) and ``max_speedup`` (TRL's time over the floor:
what an implementation doing nothing but those matmuls, layer by layer with this machine's
matrix multiply, would reach).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRL_VENV = HERE / ".venv-trl112"
TRL_VERSION = "1.12.0"
PPO_EPOCHS = 4


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> tuple[float, float, int]:
    """This process's user and system CPU seconds and minor page faults so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _cpu_since(start: tuple[float, float, int]) -> dict[str, Any]:
    """CPU time in the kernel is mostly first touches of fresh memory (page faults): on some
    virtual machines each costs tens of microseconds, so it is reported beside the wall time."""
    now = _cpu_s()
    return {
        "train_user_s": round(now[0] - start[0], 1),
        "train_sys_s": round(now[1] - start[1], 1),
        "train_page_faults": now[2] - start[2],
    }


# ------------------------------------------------------------------------------- shared inputs


def prepare(work: Path, model_dir: Path, n_prompts: int) -> dict[str, Any]:
    """Write the PM directory (ours), the sequence-classification model (TRL) and the prompts."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlaif.data.prompts import load_prompts
    from rlaif.pm import new_pm

    pm = new_pm(model_dir, seed=0)
    pm.save_pretrained(work / "pm")
    rm = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=1, dtype=torch.float32
    )
    with torch.no_grad():
        rm.score.weight.copy_(pm.head.weight)  # bias is 0 in the PM, absent in TRL's head
    rm.config.pad_token_id = 0
    rm.save_pretrained(work / "rm", safe_serialization=True)
    path = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    items = load_prompts(path, first_turn_only=True, shuffle=False, limit=n_prompts)
    prompts = [p.messages for p in items]
    (work / "prompts.json").write_text(json.dumps(prompts))
    return {"prompts": len(prompts)}


# ------------------------------------------------------------------------------- children


def child_ours(work: Path, model_dir: Path, a: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch

    from rlaif import heap
    from rlaif.config import BackendConfig, PPOConfig
    from rlaif.modelio import load_causal_lm
    from rlaif.pm import load_pm
    from rlaif.stages.ppo_loop import PPOModels, train

    heap.configure(BackendConfig().heap)  # as every `rlaif` stage command does
    torch.manual_seed(0)
    prompts = json.loads((work / "prompts.json").read_text())
    policy, tok = load_causal_lm(model_dir)
    ref = copy.deepcopy(policy).requires_grad_(False)
    scorer = load_pm(work / "pm").requires_grad_(False)
    value = load_pm(work / "pm")
    value.requires_grad_(True)
    pc = PPOConfig(
        max_steps=a.episodes // a.batch,
        rollout_batch_size=a.batch,
        batch_size=a.batch,
        grad_accum=1,
        ppo_epochs=PPO_EPOCHS,
        max_new_tokens=a.tokens,
        max_length=1024,
        temperature=0.7,
        lr=3e-6,
        kl_coef=0.05,
        adaptive_kl=False,
        kl_estimator="k1",
        normalize_reward=False,
        truncation_penalty=1.0,
        dtype=a.dtype,
        save_every=10_000,
    )
    from rlaif.train_common import autocast_dtype

    amp = autocast_dtype(pc, "cpu")
    models = PPOModels(policy, tok, ref, value, scorer)
    cpu0, t0 = _cpu_s(), time.perf_counter()
    res = train(
        models,
        prompts,
        pc,
        seed=0,
        ckpt_root=work / f"ours-ckpt-{a.dtype}",
        metrics_path=work / f"ours-metrics-{a.dtype}.jsonl",
        amp=amp,
    )
    secs = time.perf_counter() - t0
    h = res.history
    return {
        "episodes": res.steps * a.batch,
        "train_s": secs,
        **_cpu_since(cpu0),
        "step_s_sum": sum(r["step_s"] for r in h),
        "gen_s_sum": sum(r["gen_s"] for r in h),
        "mean_response_length": sum(r["response_length"] for r in h) / len(h),
        "reward_first_last": [h[0]["reward"], h[-1]["reward"]],
        "kl_last": h[-1]["kl"],
        "autocast": str(amp),
    }


def child_trl(work: Path, model_dir: Path, a: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    assert trl.__version__ == TRL_VERSION, trl.__version__
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    # SmolLM2's pad token is its EOS; TRL masks by pad id, so give it a separate one
    tok.pad_token = "<|endoftext|>"
    prompts = json.loads((work / "prompts.json").read_text())
    texts = [
        tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts
    ]
    rows = [{"input_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
    ds = Dataset.from_list(rows)
    policy = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ref = copy.deepcopy(policy)
    reward = AutoModelForSequenceClassification.from_pretrained(str(work / "rm"), num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(str(work / "rm"), num_labels=1)
    args = PPOConfig(
        output_dir=str(work / "trl-out"),
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=PPO_EPOCHS,
        total_episodes=a.episodes,
        response_length=a.tokens,
        local_rollout_forward_batch_size=a.batch,
        temperature=0.7,
        stop_token="eos",
        missing_eos_penalty=1.0,
        kl_coef=0.05,
        kl_estimator="k1",
        learning_rate=3e-6,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=0,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=ds,
        value_model=value,
        eval_dataset=ds.select(range(min(8, len(ds)))),
    )
    cpu0, t0 = _cpu_s(), time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t0
    return {"episodes": a.episodes, "train_s": secs, **_cpu_since(cpu0), "trl": trl.__version__}


# ------------------------------------------------------------------------------- driver


def ensure_trl_venv() -> Path:
    """Create benchmarks/.venv-trl112 (trl 1.12.0 over the project's torch/transformers)."""
    py = TRL_VENV / "bin" / "python"
    probe = [str(py), "-c", "import trl; print(trl.__version__)"]
    if py.exists():
        got = subprocess.run(probe, capture_output=True, text=True, check=False)
        if got.stdout.strip() == TRL_VERSION:
            return py
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    main_site = subprocess.run(
        [sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    venv_site = subprocess.run(
        [str(py), "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(venv_site, "_rlaif_main_env.pth").write_text(main_site + "\n")
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", f"trl=={TRL_VERSION}"], check=True
    )
    got = subprocess.run(probe, capture_output=True, text=True, check=False)
    if got.stdout.strip() != TRL_VERSION:
        raise RuntimeError(f"trl {TRL_VERSION} did not install: {got.stderr.strip()[-300:]}")
    return py


def run_child(
    python: str, side: str, work: Path, model_dir: Path, a: argparse.Namespace
) -> dict[str, Any]:
    cmd = [
        python,
        __file__,
        "--child",
        side,
        "--work",
        str(work),
        "--model-dir",
        str(model_dir),
        "--episodes",
        str(a.episodes),
        "--batch",
        str(a.batch),
        "--tokens",
        str(a.tokens),
        "--dtype",
        a.dtype,
    ]
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("CHILD ") :])


def matmul_floor(
    model_dir: Path, prompts: list[Any], ours: dict[str, Any], a: argparse.Namespace
) -> dict[str, Any]:
    """The fp32 weight matmuls of this run (our answers' lengths, every prompt once), timed
    shape by shape on this machine: no exact fp32 PPO of these episodes runs faster
    (``ppo_floor``)."""
    from _common import prompt_tokens
    from ppo_floor import Model, floor_seconds, run_matmuls

    from rlaif import heap
    from rlaif.config import BackendConfig

    heap.configure(BackendConfig().heap)  # freed outputs stay mapped, as in the children
    n_prompt = prompt_tokens(str(model_dir), prompts)
    steps = ours["episodes"] // a.batch
    counts = run_matmuls(
        Model.from_config(model_dir / "config.json"),
        steps=steps,
        episodes_per_step=a.batch,
        prompt_tokens=n_prompt * ours["episodes"] / len(prompts),
        answer_tokens=ours["mean_response_length"] * ours["episodes"],
        epochs=PPO_EPOCHS,
    )
    out = floor_seconds(counts)
    return {**out, "prompt_tokens": n_prompt, "shapes": len(counts)}


def _mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def warm_memory(gib: int) -> dict[str, Any]:
    """Write ``gib`` GiB in a throwaway process, before either side runs.

    On a virtual machine whose host backs guest memory lazily, the first touch of a guest page
    costs far more than later ones (here: 16 GiB took 70 s the first time, 27 s the next). Without
    this, the side that runs first pays for pages the other then finds ready, and the order of
    the sides moves the speedup (1.32 against 1.55 on 3 Dec 2026)."""
    code = "import sys, torch\nxs = [torch.ones(2**28) for _ in range(int(sys.argv[1]))]\n"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(gib)], check=True)
    return {"gib": gib, "seconds": round(time.perf_counter() - t0, 1)}


def _auto_is_fp32() -> bool:
    """Whether ``dtype: auto`` resolves to no autocast on this CPU (the probe picks float32)."""
    from rlaif.config import PPOConfig
    from rlaif.train_common import autocast_dtype

    return autocast_dtype(PPOConfig(dtype="auto"), "cpu") is None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument(
        "--ours-dtypes",
        default="float32,auto",
        help="our runs, comma-separated: float32 (as TRL), auto (our default: bf16 autocast "
        "where the probe finds it faster), bfloat16; '' for none (TRL only)",
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--skip-trl", action="store_true", help="measure ours only")
    p.add_argument(
        "--trl-first",
        action="store_true",
        help="run TRL before ours (on a VM where first touches of memory cost unevenly, the "
        "side that runs later can find its memory cheaper)",
    )
    p.add_argument(
        "--warm-gib",
        type=int,
        default=-1,
        help="GiB of memory to write in a throwaway process before the sides run, so that "
        "neither pays the first touches of a lazily backed VM's memory for the other "
        "(-1: three quarters of the available memory, at most 16; 0: none)",
    )
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        fn = child_ours if a.child == "ours" else child_trl
        out = fn(Path(a.work), Path(a.model_dir), a)
        out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        print("CHILD " + json.dumps(out), flush=True)
        return 0

    sys.path.insert(0, str(HERE))
    from _common import report

    from rlaif.models import resolve_model

    model_dir = resolve_model(a.model, pull=False)
    with tempfile.TemporaryDirectory(prefix="rlaif-bench-ppo-") as tmp:
        work = Path(tmp)
        info = prepare(work, model_dir, a.episodes)
        gib = a.warm_gib if a.warm_gib >= 0 else min(16, int(0.75 * _mem_available_gib()))
        if gib:
            info["warm_memory"] = warm_memory(gib)
            print(f"warm memory: {json.dumps(info['warm_memory'])}", flush=True)
        runs: dict[str, dict[str, Any]] = {}
        trl: dict[str, Any] | None = None

        def run_trl() -> dict[str, Any]:
            a.dtype = "float32"
            out = run_child(str(ensure_trl_venv()), "trl", work, model_dir, a)
            print(f"trl: {json.dumps(out)}", flush=True)
            return out

        if a.trl_first and not a.skip_trl:
            trl = run_trl()
        ours_dtypes = [d for d in a.ours_dtypes.split(",") if d]
        for dt in ours_dtypes:
            if dt == "auto" and _auto_is_fp32() and "float32" in ours_dtypes:
                print("ours auto: the probe picks float32 here, the float32 run stands for it")
                continue
            a.dtype = dt
            runs[dt] = run_child(sys.executable, "ours", work, model_dir, a)
            print(f"ours {dt}: {json.dumps(runs[dt])}", flush=True)
        if trl is None and not a.skip_trl:
            trl = run_trl()
        floor = None
        if "float32" in runs:  # after both sides, on a quiet machine
            prompts = json.loads((work / "prompts.json").read_text())
            floor = matmul_floor(model_dir, prompts, runs["float32"], a)
            print(f"matmul floor: {json.dumps(floor)}", flush=True)
    figures: dict[str, Any] = {}
    for dt, ours in runs.items():
        sfx = "" if dt == "float32" else f"_{dt}"
        figures[f"episodes_per_s_ours{sfx}"] = round(ours["episodes"] / ours["train_s"], 4)
        figures[f"peak_rss_gb_ours{sfx}"] = round(ours["peak_rss_mb"] / 1024, 2)
    if trl is not None:
        eps_trl = trl["episodes"] / trl["train_s"]
        figures["episodes_per_s_trl"] = round(eps_trl, 4)
        figures["peak_rss_gb_trl"] = round(trl["peak_rss_mb"] / 1024, 2)
        for dt, ours in runs.items():
            sfx = "" if dt == "float32" else f"_{dt}"
            figures[f"speedup{sfx}"] = round(ours["episodes"] / ours["train_s"] / eps_trl, 2)
            figures[f"rss_ratio{sfx}"] = round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 3)
    if floor is not None:
        figures["matmul_floor_s"] = round(floor["seconds"], 1)
        figures["matmul_share_ours"] = round(floor["seconds"] / runs["float32"]["train_s"], 3)
        if trl is not None:
            figures["max_speedup"] = round(trl["train_s"] / floor["seconds"], 2)
    details = {
        "ours": runs,
        "trl": trl,
        "inputs": info,
        "matmul_floor": floor,
        "args": vars(a),
        "model": str(model_dir),
    }
    report("ppo", figures, details)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
