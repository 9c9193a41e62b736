"""Data-parallel training under ``accelerate launch``: the few pieces every training loop shares.

Started by plain ``rlaif STAGE``, :func:`setup` returns a one-process :class:`Dist` whose methods
do nothing but call through: the loops then behave exactly as they always did, and accelerate is
not even imported. Started by ``accelerate launch --num_processes N`` (``WORLD_SIZE > 1`` in the
environment), it creates an ``accelerate.Accelerator`` and the loops run as DDP:

* ``batch_size`` stays the per-process micro-batch, so the global micro-batch is
  ``batch_size * N``. Every rank draws the same global batch from the same seeded stream and
  trains on its contiguous slice (:meth:`Dist.shard`); the loss is scaled so that DDP's averaged
  gradient is the gradient of the whole global batch, as one process would compute it.
* Only the optimizer step's last backward pass synchronises gradients (:meth:`Dist.syncing`).
* Logged values are reduced over ranks (:meth:`Dist.sum`, :meth:`Dist.gather`), so every rank
  holds the same numbers and the NaN guard stops all of them at the same step.
* Files (metrics, checkpoints, the model, manifests) are written by the main process only
  (:meth:`Dist.on_main`); the other ranks wait for it.

Supported: DDP over GPUs or CPUs (gloo), one node or many, and FSDP version 2
(``fully_shard``: weights, gradients and optimizer state split over the ranks). Under FSDP the
main process keeps an unsharded CPU copy of the model (the *shadow*); :meth:`Dist.unsharded`
gathers the full weights into it for checkpoints and the final export, and the optimizer state
is saved and loaded by parameter name (:meth:`Dist.optimizer_state`,
:meth:`Dist.load_optimizer_state`), so the files are those of a one-process run. DeepSpeed is
refused with a clear message (see docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from rlaif.errors import UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
log = logging.getLogger(__name__)

WAIT_S = 4 * 3600
"""Process-group timeout: how long a rank may wait in a collective for the others."""


def launched() -> bool:
    """True in a process started by ``accelerate launch`` / torchrun with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def shard_sizes(n: int, world: int) -> list[int]:
    """Sizes of ``world`` contiguous slices of ``n`` items, the first ``n % world`` one larger."""
    base, extra = divmod(n, world)
    return [base + (r < extra) for r in range(world)]


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s slice of ``n`` items."""
    sizes = shard_sizes(n, world)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


class Dist:
    """This process's place in the run (rank, world size) and the collectives the loops use."""

    def __init__(self, state: Any = None, accelerator: Any = None) -> None:
        self.state = state
        """``accelerate.PartialState`` when launched, else None."""
        self.accelerator = accelerator
        """``accelerate.Accelerator`` when launched by a stage that prepares its own model."""
        self.rank: int = state.process_index if state is not None else 0
        self.world: int = state.num_processes if state is not None else 1
        self._wrapped: Any = None
        self.fsdp: Any = None
        """accelerate's ``FullyShardedDataParallelPlugin`` (FSDP version 2) when sharded."""
        self._shadow: Any = None

    @property
    def sharded(self) -> bool:
        """FSDP: parameters are DTensor shards; see :meth:`unsharded`."""
        return self.fsdp is not None

    def layout(self) -> dict[str, Any]:
        """What of the process layout shapes a run's result and checkpoints, for fingerprints:
        the process count (the global batch) when more than one, and FSDP sharding."""
        out: dict[str, Any] = {"processes": self.world} if self.world > 1 else {}
        return out | ({"sharding": "fsdp2"} if self.sharded else {})

    @property
    def main(self) -> bool:
        """Whether this process writes files (rank 0)."""
        return self.rank == 0

    # ------------------------------------------------------------------ model

    def prepare(
        self, model: Any, optimizer: Any, forward: Callable[..., Any] | None = None
    ) -> tuple[Callable[..., Any], Any]:
        """``(call, optimizer)``: ``call(*args)`` runs ``forward(model, *args)`` (default
        ``model(*args)``), through DDP when launched so that gradients are synchronised.

        ``model`` itself stays the live, unwrapped module: save and inspect it as before.
        The scheduler is not prepared: accelerate's wrapper would step it once per process.
        """
        fn = forward if forward is not None else _call
        if self.state is None:
            return (lambda *args: fn(model, *args)), optimizer
        assert self.accelerator is not None, "Dist.prepare needs setup(), not process_info()"
        module = _forward_class()(model, fn)
        if self.fsdp is not None:
            if self.main:  # the unsharded copy that checkpoints are written from
                import copy

                self._shadow = copy.deepcopy(model).to("cpu")
            self._wrapped = _shard(module, optimizer, self.fsdp)
            return self._wrapped, optimizer
        self._wrapped, optimizer = self.accelerator.prepare(module, optimizer)
        return self._wrapped, optimizer

    def unsharded(self, model: Any) -> Any:
        """The model to save or export: ``model`` itself unless sharded. Under FSDP a collective
        (every rank calls it): the full weights are gathered into the main process's shadow,
        which is returned there; the other ranks get ``model`` back and must not save it."""
        if not self.sharded:
            return model
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not self.main:
            return model
        self._shadow.load_state_dict(full)
        return self._shadow

    def optimizer_state(self, optimizer: Any) -> dict[str, Any] | None:
        """Under FSDP (a collective) the full optimizer state keyed by parameter name, on the
        main process; ``None`` when not sharded (save ``optimizer.state_dict()`` as usual)."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self._wrapped, _inner_optimizer(optimizer), options=options)  # type: ignore[return-value]

    def load_optimizer_state(self, optimizer: Any, state: dict[str, Any]) -> None:
        """Restore what :meth:`optimizer_state` (sharded) or ``state_dict()`` saved; under FSDP
        after :meth:`prepare`, on every rank, each keeping its own shard."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            self._wrapped,
            _inner_optimizer(optimizer),
            state,
            options=StateDictOptions(full_state_dict=True),
        )

    def syncing(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one forward + backward: gradients are all-reduced only when ``sync``.

        Every rank must run exactly one ``sync=True`` pass per optimizer step (the last).
        """
        if self._wrapped is None or sync or self.sharded:
            # FSDP reduce-scatters every micro-batch's gradients into the shards: correct for
            # accumulation, and no unsharded gradient is ever held
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self._wrapped)  # type: ignore[no-any-return]

    def release(self) -> None:
        """Drop accelerate's references to the prepared model and optimizer (end of a phase)."""
        if self.accelerator is not None and self._wrapped is not None:
            self.accelerator.free_memory()
        self._wrapped = None
        self._shadow = None

    # ------------------------------------------------------------------ data

    def shard(self, batch: Sequence[int]) -> tuple[list[int], bool]:
        """This rank's contiguous slice of a global batch, and whether it holds real rows.

        A rank whose slice is empty (a global batch smaller than the world) gets the batch's
        first row as a placeholder (``False``): it must still run its forward and backward so
        that DDP's all-reduce happens, with the loss multiplied by zero.
        """
        start, end = shard_bounds(len(batch), self.world, self.rank)
        if start == end:
            return [batch[0]], False
        return list(batch[start:end]), True

    # ------------------------------------------------------------------ reductions

    def sum(self, value: float) -> float:
        """``value`` summed over ranks (itself on one process)."""
        if self.state is None:
            return value
        import torch
        from accelerate.utils import reduce

        t = torch.tensor([value], dtype=torch.float64, device=self.state.device)
        return float(reduce(t, reduction="sum")[0])

    def sums(self, values: Sequence[float]) -> list[float]:
        """``values`` summed element-wise over ranks in one collective (themselves on one process)."""
        if self.state is None:
            return list(values)
        import torch
        from accelerate.utils import reduce

        t = torch.tensor(list(values), dtype=torch.float64, device=self.state.device)
        return [float(x) for x in reduce(t, reduction="sum")]

    def maxes(self, values: Sequence[int]) -> list[int]:
        """``values`` maximised element-wise over ranks (e.g. padded widths), in one collective."""
        if self.state is None:
            return list(values)
        import torch
        from accelerate.utils import reduce

        t = torch.tensor(list(values), dtype=torch.long, device=self.state.device)
        return [int(x) for x in reduce(t, reduction="max")]

    def gather(self, rows: torch.Tensor, n_global: int) -> torch.Tensor:
        """The rows of every rank's slice, in rank order: the global batch's rows, ``(n_global,)``.

        Rank ``r`` holds its slice's rows first in ``rows`` (a placeholder rank: none of them).
        """
        if self.state is None:
            return rows
        import torch
        from accelerate.utils import gather

        sizes = shard_sizes(n_global, self.world)
        width = max(sizes)
        local = rows[: sizes[self.rank]].detach().to(self.state.device)
        padded = torch.zeros((width, *rows.shape[1:]), dtype=rows.dtype, device=local.device)
        padded[: len(local)] = local
        every = gather(padded).reshape(self.world, width, *rows.shape[1:])
        return torch.cat([every[r, : sizes[r]] for r in range(self.world)]).to(rows.device)

    # ------------------------------------------------------------------ files

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the main process only; the others wait, then all return its result."""
        if self.state is None:
            return fn()
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [fn() if self.main else None]
        self.state.wait_for_everyone()
        broadcast_object_list(box, from_process=0)
        return box[0]  # type: ignore[no-any-return]

    def wait(self) -> None:
        """Barrier (a no-op on one process)."""
        if self.state is not None:
            self.state.wait_for_everyone()


def _call(model: Any, *args: Any) -> Any:
    return model(*args)


def _shard(module: Any, optimizer: Any, plugin: Any) -> Any:
    """Apply FSDP2's ``fully_shard`` to each transformer block of ``module``, then to
    ``module`` itself (embeddings, final norm and head: one group, so tied weights stay one
    parameter), as the plugin's settings say; point ``optimizer`` at the sharded parameters.

    Done here rather than by ``accelerator.prepare``, which shards on GPUs only (on CPUs it
    silently falls back to DDP): one code path on every device, the one the CPU tests run.
    """
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
    after = dict(module.named_parameters())
    for group in _inner_optimizer(optimizer).param_groups:
        group["params"] = [after[before[id(p)]] for p in group["params"]]
    local = sum(
        p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in after.values()
    )
    whole = sum(p.numel() for p in after.values())
    log.info(
        "FSDP2: %d %s blocks sharded; this process holds %d of %d parameter values (%.0f%%)",
        len(blocks), kind, local, whole, 100 * local / max(whole, 1),
    )  # fmt: skip
    return module


def _inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


@functools.cache
def _forward_class() -> type:
    import torch

    class Forward(torch.nn.Module):
        """``fn(inner, *args)`` as a module's forward, so that DDP sees the whole computation."""

        def __init__(self, inner: Any, fn: Callable[..., Any]) -> None:
            super().__init__()
            self.inner = inner
            self.fn = fn
            # FSDP's transformer auto-wrap reads the layer classes from the root module: those of
            # the first transformers model inside (the PM holds its LM one level down).
            self._no_split_modules = next(
                (
                    m._no_split_modules
                    for m in inner.modules()
                    if getattr(m, "_no_split_modules", None)
                ),
                None,
            )

        def forward(self, *args: Any) -> Any:
            return self.fn(self.inner, *args)

    return Forward


def setup(device: str, stage: str = "train", *, fsdp_ok: bool = True) -> tuple[Dist, str]:
    """``(dist, device)`` for a training stage; ``device`` is the ``backend.device`` setting.

    ``fsdp_ok``: whether the stage's loop can run sharded (FSDP version 2); ``stage`` names it
    in the messages.

    Not launched: a one-process :class:`Dist` and the device resolved as before. Launched: an
    ``Accelerator`` (on CPU with gloo when ``device`` resolves to 'cpu', else this rank's GPU).
    """
    from rlaif.backends.dtype import resolve_device

    resolved = resolve_device(device)
    if not launched():
        return Dist(), resolved
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        DistributedType,
        FullyShardedDataParallelPlugin,
        InitProcessGroupKwargs,
        parse_flag_from_env,
    )

    # No buffer broadcast in forward: the models' buffers (rotary tables) never change, and the
    # broadcast would make every forward a collective that ranks must call equally often.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
    # The other ranks wait while the main process exports a model or runs a held-out evaluation.
    group = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=WAIT_S))
    acc = Accelerator(cpu=resolved == "cpu", kwargs_handlers=[ddp, group])
    # On CPUs accelerate runs DDP whatever the config asks; its flags still say what was asked.
    if acc.distributed_type == DistributedType.DEEPSPEED or parse_flag_from_env(
        "ACCELERATE_USE_DEEPSPEED"
    ):
        raise UserError(
            f"accelerate DeepSpeed: `rlaif {stage}` trains with its own loop, which runs DDP or "
            "FSDP version 2 (configs/accelerate/ddp.yaml, fsdp.yaml); DeepSpeed is for `rlaif dpo`"
        )
    plugin = None
    if acc.distributed_type == DistributedType.FSDP or parse_flag_from_env("ACCELERATE_USE_FSDP"):
        plugin = getattr(acc.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
        _check_fsdp(plugin, stage, fsdp_ok)
    if acc.mixed_precision != "no":
        raise UserError(
            f"accelerate mixed_precision={acc.mixed_precision}: set it to 'no' in the accelerate "
            "config; the stage's own dtype setting turns on bf16 autocast"
        )
    dist = Dist(acc.state, acc)
    dist.fsdp = plugin
    return dist, "cpu" if acc.device.type == "cpu" else str(acc.device)


def _check_fsdp(plugin: Any, stage: str, fsdp_ok: bool) -> None:
    """Refuse, with one line, the FSDP settings the stage's loop does not run."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    problem = (
        "the stage runs DDP only (configs/accelerate/ddp.yaml); use LoRA if memory is short"
        if not fsdp_ok
        else f"fsdp_version {plugin.fsdp_version}: only 2 (fully_shard) is supported"
        if plugin.fsdp_version != 2
        else "fsdp_activation_checkpointing: set the stage's gradient_checkpointing instead"
        if plugin.activation_checkpointing
        else "fsdp_auto_wrap_policy: only TRANSFORMER_BASED_WRAP is supported"
        if policy is not transformer_auto_wrap_policy
        else None
    )
    if problem:
        raise UserError(f"accelerate FSDP, `rlaif {stage}`: {problem}")


def process_info(device: str) -> tuple[Dist, str]:
    """``(dist, device)`` like :func:`setup`, for a stage whose trainer makes its own
    ``Accelerator`` (dpo): everything but :meth:`Dist.prepare` works on the ``Dist``."""
    from rlaif.backends.dtype import resolve_device

    resolved = resolve_device(device)
    if not launched():
        return Dist(), resolved
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=resolved == "cpu")
    asked = [n for n in ("FSDP", "DeepSpeed") if parse_flag_from_env(f"ACCELERATE_USE_{n.upper()}")]
    if asked and state.device.type == "cpu":  # accelerate would quietly run DDP instead
        raise UserError(
            f"accelerate {asked[0]} on CPUs: the trainer runs it on GPUs only; use "
            "configs/accelerate/cpu2.yaml (DDP) here"
        )
    return Dist(state), "cpu" if state.device.type == "cpu" else str(state.device)
