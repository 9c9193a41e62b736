"""`rlaif sft`: example building, response-only labels, training, LoRA, resume, NaN guard, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rlaif.cli import main
from rlaif.config import load_config
from rlaif.data.hh import split_pair
from rlaif.metrics import read_metrics
from rlaif.sft_data import (
    IGNORE,
    SFTExample,
    collate,
    encode,
    helpful_count,
    helpful_examples,
    mix,
    revision_examples,
    truncate,
)

ROOT = Path(__file__).resolve().parents[1]


def write_run_inputs(run_dir: Path, fixtures: Path, n: int = 16, n_helpful: int = 8) -> None:
    """revisions.jsonl / helpful.jsonl in the revise stage's format, built from real hh-rlhf text."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = (fixtures / "hh-rlhf-60.jsonl").read_text(encoding="utf-8").splitlines()
    revs, helps = [], []
    for i, line in enumerate(lines[: n + n_helpful]):
        rec = json.loads(line)
        prompt, chosen, rejected = split_pair(rec["chosen"], rec["rejected"])
        if i < n:
            rounds = [
                {
                    "principle": "harmful0",
                    "critique": "It helps with harm.",
                    "revision": chosen[:200],
                },
                {
                    "principle": "harmful1",
                    "critique": "",
                    "revision": "x x x",
                    "status": "repetitive",
                },
            ]
            revs.append({"id": f"r{i}", "prompt": prompt, "initial": rejected, "rounds": rounds})
        else:
            helps.append({"id": f"h{i}", "prompt": prompt, "answer": chosen[:200]})
    (run_dir / "revisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in revs))
    (run_dir / "helpful.jsonl").write_text("".join(json.dumps(r) + "\n" for r in helps))


def train_args(run_dir: Path, model: Path, **extra: Any) -> list[str]:
    args = {
        "run_dir": run_dir,
        "model": model,
        "backend.device": "cpu",
        "sft.dtype": "float32",
        "sft.lr": 3e-3,
        "sft.warmup_ratio": 0.0,
        "sft.batch_size": 4,
        "sft.max_length": 96,
        "sft.max_steps": 12,
        "sft.epochs": 10,
        "sft.save_every": 4,
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def state_dict(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def data_loss(model_dir: Path, run_dir: Path) -> float:
    """Mean response-token loss of ``model_dir`` over the run's revision examples."""
    import torch

    from rlaif.modelio import load_causal_lm
    from rlaif.sft_data import read_records
    from rlaif.stages.sft import response_logits, response_loss

    model, tok = load_causal_lm(model_dir)
    exs = revision_examples(read_records(run_dir / "revisions.jsonl"), every_round=False)
    batch = collate([encode(tok, ex, 96) for ex in exs], tok.pad_token_id)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():
        logits, targets = response_logits(model, batch)
    return float(response_loss(logits, targets, n))


# ---------------------------------------------------------------- data


def test_last_good_revision_and_every_round() -> None:
    rec = {
        "id": "a",
        "prompt": [{"role": "user", "content": "hi"}],
        "initial": "x",
        "rounds": [
            {"principle": "p0", "critique": "c", "revision": "first"},
            {"principle": "p1", "critique": "c", "revision": " second "},
            {"principle": "p2", "critique": "c", "revision": "bad", "status": "echo"},
            {"principle": "p2", "critique": "c", "revision": "bad", "degenerate": True},
            {"principle": "p3", "critique": "c", "revision": "   "},
        ],
    }
    empty = {"id": "b", "prompt": "hello", "rounds": [{"revision": ""}]}
    final = revision_examples([("f:1", rec), ("f:2", empty)], every_round=False)
    assert [(e.id, e.response, e.source) for e in final] == [("a", "second", "revision")]
    every = revision_examples([("f:1", rec)], every_round=True)
    assert [(e.response, e.source) for e in every] == [
        ("first", "revision:0"),
        ("second", "revision:1"),
    ]


def test_bad_record_names_file_and_line() -> None:
    from rlaif.errors import UserError

    with pytest.raises(UserError, match=r"revs.jsonl:3: missing field 'rounds'"):
        revision_examples([("revs.jsonl:3", {"id": "a", "prompt": "p"})], every_round=False)


def test_helpful_mix_ratio() -> None:
    assert helpful_count(30, 100, 0.25) == 10
    assert helpful_count(30, 4, 0.25) == 4
    assert helpful_count(30, 100, 0.0) == 0
    revs = [
        SFTExample(f"r{i}", [{"role": "user", "content": "q"}], "a", "revision") for i in range(30)
    ]
    helps = helpful_examples(
        [(f"h:{i}", {"id": f"h{i}", "prompt": "q", "answer": f"a{i}"}) for i in range(100)]
    )
    a, b = mix(revs, helps, 0.25, seed=1), mix(revs, helps, 0.25, seed=1)
    assert [e.id for e in a] == [e.id for e in b]
    assert sum(e.source == "helpful" for e in a) == 10 and len(a) == 40


def test_truncate_keeps_response_and_cuts_prompt_left() -> None:
    assert truncate([1, 2, 3, 4, 5], [6, 7], 4) == ([4, 5], [6, 7])
    assert truncate([1, 2], [3], 8) == ([1, 2], [3])
    p, r = truncate(list(range(8)), list(range(100, 120)), 8)
    assert p == [6, 7] and r == list(range(100, 106))


def test_labels_cover_the_response_only(tiny_model_dir: Path) -> None:
    from rlaif.modelio import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    prompt = [{"role": "user", "content": "How do I pick a lock?"}]
    ex = SFTExample("x", prompt, "I can't help with that.", "revision")
    ids, labels = encode(tok, ex, 512)
    assert len(ids) == len(labels)
    n_prompt = labels.index(next(x for x in labels if x != IGNORE))
    assert all(x == IGNORE for x in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]
    head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids[:n_prompt]) == head
    assert tok.decode(labels[n_prompt:]) == "I can't help with that.<|im_end|>\n"
    batch = collate([(ids, labels), (ids[:5], labels[:5])], tok.pad_token_id)
    assert batch["labels"].shape == batch["input_ids"].shape == (2, len(ids))
    assert (batch["labels"][1, 5:] == IGNORE).all() and (batch["attention_mask"][1, 5:] == 0).all()
    assert int((batch["labels"][0] != IGNORE).sum()) == len(ids) - n_prompt


def test_cut_off_answer_trains_no_end_of_turn(tiny_model_dir: Path) -> None:
    from rlaif.modelio import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    rec = {
        "id": "h",
        "prompt": "Tell me",
        "answer": "It was the best of",
        "finish_reason": "length",
    }
    (ex,) = helpful_examples([("h:1", rec)])
    assert not ex.complete
    _, labels = encode(tok, ex, 512)
    trained = [x for x in labels if x != IGNORE]
    assert tok.decode(trained) == "It was the best of"
    assert tok.convert_tokens_to_ids("<|im_end|>") not in trained
    bad = {"id": "g", "prompt": "Tell me", "answer": "same same same", "status": "repetitive"}
    assert helpful_examples([("h:2", bad)]) == []


def test_response_loss_matches_mean_cross_entropy(tiny_model_dir: Path) -> None:
    import torch

    from rlaif.modelio import load_causal_lm
    from rlaif.stages.sft import response_logits, response_loss

    model, _ = load_causal_lm(tiny_model_dir)
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (2, 5))
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, 1], [IGNORE, 2, 2, IGNORE, IGNORE]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        full = model(input_ids=ids).logits
        sel, targets = response_logits(model, batch)
    picked = [(0, 1, 3), (0, 2, 4), (0, 3, 1), (1, 0, 2), (1, 1, 2)]  # (row, position, target)
    assert targets.tolist() == [y for _, _, y in picked]
    assert torch.allclose(sel, torch.stack([full[b, t] for b, t, _ in picked]), atol=1e-5)
    want = -torch.stack([torch.log_softmax(full[b, t], -1)[y] for b, t, y in picked]).sum() / 5
    assert torch.allclose(response_loss(sel, targets, 5), want, atol=1e-5)


