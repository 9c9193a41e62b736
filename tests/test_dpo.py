"""`rlaif dpo`: soft-label handling, training on the tiny model (full and LoRA), resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rlaif.cli import main
from rlaif.data.hh import split_pair
from rlaif.data.preferences import load_preferences, make_preference
from rlaif.metrics import read_metrics
from rlaif.stages.dpo import complete_checkpoint, prepare_pairs

LABELS = [0.9, 0.15, 0.5, 0.7]  # kept, kept after a swap, dropped (near 0.5), kept


def write_preferences(run_dir: Path, fixtures: Path, n: int = 24) -> None:
    """A preferences.jsonl in the label stage's format: real hh-rlhf answers, soft labels.

    The human-preferred answer is always the one the label favours, so after orientation the
    DPO "chosen" side is the hh-rlhf chosen answer.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, line in enumerate((fixtures / "hh-rlhf-60.jsonl").read_text().splitlines()[:n]):
        rec = json.loads(line)
        prompt, good, bad = split_pair(rec["chosen"], rec["rejected"])
        p = LABELS[i % 4]
        a, b = (good, bad) if p > 0.5 else (bad, good)
        rows.append(
            {
                "prompt": prompt,
                "chosen": a[:150],
                "rejected": b[:150],
                "p_chosen": p,
                "source": "ai:test",
            }
        )
    (run_dir / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def dpo_args(run_dir: Path, init: Path, **extra: Any) -> list[str]:
    args = {
        "run_dir": run_dir,
        "dpo.init": init,
        "backend.device": "cpu",
        "dpo.dtype": "float32",
        "dpo.lr": 0.001,
        "dpo.batch_size": 4,
        "dpo.max_steps": 10,
        "dpo.epochs": 5,
        "dpo.save_every": 4,
        "dpo.max_length": 128,
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def preference_margin(model_dir: Path, run_dir: Path) -> float:
    """Mean log p(chosen) - log p(rejected) of ``model_dir`` over the oriented, kept pairs."""
    import torch

    from rlaif.modelio import load_causal_lm
    from rlaif.sft_data import IGNORE, SFTExample, collate, encode

    model, tok = load_causal_lm(model_dir)
    rows, _ = prepare_pairs(load_preferences(run_dir / "preferences.jsonl"), 0.1)

    def logps(side: str) -> torch.Tensor:
        exs = [SFTExample("x", r["prompt"], r[side][0]["content"], "t") for r in rows]
        b = collate([encode(tok, ex, 128) for ex in exs], tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        tok_lp = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (tok_lp * (labels != IGNORE)).sum(-1)

    return float((logps("chosen") - logps("rejected")).mean())


def weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_pairs_are_oriented_and_near_half_dropped() -> None:
    prompt = [{"role": "user", "content": "q"}]
    prefs = [
        make_preference(prompt, "a", "b", 0.8, "ai"),
        make_preference(prompt, "c", "d", 0.3, "ai"),
        make_preference(prompt, "e", "f", 0.55, "ai"),
        make_preference(prompt, "g", "g", 0.9, "ai"),
    ]
    rows, stats = prepare_pairs(prefs, min_margin=0.1)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("a", "b"),
        ("d", "c"),
    ]
    assert rows[0]["prompt"] == prompt and rows[0]["chosen"][0]["role"] == "assistant"
    assert stats == {"pairs": 4, "kept": 2, "swapped": 1, "near_half": 1, "identical": 1}
    rows, stats = prepare_pairs(prefs, min_margin=0.0)
    assert stats["kept"] == 3 and stats["near_half"] == 0


def test_incomplete_checkpoint_is_ignored(tmp_path: Path) -> None:
    for step, done in ((4, True), (8, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if done:
            (d / "trainer_state.json").write_text("{}")
    assert complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert not (tmp_path / "checkpoint-8").exists()


def test_dpo_trains_full_and_prefers_chosen(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path
) -> None:
    run_dir = tmp_path / "run"
    write_preferences(run_dir, fixtures)
    assert main(["dpo", *dpo_args(run_dir, tiny_model_dir)]) == 0
    out = run_dir / "dpo"
    rows = read_metrics(run_dir / "metrics" / "dpo.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert rows[-1]["loss"] < 0.6
    before, after = weights(tiny_model_dir), weights(out)
    assert any(not (before[k] == after[k]).all() for k in before)
    gain = preference_margin(out, run_dir) - preference_margin(tiny_model_dir, run_dir)
    assert gain > 1.0, gain
    manifest = json.loads((run_dir / "manifests" / "dpo.json").read_text())
    assert manifest["pairs"] == {
        "pairs": 24,
        "kept": 18,
        "swapped": 6,
        "near_half": 6,
        "identical": 0,
    }
    assert manifest["steps"] == 10
    assert not (run_dir / "checkpoints" / "dpo").exists()


def test_dpo_lora_merges_into_a_plain_model(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path
) -> None:
    run_dir = tmp_path / "run"
    write_preferences(run_dir, fixtures)
    args = dpo_args(
        run_dir, tiny_model_dir, **{"dpo.lora": "true", "dpo.lr": 0.01, "dpo.lora_r": 8}
    )
    assert main(["dpo", *args]) == 0
    out = run_dir / "dpo"
    assert not (out / "adapter_config.json").exists()
    before, after = weights(tiny_model_dir), weights(out)
    assert set(before) == set(after)
    assert any(not (before[k] == after[k]).all() for k in before)
    rows = read_metrics(run_dir / "metrics" / "dpo.jsonl")
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # adapter starts at zero = reference
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_dpo_resumes_after_interruption(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rlaif.stages.dpo as dpo

    run_dir = tmp_path / "run"
    write_preferences(run_dir, fixtures)
    real = dpo._callback

    def failing(metrics: Any, root: Path) -> Any:
        guard = real(metrics, root)
        on_log = guard.on_log

        def stop(args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            on_log(args, state, control, logs=logs, **kw)
            if state.global_step == 6:
                raise KeyboardInterrupt

        guard.on_log = stop
        return guard

    monkeypatch.setattr(dpo, "_callback", failing)
    assert main(["dpo", *dpo_args(run_dir, tiny_model_dir)]) == 130
    assert complete_checkpoint(run_dir / "checkpoints" / "dpo") is not None
    monkeypatch.setattr(dpo, "_callback", real)
    assert main(["dpo", *dpo_args(run_dir, tiny_model_dir)]) == 0
    steps = [r["step"] for r in read_metrics(run_dir / "metrics" / "dpo.jsonl")]
    assert steps == list(range(1, 11))
    assert (run_dir / "dpo" / "model.safetensors").is_file()


def test_dpo_cli_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model_dir: Path
) -> None:
    assert main(["dpo", "--help"]) == 0
    assert "dpo.min_margin" in capsys.readouterr().out
    assert main(["dpo", f"run_dir={tmp_path}"]) == 2
    assert "preferences not found" in capsys.readouterr().err
    (tmp_path / "preferences.jsonl").write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 0.5}) + "\n"
    )
    assert main(["dpo", f"run_dir={tmp_path}", f"dpo.init={tiny_model_dir}"]) == 2
    assert "no usable pairs" in capsys.readouterr().err
