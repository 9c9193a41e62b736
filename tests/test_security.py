"""Issue 10, item 5: an API key read from the environment never reaches a file, a log or a report.

`revise`, `label` and `evaluate` run as real subprocesses against the OpenAI-protocol test server
(which requires the key), with debug logging on; then every file under the run directory, and
everything the commands printed, is searched for the key. A server that refuses the key quotes it
back in its 401 answer (the worst case), so the error path is searched too.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from rlaif.testing_server import OpenAITestServer, ServerOptions

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "RLAIF_TEST_SECRET_KEY"
SECRET = "sk-live-8f3KqZ-never-print-me"
PIECES = (SECRET, SECRET.removeprefix("sk-live-"), "8f3KqZ")
"""The key, and pieces of it that a partial mask could still leak."""


def _rlaif(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, KEY_ENV: SECRET, "RLAIF_LOG": "DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "rlaif", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _leaks(texts: list[str], root: Path) -> list[str]:
    found = [f"output #{i}" for i, t in enumerate(texts) if any(p in t for p in PIECES)]
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if any(p.encode() in data for p in PIECES):
                found.append(str(path))
    return found


def test_api_key_never_written_or_printed(
    tiny_model_dir: Path, tmp_path: Path, fixtures: Path
) -> None:
    prompts = fixtures / "hh-rlhf-60.jsonl"
    run = tmp_path / "run"
    printed: list[str] = []
    with OpenAITestServer(tiny_model_dir, options=ServerOptions(api_key=SECRET)) as srv:
        common = [
            f"run_dir={run}",
            "model=tiny",
            "backend.kind=openai",
            f"backend.base_url=[{srv.url}]",
            f"backend.api_key_env={KEY_ENV}",
        ]
        stages = [
            ["revise", f"revise.prompts={prompts}", "revise.limit=2", "revise.rounds=1",
             "revise.max_new_tokens=6", "revise.few_shot=0", "revise.helpful_prompts="],
            ["label", "label.policy=tiny", f"label.prompts={prompts}", "label.skip=2",
             "label.limit=2", "label.max_new_tokens=6", "label.helpful_pairs="],
            ["evaluate", "evaluate.checkpoints=[base=tiny,again=tiny]", f"revise.prompts={prompts}",
             "revise.helpful_prompts=", "evaluate.n_harmful=2", "evaluate.max_new_tokens=6",
             "evaluate.bootstrap=10", "evaluate.labeler_pairs=4",
             f"evaluate.labeler_file={prompts}"],
        ]  # fmt: skip
        for args in stages:
            res = _rlaif([args[0], *common, *args[1:]])
            printed += [res.stdout, res.stderr]
            assert res.returncode == 0, res.stderr[-3000:]
        assert srv.requests and {r["auth"] for r in srv.requests} == {f"Bearer {SECRET}"}
    files = ("revisions.jsonl", "labels.jsonl", "report.md", "manifests/evaluate.json")
    for name in (*files, "plots/elo.png", "plots/calibration.png"):
        assert (run / name).is_file(), name
    # A server that refuses the key quotes the key it got in its error answer.
    with OpenAITestServer(tiny_model_dir, options=ServerOptions(api_key="another-key")) as other:
        res = _rlaif(
            ["label", f"run_dir={tmp_path / 'refused'}", "model=tiny", "backend.kind=openai",
             f"backend.base_url=[{other.url}]", f"backend.api_key_env={KEY_ENV}",
             "backend.max_retries=0", "label.policy=tiny", f"label.prompts={prompts}",
             "label.limit=1", "label.max_new_tokens=4", "label.helpful_pairs="]
        )  # fmt: skip
        printed += [res.stdout, res.stderr]
        assert res.returncode == 2 and "401" in res.stderr, res.stderr[-2000:]
        assert other.requests and {r["auth"] for r in other.requests} == {f"Bearer {SECRET}"}
    assert _leaks(printed, tmp_path) == []


def test_remote_code_in_a_model_dir_is_never_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model directory that ships its own modelling code: loaded without running that code."""
    import json
    import shutil

    from rlaif.modelio import load_causal_lm

    model = tmp_path / "hostile"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "code-ran"
    (model / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    pass\n",
        encoding="utf-8",
    )
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with contextlib.suppress(Exception):  # refusing is fine too; running the code is not
        load_causal_lm(model)
    assert not marker.exists()
    load_causal_lm(model, trust_remote_code=True)  # the user opts in: now it runs
    assert marker.exists()


def test_model_references_stay_inside_the_cache(tmp_path: Path) -> None:
    """Hostile model references neither resolve outside the cache nor create anything there."""
    from rlaif.errors import UserError
    from rlaif.models import model_home, pull_model, resolve_model

    before = set(tmp_path.parent.iterdir())
    for ref in ("../../outside", "a/../../outside", "/etc/../outside-x", "..", "a/.."):
        try:
            path = resolve_model(ref, pull=False)
        except UserError:
            continue
        assert path.resolve().is_relative_to(model_home().resolve()) or path.is_dir()
    for name in ("../outside", "smollm2-135m/../../x"):
        try:
            pull_model(name, hub=False)
        except UserError as err:
            assert "unknown model" in str(err)
        else:
            raise AssertionError(f"pull_model({name!r}) accepted a path")
    assert set(tmp_path.parent.iterdir()) == before
