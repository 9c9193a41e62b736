"""Linear-layer weights held in the autocast dtype, so that autocast has nothing left to cast.

Under ``torch.autocast`` (bf16), every ``nn.Linear`` call casts its fp32 weight to bf16 first. For
a model run many times between weight updates (a decode loop: one call per new token) that cast is
paid at every call, and on a CPU it costs about as much as the matmul it feeds. Holding the weight
in bf16 already gives the same numbers: autocast would have rounded it the same way, and the other
parameters (embeddings, norms) stay in fp32, so the residual stream keeps the precision it has
under autocast.

- :func:`linear_weights_as` swaps bf16 copies in for a ``with`` block and puts the originals back:
  for a model being trained (its fp32 weights are the optimizer's) during no-grad phases.
- :func:`store_linear_weights` converts a frozen model for good (half the memory of its linears).
Both are equivalent only under autocast to that dtype; outside it a bf16 weight meets fp32 inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _linears(model: torch.nn.Module, skip: tuple[str, ...]) -> list[torch.nn.Linear]:
    import torch

    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in skip
    ]


def _swap_in(
    mods: list[torch.nn.Linear], dtype: torch.dtype
) -> list[tuple[torch.nn.Linear, torch.nn.Parameter]]:
    """Give every module in ``mods`` a ``dtype`` copy of its weight; return (module, original)."""
    import torch

    copies: dict[int, torch.nn.Parameter] = {}  # a tied weight is cast once
    swapped = []
    with torch.no_grad():
        for m in mods:
            w = m._parameters["weight"]
            if w is None or w.dtype == dtype or not w.is_floating_point():
                continue
            if id(w) not in copies:
                copies[id(w)] = torch.nn.Parameter(w.detach().to(dtype), requires_grad=False)
            m._parameters["weight"] = copies[id(w)]
            swapped.append((m, w))
    return swapped


@contextlib.contextmanager
def linear_weights_as(
    model: torch.nn.Module, dtype: torch.dtype | None, skip: tuple[str, ...] = ()
) -> Iterator[None]:
    """Inside the block, every ``nn.Linear`` weight of ``model`` is a frozen ``dtype`` copy.

    ``dtype=None`` changes nothing. Modules whose own name is in ``skip`` keep their weight. The
    original parameters (the ones an optimizer holds) return when the block ends, errors included;
    changes made to the copies are dropped.
    """
    if dtype is None:
        yield
        return
    swapped = _swap_in(_linears(model, skip), dtype)
    try:
        yield
    finally:
        for m, w in swapped:
            m._parameters["weight"] = w


def store_linear_weights(
    model: torch.nn.Module, dtype: torch.dtype | None, skip: tuple[str, ...] = ()
) -> int:
    """Convert the ``nn.Linear`` weights of a frozen ``model`` to ``dtype`` for good.

    A weight tied to an embedding is untied: the linear gets the ``dtype`` copy and the embedding
    keeps its fp32 weight. Returns the number of weights converted.

    The tensors left as they were (embeddings, norms, the skipped linears) are then copied into
    memory of their own. A model loaded from safetensors views the file through one mapping, and
    while any tensor holds it, the pages the cast has just read stay resident: for a 135M model
    that is its whole fp32 size (0.5 GB) kept beside the ``dtype`` copies.
    """
    import torch

    if dtype is None:
        return 0
    swapped = _swap_in(_linears(model, skip), dtype)
    fresh = {id(m._parameters["weight"]) for m, _ in swapped}
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in fresh:
                t.data = t.data.clone()
    return len(swapped)
