"""The fused answer-token log-prob + entropy function against the plain formulas and by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlaif.rl.losses import entropy_from_logits, logprobs_from_logits
from rlaif.rl.token_logprobs import token_logprobs_and_entropy


def test_values_by_hand() -> None:
    # p = [1/4, 3/4] at temperature 1: log p[1] = ln 0.75; H = 0.25 ln 4 + 0.75 ln(4/3) = 0.5623351
    logits = torch.log(torch.tensor([[[1.0, 3.0]]]))
    lp, ent = token_logprobs_and_entropy(logits, torch.tensor([[1]]))
    assert float(lp) == pytest.approx(math.log(0.75))
    assert float(ent) == pytest.approx(0.5623351, abs=1e-6)
    # temperature 2 on logits [0, 2 ln 3]: scaled [0, ln 3] -> p = [1/4, 3/4] again
    logits = torch.tensor([[[0.0, 2 * math.log(3.0)]]])
    lp, ent = token_logprobs_and_entropy(logits, torch.tensor([[0]]), temperature=2.0)
    assert float(lp) == pytest.approx(math.log(0.25))
    assert float(ent) == pytest.approx(0.5623351, abs=1e-6)


def _plain(logits: torch.Tensor, tokens: torch.Tensor, temp: float) -> tuple[torch.Tensor, ...]:
    z = logits[:, : tokens.shape[1]] / temp
    return logprobs_from_logits(z, tokens), entropy_from_logits(z)


@pytest.mark.parametrize("use_entropy", [True, False])
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_matches_plain_formulas_and_their_gradient(use_entropy: bool, temp: float) -> None:
    gen = torch.Generator().manual_seed(0)
    b, t, v = 3, 5, 11
    base = torch.randn(b, t + 1, v, generator=gen, dtype=torch.float64) * 3
    tokens = torch.randint(0, v, (b, t), generator=gen)
    w_lp = torch.randn(b, t, generator=gen, dtype=torch.float64)
    w_ent = torch.randn(b, t, generator=gen, dtype=torch.float64)
    grads = []
    outs = []
    for fn in (token_logprobs_and_entropy, _plain):
        x = base.clone().requires_grad_(True)
        lp, ent = fn(x, tokens, temp)
        loss = (lp * w_lp).sum() + ((ent * w_ent).sum() if use_entropy else 0.0)
        loss.backward()
        outs.append((lp.detach(), ent.detach()))
        grads.append(x.grad)
    torch.testing.assert_close(outs[0][0], outs[1][0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    assert float(grads[0][:, t:].abs().sum()) == 0.0  # the extra position gets no gradient
    assert float(grads[0][:, :t].abs().sum()) > 0.0


def test_bf16_logits_keep_their_dtype_and_leave_the_input_alone() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 7, generator=gen).to(torch.bfloat16).requires_grad_(True)
    before = x.detach().clone()
    tokens = torch.randint(0, 7, (2, 3), generator=gen)
    lp, ent = token_logprobs_and_entropy(x, tokens, 0.7)
    assert lp.dtype == ent.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert torch.equal(x.detach(), before)
    ref_lp, ref_ent = _plain(before.float(), tokens, 0.7)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)


def test_fp32_input_is_not_changed_in_place() -> None:
    x = torch.randn(1, 2, 5)
    before = x.clone()
    token_logprobs_and_entropy(x, torch.tensor([[0, 1]]), 0.5)
    assert torch.equal(x, before)


def test_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="T' >= T"):
        token_logprobs_and_entropy(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))
