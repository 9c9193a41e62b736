"""The ``hf`` backend: a transformers causal LM run in this process, batched across requests.

How it is fast on a CPU:
- requests are sorted by prompt length and cut into batches under a token budget
  (``max_batch_tokens``, padded prompt + new tokens summed over rows) and a row cap
  (``max_batch_size``), so padding stays small;
- the prompt tokens that every row of a batch shares (few-shot examples, a common instruction)
  run once and their KV cache is copied to every row; the rest is left padded;
- the prefill computes logits for the last position only;
- an own decode loop over a KV cache: no ``generate()`` per-step machinery, rows that finish
  (EOS, stop string, length) leave the batch at once;
- the dtype is the one :func:`rlaif.backends.dtype.pick_dtype` finds fastest.

``choice_logprobs`` runs each batch of prompts once, then scores every candidate of every prompt
in one more forward pass over the copied prompt caches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaif import heap
from rlaif.backends.base import BackendStats, Conversation, Generation, GenerationParams
from rlaif.backends.dtype import pick_dtype, resolve_device
from rlaif.backends.kvcache import (
    KVCache,
    PrefixStore,
    common_prefix_len,
    plan_batches,
    select_next,
)
from rlaif.config import BackendConfig
from rlaif.modelio import load_causal_lm

if TYPE_CHECKING:
    import torch

# Share a batch's common prompt prefix only when it is at least this many tokens.
MIN_SHARED_PREFIX = 16
# Finished rows leave the batch once they are at least 1/PRUNE_FRACTION of it (each drop copies
# the KV cache, each finished row kept costs 1/rows of a step).
PRUNE_FRACTION = 8
# Prompts are prefilled in chunks of at most this many padded tokens, grouped by length. Smaller
# chunks pad less (64 hh-rlhf prompts: 42 % padding at 4096, 13 % at 1024) while 1024 rows still
# keep the matmuls near their peak (docs/backends.md).
PREFILL_TOKENS = 1024
# Prompt prefixes remembered across calls (KV caches of batch 1), in tokens all together.
PREFIX_CACHE_TOKENS = 8192


def plain_format(messages: Sequence[dict[str, str]]) -> str:
    """``\\n\\nHuman: ...\\n\\nAssistant: ...`` for models without a chat template.

    A system message goes first as plain text; a final assistant message is left open (continued).
    """
    parts: list[str] = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            parts.append(content)
        elif role == "user":
            parts.append(f"\n\nHuman: {content}")
        elif role == "assistant":
            parts.append(f"\n\nAssistant: {content}" if content else "\n\nAssistant:")
        else:
            raise ValueError(f"unknown chat role {role!r}")
    if not messages or messages[-1]["role"] != "assistant":
        parts.append("\n\nAssistant:")
    return "".join(parts)


class HFLM:
    """A transformers causal LM behind the :class:`~rlaif.backends.base.LM` protocol.

    Making one applies ``cfg.heap`` to the whole process (:func:`rlaif.heap.configure`): with
    the default ``keep``, glibc serves every block from its heap and never trims it, so memory
    freed after the peak stays with the process (a notebook or a service included). Pass
    ``BackendConfig(heap="system")`` to leave the allocator as it is.
    """

    def __init__(self, path: str | Path, cfg: BackendConfig | None = None) -> None:
        cfg = cfg or BackendConfig()
        heap.configure(cfg.heap)  # before the weights: library use gets what `rlaif` commands do
        device = resolve_device(cfg.device)
        dtype = pick_dtype(cfg.dtype, device)
        model, tokenizer = load_causal_lm(
            Path(path),
            dtype=dtype,
            device=device,
            trust_remote_code=cfg.trust_remote_code,
            allow_pickle=cfg.allow_pickle,
        )
        self._setup(model, tokenizer, cfg, Path(path).name)
        self.path = Path(path)

    @classmethod
    def from_objects(
        cls,
        model: Any,
        tokenizer: Any,
        cfg: BackendConfig | None = None,
        name: str = "policy",
        compute_dtype: torch.dtype | None = None,
    ) -> HFLM:
        """Wrap an already loaded model and tokenizer (e.g. a policy being trained).

        The model keeps its dtype and device; ``cfg`` gives the batching limits.
        ``compute_dtype``: the dtype its keys and values come out in when the caller runs it
        under autocast (the KV cache is kept in it); by default that of its weights.
        """
        lm = cls.__new__(cls)
        cfg = cfg or BackendConfig()
        heap.configure(cfg.heap)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        lm._setup(model, tokenizer, cfg, name)
        if compute_dtype is not None:
            lm.dtype = compute_dtype
        lm.path = Path(name)
        return lm

    def _setup(self, model: Any, tokenizer: Any, cfg: BackendConfig, name: str) -> None:
        self.cfg = cfg
        self.name = name
        self.model, self.tokenizer = model, tokenizer
        first = next(model.parameters())
        self.device = str(first.device)
        self.dtype: torch.dtype = first.dtype
        self.stats = BackendStats()
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        eos: set[int] = set()
        gen_cfg = getattr(model, "generation_config", None)
        for src in (getattr(gen_cfg, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif src:
                eos.update(int(x) for x in src)
        self.eos_ids = frozenset(eos)
        self.pad_id = int(tokenizer.pad_token_id)
        self.prefixes = PrefixStore(PREFIX_CACHE_TOKENS, MIN_SHARED_PREFIX)

    # ---- prompts -------------------------------------------------------------------------

    def render(self, conversation: Conversation) -> str:
        """The prompt text the model sees: chat template, or the plain Human/Assistant format."""
        if isinstance(conversation, str):
            return conversation
        msgs = list(conversation)
        cont = bool(msgs) and msgs[-1]["role"] == "assistant"
        if not self.has_template:
            return plain_format(msgs)
        text = self.tokenizer.apply_chat_template(
            msgs,
            tokenize=False,
            add_generation_prompt=not cont,
            continue_final_message=cont,
        )
        return str(text)

    def encode(self, conversation: Conversation) -> list[int]:
        """Token ids of the rendered prompt (special tokens added only outside chat templates)."""
        special = isinstance(conversation, str) or not self.has_template
        ids = self.tokenizer(self.render(conversation), add_special_tokens=special)["input_ids"]
        if not ids:  # an empty prompt: start from BOS (or EOS, which opens a new document)
            start = self.tokenizer.bos_token_id
            ids = [start if start is not None else min(self.eos_ids)]
        return [int(t) for t in ids]

    # ---- shared prefill ------------------------------------------------------------------

    def _prefill(
        self, rows: Sequence[list[int]], extra: int
    ) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prompts ``rows``; return (cache, mask, last-position logits, next positions).

        The longest prefix common to all rows runs once (batch 1) and is copied to every row.
        The rest of each prompt runs in chunks of similar length (at most ``PREFILL_TOKENS``
        padded tokens each, so short prompts are not padded to the longest one) and lands left
        padded in one cache. ``extra`` is the room to reserve for tokens that follow.
        """
        import torch

        n, dev = len(rows), self.device
        limit = min(len(r) for r in rows) - 1  # every row keeps at least one token of its own
        shared = min(common_prefix_len(rows), limit) if n > 1 else limit
        pre, shared = self._shared_prefix(rows[0], shared, store=n > 1)
        suffixes = [r[shared:] for r in rows]
        width = max(len(s) for s in suffixes)
        cache = KVCache(self.model, n, shared + width + extra, self.dtype, dev)
        lengths = [len(s) for s in suffixes]
        chunks = plan_batches(lengths, 0, n, PREFILL_TOKENS) if cache.prealloc else [list(range(n))]
        if len(chunks) == 1:
            chunks = [list(range(n))]
        logits: torch.Tensor | None = None
        next_pos = torch.zeros(n, dtype=torch.long, device=dev)
        for chunk in chunks:
            w = max(lengths[i] for i in chunk)
            part = (
                cache
                if len(chunks) == 1
                else KVCache(self.model, len(chunk), shared + w, self.dtype, dev)
            )
            if pre is not None:
                part.adopt(pre, len(chunk))
            ids = torch.full((len(chunk), w), self.pad_id, dtype=torch.long)
            valid = torch.zeros((len(chunk), w), dtype=torch.bool)
            for k, i in enumerate(chunk):
                ids[k, w - lengths[i] :] = torch.tensor(suffixes[i])
                valid[k, w - lengths[i] :] = True
            ids, valid = ids.to(dev), valid.to(dev)
            pos = shared + (valid.long().cumsum(-1) - 1).clamp(min=0)
            part.mask[:, :shared] = True
            part.set_mask(shared, valid)
            out = part.forward(self.model, ids, pos)[:, -1].float()
            if logits is None:
                logits = out.new_empty((n, out.shape[-1]))
            idx = torch.tensor(chunk, device=dev)
            logits[idx], next_pos[idx] = out, pos[:, -1] + 1
            if part is not cache:
                cache.place(part, idx, shared, shared + width - w)
        if len(chunks) > 1:
            cache.set_length(shared + width)
        assert logits is not None
        return cache, cache.mask, logits, next_pos

    def _shared_prefix(
        self, row: list[int], shared: int, *, store: bool
    ) -> tuple[KVCache | None, int]:
        """A batch-1 KV cache of ``row[:k]`` and ``k``, the prefix a batch runs once.

        ``shared`` tokens are common to the batch. The part already in the cross-call prefix
        cache (few-shot examples asked about again and again) is copied from there, the rest
        runs now; a batch (``store``) remembers its prefix, a single row only reuses one.
        """
        import torch

        dev = self.device
        version = sum(p._version for p in self.model.parameters())  # bumped by in-place updates
        hit_kv, hit = self.prefixes.lookup(row[:shared], version)
        if not store:
            shared = hit
        if shared < MIN_SHARED_PREFIX:
            return None, 0
        pre = KVCache(self.model, 1, shared, self.dtype, dev)
        pre.mask[:] = True
        if hit_kv is not None:
            pre.adopt(hit_kv, 1, upto=hit)
            self.stats.extra["prefix_reused_tokens"] = (
                self.stats.extra.get("prefix_reused_tokens", 0.0) + hit
            )
        if hit < shared:
            ids = torch.tensor([row[hit:shared]], device=dev)
            pre.forward(self.model, ids, torch.arange(hit, shared, device=dev)[None])
        if store and pre.prealloc:
            self.prefixes.remember(row[:shared], pre)
        return pre, shared

    def clear_prefix_cache(self) -> None:
        """Forget the remembered prompt prefixes (done automatically when weights change)."""
        self.prefixes.clear()

    # ---- generation ----------------------------------------------------------------------

    def generate(
        self,
        conversations: Sequence[Conversation],
        params: GenerationParams,
        seeds: Sequence[int] | None = None,
    ) -> list[Generation]:
        """Complete every conversation; results in input order (``seeds`` as in sample_ids)."""
        prompts = [self.encode(c) for c in conversations]
        results = self.sample_ids(prompts, params, seeds)
        return [
            Generation(
                text=self._finish_text(toks, params.stop),
                prompt_tokens=len(p),
                completion_tokens=len(toks),
                finish_reason=reason,
            )
            for p, (toks, reason) in zip(prompts, results, strict=True)
        ]

    def sample_ids(
        self,
        prompt_ids: Sequence[list[int]],
        params: GenerationParams,
        seeds: Sequence[int] | None = None,
    ) -> list[tuple[list[int], str]]:
        """Generate from token ids: per prompt the new ids (a final EOS kept) and finish reason.

        ``seeds[i]`` seeds prompt ``i``'s sampling; by default they derive from ``params.seed``
        and ``i``. Stop strings end a row but are not cut from the ids.
        """
        from rlaif.progress import progress

        t0 = time.perf_counter()
        if seeds is None:
            base = params.seed if params.seed is not None else _fresh_seed()
            seeds = [base * 1_000_003 + i for i in range(len(prompt_ids))]
        out: list[tuple[list[int], str]] = [([], "length")] * len(prompt_ids)
        batches = plan_batches(
            [len(p) for p in prompt_ids],
            params.max_new_tokens,
            self.cfg.max_batch_size,
            self.cfg.max_batch_tokens,
        )
        bar = progress(total=len(prompt_ids), desc=f"generate {self.name}", unit="seq", leave=False)
        new_tokens = 0
        for batch in batches:
            rows = [list(prompt_ids[i]) for i in batch]
            results = self._generate_batch(rows, params, [seeds[i] for i in batch])
            for i, res in zip(batch, results, strict=True):
                out[i] = res
                new_tokens += len(res[0])
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.1f}")
        bar.close()
        self._account(sum(len(p) for p in prompt_ids), new_tokens, time.perf_counter() - t0)
        return out

    def _finish_text(self, toks: list[int], stop: Sequence[str]) -> str:
        if toks and toks[-1] in self.eos_ids:
            toks = toks[:-1]
        text = str(self.tokenizer.decode(toks, skip_special_tokens=True))
        cut = min((k for k in (text.find(s) for s in stop if s) if k >= 0), default=-1)
        return text[:cut] if cut >= 0 else text

    def _generate_batch(
        self, rows: list[list[int]], params: GenerationParams, seeds: list[int]
    ) -> list[tuple[list[int], str]]:
        """Decode one batch; per row the new token ids and the finish reason."""
        import torch

        n = len(rows)
        if params.max_new_tokens <= 0:
            return [([], "length") for _ in rows]
        gens = None
        if params.temperature > 0:
            gens = [torch.Generator(device=self.device).manual_seed(s % 2**63) for s in seeds]
        stops = [s for s in params.stop if s]
        tail = max((len(s) for s in stops), default=0) + 8
        with torch.inference_mode():
            t0 = time.perf_counter()
            cache, _, logits, next_pos = self._prefill(rows, params.max_new_tokens)
            extra = self.stats.extra
            extra["prefill_s"] = extra.get("prefill_s", 0.0) + time.perf_counter() - t0
            toks: list[list[int]] = [[] for _ in range(n)]
            reasons = ["length"] * n
            live = list(range(n))  # batch row of each cache row
            done = [False] * n  # per cache row: finished, waiting to be dropped
            for step in range(params.max_new_tokens):
                nxt = select_next(logits, params.temperature, params.top_p, gens, live)
                chosen = nxt.tolist()
                for k, row in enumerate(live):
                    if done[k]:
                        continue
                    t = chosen[k]
                    toks[row].append(t)
                    if t in self.eos_ids or (
                        stops and _hit_stop(self.tokenizer, toks[row], stops, tail)
                    ):
                        reasons[row] = "stop"
                        done[k] = True
                n_done = sum(done)
                if n_done == len(live) or step == params.max_new_tokens - 1:
                    break
                # Dropping rows copies the cache: do it once an eighth of the rows are finished
                if n_done and n_done * PRUNE_FRACTION >= len(live):
                    keep = [k for k in range(len(live)) if not done[k]]
                    idx = torch.tensor(keep, device=self.device)
                    cache.select(idx)
                    nxt, next_pos = nxt[idx], next_pos[idx]
                    live, done = [live[k] for k in keep], [False] * len(keep)
                cache.set_mask(cache.length, None)
                logits = cache.forward(self.model, nxt[:, None], next_pos[:, None])[:, -1].float()
                next_pos = next_pos + 1
        extra["decode_steps"] = extra.get("decode_steps", 0.0) + step + 1
        return [(toks[i], reasons[i]) for i in range(n)]

    # ---- log-probs -----------------------------------------------------------------------

    def choice_logprobs(
        self, prompts: Sequence[Conversation], choices: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """``[i][j] = log P(choices[i][j] | prompts[i])``: one prompt pass per batch, one for choices."""
        from rlaif.progress import progress

        if len(prompts) != len(choices):
            raise ValueError("choice_logprobs: prompts and choices differ in length")
        t0 = time.perf_counter()
        enc = [self.encode(p) for p in prompts]
        cids = [[self._choice_ids(p, c) for c in cs] for p, cs in zip(enc, choices, strict=True)]
        longest = max((len(c) for cs in cids for c in cs), default=0)
        batches = plan_batches(
            [len(p) for p in enc],
            longest,
            self.cfg.max_batch_size,
            self.cfg.max_batch_tokens,
            weights=[max(1, len(cs)) for cs in cids],
        )
        out: list[list[float]] = [[] for _ in enc]
        for batch in progress(batches, desc=f"logprobs {self.name}", unit="batch", leave=False):
            scores = self._score_batch([enc[i] for i in batch], [cids[i] for i in batch])
            for i, s in zip(batch, scores, strict=True):
                out[i] = s
        n_choice = sum(len(c) for cs in cids for c in cs)
        self._account(sum(len(p) for p in enc) + n_choice, 0, time.perf_counter() - t0)
        return out

    def _choice_ids(self, prompt: list[int], choice: str) -> list[int]:
        """Tokens of ``choice`` as they follow ``prompt`` (joint tokenization where it splits cleanly)."""
        if not choice:
            return []
        text = str(self.tokenizer.decode(prompt))
        joint = self.tokenizer(text + choice, add_special_tokens=False)["input_ids"]
        plain = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if list(joint[: len(plain)]) == list(plain) and len(joint) > len(plain):
            return [int(t) for t in joint[len(plain) :]]
        return [int(t) for t in self.tokenizer(choice, add_special_tokens=False)["input_ids"]]

    def _score_batch(self, rows: list[list[int]], cids: list[list[list[int]]]) -> list[list[float]]:
        import torch

        pairs = [(i, c) for i, cs in enumerate(cids) for c in cs]
        width = max((len(c) for _, c in pairs), default=0)
        if not pairs or width == 0:
            return [[0.0] * len(cs) for cs in cids]
        dev = self.device
        with torch.inference_mode():
            cache, _, last, next_pos = self._prefill(rows, width)
            first = torch.log_softmax(last, dim=-1)
            src = torch.tensor([i for i, _ in pairs], device=dev)
            ids = torch.full((len(pairs), width), self.pad_id, dtype=torch.long)
            valid = torch.zeros((len(pairs), width), dtype=torch.bool)
            for k, (_, c) in enumerate(pairs):
                ids[k, : len(c)] = torch.tensor(c)
                valid[k, : len(c)] = True
            ids, valid = ids.to(dev), valid.to(dev)
            lp = torch.zeros((len(pairs), width), device=dev)
            has = valid[:, 0]
            lp[:, 0] = torch.where(has, first[src].gather(1, ids[:, :1]).squeeze(1), 0.0)
            if width > 1:
                cache.select(src)
                cache.set_mask(cache.length, valid[:, :-1])
                pos = next_pos[src][:, None] + torch.arange(width - 1, device=dev)[None]
                logits = cache.forward(self.model, ids[:, :-1], pos, logits=True).float()
                logp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
                lp[:, 1:] = torch.where(valid[:, 1:], logp, 0.0)
            sums = lp.sum(1).tolist()
        result: list[list[float]] = [[] for _ in cids]
        for (i, _), s in zip(pairs, sums, strict=True):
            result[i].append(float(s))
        return result

    def _account(self, prompt_tokens: int, new_tokens: int, seconds: float) -> None:
        st = self.stats
        st.prompt_tokens += prompt_tokens
        st.completion_tokens += new_tokens
        st.seconds += seconds
        st.calls += 1
        if st.seconds > 0:
            st.extra["completion_tokens_per_s"] = st.completion_tokens / st.seconds


def _fresh_seed() -> int:
    import torch

    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _hit_stop(tokenizer: Any, toks: list[int], stops: list[str], tail_tokens: int) -> bool:
    """Whether the decoded tail of ``toks`` contains a stop string."""
    text = tokenizer.decode(toks[-tail_tokens:], skip_special_tokens=True)
    return any(s in text for s in stops)
