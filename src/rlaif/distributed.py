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

Supported: DDP over GPUs or CPUs (gloo), one node or many; FSDP version 2 (``fully_shard``:
weights, gradients and optimizer state split over the ranks) and DeepSpeed ZeRO-2/3, both through
:mod:`rlaif.sharding`. Under FSDP and ZeRO-3 the main process keeps an unsharded CPU copy of the
model (the *shadow*); :meth:`Dist.unsharded` gathers the full weights into it for checkpoints and
the final export. FSDP's optimizer state is saved and loaded by parameter name, DeepSpeed's as
one shard per process beside the checkpoint's files (:meth:`Dist.checkpoint_parts`,
:meth:`Dist.load_optimizer_state`). ``ppo`` runs DDP and FSDP 2 and refuses DeepSpeed; its
rollouts gather the full weights for a while (:meth:`Dist.full_weights`); see docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rlaif import sharding
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


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def follow_launcher() -> bool:
    """Linux: ask the kernel to SIGTERM this launched worker when its launcher dies.

    torchrun (behind ``accelerate launch``) starts each worker in a session of its own, so a
    SIGKILL to the launcher alone, which it cannot pass on, would leave the workers training and
    writing the run directory to the end. A worker stopped this way loses nothing (records are
    appended, checkpoints written whole) and a rerun resumes. Called first thing by a launched
    ``rlaif`` command; returns whether the kernel took the request (False off Linux).
    """
    import sys

    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def close() -> None:
    """Destroy this process's process group, if the command made one.

    Called once as a launched command ends (after an error too). Left to the interpreter's
    shutdown, the group's C++ threads can be torn down in the wrong order, and a rank that had
    finished its work then aborts with "terminate called without an active exception".
    """
    import sys

    tdist = sys.modules.get("torch.distributed")
    if tdist is not None and tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


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
        """accelerate's ``FullyShardedDataParallelPlugin`` (FSDP version 2) when sharded so."""
        self.deepspeed: Any = None
        """accelerate's ``DeepSpeedPlugin`` (ZeRO 2 or 3) when sharded so."""
        self._shadow: Any = None
        self.deepspeed_asked = False
        """The accelerate config asks for DeepSpeed (for a trainer that sets it up itself)."""

    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed: weights or optimizer state are split over the processes."""
        return self.fsdp is not None or self.deepspeed is not None

    def layout(self) -> dict[str, Any]:
        """What of the process layout shapes a run's result and checkpoints, for fingerprints:
        the process count (the global batch) when more than one, and the sharding engine."""
        out: dict[str, Any] = {"processes": self.world} if self.world > 1 else {}
        if self.fsdp is not None:
            out["sharding"] = "fsdp2"
        elif self.deepspeed is not None:
            out["sharding"] = f"zero{sharding.deepspeed_stage(self.deepspeed)}"
        elif self.deepspeed_asked:  # a trainer's own DeepSpeed setup, from accelerate's config
            out["sharding"] = f"zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '')}"
        return out

    @property
    def main(self) -> bool:
        """Whether this process writes files (rank 0)."""
        return self.rank == 0

    # ------------------------------------------------------------------ model

    def prepare(
        self,
        model: Any,
        optimizer: Any,
        forward: Callable[..., Any] | None = None,
        *,
        max_grad_norm: float = 1.0,
    ) -> tuple[Callable[..., Any], Any]:
        """``(call, optimizer)``: ``call(*args)`` runs ``forward(model, *args)`` (default
        ``model(*args)``), through DDP, FSDP or DeepSpeed when launched so.

        ``model`` itself stays the live module (sharded in place under FSDP): inspect it, and
        save what :meth:`unsharded` returns. The scheduler is not prepared (accelerate's wrapper
        would step it once per process). ``max_grad_norm``: DeepSpeed clips inside its step.
        """
        fn = forward if forward is not None else _call
        if self.state is None:
            return (lambda *args: fn(model, *args)), optimizer
        assert self.accelerator is not None, "Dist.prepare needs setup(), not process_info()"
        module = _forward_class()(model, fn)
        zero3 = self.deepspeed is not None and sharding.deepspeed_stage(self.deepspeed) == 3
        if self.main and (self.fsdp is not None or zero3):
            import copy  # the unsharded copy that checkpoints are written from

            self._shadow = copy.deepcopy(model).to("cpu")
        if self.fsdp is not None:
            self._wrapped = sharding.fsdp_shard(module, optimizer, self.fsdp)
            return self._wrapped, optimizer
        if self.deepspeed is not None:
            sharding.deepspeed_config(self.deepspeed, self.world, max_grad_norm)
        self._wrapped, optimizer = self.accelerator.prepare(module, optimizer)
        if self.deepspeed is not None:
            what = f"ZeRO-{sharding.deepspeed_stage(self.deepspeed)}"
            sharding.log_share("DeepSpeed", what, model.parameters())
        return self._wrapped, optimizer

    def syncing(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one forward + backward: gradients are all-reduced only when ``sync``.

        Every rank must run exactly one ``sync=True`` pass per optimizer step (the last).
        """
        if self._wrapped is None or sync or self.sharded:
            # FSDP and ZeRO reduce every micro-batch's gradients into the shards: correct for
            # accumulation, and no unsharded gradient is held
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self._wrapped)  # type: ignore[no-any-return]

    def backward(self, loss: Any) -> None:
        """``loss.backward()``, through the DeepSpeed engine when there is one (it reduces the
        gradients into the shards; the loss is already scaled by the loop)."""
        if self.deepspeed is not None and self._wrapped is not None:
            self._wrapped.backward(loss, scale_wrt_gas=False)
        else:
            loss.backward()

    def clip_and_step(
        self, model: Any, optimizer: Any, max_norm: float, check: Callable[..., None]
    ) -> float:
        """Clip the gradients to ``max_norm``, ``check(grad_norm=norm)`` (it raises to stop the
        run), then update; return the norm before clipping.

        DeepSpeed computes the norm inside its step, so there ``check`` runs after the update:
        the run still stops before a checkpoint of it is written.
        """
        from rlaif.train_common import grad_norm

        if self.deepspeed is not None and self._wrapped is not None:
            self._wrapped.step()
            norm = float(self._wrapped.get_global_grad_norm() or 0.0)
            check(grad_norm=norm)
            return norm
        norm = grad_norm(model, max_norm)
        check(grad_norm=norm)
        optimizer.step()
        return norm

    def unsharded(self, model: Any) -> Any:
        """The model to save or export: ``model`` itself unless its weights are sharded (FSDP,
        ZeRO-3). Then a collective (every rank calls it): the full weights are gathered into
        the main process's shadow copy, which is returned there; the other ranks get ``model``
        back and must not save it."""
        if not self._sharded_weights():
            return model
        if self.fsdp is not None:
            full = sharding.fsdp_full_weights(model)
        else:
            full = sharding.deepspeed_full_weights(self._wrapped, model, self.main)
        if not self.main:
            return model
        self._shadow.load_state_dict(full)
        return self._shadow

    def full_weights(self) -> contextlib.AbstractContextManager[Any]:
        """Context in which the prepared model's own modules can be called directly (generation,
        no-grad forwards outside the wrapped forward): under FSDP every rank gathers the full
        weights on entry, keeps them over all the forwards inside, and frees them on exit (a
        collective: every rank enters). Elsewhere a no-op.

        Writes to the weights inside are lost on exit; change sharded weights outside it.
        """
        if self.fsdp is None or self._wrapped is None:
            return contextlib.nullcontext()
        return sharding.fsdp_gathered(self._wrapped, self.fsdp)

    def _sharded_weights(self) -> bool:
        zero3 = self.deepspeed is not None and sharding.deepspeed_stage(self.deepspeed) == 3
        return self._wrapped is not None and (self.fsdp is not None or zero3)

    def checkpoint_parts(
        self, model: Any, optimizer: Any, root: Path, step: int, *, final: bool = False
    ) -> dict[str, Any]:
        """Keyword arguments for :func:`rlaif.checkpoint.save_checkpoint` (``model``,
        ``optimizer``, ``optimizer_state``, ``move_in``): a collective under FSDP and DeepSpeed,
        every rank calls it, then the main process saves.

        FSDP: the full weights and the optimizer state by parameter name, gathered. DeepSpeed:
        the full weights, and every process writes its own optimizer shard to a hidden
        directory that the main process moves into the checkpoint.

        ``final``: the run's last step, whose checkpoint no run ever steps on from (a resume
        there has nothing left to train, and a longer run is another config, which starts
        over), so it leaves the optimizer state out: AdamW's two moments are twice the weights'
        size. DeepSpeed keeps its shards: its resume reads them.
        """
        if final and self.deepspeed is None:
            return {"model": self.unsharded(model), "optimizer": None}
        parts: dict[str, Any] = {"model": self.unsharded(model), "optimizer": optimizer}
        if self.fsdp is not None:
            parts["optimizer_state"] = sharding.fsdp_optimizer_state(self._wrapped, optimizer)
        elif self.deepspeed is not None:
            import shutil

            tmp = Path(root) / f".deepspeed-{step:06d}"
            if self.main:  # what a killed run left
                for old in Path(root).glob(".deepspeed-*"):
                    shutil.rmtree(old, ignore_errors=True)
            self.wait()
            self._wrapped.save_checkpoint(str(tmp), tag=sharding.DS_TAG, save_latest=False)
            self.wait()
            parts |= {"optimizer": None, "move_in": {"deepspeed": tmp}}
        return parts

    def load_optimizer_state(
        self, optimizer: Any, ckpt: Path, state: dict[str, Any] | None
    ) -> None:
        """Restore the optimizer state saved in checkpoint ``ckpt`` (``state``: what its
        ``trainer_state.pt`` holds); after :meth:`prepare`, on every rank."""
        if self.fsdp is not None and state is not None:
            sharding.fsdp_load_optimizer_state(self._wrapped, optimizer, state)
        elif self.deepspeed is not None:
            self._wrapped.load_checkpoint(
                str(Path(ckpt) / "deepspeed"),
                tag=sharding.DS_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        elif state is not None:
            optimizer.load_state_dict(state)

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


def setup(
    device: str, stage: str = "train", *, no_deepspeed: str | None = None
) -> tuple[Dist, str]:
    """``(dist, device)`` for a training stage; ``device`` is the ``backend.device`` setting.

    Not launched: a one-process :class:`Dist` and the device resolved as before. Launched: an
    ``Accelerator`` (on CPU with gloo when ``device`` resolves to 'cpu', else this rank's GPU),
    with FSDP 2 or DeepSpeed when the accelerate config asks. ``no_deepspeed``: why the stage's
    loop does not run DeepSpeed, for the one-line error when asked for it; ``stage`` names the
    stage in the messages.
    """
    from rlaif.backends.dtype import resolve_device

    resolved = resolve_device(device)
    if not launched():
        return Dist(), resolved
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        FullyShardedDataParallelPlugin,
        InitProcessGroupKwargs,
        parse_flag_from_env,
    )

    # accelerate's flags say what the config asked for: on CPUs accelerate itself would run DDP
    # for FSDP, and leave DeepSpeed without a process-group backend.
    want_ds = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    want_fsdp = parse_flag_from_env("ACCELERATE_USE_FSDP")
    if want_ds:
        sharding.check_deepspeed(stage, no_deepspeed)
    # No buffer broadcast in forward: the models' buffers (rotary tables) never change, and the
    # broadcast would make every forward a collective that ranks must call equally often.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
    # The other ranks wait while the main process exports a model or runs a held-out evaluation.
    gloo = {"backend": "gloo"} if want_ds and resolved == "cpu" else {}
    group = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=WAIT_S), **gloo)
    # DeepSpeed runs on CPUs only through accelerate's GPU path (cpu=False) with gloo set above.
    acc = Accelerator(cpu=resolved == "cpu" and not want_ds, kwargs_handlers=[ddp, group])
    if acc.mixed_precision != "no":
        raise UserError(
            f"accelerate mixed_precision={acc.mixed_precision}: set it to 'no' in the accelerate "
            "config; the stage's own dtype setting turns on bf16 autocast"
        )
    dist = Dist(acc.state, acc)
    if want_ds:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # Models load whole on every process and ZeRO-3 partitions them at prepare; left set,
        # transformers would load under zero.Init, which the main process's own loads (held-out
        # evaluation, export) would then wait on forever.
        unset_hf_deepspeed_config()
        dist.deepspeed = acc.state.deepspeed_plugin
    elif want_fsdp:
        plugin = getattr(acc.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
        sharding.check_fsdp(plugin, stage)
        dist.fsdp = plugin
    return dist, "cpu" if acc.device.type == "cpu" else str(acc.device)


def process_info(device: str) -> tuple[Dist, str]:
    """``(dist, device)`` like :func:`setup`, for a stage whose trainer makes its own
    ``Accelerator`` (dpo): everything but :meth:`Dist.prepare` works on the ``Dist``."""
    from rlaif.backends.dtype import resolve_device

    resolved = resolve_device(device)
    if not launched():
        return Dist(), resolved
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    want_ds = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    if want_ds:
        sharding.check_deepspeed("dpo", None)
    # DeepSpeed on CPUs: accelerate's GPU path with gloo, as in setup (the trainer's own
    # Accelerator shares this state)
    cpu_ds = want_ds and resolved == "cpu"
    state = PartialState(
        cpu=resolved == "cpu" and not want_ds, **({"backend": "gloo"} if cpu_ds else {})
    )
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and state.device.type == "cpu":
        # the trainer's accelerate would quietly run DDP instead
        raise UserError(
            "accelerate FSDP on CPUs: the trainer runs it on GPUs only; use "
            "configs/accelerate/cpu2.yaml (DDP) or zero2-cpu2.yaml (DeepSpeed) here"
        )
    dist = Dist(state)
    dist.deepspeed_asked = want_ds
    return dist, "cpu" if state.device.type == "cpu" else str(state.device)
