"""Pack a preference pair into one row: the shared prompt once, then both answers.

A chosen and a rejected conversation share every token up to where the answers differ (the
whole dialogue, often most of the pair). Scoring them as two rows runs that prefix twice. Packed,
a row is ``[prefix | chosen suffix | rejected suffix | pads]`` with

- position ids ``0..s-1`` for the prefix, and ``s..`` again for *each* suffix;
- a block attention mask: a token sees the keys at or before it that are in the prefix or in its
  own segment (so the rejected suffix never sees the chosen one); a pad sees only itself (no
  query row is fully masked, which would give NaN in the softmax).

Each answer's last token then has exactly the hidden state it has in its own unpacked, causal
forward pass (same keys, same positions): rewards and gradients are the same up to float
rounding, for ``prefix + chosen + rejected`` tokens instead of ``2 * prefix + chosen + rejected``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PAD, PREFIX, CHOSEN, REJECTED = -1, 0, 1, 2


@dataclass
class PackedPairs:
    input_ids: torch.Tensor
    """(B, T) token ids, right padded."""
    position_ids: torch.Tensor
    """(B, T) positions (each suffix restarts after the prefix)."""
    attention_mask: torch.Tensor
    """(B, 1, T, T) bool, True where a query may attend to a key."""
    read_at: torch.Tensor
    """(B, 2) index of the chosen and the rejected answer's last token."""


def shared_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Tokens ``a`` and ``b`` share at the start, leaving each at least one token of its own."""
    n = min(len(a), len(b)) - 1
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return max(k, 0)


def segments(chosen: Sequence[int], rejected: Sequence[int]) -> tuple[list[int], list[int], int]:
    """``(tokens, segment ids, prefix length)`` of one packed pair, before padding."""
    s = shared_prefix_len(chosen, rejected)
    tokens = [*chosen[:s], *chosen[s:], *rejected[s:]]
    seg = [PREFIX] * s + [CHOSEN] * (len(chosen) - s) + [REJECTED] * (len(rejected) - s)
    return tokens, seg, s


def block_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool attention mask from segment ids ``seg`` (B, T) (module doc)."""
    import torch

    t = seg.shape[1]
    causal = torch.ones((t, t), dtype=torch.bool, device=seg.device).tril()
    q, k = seg[:, :, None], seg[:, None, :]
    same = (k == PREFIX) | (k == q)
    real = (q != PAD) & (k != PAD)
    eye = torch.eye(t, dtype=torch.bool, device=seg.device)
    return ((causal & same & real) | eye)[:, None]


def pack_pairs(
    chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], pad_id: int
) -> PackedPairs:
    """Pack each (chosen, rejected) token pair into one row (module doc)."""
    import torch

    if len(chosen) != len(rejected) or not chosen:
        raise ValueError("pack_pairs: need as many chosen as rejected rows, at least one")
    rows = [segments(c, r) for c, r in zip(chosen, rejected, strict=True)]
    width = max(len(tokens) for tokens, _, _ in rows)
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    seg = torch.full((b, width), PAD, dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    read = torch.zeros((b, 2), dtype=torch.long)
    for i, ((tokens, segs, s), c, r) in enumerate(zip(rows, chosen, rejected, strict=True)):
        n, a = len(tokens), len(c) - s
        ids[i, :n] = torch.tensor(tokens, dtype=torch.long)
        seg[i, :n] = torch.tensor(segs, dtype=torch.long)
        pos[i, :n] = torch.cat(
            [torch.arange(s), torch.arange(s, s + a), torch.arange(s, s + len(r) - s)]
        )
        read[i, 0], read[i, 1] = s + a - 1, n - 1
    return PackedPairs(ids, pos, block_mask(seg), read)
