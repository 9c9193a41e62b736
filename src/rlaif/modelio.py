"""Loading model directories safely: safetensors only, no remote code unless asked.

Every stage loads weights through :func:`load_causal_lm` (or :func:`check_model_dir` first), so the
security rules live in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaif.errors import UserError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def check_model_dir(path: Path, *, allow_pickle: bool = False) -> Path:
    """Check that ``path`` is a loadable model directory; one-line UserError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: model directory not found")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model directory (config.json is missing)")
    safes = list(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not safes and not (path / "adapter_config.json").is_file():
        if pickles and not allow_pickle:
            raise UserError(
                f"{path}: weights are pickle files only ({pickles[0].name}); pickle can run code "
                "when loaded: convert them to safetensors, or set backend.allow_pickle=true "
                "if you trust their source"
            )
        if not pickles:
            raise UserError(f"{path}: no weights found (expected *.safetensors)")
    has_tok = any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if not has_tok:
        raise UserError(f"{path}: tokenizer files are missing (tokenizer.json)")
    return path


def load_tokenizer(path: Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path: Path,
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a local model directory, safetensors only by default."""
    import torch
    from transformers import AutoModelForCausalLM

    path = check_model_dir(Path(path), allow_pickle=allow_pickle)
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=dtype or torch.float32,
            trust_remote_code=trust_remote_code,
            use_safetensors=not allow_pickle,
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError(f"{path}: cannot load model ({first})") from None
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tok
