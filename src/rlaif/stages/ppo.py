"""Stage 5, `rlaif ppo`: reinforcement learning from AI feedback against the preference model.

Inputs: the SL-CAI model (``run_dir/sft``), the PM (``run_dir/pm``), red-team prompts and
helpfulness prompts. The policy starts from SL-CAI (all weights, or LoRA adapters); the frozen
reference is a copy of SL-CAI, or with LoRA the same model with its adapters switched off (no second
copy); the value function starts from the PM (its backbone and head). The loop itself is in
:mod:`rlaif.stages.ppo_loop`.

Outputs: ``run_dir/rl/`` (the policy, LoRA merged, safetensors + tokenizer),
``run_dir/manifests/ppo.json``, ``run_dir/metrics/ppo.jsonl`` (one row per step) and checkpoints
under ``run_dir/checkpoints/ppo/`` (a killed run resumes from the newest).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaif.checkpoint import (
    atomic_dir,
    latest_checkpoint,
    prune_checkpoints,
    save_model_dir,
    write_trainer_state,
)
from rlaif.errors import UserError
from rlaif.manifest import fingerprint, hash_inputs, read_manifest, scrub, write_manifest

if TYPE_CHECKING:
    import torch

    from rlaif.config import PPOConfig, RunConfig
    from rlaif.stages.ppo_loop import Messages, PPOModels

log = logging.getLogger(__name__)

STAGE = "ppo"
DEEPSPEED_REFUSED = (
    "the stage runs DDP or FSDP 2 (configs/accelerate/ddp.yaml, fsdp.yaml): DeepSpeed's engine "
    "clips one norm over policy and value together, where ppo clips each on its own"
)


def check_config(pc: PPOConfig) -> None:
    """One-line UserError for settings PPO cannot run with."""
    rules: list[tuple[str, bool, str]] = [
        ("temperature", pc.temperature > 0, "must be > 0 (PPO samples its rollouts)"),
        ("top_p", 0 < pc.top_p <= 1, "must be in (0, 1]"),
        ("rollout_batch_size", pc.rollout_batch_size >= 1, "must be at least 1"),
        ("batch_size", pc.batch_size >= 1, "must be at least 1"),
        ("grad_accum", pc.grad_accum >= 1, "must be at least 1"),
        ("ppo_epochs", pc.ppo_epochs >= 1, "must be at least 1"),
        ("max_new_tokens", pc.max_new_tokens >= 1, "must be at least 1"),
        ("max_length", pc.max_length > pc.max_new_tokens, "must exceed max_new_tokens"),
        ("clip_eps", pc.clip_eps > 0, "must be > 0"),
        ("value_clip", pc.value_clip > 0, "must be > 0"),
        ("gamma", 0 < pc.gamma <= 1, "must be in (0, 1]"),
        ("lam", 0 <= pc.lam <= 1, "must be in [0, 1]"),
        ("kl_coef", pc.kl_coef >= 0, "must be >= 0"),
        ("target_kl", pc.target_kl > 0 or not pc.adaptive_kl, "must be > 0 with adaptive_kl"),
        ("kl_horizon", pc.kl_horizon >= 1, "must be at least 1"),
        ("epochs", pc.epochs > 0 or pc.max_steps > 0, "must be > 0 (or set max_steps)"),
    ]
    for name, ok, why in rules:
        if not ok:
            raise UserError(f"ppo.{name}: {why} (got {getattr(pc, name)!r})")


def input_paths(cfg: RunConfig) -> tuple[Path, Path, str, str]:
    """(policy dir, PM dir, red-team prompt file, helpfulness prompt file or '')."""
    pc, run_dir = cfg.ppo, cfg.run_path
    policy = Path(pc.policy) if pc.policy else run_dir / "sft"
    pm = Path(pc.pm) if pc.pm else run_dir / "pm"
    red = pc.prompts or cfg.revise.prompts
    helpful = pc.helpful_prompts or cfg.revise.helpful_prompts
    if helpful == "none":
        helpful = ""
    if not policy.is_dir():
        raise UserError(f"ppo.policy: {policy} not found (run `rlaif sft` first or set ppo.policy)")
    if not pm.is_dir():
        raise UserError(f"ppo.pm: {pm} not found (run `rlaif reward` first or set ppo.pm)")
    return policy, pm, red, helpful


def load_prompt_messages(
    cfg: RunConfig, red: str, helpful: str
) -> tuple[list[Messages], dict[str, int]]:
    """Red-team prompts then helpfulness prompts, as chat messages; counts per source."""
    from rlaif.data.prompts import load_prompts

    pc = cfg.ppo
    items = load_prompts(
        red,
        column=cfg.revise.prompt_column,
        first_turn_only=cfg.revise.first_turn_only,
        limit=pc.prompt_limit,
        seed=cfg.seed,
    )
    out = [list(p.messages) for p in items]
    counts = {"red_team": len(out)}
    if helpful:
        more = load_prompts(helpful, limit=pc.helpful_limit, seed=cfg.seed)
        out += [list(p.messages) for p in more]
        counts["helpful"] = len(more)
    return out, counts


def _freeze_untied_output(lm: Any) -> None:
    """The value function never reads the LM head: keep it out of training unless it is shared."""
    out, inp = lm.get_output_embeddings(), lm.get_input_embeddings()
    if out is not None and inp is not None and out.weight is not inp.weight:
        out.requires_grad_(False)


def load_models(cfg: RunConfig, policy_dir: Path, pm_dir: Path, device: str) -> PPOModels:
    """Policy (full or LoRA), reference, value function (from the PM) and the frozen PM."""
    import torch

    from rlaif.modelio import load_causal_lm
    from rlaif.pm import PreferenceModel, load_pm
    from rlaif.stages.ppo_loop import PPOModels
    from rlaif.train_common import apply_lora

    pc = cfg.ppo
    trust, pickle = cfg.backend.trust_remote_code, cfg.backend.allow_pickle
    policy, tok = load_causal_lm(
        policy_dir, device=device, trust_remote_code=trust, allow_pickle=pickle
    )
    ref: Any | None = None
    if pc.lora:
        policy = apply_lora(policy, pc)
    else:
        ref = copy.deepcopy(policy).requires_grad_(False).eval()
    policy.eval()
    scorer = load_pm(pm_dir, device=device, trust_remote_code=trust).requires_grad_(False)
    if pc.value_from_pm:
        value = load_pm(pm_dir, device=device, trust_remote_code=trust)
        if value.tokenizer.get_vocab() != tok.get_vocab():
            raise UserError(
                f"ppo.value_from_pm: the PM in {pm_dir} uses another tokenizer than the policy in "
                f"{policy_dir}; set ppo.value_from_pm=false to start the value function from the policy"
            )
    else:
        lm, _ = load_causal_lm(
            policy_dir, device=device, trust_remote_code=trust, allow_pickle=pickle
        )
        value = PreferenceModel(lm, tok)
        with torch.no_grad():
            value.head.weight.zero_()
            value.head.bias.zero_()
    value.requires_grad_(True)
    if pc.lora:
        value.lm = apply_lora(value.lm, pc)
    else:
        _freeze_untied_output(value.lm)
    value.to(device).eval()
    return PPOModels(policy=policy, tokenizer=tok, ref=ref, value=value, scorer=scorer)


def trainable_state(module: Any) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad
    }


def load_trainable(module: Any, path: Path) -> None:
    """Copy a ``*.safetensors`` of trainable parameters into ``module`` (names must match)."""
    import torch
    from safetensors.torch import load_file

    blob = load_file(str(path))
    params = dict(module.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    if set(blob) != want:
        odd = sorted(set(blob) ^ want)[0]
        raise UserError(
            f"{path}: checkpoint does not match the model ({odd}); was ppo.lora changed? "
            f"delete {path.parent.parent} to start over"
        )
    with torch.no_grad():
        for name, value in blob.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def save_ppo_checkpoint(
    root: Path,
    step: int,
    both: Any,
    optimizer_state: dict[str, Any] | None,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``root/step-N`` atomically: the trainable weights of ``both['policy']`` and
    ``both['value']``, the optimizer (``optimizer_state`` when given, FSDP's gathered state by
    parameter name, else ``optimizer.state_dict()``; none when both are None), the scheduler and
    ``state.json``."""
    from safetensors.torch import save_file

    def build(tmp: Path) -> None:
        save_file(trainable_state(both["policy"]), str(tmp / "policy.safetensors"))
        save_file(trainable_state(both["value"]), str(tmp / "value.safetensors"))
        write_trainer_state(tmp, optimizer, optimizer_state, scheduler)
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))

    path = atomic_dir(Path(root) / f"step-{step:06d}", build)
    prune_checkpoints(root, keep)
    return path


