"""Durable outputs: append-only JSONL record stores and atomic file writes.

A killed run loses nothing: every record is one line written, flushed and fsynced before the next
one starts; a line cut short by a kill is dropped (and truncated away) when the store is reopened,
so a rerun redoes exactly the records that are missing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rlaif.errors import UserError

log = logging.getLogger(__name__)


def write_error(path: Path, exc: OSError) -> UserError:
    reason = {
        errno.EACCES: "permission denied",
        errno.EROFS: "read-only file system",
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
    }.get(exc.errno or 0, exc.strerror or exc.__class__.__name__)
    return UserError(f"{path}: cannot write ({reason})")


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
    return path


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temps(final: Path, *, dirs: bool = False) -> None:
    """Remove the temp files (or, with ``dirs``, directories) of earlier atomic writes of ``final``
    that a kill interrupted: ``.NAME.XXXXXXXX.tmp`` files, ``.NAME.XXXXXXXX`` and ``.NAME.old``
    directories (the names :func:`atomic_write_bytes` and ``checkpoint.atomic_dir`` use)."""
    import re
    import shutil

    final = Path(final)
    tail = r"([a-z0-9_]{8}|old)" if dirs else r"[a-z0-9_]{8}\.tmp"
    stale = re.compile(rf"\.{re.escape(final.name)}\.{tail}")
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not stale.fullmatch(entry.name):
            continue
        if dirs and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif not dirs and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, then rename.

    Temp files that a kill left behind from earlier writes of ``path`` are removed first.
    """
    path = Path(path)
    ensure_dir(path.parent)
    remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise write_error(path, exc) from None
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record_id(*parts: Any) -> str:
    """A short stable id from the content of a record's inputs."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class JsonlStore:
    """An append-only JSONL file of records keyed by ``key`` (default ``"id"``).

    Opening the store repairs a torn last line (from a kill mid-write) by truncating it away.
    ``append`` writes one line per record, flushes and fsyncs, so a record is either whole on
    disk or absent.
    """

    def __init__(self, path: Path, key: str = "id", fsync: bool = True) -> None:
        self.path = Path(path)
        self.key = key
        self.fsync = fsync
        self._done: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        good = 0
        with open(self.path, "rb") as fh:
            data = fh.read()
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # torn final line: no newline
            line = data[pos:nl]
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # torn or corrupt line: everything after it is redone
            if isinstance(rec, dict) and self.key in rec:
                self._done[str(rec[self.key])] = rec
            pos = nl + 1
            good = pos
        if good < len(data):
            log.warning("%s: dropping %d bytes of a torn record", self.path, len(data) - good)
            try:
                with open(self.path, "r+b") as fh:
                    fh.truncate(good)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise write_error(self.path, exc) from None

    def __contains__(self, rid: object) -> bool:
        return str(rid) in self._done

    def __len__(self) -> int:
        return len(self._done)

    def get(self, rid: str) -> dict[str, Any] | None:
        return self._done.get(str(rid))

    def records(self) -> list[dict[str, Any]]:
        return list(self._done.values())

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Append records not already stored; return how many were written."""
        lines: list[bytes] = []
        fresh: list[dict[str, Any]] = []
        for rec in records:
            rid = str(rec[self.key])
            if rid in self._done:
                continue
            self._done[rid] = rec
            fresh.append(rec)
            lines.append(json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n")
        if not lines:
            return 0
        ensure_dir(self.path.parent)
        try:
            with open(self.path, "ab") as fh:
                for line in lines:
                    fh.write(line)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
        except OSError as exc:
            for rec in fresh:
                self._done.pop(str(rec[self.key]), None)
            raise write_error(self.path, exc) from None
        return len(lines)


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) from a .jsonl or .jsonl.gz file; bad lines raise UserError."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}:{n}: expected a JSON object")
                yield n, obj
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None
