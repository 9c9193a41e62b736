"""The pieces under the ``hf`` backend's decode loop: batch planning, a preallocated KV cache, sampling.

:class:`KVCache` keeps every layer's keys and values in buffers allocated once for the whole
generation (transformers' ``DynamicCache`` concatenates, copying the whole cache at every step),
plus the batch's 2-D attention mask. Rows can be dropped (:meth:`KVCache.select`), a batch-1
prefix cache copied to many rows (:meth:`KVCache.adopt`) and chunks prefilled apart merged into
one left-padded cache (:meth:`KVCache.place`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def plan_batches(
    lengths: Sequence[int],
    extra: int,
    max_rows: int,
    max_tokens: int,
    weights: Sequence[int] | None = None,
) -> list[list[int]]:
    """Cut requests into batches: sorted by length (longest first), under a row and token budget.

    A batch's cost is ``(longest prompt + extra) * sum(weights)`` tokens (``weights``: rows each
    request becomes, 1 by default). A request over budget on its own still gets a batch.
    """
    w = list(weights) if weights is not None else [1] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_len = cur_rows = 0
    for i in order:
        span = max(cur_len, lengths[i] + extra)
        rows = cur_rows + w[i]
        if cur and (rows > max_rows or span * rows > max_tokens):
            batches.append(cur)
            cur, span, rows = [], lengths[i] + extra, w[i]
        cur.append(i)
        cur_len, cur_rows = span, rows
    if cur:
        batches.append(cur)
    return batches


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all ``rows``."""
    if not rows:
        return 0
    first = rows[0]
    n = min(len(r) for r in rows)
    for k in range(n):
        t = first[k]
        if any(r[k] != t for r in rows):
            return k
    return n


class NonFiniteProbabilities(ValueError):
    """A row of next-token probabilities without mass, or with NaN or inf in it."""


def select_next(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generators: Sequence[torch.Generator] | None,
    rows: Sequence[int],
) -> torch.Tensor:
    """Next token per row of ``logits`` ``(n, vocab)``: argmax, or temperature + nucleus sampling.

    Row ``k`` samples with ``generators[rows[k]]``, so a request's draws do not depend on which
    other requests share its batch or when they finished. A row takes one uniform draw and
    inverts its distribution's cumulative sum (:func:`inverse_cdf`).
    """
    import torch

    if temperature <= 0 or generators is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    gens = [generators[row] for row in rows]
    u = [torch.rand((), dtype=torch.float64, generator=g, device=g.device) for g in gens]
    return inverse_cdf(probs, torch.stack(u))  # on the generators' device; moved where needed


