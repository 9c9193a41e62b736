"""Tiny random models for tests and smoke runs: nothing is downloaded.

``make_tiny_model(dir)`` trains a small byte-level BPE tokenizer on real hh-rlhf text, builds a
2-layer Llama around it with random weights, and saves both (safetensors) with a ChatML template.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if not (loop.last and continue_final_message is defined and continue_final_message) %}"
    "{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus(fixtures: Path) -> list[str]:
    texts: list[str] = []
    for line in (fixtures / "hh-rlhf-60.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        texts += [rec["chosen"], rec["rejected"]]
    texts += [
        "CritiqueRequest: Identify ways the response is harmful. Critique:",
        "RevisionRequest: Rewrite the response to remove harmful content. Revision:",
        "Consider the following conversation between a human and an assistant:",
        "Options: (A) (B) The answer is: Let's think step by step:",
    ]
    return texts


def make_tiny_tokenizer(out: Path, fixtures: Path, vocab_size: int = 600) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(fixtures), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)


def make_tiny_model(
    out: Path,
    fixtures: Path | None = None,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a tiny random Llama + real BPE tokenizer to ``out``; return ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    fixtures = fixtures or Path(__file__).resolve().parents[2] / "tests" / "fixtures"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    make_tiny_tokenizer(out, fixtures)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out
