"""The PM training loop shared by both phases of `rlaif reward` (PMP and fine-tuning).

Each micro-batch puts its chosen and rejected sequences into ONE forward pass: by default one
row per pair, ``[shared prompt | chosen | rejected]`` with a block attention mask
(:mod:`rlaif.pair_packing`), else 2B right-padded rows; batches are length-bucketed so rows in a
batch have similar lengths.
Checkpoints are atomic (:mod:`rlaif.checkpoint`) and carry the phase fingerprint, so a rerun
resumes only a checkpoint made from the same model, data and settings.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaif.config import RewardConfig
from rlaif.pm import PreferenceModel

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from rlaif.distributed import Dist

log = logging.getLogger(__name__)


def phase_fingerprint(
    init: Path,
    pairs: list[dict[str, Any]],
    cfg: RewardConfig,
    loss: str,
    layout: dict[str, Any] | None = None,
) -> str:
    """A short hash of what determines a phase's result: start model, pairs, settings, loss, and
    the process layout (:meth:`rlaif.distributed.Dist.layout`: the global batch, sharding)."""
    h = hashlib.sha256()
    try:  # a PM directory as the start: its own fingerprint says which weights it holds
        start = json.loads((Path(init) / "pm.json").read_text()).get("fingerprint", "")
    except (OSError, ValueError, AttributeError):
        start = ""
    settings = _train_settings(cfg) | (layout or {})
    h.update(json.dumps([str(init), start, loss, settings], sort_keys=True).encode())
    for p in pairs:
        row = [p["prompt"], p["chosen"], p["rejected"], p.get("p_chosen", 1.0)]
        h.update(json.dumps(row, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _train_settings(cfg: RewardConfig) -> dict[str, Any]:
    keys = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "warmup_ratio",
            "weight_decay", "max_grad_norm", "max_length", "lora", "lora_r", "lora_alpha",
            "lora_dropout")  # fmt: skip
    return {k: getattr(cfg, k) for k in keys}


def build_pm(
    init: Path,
    cfg: RewardConfig,
    *,
    seed: int,
    device: str,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> PreferenceModel:
    """A trainable PM from ``init`` (a PM directory, or a causal LM that gets a fresh head)."""
    from rlaif.pm import is_pm_dir, load_pm, new_pm
    from rlaif.train_common import apply_lora

    if is_pm_dir(init):
        pm = load_pm(init, device=device, trust_remote_code=trust_remote_code)
    else:
        pm = new_pm(
            init,
            max_length=cfg.max_length,
            seed=seed,
            device=device,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )
    pm.max_length = cfg.max_length
    if cfg.gradient_checkpointing:
        pm.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.lm = apply_lora(pm.lm, cfg)
    pm.train()
    return pm


def _conversations(pair: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    prompt = list(pair["prompt"])
    return (
        [*prompt, {"role": "assistant", "content": pair["chosen"]}],
        [*prompt, {"role": "assistant", "content": pair["rejected"]}],
    )


def _loss(kind: str, rc: torch.Tensor, rr: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    from rlaif.rl.pm_losses import ranking_loss, soft_preference_loss

    return ranking_loss(rc, rr) if kind == "ranking" else soft_preference_loss(rc, rr, p)


def _batch_backward(
    pm: PreferenceModel,
    batch: list[int],
    chosen_ids: list[list[int]],
    rejected_ids: list[list[int]],
    p: torch.Tensor,
    cfg: RewardConfig,
    loss_kind: str,
    amp: torch.dtype | None,
    *,
    forward: Callable[..., torch.Tensor] | None = None,
    weight: float = 1.0,
    dist: Dist | None = None,
    last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of one micro-batch's mean loss (divided by grad_accum); return detached rewards.

    Each pass holds the chosen AND rejected answers of its pairs (one forward): packed, one row
    per pair with the shared prompt once (``cfg.pack_pairs``), else two rows. When the padded
    batch exceeds ``cfg.max_pass_tokens`` it is split into passes whose gradients add up to
    exactly the full batch's (each pass's mean loss weighted by its share of the pairs).

    Data-parallel (``dist``): ``batch`` is this process's slice, ``forward`` the DDP-wrapped PM,
    ``weight`` scales the loss to the slice's share of the global batch, and gradients are
    synchronised on the last pass of the optimizer step's last micro-batch (``last``) only.
    """
    import contextlib

    import torch

    from rlaif.train_common import autocast

    call = forward if forward is not None else pm
    from rlaif.pair_packing import shared_prefix_len

    n = len(batch)
    if cfg.pack_pairs:  # a pair is one row: shared prompt, then both answers
        rows = 1
        width = max(
            len(chosen_ids[i])
            + len(rejected_ids[i])
            - shared_prefix_len(chosen_ids[i], rejected_ids[i])
            for i in batch
        )
    else:  # a pair is two right-padded rows
        rows, width = 2, max(max(len(chosen_ids[i]), len(rejected_ids[i])) for i in batch)
    per_pass = max(1, cfg.max_pass_tokens // (rows * width)) if cfg.max_pass_tokens > 0 else n
    device = str(pm.head.weight.device)
    out_c: list[torch.Tensor] = []
    out_r: list[torch.Tensor] = []
    for k in range(0, n, per_pass):
        sub = batch[k : k + per_pass]
        chosen, rejected = [chosen_ids[i] for i in sub], [rejected_ids[i] for i in sub]
        sync = last and k + per_pass >= n
        with dist.syncing(sync) if dist is not None else contextlib.nullcontext():
            with autocast(amp, device):
                if cfg.pack_pairs:
                    rewards = call(*pm.collate_pairs(chosen, rejected))
                    rc, rr = rewards[:, 0], rewards[:, 1]
                else:
                    rewards = call(*pm.collate(chosen + rejected))
                    rc, rr = rewards[: len(sub)], rewards[len(sub) :]
            loss = _loss(loss_kind, rc, rr, p[k : k + per_pass].to(rc.device))
            scaled = loss * (len(sub) / n) * weight / cfg.grad_accum
            dist.backward(scaled) if dist is not None else scaled.backward()
        out_c.append(rc.detach().cpu())
        out_r.append(rr.detach().cpu())
    return torch.cat(out_c), torch.cat(out_r)


def train_pm(
    init: Path,
    pairs: list[dict[str, Any]],
    cfg: RewardConfig,
    *,
    loss_kind: str,
    phase: str,
    ckpt_root: Path,
    metrics_path: Path,
    step_offset: int = 0,
    seed: int = 0,
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    dist: Dist | None = None,
) -> tuple[PreferenceModel, dict[str, Any]]:
    """Train a PM on ``pairs`` ('ranking' or 'soft' loss); return it and the phase's stats.

    ``dist`` (see :mod:`rlaif.distributed`): data-parallel over its processes, each taking
    ``cfg.batch_size`` pairs per micro-batch; only its main process writes files.
    """
    import torch

    from rlaif.checkpoint import (
        check_finite,
        latest_checkpoint,
        load_trainer_state,
        save_checkpoint,
    )
    from rlaif.distributed import Dist
    from rlaif.metrics import MetricsLog
    from rlaif.pair_packing import shared_prefix_len
    from rlaif.pm import TRAINABLE_FILE, load_trainable
    from rlaif.progress import progress
    from rlaif.rl.pm_losses import mean_margin, pair_accuracy
    from rlaif.train_common import (
        autocast_dtype,
        build_optimizer,
        epoch_batches,
        set_seed,
        total_optimizer_steps,
    )

    dist = dist or Dist()
    fp = phase_fingerprint(init, pairs, cfg, loss_kind, dist.layout())
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is not None and json.loads((ckpt / "state.json").read_text()).get("fingerprint") != fp:
        log.warning(
            "reward %s: checkpoints in %s are from other settings; starting over", phase, ckpt_root
        )
        dist.wait()  # every rank has read it before it goes
        if dist.main:
            shutil.rmtree(ckpt_root, ignore_errors=True)
        ckpt = None
    set_seed(seed)
    kw = {"seed": seed, "device": device, "trust_remote_code": trust_remote_code}
    if ckpt is not None and not cfg.lora:
        pm = build_pm(ckpt, cfg, allow_pickle=False, **kw)  # type: ignore[arg-type]
    else:
        pm = build_pm(init, cfg, allow_pickle=allow_pickle, **kw)  # type: ignore[arg-type]
        if ckpt is not None:
            load_trainable(pm, ckpt / TRAINABLE_FILE)
    total = total_optimizer_steps(len(pairs), cfg, dist.world)
    opt, sched = build_optimizer(pm, cfg, total)
    forward, opt = dist.prepare(pm, opt, max_grad_norm=cfg.max_grad_norm)
    start = 0
    if ckpt is not None:  # after prepare: a sharded optimizer loads its own shard
        load_opt = functools.partial(dist.load_optimizer_state, opt, ckpt)
        start = int(load_trainer_state(ckpt, scheduler=sched, load_optimizer=load_opt)["step"])
        log.info("reward %s: resuming from %s (step %d of %d)", phase, ckpt, start, total)
    resume = step_offset + start if (ckpt is not None or step_offset) else None
    metrics = MetricsLog(metrics_path, resume_step=resume, active=dist.main)
    amp = autocast_dtype(cfg, device, dist)

    chosen_ids = pm.encode([_conversations(p)[0] for p in pairs])
    rejected_ids = pm.encode([_conversations(p)[1] for p in pairs])
    targets = [float(p.get("p_chosen", 1.0)) for p in pairs]
    lengths = [
        len(a) + len(b) - shared_prefix_len(a, b) if cfg.pack_pairs else max(len(a), len(b))
        for a, b in zip(chosen_ids, rejected_ids, strict=True)
    ]
    stream = epoch_batches(lengths, cfg.batch_size * dist.world, seed=seed)
    stream = itertools.islice(stream, start * cfg.grad_accum, None)  # skip what was trained

    last_good = ckpt
    pm.train()
    t_start, n_pairs, n_tokens = time.perf_counter(), 0, 0
    row: dict[str, float] = {}
    for step in progress(
        range(start + 1, total + 1), desc=f"reward {phase}", initial=start, total=total,
        show=dist.main,
    ):  # fmt: skip
        sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        for j in range(cfg.grad_accum):
            _, batch = next(stream)  # the global micro-batch
            rows, real = dist.shard(batch)
            share = len(rows) * dist.world / len(batch) if real else 0.0
            p = torch.tensor([targets[i] for i in rows])
            rc, rr = _batch_backward(
                pm, rows, chosen_ids, rejected_ids, p, cfg, loss_kind, amp,
                forward=forward, weight=share, dist=dist, last=j == cfg.grad_accum - 1,
            )  # fmt: skip
            rc, rr = dist.gather(rc, len(batch)), dist.gather(rr, len(batch))
            p = torch.tensor([targets[i] for i in batch])
            loss = _loss(loss_kind, rc, rr, p)
            sums["loss"] += float(loss) / cfg.grad_accum
            sums["accuracy"] += pair_accuracy(rc, rr, p) / cfg.grad_accum
            sums["margin"] += mean_margin(rc, rr) / cfg.grad_accum
            n_pairs += len(batch)
            n_tokens += sum(len(chosen_ids[i]) + len(rejected_ids[i]) for i in batch)
        check = functools.partial(
            check_finite, step, f"reward {phase}", last_good, loss=sums["loss"]
        )
        gnorm = dist.clip_and_step(pm, opt, cfg.max_grad_norm, check)
        sched.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t_start
        row = {**sums, "grad_norm": gnorm, "lr": sched.get_last_lr()[0],
               "pairs_per_s": n_pairs / elapsed, "tokens_per_s": n_tokens / elapsed}  # fmt: skip
        if step % cfg.log_every == 0 or step == total:
            metrics.log(step_offset + step, phase=phase, **row)
        if step % cfg.save_every == 0 or step == total:
            parts = dist.checkpoint_parts(pm, opt, ckpt_root, step, final=step == total)
            last_good = dist.on_main(functools.partial(
                save_checkpoint, ckpt_root, step, **parts, scheduler=sched,
                state={"fingerprint": fp, "phase": phase}, keep=cfg.keep_checkpoints,
            ))  # fmt: skip
    pm = dist.unsharded(pm)  # under FSDP: the main process's full copy, to export
    dist.release()
    pm.eval()
    stats = {"steps": total, "fingerprint": fp, "pairs": len(pairs), "final": row}
    return pm, stats
