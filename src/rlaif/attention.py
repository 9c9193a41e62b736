"""Attention for short sequences on a CPU: a matmul, a softmax and a matmul instead of SDPA's kernel.

PPO runs its models on batches of short sequences (a prompt and an answer of a few dozen tokens
each), many times a step. There, torch's CPU flash-attention kernel, which ``sdpa`` picks when a
mask is given, costs more than the plain computation: for 8 sequences of 96 tokens and 9 heads
its forward + backward took 25 ms against 16 ms (bf16, 2 cores; docs/ppo.md), and a whole
forward + backward of SmolLM2-135M 15 % more. The plain computation holds the ``[B, H, Lq, Lk]``
scores, so it is used only while they stay small (``EAGER_MAX_SCORES``); longer inputs, one-token
decode steps (where the flash kernel was faster in a PPO rollout), unmasked (causal) batches, other
devices and dropout go to ``sdpa`` as before.

:func:`use_short_attention` switches a loaded model whose attention is ``sdpa`` to this function
(registered with transformers as ``ATTENTION``); its masks are built as for ``sdpa`` (boolean,
``True`` = attend).
"""

from __future__ import annotations

from typing import Any

import torch

ATTENTION = "rlaif_short_eager"
# Largest B * H * Lq * Lk computed the plain way: 4M scores, 16 MB in fp32 per layer.
EAGER_MAX_SCORES = 1 << 22


def short_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; ``[B, Lq, H, D]`` out, no weights returned."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    b, h, lq, d = query.shape
    lk = key.shape[-2]
    plain = (
        query.device.type == "cpu"
        and lq > 1
        and b * h * lq * lk <= EAGER_MAX_SCORES
        and not (dropout and module.training)
        and attention_mask is not None  # without one, sdpa runs its causal kernel
        and attention_mask.dim() == 4
    )
    if not plain:
        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = h // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (scaling if scaling else d**-0.5)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :lk]
        if mask.dtype == torch.bool:
            # a fully masked row (a left-padding query) gets finite weights, not NaN
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, short_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_short_attention(model: Any) -> bool:
    """Switch ``model`` (a transformers model, or a PM) from ``sdpa`` to :func:`short_attention`
    when its weights are on a CPU; return whether it was switched."""
    lm = getattr(model, "lm", model)
    cfg = getattr(lm, "config", None)
    first = next(lm.parameters(), None)
    if cfg is None or first is None or first.device.type != "cpu":
        return False
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    cfg._attn_implementation = ATTENTION
    return True
