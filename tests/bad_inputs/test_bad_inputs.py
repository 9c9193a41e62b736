"""A corpus of malformed inputs: each gets one line naming the file and the line or field, exit
code 2, no traceback, and leaves the run directory's existing outputs as they were.

Every case runs through ``rlaif.cli.main`` in-process (an unexpected exception fails the test with
its traceback); a sample also runs as a real subprocess to check stderr has no traceback.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlaif.cli import main
from rlaif.runlock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"

GOOD_PRINCIPLE = "  - id: p1\n    critique: c\n    revision: r\n    feedback: f\n"
BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<posts><row Id="1" PostTypeId="1" Title="&lol4;" Body="x" /></posts>
"""


@dataclass
class Case:
    name: str
    argv: Callable[[Path], list[str]]
    """Builds the argv from the case's temp dir (after ``files`` are written)."""
    match: str
    """Regex the one-line error must match (it should name the file, line or field)."""
    files: dict[str, str | bytes] = field(default_factory=dict)


def _revise(tmp: Path, *extra: str) -> list[str]:
    return ["revise", f"run_dir={tmp / 'run'}", "revise.limit=2", "revise.helpful_prompts=", *extra]


def _prompts(name: str) -> Callable[[Path], list[str]]:
    return lambda t: _revise(t, f"revise.prompts={t / name}")