# ---------------------------------------------------------------- training


def test_sft_trains_full_and_lowers_loss(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path
) -> None:
    run_dir = tmp_path / "run"
    write_run_inputs(run_dir, fixtures)
    assert main(["sft", *train_args(run_dir, tiny_model_dir)]) == 0
    out = run_dir / "sft"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.bin"))
    rows = read_metrics(run_dir / "metrics" / "sft.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < rows[0]["loss"]
    before_loss, after_loss = data_loss(tiny_model_dir, run_dir), data_loss(out, run_dir)
    assert after_loss < 0.9 * before_loss, (before_loss, after_loss)
    before, after = state_dict(tiny_model_dir), state_dict(out)
    assert any(not (before[k] == after[k]).all() for k in before)
    manifest = json.loads((run_dir / "manifests" / "sft.json").read_text())
    assert manifest["stage"] == "sft" and manifest["examples"] == {"revision": 16, "helpful": 5}
    assert not (run_dir / "checkpoints" / "sft").exists()
    # Same config and inputs: nothing to redo.
    mtime = (out / "model.safetensors").stat().st_mtime
    assert main(["sft", *train_args(run_dir, tiny_model_dir)]) == 0
    assert (out / "model.safetensors").stat().st_mtime == mtime


def test_sft_lora_saves_a_merged_plain_model(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path
) -> None:
    from rlaif.modelio import load_causal_lm

    run_dir = tmp_path / "run"
    write_run_inputs(run_dir, fixtures)
    args = train_args(
        run_dir, tiny_model_dir, **{"sft.lora": "true", "sft.lora_r": 8, "sft.lr": 1e-2}
    )
    assert main(["sft", *args]) == 0
    out = run_dir / "sft"
    assert not (out / "adapter_config.json").exists()
    before, after = state_dict(tiny_model_dir), state_dict(out)
    assert set(before) == set(after)  # plain parameter names, no lora_A/lora_B
    assert any(not (before[k] == after[k]).all() for k in before)
    rows = read_metrics(run_dir / "metrics" / "sft.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"]
    model, _ = load_causal_lm(out)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_nan_loss_stops_with_last_good_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import rlaif.stages.sft as sft

    run_dir = tmp_path / "run"
    write_run_inputs(run_dir, fixtures)
    real = sft.response_loss
    calls = {"n": 0}

    def poisoned(logits: torch.Tensor, targets: torch.Tensor, n: int) -> torch.Tensor:
        calls["n"] += 1
        loss = real(logits, targets, n)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(sft, "response_loss", poisoned)
    code = main(["sft", *train_args(run_dir, tiny_model_dir, **{"sft.save_every": 2})])
    assert code == 3  # TrainingDiverged
    ckpts = sorted(p.name for p in (run_dir / "checkpoints" / "sft").iterdir())
    assert ckpts == ["step-000002", "step-000004"]  # step 6 diverged: the good ones stay
    assert not (run_dir / "sft").exists()


def test_killed_run_resumes_from_its_last_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, fixtures: Path
) -> None:
    run_dir = tmp_path / "run"
    write_run_inputs(run_dir, fixtures)
    args = train_args(run_dir, tiny_model_dir, **{"sft.max_steps": 60, "sft.save_every": 5})
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rlaif", "sft", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_root = run_dir / "checkpoints" / "sft"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        ckpt_root.is_dir() and any(ckpt_root.glob("step-*"))
    ):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in ckpt_root.glob("step-*"))
    assert 0 < killed_at < 60
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming from {ckpt_root}" in res.stderr
    steps = [r["step"] for r in read_metrics(run_dir / "metrics" / "sft.jsonl")]
    assert steps == list(range(1, 61))  # no gap, no duplicate
    assert (run_dir / "sft" / "model.safetensors").is_file()


