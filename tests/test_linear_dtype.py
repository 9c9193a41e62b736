"""Linear weights held in bf16 give exactly what bf16 autocast gives with fp32 weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from rlaif.linear_dtype import linear_weights_as, store_linear_weights
from rlaif.modelio import load_causal_lm
from rlaif.pm import PreferenceModel

BF16 = torch.bfloat16


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        return model(input_ids=ids).logits.float()


@pytest.fixture
def model_and_ids(tiny_model_dir: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, _ = load_causal_lm(tiny_model_dir)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    return model.eval(), ids


def test_swapped_weights_give_the_autocast_numbers_and_come_back(
    model_and_ids: tuple[torch.nn.Module, torch.Tensor],
) -> None:
    model, ids = model_and_ids
    params = dict(model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied in the tiny model
    want = _logits(model, ids)
    with linear_weights_as(model, BF16):
        q = model.model.layers[0].self_attn.q_proj.weight
        assert q.dtype == BF16 and not q.requires_grad
        assert model.lm_head.weight.dtype == BF16
        assert model.model.embed_tokens.weight.dtype == torch.float32  # untied for the block
        assert model.model.norm.weight.dtype == torch.float32
        got = _logits(model, ids)
    assert torch.equal(got, want)
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in params.items())  # the optimizer's tensors, not copies
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_originals_return_after_an_error_and_none_is_a_no_op(
    model_and_ids: tuple[torch.nn.Module, torch.Tensor],
) -> None:
    model, _ = model_and_ids
    q = model.model.layers[0].self_attn.q_proj.weight
    with pytest.raises(RuntimeError), linear_weights_as(model, BF16):
        raise RuntimeError("boom")
    assert model.model.layers[0].self_attn.q_proj.weight is q
    with linear_weights_as(model, None):
        assert model.model.layers[0].self_attn.q_proj.weight is q


def test_stored_frozen_model_matches_and_skips_named_modules(
    tiny_model_dir: Path, model_and_ids: tuple[torch.nn.Module, torch.Tensor]
) -> None:
    model, ids = model_and_ids
    frozen = copy.deepcopy(model).requires_grad_(False)
    n = store_linear_weights(frozen, BF16)
    assert n == 7 * model.config.num_hidden_layers + 1  # q k v o gate up down per layer + LM head
    assert torch.equal(_logits(frozen, ids), _logits(model, ids))
    assert frozen.model.embed_tokens.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32  # the original is untouched
    lm, tok = load_causal_lm(tiny_model_dir)
    pm = PreferenceModel(lm, tok)
    store_linear_weights(pm, BF16, skip=("head", "lm_head"))
    assert pm.head.weight.dtype == torch.float32
    assert pm.lm.lm_head.weight.dtype == torch.float32
    assert pm.lm.model.layers[0].mlp.down_proj.weight.dtype == BF16
    assert store_linear_weights(pm, None) == 0


def test_stored_model_lets_go_of_its_safetensors_mapping(tiny_model_dir: Path) -> None:
    """After :func:`store_linear_weights` no tensor of the model lies in the file's mapping, so
    the pages the cast read in are released (a loaded model views its safetensors file)."""
    model, _ = load_causal_lm(tiny_model_dir)
    target = str((tiny_model_dir / "model.safetensors").resolve())

    def mapped() -> list[tuple[int, int]]:
        out = []
        for line in Path("/proc/self/maps").read_text().splitlines():
            if line.endswith(target):
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
        return out

    def in_file() -> list[str]:
        spans = mapped()
        named = [*model.named_parameters(), *model.named_buffers()]
        return [n for n, t in named if any(lo <= t.data_ptr() < hi for lo, hi in spans)]

    if not mapped() or not in_file():
        pytest.skip("this transformers copies safetensors weights on load")
    store_linear_weights(model, BF16)
    assert in_file() == []
    assert model.model.embed_tokens.weight.dtype == torch.float32
