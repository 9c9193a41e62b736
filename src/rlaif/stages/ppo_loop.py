"""The PPO loop behind `rlaif ppo`: rollouts, rewards, advantages, clipped updates, checkpoints.

One PPO step: sample ``rollout_batch_size`` answers with the policy (the ``hf`` backend's decode
loop, batched); score each full conversation with the PM; take the policy's, the reference's and the
value function's view of every answer token in one forward pass each; build per-token rewards
(``-beta * KL`` plus the normalised score at the last token), GAE advantages and returns; then
``ppo_epochs`` passes of clipped updates in mini-batches. Everything random is seeded from
``(seed, step)``, so a resumed run samples the same prompts and answers as an uninterrupted one.

Models stay in eval mode throughout (no dropout), so the first mini-batch's ratio is exactly 1.
On a CPU (the models run :func:`rlaif.attention.short_attention`) every forward over episodes
goes packed (:class:`PackedBatch`): the batch's real tokens in one row, no padding.

Data-parallel (a launched :class:`~rlaif.distributed.Dist` with N processes): the step's global
batch is ``rollout_batch_size * N`` prompts, drawn identically on every rank; each rank samples,
scores and runs the three no-grad forwards on its contiguous slice (row seeds follow the global
row, so the episodes do not depend on N). The slices are then gathered, so every rank holds the
whole step's rollout and computes the same reward normalisation, KL, advantages and whitening as
one process would. The update shuffles that global batch with the shared generator and cuts it
into global mini-batches (``batch_size * grad_accum * N``) and micro-batches (``batch_size * N``),
each rank training on its slice of every micro-batch through DDP (policy and value in one wrapped
module); losses are divided by the global micro-batch's token count, so the averaged gradient is
the one-process gradient of the same global batch.

Under FSDP 2 the same module is sharded instead (each rank holds a slice of the policy's and the
value model's weights, gradients and Adam state); the rollouts run inside
:meth:`~rlaif.distributed.Dist.full_weights`, which gathers the full weights for the generation
and the no-grad forwards and frees them before the update. The frozen reference (full
fine-tuning) and the PM are not trained and stay whole on every rank.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from rlaif.attention import PACKING, Packing, packs, use_short_attention
from rlaif.backends.base import GenerationParams
from rlaif.backends.hf import HFLM
from rlaif.backends.kvcache import NonFiniteProbabilities
from rlaif.checkpoint import check_finite, latest_checkpoint
from rlaif.checkpoint import load_trainer_state as _load_trainer_state
from rlaif.config import BackendConfig, PPOConfig
from rlaif.distributed import Dist, shard_bounds
from rlaif.linear_dtype import linear_weights_as, store_linear_weights
from rlaif.metrics import MetricsLog
from rlaif.rl.advantages import RunningMoments, explained_variance, gae, masked_mean, masked_whiten
from rlaif.rl.kl import KLController, kl_per_token, make_kl_controller, per_token_rewards
from rlaif.rl.losses import clipped_value_loss, ppo_policy_loss
from rlaif.rl.rollout import Rollout, Samples
from rlaif.rl.token_logprobs import token_logprobs_and_entropy
from rlaif.stages.ppo import load_trainable, save_ppo_checkpoint
from rlaif.train_common import autocast, build_optimizer, grad_norm

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
# Linears of a PM-shaped model left alone: its head runs in fp32, its LM head is never read.
PM_FP32 = ("head", "lm_head")


class Scorer(Protocol):
    """What PPO needs from a reward model (``rlaif.pm.PreferenceModel`` fits)."""

    def score(
        self,
        conversations: Sequence[Any],
        batch_size: int = 8,
        *,
        autocast_dtype: torch.dtype | None = None,
    ) -> list[float]: ...


@dataclass
class PPOModels:
    """The models of one PPO run."""

    policy: Any
    """Causal LM being trained (a peft model when LoRA is on)."""
    tokenizer: Any
    """The policy's tokenizer (chat template used for prompts)."""
    ref: Any | None
    """Frozen SL-CAI copy; None with LoRA: the policy with its adapters disabled is the reference."""
    value: Any
    """Value function: a PM-shaped module (``decoder()`` + ``head``) read at every answer position."""
    scorer: Scorer
    """The reward model (frozen)."""


