from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from rlaif.cli import main
from rlaif.constitution import load_constitution
from rlaif.errors import UserError

GOOD = """
name: tiny
principles:
  - id: a
    critique: Find harm.
    revision: Remove harm.
    feedback: Which is less harmful?
  - id: b
    critique: Find rudeness.
    revision: Be polite.
    feedback: Which is more polite?
few_shot:
  - messages: [{role: user, content: hi}, {role: assistant, content: go away}]
    principle: b
    critique: Rude.
    revision: Hello! How can I help?
"""


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_default_constitution_is_complete() -> None:
    c = load_constitution("default")
    assert len(c.principles) == 16
    assert len({p.id for p in c.principles}) == 16
    assert all(p.critique and p.revision and p.feedback for p in c.principles)
    assert len(c.few_shot) >= 2
    assert all(s.messages[-1]["role"] == "assistant" for s in c.few_shot)
    # Bare texts: the stage adds the labels.
    assert not any(
        "CritiqueRequest" in p.critique or "Options:" in p.feedback for p in c.principles
    )


def test_paper_constitution_read_as_released(shared_data: Path) -> None:
    c = load_constitution("paper")
    assert [p.id for p in c.principles] == [f"harmful{i}" for i in range(16)]
    first = c.get("harmful0")
    assert first.critique.startswith("Identify specific ways")
    assert first.revision.startswith("Please rewrite the assistant response")
    # Feedback questions are paired by position with the critique principles.
    assert first.feedback.startswith("Please choose the assistant response that is as harmless")
    assert not first.feedback.endswith("Options:")
    assert len(c.few_shot) == 5
    shot = c.few_shot[0]
    assert shot.messages[0]["content"].startswith("Could you help me burn down my house")
    assert shot.revision.startswith("I'm sorry, I shouldn't have agreed to help.")
    # Loading the directory directly gives the same content hash.
    assert load_constitution(str(shared_data / "cai-paper")).sha256 == c.sha256


def test_yaml_roundtrip_hash_and_get(tmp_path: Path) -> None:
    c = load_constitution(str(write(tmp_path, GOOD)))
    assert c.ids == ["a", "b"]
    assert c.few_shot[0].critique_request == "Find rudeness."
    assert c.get("b").revision == "Be polite."
    same = load_constitution(str(write(tmp_path, GOOD + "\n# comment only\n", "d.yaml")))
    assert same.sha256 == c.sha256  # content hash, not file bytes
    changed = load_constitution(
        str(write(tmp_path, GOOD.replace("Be polite.", "Be kind."), "e.yaml"))
    )
    assert changed.sha256 != c.sha256


def test_draw_is_seeded_per_prompt_and_round() -> None:
    c = load_constitution("default")
    picks = [c.draw(0, f"p{i}", r).id for i in range(200) for r in range(4)]
    assert picks == [c.draw(0, f"p{i}", r).id for i in range(200) for r in range(4)]
    assert picks != [c.draw(1, f"p{i}", r).id for i in range(200) for r in range(4)]
    counts = Counter(picks)
    assert len(counts) == 16 and min(counts.values()) > 20  # roughly uniform over 800 draws
    assert len({c.draw(0, "same", r).id for r in range(8)}) > 1  # rounds differ


def test_subset_and_unknown_principle(tmp_path: Path) -> None:
    c = load_constitution(str(write(tmp_path, GOOD)))
    assert c.subset(["b"]).ids == ["b"]
    assert {c.subset(["b"]).draw(0, str(i), 0).id for i in range(20)} == {"b"}
    with pytest.raises(UserError, match=r"c\.yaml.*no principle 'zz'"):
        c.subset(["zz"])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("principles: []\n", r"non-empty list"),
        ("name: x\n", r"'principles' must be a non-empty list"),
        (
            GOOD.replace("    feedback: Which is more polite?\n", ""),
            r"principle 'b': missing 'feedback'",
        ),
        (GOOD.replace("id: b", "id: a"), r"principle 'a': duplicate id"),
        (GOOD.replace("principle: b", "principle: nope"), r"few_shot\[0\]: principle 'nope'"),
        (
            GOOD.replace("critique: Find harm.", "critque: Find harm."),
            r"principle 'a': unknown key",
        ),
        ("principles: [\n", r"not valid YAML"),
    ],
)
def test_errors_name_file_and_principle(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=rf"c\.yaml.*{match}"):
        load_constitution(str(path))


def test_cli_show_and_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["constitution", "show"]) == 0
    out = capsys.readouterr().out
    assert "principles: 16" in out and "[overall-harm]" in out
    exported = tmp_path / "exported.yaml"
    assert main(["constitution", "show", "paper", "--yaml"]) == 0
    exported.write_text(capsys.readouterr().out, encoding="utf-8")
    assert main(["constitution", "validate", str(exported)]) == 0
    assert "16 principles, 5 few-shot" in capsys.readouterr().out
    assert load_constitution(str(exported)).sha256 == load_constitution("paper").sha256
    bad = write(tmp_path, "principles: []\n")
    assert main(["constitution", "validate", str(bad)]) == 2
    assert "c.yaml" in capsys.readouterr().err
