"""Golden values for the RL math in rlaif.rl; every expected number is worked out in the test."""

from __future__ import annotations

import math

import pytest
import torch

from rlaif.rl.advantages import (
    RunningMoments,
    explained_variance,
    gae,
    masked_mean,
    masked_var,
    masked_whiten,
)
from rlaif.rl.kl import AdaptiveKLController, FixedKLController, kl_per_token, per_token_rewards
from rlaif.rl.losses import (
    clipped_value_loss,
    entropy_from_logits,
    logprobs_from_logits,
    ppo_policy_loss,
)
from rlaif.rl.rollout import Rollout, Samples


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(list(rows), dtype=torch.float32)


def test_masked_mean_and_var_ignore_padding() -> None:
    x, m = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    assert float(masked_mean(x, m)) == pytest.approx(2.0)  # (1+2+3)/3
    # deviations -1, 0, 1: squared sum 2, Bessel n-1 = 2 -> 1; population -> 2/3
    assert float(masked_var(x, m)) == pytest.approx(1.0)
    assert float(masked_var(x, m, unbiased=False)) == pytest.approx(2 / 3)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([2.0])


def test_whiten() -> None:
    # mean 2.5; unbiased var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; std = 1.290994
    w = masked_whiten(t([1.0, 2.0, 3.0, 4.0]), t([1, 1, 1, 1]), eps=0.0)
    s = math.sqrt(5 / 3)
    assert w[0].tolist() == pytest.approx([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], abs=1e-6)
    # padding: [1, 2, 3 | 100] -> mean 2, var 1 -> [-1, 0, 1, 0] (padding stays 0)
    w = masked_whiten(t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0]), eps=0.0)
    assert w[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    # shift_mean=False keeps the mean: [-1, 0, 1] + 2
    w = masked_whiten(t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0]), shift_mean=False, eps=0.0)
    assert w[0].tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)


def test_gae_worked_example() -> None:
    # gamma 1, lam 0.5, reward only at the end; V = [0.5, 0.6, 0.7], V after the end = 0
    # t=2: delta = 1 + 0 - 0.7 = 0.3                       A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1  A1 = 0.1 + 0.5 * 0.3 = 0.25
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1  A0 = 0.1 + 0.5 * 0.25 = 0.225
    adv, ret = gae(t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.225, 0.25, 0.3])
    assert ret[0].tolist() == pytest.approx([0.725, 0.85, 1.0])  # A + V


def test_gae_padding_ends_the_episode() -> None:
    # gamma 0.9, lam 1; the third position is padding (its reward 9 and value 5 are ignored)
    # t=1: delta = 2 + 0.9 * 0 - 1 = 1                 A1 = 1
    # t=0: delta = 0.5 + 0.9 * 1 - 1 = 0.4   A0 = 0.4 + 0.9 * 1 * 1 = 1.3
    adv, ret = gae(t([0.5, 2.0, 9.0]), t([1.0, 1.0, 5.0]), t([1, 1, 0]), gamma=0.9, lam=1.0)
    assert adv[0].tolist() == pytest.approx([1.3, 1.0, 0.0])
    assert ret[0].tolist() == pytest.approx([2.3, 2.0, 0.0])


def test_gae_lambda_one_gamma_one_is_return_minus_value() -> None:
    r = t([0.1, -0.2, 0.3, 1.0])
    v = t([0.4, 0.3, 0.2, 0.1])
    adv, ret = gae(r, v, t([1, 1, 1, 1]), gamma=1.0, lam=1.0)
    # Monte-Carlo returns-to-go: 1.2, 1.1, 1.3, 1.0
    assert ret[0].tolist() == pytest.approx([1.2, 1.1, 1.3, 1.0])
    assert adv[0].tolist() == pytest.approx([0.8, 0.8, 1.1, 0.9])


