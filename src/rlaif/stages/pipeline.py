"""`rlaif run`: revise -> sft -> label -> reward -> ppo (-> dpo) -> evaluate, resumable.

A ledger (``run_dir/manifests/run.json``) records, per stage, a fingerprint of everything the
stage depends on: its config section, the shared settings (models, constitution, seed, backend),
the content of the input files its config names, and the fingerprint of the stage before it. On a
rerun:

- a stage marked done with the same fingerprint is skipped;
- a stage whose fingerprint changed reruns from scratch, and so does every stage after it (the
  chain carries the change); its old outputs are moved to ``run_dir/.stale/`` rather than deleted;
- a stage that was running when the run was killed is started again with the same fingerprint, and
  resumes from its own records and checkpoints.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif.config import RunConfig
from rlaif.configspec import to_dict
from rlaif.errors import UserError
from rlaif.manifest import read_manifest
from rlaif.store import atomic_write_json, ensure_dir, sha256_file, sha256_text

log = logging.getLogger(__name__)

LEDGER = "manifests/run.json"
SHARED_KEYS = ("seed", "model", "feedback_model", "constitution", "backend")
BIG_FILE = 64 << 20


@dataclass(frozen=True)
class Stage:
    name: str
    target: str
    outputs: tuple[str, ...]
    """Paths (globs) under run_dir that belong to this stage: moved aside when it reruns."""


STAGES: tuple[Stage, ...] = (
    Stage("revise", "rlaif.stages.revise:run", ("revisions.jsonl", "helpful.jsonl")),
    Stage("sft", "rlaif.stages.sft:run", ("sft",)),
    Stage(
        "label",
        "rlaif.stages.label:run",
        ("labels.jsonl", "label_*", "preferences.jsonl"),
    ),
    Stage("reward", "rlaif.stages.reward:run", ("pmp_pairs.jsonl", ".pmp_pairs*", "pmp", "pm")),
    Stage("ppo", "rlaif.stages.ppo:run", ("rl",)),
    Stage("dpo", "rlaif.stages.dpo:run", ("dpo",)),
    Stage("evaluate", "rlaif.stages.evaluate:run", ("eval", "report.md", "plots")),
)
BY_NAME = {s.name: s for s in STAGES}


def _file_digest(path: Path) -> str:
    st = path.stat()
    if st.st_size > BIG_FILE:  # multi-GB dumps: size + mtime, not a full read on every run
        return f"size:{st.st_size}:mtime:{int(st.st_mtime)}"
    return sha256_file(path)


def external_inputs(section: Any) -> dict[str, str]:
    """Digest of every existing file a config section names (prompt files, dumps, constitutions)."""
    found: dict[str, str] = {}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value and len(value) < 4096:
            p = Path(value)
            if p.is_file():
                found[value] = _file_digest(p)

    walk(section)
    return found


def fingerprints(cfg: RunConfig, names: list[str]) -> dict[str, str]:
    """Chained fingerprint per stage: a change upstream changes every one after it."""
    full = to_dict(cfg)
    shared = {k: full[k] for k in SHARED_KEYS}
    out: dict[str, str] = {}
    prev = ""
    for name in names:
        section = full.get(name, {})
        payload = {
            "shared": shared,
            "section": section,
            "files": external_inputs([shared, section]),
        }
        prev = sha256_text(json.dumps([prev, name, payload], sort_keys=True, default=str))[:16]
        out[name] = prev
    return out


def _read_ledger(run_dir: Path) -> dict[str, Any]:
    data = read_manifest(run_dir / LEDGER)
    return data if data and isinstance(data.get("stages"), dict) else {"stages": {}}


def _write_ledger(run_dir: Path, ledger: dict[str, Any]) -> None:
    atomic_write_json(run_dir / LEDGER, ledger)


def move_aside(run_dir: Path, stage: Stage) -> list[str]:
    """Move a stage's old outputs (and its checkpoints/metrics/manifest) to run_dir/.stale/."""
    patterns = [
        *stage.outputs,
        f"checkpoints/{stage.name}*",
        f"metrics/{stage.name}.jsonl",
        f"manifests/{stage.name}.json",
    ]
    moved: list[str] = []
    dest_root = run_dir / ".stale" / f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for pattern in patterns:
        for path in sorted(run_dir.glob(pattern)):
            rel = path.relative_to(run_dir)
            dest = dest_root / rel
            ensure_dir(dest.parent)
            os.replace(path, dest)
            moved.append(str(rel))
    return moved


def selected(cfg: RunConfig) -> list[str]:
    unknown = [s for s in cfg.stages if s not in BY_NAME]
    if unknown:
        raise UserError(f"stages: unknown stage '{unknown[0]}' (known: {', '.join(BY_NAME)})")
    return [s.name for s in STAGES if s.name in cfg.stages]


def _call(stage: Stage, cfg: RunConfig) -> Any:
    module, _, func = stage.target.partition(":")
    return getattr(importlib.import_module(module), func)(cfg)


def run(cfg: RunConfig) -> Path:
    """Run the selected stages in order, skipping those already done with the same inputs."""
    run_dir = ensure_dir(cfg.run_path)
    names = selected(cfg)
    fps = fingerprints(cfg, names)
    ledger = _read_ledger(run_dir)
    changed = False
    result: Path = run_dir
    t_all = time.time()
    for k, name in enumerate(names, 1):
        stage = BY_NAME[name]
        entry = ledger["stages"].get(name)
        header = f"[{k}/{len(names)}] {name}"
        if not changed and entry and entry.get("fingerprint") == fps[name]:
            if entry.get("status") == "done":
                print(f"{header}: up to date, skipped", flush=True)
                continue
            print(f"{header}: resuming an interrupted run", flush=True)
        else:
            if entry:  # config or inputs changed since it ran: start this stage afresh
                moved = move_aside(run_dir, stage)
                if moved:
                    print(f"{header}: inputs changed; old outputs moved to .stale/", flush=True)
            changed = True
            print(f"{header}: running", flush=True)
        ledger["stages"][name] = {"fingerprint": fps[name], "status": "running"}
        _write_ledger(run_dir, ledger)
        t0 = time.time()
        out = _call(stage, cfg)
        ledger["stages"][name] = {
            "fingerprint": fps[name],
            "status": "done",
            "seconds": round(time.time() - t0, 1),
            "output": str(out),
        }
        _write_ledger(run_dir, ledger)
        print(f"{header}: done in {time.time() - t0:.0f} s -> {out}", flush=True)
        result = Path(out) if out else result
    # Stages no longer selected keep their outputs; drop them from the ledger's chain.
    for name in list(ledger["stages"]):
        if name not in names:
            ledger["stages"].pop(name)
    ledger["total_seconds"] = round(time.time() - t_all, 1)
    _write_ledger(run_dir, ledger)
    report = run_dir / "report.md"
    return report if report.exists() and "evaluate" in names else result