def run(cfg: RunConfig) -> Path:
    """Train the policy with PPO against the PM; return ``run_dir/rl``.

    Under ``accelerate launch`` (N processes) it runs data-parallel (:mod:`rlaif.stages.ppo_loop`):
    ``rollout_batch_size`` and ``batch_size`` are per process, and only the main process writes.
    """
    from rlaif.distributed import setup
    from rlaif.stages.ppo_loop import train
    from rlaif.train_common import autocast_dtype, merged_for_saving, set_seed

    pc, run_dir = cfg.ppo, cfg.run_path
    check_config(pc)
    policy_dir, pm_dir, red, helpful = input_paths(cfg)
    out, ckpt_root = run_dir / "rl", run_dir / "checkpoints" / STAGE
    manifest_path = run_dir / "manifests" / f"{STAGE}.json"
    inputs = hash_inputs(
        {"policy": policy_dir, "pm": pm_dir, "prompts": red, "helpful_prompts": helpful or "none"}
    )
    dist, device = setup(cfg.backend.device, "ppo", no_deepspeed=DEEPSPEED_REFUSED)
    config = {"ppo": asdict(pc), "seed": cfg.seed}
    config |= dist.layout()  # processes (the global batch) and sharding shape the result
    fp = fingerprint(scrub(config), inputs)
    prev = read_manifest(manifest_path)
    if prev and prev.get("fingerprint") == fp and (out / "config.json").is_file():
        log.info("ppo: %s is up to date (same config and inputs); nothing to do", out)
        return out
    last = latest_checkpoint(ckpt_root)
    if last is not None:
        state = json.loads((last / "state.json").read_text(encoding="utf-8"))
        if state.get("fingerprint") != fp:
            log.warning(
                "ppo: checkpoints in %s are from another config or input; starting over", ckpt_root
            )
            dist.wait()  # every rank has read it before it goes
            if dist.main:
                shutil.rmtree(ckpt_root)
            dist.wait()  # and none looks for a checkpoint before it has gone

    prompts, counts = load_prompt_messages(cfg, red, helpful)
    set_seed(cfg.seed)
    models = load_models(cfg, policy_dir, pm_dir, device)
    amp = autocast_dtype(pc, device, dist)
    log.info(
        "ppo: %d prompts %s, %s, autocast %s, device %s, %d process(es)",
        len(prompts),
        counts,
        "LoRA (reference = adapters off)" if pc.lora else "full fine-tuning",
        amp or "off (fp32)",
        device,
        dist.world,
    )
    result = train(
        models,
        prompts,
        pc,
        seed=cfg.seed,
        ckpt_root=ckpt_root,
        metrics_path=run_dir / "metrics" / f"{STAGE}.jsonl",
        backend=cfg.backend,
        amp=amp,
        fingerprint=fp,
        dist=dist,
    )
    if not dist.main:
        dist.wait()  # for the main process to write the model and the manifest
        return out
    final = merged_for_saving(models.policy)

    save_model_dir(out, final, models.tokenizer)
    hist = result.history
    summary = (
        {k: [round(h[k], 4) for h in (hist[0], hist[-1])] for k in ("reward", "kl")} if hist else {}
    )
    write_manifest(
        manifest_path,
        stage=STAGE,
        config=config,
        inputs=inputs,
        extra={
            "output": str(out),
            "policy": str(policy_dir),
            "pm": str(pm_dir),
            "prompts": counts,
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "first_last": summary,
            "lora_merged": bool(pc.lora),
            "autocast": str(amp) if amp else None,
            "device": device,
        },
    )
    dist.wait()
    return out
