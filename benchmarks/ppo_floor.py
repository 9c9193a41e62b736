"""A lower bound on a PPO run's time on this CPU: the models' weight matmuls alone.

Every PPO implementation that does the method exactly (sample, score with the PM, the reference's
view of the answers, then ``epochs`` passes of forward + backward through the policy and the
value model) runs at least the matmuls of its models' linear layers: attention, norms, softmax,
the optimizer and all the rest come on top. :func:`run_matmuls` lists them for a run's token
counts, :func:`floor_seconds` times each distinct shape on this machine (``F.linear`` and its
backward, as autograd runs them, one shape at a time) and adds them up. ``benchmarks/ppo.py``
divides the peer's time by this floor: with this machine's matrix multiply, layer by layer, no
implementation of the same arithmetic in the same dtype could be faster than ``max_speedup``.

Counted (``P``, ``T``, ``R``: a step's prompt, prompt + answer, and answer tokens; ``n``: episodes
per step), as generously as an implementation could get away with:

- q, k and v run as one matmul, gate and up as one; the last decoder layer computes its queries,
  output projection and MLP only at the rows whose output is read (keys and values at all rows);
- generation: prefill over ``P`` rows (logits for ``n`` rows), then one decode step over ``n``
  rows per answer token after the first, for the mean answer;
- no-grad views: the reference (``T`` rows, logits at the ``R`` answer rows) and the PM (``T``
  rows, read at ``n``). The policy's old log-probs can come from the decode, and with one
  mini-batch per step (as in the benchmark) the old values from the first update pass, so
  neither is counted;
- the update, ``epochs`` times: policy (logits at ``R`` rows) and value model (read at ``R`` rows),
  forward and backward.

No attention products, no embedding look-up, scalar heads left out, and every token real (no
padding).
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

    def layer(self, rows: int, m: int) -> list[tuple[int, int, int]]:
        """``(in, out, rows)`` of one decoder layer's matmuls over ``m`` input rows when only
        ``rows`` of its outputs are read (``rows == m``: every layer but the last)."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if rows == m:
            return [(h, q + 2 * kv, m), (q, h, m), (h, 2 * i, m), (i, h, m)]
        return [(h, q, rows), (h, 2 * kv, m), (q, h, rows), (h, 2 * i, rows), (i, h, rows)]


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
    decode_steps = max(0, round(answer_tokens / (steps * n)) - 1)
    out: Counter[Shape] = Counter()

    def forward(m: int, read: int, times: int, *, logits: bool, backward: bool = False) -> None:
        """One model over ``m`` rows, its output read at ``read`` rows (LM head there)."""
        for k, o, rows in model.layer(m, m):
            out[(k, o, rows, backward)] += times * (model.layers - 1)
        for k, o, rows in model.layer(read, m):
            out[(k, o, rows, backward)] += times
        if logits:
            out[(model.hidden, model.vocab, read, backward)] += times

    forward(p, n, steps, logits=True)  # prefill
    forward(n, n, steps * decode_steps, logits=True)  # decode
    forward(t, r, steps, logits=True)  # the reference's view
    forward(t, n, steps, logits=False)  # the PM's scores
    forward(t, r, epochs * steps, logits=True, backward=True)  # policy update
    forward(t, r, epochs * steps, logits=False, backward=True)  # value update
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
    for rep in range(reps + 1):  # the first run warms up, uncounted
        x.grad = w.grad = None
        t0 = time.perf_counter()
        if backward:
            torch.nn.functional.linear(x, w).backward(grad)
        else:
            with torch.no_grad():
                torch.nn.functional.linear(x, w)
        if rep:
            best = min(best, time.perf_counter() - t0)
    return best


def floor_seconds(
    counts: Counter[Shape], timer: Callable[[Shape], float] = time_linear
) -> dict[str, Any]:
    """Seconds of the run's matmuls at this machine's speed for each shape, and their GFLOP."""
    seconds = sum(timer(s) * c for s, c in counts.items())
    gflop = sum(flops(s) * c for s, c in counts.items()) / 1e9
    return {"seconds": seconds, "gflop": gflop, "gflops": gflop / seconds if seconds else 0.0}
