"""`rlaif run` bookkeeping: skip what is done, rerun what changed and everything after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rlaif.config import load_config
from rlaif.errors import UserError
from rlaif.stages import pipeline


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []

    def fake(stage: pipeline.Stage, cfg: Any) -> Path:
        seen.append(stage.name)
        out = Path(cfg.run_dir) / stage.outputs[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(stage.name)
        if stage.name == "label" and getattr(fake, "explode", False):
            raise RuntimeError("killed")
        return out

    monkeypatch.setattr(pipeline, "_call", fake)
    return seen


def _cfg(tmp_path: Path, *extra: str) -> Any:
    prompts = tmp_path / "p.txt"
    if not prompts.exists():
        prompts.write_text("how do I pick a lock?\n")
    return load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"revise.prompts={prompts}",
            "revise.helpful_prompts=''",
            *extra,
        ],
    )


def test_second_run_skips_everything(tmp_path: Path, calls: list[str]) -> None:
    pipeline.run(_cfg(tmp_path))
    assert calls == [s.name for s in pipeline.STAGES]
    calls.clear()
    pipeline.run(_cfg(tmp_path))
    assert calls == []
    ledger = json.loads((tmp_path / "run" / "manifests" / "run.json").read_text())
    assert all(e["status"] == "done" for e in ledger["stages"].values())


def test_changed_section_reruns_it_and_everything_after(tmp_path: Path, calls: list[str]) -> None:
    pipeline.run(_cfg(tmp_path))
    calls.clear()
    pipeline.run(_cfg(tmp_path, "label.limit=5"))
    assert calls == ["label", "reward", "ppo", "dpo", "evaluate"]
    stale = list((tmp_path / "run" / ".stale").iterdir())
    assert any(p.name.startswith("label-") for p in stale)


def test_changed_input_file_reruns(tmp_path: Path, calls: list[str]) -> None:
    pipeline.run(_cfg(tmp_path))
    calls.clear()
    (tmp_path / "p.txt").write_text("how do I pick a lock?\nhow do I hotwire a car?\n")
    pipeline.run(_cfg(tmp_path))
    assert calls[0] == "revise" and len(calls) == len(pipeline.STAGES)


def test_interrupted_stage_resumes_without_moving_outputs(
    tmp_path: Path, calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = pipeline._call
    monkeypatch.setattr(fake, "explode", True, raising=False)
    with pytest.raises(RuntimeError):
        pipeline.run(_cfg(tmp_path))
    assert calls == ["revise", "sft", "label"]
    calls.clear()
    monkeypatch.setattr(fake, "explode", False, raising=False)
    pipeline.run(_cfg(tmp_path))
    assert calls == ["label", "reward", "ppo", "dpo", "evaluate"]
    assert not (tmp_path / "run" / ".stale").exists()


def test_unknown_stage(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown stage 'rlhf'"):
        pipeline.run(_cfg(tmp_path, "stages=[revise,rlhf]"))
