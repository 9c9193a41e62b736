"""Stage 5', `rlaif dpo`: direct preference optimisation on the AI-labelled preferences.

Training runs in TRL's ``DPOTrainer``; this module prepares the pairs, wires our settings, metrics,
NaN guard and checkpoint rules into it, and writes a plain model directory at the end.

Soft labels: each pair is oriented toward the answer the labeller prefers (``p_chosen < 0.5``
swaps chosen and rejected) and pairs whose label is within ``min_margin`` of 0.5 are dropped
(see docs/dpo.md for why this rather than label smoothing).

Reference model: the policy's starting point. With LoRA it is the same weights with the adapter
switched off (no second copy in memory); with full fine-tuning a frozen second copy.

Outputs under ``run_dir``: ``dpo/`` (safetensors), ``manifests/dpo.json``, ``metrics/dpo.jsonl``;
while running, ``checkpoints/dpo/checkpoint-N/`` (removed when done).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaif.checkpoint import save_model_dir
from rlaif.errors import TrainingDiverged, UserError
from rlaif.manifest import fingerprint, hash_inputs, read_manifest, scrub, write_manifest
from rlaif.metrics import MetricsLog
from rlaif.store import atomic_write_text

if TYPE_CHECKING:
    from rlaif.config import RunConfig
    from rlaif.data.preferences import Preference

log = logging.getLogger(__name__)
STAGE = "dpo"
_STATE = "trainer_state.json"  # written last by the HF Trainer: marks a complete checkpoint


def prepare_pairs(
    prefs: Sequence[Preference], min_margin: float
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Conversational DPO rows from soft-labelled pairs, and counts of what was done.

    A pair with ``p_chosen < 0.5`` is swapped so that ``chosen`` is the answer the labeller
    prefers; a pair with ``|p_chosen - 0.5| < min_margin`` or two identical answers is dropped.
    """
    if not 0.0 <= min_margin <= 0.5:
        raise UserError(f"dpo.min_margin: expected a number in [0, 0.5], got {min_margin}")
    rows: list[dict[str, Any]] = []
    stats = {"pairs": len(prefs), "kept": 0, "swapped": 0, "near_half": 0, "identical": 0}
    for p in prefs:
        if p.chosen.strip() == p.rejected.strip():
            stats["identical"] += 1
            continue
        if abs(p.p_chosen - 0.5) < min_margin or (min_margin == 0 and p.p_chosen == 0.5):
            stats["near_half"] += 1
            continue
        win, lose = (p.chosen, p.rejected) if p.p_chosen > 0.5 else (p.rejected, p.chosen)
        stats["swapped"] += p.p_chosen < 0.5
        rows.append(
            {
                "prompt": [dict(m) for m in p.prompt],
                "chosen": [{"role": "assistant", "content": win}],
                "rejected": [{"role": "assistant", "content": lose}],
            }
        )
    stats["kept"] = len(rows)
    return rows, stats


def complete_checkpoint(root: Path) -> Path | None:
    """The newest ``checkpoint-N`` holding a readable trainer_state.json; partial ones (a kill
    mid-save, trainer_state.json included: the Trainer writes it in place) are removed."""
    if not root.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for child in root.iterdir():
        name, _, num = child.name.partition("-")
        if child.is_dir() and name == "checkpoint" and num.isdigit():
            if _saved_step(child) is not None:
                found.append((int(num), child))
            else:
                log.warning("dpo: removing incomplete checkpoint %s", child)
                shutil.rmtree(child, ignore_errors=True)
    return max(found)[1] if found else None


