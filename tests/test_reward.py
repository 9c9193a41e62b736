"""The preference model and `rlaif reward` on the tiny model: pooling, save/load, training, resume, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from rlaif.cli import main
from rlaif.config import RewardConfig
from rlaif.data.preferences import load_preferences
from rlaif.errors import UserError
from rlaif.pm import HEAD_FILE, TRAINABLE_FILE, load_pm, new_pm
from rlaif.rl.pm_losses import soft_preference_loss
from rlaif.stages.reward import split_holdout
from rlaif.stages.reward_train import train_pm


@pytest.fixture(scope="module")
def pairs(fixtures: Path) -> list[dict[str, Any]]:
    return [p.to_json() for p in load_preferences(fixtures / "hh-rlhf-60.jsonl", limit=8)]


def _cfg(**kw: Any) -> RewardConfig:
    base = {"batch_size": 4, "max_length": 96, "lr": 2e-3, "warmup_ratio": 0.0, "dtype": "float32"}
    return dataclasses.replace(RewardConfig(), **{**base, **kw})


def _convs(pairs: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    a = [[*p["prompt"], {"role": "assistant", "content": p["chosen"]}] for p in pairs]
    b = [[*p["prompt"], {"role": "assistant", "content": p["rejected"]}] for p in pairs]
    return a, b


def test_last_token_pooling_ignores_padding(tiny_model_dir: Path) -> None:
    pm = new_pm(tiny_model_dir, max_length=64)
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long = [
        {"role": "user", "content": "tell me a long story " * 4},
        {"role": "assistant", "content": "no"},
    ]
    alone = pm.score([short], batch_size=1)[0]
    batched = pm.score([long, short], batch_size=2)
    assert batched[1] == pytest.approx(alone, abs=1e-5)
    ids = pm.encode([short])[0]
    left = torch.tensor([[0, 0, 0, *ids]]), torch.tensor([[0, 0, 0] + [1] * len(ids)])
    with torch.no_grad():
        assert float(pm(*left)[0]) == pytest.approx(alone, abs=1e-5)
    assert len(pm.encode([long])[0]) <= 64


def test_save_load_layout(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    pm = new_pm(tiny_model_dir, max_length=80, seed=3)
    convs = [[{"role": "user", "content": "why?"}, {"role": "assistant", "content": "because"}]]
    before = pm.score(convs)
    pm.save_pretrained(tmp_path / "pm")
    head = load_file(str(tmp_path / "pm" / HEAD_FILE))
    assert set(head) == {"weight", "bias"} and tuple(head["weight"].shape) == (1, 64)
    meta = json.loads((tmp_path / "pm" / "pm.json").read_text())
    assert meta["pooling"] == "last_token" and meta["max_length"] == 80
    assert not list((tmp_path / "pm").glob("*.bin"))
    AutoModelForCausalLM.from_pretrained(tmp_path / "pm")  # the backbone is a plain causal LM
    again = load_pm(tmp_path / "pm")
    assert again.score(convs) == pytest.approx(before, abs=1e-6)
    with pytest.raises(UserError, match="not a preference-model directory"):
        load_pm(tiny_model_dir)


def _loss(pm: Any, pairs: list[dict[str, Any]]) -> float:
    a, b = _convs(pairs)
    ra, rb = torch.tensor(pm.score(a)), torch.tensor(pm.score(b))
    return float(soft_preference_loss(ra, rb, torch.ones(len(pairs))))


def test_training_lowers_loss_and_changes_weights(
    tiny_model_dir: Path, tmp_path: Path, pairs: list[dict[str, Any]]
) -> None:
    start = new_pm(tiny_model_dir, max_length=96, seed=0)
    before_loss = _loss(start, pairs)
    before = {n: p.detach().clone() for n, p in start.named_parameters()}
    pm, stats = train_pm(
        tiny_model_dir, pairs, _cfg(epochs=10, max_steps=12, save_every=100), loss_kind="soft",
        phase="pm", ckpt_root=tmp_path / "ckpt", metrics_path=tmp_path / "m.jsonl",
    )  # fmt: skip
    assert stats["steps"] == 12
    after_loss = _loss(pm, pairs)
    assert after_loss < before_loss - 0.05
    changed = [n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "head.weight" in changed and any("layers.0" in n for n in changed)
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"loss", "accuracy", "margin", "grad_norm", "pairs_per_s"} <= set(rows[0])


def test_resume_matches_uninterrupted_run(
    tiny_model_dir: Path,
    tmp_path: Path,
    pairs: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rlaif.checkpoint

    cfg = _cfg(epochs=4, max_steps=4, save_every=2)
    kw: dict[str, Any] = {"loss_kind": "soft", "phase": "pm", "seed": 1}
    full, _ = train_pm(
        tiny_model_dir,
        pairs,
        cfg,
        ckpt_root=tmp_path / "a",
        metrics_path=tmp_path / "a.jsonl",
        **kw,
    )

    def saved(step: int) -> dict[str, Any]:
        path = tmp_path / "a" / f"step-{step:06d}" / "trainer_state.pt"
        return torch.load(path, weights_only=True)  # type: ignore[no-any-return]

    # the last checkpoint leaves out the optimizer state: no run steps on from it
    assert "optimizer" in saved(2) and "optimizer" not in saved(4)
    again, _ = train_pm(
        tiny_model_dir, pairs, cfg, ckpt_root=tmp_path / "a", metrics_path=tmp_path / "a2.jsonl",
        **kw,
    )  # fmt: skip
    for (name, p), q in zip(full.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q), name
    real = rlaif.checkpoint.check_finite

    def killed_at_3(step: int, *args: Any, **kwargs: Any) -> None:
        if step == 3:
            raise KeyboardInterrupt
        real(step, *args, **kwargs)

    monkeypatch.setattr(rlaif.checkpoint, "check_finite", killed_at_3)
    with pytest.raises(KeyboardInterrupt):
        train_pm(
            tiny_model_dir,
            pairs,
            cfg,
            ckpt_root=tmp_path / "b",
            metrics_path=tmp_path / "b.jsonl",
            **kw,
        )
    assert (tmp_path / "b" / "step-000002").is_dir()
    monkeypatch.setattr(rlaif.checkpoint, "check_finite", real)
    resumed, _ = train_pm(
        tiny_model_dir,
        pairs,
        cfg,
        ckpt_root=tmp_path / "b",
        metrics_path=tmp_path / "b.jsonl",
        **kw,
    )
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_lora_checkpoint_and_export(
    tiny_model_dir: Path, tmp_path: Path, pairs: list[dict[str, Any]]
) -> None:
    from safetensors.torch import load_file

    cfg = _cfg(max_steps=2, save_every=1, lora=True, lora_r=4)
    pm, _ = train_pm(
        tiny_model_dir, pairs, cfg, loss_kind="soft", phase="pm",
        ckpt_root=tmp_path / "ck", metrics_path=tmp_path / "m.jsonl",
    )  # fmt: skip
    trained = load_file(str(tmp_path / "ck" / "step-000002" / TRAINABLE_FILE))
    assert any("lora_" in k for k in trained) and "head.weight" in trained
    pm.save_pretrained(tmp_path / "out", with_trainable=False)
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    convs = _convs(pairs[:2])[0]
    assert load_pm(tmp_path / "out").score(convs) == pytest.approx(pm.score(convs), abs=1e-4)


def test_split_holdout_by_prompt(pairs: list[dict[str, Any]]) -> None:
    twice = pairs + [dict(p, chosen="other") for p in pairs]
    train, held = split_holdout(twice, 0.5, seed=0)
    assert len(train) + len(held) == len(twice) and held
    held_prompts = {json.dumps(p["prompt"]) for p in held}
    assert not any(json.dumps(p["prompt"]) in held_prompts for p in train)
    assert split_holdout(twice, 0.5, seed=0) == (train, held)


def test_cli_end_to_end(
    tiny_model_dir: Path, tmp_path: Path, fixtures: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    prefs = [
        {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
         "p_chosen": 0.7, "source": "ai:harmless"}
        for p in (x.to_json() for x in load_preferences(fixtures / "hh-rlhf-60.jsonl", limit=12))
    ]  # fmt: skip
    (run / "preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    args = [
        "reward", f"model={tiny_model_dir}", f"run_dir={run}", "reward.max_steps=2",
        "reward.batch_size=2", "reward.max_length=64", "reward.pmp_limit=8",
        f"reward.human_preferences=[{fixtures / 'hh-rlhf-60.jsonl'}]", "reward.human_limit=8",
        "reward.holdout=0.25",
    ]  # fmt: skip
    assert main(args) == 0
    for path in ("pm/pm.json", "pmp/pm.json", "pmp_pairs.jsonl", "manifests/reward.json"):
        assert (run / path).is_file(), path
    man = json.loads((run / "manifests" / "reward.json").read_text())
    assert man["pmp"]["stackexchange"]["pairs"] == 108 and man["finetune"]["train_pairs"] > 0
    rows = [json.loads(x) for x in (run / "metrics" / "reward.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in rows] == [("pmp", 1), ("pmp", 2), ("pm", 3), ("pm", 4)]
    capsys.readouterr()
    assert main(args) == 0  # second run: up to date, nothing retrained
    assert "up to date" in capsys.readouterr().err
    (run / "manifests" / "reward.json").unlink()  # killed before the manifest: both PMs reused
    assert main(args) == 0
    man = json.loads((run / "manifests" / "reward.json").read_text())
    assert man["pmp"]["reused"] and man["finetune"]["reused"]
    assert len((run / "metrics" / "reward.jsonl").read_text().splitlines()) == 4
    rc = main(
        ["reward", "eval", str(run / "pm"), str(fixtures / "hh-rlhf-60.jsonl"), "--limit", "6"]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and out[-1].startswith("RESULT reward-eval n=6 accuracy=")
    assert main(["reward", "--help"]) == 0
    assert "reward.pmp_dumps" in capsys.readouterr().out


def test_cli_bad_preferences(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "x", "chosen": "a", "rejected": "b", "p_chosen": 1.5}) + "\n"
    )
    rc = main(
        [
            "reward",
            f"model={tiny_model_dir}",
            f"run_dir={tmp_path / 'r'}",
            f"reward.preferences={bad}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].endswith("bad.jsonl:1: field 'p_chosen' must be in [0, 1], got 1.5")
    rc = main(["reward", "eval", str(tiny_model_dir), str(bad)])
    assert rc == 2


def test_split_passes_give_the_same_gradients(
    tiny_model_dir: Path, pairs: list[dict[str, Any]]
) -> None:
    from rlaif.stages.reward_train import _batch_backward

    grads = []
    for max_pass in (0, 150):  # one pass of 8 pairs, then passes of at most 150 padded tokens
        pm = new_pm(tiny_model_dir, max_length=96, seed=0)
        a, b = _convs(pairs)
        ca, cb = pm.encode(a), pm.encode(b)
        p = torch.tensor([1.0, 0.8, 0.6, 1.0, 0.3, 1.0, 0.9, 0.5])
        cfg = _cfg(max_pass_tokens=max_pass)
        rc, rr = _batch_backward(pm, list(range(8)), ca, cb, p, cfg, "soft", None)
        assert rc.shape == (8,) and rr.shape == (8,)
        grads.append([q.grad.clone() for q in pm.parameters() if q.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for g0, g1 in zip(*grads, strict=True):
        assert torch.allclose(g0, g1, atol=1e-5, rtol=1e-4)


def test_a_comparison_given_twice_is_trained_on_once(
    tmp_path: Path, fixtures: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """preferences.jsonl already holds the human comparisons that ``rlaif label`` mixed in; the
    same file named again in reward.human_preferences adds no second copy (ids aside)."""
    from rlaif.config import load_config
    from rlaif.stages.reward import finetune_pairs

    human = fixtures / "hh-rlhf-60.jsonl"
    run = tmp_path / "run"
    run.mkdir()
    mixed = [dict(p.to_json(), id=f"x{i}") for i, p in enumerate(load_preferences(human, limit=10))]
    mixed.append(dict(mixed[0], id="again"))  # twice in one file, under another id
    mixed.append(dict(mixed[1], id="relabelled", p_chosen=0.6))  # same texts, another label: kept
    (run / "preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in mixed))
    cfg = load_config(
        None, [f"run_dir={run}", f"reward.human_preferences=[{human}]", "reward.human_limit=20"]
    )
    with caplog.at_level("WARNING"):
        pairs, files = finetune_pairs(cfg)
    assert len(pairs) == 21  # 12 + 20 read, of which 11 repeat the first 10 human pairs
    assert [p["id"] for p in pairs[:10]] == [f"x{i}" for i in range(10)]  # the first copy kept
    assert pairs[10]["id"] == "relabelled"
    assert "11 of 32 comparisons appear more than once" in caplog.text
    assert set(files) == {"preferences", "human_preferences[0]"}
