"""`rlaif ppo`: learning on a known reward, CLI run, exact resume after a crash, NaN stop."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from rlaif.attention import use_short_attention
from rlaif.checkpoint import list_checkpoints
from rlaif.config import PPOConfig
from rlaif.errors import TrainingDiverged
from rlaif.metrics import read_metrics
from rlaif.modelio import load_causal_lm
from rlaif.pm import PreferenceModel, new_pm
from rlaif.stages import ppo_loop
from rlaif.stages.ppo import load_trainable
from rlaif.stages.ppo_loop import PPOModels, train

HH = Path(__file__).parent / "fixtures" / "hh-rlhf-60.jsonl"


class TargetTokenReward:
    """A known reward: the share of answer tokens whose id is a multiple of 8 (~1/8 of the vocab)."""

    def __init__(self, tokenizer: Any, fail_at_call: int = 0, fail: str = "") -> None:
        self.tok = tokenizer
        self.calls = 0
        self.fail_at_call, self.fail = fail_at_call, fail

    def score(
        self, conversations: Any, batch_size: int = 8, *, autocast_dtype: Any = None
    ) -> list[float]:
        self.calls += 1
        if self.calls == self.fail_at_call:
            if self.fail == "crash":
                raise RuntimeError("killed")
            return [math.nan] * len(conversations)
        out = []
        for conv in conversations:
            ids = self.tok(conv[-1]["content"], add_special_tokens=False)["input_ids"]
            out.append(sum(1 for i in ids if i % 8 == 0) / max(len(ids), 1))
        return out


def prompts() -> list[list[dict[str, str]]]:
    from rlaif.data.prompts import load_prompts

    return [p.messages for p in load_prompts(HH, first_turn_only=True)]


def tiny_models(model_dir: Path, scorer: Any = None) -> PPOModels:
    torch.manual_seed(0)
    policy, tok = load_causal_lm(model_dir)
    ref = copy.deepcopy(policy).requires_grad_(False)
    value_lm, _ = load_causal_lm(model_dir)
    value = PreferenceModel(value_lm, tok)
    return PPOModels(policy, tok, ref, value, scorer or TargetTokenReward(tok))


SMALL = PPOConfig(
    max_steps=4,
    rollout_batch_size=4,
    batch_size=2,
    ppo_epochs=2,
    max_new_tokens=6,
    max_length=40,
    lr=1e-3,
    save_every=1,
    dtype="float32",
)


def test_ppo_raises_a_known_reward_with_kl_near_target(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    models = tiny_models(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in models.policy.named_parameters()}
    target = 6.0
    pc = PPOConfig(
        max_steps=16,
        rollout_batch_size=32,
        batch_size=16,
        ppo_epochs=4,
        max_new_tokens=10,
        max_length=48,
        lr=5e-3,
        lr_schedule="constant",
        kl_coef=0.3,
        adaptive_kl=True,
        target_kl=target,
        kl_horizon=400,
        truncation_penalty=0.0,
        save_every=100,
        dtype="float32",
    )
    res = train(
        models, prompts(), pc, seed=0, ckpt_root=tmp_path / "ck", metrics_path=tmp_path / "m.jsonl"
    )
    h = res.history
    first = sum(r["reward"] for r in h[:4]) / 4
    last = sum(r["reward"] for r in h[-4:]) / 4
    assert first < 0.15  # about 1/8 of tokens hit the target set at the start
    assert last > 2.0 * first and last > 0.2, (first, last)
    kls = [r["kl"] for r in h]
    assert sum(kls[-4:]) / 4 < 1.5 * target and max(kls) < 2 * target, kls
    # the controller lowers beta while KL is under target and raises it once KL passes it
    betas = [r["beta"] for r in h]
    assert min(betas) < pc.kl_coef and betas[-1] > min(betas)
    # the value function learns (its loss falls) and the policy's weights moved
    assert h[-1]["value_loss"] < h[0]["value_loss"]
    moved = [not torch.equal(before[n], p) for n, p in models.policy.named_parameters()]
    assert all(moved)
    rows = read_metrics(tmp_path / "m.jsonl")
    assert len(rows) == 16
    for key in (
        "reward",
        "kl",
        "beta",
        "entropy",
        "approx_kl",
        "clipfrac",
        "value_loss",
        "explained_variance",
        "response_length",
    ):
        assert key in rows[0]


def test_killed_run_resumes_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    full = train(
        tiny_models(tiny_model_dir),
        prompts(),
        SMALL,
        seed=3,
        ckpt_root=tmp_path / "a" / "ck",
        metrics_path=tmp_path / "a" / "m.jsonl",
    )
    m = tiny_models(tiny_model_dir)
    m.scorer = TargetTokenReward(m.tokenizer, fail_at_call=3, fail="crash")
    with pytest.raises(RuntimeError, match="killed"):
        train(
            m,
            prompts(),
            SMALL,
            seed=3,
            ckpt_root=tmp_path / "b" / "ck",
            metrics_path=tmp_path / "b" / "m.jsonl",
        )
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "ck")] == [1, 2]
    again = train(
        tiny_models(tiny_model_dir),
        prompts(),
        SMALL,
        seed=3,
        ckpt_root=tmp_path / "b" / "ck",
        metrics_path=tmp_path / "b" / "m.jsonl",
    )
    assert again.resumed_from == 2
    a, b = read_metrics(tmp_path / "a" / "m.jsonl"), read_metrics(tmp_path / "b" / "m.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in ("reward", "kl", "beta", "response_length"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    assert full.history[-1]["reward"] == pytest.approx(again.history[-1]["reward"], abs=1e-6)


def test_final_checkpoint_leaves_out_the_optimizer_and_a_rerun_keeps_its_weights(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    models = tiny_models(tiny_model_dir)
    res = train(models, prompts(), SMALL, seed=1, ckpt_root=tmp_path / "ck",
                metrics_path=tmp_path / "m.jsonl")  # fmt: skip
    assert res.steps == 4
    ckpts = dict(list_checkpoints(tmp_path / "ck"))
    assert sorted(ckpts) == [3, 4]  # keep_checkpoints: 2

    def blob(step: int) -> dict[str, Any]:
        return torch.load(ckpts[step] / "trainer_state.pt", weights_only=True)  # type: ignore[no-any-return]

    assert "optimizer" in blob(3) and blob(3)["optimizer"]["state"]  # a resume steps on from it
    assert "optimizer" not in blob(4) and "scheduler" in blob(4)  # nothing steps on from the last
    trained = {n: p.detach().clone() for n, p in models.policy.named_parameters()}
    # a rerun of the finished run (its output lost) resumes at the end: the trained weights
    fresh = tiny_models(tiny_model_dir)
    again = train(fresh, prompts(), SMALL, seed=1, ckpt_root=tmp_path / "ck",
                  metrics_path=tmp_path / "m.jsonl")  # fmt: skip
    assert again.resumed_from == 4 and again.history == []
    for n, p in fresh.policy.named_parameters():
        assert torch.equal(p, trained[n]), n


@pytest.mark.parametrize("where", ["reward", "loss", "weights"])
def test_nan_stops_with_last_good_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    m = tiny_models(tiny_model_dir)
    if where == "reward":
        m.scorer = TargetTokenReward(m.tokenizer, fail_at_call=3, fail="nan")
    elif where == "weights":  # the policy's weights go NaN: step 3's sampling meets NaN logits
        real_sample = ppo_loop.sample
        samples = {"n": 0}

        def sample_after_poison(*args: Any, **kw: Any) -> Any:
            samples["n"] += 1
            if samples["n"] == 3:
                with torch.no_grad():
                    for p in m.policy.parameters():
                        p.fill_(math.nan)
            return real_sample(*args, **kw)

        monkeypatch.setattr(ppo_loop, "sample", sample_after_poison)
    else:
        real = ppo_loop.ppo_policy_loss
        calls = {"n": 0}

        def poisoned(*args: Any, **kw: Any) -> Any:
            calls["n"] += 1
            loss, st = real(*args, **kw)
            # 2 epochs x 2 micro-batches per step: call 9 is the first of step 3
            return (loss * math.inf if calls["n"] == 9 else loss), st

        monkeypatch.setattr(ppo_loop, "ppo_policy_loss", poisoned)
    ck = tmp_path / "ck"
    with pytest.raises(
        TrainingDiverged, match=r"step 3 .*last good checkpoint kept: .*step-000002"
    ):
        train(m, prompts(), SMALL, seed=0, ckpt_root=ck, metrics_path=tmp_path / "m.jsonl")
    assert [s for s, _ in list_checkpoints(ck)] == [1, 2]
    good = list_checkpoints(ck)[-1][1]
    assert json.loads((good / "state.json").read_text())["step"] == 2
    fresh = tiny_models(tiny_model_dir)
    load_trainable(fresh.policy, good / "policy.safetensors")
    load_trainable(fresh.value, good / "value.safetensors")
    for p in fresh.policy.parameters():
        assert torch.isfinite(p).all()
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2]


def test_cli_ppo_run_writes_model_manifest_metrics(tiny_model_dir: Path, tmp_path: Path) -> None:
    from rlaif.cli import main

    pm_dir = tmp_path / "pm"
    new_pm(tiny_model_dir).save_pretrained(pm_dir)
    run_dir = tmp_path / "run"
    args = [
        "ppo",
        f"run_dir={run_dir}",
        f"ppo.policy={tiny_model_dir}",
        f"ppo.pm={pm_dir}",
        f"ppo.prompts={HH}",
        f"ppo.helpful_prompts={tmp_path / 'helpful.txt'}",
        "ppo.helpful_limit=2",
        "ppo.max_steps=2",
        "ppo.rollout_batch_size=4",
        "ppo.batch_size=2",
        "ppo.ppo_epochs=1",
        "ppo.max_new_tokens=6",
        "ppo.max_length=40",
        "ppo.dtype=float32",
        "ppo.lora=true",
        "ppo.lora_r=4",
    ]
    (tmp_path / "helpful.txt").write_text("How do I brew coffee?\nWhat grind for espresso?\n")
    assert main(args) == 0
    load_causal_lm(run_dir / "rl")  # a plain model directory (LoRA merged)
    man = json.loads((run_dir / "manifests" / "ppo.json").read_text())
    assert man["steps"] == 2 and man["prompts"] == {"red_team": 60, "helpful": 2}
    rows = read_metrics(run_dir / "metrics" / "ppo.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["kl"]) for r in rows)
    # a second run with the same config and inputs has nothing to do
    mtime = (run_dir / "rl" / "model.safetensors").stat().st_mtime
    assert main(args) == 0
    assert (run_dir / "rl" / "model.safetensors").stat().st_mtime == mtime
    # a bad setting is one line, exit 2
    assert main([*args, "ppo.temperature=0"]) == 2


def test_ppo_config_rejects_bad_values() -> None:
    from rlaif.errors import UserError
    from rlaif.stages.ppo import check_config

    with pytest.raises(UserError, match=r"ppo\.clip_eps"):
        check_config(replace(PPOConfig(), clip_eps=0.0))


def test_rollout_sampling_is_seeded_per_row(tiny_model_dir: Path) -> None:
    from rlaif.backends.base import GenerationParams
    from rlaif.backends.hf import HFLM

    model, tok = load_causal_lm(tiny_model_dir)
    lm = HFLM.from_objects(model, tok)
    rows = [
        lm.encode([{"role": "user", "content": q}]) for q in ("Hi there", "How do I bake bread?")
    ]
    params = GenerationParams(max_new_tokens=5, temperature=1.0)
    both = lm.sample_ids(rows, params, seeds=[11, 22])
    alone = lm.sample_ids(rows[1:], params, seeds=[22])
    assert both[1] == alone[0]  # a row's draws do not depend on its batch mates
    assert all(len(toks) <= 5 and reason in ("stop", "length") for toks, reason in both)
    assert lm.sample_ids(rows, params, seeds=[11, 22]) == both


def test_bf16_run_keeps_fp32_masters_and_starts_at_zero_kl(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    lm, tok = load_causal_lm(tiny_model_dir)
    m = tiny_models(tiny_model_dir, scorer=PreferenceModel(lm, tok).requires_grad_(False))
    params = {
        n: p for n, p in torch.nn.ModuleDict({"p": m.policy, "v": m.value}).named_parameters()
    }
    pc = replace(SMALL, max_steps=2, dtype="bfloat16")
    res = train(
        m,
        prompts(),
        pc,
        seed=0,
        ckpt_root=tmp_path / "ck",
        metrics_path=tmp_path / "m.jsonl",
        amp=torch.bfloat16,
    )
    # step 1: policy == reference, one with bf16 linears swapped in, the other's stored for good
    assert res.history[0]["kl"] == 0.0
    assert all(math.isfinite(r["policy_loss"] + r["value_loss"]) for r in res.history)
    after = dict(torch.nn.ModuleDict({"p": m.policy, "v": m.value}).named_parameters())
    assert all(after[n] is p and p.dtype == torch.float32 for n, p in params.items())
    assert m.ref is not None
    assert m.ref.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert m.ref.model.embed_tokens.weight.dtype == torch.float32
    assert m.scorer.lm.model.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    assert m.scorer.head.weight.dtype == torch.float32


def small_rollout(m: Any, pc: PPOConfig, ragged: bool = False) -> Any:
    """A 4-episode rollout of the tiny models (``ragged``: answers cut to 6, 2, 6 and 4 tokens)."""
    from rlaif.backends.hf import HFLM

    lm = HFLM.from_objects(m.policy, m.tokenizer)
    s, _ = ppo_loop.sample(lm, [lm.encode(p) for p in prompts()[:4]], pc, [1, 2, 3, 4])
    if ragged:  # answers of different lengths: chunks of uneven token counts
        s.response_mask[1, 2:] = 0
        s.response_mask[3, 4:] = 0
    old, ref, values = ppo_loop.rollout_forwards(m, s, pc, None)
    return ppo_loop.make_rollout(s, old, ref, values, [0.0] * 4, [1.0, -1.0, 0.5, 0.0], pc, 0.1)


def test_row_chunks_cut_by_the_token_budget() -> None:
    rc = ppo_loop.row_chunks
    assert rc([150] * 8, 0) == [(0, 8)]  # 0: no budget
    assert rc([150] * 8, 1200) == [(0, 8)]  # fits exactly
    assert rc([150] * 8, 512) == [(0, 3), (3, 6), (6, 8)]  # 1200 tokens: 3 chunks of <= 512
    assert rc([900] * 3, 512) == [(0, 1), (1, 2), (2, 3)]  # one row at least
    # rows of different lengths (packed): 1000 tokens in two chunks of 500, cut after row 1
    assert rc([100, 400, 50, 50, 300, 100], 512) == [(0, 2), (2, 6)]
    # the same rows padded to 400: five chunks would put two rows (800) together, so six
    assert rc([400] * 6, 512) == [(r, r + 1) for r in range(6)]
    assert rc([700], 512) == [(0, 1)]
    # three chunks fit (10, 2, 10); cutting nearest each third of the total would need four
    assert rc([5, 5, 1, 1, 5, 5], 10) == [(0, 2), (2, 5), (5, 6)]
    # among the fewest chunks, the most even: 9 + 9 beats the greedy fill's 12 + 6
    assert rc([3, 3, 3, 3, 3, 3], 12) == [(0, 3), (3, 6)]
    # rows over the budget stand alone, the rest still share
    assert rc([600, 100, 100, 600, 100], 512) == [(0, 1), (1, 3), (3, 4), (4, 5)]


def test_row_chunks_are_the_fewest_and_then_the_most_even() -> None:
    """Against an exhaustive search over every split of up to 10 rows: the fewest chunks that
    keep to the budget (a row over it alone), and among those the smallest largest chunk."""
    import itertools
    import random

    def best(tokens: list[int], budget: int) -> tuple[int, int]:
        n, out = len(tokens), (len(tokens) + 1, 0)
        for k in range(n):
            for cuts in itertools.combinations(range(1, n), k):
                edges = [0, *cuts, n]
                sums = [sum(tokens[a:b]) for a, b in itertools.pairwise(edges)]
                ok = all(
                    b - a == 1 or t <= budget
                    for (a, b), t in zip(itertools.pairwise(edges), sums, strict=True)
                )
                if ok:
                    out = min(out, (k + 1, max(sums)))
        return out

    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.randint(1, 300) for _ in range(rng.randint(1, 10))]
        budget = rng.randint(1, 1200)
        chunks = ppo_loop.row_chunks(tokens, budget)
        assert chunks[0][0] == 0 and chunks[-1][1] == len(tokens)
        assert all(x[1] == y[0] for x, y in itertools.pairwise(chunks))
        if sum(tokens) <= budget:
            assert chunks == [(0, len(tokens))]
            continue
        got = (len(chunks), max(sum(tokens[a:b]) for a, b in chunks))
        assert got == best(tokens, budget), (tokens, budget, chunks)


def test_row_tokens_count_real_tokens_where_packed() -> None:
    from rlaif.rl.rollout import Samples

    qm = torch.tensor([[0, 1, 1], [1, 1, 1]])
    rm = torch.tensor([[1, 0], [1, 1]])
    s = Samples(qm, qm, rm, rm, torch.zeros(2, dtype=torch.bool))
    assert ppo_loop.row_tokens(s, packed=True) == [3, 5]
    assert ppo_loop.row_tokens(s, packed=False) == [5, 5]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_update_in_row_chunks_equals_whole_micro_batches(
    tiny_model_dir: Path, packed: bool
) -> None:
    """update_tokens cuts a micro-batch into row chunks whose losses add up to the micro-batch's
    means: the same statistics, gradient norms and parameters as whole micro-batches."""
    from rlaif.train_common import build_optimizer

    m = tiny_models(tiny_model_dir)
    pc = replace(SMALL, entropy_coef=0.01, max_grad_norm=0.05)
    ro = small_rollout(m, pc, ragged=True)
    assert len(set(ro.mask.sum(1).tolist())) > 2
    if packed:
        use_short_attention(m.policy)
        use_short_attention(m.value)
        assert ppo_loop.packs(m.policy) and ppo_loop.packs(m.value)
    # one row per chunk: the widest row's tokens (real ones where packed)
    widest = max(ppo_loop.row_tokens(ro.samples, packed))
    assert len(ppo_loop.row_chunks(ppo_loop.row_tokens(ro.samples, packed), widest)) > 1
    results = []
    for budget in (0, widest):  # whole micro-batch of 4 rows; row chunks
        mc = replace(m, policy=copy.deepcopy(m.policy), value=copy.deepcopy(m.value))
        both = torch.nn.ModuleDict({"policy": mc.policy, "value": mc.value})
        opt, _ = build_optimizer(both, pc, 10)
        rows, gp, gv = ppo_loop._minibatch_one_process(
            mc, [(ro, 1.0)], opt, replace(pc, update_tokens=budget), None, "cpu", lambda **k: None
        )
        results.append((rows, gp, gv, both))
    (rows0, gp0, gv0, both0), (rows1, gp1, gv1, both1) = results
    assert gp1 == pytest.approx(gp0, rel=1e-5) and gv1 == pytest.approx(gv0, rel=1e-5)
    assert [list(r) for r in rows1] == [pytest.approx(list(r), rel=1e-5, abs=1e-7) for r in rows0]
    for (n, p0), p1 in zip(both0.named_parameters(), both1.parameters(), strict=True):
        torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6, msg=n)  # lr 1e-3 a step


def test_one_model_at_a_time_update_equals_the_joint_step(tiny_model_dir: Path) -> None:
    """Policy backward, clip and step, then the value function's: the same parameters as one
    backward of the summed loss, each model clipped on its own, and one AdamW step; over two
    accumulated micro-batches, with clipping active."""
    from rlaif.train_common import build_optimizer, grad_norm

    m = tiny_models(tiny_model_dir)
    pc = replace(SMALL, entropy_coef=0.01, max_grad_norm=0.05)
    ro = small_rollout(m, pc)
    m2 = replace(m, policy=copy.deepcopy(m.policy), value=copy.deepcopy(m.value))
    micros = [(ro.select(torch.arange(0, 2)), 0.5), (ro.select(torch.arange(2, 4)), 0.5)]

    both = torch.nn.ModuleDict({"policy": m.policy, "value": m.value})
    opt, _ = build_optimizer(both, pc, 10)
    rows, gp, gv = ppo_loop._minibatch_one_process(
        m, micros, opt, pc, None, "cpu", lambda **k: None
    )
    assert all(p.grad is None for p in both.parameters())  # nothing held after the step

    both2 = torch.nn.ModuleDict({"policy": m2.policy, "value": m2.value})
    opt2, _ = build_optimizer(both2, pc, 10)
    joint_rows = []
    for micro, share in micros:
        lp, ent, v = ppo_loop.policy_and_value(both2, micro.samples, pc.temperature, "grad")
        out = ppo_loop._losses(micro, lp, ent, v, pc, None)
        ((out["policy_part"] + out["value_part"]) * share).backward()
        joint_rows.append([ppo_loop._item(x) for x in ppo_loop._stats(out, out)])
    gp2, gv2 = grad_norm(m2.policy, pc.max_grad_norm), grad_norm(m2.value, pc.max_grad_norm)
    opt2.step()

    assert gp == pytest.approx(gp2, rel=1e-5) and gv == pytest.approx(gv2, rel=1e-5)
    assert gp > pc.max_grad_norm and gv > pc.max_grad_norm  # both clips did something
    assert [list(r) for r in rows] == [pytest.approx(r, rel=1e-6) for r in joint_rows]
    start = dict(tiny_models(tiny_model_dir).policy.named_parameters())
    moved = 0
    for (n, p), p2 in zip(both.named_parameters(), both2.parameters(), strict=True):
        torch.testing.assert_close(p, p2, rtol=1e-5, atol=1e-7, msg=n)
        key = n.removeprefix("policy.")
        moved += key in start and not torch.equal(p, start[key])
    assert moved > 10  # the policy did move
