"""Training checkpoints: written atomically, resumed from the newest complete one.

Layout under a stage's checkpoint root::

    checkpoints/step-000040/   model (safetensors) + tokenizer + trainer_state.pt + state.json
    checkpoints/step-000080/

A checkpoint is built in a hidden temp directory and renamed into place only when complete, so a
kill at any moment leaves either the old set or the new one. ``trainer_state.pt`` holds optimizer,
scheduler and RNG state as plain tensors and is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlaif.errors import TrainingDiverged
from rlaif.store import ensure_dir, fsync_dir, remove_stale_temps

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(root)


def atomic_dir(final: Path, build: Any) -> Path:
    """Call ``build(tmp_dir)`` then move ``tmp_dir`` to ``final`` (replacing it) atomically.

    Temp directories that a kill left behind from an earlier build of ``final`` are removed first.
    """
    final = Path(final)
    ensure_dir(final.parent)
    remove_stale_temps(final, dirs=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        _fsync_tree(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not Path(root).is_dir():
        return []
    found = []
    for child in Path(root).iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / "state.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: Any,
    tokenizer: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    state: dict[str, Any] | None = None,
    keep: int = 2,
    optimizer_state: dict[str, Any] | None = None,
    move_in: dict[str, Path] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep only the newest ``keep``.

    ``optimizer_state``: saved instead of ``optimizer.state_dict()`` (FSDP's gathered state);
    ``move_in``: directories already written (DeepSpeed's per-process optimizer shards) moved
    into the checkpoint under the given names. See :meth:`rlaif.distributed.Dist.checkpoint_parts`.
    """

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_trainer_state(tmp, optimizer, optimizer_state, scheduler)
        for name, src in (move_in or {}).items():
            os.replace(src, tmp / name)
        (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=2))

    path = atomic_dir(Path(root) / f"step-{step:06d}", build)
    prune_checkpoints(root, keep)
    return path


def write_trainer_state(
    directory: Path, optimizer: Any, optimizer_state: dict[str, Any] | None, scheduler: Any
) -> None:
    """Write ``directory/trainer_state.pt``: the RNG, the scheduler when given, and the optimizer
    state — ``optimizer_state`` when given (FSDP's gathered state by parameter name), else
    ``optimizer.state_dict()``, else none (the last checkpoint of a run, which no run steps on
    from)."""
    import torch

    blob: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if optimizer_state is not None:
        blob["optimizer"] = optimizer_state
    elif optimizer is not None:
        blob["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        blob["scheduler"] = scheduler.state_dict()
    torch.save(blob, directory / "trainer_state.pt")


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints under ``root`` (none when ``keep`` ≤ 0)."""
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(
    ckpt: Path,
    *,
    optimizer: Any = None,
    scheduler: Any = None,
    load_optimizer: Callable[[dict[str, Any] | None], None] | None = None,
) -> dict[str, Any]:
    """Restore optimizer/scheduler/RNG from ``ckpt``; return its state.json contents.

    ``load_optimizer(state)``, when given, restores the optimizer in place of
    ``optimizer.load_state_dict`` from the saved state (None if the checkpoint holds none in
    ``trainer_state.pt``), e.g. :meth:`rlaif.distributed.Dist.load_optimizer_state`.
    """
    import torch

    blob = torch.load(Path(ckpt) / "trainer_state.pt", weights_only=True, mmap=True)
    if load_optimizer is not None:
        load_optimizer(blob.get("optimizer"))
    elif optimizer is not None and "optimizer" in blob:
        optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and "scheduler" in blob:
        scheduler.load_state_dict(blob["scheduler"])
    if "torch_rng" in blob:
        torch.set_rng_state(blob["torch_rng"])
    state: dict[str, Any] = json.loads((Path(ckpt) / "state.json").read_text())
    return state


def check_finite(step: int, stage: str, last_good: Path | None, **values: float) -> None:
    """Stop the run with a clear message when a loss or gradient norm is NaN/inf."""
    bad = {k: v for k, v in values.items() if not math.isfinite(float(v))}
    if bad:
        what = ", ".join(f"{k}={v}" for k, v in bad.items())
        kept = f"; last good checkpoint kept: {last_good}" if last_good else ""
        raise TrainingDiverged(f"{stage}: non-finite value at step {step} ({what}){kept}")


def save_model_dir(out: Path, model: Any, tokenizer: Any) -> Path:
    """Publish a finished model directory (safetensors + tokenizer) atomically at ``out``."""

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(out, build)
