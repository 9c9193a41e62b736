"""Progress bars for the long loops: tqdm on a terminal, a plain line now and then in a log.

tqdm's own default (``disable=None``) draws nothing when stderr is not a terminal, so a run under
``nohup``, a scheduler or CI would show no progress at all for an hour. Here, when stderr is
redirected, a bar stays silent for its first ``RLAIF_PROGRESS_S`` seconds (default 60), then writes
one newline-terminated line at most that often, and one at its end. ``RLAIF_PROGRESS=off`` turns
every bar off. The backends' bars (one per generate or scoring call, nested inside a stage's
bar) pass ``leave=False``, so a terminal keeps only the stage's bar once a call is done.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

from rlaif.errors import UserError

T = TypeVar("T")

LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
"""One line per refresh in a log: no bar, which only makes sense redrawn in place."""


class _Lines:
    """The stream of one bar in a log: each new count once, on its own line, without tqdm's
    carriage returns and the blanking it writes to redraw in place."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        count = line.rsplit(" [", 1)[0]  # "desc: n/total": the rate alone changing is no news
        if line and count != self.last:
            self.last = count
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):  # type: ignore[type-arg]
    """A bar for a log: a new postfix (loss, tokens/s) waits for the next timed line instead of
    writing one of its own at every step."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kw: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kw)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        super().set_postfix_str(s, refresh=False)


def log_interval() -> float:
    """Seconds between two lines of one bar when stderr is not a terminal."""
    raw = os.environ.get("RLAIF_PROGRESS_S", "60")
    try:
        every = float(raw)
    except ValueError:
        every = math.nan
    if not (math.isfinite(every) and every >= 0):
        raise UserError(f"RLAIF_PROGRESS_S={raw!r}: expected a number of seconds (0 or more)")
    return every


def enabled() -> bool:
    return os.environ.get("RLAIF_PROGRESS", "on").strip().lower() not in ("off", "0", "false")


def progress(iterable: Iterable[T] | None = None, *, show: bool = True, **kw: Any) -> tqdm[T]:
    """``tqdm(iterable, **kw)`` for a stage's loop. ``show=False`` (ranks other than the main
    one, quiet callers) or ``RLAIF_PROGRESS=off`` gives a bar that draws nothing."""
    if not show or not enabled():
        return tqdm(iterable, disable=True, **kw)
    isatty = getattr(sys.stderr, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(iterable, **kw)
    every = log_interval()
    kw.setdefault("delay", every)  # a loop shorter than one interval writes nothing
    kw.setdefault("position", 0)  # nested bars: no cursor moves, each line stands alone
    return _LogBar(
        iterable,
        mininterval=every,
        maxinterval=max(every, 10.0),
        bar_format=LOG_FORMAT,
        file=_Lines(sys.stderr),
        **kw,
    )
