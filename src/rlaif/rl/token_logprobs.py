"""Answer-token log-probs and entropies from vocabulary-wide logits, one sequence at a time.

The plain way (:func:`rlaif.rl.losses.logprobs_from_logits` and ``entropy_from_logits``) casts the
``[B, T, V]`` logits to fp32, scales them by the temperature and takes a log-sum-exp and a softmax:
autograd then keeps three or four ``[B, T, V]`` fp32 tensors for backward and makes as many again
in it. With SmolLM2's 49k vocabulary, 8 answers of 48 tokens, each is 75 MB.

:func:`token_logprobs_and_entropy` gives the same numbers from an autograd function that keeps
only the logits it was given and one float per token (the entropy), and works
through the vocabulary one sequence at a time, in forward and in backward, so its scratch memory
is one ``[T, V]`` fp32 block. The gradient is worked by hand:

    log p = z / t - lse,   d(log p[y]) / dz = (onehot(y) - p) / t
    H = -sum p log p,      dH / dz = -p * (log p + H) / t
"""

from __future__ import annotations

from typing import Any

import torch


def _log_softmax_rows(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 ``log p`` of ``[T, V]`` logits at ``temperature``, as a new tensor."""
    x = z.float()
    if x.data_ptr() == z.data_ptr():
        x = x.clone()
    if temperature != 1.0:
        x.div_(temperature)
    return x.sub_(torch.logsumexp(x, dim=-1).unsqueeze(-1))


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, tokens: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = tokens.shape
        lp = torch.empty(b, t, dtype=torch.float32, device=logits.device)
        ent = torch.empty_like(lp)
        for i in range(b):
            logp = _log_softmax_rows(logits[i, :t], temperature)
            lp[i] = logp.gather(-1, tokens[i].unsqueeze(-1)).squeeze(-1)
            ent[i] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(logits, tokens, ent)
        ctx.temperature = temperature
        return lp, ent

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None]:
        logits, tokens, ent = ctx.saved_tensors
        temp = ctx.temperature
        b, t = tokens.shape
        grad = torch.empty_like(logits)
        if logits.shape[1] > t:
            grad[:, t:].zero_()
        for i in range(b):
            logp = _log_softmax_rows(logits[i, :t], temp)
            p = logp.exp()
            if g_ent is not None:  # -p * (log p + H) * dL/dH
                g = logp.add_(ent[i].unsqueeze(-1)).mul_(p).mul_(-g_ent[i].unsqueeze(-1))
            else:
                g = logp.zero_()
            if g_lp is not None:  # (onehot - p) * dL/dlogp
                gl = g_lp[i].unsqueeze(-1)
                g.sub_(p.mul_(gl)).scatter_add_(-1, tokens[i].unsqueeze(-1), gl)
            if temp != 1.0:
                g.div_(temp)
            grad[i, :t] = g
        return grad, None, None


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(tokens)`` and the entropy (nats) of the sampling distribution, both ``[B, T]`` fp32.

    ``logits``: ``[B, T', V]`` with ``T' >= T``, any float dtype; position ``j`` predicts
    ``tokens[:, j]`` and positions ``T`` and later are ignored (they get a zero gradient).
    ``temperature`` divides the logits first. Both outputs carry gradients to ``logits``.
    """
    if logits.dim() != 3 or tokens.dim() != 2 or logits.shape[1] < tokens.shape[1]:
        raise ValueError(
            f"expected [B, T', V] logits and [B, T] tokens, T' >= T; got "
            f"{tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    lp, ent = _TokenStats.apply(logits, tokens, float(temperature))
    return lp, ent