def test_ppo_policy_loss_worked_example() -> None:
    # ratios 1.5, 0.5, 1.1; advantages 1, 1, -1; eps 0.2
    # token 0: max(-1.5, -1.2) = -1.2 (the clip bites); token 1: max(-0.5, -0.8) = -0.5;
    # token 2: max(1.1, 1.1) = 1.1          loss = (-1.2 - 0.5 + 1.1) / 3 = -0.2
    old = t([0.0, 0.0, 0.0])
    new = torch.log(t([1.5, 0.5, 1.1]))
    loss, st = ppo_policy_loss(new, old, t([1.0, 1.0, -1.0]), t([1, 1, 1]), clip_eps=0.2)
    assert float(loss) == pytest.approx(-0.2, abs=1e-6)
    assert st.clipfrac == pytest.approx(1 / 3)
    # approx_kl = mean((r - 1) - log r) = (0.0945349 + 0.1931472 + 0.0046898) / 3
    assert st.approx_kl == pytest.approx((0.0945349 + 0.1931472 + 0.0046898) / 3, abs=1e-6)


def test_ppo_policy_loss_gradient_only_through_unclipped_tokens() -> None:
    new = torch.log(t([1.5, 0.5])).requires_grad_(True)
    loss, _ = ppo_policy_loss(new, t([0.0, 0.0]), t([1.0, 1.0]), t([1, 1]), clip_eps=0.2)
    loss.backward()
    assert new.grad is not None
    # token 0 is clipped (no gradient); token 1: d/dlogp of -A * r / 2 = -0.5 * 0.5 = -0.25
    assert new.grad[0].tolist() == pytest.approx([0.0, -0.25])


def test_clipped_value_loss_worked_example() -> None:
    # v = [1, 0], old = [0.5, 0.5], R = [2, 0.4], clip 0.2
    # token 0: v_clip = 0.7; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 1.69 (clip term larger)
    # token 1: v_clip = 0.3; (0-0.4)^2 = 0.16, (0.3-0.4)^2 = 0.01 -> 0.16
    # loss = 0.5 * (1.69 + 0.16) / 2 = 0.4625
    loss, frac = clipped_value_loss(t([1.0, 0.0]), t([0.5, 0.5]), t([2.0, 0.4]), t([1, 1]), 0.2)
    assert float(loss) == pytest.approx(0.4625)
    assert frac == pytest.approx(0.5)


def test_entropy_and_logprobs() -> None:
    # uniform over 4: H = ln 4; p = [1/4, 3/4]: H = 0.25 ln 4 + 0.75 ln(4/3) = 0.5623351
    assert float(entropy_from_logits(torch.zeros(1, 1, 4))) == pytest.approx(math.log(4))
    logits = torch.log(t([1.0, 3.0]))[None]
    assert float(entropy_from_logits(logits)) == pytest.approx(0.5623351, abs=1e-6)
    lp = logprobs_from_logits(logits, torch.tensor([[1]]))
    assert float(lp) == pytest.approx(math.log(0.75))


def test_kl_estimators() -> None:
    # p = 0.5, ref = 0.25: d = ln 2 = 0.6931472; k2 = d^2 / 2 = 0.2402265; k3 = 1/2 - 1 + d
    lp, ref = torch.log(t([0.5])), torch.log(t([0.25]))
    assert float(kl_per_token(lp, ref, "k1")) == pytest.approx(0.6931472)
    assert float(kl_per_token(lp, ref, "k2")) == pytest.approx(0.2402265)
    assert float(kl_per_token(lp, ref, "k3")) == pytest.approx(0.1931472)
    with pytest.raises(ValueError):
        kl_per_token(lp, ref, "k9")  # type: ignore[arg-type]


