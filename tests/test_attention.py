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


def test_packing_golden() -> None:
    """Rows and in-sequence positions of the real tokens, row after row; the causal block."""
    from rlaif.attention import Packing

    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]])
    p = Packing.of(mask)
    assert p.rows.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2]
    assert p.cols.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0]
    assert (p.batch, p.width) == (3, 5)
    assert p.causal.tolist()[1] == [True, True, False, False, False]
    x = torch.arange(9.0).reshape(1, 1, 9, 1)  # [1, H, N, D]
    block = p.spread(x)  # [B, H, W, D]
    assert block[:, 0, :, 0].tolist() == [[0, 1, 2, 0, 0], [3, 4, 5, 6, 7], [8, 0, 0, 0, 0]]
    assert torch.equal(p.gather(block.transpose(1, 2)), x.transpose(1, 2))


def _episodes(vocab: int) -> object:
    """Three episodes: left-padded prompts of 5, 2 and 3 tokens, answers of 4, 1 and 3."""
    from rlaif.rl.rollout import Samples

    gen = torch.Generator().manual_seed(1)
    qm = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    rm = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]])
    q = torch.randint(3, vocab, qm.shape, generator=gen) * qm
    r = torch.randint(3, vocab, rm.shape, generator=gen) * rm
    return Samples(q, qm, r, rm, torch.zeros(3, dtype=torch.bool))


def _mistral_with_window(vocab: int) -> torch.nn.Module:
    """A tiny random Mistral whose layers attend over a sliding window of 3 positions."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=3,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    return MistralForCausalLM(cfg)


@pytest.mark.parametrize("case", ["policy", "value", "sdpa-branch", "widened", "window"])
def test_packed_forwards_match_padded(
    tiny_model_dir: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PPO's forwards with the real tokens packed into one row give the padded batch's answer
    log-probs, entropies and values, and the same weight gradients; padding comes back as 0.

    Cases: the policy and the value function (a PM) on the plain attention branch; the policy
    on the sdpa branch (what long inputs take); a batch widened by ``Samples.padded`` (extra
    left and right padding columns); a model with a sliding window shorter than the sequences.
    """
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from rlaif.attention import packs
    from rlaif.pm import new_pm
    from rlaif.stages.ppo_loop import policy_logprobs, value_estimates

    torch.manual_seed(0)
    value = case == "value"
    if value:
        model: torch.nn.Module = new_pm(tiny_model_dir, seed=0)
        vocab = model.lm.config.vocab_size  # type: ignore[union-attr]
    else:
        model, _ = load_causal_lm(tiny_model_dir)
        vocab = model.config.vocab_size  # type: ignore[union-attr]
    if case == "window":
        model = _mistral_with_window(vocab)
    if case == "sdpa-branch":
        monkeypatch.setattr(attention, "EAGER_MAX_SCORES", 0)
    model.eval()
    s = _episodes(vocab)
    if case == "widened":
        s = s.padded(s.query_ids.shape[1] + 2, s.response_ids.shape[1] + 3, 0)  # type: ignore[attr-defined]
    mask = s.response_mask.bool()  # type: ignore[attr-defined]
    outer = model.decoder() if value else model  # type: ignore[operator]

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if value:
            outs = [value_estimates(model, s)]  # type: ignore[arg-type]
        else:
            lp, ent = policy_logprobs(model, s, 0.7, "grad")  # type: ignore[arg-type]
            outs = [lp, ent]  # type: ignore[list-item]
        sum((o * mask).square().sum() for o in outs).backward()  # type: ignore[union-attr]
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return [o.detach() for o in outs], grads

    assert not packs(outer)
    want_outs, want_grads = run()
    assert use_short_attention(model) and packs(outer)

    def no_mask(*a: object, **k: object) -> None:
        raise AssertionError("transformers built a mask over the packed row")

    AttentionMaskInterface.register(ATTENTION, no_mask)  # causal and sliding-window masks alike
    try:
        got_outs, got_grads = run()
    finally:
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    assert len(got_grads) == len(want_grads) > 2
    for g, w in zip(got_outs, want_outs, strict=True):
        torch.testing.assert_close(g * mask, w * mask, rtol=1e-4, atol=1e-5)
        assert not g[~mask].any()  # padding: zeros
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_packing_needs_prompts_that_end_in_the_last_column() -> None:
    from rlaif.stages.ppo_loop import PackedBatch

    s = _episodes(50)
    s.query_mask[1] = torch.tensor([0, 1, 1, 1, 0])  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="last prompt column"):
        PackedBatch.of(s)  # type: ignore[arg-type]
