"""Pieces every training stage shares: optimizer + schedule, LoRA, autocast dtype, batching, seeds.

Each stage (sft, reward, ppo, dpo) keeps its own loop; this module holds only what is identical.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from rlaif.config import TrainingConfig
    from rlaif.distributed import Dist


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def total_optimizer_steps(n_examples: int, cfg: TrainingConfig, world: int = 1) -> int:
    """Optimizer steps implied by ``epochs`` (and capped by ``max_steps`` when set).

    ``world``: data-parallel processes, each taking ``batch_size`` examples per micro-batch.
    """
    per_epoch = max(1, math.ceil(n_examples / (cfg.batch_size * world * cfg.grad_accum)))
    steps = max(1, math.ceil(per_epoch * cfg.epochs))
    return min(steps, cfg.max_steps) if cfg.max_steps > 0 else steps


def build_optimizer(model: Any, cfg: TrainingConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable parameters, linear warmup then cosine decay to zero."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    decay: list[Any] = []
    no_decay: list[Any] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    params = decay + no_decay
    # The fused kernel does the whole update in one pass over each tensor: on a 2-core CPU it takes
    # 0.08 s a step for 135M parameters against 1.2 s for the default per-tensor loop.
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )
    opt = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), fused=fused or None
    )
    warmup = round(cfg.warmup_ratio * total_steps)
    sched = get_cosine_schedule_with_warmup(opt, warmup, max(total_steps, 1))
    return opt, sched


def apply_lora(model: Any, cfg: TrainingConfig, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap ``model`` with LoRA adapters on every linear layer (peft) when ``cfg.lora``."""
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type=task_type,
    )
    return get_peft_model(model, lcfg)


def merged_for_saving(model: Any) -> Any:
    """A plain model to save: LoRA adapters merged into a copy of the weights."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model


def autocast_dtype(
    cfg: TrainingConfig, device: str = "cpu", dist: Dist | None = None
) -> torch.dtype | None:
    """bf16 for autocast when asked, or when 'auto' and the probe finds bf16 faster; else None.

    ``dist`` (launched runs): the main process probes and every rank takes its answer, so all
    ranks train in one dtype and the probe's line is logged once (probes on ranks that share
    cores could each time differently)."""
    import torch

    if cfg.dtype == "float32":
        return None
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    from rlaif.backends.dtype import pick_dtype

    def probe() -> torch.dtype | None:
        return torch.bfloat16 if pick_dtype("auto", device) == torch.bfloat16 else None

    return probe() if dist is None else dist.on_main(probe)


def autocast(
    dtype: torch.dtype | None, device: str = "cpu"
) -> contextlib.AbstractContextManager[Any]:
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def length_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, shuffle: bool = True, window: int = 50
) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), batch order shuffled.

    Examples are shuffled, then sorted by length inside windows of ``window * batch_size``, so
    batches stay random across the data set but hold similar lengths within.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    span = max(batch_size, window * batch_size)
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def epoch_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, shuffle: bool = True
) -> Iterator[tuple[int, list[int]]]:
    """Endless (epoch, batch indices) stream, re-bucketed with a new seed every epoch."""
    epoch = 0
    while True:
        for batch in length_batches(lengths, batch_size, seed=seed + epoch, shuffle=shuffle):
            yield epoch, batch
        epoch += 1


def grad_norm(model: Any, max_norm: float) -> float:
    """Clip gradients of trainable parameters; return the norm before clipping."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    # FSDP: a DTensor over the shards (its local value is one shard's part)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
