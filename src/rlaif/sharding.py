"""Sharded training for the stages' own loops (`sft`, `reward`, `ppo`): FSDP 2 and DeepSpeed ZeRO.

:class:`rlaif.distributed.Dist` calls these; the loops see one API whatever the engine.

* **FSDP 2.** :func:`fsdp_shard` applies ``torch.distributed.fsdp.fully_shard`` to each
  transformer block, then to the root (embeddings, final norm, head: one group, so tied weights
  stay one parameter). rlaif does it rather than ``accelerator.prepare``, which shards on GPUs
  only and on CPUs quietly runs DDP: one code path on every device, the one the CPU tests run.
* **DeepSpeed ZeRO 2/3.** ``accelerator.prepare`` builds the engine (:func:`deepspeed_config`
  fills in what the accelerate config leaves 'auto'), in DeepSpeed's unmanaged accumulation mode:
  each ``engine.backward`` reduces its gradients into the shards, ``engine.step`` clips and
  updates, the loop keeps its own micro-batches and loss scaling. Checkpoints add every process's
  own optimizer shard (``engine.save_checkpoint``) under ``deepspeed/`` in the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from rlaif.errors import UserError

log = logging.getLogger(__name__)

DS_TAG = "state"
"""DeepSpeed's checkpoint tag (subdirectory) inside a checkpoint's ``deepspeed/``."""


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


# ---------------------------------------------------------------------------------- FSDP 2


def check_fsdp(plugin: Any, stage: str) -> None:
    """Refuse, with one line, the FSDP settings the stage's loop does not run."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    problem = (
        f"fsdp_version {plugin.fsdp_version}: only 2 (fully_shard) is supported"
        if plugin.fsdp_version != 2
        else "fsdp_activation_checkpointing: set the stage's gradient_checkpointing instead"
        if plugin.activation_checkpointing
        else "fsdp_auto_wrap_policy: only TRANSFORMER_BASED_WRAP is supported"
        if policy is not transformer_auto_wrap_policy
        else None
    )
    if problem:
        raise UserError(f"accelerate FSDP, `rlaif {stage}`: {problem}")


def fsdp_shard(module: Any, optimizer: Any, plugin: Any) -> Any:
    """Shard ``module`` in place as the plugin's settings say; point ``optimizer`` at the
    sharded parameters (it must hold no state yet)."""
    from torch.distributed.fsdp import fully_shard

    names = set(plugin.transformer_cls_names_to_wrap or module._no_split_modules or [])
    blocks = [m for m in module.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(
            f"FSDP: no transformer block of the classes {sorted(names) or '(none known)'} in the "
            "model; set fsdp_transformer_layer_cls_to_wrap in the accelerate config"
        )
    before = {id(p): name for name, p in module.named_parameters()}
    kind = type(blocks[0]).__name__
    kwargs = {"offload_policy": plugin.cpu_offload}
    for block in blocks:
        fully_shard(block, reshard_after_forward=plugin.reshard_after_forward, **kwargs)
    fully_shard(module, **kwargs)
    # FSDP takes the first group to run a forward for the root: make it the root now, so that
    # calling a block directly (generation in ppo's rollouts) cannot claim it first.
    module._get_fsdp_state()._lazy_init()
    after = dict(module.named_parameters())
    for group in inner_optimizer(optimizer).param_groups:
        group["params"] = [after[before[id(p)]] for p in group["params"]]
    log_share("FSDP2", f"{len(blocks)} {kind} blocks sharded", after.values())
    return module


@contextlib.contextmanager
def fsdp_gathered(root: Any, plugin: Any) -> Iterator[None]:
    """Every FSDP group under ``root`` (sharded by :func:`fsdp_shard` with ``plugin``) holds its
    full weights inside (gathered on entry, freed on exit), so that its submodules can be called
    in any order, e.g. by ``generate``; a collective. Otherwise each block's forward hook would
    free its weights after every forward, and the root group's weights (embeddings, final norm,
    heads) are gathered only by the root's own forward."""
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()
            # as fully_shard left them: the blocks as configured, the root kept after forward
            again = m is not root and bool(plugin.reshard_after_forward)
            m.set_reshard_after_forward(again, recurse=False)


def fsdp_full_weights(model: Any) -> dict[str, Any]:
    """The full weights on the CPU, on the main process ({} elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)  # type: ignore[no-any-return]


def fsdp_optimizer_state(wrapped: Any, optimizer: Any) -> dict[str, Any]:
    """The full optimizer state keyed by parameter name, on the main process; a collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(wrapped, inner_optimizer(optimizer), options=options)  # type: ignore[return-value]


def fsdp_load_optimizer_state(wrapped: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Every process loads its own shard of a full, name-keyed optimizer state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(wrapped, inner_optimizer(optimizer), state, options=options)


# ---------------------------------------------------------------------------------- DeepSpeed


def check_deepspeed(stage: str, refused: str | None) -> None:
    """Refuse DeepSpeed where the stage's loop does not run it (``refused``: why), or where it
    is not installed."""
    if refused:
        raise UserError(f"accelerate DeepSpeed, `rlaif {stage}`: {refused}")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError(
            "accelerate DeepSpeed: the deepspeed package is not installed (pip install deepspeed)"
        ) from None


def deepspeed_config(plugin: Any, world: int, max_grad_norm: float) -> None:
    """Fill the engine settings that follow from the loop: one 'micro-batch' per backward as
    DeepSpeed counts it, accumulation and the boundary owned by the loop, clipping at
    ``max_grad_norm`` (the stage's setting; DeepSpeed clips inside ``step``)."""
    cfg = plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = world
    cfg["gradient_clipping"] = float(max_grad_norm)
    cfg["managed_gradient_accumulation"] = False
    plugin.gradient_accumulation_steps = 1


def deepspeed_stage(plugin: Any) -> int:
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def deepspeed_full_weights(engine: Any, model: Any, main: bool) -> dict[str, Any]:
    """The full weights of ``model`` (the engine's module's ``inner``) on the main process; a
    collective under ZeRO-3 (gathered one module at a time), a plain copy under ZeRO-2."""
    if engine.zero_optimization_partition_weights():
        full = engine._zero3_consolidated_16bit_state_dict()  # None except on the main process
        if not main or full is None:
            return {}
        return {k.removeprefix("inner."): v.cpu() for k, v in full.items()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()} if main else {}


def log_share(engine: str, what: str, params: Any) -> None:
    """Log how much of the parameter values this process holds (the test reads this line)."""
    params = list(params)
    local = sum(_local_numel(p) for p in params)
    whole = sum(int(getattr(p, "ds_numel", 0)) or p.numel() for p in params)
    log.info(
        "%s: %s; this process holds %d of %d parameter values (%.0f%%)",
        engine, what, local, whole, 100 * local / max(whole, 1),
    )  # fmt: skip


def _local_numel(p: Any) -> int:
    if hasattr(p, "to_local"):  # FSDP DTensor
        return int(p.to_local().numel())
    if hasattr(p, "ds_tensor"):  # ZeRO-3 partition
        return int(p.ds_tensor.numel())
    return int(p.numel())
