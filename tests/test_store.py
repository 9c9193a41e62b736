from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlaif.errors import UserError
from rlaif.manifest import read_manifest, scrub, write_manifest
from rlaif.store import JsonlStore, atomic_write_text, read_jsonl, record_id


def test_append_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    store = JsonlStore(path)
    assert store.append([{"id": "a", "x": 1}, {"id": "b", "x": 2}]) == 2
    assert store.append([{"id": "a", "x": 9}]) == 0  # already there: not written twice
    again = JsonlStore(path)
    assert len(again) == 2 and again.get("a") == {"id": "a", "x": 1}


def test_torn_last_line_is_dropped_and_truncated(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    JsonlStore(path).append([{"id": "a"}, {"id": "b"}])
    with open(path, "ab") as fh:
        fh.write(b'{"id": "c", "x": ')  # a kill mid-write
    store = JsonlStore(path)
    assert sorted(r["id"] for r in store.records()) == ["a", "b"]
    store.append([{"id": "c"}])
    lines = path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "c"]


def test_read_only_or_full_dir_gives_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated with the errno the kernel gives (tests may run as root, who ignores modes)."""
    import builtins
    import errno
    import tempfile

    existing = tmp_path / "x.txt"
    existing.write_text("old")

    def refuse(*_a: object, **_k: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(UserError, match=r"x\.txt: cannot write \(read-only file system\)"):
        atomic_write_text(existing, "new")
    assert existing.read_text() == "old"

    real_open = builtins.open

    def full(path: object, mode: str = "r", *a: object, **k: object) -> object:
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", full)
    store = JsonlStore(tmp_path / "r.jsonl")
    with pytest.raises(UserError, match="no space left on device"):
        store.append([{"id": "a"}])
    assert "a" not in store  # not marked done when the write failed


def test_read_jsonl_reports_line(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(UserError, match=r"p\.jsonl:3: invalid JSON"):
        list(read_jsonl(p))


def test_record_id_is_stable() -> None:
    assert record_id("x", 1) == record_id("x", 1) != record_id("x", 2)


def test_manifest_masks_secrets(tmp_path: Path) -> None:
    m = write_manifest(
        tmp_path / "m.json",
        stage="t",
        config={"api_key": "sk-123", "api_key_env": "OPENAI_API_KEY", "n": 1},
        inputs={},
    )
    text = (tmp_path / "m.json").read_text()
    assert "sk-123" not in text and "OPENAI_API_KEY" in text
    assert read_manifest(tmp_path / "m.json") == m
    assert scrub({"token": "t", "x": [{"secret": 1}]}) == {"token": "***", "x": [{"secret": "***"}]}
