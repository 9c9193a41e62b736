"""A lower bound on a PPO run's time on this CPU: the models' weight matmuls alone.

Every PPO implementation that does the method exactly (sample, score, three no-grad views, then
``epochs`` passes of forward + backward through the policy and the value model) runs at least the
matmuls of its models' linear layers: attention, norms, softmax, the optimizer and all the rest
come on top. :func:`run_matmuls` lists them for a run's token counts, :func:`floor_seconds` times
each distinct shape on this machine (``F.linear`` and its backward, as autograd runs them) and adds
them up. ``benchmarks/ppo.py`` divides the peer's time by this floor: no implementation of the
same arithmetic in the same dtype can be faster than ``max_speedup`` here.

Counted (``B`` = the body's linears, ``H`` = the LM head; ``P``, ``T``, ``R``: a step's prompt,
prompt + answer, and answer tokens; ``n``: episodes per step):

- generation: ``B`` over ``P`` rows (prefill) and ``H`` over ``n`` rows; then one decode step per
  answer token of the mean episode, ``B`` and ``H`` over ``n`` rows;
- the no-grad views: policy and reference (``B`` over ``T``, ``H`` over ``R``: only answer
  positions need logits), value model and PM (``B`` over ``T``; their scalar heads are left out);
- the update, ``epochs`` times: policy and value model as above, forward and backward.

Weight matmuls only: no attention products, no embedding look-up, and every token is real (no
padding), so the bound is generous to whoever is measured against it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (k, n, m, backward): a linear with k inputs and n outputs over m rows, forward only or forward +
# backward (input and weight gradients)
Shape = tuple[int, int, int, bool]


@dataclass(frozen=True)
class Model:
    """The linear layers of a Llama-shaped causal LM."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    @classmethod
    def from_config(cls, path: Path) -> Model:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return cls(
            hidden=hidden,
            intermediate=int(cfg["intermediate_size"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            layers=int(cfg["num_hidden_layers"]),
            vocab=int(cfg["vocab_size"]),
        )

    def body(self) -> list[tuple[int, int]]:
        """``(in, out)`` of one decoder layer's linears: q, k, v, o, gate, up, down."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def run_matmuls(
    model: Model,
    *,
    steps: int,
    episodes_per_step: int,
    prompt_tokens: float,
    answer_tokens: float,
    epochs: int,
) -> Counter[Shape]:
    """How often each linear shape runs in a PPO run; token counts are the run's totals."""
    n = episodes_per_step
    p = round(prompt_tokens / steps)
    r = round(answer_tokens / steps)
    t = p + r
    decode_steps = round(answer_tokens / (steps * n))
    out: Counter[Shape] = Counter()

    def body(m: int, times: int, backward: bool = False) -> None:
        for k, o in model.body():
            out[(k, o, m, backward)] += times * model.layers

    def head(m: int, times: int, backward: bool = False) -> None:
        out[(model.hidden, model.vocab, m, backward)] += times

    body(p, steps)  # prefill
    head(n, steps)
    body(n, steps * decode_steps)  # decode
    head(n, steps * decode_steps)
    body(t, 4 * steps)  # policy, reference, value, PM views
    head(r, 2 * steps)
    body(t, 2 * epochs * steps, backward=True)  # policy and value updates
    head(r, epochs * steps, backward=True)
    return out


def flops(shape: Shape) -> int:
    """Multiply-adds x 2 of one shape: forward 2mkn, backward twice that again."""
    k, n, m, backward = shape
    return 2 * m * k * n * (3 if backward else 1)


def time_linear(shape: Shape, reps: int = 3) -> float:
    """Best-of-``reps`` seconds of ``F.linear`` (and its backward) at ``shape``, in fp32."""
    import torch

    k, n, m, backward = shape
    x = torch.randn(m, k, requires_grad=backward)
    w = torch.randn(n, k, requires_grad=backward)
    grad = torch.ones(m, n)
    best = float("inf")
    for _ in range(reps + 1):  # the first run warms up
        x.grad = w.grad = None
        t0 = time.perf_counter()
        if backward:
            torch.nn.functional.linear(x, w).backward(grad)
        else:
            with torch.no_grad():
                torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return best


def floor_seconds(
    counts: Counter[Shape], timer: Callable[[Shape], float] = time_linear
) -> dict[str, Any]:
    """Seconds of the run's matmuls at this machine's speed for each shape, and their GFLOP."""
    seconds = sum(timer(s) * c for s, c in counts.items())
    gflop = sum(flops(s) * c for s, c in counts.items()) / 1e9
    return {"seconds": seconds, "gflop": gflop, "gflops": gflop / seconds if seconds else 0.0}