@dataclass
class TrainResult:
    steps: int
    """PPO steps done in total (resumed ones included)."""
    resumed_from: int
    """Step the run resumed from (0: fresh start)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """The metrics of the steps run in this call."""


# ------------------------------------------------------------------------------- sampling


def prompt_schedule(n_prompts: int, batch: int, step: int, seed: int) -> list[int]:
    """Prompt indices of PPO step ``step`` (1-based): consecutive slices of per-epoch shuffles."""
    out: list[int] = []
    start = (step - 1) * batch
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n_prompts)
        order = list(range(n_prompts))
        random.Random(f"ppo:{seed}:{epoch}").shuffle(order)
        out += order[offset : offset + batch - len(out)]
    return out


def sample(
    lm: HFLM, prompt_ids: list[list[int]], pc: PPOConfig, seeds: list[int]
) -> tuple[Samples, list[str]]:
    """Sample one answer per prompt; return the padded :class:`Samples` and the answer texts."""
    params = GenerationParams(
        max_new_tokens=pc.max_new_tokens, temperature=pc.temperature, top_p=pc.top_p
    )
    results = lm.sample_ids(prompt_ids, params, seeds)
    n, width = len(prompt_ids), max(len(p) for p in prompt_ids)
    tlen = max(1, max(len(t) for t, _ in results))
    query = torch.full((n, width), lm.pad_id, dtype=torch.long)
    qmask = torch.zeros((n, width), dtype=torch.long)
    resp = torch.full((n, tlen), lm.pad_id, dtype=torch.long)
    rmask = torch.zeros((n, tlen), dtype=torch.long)
    truncated = torch.zeros(n, dtype=torch.bool)
    texts = []
    for i, (p, (toks, _reason)) in enumerate(zip(prompt_ids, results, strict=True)):
        query[i, width - len(p) :] = torch.tensor(p)
        qmask[i, width - len(p) :] = 1
        resp[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        rmask[i, : len(toks)] = 1
        ended = bool(toks) and toks[-1] in lm.eos_ids
        truncated[i] = not ended
        body = toks[:-1] if ended else toks
        texts.append(str(lm.tokenizer.decode(body, skip_special_tokens=True)).strip())
    dev = lm.device
    samples = Samples(query.to(dev), qmask.to(dev), resp.to(dev), rmask.to(dev), truncated.to(dev))
    return samples, texts


# ------------------------------------------------------------------------------- forwards


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _padded_kwargs(s: Samples) -> dict[str, Any]:
    """The padded batch's keyword arguments for a transformers model's forward."""
    am = s.attention_mask
    return {
        "input_ids": s.input_ids,
        "attention_mask": am,
        "position_ids": _position_ids(am),
        "use_cache": False,
    }


@dataclass(frozen=True)
class PackedBatch:
    """A batch of episodes as one row of its real tokens (see :class:`rlaif.attention.Packing`),
    and where the answer tokens' predictions sit in it."""

    input_ids: torch.Tensor
    """``[1, N]``: every real prompt and answer token, row after row."""
    position_ids: torch.Tensor
    """``[1, N]``: each token's position in its own sequence."""
    packing: Packing
    answers: torch.Tensor
    """``[B, T]`` bool: the real answer tokens (``response_mask``)."""
    predictors: torch.Tensor
    """``[K]``: the packed index of the token before each real answer token (K of them, in
    row-major order of ``answers``), whose output predicts it."""

    @classmethod
    def of(cls, s: Samples) -> PackedBatch:
        if not bool(s.query_mask[:, -1].all()):  # the first answer token's predictor
            raise ValueError("every prompt must end in the last prompt column (left padding)")
        am = s.attention_mask.bool()
        plen = s.query_ids.shape[1]
        index = am.flatten().cumsum(0).reshape(am.shape) - 1  # packed index of each real token
        answers = s.response_mask.bool()
        predictors = index[:, plen - 1 : plen - 1 + answers.shape[1]][answers]
        return cls(
            s.input_ids[am][None], _position_ids(am)[am][None], Packing.of(am), answers, predictors
        )

    def model_kwargs(self) -> dict[str, Any]:
        """The packed row's keyword arguments for a transformers model's forward.

        The attention mask given is the packing's small ``[1, 1, W, W]`` causal block, which the
        model passes through as it is (a 4-D mask counts as prepared) and the packed attention
        does not read: without it, transformers would build a ``[N, N]`` mask over the whole
        packed row (a gigabyte at N = 32k)."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": self.packing.causal[None, None],
            "use_cache": False,
            PACKING: self.packing,
        }

    def spread(self, per_answer: torch.Tensor) -> torch.Tensor:
        """``[K]`` -> ``[B, T]``, zero on padding (which every consumer masks out)."""
        out = per_answer.new_zeros(self.answers.shape)
        return out.masked_scatter(self.answers, per_answer)


def policy_logprobs(
    model: Any, s: Samples, temperature: float, entropy: bool | str = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, T]`` log-probs of the answer tokens; logits only on answer positions.

    ``entropy``: also return per-token entropies, detached (True) or differentiable ("grad").
    Where the model runs :func:`rlaif.attention.short_attention`, the batch goes through packed
    (:class:`PackedBatch`; padding positions come back as zeros).
    """
    if packs(model):
        p = PackedBatch.of(s)
        out = model(logits_to_keep=p.predictors, **p.model_kwargs())
        tokens = s.response_ids[p.answers][None]
        lp, ent = token_logprobs_and_entropy(out.logits, tokens, temperature)
        lp, ent = p.spread(lp[0]), p.spread(ent[0])
    else:
        out = model(logits_to_keep=s.response_ids.shape[1] + 1, **_padded_kwargs(s))
        lp, ent = token_logprobs_and_entropy(out.logits, s.response_ids, temperature)
    if entropy == "grad":
        return lp, ent
    return lp, (ent.detach() if entropy else None)