def _saved_step(ckpt: Path) -> int | None:
    """The step of a ``checkpoint-N`` whose trainer_state.json reads; None when missing or torn."""
    try:
        state = json.loads((ckpt / _STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    return int(state.get("global_step", ckpt.name.partition("-")[2]))


def _callback(metrics: MetricsLog, root: Path) -> Any:
    from transformers import TrainerCallback

    class Guard(TrainerCallback):  # type: ignore[misc]
        """Copies Trainer logs to metrics/dpo.jsonl; stops on a non-finite loss or grad norm."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            logs = logs or {}
            if "loss" not in logs:
                return
            bad = {
                k: logs[k]
                for k in ("loss", "grad_norm")
                if k in logs and not math.isfinite(logs[k])
            }
            if bad:
                last = complete_checkpoint(root)
                kept = f"; last good checkpoint kept: {last}" if last else ""
                what = ", ".join(f"{k}={v}" for k, v in bad.items())
                raise TrainingDiverged(
                    f"dpo: non-finite value at step {state.global_step} ({what}){kept}"
                )
            row = {
                k.replace("/", "_"): v
                for k, v in logs.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            metrics.log(state.global_step, **row)

    return Guard()


def _load(cfg: RunConfig, init: Path, device: str) -> tuple[Any, Any, Any]:
    """(policy, reference or None, tokenizer)."""
    from rlaif.modelio import load_causal_lm
    from rlaif.train_common import apply_lora

    trust, pickle = cfg.backend.trust_remote_code, cfg.backend.allow_pickle
    policy, tok = load_causal_lm(init, device=device, trust_remote_code=trust, allow_pickle=pickle)
    ref = None
    if cfg.dpo.lora:
        policy = apply_lora(policy, cfg.dpo)  # reference = adapter disabled (TRL does this)
    else:
        ref, _ = load_causal_lm(init, device=device, trust_remote_code=trust, allow_pickle=pickle)
        ref.requires_grad_(False)
    policy.train()
    return policy, ref, tok


def _sharded(trainer: Any) -> bool:
    """Whether no process holds the full weights (FSDP, DeepSpeed ZeRO-3)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(trainer.is_fsdp_enabled) or (plugin is not None and plugin.zero_stage == 3)


def _gathered_policy(trainer: Any, cfg: RunConfig, init: Path) -> Any:
    """The trained policy rebuilt on the CPU of the main process from the gathered weights
    (None on the others); every process must call it. Needs ``zero3_save_16bit_model: true``
    (DeepSpeed) or ``fsdp_state_dict_type: FULL_STATE_DICT`` (FSDP) in the accelerate config."""
    from rlaif.modelio import load_causal_lm
    from rlaif.train_common import apply_lora

    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.accelerator.is_main_process:
        return None
    if trainer.is_deepspeed_enabled:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # Training is over: without this, from_pretrained below would partition the rebuilt
        # model with zero.Init (zero3_init_flag), a collective the other processes never join.
        unset_hf_deepspeed_config()
    trust, pickle = cfg.backend.trust_remote_code, cfg.backend.allow_pickle
    model, _ = load_causal_lm(init, device="cpu", trust_remote_code=trust, allow_pickle=pickle)
    model = apply_lora(model, cfg.dpo)
    model.load_state_dict(state)
    return model


def run(cfg: RunConfig) -> Path:
    """Train the SL-CAI model with DPO on the preferences; return the output model directory."""
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from rlaif.data.preferences import load_preferences
    from rlaif.distributed import process_info
    from rlaif.modelio import check_model_dir
    from rlaif.train_common import autocast_dtype, merged_for_saving, set_seed

    dcfg, run_dir = cfg.dpo, cfg.run_path
    out, ckpt_root = run_dir / "dpo", run_dir / "checkpoints" / STAGE
    manifest_path = run_dir / "manifests" / f"{STAGE}.json"
    prefs_path = Path(dcfg.preferences) if dcfg.preferences else run_dir / "preferences.jsonl"
    if not prefs_path.is_file():
        raise UserError(
            f"{prefs_path}: preferences not found; run `rlaif label` first (or set dpo.preferences)"
        )
    init = Path(dcfg.init) if dcfg.init else run_dir / "sft"
    if not init.is_dir():
        raise UserError(f"{init}: policy model not found; run `rlaif sft` first (or set dpo.init)")
    check_model_dir(init, allow_pickle=cfg.backend.allow_pickle)
    dist, device = process_info(cfg.backend.device)
    inputs = hash_inputs({"preferences": prefs_path, "init": init})
    config = {"dpo": asdict(dcfg), "seed": cfg.seed}
    config |= dist.layout()  # processes (the global batch) and sharding shape the result
    fp = fingerprint(scrub(config), inputs)
    prev = read_manifest(manifest_path)
    if prev and prev.get("fingerprint") == fp and (out / "config.json").is_file():
        log.info("dpo: %s is up to date (same config and inputs); nothing to do", out)
        shutil.rmtree(ckpt_root, ignore_errors=True)  # what a kill during the cleanup left
        return out

    rows, stats = prepare_pairs(load_preferences(prefs_path, dcfg.limit), dcfg.min_margin)
    if not rows:
        raise UserError(
            f"{prefs_path}: no usable pairs (all within dpo.min_margin={dcfg.min_margin} of 0.5)"
        )
    log.info("dpo: %s", ", ".join(f"{k} {v}" for k, v in stats.items()))

    def checkpoints() -> Path | None:
        stamp = ckpt_root / "fingerprint"
        if ckpt_root.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != fp):
            log.warning(
                "dpo: checkpoints in %s are from another config or data; starting over", ckpt_root
            )
            shutil.rmtree(ckpt_root)
        last = complete_checkpoint(ckpt_root)
        ckpt_root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, fp + "\n")
        return last

    last = dist.on_main(checkpoints)  # the main process tidies, every process resumes
    resume_step = _saved_step(last) if last else None
    if last:
        log.info("dpo: resuming from %s (step %d)", last, resume_step)

    set_seed(cfg.seed)
    policy, ref, tok = _load(cfg, init, device)
    bf16 = autocast_dtype(dcfg, device, dist) is not None
    args = TRLDPOConfig(
        output_dir=str(ckpt_root),
        per_device_train_batch_size=dcfg.batch_size,
        gradient_accumulation_steps=dcfg.grad_accum,
        learning_rate=dcfg.lr,
        num_train_epochs=dcfg.epochs,
        max_steps=dcfg.max_steps if dcfg.max_steps > 0 else -1,
        lr_scheduler_type="cosine",
        warmup_steps=dcfg.warmup_ratio,
        weight_decay=dcfg.weight_decay,
        max_grad_norm=dcfg.max_grad_norm,
        adam_beta2=0.95,
        beta=dcfg.beta,
        loss_type=[dcfg.loss_type],
        max_length=dcfg.max_length,
        truncation_mode="keep_end",
        save_strategy="steps",
        save_steps=dcfg.save_every,
        save_total_limit=max(dcfg.keep_checkpoints, 1),
        logging_steps=dcfg.log_every,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        # DeepSpeed runs on CPUs only through accelerate's GPU path, with gloo (see distributed)
        use_cpu=device == "cpu" and not dist.deepspeed_asked,
        ddp_backend="gloo" if device == "cpu" and dist.deepspeed_asked else None,
        dataloader_num_workers=0,
        gradient_checkpointing=dcfg.gradient_checkpointing,
        trust_remote_code=cfg.backend.trust_remote_code,
    )
    metrics = MetricsLog(
        run_dir / "metrics" / f"{STAGE}.jsonl", resume_step=resume_step, active=dist.main
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[_callback(metrics, ckpt_root)],
    )
    if trainer.is_deepspeed_enabled:  # on CPUs too (see process_info), never quietly DDP
        log.info("dpo: trained by DeepSpeed %s", dist.layout().get("sharding"))
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    gathered = _gathered_policy(trainer, cfg, init) if _sharded(trainer) else None
    if not dist.main:
        dist.wait()  # for the main process to write the model and the manifest
        return out

    final = merged_for_saving(gathered if gathered is not None else trainer.model)

    save_model_dir(out, final, tok)
    history = [h for h in trainer.state.log_history if "loss" in h]
    write_manifest(
        manifest_path,
        stage=STAGE,
        config=config,
        inputs=inputs,
        extra={
            "output": str(out),
            "init": str(init),
            "pairs": stats,
            "steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "final": {k: v for k, v in (history[-1] if history else {}).items() if k != "step"},
            "lora_merged": bool(dcfg.lora),
            "bf16": bf16,
            "device": device,
        },
    )
    shutil.rmtree(ckpt_root, ignore_errors=True)
    log.info("dpo: wrote %s", out)
    dist.wait()
    return out
