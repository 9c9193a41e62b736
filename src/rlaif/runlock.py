"""One writer per run directory: a command that writes into ``run_dir`` holds its lock file.

Two commands writing the same run directory at once would interleave their records and race for
the same checkpoint names (a second terminal, a scheduler's retry while the first job still runs,
workers left behind by a killed launcher). :func:`hold` takes an exclusive POSIX lock on
``run_dir/rlaif.lock`` for the length of the command; a second command refuses in one line that
names the holder's process. The kernel drops the lock when its process dies, SIGKILL included, so
a killed run leaves no stale lock on a local disk, and processes forked from the holder do not
inherit it. The file itself stays (deleting it while a command runs would let a second one in).

Under ``accelerate launch`` only the rank-0 process takes it (the others write nothing of their
own). A file system without POSIX locks runs the command unlocked, with a warning; on a network
file system the lock is only as good as its lock service (an NFS mount with ``nolock`` or
``local_lock`` keeps each host's locks to itself).
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
from rlaif.store import ensure_dir, write_error

log = logging.getLogger(__name__)

LOCK_NAME = "rlaif.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_held: set[tuple[int, int]] = set()
"""(device, inode) of the lock files this process holds: a nested :func:`hold` on the same
directory must not open and close the file again, which would drop the outer POSIX lock."""


@contextlib.contextmanager
def hold(run_dir: Path, command: str) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the block runs; :class:`UserError` if another process holds
    it. ``command`` (e.g. ``"rlaif sft"``) is written in the file for the refusal message."""
    if launched() and os.environ.get("RANK", "0") != "0":  # rank 0 holds it for the run
        yield
        return
    path = ensure_dir(run_dir) / LOCK_NAME
    if _identity(path) in _held:  # already ours, further out in this process
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_error(path, exc) from None
    key: tuple[int, int] | None = None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise UserError(
                    f"{run_dir}: in use by another rlaif command{_holder(fd)}; wait for it "
                    "to end or stop it, then rerun (a killed run resumes)"
                ) from None
            if exc.errno not in _UNSUPPORTED:
                raise write_error(path, exc) from None
            log.warning("%s: this file system has no POSIX locks; running unlocked", path)
            yield
            return
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        _held.add(key)
        since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": since,
        }
        data = (json.dumps(info) + "\n").encode()
        os.pwrite(fd, data, 0)  # then cut what a longer earlier holder left: never empty
        os.ftruncate(fd, len(data))
        yield
    finally:
        if key is not None:
            _held.discard(key)
        os.close(fd)  # drops the lock


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote in it ('' when unreadable). Read through
    the descriptor already open: closing a second one on this file would drop this process's
    POSIX locks on it."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f" (pid {info['pid']} on {info['host']}, '{info['command']}', since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
