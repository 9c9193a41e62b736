"""benchmarks/ppo_floor.py: the matmul count behind the PPO benchmark's ``max_speedup``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from ppo_floor import Model, floor_seconds, flops, run_matmuls, time_linear

# q 4x4, k and v 4x2, o 4x4, gate and up 4x8, down 8x4: 144 weights a layer, 432 in 3 layers
TINY = Model(hidden=4, intermediate=8, heads=2, kv_heads=1, head_dim=2, layers=3, vocab=10)


def test_run_matmuls_counts_every_pass_by_hand() -> None:
    # 2 steps of 2 episodes; per step 6 prompt and 4 answer tokens (2 decode steps), 3 epochs
    counts = run_matmuls(
        TINY, steps=2, episodes_per_step=2, prompt_tokens=12, answer_tokens=8, epochs=3
    )
    body, head = 432, 4 * 10
    expected = (
        2 * body * 6 * 2  # prefill: 6 prompt tokens a step
        + 2 * head * 2 * 2  # the first token's logits, 2 rows
        + 2 * (body + head) * 2 * 2 * 2  # 2 decode steps of 2 rows, 2 steps
        + 2 * body * 10 * 4 * 2  # policy, reference, value, PM over 10 tokens
        + 2 * head * 4 * 2 * 2  # policy and reference logits at the 4 answer tokens
        + 3 * 2 * body * 10 * 2 * 3 * 2  # policy and value forward + backward, 3 epochs
        + 3 * 2 * head * 4 * 3 * 2  # the policy's logits, forward + backward
    )
    assert expected == 405_440
    assert sum(flops(s) * c for s, c in counts.items()) == expected
    # k and v share a shape: 2 a layer x 3 layers x (2 models x 3 epochs x 2 steps)
    assert counts[(4, 2, 10, True)] == 72
    assert counts[(4, 10, 4, True)] == 6  # the LM head's backward: 3 epochs x 2 steps
    assert counts[(4, 10, 2, False)] == 2 + 4  # prefill's last tokens + 2 decode steps, 2 steps


def test_floor_adds_the_timed_shapes() -> None:
    counts = run_matmuls(
        TINY, steps=2, episodes_per_step=2, prompt_tokens=12, answer_tokens=8, epochs=3
    )
    out = floor_seconds(counts, timer=lambda s: flops(s) / 1e9)  # 1 GFLOP/s everywhere
    assert out["gflop"] == 405_440 / 1e9
    assert abs(out["seconds"] - 405_440 / 1e9) < 1e-15
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
    assert m.body() == [(8, 8), (8, 8), (8, 8), (8, 8), (8, 16), (8, 16), (16, 8)]


def test_time_linear_times_forward_and_backward() -> None:
    assert time_linear((8, 4, 3, False), reps=1) > 0
    assert time_linear((8, 4, 3, True), reps=1) > 0