def value_estimates(value: Any, s: Samples) -> torch.Tensor:
    """``[B, T]``: V(prefix before answer token t), the head read on the decoder's hidden states
    (packed as in :func:`policy_logprobs` where the model allows; padding positions then 0)."""
    decoder = value.decoder()
    packed = PackedBatch.of(s) if packs(decoder) else None
    if packed is not None:
        out = decoder(**packed.model_kwargs())
        hidden = out.last_hidden_state[0, packed.predictors]
    else:
        plen, tlen = s.query_ids.shape[1], s.response_ids.shape[1]
        out = decoder(**_padded_kwargs(s))
        hidden = out.last_hidden_state[:, plen - 1 : plen + tlen - 1]
    with torch.autocast(device_type=hidden.device.type, enabled=False):  # as the PM: head in fp32
        v = value.head(hidden.float()).squeeze(-1)
    return v if packed is None else packed.spread(v)  # type: ignore[no-any-return]


def policy_and_value(
    both: Any, s: Samples, temperature: float, entropy: bool | str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The update's forward over ``{"policy", "value"}``: answer log-probs, entropies, values."""
    lp, ent = policy_logprobs(both["policy"], s, temperature, entropy)
    return lp, ent, value_estimates(both["value"], s)


def _chunked(fn: Any, s: Samples, size: int) -> torch.Tensor:
    parts = [fn(s.select(torch.arange(i, min(i + size, len(s))))) for i in range(0, len(s), size)]
    return torch.cat(parts, dim=0)


@torch.no_grad()
def rollout_forwards(
    models: PPOModels, s: Samples, pc: PPOConfig, amp: torch.dtype | None
) -> list[torch.Tensor]:
    """``[old, ref, values]``, each ``[B, T]``: the answer tokens' log-probs under the policy and
    the reference, and the value before each token (``batch_size`` rows per forward pass)."""
    dev = str(s.query_ids.device)
    temp, size = pc.temperature, max(1, pc.batch_size)
    with autocast(amp, dev):
        old = _chunked(lambda c: policy_logprobs(models.policy, c, temp)[0], s, size)
        if models.ref is not None:
            ref = _chunked(lambda c: policy_logprobs(models.ref, c, temp)[0], s, size)
        else:
            with models.policy.disable_adapter():
                ref = _chunked(lambda c: policy_logprobs(models.policy, c, temp)[0], s, size)
        values = _chunked(lambda c: value_estimates(models.value, c), s, size)
    return [old, ref, values]


@torch.no_grad()
def make_rollout(
    s: Samples,
    old: torch.Tensor,
    ref: torch.Tensor,
    values: torch.Tensor,
    raw: list[float],
    scores: list[float],
    pc: PPOConfig,
    beta: float,
) -> Rollout:
    """Everything the update epochs need, from the samples, their forwards and (normalised) scores."""
    mask = s.response_mask
    m = mask.float()
    old, ref, values = old * m, ref * m, values * m
    kl = kl_per_token(old, ref, pc.kl_estimator) * m
    score_t = torch.tensor(scores, dtype=torch.float32, device=old.device)
    rewards = per_token_rewards(score_t, kl, mask, beta)
    adv, returns = gae(rewards, values, mask, pc.gamma, pc.lam)
    if pc.whiten_advantages:
        adv = masked_whiten(adv, mask)
    raw_t = torch.tensor(raw, dtype=torch.float32, device=old.device)
    return Rollout(s, old, ref, values, score_t, raw_t, kl, rewards, adv, returns)


# ------------------------------------------------------------------------------- data-parallel


def gather_floats(dist: Dist, xs: list[float], n_global: int) -> list[float]:
    """Every rank's ``xs`` (its slice of a global batch of ``n_global``), in rank order."""
    if dist.world == 1:
        return xs
    rows = dist.gather(torch.tensor(xs, dtype=torch.float64), n_global)
    return [float(x) for x in rows]


def gather_episodes(
    dist: Dist, s: Samples, per_token: list[torch.Tensor], pad_id: int, n_global: int
) -> tuple[Samples, list[torch.Tensor]]:
    """Every rank's episodes and their ``[B, T]`` per-token tensors as one global batch in rank
    order, padded to the widest prompt and answer of any rank: the same tensors on every rank."""
    if dist.world == 1:
        return s, per_token
    width_p, width_t = dist.maxes([s.query_ids.shape[1], s.response_ids.shape[1]])
    s = s.padded(width_p, width_t, pad_id)
    grow = width_t - per_token[0].shape[1]
    floats = torch.stack([torch.nn.functional.pad(t.float(), (0, grow)) for t in per_token], 1)
    ids = dist.gather(torch.stack([s.input_ids, s.attention_mask], 1), n_global)
    floats = dist.gather(floats, n_global)
    truncated = dist.gather(s.truncated.long(), n_global).bool()
    q, r = ids[:, :, :width_p], ids[:, :, width_p:]
    out = Samples(q[:, 0], q[:, 1], r[:, 0], r[:, 1], truncated)
    return out, list(floats.unbind(1))


# ------------------------------------------------------------------------------- update


def _item(x: torch.Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _losses(
    micro: Rollout,
    lp: torch.Tensor | None,
    ent: torch.Tensor | None,
    v: torch.Tensor | None,
    pc: PPOConfig,
    count: float | None,
) -> dict[str, Any]:
    """The micro-batch's policy part (from ``lp``, ``ent``) and value part (from ``v``)."""
    out: dict[str, Any] = {}
    if lp is not None:
        pg, st = ppo_policy_loss(
            lp, micro.logprobs, micro.advantages, micro.mask, pc.clip_eps, count=count
        )
        assert ent is not None
        ent_mean = masked_mean(ent, micro.mask, count=count)
        out |= {"pg": pg, "ent": ent_mean, "approx_kl": st.approx_kl, "clipfrac": st.clipfrac}
        out["policy_part"] = pg - pc.entropy_coef * ent_mean
    if v is not None:
        vf, vf_frac = clipped_value_loss(
            v, micro.values, micro.returns, micro.mask, pc.value_clip, count=count
        )
        out |= {"vf": vf, "vf_clipfrac": vf_frac, "value_part": pc.vf_coef * vf}
    return out


STAT_KEYS = ("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "vf_clipfrac")
"""What :func:`_stats` returns, in order."""


def _stats(p: dict[str, Any], v: dict[str, Any]) -> tuple[Any, ...]:
    loss = _item(p["policy_part"]) + _item(v["value_part"])
    return (loss, p["pg"], v["vf"], p["ent"], p["approx_kl"], p["clipfrac"], v["vf_clipfrac"])


def _greedy_edges(tokens: Sequence[int], cap: int) -> list[int]:
    """Row boundaries from filling each chunk up to ``cap`` tokens (a larger row alone)."""
    edges, acc = [0], 0
    for i, t in enumerate(tokens):
        if i > edges[-1] and acc + t > cap:
            edges.append(i)
            acc = 0
        acc += t
    return [*edges, len(tokens)]


def row_chunks(tokens: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of consecutive rows holding at most ``budget`` tokens each
    (``tokens[i]``: row ``i``'s; a row over the budget alone): as few ranges as the budget
    allows (filling each up to the budget), and among those the one whose largest range is
    smallest (the smallest cap that still needs no more ranges, found by bisection);
    ``budget <= 0``: one range."""
    total = sum(tokens)
    if budget <= 0 or total <= budget:
        return [(0, len(tokens))]
    fewest = len(_greedy_edges(tokens, budget)) - 1
    lo, hi = max(1, math.ceil(total / fewest)), budget  # hi always needs only `fewest`
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_greedy_edges(tokens, mid)) - 1 <= fewest:
            hi = mid
        else:
            lo = mid + 1
    return list(itertools.pairwise(_greedy_edges(tokens, hi)))


def row_tokens(s: Samples, packed: bool) -> list[int]:
    """Each row's tokens in a forward: its real ones where the batch goes through packed
    (:class:`PackedBatch`), else the padded width."""
    if packed:
        return s.attention_mask.sum(1).tolist()  # type: ignore[no-any-return]
    return [s.query_ids.shape[1] + s.response_ids.shape[1]] * len(s)


def _chunked_backward(
    micro: Rollout,
    share: float,
    pc: PPOConfig,
    run: Callable[[Rollout, float], dict[str, Any]],
    loss_key: str,
    packed: bool,
) -> dict[str, float]:
    """``run(piece, count)`` over the micro-batch's row chunks (``pc.update_tokens``, counted as
    :func:`row_tokens`, real tokens where ``packed``): each returns its losses divided by the
    micro-batch's answer-token ``count`` (so the pieces add up to the micro-batch's means);
    ``loss_key``'s is backpropagated, scaled by ``share``. Returns the summed values."""
    count = float(micro.mask.sum())
    total: dict[str, float] = {}
    for a, b in row_chunks(row_tokens(micro.samples, packed), pc.update_tokens):
        piece = micro if (a, b) == (0, len(micro)) else micro.select(torch.arange(a, b))
        out = run(piece, count)
        (out[loss_key] * share).backward()
        for k, x in out.items():
            total[k] = total.get(k, 0.0) + _item(x)
        del out
    return total


def _minibatch_one_process(
    models: PPOModels,
    micros: list[tuple[Rollout, float]],
    optimizer: Any,
    pc: PPOConfig,
    amp: torch.dtype | None,
    dev: str,
    on_bad: Any,
) -> tuple[list[tuple[float, ...]], float, float]:
    """One process, one mini-batch: the policy's forward and backward over every micro-batch (each
    ``(micro, share of the mini-batch)``), its clip and optimizer step; then the value function's.

    The same update as one backward of the summed loss and one optimizer step: the two models share
    no weights and are clipped each on its own, and AdamW moves a parameter from its own gradient
    and moments alone and leaves a parameter without a gradient as it is. Only one model's
    activations and gradients are held at a time: the policy's gradients are gone before the
    value function's forward. A micro-batch over ``pc.update_tokens`` runs in row chunks
    (:func:`row_chunks`) whose losses add up to its own. Returns each micro-batch's
    :func:`_stats` and the two norms.
    """
    ent_mode = "grad" if pc.entropy_coef else True

    def policy_piece(piece: Rollout, count: float) -> dict[str, Any]:
        with autocast(amp, dev):
            lp, ent = policy_logprobs(models.policy, piece.samples, pc.temperature, ent_mode)
        p = _losses(piece, lp, ent, None, pc, count)
        on_bad(loss=_item(p["policy_part"]), policy_loss=_item(p["pg"]))
        return p

    def value_piece(piece: Rollout, count: float) -> dict[str, Any]:
        with autocast(amp, dev):
            v = value_estimates(models.value, piece.samples)
        vv = _losses(piece, None, None, v, pc, count)
        on_bad(loss=_item(vv["value_part"]), value_loss=_item(vv["vf"]))
        return vv

    def update_one(
        model: Any, run: Any, loss_key: str, norm: str
    ) -> tuple[list[dict[str, float]], float]:
        """Every micro-batch's backward into ``model``, its clip and step, its gradients freed;
        the other model has no gradients, so only this one moves."""
        packed = packs(model)
        parts = [
            _chunked_backward(micro, share, pc, run, loss_key, packed) for micro, share in micros
        ]
        g = grad_norm(model, pc.max_grad_norm)
        on_bad(**{norm: g})
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return parts, g

    p_parts, gp = update_one(models.policy, policy_piece, "policy_part", "grad_norm_policy")
    v_parts, gv = update_one(models.value, value_piece, "value_part", "grad_norm_value")
    stats = [tuple(_item(x) for x in _stats(p, v)) for p, v in zip(p_parts, v_parts, strict=True)]
    return stats, gp, gv


def _minibatch_launched(
    models: PPOModels,
    mb: Rollout,
    bounds: list[tuple[int, int]],
    optimizer: Any,
    pc: PPOConfig,
    amp: torch.dtype | None,
    dev: str,
    on_bad: Any,
    forward: Callable[[Samples], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]],
    dist: Dist,
) -> tuple[list[tuple[float, ...]], float, float]:
    """A launched process (DDP, FSDP), one mini-batch: one pass of the wrapped module and one
    backward per micro-batch, this rank's slice of each; then one optimizer step. Returns the
    global micro-batches' :func:`_stats` (summed over ranks) and the two gradient norms."""
    world = dist.world
    stats = []
    for j, (start, end) in enumerate(bounds):
        rows, _ = dist.shard(range(start, end))  # this rank's slice
        micro = mb.select(torch.tensor(rows))
        # the global micro-batch's token count (one launched process: its own)
        count = float(mb.mask[start:end].sum()) if world > 1 else None
        # DDP averages over ranks; the ranks' losses add up to the global micro-batch's
        share = (end - start) / len(mb) * world
        with dist.syncing(j == len(bounds) - 1):
            with autocast(amp, dev):
                lp, ent, v = forward(micro.samples)
            out = _losses(micro, lp, ent, v, pc, count)
            row = tuple(dist.sums([_item(x) for x in _stats(out, out)]))
            vals = dict(zip(STAT_KEYS, row, strict=True))
            on_bad(  # on the summed values, so that every rank stops together
                loss=vals["loss"], policy_loss=vals["policy_loss"], value_loss=vals["value_loss"]
            )
            ((out["policy_part"] + out["value_part"]) * share).backward()
        stats.append(row)
    gp = grad_norm(models.policy, pc.max_grad_norm)
    gv = grad_norm(models.value, pc.max_grad_norm)
    on_bad(grad_norm_policy=gp, grad_norm_value=gv)
    optimizer.step()
    return stats, gp, gv


def ppo_update(
    models: PPOModels,
    ro: Rollout,
    optimizer: Any,
    scheduler: Any,
    pc: PPOConfig,
    gen: torch.Generator,
    amp: torch.dtype | None,
    on_bad: Any,
    *,
    forward: Callable[[Samples], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]],
    dist: Dist | None = None,
) -> dict[str, float]:
    """``ppo_epochs`` passes of clipped policy + value updates; mean diagnostics over micro-batches.

    ``forward(samples)`` runs :func:`policy_and_value` (through DDP when data-parallel); ``ro`` is
    the step's global rollout, the same on every rank of ``dist``. Each rank trains on its slice
    of every global micro-batch (all sizes are multiples of the process count, so the slices are
    equal); the logged values are those of the global micro-batches.
    """
    dist = dist or Dist()
    world = dist.world
    dev = str(ro.samples.query_ids.device)
    mb_size = max(1, pc.batch_size * pc.grad_accum) * world
    micro_size = max(1, pc.batch_size) * world
    sums: dict[str, float] = {}
    n = 0
    for _ in range(pc.ppo_epochs):
        for mb in ro.minibatches(mb_size, gen):
            optimizer.zero_grad(set_to_none=True)
            bounds = [(a, min(a + micro_size, len(mb))) for a in range(0, len(mb), micro_size)]
            if dist.state is None:  # one process: one model's backward and step at a time
                micros = [(mb.select(torch.arange(a, b)), (b - a) / len(mb)) for a, b in bounds]
                rows, gp, gv = _minibatch_one_process(
                    models, micros, optimizer, pc, amp, dev, on_bad
                )
            else:
                rows, gp, gv = _minibatch_launched(
                    models, mb, bounds, optimizer, pc, amp, dev, on_bad, forward, dist
                )
            for row in rows:
                for k, x in zip(STAT_KEYS[1:], row[1:], strict=True):
                    sums[k] = sums.get(k, 0.0) + x
                n += 1
            sums["grad_norm_policy"] = sums.get("grad_norm_policy", 0.0) + gp * pc.grad_accum
            sums["grad_norm_value"] = sums.get("grad_norm_value", 0.0) + gv * pc.grad_accum
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: v / max(n, 1) for k, v in sums.items()}


