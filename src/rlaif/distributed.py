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

Supported: DDP over GPUs or CPUs (gloo), one node or many. DeepSpeed and FSDP shard weights or
optimizer state across ranks, which the checkpoint and export code here does not gather; the
stages that train with this module refuse them with a clear message (see docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from rlaif.errors import UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

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
        self._wrapped, optimizer = self.accelerator.prepare(module, optimizer)
        return self._wrapped, optimizer

    def syncing(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one forward + backward: gradients are all-reduced only when ``sync``.

        Every rank must run exactly one ``sync=True`` pass per optimizer step (the last).
        """
        if self._wrapped is None or sync:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self._wrapped)  # type: ignore[no-any-return]

    def release(self) -> None:
        """Drop accelerate's references to the prepared model and optimizer (end of a phase)."""
        if self.accelerator is not None and self._wrapped is not None:
            self.accelerator.free_memory()
        self._wrapped = None

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


@functools.cache
def _forward_class() -> type:
    import torch

    class Forward(torch.nn.Module):
        """``fn(inner, *args)`` as a module's forward, so that DDP sees the whole computation."""

        def __init__(self, inner: Any, fn: Callable[..., Any]) -> None:
            super().__init__()
            self.inner = inner
            self.fn = fn
            # FSDP's transformer auto-wrap reads the layer classes from the root module.
            self._no_split_modules = getattr(inner, "_no_split_modules", None)

        def forward(self, *args: Any) -> Any:
            return self.fn(self.inner, *args)

    return Forward


def setup(device: str) -> tuple[Dist, str]:
    """``(dist, device)`` for a training stage; ``device`` is the ``backend.device`` setting.

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
        InitProcessGroupKwargs,
    )

    # No buffer broadcast in forward: the models' buffers (rotary tables) never change, and the
    # broadcast would make every forward a collective that ranks must call equally often.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
    # The other ranks wait while the main process exports a model or runs a held-out evaluation.
    group = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=WAIT_S))
    acc = Accelerator(cpu=resolved == "cpu", kwargs_handlers=[ddp, group])
    if acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise UserError(
            f"accelerate {acc.distributed_type.value}: this stage checkpoints and exports full "
            "weights and optimizer state from the main process and cannot gather sharded ones; "
            "use a DDP config (configs/accelerate/ddp.yaml), with LoRA if memory is short"
        )
    if acc.mixed_precision != "no":
        raise UserError(
            f"accelerate mixed_precision={acc.mixed_precision}: set it to 'no' in the accelerate "
            "config; the stage's own dtype setting turns on bf16 autocast"
        )
    return Dist(acc.state, acc), "cpu" if acc.device.type == "cpu" else str(acc.device)


def process_info(device: str) -> tuple[Dist, str]:
    """``(dist, device)`` like :func:`setup`, for a stage whose trainer makes its own
    ``Accelerator`` (dpo): everything but :meth:`Dist.prepare` works on the ``Dist``."""
    from rlaif.backends.dtype import resolve_device

    resolved = resolve_device(device)
    if not launched():
        return Dist(), resolved
    from accelerate import PartialState

    state = PartialState(cpu=resolved == "cpu")
    return Dist(state), "cpu" if state.device.type == "cpu" else str(state.device)
