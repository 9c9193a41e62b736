"""Elo scores from pairwise comparisons: a Bradley-Terry fit with bootstrap intervals.

A comparison is ``(i, j, y, group)``: model ``i`` against model ``j`` with outcome ``y`` in [0, 1]
(the probability or share with which ``i`` won; soft outcomes are allowed) and ``group`` the prompt
it came from (the bootstrap resamples prompts, so all comparisons of one prompt move together).

Under Bradley-Terry, P(i beats j) = sigmoid(s_i - s_j). Elo = s * 400 / ln(10), shifted so that the
reference model (index 0 unless given) sits at 0, as the CAI paper plots Elo relative to a baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ELO_PER_NAT = 400.0 / math.log(10.0)


@dataclass(frozen=True)
class Comparison:
    i: int
    j: int
    y: float
    """Outcome for ``i``: 1 = i won, 0 = j won, 0.5 = tie; any value in [0, 1]."""
    group: str = ""


@dataclass(frozen=True)
class EloTable:
    names: list[str]
    elo: list[float]
    low: list[float]
    """2.5 % bootstrap percentile."""
    high: list[float]
    """97.5 % bootstrap percentile."""
    games: list[int]
    """Comparisons each model took part in."""


def fit_bradley_terry(
    n_players: int,
    comparisons: Sequence[Comparison],
    *,
    ridge: float = 1e-4,
    iters: int = 100,
    tol: float = 1e-10,
) -> np.ndarray:
    """Maximum-likelihood strengths (in nats), mean zero, by Newton's method.

    ``ridge`` is a small Gaussian prior on the strengths: it keeps the fit finite when a model
    won (or lost) every game, and is negligible otherwise.
    """
    s = np.zeros(n_players)
    if not comparisons:
        return s
    i = np.array([c.i for c in comparisons])
    j = np.array([c.j for c in comparisons])
    y = np.array([c.y for c in comparisons], dtype=float)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(s[i] - s[j])))
        resid = y - p
        grad = np.bincount(i, resid, n_players) - np.bincount(j, resid, n_players) - ridge * s
        w = p * (1.0 - p)
        hess = np.zeros((n_players, n_players))
        np.add.at(hess, (i, i), -w)
        np.add.at(hess, (j, j), -w)
        np.add.at(hess, (i, j), w)
        np.add.at(hess, (j, i), w)
        hess -= ridge * np.eye(n_players)
        # Strengths are defined up to a shared shift: curving the likelihood along the all-ones
        # direction makes the system solvable without changing the step in any other direction.
        hess -= np.full((n_players, n_players), 1.0 / n_players)
        step = np.linalg.solve(hess, grad)
        s = s - step
        if float(np.max(np.abs(step))) < tol:
            break
    return s - s.mean()


def to_elo(strengths: np.ndarray, reference: int = 0) -> np.ndarray:
    return (strengths - strengths[reference]) * ELO_PER_NAT


def elo_table(
    names: Sequence[str],
    comparisons: Sequence[Comparison],
    *,
    reference: int = 0,
    bootstrap: int = 200,
    seed: int = 0,
) -> EloTable:
    """Elo per model with 95 % intervals from resampling the prompts (groups) with replacement."""
    n = len(names)
    point = to_elo(fit_bradley_terry(n, comparisons), reference)
    groups: dict[str, list[Comparison]] = {}
    for c in comparisons:
        groups.setdefault(c.group, []).append(c)
    keys = sorted(groups)
    rng = np.random.default_rng(seed)
    samples = np.empty((bootstrap, n))
    for b in range(bootstrap):
        picked = rng.integers(0, len(keys), len(keys)) if keys else np.array([], dtype=int)
        resampled = [c for k in picked for c in groups[keys[k]]]
        samples[b] = to_elo(fit_bradley_terry(n, resampled), reference)
    low = np.percentile(samples, 2.5, axis=0) if bootstrap else point
    high = np.percentile(samples, 97.5, axis=0) if bootstrap else point
    games = [sum(1 for c in comparisons if k in (c.i, c.j)) for k in range(n)]
    return EloTable(
        names=list(names),
        elo=[float(v) for v in point],
        low=[float(v) for v in low],
        high=[float(v) for v in high],
        games=games,
    )


def win_rate_from_elo(delta: float) -> float:
    """Expected score of a model ``delta`` Elo above its opponent."""
    return 1.0 / (1.0 + 10.0 ** (-delta / 400.0))
