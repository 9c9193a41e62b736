"""Stage 2, `rlaif sft`: supervised fine-tuning on the model's own revisions (SL-CAI).

A plain PyTorch loop rather than TRL's SFTTrainer, so that checkpoints go through
:mod:`rlaif.checkpoint` (atomic, safetensors, optimizer state loaded with ``weights_only``), a
resumed run replays exactly the same batches, the NaN guard stops before a bad update is applied,
and LoRA output is merged into a plain model directory. See docs/sft.md.

Outputs under ``run_dir``: ``sft/`` (model + tokenizer, safetensors), ``manifests/sft.json``,
``metrics/sft.jsonl``; while running, ``checkpoints/sft/step-NNNNNN/`` (removed when done).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaif.checkpoint import (
    check_finite,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
    save_model_dir,
)
from rlaif.errors import UserError
from rlaif.manifest import fingerprint, hash_inputs, read_manifest, scrub, write_manifest
from rlaif.metrics import MetricsLog
from rlaif.sft_data import (
    IGNORE,
    collate,
    encode,
    helpful_examples,
    mix,
    read_records,
    revision_examples,
)

if TYPE_CHECKING:
    import torch

    from rlaif.config import RunConfig

log = logging.getLogger(__name__)
STAGE = "sft"


def response_logits(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a response token, (n, vocab), and those tokens, (n,).

    The decoder body runs on the whole sequence but the LM head only on response positions, so
    the (batch, seq, vocab) logits of the prompt are never made: with a 49k vocabulary and long
    multi-turn prompts they are most of the activation memory. Models whose forward changes the
    logits after the head (soft-capping, logit scale) take the plain forward.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = core.get_output_embeddings()
    decoder = core.get_decoder() if hasattr(core, "get_decoder") else None
    special = any(getattr(core.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if head is None or decoder is None or decoder is core or special:
        return model(**kw).logits[:, :-1][keep], labels[keep]
    hidden = decoder(**kw).last_hidden_state[:, :-1]
    return head(hidden[keep]), labels[keep]


def response_loss(logits: torch.Tensor, targets: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Cross-entropy of ``targets`` (n,) under ``logits`` (n, vocab), summed, divided by ``n_tokens``.

    Dividing by the token count of the whole optimizer step (not of the micro-batch) makes the
    accumulated gradient the same as one big batch's, whatever ``grad_accum`` is.
    """
    import torch.nn.functional as F

    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    return total / max(n_tokens, 1)


def _paths(cfg: RunConfig) -> tuple[Path, Path | None]:
    scfg, run_dir = cfg.sft, cfg.run_path
    rev = Path(scfg.revisions) if scfg.revisions else run_dir / "revisions.jsonl"
    if not rev.is_file():
        raise UserError(
            f"{rev}: revisions not found; run `rlaif revise` first (or set sft.revisions)"
        )
    if scfg.helpful == "none" or scfg.helpful_ratio == 0:
        return rev, None
    helpful = Path(scfg.helpful) if scfg.helpful else run_dir / "helpful.jsonl"
    if not helpful.is_file():
        if scfg.helpful:
            raise UserError(f"{helpful}: sft.helpful file not found")
        log.warning("sft: %s not found; training on revisions only", helpful)
        return rev, None
    return rev, helpful


def _base_model(ref: str) -> Path:
    from rlaif.models import resolve_model

    return resolve_model(ref)


def build_examples(cfg: RunConfig, rev: Path, helpful: Path | None) -> list[Any]:
    revs = revision_examples(read_records(rev), cfg.sft.every_round)
    helps = helpful_examples(read_records(helpful)) if helpful else []
    if not revs:
        raise UserError(f"{rev}: no usable revisions to train on (every round empty or degenerate)")
    return mix(revs, helps, cfg.sft.helpful_ratio if helps else 0.0, cfg.seed)


def _load_model(cfg: RunConfig, base: Path, ckpt: Path | None, device: str) -> tuple[Any, Any]:
    from rlaif.modelio import load_causal_lm
    from rlaif.train_common import apply_lora

    trust, pickle = cfg.backend.trust_remote_code, cfg.backend.allow_pickle
    if cfg.sft.lora:
        model, tok = load_causal_lm(
            base, device=device, trust_remote_code=trust, allow_pickle=pickle
        )
        if ckpt is None:
            model = apply_lora(model, cfg.sft)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(ckpt), is_trainable=True)
    else:
        model, tok = load_causal_lm(
            ckpt or base, device=device, trust_remote_code=trust, allow_pickle=pickle
        )
    model.train()
    return model, tok


