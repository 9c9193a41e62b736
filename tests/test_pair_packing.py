"""Packed preference pairs: the shared prompt runs once, rewards and gradients are unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rlaif.data.preferences import load_preferences
from rlaif.pair_packing import CHOSEN, PAD, PREFIX, REJECTED, block_mask, pack_pairs, segments
from rlaif.pm import new_pm


def test_segments_and_positions_by_hand() -> None:
    tokens, seg, s = segments([5, 6, 7, 8], [5, 6, 9])
    assert s == 2 and tokens == [5, 6, 7, 8, 9]
    assert seg == [PREFIX, PREFIX, CHOSEN, CHOSEN, REJECTED]
    packed = pack_pairs([[5, 6, 7, 8], [1, 2]], [[5, 6, 9], [1, 2]], pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 2, 0, 0]]
    # each suffix restarts right after the prefix; identical answers keep one own token each
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 0, 0]]
    assert packed.read_at.tolist() == [[3, 4], [1, 2]]


def test_block_mask_by_hand() -> None:
    seg = torch.tensor([[PREFIX, CHOSEN, REJECTED, REJECTED, PAD]])
    got = block_mask(seg)[0, 0].int().tolist()
    assert got == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],  # the rejected answer never sees the chosen one
        [1, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],  # a pad sees only itself (no all-masked softmax row)
    ]


@pytest.fixture(scope="module")
def pair_rows(fixtures: Path) -> list[dict[str, Any]]:
    return [p.to_json() for p in load_preferences(fixtures / "hh-rlhf-60.jsonl", limit=6)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rewards_and_grads_equal_unpacked(
    tiny_model_dir: Path, pair_rows: list[dict[str, Any]], attn: str
) -> None:
    pm = new_pm(tiny_model_dir, max_length=256, seed=0)
    pm.lm.config._attn_implementation = attn
    convs = [
        [*p["prompt"], {"role": "assistant", "content": p[k]}]
        for k in ("chosen", "rejected")
        for p in pair_rows
    ]
    ids = pm.encode(convs)
    chosen, rejected = ids[: len(pair_rows)], ids[len(pair_rows) :]
    saved = sum(len(c) + len(r) for c, r in zip(chosen, rejected, strict=True))
    packed = pack_pairs(chosen, rejected, 0)
    assert int((packed.read_at[:, 1] + 1).sum()) < saved  # the hh-rlhf prompts ran once

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        pm.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in pm.parameters() if p.grad is not None]

    plain = pm(*pm.collate(chosen + rejected))
    plain = torch.stack([plain[: len(chosen)], plain[len(chosen) :]], dim=1)
    g_plain = grads((plain[:, 0] - plain[:, 1]).sigmoid().log().mean())
    packed_r = pm(*pm.collate_pairs(chosen, rejected))
    g_packed = grads((packed_r[:, 0] - packed_r[:, 1]).sigmoid().log().mean())
    torch.testing.assert_close(packed_r, plain, rtol=1e-4, atol=1e-5)
    assert len(g_plain) == len(g_packed) > 0
    for a, b in zip(g_plain, g_packed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
