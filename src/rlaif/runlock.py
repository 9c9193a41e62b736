"""One writer per run directory: a command that writes into ``run_dir`` holds its lock file.

Two commands writing the same run directory at once would interleave their records and race for
the same checkpoint names (a second terminal, a scheduler's retry while the first job still runs,
workers left behind by a killed launcher). :func:`hold` takes an exclusive POSIX lock on
``run_dir/rlaif.lock`` for the length of the command; a second command refuses in one line that
names the holder's process. The kernel drops the lock when its process dies, SIGKILL included, so
a killed run never leaves a stale lock behind, and processes forked from the holder do not
inherit it.

Under ``accelerate launch`` only the rank-0 process takes it (the others write nothing of their
own). A file system without POSIX locks (some network mounts) runs the command unlocked, with a
warning.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from rlaif.distributed import launched
from rlaif.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "rlaif.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@contextlib.contextmanager
def hold(run_dir: Path, command: str) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the block runs; :class:`UserError` if another process holds
    it. ``command`` (e.g. ``"rlaif sft"``) is written in the file for the refusal message."""
    if launched() and os.environ.get("RANK", "0") != "0":  # rank 0 holds it for the run
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                # read through the same descriptor: closing another one on this file would drop
                # this process's POSIX locks on it
                raise UserError(
                    f"{run_dir}: in use by another rlaif command{_holder_from(fd)}; wait for it "
                    "to end or stop it, then rerun (a killed run resumes)"
                ) from None
            if exc.errno not in _UNSUPPORTED:
                raise
            log.warning("%s: this file system has no POSIX locks; running unlocked", path)
            yield
            return
        since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": since,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the lock


def _holder_from(fd: int) -> str:
    """Who holds the lock, from what the holder wrote in it ('' when unreadable)."""
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8"))
        return f" (pid {info['pid']} on {info['host']}, '{info['command']}', since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
