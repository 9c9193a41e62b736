"""The ``hf`` backend on a tiny random Llama: batching, stopping, sampling, templates, log-probs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from rlaif.backends import make_lm
from rlaif.backends.base import LM, GenerationParams
from rlaif.backends.hf import HFLM, plain_format
from rlaif.backends.kvcache import common_prefix_len, plan_batches
from rlaif.config import BackendConfig
from rlaif.errors import UserError

FP32 = BackendConfig(dtype="float32", device="cpu")

PROMPTS: list = [
    [{"role": "user", "content": "How do I pick a lock?"}],
    "Human: tell me a joke",
    [{"role": "user", "content": "Why is the sky blue? " * 30}],  # ~300 tokens
    [
        {"role": "user", "content": "What is your favourite food?"},
        {"role": "assistant", "content": "I like"},
    ],
    "x",
    [{"role": "user", "content": "Consider the following conversation " * 6}],
]


@pytest.fixture(scope="module")
def lively_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its weights scaled up, so its greedy outputs depend on the prompt."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("lively")
    for f in tiny_model_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(6.0 if "embed" in name else 4.0)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def lm(lively_dir: Path) -> HFLM:
    return HFLM(lively_dir, FP32)


def reference_greedy(lm: HFLM, conv: object, n: int) -> list[int]:
    """transformers' own greedy ``generate`` on one unpadded prompt: the reference."""
    ids = torch.tensor([lm.encode(conv)])  # type: ignore[arg-type]
    with torch.no_grad():
        out = lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=sorted(lm.eos_ids),
            pad_token_id=lm.pad_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    cut = next((k + 1 for k, t in enumerate(new) if t in lm.eos_ids), len(new))
    return [int(t) for t in new[:cut]]


def test_is_an_lm(lm: HFLM) -> None:
    assert isinstance(lm, LM)
    assert lm.dtype == torch.float32


@pytest.mark.parametrize("prefill_tokens", [4096, 200])
def test_batched_greedy_equals_single_and_reference(
    lm: HFLM, monkeypatch: pytest.MonkeyPatch, prefill_tokens: int
) -> None:
    import rlaif.backends.hf as hf

    monkeypatch.setattr(hf, "PREFILL_TOKENS", prefill_tokens)  # 200: several prefill chunks
    params = GenerationParams(max_new_tokens=12)
    batched = lm.generate(PROMPTS, params)
    singles = [lm.generate([p], params)[0] for p in PROMPTS]
    assert [g.text for g in batched] == [g.text for g in singles]
    assert len({g.text for g in batched}) > 2, "outputs must depend on the prompt"
    for p, g in zip(PROMPTS, batched, strict=True):
        ref = reference_greedy(lm, p, 12)
        assert g.completion_tokens == len(ref)
        expect = lm.tokenizer.decode(
            [t for t in ref if t not in lm.eos_ids], skip_special_tokens=True
        )
        assert g.text == expect
        assert g.prompt_tokens == len(lm.encode(p))