def run(cfg: RunConfig) -> Path:
    """Fine-tune ``cfg.model`` on the revisions; return the output model directory."""
    from rlaif.distributed import setup
    from rlaif.progress import progress
    from rlaif.train_common import (
        autocast,
        autocast_dtype,
        build_optimizer,
        epoch_batches,
        merged_for_saving,
        set_seed,
        total_optimizer_steps,
    )

    scfg, run_dir = cfg.sft, cfg.run_path
    if scfg.batch_size < 1 or scfg.grad_accum < 1:
        raise UserError("sft.batch_size and sft.grad_accum must be at least 1")
    out, ckpt_root = run_dir / "sft", run_dir / "checkpoints" / STAGE
    manifest_path = run_dir / "manifests" / f"{STAGE}.json"
    rev, helpful = _paths(cfg)
    base = _base_model(cfg.model)
    dist, device = setup(cfg.backend.device, "sft")
    inputs = hash_inputs({"revisions": rev, "helpful": helpful or "none", "model": base})
    config = {"sft": asdict(scfg), "model": cfg.model, "seed": cfg.seed}
    config |= dist.layout()  # processes (the global batch) and sharding shape the result
    fp = fingerprint(scrub(config), inputs)
    prev = read_manifest(manifest_path)
    if prev and prev.get("fingerprint") == fp and (out / "config.json").is_file():
        log.info("sft: %s is up to date (same config and inputs); nothing to do", out)
        shutil.rmtree(ckpt_root, ignore_errors=True)  # what a kill during the cleanup left
        return out

    ckpt = latest_checkpoint(ckpt_root)
    state: dict[str, Any] = {}
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        if state.get("fingerprint") != fp:
            log.warning(
                "sft: checkpoints in %s are from another config or data; starting over", ckpt_root
            )
            dist.wait()  # every rank has read it before it goes
            if dist.main:
                shutil.rmtree(ckpt_root)
            ckpt, state = None, {}

    set_seed(cfg.seed)
    model, tok = _load_model(cfg, base, ckpt, device)
    examples = build_examples(cfg, rev, helpful)
    encoded = [
        encode(tok, ex, scfg.max_length)
        for ex in progress(examples, desc="sft: tokenize", unit="ex")
    ]
    total = total_optimizer_steps(len(encoded), scfg, dist.world)
    opt, sched = build_optimizer(model, scfg, total)
    forward, opt = dist.prepare(model, opt, response_logits, max_grad_norm=scfg.max_grad_norm)
    start = 0
    if ckpt is not None:  # after prepare: a sharded optimizer loads its own shard
        load_opt = functools.partial(dist.load_optimizer_state, opt, ckpt)
        state = load_trainer_state(ckpt, scheduler=sched, load_optimizer=load_opt)
        start = int(state["step"])
        log.info("sft: resuming from %s (step %d of %d)", ckpt, start, total)
    amp = autocast_dtype(scfg, device, dist)
    log.info(
        "sft: %d examples (%s), %d steps, %s, autocast %s, device %s, %d process(es)",
        len(encoded),
        dict(Counter(ex.source.split(":")[0] for ex in examples)),
        total,
        "LoRA" if scfg.lora else "full fine-tuning",
        amp or "off (fp32)",
        device,
        dist.world,
    )

    metrics = MetricsLog(
        run_dir / "metrics" / f"{STAGE}.jsonl",
        resume_step=start if ckpt else None,
        active=dist.main,
    )
    n_resp = [sum(y != IGNORE for y in labels[1:]) for _, labels in encoded]
    lengths = [len(ids) for ids, _ in encoded]
    stream = epoch_batches(lengths, scfg.batch_size * dist.world, seed=cfg.seed)
    for _ in range(start * scfg.grad_accum):  # replay the batch order up to the checkpoint
        next(stream)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    last_good, loss_val = ckpt, float(state.get("loss", float("nan")))
    bar = progress(
        range(start + 1, total + 1), desc="sft", unit="step", initial=start, total=total,
        show=dist.main,
    )  # fmt: skip
    for step in bar:
        t0 = time.perf_counter()
        micro = [next(stream) for _ in range(scfg.grad_accum)]  # global micro-batches
        n_tok = sum(n_resp[i] for _, idx in micro for i in idx)
        loss_sum = 0.0
        for j, (_, idx) in enumerate(micro):
            rows, real = dist.shard(idx)  # this process's slice
            b = {k: v.to(device) for k, v in collate([encoded[i] for i in rows], pad_id).items()}
            with dist.syncing(j == len(micro) - 1):
                with autocast(amp, device):
                    logits, targets = forward(b)
                loss = response_loss(logits, targets, n_tok)
                # DDP averages over processes; the sum over processes is the global batch's loss
                dist.backward(loss * (dist.world if real else 0.0))
            loss_sum += float(loss.detach()) if real else 0.0
        loss_sum = dist.sum(loss_sum)
        check = functools.partial(check_finite, step, STAGE, last_good, loss=loss_sum)
        gnorm = dist.clip_and_step(model, opt, scfg.max_grad_norm, check)
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_val = loss_sum
        dt = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{n_tok / dt:.0f}")
        if step % scfg.log_every == 0 or step == total:
            metrics.log(
                step,
                loss=loss_val,
                grad_norm=gnorm,
                lr=sched.get_last_lr()[0],
                tokens=n_tok,
                epoch=micro[-1][0],
                tokens_per_s=n_tok / dt,
            )
        if step % scfg.save_every == 0 or step == total:
            save = functools.partial(
                save_checkpoint,
                ckpt_root,
                step,
                # every rank takes part
                **dist.checkpoint_parts(model, opt, ckpt_root, step, final=step == total),
                tokenizer=tok,
                scheduler=sched,
                state={"fingerprint": fp, "loss": loss_val, "total": total},
                keep=scfg.keep_checkpoints,
            )
            last_good = dist.on_main(save)
    bar.close()
    model = dist.unsharded(model)
    dist.release()
    if not dist.main:
        dist.wait()  # for the main process to write the model and the manifest
        return out

    final = merged_for_saving(model)
    final_dtype = next(final.parameters()).dtype

    save_model_dir(out, final, tok)
    counts = Counter(ex.source.split(":")[0] for ex in examples)
    write_manifest(
        manifest_path,
        stage=STAGE,
        config=config,
        inputs=inputs,
        extra={
            "output": str(out),
            "base_model": str(base),
            "examples": dict(counts),
            "steps": total,
            "final_loss": loss_val,
            "lora_merged": bool(scfg.lora),
            "autocast": str(amp) if amp else None,
            "saved_dtype": str(final_dtype),
            "device": device,
        },
    )
    shutil.rmtree(ckpt_root, ignore_errors=True)
    log.info("sft: wrote %s (final loss %.4f)", out, loss_val)
    dist.wait()
    return out