def test_kl_estimators_are_unbiased_or_not_on_samples() -> None:
    # pi = [0.7, 0.3], ref = [0.4, 0.6]: KL = 0.7 ln(7/4) + 0.3 ln(1/2) = 0.1837868
    gen = torch.Generator().manual_seed(0)
    x = torch.multinomial(t([0.7, 0.3])[0], 200_000, replacement=True, generator=gen)
    lp = torch.log(t([0.7, 0.3])[0])[x]
    ref = torch.log(t([0.4, 0.6])[0])[x]
    exact = 0.7 * math.log(7 / 4) + 0.3 * math.log(0.5)
    assert float(kl_per_token(lp, ref, "k1").mean()) == pytest.approx(exact, abs=0.01)
    assert float(kl_per_token(lp, ref, "k3").mean()) == pytest.approx(exact, abs=0.01)
    assert float(kl_per_token(lp, ref, "k3").min()) >= 0.0


def test_kl_controllers() -> None:
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 8)
    assert fixed.value == 0.1
    # kl 9 vs target 6: error clip(0.5) = 0.2 -> beta * (1 + 0.2 * 8 / 100) = 0.1016
    up = AdaptiveKLController(0.1, target=6.0, horizon=100)
    up.update(9.0, 8)
    assert up.value == pytest.approx(0.1016)
    # kl 5.4: error -0.1 -> beta * (1 - 0.1 * 8 / 100) = 0.0992
    down = AdaptiveKLController(0.1, target=6.0, horizon=100)
    down.update(5.4, 8)
    assert down.value == pytest.approx(0.0992)


def test_per_token_rewards() -> None:
    # beta 0.5: row 0 -> [-0.05, -0.1, -0.15 + 2]; row 1 (one token) -> [-0.2 - 1, 0, 0]
    r = per_token_rewards(
        torch.tensor([2.0, -1.0]), t([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]), t([1, 1, 1], [1, 0, 0]), 0.5
    )
    assert r.tolist()[0] == pytest.approx([-0.05, -0.1, 1.85])
    assert r.tolist()[1] == pytest.approx([-1.2, 0.0, 0.0])


def test_explained_variance() -> None:
    # target [1, 2, 4]: var 7/3; residual [0, 0, 1]: var 1/3 -> 1 - (1/3) / (7/3) = 6/7
    ev = explained_variance(t([1.0, 2.0, 3.0]), t([1.0, 2.0, 4.0]), t([1, 1, 1]))
    assert ev == pytest.approx(6 / 7)
    assert math.isnan(explained_variance(t([1.0, 2.0]), t([3.0, 3.0]), t([1, 1])))


def test_running_moments() -> None:
    m = RunningMoments()
    m.update([1.0, 2.0, 3.0])
    m.update([4.0, 5.0])
    # 1..5: mean 3, population variance 2
    assert m.mean == pytest.approx(3.0)
    assert m.std == pytest.approx(math.sqrt(2))
    assert m.normalize([3.0, 3.0 + math.sqrt(2)]) == pytest.approx([0.0, 1.0], abs=1e-5)
    again = RunningMoments.from_state(m.state())
    assert again == m
    assert RunningMoments().std == 1.0


def _rollout(n: int) -> Rollout:
    z = torch.zeros(n, 3)
    s = Samples(
        torch.arange(n)[:, None].repeat(1, 2),
        torch.ones(n, 2, dtype=torch.long),
        torch.zeros(n, 3, dtype=torch.long),
        torch.ones(n, 3, dtype=torch.long),
        torch.zeros(n, dtype=torch.bool),
    )
    return Rollout(s, z, z, z, torch.arange(n).float(), z[:, 0], z, z, z, z)


def test_rollout_minibatches_cover_every_episode_once() -> None:
    ro = _rollout(10)
    seen = []
    for mb in ro.minibatches(4, torch.Generator().manual_seed(0)):
        assert mb.samples.input_ids.shape == (len(mb), 5)
        # rows stay aligned across fields: the score equals the prompt's first token
        assert mb.scores.tolist() == mb.samples.query_ids[:, 0].float().tolist()
        seen += mb.scores.long().tolist()
    assert sorted(seen) == list(range(10))
    assert [len(mb) for mb in ro.minibatches(4, torch.Generator())] == [4, 4, 2]