def nucleus(probs: torch.Tensor, top_p: float, first_k: int = 256) -> torch.Tensor:
    """``probs`` ``(n, vocab)`` (rows summing to 1) with every token outside each row's nucleus
    set to 0: a token stays while the mass of the more likely tokens before it is at most ``top_p``.

    The largest ``k`` probabilities are sorted, not the whole vocabulary: ``k`` starts at
    ``first_k`` and grows fourfold until every row's top ``k`` hold more than ``top_p`` (then no
    token past them can stay). A full sort of a 49k vocabulary takes 17 ms for 8 rows on a
    2-core EPYC, the top 256 1 ms.
    """
    import torch

    vocab = probs.shape[-1]
    k = max(1, min(first_k, vocab))
    while True:
        top, order = probs.topk(k, dim=-1)
        mass = top.cumsum(-1)  # the same sums decide where to stop and what to drop
        if k == vocab or bool((mass[:, -1] > top_p).all()):
            break
        k = min(4 * k, vocab)
    drop = mass - top > top_p
    return torch.zeros_like(probs).scatter(-1, order, top.masked_fill(drop, 0.0))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of ``probs`` ``(n, vocab)`` (non-negative, not necessarily normalised), the index
    whose cumulative-sum interval holds ``u * total`` (``u`` ``(n,)`` uniform in [0, 1)): a draw
    from the row's distribution. A zero-probability index is never returned; a row without
    mass, or with a NaN or infinite probability, is a :class:`NonFiniteProbabilities` (a
    ``ValueError``; ``torch.multinomial`` refuses such rows too).

    One uniform per row and a cumulative sum replace ``torch.multinomial``, whose CPU kernel
    draws an exponential for every vocabulary entry: 1.1 ms a row for a 49k vocabulary on a
    2-core EPYC, against about 0.1 ms here. The sums are in float64 (on the CPU where the
    device has none, as MPS).
    """
    import torch

    dev = probs.device
    if dev.type == "mps":
        probs = probs.cpu()
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:].contiguous()
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise NonFiniteProbabilities(
            "sampling: a row of next-token probabilities has no mass, or NaN or inf in it"
        )
    idx = torch.searchsorted(cdf, u.to(cdf.device)[:, None] * total, right=True)
    # u * total can round up to total, past the end: the last index with mass is the answer then
    last = torch.searchsorted(cdf, total)
    return torch.minimum(idx, last).squeeze(1).to(dev)


@functools.cache
def _cache_kwarg(model_cls: Any) -> str:
    """The forward argument naming the KV cache: ``cache`` (transformers >= 5.2x) or the older one."""
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@functools.cache
def _layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class PreallocLayer(DynamicLayer):  # type: ignore[misc]
        """Keys/values in buffers ``(batch, heads, capacity, dim)``; ``keys`` is a view of the filled part."""

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.length = 0
            self.kbuf: Any = None
            self.vbuf: Any = None

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
            n = key_states.shape[-2]
            if self.kbuf is None:
                b, h, _, d = key_states.shape
                cap = max(self.capacity, n)
                self.kbuf = key_states.new_empty((b, h, cap, d))
                self.vbuf = value_states.new_empty((b, h, cap, value_states.shape[-1]))
                self.device, self.is_initialized = key_states.device, True
            elif self.length + n > self.kbuf.shape[2]:
                self._resize(max(2 * self.kbuf.shape[2], self.length + n))
            self.kbuf[:, :, self.length : self.length + n] = key_states
            self.vbuf[:, :, self.length : self.length + n] = value_states
            self.length += n
            self.keys = self.kbuf[:, :, : self.length]
            self.values = self.vbuf[:, :, : self.length]
            return self.keys, self.values

        def _resize(self, cap: int, index: Any = None) -> None:
            k, v = self.kbuf[:, :, : self.length], self.vbuf[:, :, : self.length]
            if index is not None:
                k, v = k[index], v[index]
            self.kbuf = k.new_empty((k.shape[0], k.shape[1], cap, k.shape[3]))
            self.vbuf = v.new_empty((v.shape[0], v.shape[1], cap, v.shape[3]))
            self.kbuf[:, :, : self.length] = k
            self.vbuf[:, :, : self.length] = v
            self.keys = self.kbuf[:, :, : self.length]
            self.values = self.vbuf[:, :, : self.length]

        def allocate(self, rows: int, like: Any) -> None:
            """Buffers for ``rows`` rows shaped like layer ``like``'s, not cleared: every column
            below ``length`` is written before attention reads it (:meth:`KVCache.place` zeroes
            the gaps it leaves), and the decode columns are written one by one."""
            if self.kbuf is None:
                _, h, _, d = like.kbuf.shape
                self.kbuf = like.kbuf.new_empty((rows, h, self.capacity, d))
                self.vbuf = like.vbuf.new_empty((rows, h, self.capacity, like.vbuf.shape[-1]))
                self.device, self.is_initialized = like.kbuf.device, True

        def set_length(self, length: int) -> None:
            self.length = length
            self.keys = self.kbuf[:, :, :length]
            self.values = self.vbuf[:, :, :length]

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.length + query_length, 0

        def batch_select_indices(self, indices: Any) -> None:
            if self.kbuf is not None:
                self._resize(self.kbuf.shape[2], index=indices)

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.kbuf is not None:
                self._resize(self.kbuf.shape[2], index=self._repeat_index(repeats))

        def _repeat_index(self, repeats: int) -> Any:
            import torch

            return torch.arange(self.kbuf.shape[0], device=self.kbuf.device).repeat_interleave(
                repeats
            )

    return PreallocLayer


class KVCache:
    """A KV cache for ``rows`` sequences of up to ``capacity`` tokens, with its attention mask."""

    def __init__(
        self, model: Any, rows: int, capacity: int, dtype: torch.dtype, device: str
    ) -> None:
        import torch
        from transformers.cache_utils import Cache, DynamicCache

        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
        cfg = cfg or model.config
        layer_types = getattr(cfg, "layer_types", None) or []
        sliding = any("sliding" in str(t) for t in layer_types) or bool(
            getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None)
        )
        self.prealloc = not sliding
        if self.prealloc:
            layer = _layer_class()
            self.cache: Any = Cache(layers=[layer(capacity) for _ in range(cfg.num_hidden_layers)])
        else:  # sliding-window layers: transformers' own cache handles the window
            self.cache = DynamicCache(config=cfg)
        self.mask = torch.zeros((rows, capacity), dtype=torch.bool, device=device)
        self.length = 0

    def set_mask(self, start: int, valid: torch.Tensor | None) -> None:
        """Mark columns ``start:`` valid per ``valid`` ``(rows, width)`` (``None``: one valid column)."""
        import torch

        width = 1 if valid is None else valid.shape[1]
        if start + width > self.mask.shape[1]:
            grow = max(self.mask.shape[1], start + width)
            self.mask = torch.cat([self.mask, torch.zeros_like(self.mask[:, :grow])], dim=1)
        self.mask[:, start : start + width] = True if valid is None else valid

    def forward(
        self, model: Any, ids: torch.Tensor, pos: torch.Tensor, *, logits: bool = False
    ) -> torch.Tensor:
        """Run ``ids`` ``(rows, q)`` at positions ``pos``; logits of every position or of the last.

        A forward on fewer rows than the mask (a shared prefix, batch 1) runs unmasked.
        """
        q = ids.shape[1]
        end = self.length + q
        am = self.mask[:, :end] if ids.shape[0] == self.mask.shape[0] else None
        if am is not None and bool(am.all()):
            am = None  # no padding: the unmasked (causal) attention kernels are faster
        elif am is not None and q == 1:
            # one new token sees every valid column: the 4-D mask is the padding mask itself,
            # passed ready-made so transformers skips building it at every decode step
            am = am[:, None, None, :]
        out = model(
            input_ids=ids,
            attention_mask=am,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=0 if logits else 1,
            **{_cache_kwarg(model.__class__): self.cache},
        )
        self.length = end
        return out.logits  # type: ignore[no-any-return]

    def select(self, index: torch.Tensor) -> None:
        """Keep (or repeat) the rows ``index`` of the cache and the mask."""
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]

    def adopt(self, prefix: KVCache, rows: int, upto: int | None = None) -> None:
        """Start from the first ``upto`` columns of ``prefix`` (a batch-1 cache), on every row."""
        import copy

        upto = prefix.length if upto is None else upto
        if self.prealloc:
            for dst, src in zip(self.cache.layers, prefix.cache.layers, strict=True):
                dst.allocate(rows, src)
                dst.kbuf[:, :, :upto] = src.kbuf[:, :, :upto]
                dst.vbuf[:, :, :upto] = src.vbuf[:, :, :upto]
                dst.set_length(upto)
        else:
            if upto != prefix.length:
                raise ValueError("a sliding-window cache is adopted whole")
            self.cache = copy.deepcopy(prefix.cache)
            self.cache.batch_repeat_interleave(rows)
        self.length = upto

    def place(self, part: KVCache, rows: Any, shared: int, at: int) -> None:
        """Copy ``part`` (a prefilled chunk) into ``rows``: its first ``shared`` columns to the
        same columns, the rest to columns ``at:``; the masked gap between them is zeroed (masked
        keys and values must be finite: a NaN times a zero weight is still NaN). Preallocated
        caches only."""
        w = part.length - shared
        for dst, src in zip(self.cache.layers, part.cache.layers, strict=True):
            dst.allocate(self.mask.shape[0], src)
            for buf, sbuf in ((dst.kbuf, src.kbuf), (dst.vbuf, src.vbuf)):
                buf[rows, :, :shared] = sbuf[:, :, :shared]
                if at > shared:
                    buf[rows, :, shared:at] = 0
                buf[rows, :, at : at + w] = sbuf[:, :, shared : shared + w]
        self.mask[rows, :shared] = part.mask[:, :shared]
        self.mask[rows, at : at + w] = part.mask[:, shared : shared + w]

    def set_length(self, length: int) -> None:
        """Declare the first ``length`` columns filled (after :meth:`place`)."""
        for layer in self.cache.layers:
            layer.set_length(length)
        self.length = length


class PrefixStore:
    """Batch-1 KV caches of prompt prefixes, kept across calls (least recently used dropped first).

    Entries are forgotten when the weights' version changes (``sum`` of the parameters' in-place
    update counters, so an optimiser step or ``load_state_dict`` invalidates them).
    """

    def __init__(self, max_tokens: int, min_hit: int) -> None:
        self.max_tokens = max_tokens
        self.min_hit = min_hit
        self.entries: list[tuple[tuple[int, ...], KVCache]] = []
        self.version = -1

    def lookup(self, tokens: Sequence[int], version: int) -> tuple[KVCache | None, int]:
        """The entry sharing the most leading tokens with ``tokens`` (at least ``min_hit``)."""
        if version != self.version:
            self.entries.clear()
            self.version = version
        best, best_len = -1, 0
        for k, (key, _) in enumerate(self.entries):
            m = common_prefix_len([key, tokens])
            if m > best_len:
                best, best_len = k, m
        if best < 0 or best_len < self.min_hit:
            return None, 0
        entry = self.entries.pop(best)
        self.entries.append(entry)
        return entry[1], best_len

    def remember(self, tokens: Sequence[int], kv: KVCache) -> None:
        self.entries.append((tuple(tokens), kv))
        while len(self.entries) > 1 and sum(len(k) for k, _ in self.entries) > self.max_tokens:
            self.entries.pop(0)

    def clear(self) -> None:
        self.entries.clear()
