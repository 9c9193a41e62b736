"""The short-sequence CPU attention gives sdpa's outputs and gradients, padding included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlaif import attention
from rlaif.attention import ATTENTION, use_short_attention
from rlaif.modelio import load_causal_lm
from rlaif.pm import PreferenceModel


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :9] = 0
    return ids, mask


def _run(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    model.zero_grad(set_to_none=True)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    (logits.float() * mask[..., None]).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return (logits.detach() * mask[..., None], *grads)


def test_same_outputs_and_gradients_as_sdpa(tiny_model_dir: Path) -> None:
    torch.manual_seed(0)
    model, _ = load_causal_lm(tiny_model_dir)
    model.eval()
    assert model.config._attn_implementation == "sdpa"
    ids, mask = _batch(model.config.vocab_size)
    want = _run(model, ids, mask)
    assert use_short_attention(model)
    assert model.config._attn_implementation == ATTENTION
    calls = []
    orig = attention.short_attention

    def spy(*a: object, **k: object) -> object:
        calls.append(1)
        return orig(*a, **k)  # type: ignore[arg-type]

    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, spy)
    try:
        got = _run(model, ids, mask)
    finally:
        AttentionInterface.register(ATTENTION, orig)
    assert calls  # the model really went through it
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert not use_short_attention(model)  # already switched: nothing to do


def test_long_inputs_go_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.integrations import sdpa_attention

    seen = []
    monkeypatch.setattr(
        sdpa_attention, "sdpa_attention_forward", lambda *a, **k: seen.append(1) or ("sdpa", None)
    )
    monkeypatch.setattr(attention, "EAGER_MAX_SCORES", 100)
    q = torch.zeros(1, 2, 8, 4)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    module = torch.nn.Module()
    assert attention.short_attention(module, q, q, q, mask)[0] == "sdpa" and seen
    monkeypatch.setattr(attention, "EAGER_MAX_SCORES", 1 << 22)
    out, _ = attention.short_attention(module, q, q, q, mask)
    assert out.shape == (1, 8, 2, 4) and len(seen) == 1
    # no mask over several queries is sdpa's causal case; one query is a decode step
    assert attention.short_attention(module, q, q, q, None)[0] == "sdpa"
    assert attention.short_attention(module, q[:, :, :1], q, q, mask[:, :, :1])[0] == "sdpa"
    assert len(seen) == 3


def test_a_pm_switches_through_its_lm(tiny_model_dir: Path) -> None:
    lm, tok = load_causal_lm(tiny_model_dir)
    pm = PreferenceModel(lm, tok)
    assert use_short_attention(pm) and pm.lm.config._attn_implementation == ATTENTION
