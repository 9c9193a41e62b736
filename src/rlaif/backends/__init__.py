"""Language-model backends behind the small :class:`~rlaif.backends.base.LM` protocol.

``make_lm(ref, cfg)`` builds the backend ``cfg.kind`` names. Heavy imports (torch, transformers,
httpx) happen only when a backend is built, so the CLI starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlaif.backends.base import (
    LM,
    BackendStats,
    Conversation,
    Generation,
    GenerationParams,
    Message,
)
from rlaif.errors import UserError

if TYPE_CHECKING:
    from rlaif.config import BackendConfig

__all__ = [
    "LM",
    "BackendStats",
    "Conversation",
    "Generation",
    "GenerationParams",
    "Message",
    "make_lm",
]


def make_lm(model_ref: str, cfg: BackendConfig) -> LM:
    """The backend ``cfg.kind`` for ``model_ref``.

    ``hf``: ``model_ref`` is an alias, a local directory or a hub id (resolved, and pulled if
    needed, by :func:`rlaif.models.resolve_model`). ``openai``: ``model_ref`` is the model name the
    server knows. ``cfg.executor == "ray"``: that backend on Ray actors, calls sharded over them.
    """
    if cfg.executor == "ray":
        from rlaif.backends.ray_lm import RayLM

        return RayLM(model_ref, cfg)
    if cfg.kind == "hf":
        from rlaif.backends.hf import HFLM
        from rlaif.models import resolve_model

        return HFLM(resolve_model(model_ref), cfg)
    if cfg.kind == "openai":
        from rlaif.backends.openai_compat import OpenAICompatLM

        return OpenAICompatLM(model_ref, cfg)
    raise UserError(f"backend.kind: expected 'hf' or 'openai', got {cfg.kind!r}")
