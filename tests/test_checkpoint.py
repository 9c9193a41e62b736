from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlaif.checkpoint import (
    check_finite,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    save_checkpoint,
)
from rlaif.config import TrainingConfig
from rlaif.errors import TrainingDiverged
from rlaif.train_common import build_optimizer, length_batches, total_optimizer_steps


def test_save_resume_roundtrip(tiny_model_dir: Path, tmp_path: Path) -> None:
    from rlaif.modelio import load_causal_lm

    model, tok = load_causal_lm(tiny_model_dir)
    opt, sched = build_optimizer(model, TrainingConfig(lr=1e-3), total_steps=10)
    model.train()
    loss = model(
        **tok("hello there", return_tensors="pt"),
        labels=tok("hello there", return_tensors="pt").input_ids,
    ).loss
    loss.backward()
    opt.step()
    sched.step()
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        save_checkpoint(
            root, step, model=model, tokenizer=tok, optimizer=opt, scheduler=sched, keep=2
        )
    assert [s for s, _ in list_checkpoints(root)] == [2, 3]
    last = latest_checkpoint(root)
    assert last is not None and last.name == "step-000003"
    assert not any(p.name.startswith(".") for p in root.iterdir())  # no temp dirs left
    model2, _ = load_causal_lm(last)
    opt2, sched2 = build_optimizer(model2, TrainingConfig(lr=1e-3), total_steps=10)
    state = load_trainer_state(last, optimizer=opt2, scheduler=sched2)
    assert state["step"] == 3
    assert sched2.get_last_lr() == sched.get_last_lr()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_check_finite() -> None:
    check_finite(1, "sft", None, loss=0.5)
    with pytest.raises(TrainingDiverged, match=r"sft: non-finite value at step 7 \(loss=nan\)"):
        check_finite(7, "sft", Path("x/step-5"), loss=float("nan"))


def test_length_batches_group_similar_lengths() -> None:
    lengths = [5, 100, 6, 98, 7, 99, 4, 101]
    batches = length_batches(lengths, 2, seed=0, window=10)
    assert sorted(i for b in batches for i in b) == list(range(8))
    for b in batches:
        assert max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 3
    assert batches == length_batches(lengths, 2, seed=0, window=10)


def test_total_steps() -> None:
    cfg = TrainingConfig(batch_size=4, grad_accum=2, epochs=2)
    assert total_optimizer_steps(17, cfg) == 6
    cfg.max_steps = 4
    assert total_optimizer_steps(17, cfg) == 4
