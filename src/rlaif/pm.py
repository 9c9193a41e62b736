"""The preference model (PM): a causal-LM backbone with a scalar head on the last token.

A PM directory (what ``rlaif reward`` writes to ``run_dir/pmp/`` and ``run_dir/pm/``)::

    config.json, model.safetensors   the backbone, saved as a plain causal LM (LoRA merged)
    tokenizer.json, ...               its tokenizer (chat template included)
    pm_head.safetensors               the head: torch.nn.Linear(hidden_size, 1) as
                                      {"weight": [1, hidden_size], "bias": [1]}, float32
    pm.json                           {"format": "rlaif-preference-model", "version": 1,
                                       "head_file", "hidden_size", "pooling": "last_token",
                                       "max_length", "base_model"}

The reward of a conversation is ``head(h_T)``, where ``h_T`` is the backbone's final hidden state
(after its last norm) at the last real token of the conversation rendered with the chat template.
Because the backbone is an ordinary causal-LM directory, PPO can load it with
``AutoModelForCausalLM.from_pretrained`` and build its value function from it and the head.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlaif.attention import ATTENTION
from rlaif.errors import UserError

FORMAT = "rlaif-preference-model"
HEAD_FILE = "pm_head.safetensors"
META_FILE = "pm.json"
TRAINABLE_FILE = "trainable.safetensors"

Conversation = list[dict[str, str]] | str


def render(tokenizer: Any, conversation: Conversation) -> str:
    """The text the PM reads: the chat template (no generation prompt), trailing space dropped."""
    if isinstance(conversation, str):
        return conversation
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    else:
        names = {"user": "Human", "assistant": "Assistant", "system": "System"}
        text = "".join(
            f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in conversation
        )
    return str(text).rstrip()


class PreferenceModel(torch.nn.Module):
    """``lm`` (a causal LM, maybe LoRA-wrapped) + ``head`` (Linear(hidden, 1)) on the last token."""

    def __init__(self, lm: Any, tokenizer: Any, *, max_length: int = 512, seed: int = 0) -> None:
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.max_length = max_length
        hidden = int(lm.config.hidden_size)
        self.head = torch.nn.Linear(hidden, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1, hidden, generator=gen) / (hidden + 1) ** 0.5)
            self.head.bias.zero_()
        self.base_model_ref = ""
        self.extra_meta: dict[str, Any] = {}
        """Extra keys written to pm.json (the reward stage records phase, steps, fingerprint)."""

    # ------------------------------------------------------------------ forward

    def decoder(self) -> Any:
        """The transformer without its LM head (so no vocabulary-sized logits are computed)."""
        lm = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return getattr(lm, lm.base_model_prefix)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        read_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards, shape (B,), float32, read at the last real token of each row (any padding side).

        With right padding (what :meth:`collate` builds) no mask is passed at all: under causal
        attention a real token never sees the pads after it, and without a mask the attention
        runs as a fused causal kernel instead of materialising (B, heads, T, T) scores.

        Packed pairs (:func:`rlaif.pair_packing.pack_pairs`): a 4-D ``attention_mask`` with its
        ``position_ids`` and ``read_at`` (B, 2) gives rewards of shape (B, 2), chosen then rejected.
        """
        if attention_mask.dim() == 4:
            if position_ids is None or read_at is None:
                raise ValueError("a 4-D attention mask needs position_ids and read_at")
            return self._packed_forward(input_ids, attention_mask, position_ids, read_at)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        lengths = attention_mask.long().sum(dim=1)
        right_padded = bool(torch.equal(attention_mask.bool(), pos[None, :] < lengths[:, None]))
        mask = None if right_padded else attention_mask
        out = self.decoder()(input_ids=input_ids, attention_mask=mask, use_cache=False)
        hidden = out.last_hidden_state  # (B, T, H)
        last = (attention_mask.long() * pos).argmax(dim=1)  # (B,)
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        with torch.autocast(device_type=h_last.device.type, enabled=False):
            return self.head(h_last.float()).squeeze(-1)  # the head always runs in fp32

    def _packed_forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        read_at: torch.Tensor,
    ) -> torch.Tensor:
        impl = str(getattr(self.lm.config, "_attn_implementation", "sdpa") or "sdpa")
        if impl not in ("sdpa", "flex_attention", ATTENTION):  # eager adds a float mask instead
            dtype = next(self.decoder().parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
        out = self.decoder()(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        )
        hidden = out.last_hidden_state  # (B, T, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        h = hidden[rows, read_at]  # (B, 2, H)
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.head(h.float()).squeeze(-1)

    def collate_pairs(
        self, chosen: Sequence[list[int]], rejected: Sequence[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed ``(input_ids, mask, position_ids, read_at)`` of pairs, on the model's device."""
        from rlaif.pair_packing import pack_pairs

        packed = pack_pairs(chosen, rejected, int(self.tokenizer.pad_token_id or 0))
        dev = self.head.weight.device
        return (
            packed.input_ids.to(dev),
            packed.attention_mask.to(dev),
            packed.position_ids.to(dev),
            packed.read_at.to(dev),
        )

    # ------------------------------------------------------------------ tokens

    def encode(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        """Token ids of each conversation, cut from the left to ``max_length``."""
        texts = [render(self.tokenizer, c) for c in conversations]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(x[-self.max_length :]) for x in ids]

    def collate(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad ``rows`` into (input_ids, attention_mask) on the model's device."""
        width = max(len(r) for r in rows)
        pad = int(self.tokenizer.pad_token_id or 0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        dev = self.head.weight.device
        return ids.to(dev), mask.to(dev)

    @torch.no_grad()
    def score(
        self,
        conversations: Sequence[Conversation],
        batch_size: int = 8,
        *,
        autocast_dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> list[float]:
        """Reward of each conversation (prompt messages + the final assistant answer)."""
        from rlaif.progress import progress as bar
        from rlaif.train_common import autocast

        was_training = self.training
        self.eval()
        ids = self.encode(conversations)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [0.0] * len(ids)
        device = str(self.head.weight.device)
        starts = range(0, len(order), max(1, batch_size))
        for start in bar(starts, desc="score", show=progress, leave=False):
            chunk = order[start : start + batch_size]
            input_ids, mask = self.collate([ids[i] for i in chunk])
            with autocast(autocast_dtype, device):
                rewards = self(input_ids, mask)
            for i, r in zip(chunk, rewards.tolist(), strict=True):
                out[i] = float(r)
        self.train(was_training)
        return out

    # ------------------------------------------------------------------ saving

    def save_pretrained(
        self, path: str | Path, safe_serialization: bool = True, *, with_trainable: bool = True
    ) -> None:
        """Write the PM directory layout (module doc); LoRA adapters are merged into the copy saved.

        With LoRA and ``with_trainable`` the trainable weights (adapters + head) also go to
        ``trainable.safetensors``, so a checkpoint can resume training the same adapters.
        """
        from safetensors.torch import save_file

        from rlaif.train_common import merged_for_saving

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lm = merged_for_saving(self.lm)
        lm.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        head = {k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(head, str(path / HEAD_FILE))
        if with_trainable and hasattr(self.lm, "merge_and_unload"):
            save_file(trainable_state(self), str(path / TRAINABLE_FILE))
        meta = {
            "format": FORMAT,
            "version": 1,
            "head_file": HEAD_FILE,
            "hidden_size": int(self.head.in_features),
            "pooling": "last_token",
            "max_length": self.max_length,
            "base_model": self.base_model_ref,
            **self.extra_meta,
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def trainable_state(pm: PreferenceModel) -> dict[str, torch.Tensor]:
    """The parameters that train (LoRA adapters + head, or everything), detached on CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in pm.named_parameters() if p.requires_grad}


def load_trainable(pm: PreferenceModel, path: Path) -> None:
    """Copy ``trainable.safetensors`` from a checkpoint into the matching parameters of ``pm``."""
    from safetensors.torch import load_file

    blob = load_file(str(path))
    params = dict(pm.named_parameters())
    missing = [n for n in blob if n not in params]
    if missing:
        raise UserError(f"{path}: checkpoint does not match the model ({missing[0]} unknown)")
    with torch.no_grad():
        for name, value in blob.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def new_pm(
    base: str | Path,
    *,
    max_length: int = 512,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> PreferenceModel:
    """A fresh PM from a causal-LM directory: its weights and a newly initialised head."""
    from rlaif.modelio import load_causal_lm

    lm, tok = load_causal_lm(
        Path(base),
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    pm = PreferenceModel(lm, tok, max_length=max_length, seed=seed).to(device)
    pm.base_model_ref = str(base)
    return pm


def is_pm_dir(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file() and (Path(path) / HEAD_FILE).is_file()


def load_pm(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> PreferenceModel:
    """Load a PM directory written by :meth:`PreferenceModel.save_pretrained` (safetensors only)."""
    from safetensors.torch import load_file

    from rlaif.modelio import load_causal_lm

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: preference-model directory not found")
    if not is_pm_dir(path):
        raise UserError(
            f"{path}: not a preference-model directory ({META_FILE} or {HEAD_FILE} missing)"
        )
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path / META_FILE}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path / META_FILE}: field 'format' must be {FORMAT!r}")
    lm, tok = load_causal_lm(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    pm = PreferenceModel(lm, tok, max_length=int(meta.get("max_length", 512)))
    head = load_file(str(path / HEAD_FILE))
    if set(head) != {"weight", "bias"} or tuple(head["weight"].shape) != (1, pm.head.in_features):
        raise UserError(
            f"{path / HEAD_FILE}: expected weight [1, {pm.head.in_features}] and bias [1]"
        )
    pm.head.load_state_dict(head)
    pm.base_model_ref = str(meta.get("base_model", ""))
    pm.to(device)
    pm.eval()
    return pm
