"""KL between the policy and the reference, per token, and the controllers of its coefficient.

Estimators of ``KL(pi || ref)`` from samples ``x ~ pi`` (Schulman, "Approximating KL divergence",
2020), with ``d = log pi(x) - log ref(x)``:

- ``k1 = d``: unbiased, high variance, can be negative for single tokens;
- ``k2 = d^2 / 2``: biased, low variance, always >= 0;
- ``k3 = exp(-d) - 1 + d``: unbiased, low variance, always >= 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token KL estimate, ``[B, T]`` from two ``[B, T]`` log-prob tensors."""
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2 or k3)")


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """A fixed coefficient ignores the measured KL."""

    def state(self) -> dict[str, float]:
        return {"value": self.value}


@dataclass
class AdaptiveKLController:
    """Proportional control of beta toward a target KL (Ziegler et al. 2019).

    After each batch of ``n_steps`` episodes with mean sequence KL ``kl``:
    ``e = clip(kl / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_steps / horizon)``.
    """

    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state(self) -> dict[str, float]:
        return {"value": self.value}


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(init: float, adaptive: bool, target: float, horizon: float) -> KLController:
    if adaptive:
        return AdaptiveKLController(init, target, horizon)
    return FixedKLController(init)


def per_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The PPO reward: ``-beta * kl_t`` at every token plus the sequence score at its last token.

    ``scores`` is ``[B]``; ``kl`` and ``mask`` are ``[B, T]`` (mask: a prefix of ones per row).
    Returns ``[B, T]``, 0 on padding.
    """
    m = mask.to(kl.dtype)
    rewards = -beta * kl * m
    last = (m.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype) * (m.sum(1) > 0).to(rewards.dtype)
    return rewards
