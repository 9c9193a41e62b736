"""Advantages and normalisation: masked statistics, whitening, GAE, running reward moments.

Shapes: ``B`` sequences, ``T`` response positions. Masks are ``[B, T]`` with 1 for real response
tokens; a response occupies a prefix of its row (right padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, count: float | None = None
) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (over all of them, or along ``dim``).

    ``count`` (with ``dim=None``): divide the masked sum by this token count instead of the
    mask's own, for one shard of a larger batch of ``count`` tokens; the shards' results then
    add up to the whole batch's mean.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        if count is not None:
            return (x * mask).sum() / max(count, 1.0)
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``x`` (Bessel-corrected unless ``unbiased`` is False)."""
    mean = masked_mean(x, mask)
    centered = (x - mean) * mask.to(x.dtype)
    n = mask.to(x.dtype).sum()
    denom = (n - 1.0).clamp(min=1.0) if unbiased else n.clamp(min=1.0)
    return (centered**2).sum() / denom


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Scale the masked entries of ``x`` to unit variance (and zero mean when ``shift_mean``).

    Padded positions come back as 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    Args:
        rewards: ``[B, T]`` reward received after each token.
        values: ``[B, T]`` value estimate V(s_t) before each token.
        mask: ``[B, T]`` 1 for real tokens. The episode ends after the last one: the value after
            it is 0, and padded positions contribute nothing.
        gamma: discount; lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, 0 at padded positions;
        ``returns = advantages + values`` on real tokens (the value-function target).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``.
    """
    m = mask.to(values.dtype)
    r = rewards * m
    v = values * m
    steps = r.shape[1]
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    for t in reversed(range(steps)):
        next_v = v[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


def explained_variance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var[target - pred] / Var[target]`` over masked entries (nan when Var[target] is 0)."""
    var_t = masked_var(target, mask)
    if float(var_t) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(target - pred, mask) / var_t)


@dataclass
class RunningMoments:
    """Running mean and standard deviation of a stream of scalars (Chan et al. parallel update).

    Used to normalise PM scores: ``(score - mean) / std`` with the statistics of every score seen
    so far, the current batch included. Serialisable with :meth:`state` / :meth:`from_state`.
    """

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    """Sum of squared deviations from the mean."""

    def update(self, xs: list[float]) -> None:
        n = float(len(xs))
        if n == 0:
            return
        b_mean = sum(xs) / n
        b_m2 = sum((x - b_mean) ** 2 for x in xs)
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Population standard deviation (1.0 until two values have been seen)."""
        if self.count < 2 or self.m2 <= 0.0:
            return 1.0
        return math.sqrt(self.m2 / self.count)

    def normalize(self, xs: list[float], eps: float = 1e-6) -> list[float]:
        return [(x - self.mean) / (self.std + eps) for x in xs]

    def state(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_state(cls, state: dict[str, float]) -> RunningMoments:
        return cls(float(state["count"]), float(state["mean"]), float(state["m2"]))
