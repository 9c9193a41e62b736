"""Named containers for PPO rollouts. Shapes: ``B`` episodes, ``P`` prompt tokens, ``T`` response.

Prompts are left-padded and responses right-padded, so ``cat([query_ids, response_ids], 1)`` is a
batch that a causal LM reads in one forward pass, and response position ``t`` of every row sits at
column ``P + t``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

_C = TypeVar("_C", "Samples", "Rollout")


def _select(obj: _C, idx: torch.Tensor) -> _C:
    """A copy of ``obj`` with every tensor field indexed by ``idx`` along dimension 0."""
    values: dict[str, object] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        values[f.name] = v[idx] if isinstance(v, torch.Tensor) else _select(v, idx)
    return type(obj)(**values)  # type: ignore[arg-type]


@dataclass
class Samples:
    """What generation produced for one batch of prompts."""

    query_ids: torch.Tensor
    """``[B, P]`` long: prompt tokens, left-padded."""
    query_mask: torch.Tensor
    """``[B, P]`` long: 1 on prompt tokens, 0 on left padding."""
    response_ids: torch.Tensor
    """``[B, T]`` long: sampled tokens, right-padded with the pad id after EOS."""
    response_mask: torch.Tensor
    """``[B, T]`` long: 1 on response tokens up to and including the first EOS."""
    truncated: torch.Tensor
    """``[B]`` bool: the response reached the length limit without an EOS."""

    @property
    def input_ids(self) -> torch.Tensor:
        """``[B, P + T]``: prompt and response side by side."""
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[B, P + T]``: 1 on every real prompt or response token."""
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        """``[B]`` long: number of response tokens (EOS included)."""
        return self.response_mask.sum(1)

    def __len__(self) -> int:
        return int(self.query_ids.shape[0])

    def select(self, idx: torch.Tensor) -> Samples:
        return _select(self, idx)

    def padded(self, prompt_width: int, response_width: int, pad_id: int) -> Samples:
        """The same episodes with prompts left-padded to ``prompt_width`` columns and responses
        right-padded to ``response_width`` (pad id, mask 0): what stacking them with wider
        batches needs. Response position ``t`` stays response position ``t``."""
        pad = torch.nn.functional.pad
        dp = prompt_width - self.query_ids.shape[1]
        dt = response_width - self.response_ids.shape[1]
        if dp < 0 or dt < 0:
            raise ValueError(f"cannot pad {tuple(self.input_ids.shape)} down to narrower widths")
        return Samples(
            pad(self.query_ids, (dp, 0), value=pad_id),
            pad(self.query_mask, (dp, 0), value=0),
            pad(self.response_ids, (0, dt), value=pad_id),
            pad(self.response_mask, (0, dt), value=0),
            self.truncated,
        )


@dataclass
class Rollout:
    """One PPO batch: samples plus everything computed from them before the update epochs."""

    samples: Samples
    """The prompts and sampled responses."""
    logprobs: torch.Tensor
    """``[B, T]`` float: log pi_old(token) under the policy that sampled it."""
    ref_logprobs: torch.Tensor
    """``[B, T]`` float: log pi_ref(token) under the frozen reference."""
    values: torch.Tensor
    """``[B, T]`` float: V(prefix before the token) from the value model."""
    scores: torch.Tensor
    """``[B]`` float: normalised PM score minus the truncation penalty (the sequence reward)."""
    raw_scores: torch.Tensor
    """``[B]`` float: PM score as returned by the preference model."""
    kl: torch.Tensor
    """``[B, T]`` float: per-token KL estimate to the reference (0 on padding)."""
    rewards: torch.Tensor
    """``[B, T]`` float: ``-beta * kl`` per token, plus ``scores`` at the last token."""
    advantages: torch.Tensor
    """``[B, T]`` float: GAE advantages (whitened when configured)."""
    returns: torch.Tensor
    """``[B, T]`` float: value targets, ``GAE advantage + value`` before whitening."""

    @property
    def mask(self) -> torch.Tensor:
        return self.samples.response_mask

    def __len__(self) -> int:
        return len(self.samples)

    def select(self, idx: torch.Tensor) -> Rollout:
        return _select(self, idx)

    def minibatches(self, size: int, generator: torch.Generator) -> Iterator[Rollout]:
        """Shuffled mini-batches of ``size`` episodes (the last one may be smaller)."""
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(self), size):
            yield self.select(order[start : start + size])