# ------------------------------------------------------------------------------- the loop


def total_steps(n_prompts: int, pc: PPOConfig, world: int = 1) -> int:
    """PPO steps of the run: ``max_steps``, else ``epochs`` passes over the prompts in global
    batches of ``rollout_batch_size * world``."""
    if pc.max_steps > 0:
        return pc.max_steps
    return max(1, math.ceil(pc.epochs * n_prompts / (pc.rollout_batch_size * world)))


def calibrate_value_head(head: torch.nn.Linear, mean: float, std: float) -> None:
    """Shift (and shrink) a PM head toward normalised scores: ``(w.h + b - mean) / max(std, 1)``.

    The PM's mean score becomes 0, as the normalised reward's is. The scale is only ever reduced:
    dividing by a small first-batch std would blow up the value of partial answers, which the PM
    never saw in training.
    """
    scale = max(std, 1.0)
    with torch.no_grad():
        head.weight.div_(scale)
        head.bias.sub_(mean).div_(scale)


def train(
    models: PPOModels,
    prompts: list[Messages],
    pc: PPOConfig,
    *,
    seed: int,
    ckpt_root: Path,
    metrics_path: Path,
    backend: BackendConfig | None = None,
    amp: torch.dtype | None = None,
    fingerprint: str = "",
    dist: Dist | None = None,
) -> TrainResult:
    """Run PPO to ``total_steps`` (resuming from the newest checkpoint under ``ckpt_root``).

    ``dist``: data-parallel over its processes (module docstring); only its main process writes
    checkpoints and metrics. Every rank returns the same result.
    """
    from rlaif.progress import progress

    dist = dist or Dist()
    world = dist.world
    n_global = pc.rollout_batch_size * world  # episodes per step, over all processes
    lo, hi = shard_bounds(n_global, world, dist.rank)  # this rank's episodes
    # Under bf16 autocast the rollouts run with the linear weights already in bf16: the same
    # numbers as autocast's per-call casts, paid once a step instead of at every decode step
    # (rlaif.linear_dtype). FSDP gathers the weights itself, so they stay as they are there.
    low = amp if dist.fsdp is None else None
    lm = HFLM.from_objects(
        models.policy, models.tokenizer, backend, name="policy", compute_dtype=low
    )
    for m in (models.policy, models.ref, models.value, models.scorer):
        if m is not None and isinstance(m, torch.nn.Module):
            use_short_attention(m)  # CPU: short sequences skip the flash kernel
    if amp is not None:  # the frozen models for good
        if models.ref is not None:
            store_linear_weights(models.ref, amp)
        if isinstance(models.scorer, torch.nn.Module):
            store_linear_weights(models.scorer, amp, skip=PM_FP32)
    max_prompt = max(8, pc.max_length - pc.max_new_tokens)
    encoded = [lm.encode(m)[-max_prompt:] for m in prompts]
    steps = total_steps(len(prompts), pc, world)
    per_step = pc.ppo_epochs * math.ceil(n_global / max(1, pc.batch_size * pc.grad_accum * world))
    both = torch.nn.ModuleDict({"policy": models.policy, "value": models.value})
    optimizer, scheduler = build_optimizer(both, pc, steps * per_step)
    if pc.lr_schedule == "constant":
        warm = max(1, round(pc.warmup_ratio * steps * per_step))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warm))
    kl_ctl: KLController = make_kl_controller(
        pc.kl_coef, pc.adaptive_kl, pc.target_kl, pc.kl_horizon
    )
    moments = RunningMoments()
    calibrated = False
    start = 0
    last = latest_checkpoint(ckpt_root)
    if last is not None:
        load_trainable(models.policy, last / "policy.safetensors")
        load_trainable(models.value, last / "value.safetensors")
    ent_mode = "grad" if pc.entropy_coef else True
    forward, optimizer = dist.prepare(
        both, optimizer, lambda m, s: policy_and_value(m, s, pc.temperature, ent_mode)
    )
    if last is not None:  # after prepare: under FSDP each process loads its optimizer shard
        load_opt = functools.partial(dist.load_optimizer_state, optimizer, last)
        state = _load_trainer_state(last, scheduler=scheduler, load_optimizer=load_opt)
        start = int(state["step"])
        kl_ctl.value = float(state["beta"])
        moments = RunningMoments.from_state(state["moments"])
        calibrated = bool(state.get("value_calibrated", False))
        log.info("ppo: resuming from %s (step %d of %d)", last, start, steps)
    metrics = MetricsLog(
        metrics_path, resume_step=start if last is not None else None, active=dist.main
    )
    result = TrainResult(steps=start, resumed_from=start)
    bar = progress(
        range(start + 1, steps + 1), desc="ppo", unit="step", initial=start, total=steps,
        show=dist.main,
    )  # fmt: skip
    for step in bar:
        t0 = time.perf_counter()
        torch.manual_seed(seed * 1_000_003 + step)
        idx = prompt_schedule(len(prompts), n_global, step, seed)
        # a row's seed follows its place in the global batch, not the process it lands on
        seeds = [(seed * 1_000_003 + step) * 4099 + k for k in range(len(idx))]
        mine = idx[lo:hi]
        lm.clear_prefix_cache()  # the weights changed since the last step's prompts ran
        # the policy's bf16 linears, once for sampling and its no-grad forward (rlaif.linear_dtype)
        with linear_weights_as(models.policy, low):
            with dist.full_weights(), autocast(amp, lm.device):
                try:
                    samples, texts = sample(lm, [encoded[i] for i in mine], pc, seeds[lo:hi])
                except NonFiniteProbabilities:  # the policy's weights went non-finite
                    check_finite(step, "ppo", last, policy_probabilities=math.nan)
            t_gen = time.perf_counter() - t0
            convs = [
                [*prompts[i], {"role": "assistant", "content": t}]
                for i, t in zip(mine, texts, strict=True)
            ]
            raw = [
                float(x)
                for x in models.scorer.score(convs, batch_size=pc.pm_batch_size, autocast_dtype=amp)
            ]
            raw = gather_floats(dist, raw, n_global)
            bad = functools.partial(check_finite, step, "ppo", last)
            bad(reward=sum(raw))
            scores = raw
            if pc.normalize_reward:
                moments.update(raw)
                scores = moments.normalize(raw)
                if pc.value_from_pm and not calibrated:
                    calibrate_value_head(models.value.head, moments.mean, moments.std)
                calibrated = True
            with (
                dist.full_weights(),  # after the calibration, which changes sharded weights
                linear_weights_as(models.value, low, PM_FP32),
            ):
                per_token = rollout_forwards(models, samples, pc, amp)
        samples, per_token = gather_episodes(dist, samples, per_token, lm.pad_id, n_global)
        trunc = samples.truncated.tolist()
        scores = [s - pc.truncation_penalty * float(t) for s, t in zip(scores, trunc, strict=True)]
        old, ref, values = per_token
        ro = make_rollout(samples, old, ref, values, raw, scores, pc, kl_ctl.value)
        seq_kl = float(ro.kl.sum(1).mean())
        bad(kl=seq_kl)
        gen = torch.Generator().manual_seed(seed * 7919 + step)
        stats = ppo_update(
            models, ro, optimizer, scheduler, pc, gen, amp, bad, forward=forward, dist=dist
        )
        beta_used = kl_ctl.value
        kl_ctl.update(seq_kl, len(idx))
        row = {
            "reward": sum(raw) / len(raw),
            "score": float(ro.scores.mean()),
            "kl": seq_kl,
            "beta": beta_used,
            "explained_variance": explained_variance(ro.values, ro.returns, ro.mask),
            "response_length": float(samples.response_lengths.float().mean()),
            "truncated": sum(trunc) / len(trunc),
            "lr": float(scheduler.get_last_lr()[0]),
            **stats,
            "gen_s": t_gen,
            "step_s": time.perf_counter() - t0,
            "episodes": step * n_global,
        }
        if (step % max(1, pc.log_every) == 0) or step == steps:
            metrics.log(step, **row)
        result.history.append(row)
        result.steps = step
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{seq_kl:.2f}", beta=f"{beta_used:.3f}")
        if step % max(1, pc.save_every) == 0 or step == steps:
            state = {
                "fingerprint": fingerprint,
                "beta": kl_ctl.value,
                "moments": moments.state(),
                "value_calibrated": calibrated,
            }
            parts = dist.checkpoint_parts(  # every rank
                both, optimizer, ckpt_root, step, final=step == steps
            )
            last = dist.on_main(
                functools.partial(
                    save_ppo_checkpoint,
                    ckpt_root, step, parts["model"], parts.get("optimizer_state"), parts["optimizer"],
                    scheduler, state, pc.keep_checkpoints,
                )
            )  # fmt: skip
    bar.close()
    models.policy = dist.unsharded(both)["policy"]  # FSDP: the main process's full copy
    dist.release()
    return result
