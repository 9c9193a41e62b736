"""Preference-model losses and metrics as pure functions of reward tensors.

Notation: ``r_a``, ``r_b`` are the scalar rewards of the two answers of each pair, shape ``(B,)``;
``p`` is the probability that ``a`` is the better answer (the soft label ``p_chosen``), shape
``(B,)``; the model's own probability is ``sigmoid(r_a - r_b)`` (Bradley-Terry).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """PMP / hard-label ranking loss: ``mean(-log sigmoid(r_chosen - r_rejected))``."""
    import torch.nn.functional as F

    return -F.logsigmoid(r_chosen - r_rejected).mean()


def soft_preference_loss(r_a: torch.Tensor, r_b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``mean(-[p log sigmoid(r_a - r_b) + (1 - p) log sigmoid(r_b - r_a)])``.

    With ``p = 1`` this is :func:`ranking_loss`. Its minimum over the margin is at
    ``sigmoid(r_a - r_b) = p`` (the binary cross-entropy of the model's probability against p).
    """
    import torch.nn.functional as F

    d = r_a - r_b
    p = p.to(d.dtype)
    return -(p * F.logsigmoid(d) + (1.0 - p) * F.logsigmoid(-d)).mean()


def pair_accuracy(r_a: torch.Tensor, r_b: torch.Tensor, p: torch.Tensor | None = None) -> float:
    """Share of pairs whose reward order agrees with the label.

    A pair counts when ``r_a > r_b`` and ``p > 0.5`` or ``r_a < r_b`` and ``p < 0.5``; pairs with
    ``p == 0.5`` (no preference) are left out; a reward tie counts as half right. ``p`` defaults
    to 1 (hard labels). Returns NaN when no pair has a preference.
    """
    import torch

    d = (r_a - r_b).float()
    target = torch.ones_like(d) if p is None else p.float().to(d.device)
    keep = target != 0.5
    if not bool(keep.any()):
        return float("nan")
    sign = torch.where(target > 0.5, 1.0, -1.0)
    agree = torch.where(d == 0, 0.5, (d * sign > 0).float())
    return float(agree[keep].mean())


def mean_margin(r_a: torch.Tensor, r_b: torch.Tensor) -> float:
    """Mean of ``r_a - r_b`` (the reward margin of chosen over rejected)."""
    return float((r_a - r_b).float().mean())


def expected_calibration_error(
    q: Sequence[float], p: Sequence[float] | None = None, bins: int = 10
) -> float:
    """ECE of predicted probabilities ``q`` (that the first answer is better) against labels ``p``.

    Each pair is seen from the side the model favours: confidence ``c = max(q, 1 - q)`` and
    outcome ``y = p`` if ``q >= 0.5`` else ``1 - p`` (soft labels give fractional outcomes).
    Pairs fall into ``bins`` equal-width confidence bins on [0.5, 1]; the ECE is the
    count-weighted mean over bins of ``|mean(y) - mean(c)|``. A perfectly calibrated model
    scores 0. Returns NaN for no pairs.
    """
    n = len(q)
    if n == 0:
        return float("nan")
    labels = [1.0] * n if p is None else [float(x) for x in p]
    if len(labels) != n:
        raise ValueError("q and p differ in length")
    sums: dict[int, list[float]] = {}
    for qi, pi in zip(q, labels, strict=True):
        conf = max(qi, 1.0 - qi)
        y = pi if qi >= 0.5 else 1.0 - pi
        b = min(int((conf - 0.5) * 2 * bins), bins - 1)
        acc = sums.setdefault(b, [0.0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += conf
        acc[2] += y
    return sum(abs(s[2] / s[0] - s[1] / s[0]) * s[0] for s in sums.values()) / n
