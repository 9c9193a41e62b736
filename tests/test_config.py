from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rlaif.config import RunConfig, load_config
from rlaif.configspec import field_docs
from rlaif.errors import UserError


def _sections() -> list[type]:
    out: list[type] = [RunConfig]
    for f in dataclasses.fields(RunConfig):
        value = getattr(RunConfig(), f.name)
        if dataclasses.is_dataclass(value):
            out.append(type(value))
    return out


@pytest.mark.parametrize("cls", _sections(), ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls: type) -> None:
    missing = [name for name, doc in field_docs(cls).items() if not doc]
    assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


def test_defaults_and_overrides() -> None:
    cfg = load_config(None, ["revise.limit=8", "seed=3", "run_dir=/tmp/x", "revise.top_p=1"])
    assert cfg.revise.limit == 8
    assert cfg.seed == 3
    assert cfg.run_dir == "/tmp/x"
    assert isinstance(cfg.revise.top_p, float)


def test_yaml_then_override(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: runs/a\nrevise:\n  rounds: 3\n  limit: 5\n")
    cfg = load_config(p, ["revise.limit=2"])
    assert (cfg.run_dir, cfg.revise.rounds, cfg.revise.limit) == ("runs/a", 3, 2)


def test_unknown_key_suggests(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"unknown key 'revise.limt' \(did you mean 'revise.limit'\?\)"
    ):
        load_config(None, ["revise.limt=3"])


def test_wrong_type_names_key_and_expected() -> None:
    with pytest.raises(UserError, match=r"'revise.rounds' must be int, got 'four'"):
        load_config(None, ["revise.rounds=four"])
    with pytest.raises(UserError, match=r"'revise.shuffle' must be bool"):
        load_config(None, ["revise.shuffle=3"])


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("run_dir: x\nrevise:\n  rounds: [1, 2\n")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(p)
    p.write_text("run_dir: x\nrevise:\n  roundz: 2\n")
    with pytest.raises(UserError, match=r"bad\.yaml:3: unknown key 'revise.roundz'"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(p)
    with pytest.raises(UserError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_literal_checked() -> None:
    with pytest.raises(UserError, match=r"'backend.kind' must be 'hf' \| 'openai'"):
        load_config(None, ["backend.kind=vllm"])


def test_override_syntax() -> None:
    with pytest.raises(UserError, match="expected key=value"):
        load_config(None, ["=3"])


def test_config_reference_is_current() -> None:
    from rlaif.configspec import reference_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == reference_markdown(RunConfig), (
        "docs/config.md is stale: regenerate it with `python -m rlaif.config > docs/config.md`"
    )


def test_float_in_exponent_form() -> None:
    assert load_config(None, ["sft.lr=1e-3"]).sft.lr == 0.001
    with pytest.raises(UserError, match=r"'sft\.lr' must be float"):
        load_config(None, ["sft.lr=fast"])
