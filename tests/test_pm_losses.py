"""Golden values for the preference-model losses and metrics, worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlaif.rl.pm_losses import (
    expected_calibration_error,
    mean_margin,
    pair_accuracy,
    ranking_loss,
    soft_preference_loss,
)

LN3 = math.log(3.0)


def test_ranking_loss_golden() -> None:
    # margins 0 and ln 3: -log sigmoid(0) = ln 2 = 0.693147; sigmoid(ln 3) = 3/4, so
    # -log(3/4) = ln(4/3) = 0.287682; mean = 0.490415.
    rc = torch.tensor([1.0, LN3 + 0.5])
    rr = torch.tensor([1.0, 0.5])
    assert float(ranking_loss(rc, rr)) == pytest.approx(0.490415, abs=1e-6)


def test_soft_loss_golden() -> None:
    # margin ln 3 (model says 3/4), label p = 0.75:
    # -(0.75 log(3/4) + 0.25 log(1/4)) = 0.75 * 0.287682 + 0.25 * 1.386294 = 0.562335
    ra, rb, p = torch.tensor([LN3]), torch.tensor([0.0]), torch.tensor([0.75])
    assert float(soft_preference_loss(ra, rb, p)) == pytest.approx(0.562335, abs=1e-6)
    # same margin, p = 0.25: 0.25 * 0.287682 + 0.75 * 1.386294 = 1.111641
    assert float(soft_preference_loss(ra, rb, torch.tensor([0.25]))) == pytest.approx(
        1.111641, abs=1e-6
    )
    # p = 0.5 at margin 0: ln 2
    zero = torch.tensor([0.0])
    assert float(soft_preference_loss(zero, zero, torch.tensor([0.5]))) == pytest.approx(
        math.log(2), abs=1e-7
    )


def test_soft_loss_hard_label_is_ranking_loss() -> None:
    ra, rb = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([0.1, 0.4, -0.5])
    ones = torch.ones(3)
    assert float(soft_preference_loss(ra, rb, ones)) == pytest.approx(float(ranking_loss(ra, rb)))


def test_soft_loss_gradient_vanishes_at_the_label() -> None:
    # d/dd of the loss is sigmoid(d) - p: zero where the model's probability equals p (3/4 here)
    d = torch.tensor([LN3], requires_grad=True)
    soft_preference_loss(d, torch.zeros(1), torch.tensor([0.75])).backward()
    assert d.grad is not None and abs(float(d.grad[0])) < 1e-7
    d2 = torch.tensor([0.0], requires_grad=True)
    soft_preference_loss(d2, torch.zeros(1), torch.tensor([1.0])).backward()
    assert d2.grad is not None and float(d2.grad[0]) == pytest.approx(-0.5)  # sigmoid(0) - 1


def test_pair_accuracy_and_margin() -> None:
    ra = torch.tensor([1.0, -1.0, 0.0, 2.0, -3.0])
    rb = torch.zeros(5)
    # labels: 1 -> right, 1 -> wrong, 1 with a tie -> half, 0.5 -> left out, 0.2 (b better) -> right
    p = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.2])
    assert pair_accuracy(ra, rb, p) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert pair_accuracy(ra[:2], rb[:2]) == pytest.approx(0.5)
    assert math.isnan(pair_accuracy(ra[3:4], rb[3:4], p[3:4]))
    assert mean_margin(ra, rb) == pytest.approx(-1.0 / 5)


def test_ece_golden() -> None:
    # q:    0.9  0.9  0.2  0.6      p: 1 0 1 1
    # conf: 0.9  0.9  0.8  0.6      outcome: 1 0 0 1 (q < 0.5 flips to the other answer: 1 - p)
    # bins: {0.9, 0.9} -> |0.5 - 0.9| * 2 = 0.8; {0.8} -> |0 - 0.8| = 0.8; {0.6} -> |1 - 0.6| = 0.4
    # ECE = (0.8 + 0.8 + 0.4) / 4 = 0.5
    assert expected_calibration_error([0.9, 0.9, 0.2, 0.6], [1, 0, 1, 1]) == pytest.approx(0.5)
    # calibrated: four pairs at 3/4 confidence, three right
    assert expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)
    # soft labels: q = 0.7 against p = 0.7 is calibrated too
    assert expected_calibration_error([0.7, 0.3], [0.7, 0.3]) == pytest.approx(0.0)
    assert math.isnan(expected_calibration_error([]))
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1.0, 0.0])
