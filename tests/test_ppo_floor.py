"""benchmarks/ppo_floor.py: the matmul count behind the PPO benchmark's ``max_speedup``."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from ppo_floor import Model, Shape, floor_seconds, flops, run_matmuls, time_linear

# q 4x4, k and v 4x2 (fused: 4x8), o 4x4, gate and up 4x8 (fused: 4x16), down 8x4: 144 weights a
# layer. The last layer reads only some rows: q, o, gate/up and down (128 weights) run there, k and
# v (16 weights) at every row.
TINY = Model(hidden=4, intermediate=8, heads=2, kv_heads=1, head_dim=2, layers=3, vocab=10)
HEAD = 4 * 10


def body(m: int, read: int) -> int:
    """Forward FLOPs of the tiny model's 3 layers over m rows, read at ``read`` rows."""
    return 2 * (2 * 144 * m + 16 * m + 128 * read)


def counts() -> Counter[Shape]:
    # 2 steps of 2 episodes; per step 6 prompt and 4 answer tokens (answers of 2 tokens: the
    # prefill gives the first, one decode step the second), 3 epochs
    return run_matmuls(
        TINY, steps=2, episodes_per_step=2, prompt_tokens=12, answer_tokens=8, epochs=3
    )


def test_run_matmuls_counts_every_pass_by_hand() -> None:
    expected = (
        (body(6, 2) + 2 * HEAD * 2) * 2  # prefill: 6 rows, logits at 2, for 2 steps
        + (body(2, 2) + 2 * HEAD * 2) * 2 * 1  # 1 decode step of 2 rows, 2 steps
        + (body(10, 4) + 2 * HEAD * 4) * 2  # the reference: logits at the 4 answer rows
        + body(10, 2) * 2  # the PM: read at the last token of each episode
        + 3 * (body(10, 4) + 2 * HEAD * 4) * 3 * 2  # the policy, forward + backward, 3 epochs
        + 3 * body(10, 4) * 3 * 2  # the value model, read at the answer rows
    )
    assert expected == 301_952
    got = counts()
    assert sum(flops(s) * c for s, c in got.items()) == expected
    # fused q/k/v over 10 rows, backward: 2 full layers x 2 models x 3 epochs x 2 steps
    assert got[(4, 8, 10, True)] == 24
    assert got[(4, 10, 4, True)] == 6  # the LM head's backward: 3 epochs x 2 steps
    assert got[(4, 10, 2, False)] == 2 + 2  # the prefill's logits + 1 decode step, 2 steps


def test_floor_adds_the_timed_shapes() -> None:
    out = floor_seconds(counts(), timer=lambda s: flops(s) / 1e9)  # 1 GFLOP/s everywhere
    assert out["gflop"] == 301_952 / 1e9
    assert abs(out["seconds"] - 301_952 / 1e9) < 1e-15
    assert abs(out["gflops"] - 1.0) < 1e-9


def test_model_reads_a_llama_config(tmp_path: Path) -> None:
    cfg = {
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 32,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = Model.from_config(tmp_path / "config.json")
    assert (m.kv_heads, m.head_dim) == (4, 2)  # no GQA, hidden / heads when not given
    assert m.layer(5, 5) == [(8, 24, 5), (8, 8, 5), (8, 32, 5), (16, 8, 5)]
    assert m.layer(2, 5) == [(8, 8, 2), (8, 16, 5), (8, 8, 2), (8, 32, 2), (16, 8, 2)]


def test_time_linear_times_forward_and_backward() -> None:
    assert time_linear((8, 4, 3, False), reps=1) > 0
    assert time_linear((8, 4, 3, True), reps=1) > 0
