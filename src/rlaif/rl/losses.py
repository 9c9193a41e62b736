"""PPO losses: clipped surrogate, clipped value loss, entropy and token log-probs.

Shapes: ``B`` sequences, ``T`` response positions, ``V`` vocabulary. Every mean is over the
masked (real) response tokens of the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlaif.rl.advantages import masked_mean


@dataclass(frozen=True)
class PolicyLossStats:
    """Diagnostics of one policy-loss evaluation (plain floats, for logging)."""

    clipfrac: float
    """Share of tokens whose ratio left ``[1 - eps, 1 + eps]`` in the direction the clip bites."""
    approx_kl: float
    """k3 estimate of KL(old || new) over the batch: mean of ``(r - 1) - log r``."""


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log p(tokens)`` under ``logits``: ``[B, T, V]`` and ``[B, T]`` -> ``[B, T]``.

    Computed as ``z[token] - logsumexp(z)``: no vocabulary-sized log-softmax is kept for backward.
    """
    z = logits.float()
    picked = torch.gather(z, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of ``logits``: ``[B, T, V]`` -> ``[B, T]`` (nats).

    ``H = logsumexp(z) - sum_i softmax(z)_i * z_i``.
    """
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    count: float | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """The PPO clipped surrogate (Schulman et al. 2017), as a loss to minimise.

    ``r = exp(logp - old_logp)``; per token ``max(-A * r, -A * clip(r, 1 - eps, 1 + eps))``,
    averaged over masked tokens. All inputs ``[B, T]``; ``old_logprobs`` and ``advantages`` are
    treated as constants. ``count``: the token count to average over when the inputs are one
    shard of a larger batch (see :func:`masked_mean`); the loss and stats are then that shard's
    share, and the shards' values add up to the batch's.
    """
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, count=count)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask, count=count)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask, count=count)
    return loss, PolicyLossStats(float(clipfrac), float(approx_kl))


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    count: float | None = None,
) -> tuple[torch.Tensor, float]:
    """Clipped value loss: ``0.5 * mean(max((v - R)^2, (v_clip - R)^2))`` over masked tokens.

    ``v_clip = old_v + clip(v - old_v, -c, c)`` keeps one update from moving the value far from
    the estimate the advantages were computed with. Returns ``(loss, clipfrac)`` where
    ``clipfrac`` is the share of tokens whose clipped error was the larger one. ``count``: as in
    :func:`ppo_policy_loss`.
    """
    old = old_values.detach()
    target = returns.detach()
    v_clip = old + torch.clamp(values - old, -clip_range, clip_range)
    err = (values - target) ** 2
    err_clip = (v_clip - target) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask, count=count)
    with torch.no_grad():
        frac = masked_mean((err_clip > err).float(), mask, count=count)
    return loss, float(frac)