CASES: list[Case] = [
    # --- configs -------------------------------------------------------------------------------
    Case(
        "yaml-syntax",
        lambda t: ["revise", str(t / "c.yaml")],
        r"c\.yaml:3: invalid YAML",
        {"c.yaml": "run_dir: x\nrevise:\n  rounds: [1, 2\n"},
    ),
    Case(
        "yaml-unknown-key",
        lambda t: ["revise", str(t / "c.yaml")],
        r"c\.yaml:2: unknown key 'seeed' \(did you mean 'seed'\?\)",
        {"c.yaml": "run_dir: x\nseeed: 1\n"},
    ),
    Case(
        "yaml-unknown-nested",
        lambda t: ["sft", str(t / "c.yaml")],
        r"c\.yaml:3: unknown key 'revise.limt'",
        {"c.yaml": "run_dir: x\nrevise:\n  limt: 1\n"},
    ),
    Case(
        "yaml-wrong-type",
        lambda t: ["revise", str(t / "c.yaml")],
        r"c\.yaml:3: 'revise.rounds' must be int",
        {"c.yaml": "run_dir: x\nrevise:\n  rounds: four\n"},
    ),
    Case(
        "yaml-not-mapping",
        lambda t: ["revise", str(t / "c.yaml")],
        r"c\.yaml: expected a mapping",
        {"c.yaml": "- a\n- b\n"},
    ),
    Case("yaml-missing", lambda t: ["revise", str(t / "nope.yaml")], r"nope\.yaml: no such file"),
    Case(
        "yaml-binary",
        lambda t: ["revise", str(t / "c.yaml")],
        r"c\.yaml: cannot read",
        {"c.yaml": b"\xff\xfe\x00garbage"},
    ),
    Case("override-syntax", lambda t: ["revise", "=3"], r"expected key=value"),
    Case(
        "override-type", lambda t: _revise(t, "revise.rounds=many"), r"'revise.rounds' must be int"
    ),
    Case(
        "override-literal",
        lambda t: _revise(t, "backend.kind=vllm"),
        r"'backend.kind' must be 'hf' \| 'openai'",
    ),
    Case(
        "override-unknown",
        lambda t: _revise(t, "label.temprature=1"),
        r"unknown key 'label.temprature' \(did you mean 'label.temperature'\?\)",
    ),
    Case("two-configs", lambda t: ["revise", "a.yaml", "b.yaml"], r"unexpected argument 'b.yaml'"),
    # --- constitutions -------------------------------------------------------------------------
    Case(
        "constitution-empty",
        lambda t: ["constitution", "validate", str(t / "k.yaml")],
        r"k\.yaml.*principles",
        {"k.yaml": "principles: []\n"},
    ),
    Case(
        "constitution-missing-field",
        lambda t: ["constitution", "validate", str(t / "k.yaml")],
        r"k\.yaml.*p1.*revision",
        {"k.yaml": "principles:\n  - id: p1\n    critique: c\n    feedback: f\n"},
    ),
    Case(
        "constitution-duplicate-id",
        lambda t: ["constitution", "validate", str(t / "k.yaml")],
        r"k\.yaml.*p1.*duplicate|k\.yaml.*duplicate.*p1",
        {"k.yaml": "principles:\n" + GOOD_PRINCIPLE * 2},
    ),
    Case(
        "constitution-bad-yaml",
        lambda t: ["constitution", "validate", str(t / "k.yaml")],
        r"k\.yaml(:\d+)?: .*YAML",
        {"k.yaml": "principles: [\n"},
    ),
    Case(
        "constitution-unknown-principle",
        lambda t: _revise(
            t,
            f"constitution={t / 'k.yaml'}",
            "revise.principles=[nope]",
            f"revise.prompts={t / 'p.txt'}",
        ),
        r"nope",
        {"k.yaml": "principles:\n" + GOOD_PRINCIPLE, "p.txt": "hi\n"},
    ),
    Case(
        "constitution-missing-file",
        lambda t: ["constitution", "validate", str(t / "none.yaml")],
        r"none\.yaml",
    ),
    # --- prompt files --------------------------------------------------------------------------
    Case(
        "prompts-bad-json-line",
        _prompts("p.jsonl"),
        r"p\.jsonl:2: invalid JSON",
        {"p.jsonl": '{"prompt": "hi"}\n{"prompt": \n'},
    ),
    Case(
        "prompts-no-field",
        _prompts("p.jsonl"),
        r"p\.jsonl:1: .*(prompt|messages)",
        {"p.jsonl": '{"question": "hi"}\n'},
    ),
    Case(
        "prompts-bad-role",
        _prompts("p.jsonl"),
        r"p\.jsonl:1: .*messages",
        {"p.jsonl": '{"messages": [{"role": "wizard", "content": "x"}]}\n'},
    ),
    Case(
        "prompts-csv-column",
        _prompts("p.csv"),
        r"p\.csv.*Behavior",
        {"p.csv": "Goal,Target\nsteal,bank\n"},
    ),
    Case("prompts-empty", _prompts("p.txt"), r"p\.txt.*(empty|no prompts)", {"p.txt": "\n\n"}),
    Case(
        "prompts-unknown-type",
        _prompts("p.parquet"),
        r"p\.parquet: unknown prompt file type",
        {"p.parquet": "x"},
    ),
    Case("prompts-missing", _prompts("missing.jsonl"), r"missing\.jsonl: no such (prompt )?file"),
    Case(
        "prompts-bad-gzip",
        _prompts("p.jsonl.gz"),
        r"p\.jsonl\.gz: cannot read",
        {"p.jsonl.gz": b"not gzip at all"},
    ),
    # --- Stack Exchange XML --------------------------------------------------------------------
    Case(
        "xml-truncated",
        lambda t: ["reward", "pmp-data", str(t / "Posts.xml"), f"run_dir={t / 'run'}"],
        r"Posts\.xml.*(line \d+|:\d+)",
        {"Posts.xml": '<?xml version="1.0"?>\n<posts>\n  <row Id="1" PostTypeId="1" Body="x'},
    ),
    Case(
        "xml-entity-bomb",
        lambda t: ["reward", "pmp-data", str(t / "Posts.xml"), f"run_dir={t / 'run'}"],
        r"Posts\.xml.*(entit|DTD)",
        {"Posts.xml": BOMB},
    ),
    Case(
        "xml-missing",
        lambda t: ["reward", "pmp-data", str(t / "none.xml"), f"run_dir={t / 'run'}"],
        r"none\.xml",
    ),
    # --- preference files ----------------------------------------------------------------------
    Case(
        "prefs-p-out-of-range",
        lambda t: ["eval-labeler", str(t / "p.jsonl"), "limit=1"],
        r"p\.jsonl:1: .*p_chosen",
        {
            "p.jsonl": '{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b", "p_chosen": 1.5}\n'
        },
    ),
    Case(
        "prefs-missing-field",
        lambda t: ["eval-labeler", str(t / "p.jsonl"), "limit=1"],
        r"p\.jsonl:1: .*rejected",
        {"p.jsonl": '{"prompt": [{"role": "user", "content": "q"}], "chosen": "a"}\n'},
    ),
    Case(
        "prefs-bad-json",
        lambda t: ["eval-labeler", str(t / "p.jsonl"), "limit=1"],
        r"p\.jsonl:1: invalid JSON",
        {"p.jsonl": "{oops\n"},
    ),
    # --- model directories ---------------------------------------------------------------------
    Case(
        "model-missing-dir",
        lambda t: _revise(t, f"model={t / 'nomodel'}", f"revise.prompts={t / 'p.txt'}"),
        r"nomodel",
        {"p.txt": "hi\n"},
    ),
    Case(
        "model-no-config",
        lambda t: _revise(t, f"model={t / 'm'}", f"revise.prompts={t / 'p.txt'}"),
        r"m: not a model directory \(config\.json is missing\)",
        {"m/tokenizer.json": "{}", "p.txt": "hi\n"},
    ),
    Case(
        "model-pickle-only",
        lambda t: _revise(t, f"model={t / 'm'}", f"revise.prompts={t / 'p.txt'}"),
        r"m: weights are pickle files only \(pytorch_model\.bin\)",
        {
            "m/config.json": "{}",
            "m/pytorch_model.bin": b"\x80\x04",
            "m/tokenizer.json": "{}",
            "p.txt": "hi\n",
        },
    ),
    Case(
        "model-no-tokenizer",
        lambda t: _revise(t, f"model={t / 'm'}", f"revise.prompts={t / 'p.txt'}"),
        r"m: tokenizer files are missing",
        {"m/config.json": "{}", "m/model.safetensors": b"\x00" * 16, "p.txt": "hi\n"},
    ),
    Case(
        "model-unknown-alias",
        lambda t: ["models", "pull", "smollm3-135m"],
        r"smollm3-135m.*did you mean 'smollm2-135m'",
    ),
    # --- run directory -------------------------------------------------------------------------
    Case(
        "run-dir-under-a-file",
        lambda t: [
            "revise",
            f"run_dir={t / 'afile' / 'run'}",
            "revise.limit=1",
            "revise.helpful_prompts=",
            f"revise.prompts={t / 'p.txt'}",
        ],
        r"afile.*cannot write",
        {"afile": "x", "p.txt": "hi\n"},
    ),
]


def _write(tmp: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def _snapshot(run: Path) -> dict[str, str]:
    """The run directory's files but its lock, which a refused command may have held."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path, case.files)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "revisions.jsonl").write_text('{"id": "kept"}\n')
    before = _snapshot(run)
    code = main(case.argv(tmp_path))
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}, stderr: {err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no error message"
    last = lines[-1]
    assert "Traceback" not in err
    assert last.startswith("rlaif "), last
    import re

    assert re.search(case.match, last), f"{last!r} does not match {case.match!r}"
    assert _snapshot(run) == before, "existing outputs changed"


@pytest.mark.parametrize("name", ["yaml-unknown-key", "prompts-bad-json-line", "model-pickle-only"])
def test_subprocess_has_no_traceback(name: str, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == name)
    _write(tmp_path, case.files)
    res = subprocess.run(
        [sys.executable, "-m", "rlaif", *case.argv(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("rlaif ")]) == 1