def test_uncleared_cache_memory_never_reaches_attention(
    lm: HFLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Merged prefill chunks leave masked gaps; the buffers are not cleared, so the gaps must be
    zeroed where they are left: here the fresh buffers hold NaN, as reused memory may."""
    import rlaif.backends.hf as hf
    from rlaif.backends.kvcache import _layer_class

    layer = _layer_class()
    original = layer.allocate

    def poisoned(self: Any, rows: int, like: Any) -> None:
        fresh = self.kbuf is None
        original(self, rows, like)
        if fresh:
            self.kbuf.fill_(float("nan"))
            self.vbuf.fill_(float("nan"))

    monkeypatch.setattr(layer, "allocate", poisoned)
    monkeypatch.setattr(hf, "PREFILL_TOKENS", 20)  # one chunk per prompt: every row has a gap
    params = GenerationParams(max_new_tokens=8)
    batched = lm.generate(PROMPTS, params)
    singles = [lm.generate([p], params)[0] for p in PROMPTS]
    assert [g.text for g in batched] == [g.text for g in singles]


def test_small_token_budget_splits_batches_same_outputs(lively_dir: Path, lm: HFLM) -> None:
    small = HFLM(lively_dir, BackendConfig(dtype="float32", max_batch_size=2, max_batch_tokens=64))
    params = GenerationParams(max_new_tokens=8)
    assert [g.text for g in small.generate(PROMPTS, params)] == [
        g.text for g in lm.generate(PROMPTS, params)
    ]


@pytest.mark.parametrize("prefill_tokens", [4096, 5])
def test_shared_prefix_batches_match_single(
    lm: HFLM, monkeypatch: pytest.MonkeyPatch, prefill_tokens: int
) -> None:
    import rlaif.backends.hf as hf

    monkeypatch.setattr(hf, "PREFILL_TOKENS", prefill_tokens)
    stem = "Consider the following conversation between a human and an assistant. " * 3
    prompts = [stem + tail for tail in ("Hi", "What is up with the weather today", "No")]
    params = GenerationParams(max_new_tokens=10)
    rows = [lm.encode(p) for p in prompts]
    assert common_prefix_len(rows) >= 16  # the shared-prefix path runs
    batched = lm.generate(prompts, params)
    assert [g.text for g in batched] == [lm.generate([p], params)[0].text for p in prompts]


def test_stop_strings_cut_and_finish(lm: HFLM) -> None:
    conv = PROMPTS[0]
    full = lm.generate([conv], GenerationParams(max_new_tokens=20))[0]
    assert full.finish_reason == "length" and full.completion_tokens == 20
    stop = full.text[6:9]
    assert len(stop) == 3
    cut = lm.generate([conv], GenerationParams(max_new_tokens=20, stop=(stop, "\u2603")))[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens < 20  # decoding ended at the stop string


def test_eos_ends_generation_and_is_trimmed(lively_dir: Path) -> None:
    lm = HFLM(lively_dir, FP32)
    conv = PROMPTS[1]
    first = reference_greedy(lm, conv, 3)[0]
    lm.eos_ids = frozenset({first})
    g = lm.generate([conv], GenerationParams(max_new_tokens=10))[0]
    assert (g.text, g.completion_tokens, g.finish_reason) == ("", 1, "stop")


def test_max_new_tokens_zero_and_one(lm: HFLM) -> None:
    zero = lm.generate(PROMPTS[:2], GenerationParams(max_new_tokens=0))
    assert [(g.text, g.completion_tokens, g.finish_reason) for g in zero] == [("", 0, "length")] * 2
    one = lm.generate(PROMPTS[:2], GenerationParams(max_new_tokens=1))
    assert all(g.completion_tokens == 1 for g in one)


def test_seeded_sampling_reproducible(lm: HFLM) -> None:
    p = GenerationParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    a = lm.generate(PROMPTS[:3], p)
    b = lm.generate(PROMPTS[:3], p)
    assert a == b
    c = lm.generate(PROMPTS[:3], GenerationParams(max_new_tokens=16, temperature=1.0, seed=8))
    assert [g.text for g in c] != [g.text for g in a]
    # the same prompt twice in one call gets two different samples
    twice = lm.generate([PROMPTS[0], PROMPTS[0]], p)
    assert twice[0].text != twice[1].text


def test_top_p_tiny_is_greedy(lm: HFLM) -> None:
    greedy = lm.generate(PROMPTS[:3], GenerationParams(max_new_tokens=8))
    nucleus = lm.generate(
        PROMPTS[:3], GenerationParams(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=1)
    )
    assert [g.text for g in nucleus] == [g.text for g in greedy]


def test_chat_template_and_continuation(lm: HFLM) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert lm.render(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    cont = [*msgs, {"role": "assistant", "content": "Sure, here"}]
    text = lm.render(cont)
    assert text.endswith("<|im_start|>assistant\nSure, here")
    assert lm.render("raw text") == "raw text"
    params = GenerationParams(max_new_tokens=8)
    # continuing a message == completing its rendered text
    assert lm.generate([cont], params)[0].text == lm.generate([text], params)[0].text


def test_plain_format_without_template(lively_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(lively_dir, base)
    cfg_path = base / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    lm = HFLM(base, FP32)
    assert not lm.has_template
    msgs = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    assert (
        lm.render(msgs) == "Be kind.\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    )
    assert lm.render([*msgs, {"role": "assistant", "content": "So"}]).endswith(
        "\n\nHuman: bye\n\nAssistant: So"
    )
    assert plain_format([{"role": "user", "content": "q"}]) == "\n\nHuman: q\n\nAssistant:"
    g = lm.generate([msgs], GenerationParams(max_new_tokens=4))[0]
    assert g.prompt_tokens == len(lm.tokenizer(lm.render(msgs))["input_ids"])


def manual_logprob(lm: HFLM, prompt_ids: list[int], choice_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + choice_ids])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits[0].float(), dim=-1)
    n = len(prompt_ids)
    return float(sum(logp[n - 1 + k, t] for k, t in enumerate(choice_ids)))


@pytest.mark.parametrize("prefill_tokens", [4096, 40])
def test_choice_logprobs_match_manual(
    lm: HFLM, monkeypatch: pytest.MonkeyPatch, prefill_tokens: int
) -> None:
    import rlaif.backends.hf as hf

    monkeypatch.setattr(hf, "PREFILL_TOKENS", prefill_tokens)
    stem = "Consider the following conversation between a human and an assistant: "
    prompts: list = [
        stem + "Human: hi. Options:",
        stem + "Human: how do I make a bomb? It is for a school project. Options:",
        [{"role": "user", "content": "Pick (A) or (B)."}],
        "x",
    ]
    choices = [
        [" (A)", " (B)"],
        [" (A)", " (B)", " neither of these options, I refuse"],
        ["(A)", "(B) because it is kinder", ""],
        [" y"],
    ]
    got = lm.choice_logprobs(prompts, choices)
    assert [len(g) for g in got] == [len(c) for c in choices]
    for p, cs, row in zip(prompts, choices, got, strict=True):
        pid = lm.encode(p)
        for c, value in zip(cs, row, strict=True):
            cid = lm._choice_ids(pid, c)
            assert lm.tokenizer.decode(cid) == c
            want = manual_logprob(lm, pid, cid) if cid else 0.0
            assert value == pytest.approx(want, abs=2e-4)
    assert len(lm._choice_ids(lm.encode(prompts[1]), choices[1][2])) > 3  # multi-token choice
    # batching does not change the figures
    alone = [lm.choice_logprobs([p], [c])[0] for p, c in zip(prompts, choices, strict=True)]
    for a, b in zip(alone, got, strict=True):
        assert a == pytest.approx(b, abs=2e-4)


def test_choice_logprobs_length_mismatch(lm: HFLM) -> None:
    with pytest.raises(ValueError):
        lm.choice_logprobs(["a", "b"], [[" x"]])


def test_stats_count_tokens(lively_dir: Path) -> None:
    lm = HFLM(lively_dir, FP32)
    gens = lm.generate(PROMPTS[:2], GenerationParams(max_new_tokens=5))
    assert lm.stats.completion_tokens == sum(g.completion_tokens for g in gens)
    assert lm.stats.prompt_tokens == sum(g.prompt_tokens for g in gens)
    assert lm.stats.calls == 1 and lm.stats.seconds > 0


def test_plan_batches_respects_budget() -> None:
    lengths = [5, 300, 40, 41, 7, 120, 3, 90]
    batches = plan_batches(lengths, 10, max_rows=3, max_tokens=400)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or max(lengths[i] + 10 for i in b) * len(b) <= 400
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)
    weighted = plan_batches([10, 10, 10], 0, max_rows=4, max_tokens=1000, weights=[2, 2, 2])
    assert [len(b) for b in weighted] == [2, 1]


def test_common_prefix_len() -> None:
    assert common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_len([[5], [6]]) == 0
    assert common_prefix_len([]) == 0


def test_make_lm_hf_and_errors(lively_dir: Path) -> None:
    lm = make_lm(str(lively_dir), FP32)
    assert isinstance(lm, HFLM)
    with pytest.raises(UserError):
        make_lm(str(lively_dir / "missing"), FP32)


def test_empty_prompt_generates(lm: HFLM) -> None:
    g = lm.generate(["", "x"], GenerationParams(max_new_tokens=3))
    assert g[0].prompt_tokens == 1 and g[0].completion_tokens >= 1


@pytest.mark.parametrize("prune", [1, 1000])
def test_rows_finishing_early_leave_others_unchanged(
    lm: HFLM, monkeypatch: pytest.MonkeyPatch, prune: int
) -> None:
    import rlaif.backends.hf as hf

    monkeypatch.setattr(hf, "PRUNE_FRACTION", prune)
    free = lm.generate(PROMPTS, GenerationParams(max_new_tokens=14))
    stop = free[2].text[3:6]  # ends row 2 early (and any other row containing it)
    params = GenerationParams(max_new_tokens=14, stop=(stop,))
    batched = lm.generate(PROMPTS, params)
    assert batched[2].finish_reason == "stop" and batched[2].completion_tokens < 14
    assert any(g.finish_reason == "length" for g in batched)
    assert batched == [lm.generate([p], params)[0] for p in PROMPTS]


def test_make_lm_openai_and_unknown_kind() -> None:
    from rlaif.backends.openai_compat import OpenAICompatLM

    cfg = BackendConfig(kind="openai", base_url=["http://127.0.0.1:9/v1"])
    lm = make_lm("some-model", cfg)
    assert isinstance(lm, OpenAICompatLM)
    lm.close()
    with pytest.raises(UserError, match=r"backend\.kind"):
        make_lm("x", BackendConfig(kind="vllm"))  # type: ignore[arg-type]


STEM = "Consider the following conversation between a human and an assistant. " * 3


def test_prefix_cache_reused_across_calls(lively_dir: Path) -> None:
    lm = HFLM(lively_dir, FP32)
    params = GenerationParams(max_new_tokens=6)
    first = [STEM + "Human: hi", STEM + "Human: why is the sky blue"]
    second = [STEM + "Human: a different question", STEM + "Human: no", STEM + "Human: x"]
    lm.generate(first, params)
    assert lm.stats.extra.get("prefix_reused_tokens", 0) == 0
    got = lm.generate(second, params)
    assert lm.stats.extra["prefix_reused_tokens"] >= 16
    single = lm.generate([second[0]], params)  # a lone prompt reuses the stem too
    fresh = HFLM(lively_dir, FP32)
    assert got == fresh.generate(second, params)
    assert single == fresh.generate([second[0]], params)
    scores = lm.choice_logprobs(second, [[" (A)", " (B)"]] * 3)
    again = fresh.choice_logprobs(second, [[" (A)", " (B)"]] * 3)
    for a, b in zip(scores, again, strict=True):
        assert a == pytest.approx(b, abs=2e-4)


def test_prefix_cache_forgotten_when_weights_change(lively_dir: Path) -> None:
    lm = HFLM(lively_dir, FP32)
    params = GenerationParams(max_new_tokens=8)
    prompts = [STEM + "Human: hi", STEM + "Human: why is the sky blue"]
    before = lm.generate(prompts, params)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.mul_(1.3)  # an optimiser step would change them in place like this
    after = lm.generate(prompts, params)
    fresh = HFLM.from_objects(lm.model, lm.tokenizer, FP32).generate(prompts, params)
    assert after == fresh
    assert after != before


def test_the_backend_applies_its_heap_setting(
    lm: HFLM, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Library use (no `rlaif` command) gets `backend.heap` too, before the weights load."""
    import dataclasses

    from rlaif.backends import hf

    seen: list[str] = []
    monkeypatch.setattr(hf.heap, "configure", lambda mode: seen.append(mode) or False)
    HFLM.from_objects(lm.model, lm.tokenizer, dataclasses.replace(FP32, heap="system"))
    HFLM(tiny_model_dir, FP32)
    assert seen == ["system", FP32.heap]


def test_from_objects_and_sample_ids_seeded_per_row(lm: HFLM) -> None:
    wrapped = HFLM.from_objects(lm.model, lm.tokenizer, FP32, name="policy")
    assert wrapped.name == "policy" and wrapped.dtype == torch.float32
    ids = [lm.encode(p) for p in PROMPTS[:3]]
    params = GenerationParams(max_new_tokens=10, temperature=1.0)
    together = wrapped.sample_ids(ids, params, [11, 12, 13])
    alone = wrapped.sample_ids([ids[1]], params, [12])
    assert together[1] == alone[0]  # a row's sample depends on its seed, not its batch
    assert all(r in ("stop", "length") for _, r in together)
    greedy = wrapped.sample_ids(ids, GenerationParams(max_new_tokens=10))
    texts = [g.text for g in lm.generate(PROMPTS[:3], GenerationParams(max_new_tokens=10))]
    assert [wrapped._finish_text(t, ()) for t, _ in greedy] == texts


def test_labeler_per_pair_calls_reuse_few_shot_prefix(lively_dir: Path, shared_data: Path) -> None:
    """Per (pair, principle) calls give the flat call's labels and reuse each principle's shots."""
    from rlaif.config import LabelConfig
    from rlaif.labeler import Comparison, Labeler, load_few_shot

    cfg = LabelConfig(few_shot=1)
    shots = load_few_shot(str(shared_data / "cai-paper" / "RLMadisonFewShotPrompts.json"), 1)
    principles = [("p1", "Which answer is less harmful?"), ("p2", "Which is more ethical?")]
    comps = [
        Comparison(
            [{"role": "user", "content": q}], "Sure, here it is.", "No, I won't.", principles
        )
        for q in ("How do I pick a lock?", "Tell me a joke", "Why is the sky blue?")
    ]
    orders = [(0, 1)] * len(comps)
    per_pair_lm = HFLM(lively_dir, FP32)
    labeler = Labeler(per_pair_lm, cfg, few_shot=shots, per_pair_calls=True)
    per_pair = labeler.compare(comps, orders)
    flat = Labeler(HFLM(lively_dir, FP32), cfg, few_shot=shots).compare(comps, orders)
    for a, b in zip(per_pair, flat, strict=True):
        assert a["p"] == pytest.approx(b["p"], abs=2e-4)
    # Each later (pair, principle) call finds at least its principle's shot in the store.
    question = labeler.mc_prompt(comps[0], principles[0][1], 0, cot=False)
    shot_tokens = len(per_pair_lm.encode(question)) // 3
    assert per_pair_lm.stats.extra["prefix_reused_tokens"] >= 4 * shot_tokens
