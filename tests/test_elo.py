"""Elo / Bradley-Terry against values worked by hand."""

from __future__ import annotations

import math

import pytest

from rlaif.elo import Comparison, elo_table, fit_bradley_terry, to_elo, win_rate_from_elo


def test_two_players_three_wins_in_four() -> None:
    # A beats B 3 times out of 4. The MLE solves sigmoid(d) = 3/4, so d = ln 3 nats, and in Elo
    # 400 / ln 10 * ln 3 = 400 * log10(3) = 190.848...
    games = [Comparison(0, 1, 1.0, "p1"), Comparison(0, 1, 1.0, "p2"), Comparison(0, 1, 1.0, "p3")]
    games.append(Comparison(0, 1, 0.0, "p4"))
    s = fit_bradley_terry(2, games, ridge=0.0)
    assert s[0] - s[1] == pytest.approx(math.log(3), abs=1e-8)
    elo = to_elo(s, reference=1)
    assert elo[0] == pytest.approx(400 * math.log10(3), abs=1e-6)  # 190.85
    assert elo[1] == 0.0


def test_soft_outcome_equals_hard_counts() -> None:
    # One game with y = 0.75 has the same likelihood maximum as 3 wins + 1 loss.
    s = fit_bradley_terry(2, [Comparison(0, 1, 0.75)], ridge=0.0)
    assert s[0] - s[1] == pytest.approx(math.log(3), abs=1e-8)


def test_three_players_consistent_chain() -> None:
    # P(A>B) = P(B>C) = 3/4 and P(A>C) = sigmoid(2 ln 3) = 9/10 are exactly Bradley-Terry with
    # gaps ln 3: Elo relative to A is 0, -190.85, -381.70.
    games = [Comparison(0, 1, 0.75), Comparison(1, 2, 0.75), Comparison(0, 2, 0.9)]
    elo = to_elo(fit_bradley_terry(3, games, ridge=0.0), reference=0)
    step = 400 * math.log10(3)
    assert list(elo) == pytest.approx([0.0, -step, -2 * step], abs=1e-6)
    assert win_rate_from_elo(step) == pytest.approx(0.75)


def test_reversed_pairs_and_ties() -> None:
    # Writing a game from the other side (j, i, 1 - y) changes nothing; all ties give equal Elo.
    a = fit_bradley_terry(2, [Comparison(0, 1, 0.8)], ridge=0.0)
    b = fit_bradley_terry(2, [Comparison(1, 0, 0.2)], ridge=0.0)
    assert list(a) == pytest.approx(list(b))
    ties = fit_bradley_terry(3, [Comparison(0, 1, 0.5), Comparison(1, 2, 0.5)], ridge=0.0)
    assert list(ties) == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)


def test_perfect_record_stays_finite_with_ridge() -> None:
    s = fit_bradley_terry(2, [Comparison(0, 1, 1.0)] * 5)
    assert math.isfinite(s[0]) and s[0] > s[1]


def test_bootstrap_interval_contains_point_and_narrows_with_data() -> None:
    few = [Comparison(0, 1, 1.0 if k % 4 else 0.0, f"p{k}") for k in range(8)]
    many = [Comparison(0, 1, 1.0 if k % 4 else 0.0, f"p{k}") for k in range(200)]
    t_few = elo_table(["a", "b"], few, reference=1, bootstrap=300, seed=1)
    t_many = elo_table(["a", "b"], many, reference=1, bootstrap=300, seed=1)
    for t in (t_few, t_many):
        assert t.low[0] <= t.elo[0] <= t.high[0]
        assert t.elo[1] == 0.0
    assert (t_many.high[0] - t_many.low[0]) < (t_few.high[0] - t_few.low[0])
    assert t_many.elo[0] == pytest.approx(400 * math.log10(3), abs=0.5)
    assert t_many.games == [200, 200]