@pytest.mark.parametrize("lora", [False, True])
def test_resume_matches_an_uninterrupted_run(
    lora: bool,
    tmp_path: Path,
    tiny_model_dir: Path,
    fixtures: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    import rlaif.stages.sft as sft

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    for d in (straight, broken):
        write_run_inputs(d, fixtures)
    extra = {"sft.max_steps": 8, "sft.grad_accum": 2, "sft.lora": lora, "sft.lora_dropout": 0.1}
    saved: dict[int, bool] = {}  # step: with the optimizer state
    real_save = sft.save_checkpoint

    def save(root: Path, step: int, **kw: Any) -> Path:
        saved[step] = kw["optimizer"] is not None
        return real_save(root, step, **kw)

    monkeypatch.setattr(sft, "save_checkpoint", save)
    assert main(["sft", *train_args(straight, tiny_model_dir, **extra)]) == 0
    # the last checkpoint leaves out the optimizer state (no run steps on from it, and a finished
    # run deletes its checkpoints); the others keep it for the resume below
    assert saved == {4: True, 8: False}
    real, calls = sft.response_loss, {"n": 0}

    def crash(logits: torch.Tensor, targets: torch.Tensor, n: int) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 11:  # micro-batch 11 = inside step 6 (2 per step)
            raise KeyboardInterrupt
        return real(logits, targets, n)

    monkeypatch.setattr(sft, "response_loss", crash)
    assert main(["sft", *train_args(broken, tiny_model_dir, **extra)]) == 130
    monkeypatch.setattr(sft, "response_loss", real)
    assert main(["sft", *train_args(broken, tiny_model_dir, **extra)]) == 0
    a = read_metrics(straight / "metrics" / "sft.jsonl")
    b = read_metrics(broken / "metrics" / "sft.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
    wa, wb = state_dict(straight / "sft"), state_dict(broken / "sft")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_cli_help_and_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sft", "--help"]) == 0
    assert "sft.helpful_ratio" in capsys.readouterr().out
    code = main(["sft", f"run_dir={tmp_path / 'nope'}", f"model={tmp_path}"])
    assert code == 2
    assert "revisions not found" in capsys.readouterr().err
    cfg = load_config(None, ["sft.every_round=true", "sft.lora=true"])
    assert cfg.sft.every_round and cfg.sft.lora and cfg.sft.epochs == 1.0
