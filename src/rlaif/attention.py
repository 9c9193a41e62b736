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

It also runs packed rows (:class:`Packing`): PPO's forwards over a batch of episodes pass only
the real tokens, one row of them, so the linear layers and the MLPs skip the prompts' left padding
and the answers' right padding; attention alone unpacks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

ATTENTION = "rlaif_short_eager"
# Largest B * H * Lq * Lk computed the plain way: 4M scores, 16 MB in fp32 per layer.
EAGER_MAX_SCORES = 1 << 22
# The keyword argument that carries a :class:`Packing` through a transformers model's forward
# to :func:`short_attention`.
PACKING = "rlaif_packing"


@dataclass(frozen=True)
class Packing:
    """Where each token of a packed row (the real tokens of a padded batch, side by side, no
    padding) sits in the batch: its row and its position in that row's sequence.

    The linear layers, which hold most of the arithmetic, then run on real tokens only; attention
    alone puts them back into a right-padded ``[batch, heads, width, dim]`` block, where a causal
    mask is all it needs (a sequence's tokens come first in its row, padding after).
    """

    rows: torch.Tensor
    """``[N]`` long: the batch row of each packed token."""
    cols: torch.Tensor
    """``[N]`` long: its position in its sequence (0 for the first real token of the row)."""
    batch: int
    width: int
    """The longest sequence's length."""
    causal: torch.Tensor = field(repr=False)
    """``[width, width]`` bool, True where a query may attend (key position <= its own)."""

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:
        """The packing of a ``[B, L]`` 0/1 mask's real tokens, in row-major order."""
        real = attention_mask.bool()
        lengths = real.sum(1)
        width = int(lengths.max())
        rows = torch.repeat_interleave(torch.arange(len(real), device=real.device), lengths)
        cols = (real.long().cumsum(1) - 1)[real]
        causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
        return cls(rows, cols, len(real), width, causal)

    def spread(self, packed: torch.Tensor) -> torch.Tensor:
        """``[1, heads, N, dim]`` packed -> ``[batch, heads, width, dim]``, zeros where padding."""
        x = packed[0].transpose(0, 1)  # [N, H, D]
        out = x.new_zeros(self.batch, self.width, *x.shape[1:])
        return out.index_put((self.rows, self.cols), x).transpose(1, 2)

    def gather(self, padded: torch.Tensor) -> torch.Tensor:
        """``[batch, width, heads, dim]`` -> ``[1, N, heads, dim]``: the real tokens, packed."""
        return padded[self.rows, self.cols].unsqueeze(0)


def packs(model: Any) -> bool:
    """Whether ``model`` (a transformers model, a PEFT wrapper or a PM) runs
    :func:`short_attention`, so that its forward takes a packed row (the ``PACKING`` keyword)."""
    cfg = getattr(getattr(model, "lm", model), "config", None)
    return getattr(cfg, "_attn_implementation", None) == ATTENTION


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
    """transformers' attention-function signature; ``[B, Lq, H, D]`` out, no weights returned.

    With a :class:`Packing` under the ``PACKING`` keyword, the batch is one packed row: its
    sequences attend each within itself (:func:`_packed_attention`), and ``attention_mask`` is
    not read."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    packing = kwargs.pop(PACKING, None)
    if packing is not None:
        window = kwargs.get("sliding_window")
        return _packed_attention(module, query, key, value, packing, dropout, scaling, window)
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
    if not plain or attention_mask is None:  # (plain has a mask; this tells mypy)
        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = h // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = _plain_attention(query, key, value, scaling or d**-0.5, attention_mask[:, :, :, :lk])
    return out.transpose(1, 2).contiguous(), None


def _plain_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, mask: torch.Tensor
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v``, ``[B, H, Lq, D]``; ``mask`` boolean (True = attend)
    or additive, broadcast over the scores."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if mask.dtype == torch.bool:
        # a fully masked row (a left-padding query) gets finite weights, not NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value)


def _packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packing: Packing,
    dropout: float,
    scaling: float | None,
    window: int | None = None,
) -> tuple[torch.Tensor, None]:
    """Causal attention of each sequence of a packed row within itself: ``[1, N, H, D]`` out.

    The packed ``[1, H, N, D]`` inputs go back to a right-padded block, where the causal mask
    keeps every real query on its own sequence's keys (padding comes after them); the padded
    queries' outputs are dropped on the way back, so they get no gradient. ``window``: the
    layer's sliding window (transformers passes ``sliding_window`` to the attention function),
    a query then seeing only the last ``window`` positions, itself included, as transformers'
    own masks do.
    """
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    q, k, v = (
        packing.spread(x) for x in (query, key, value)
    )  # keys and values before GQA's copies
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    b, h, w, d = q.shape
    scale = scaling if scaling else d**-0.5
    allowed = packing.causal
    if window and window < w:
        allowed = allowed & torch.ones_like(allowed).triu(1 - window)
    if b * h * w * w > EAGER_MAX_SCORES or (dropout and module.training):
        drop = dropout if module.training else 0.0
        band = allowed if allowed is not packing.causal else None
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=band, dropout_p=drop, is_causal=band is None, scale=scale
        )
    else:
        out = _plain_attention(q, k, v, scale, allowed)
    return packing.gather(out.transpose(1, 2)), None


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
