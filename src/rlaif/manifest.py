"""Manifests: what produced an artifact (config, input hashes, versions, git revision).

A stage compares the manifest of its last run with what it is about to do; ``rlaif run`` uses the
``fingerprint`` to decide whether a stage can be skipped.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from rlaif import __version__
from rlaif.store import atomic_write_json, sha256_file, sha256_text

PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "tokenizers")
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)$", re.IGNORECASE)


def package_versions() -> dict[str, str]:
    out = {"rlaif": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_revision() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def scrub(obj: Any) -> Any:
    """Mask any value whose key looks like a secret (api_key, token, ...)."""
    if isinstance(obj, dict):
        return {
            k: ("***" if _SECRET_KEY.search(str(k)) and not str(k).endswith("_env") else scrub(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def hash_inputs(inputs: dict[str, Path | str]) -> dict[str, str]:
    """sha256 of each input file (or of the text for non-path inputs)."""
    out: dict[str, str] = {}
    for name, item in inputs.items():
        p = Path(item) if item != "" and Path(item).exists() else None
        if p is not None and p.is_file():
            out[name] = sha256_file(p)
        elif p is not None and p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            out[name] = sha256_text(
                "".join(f"{f.relative_to(p)}:{f.stat().st_size}" for f in files)
            )
        else:
            out[name] = sha256_text(str(item))
    return out


def fingerprint(stage_cfg: Any, inputs: dict[str, str]) -> str:
    return sha256_text(json.dumps([stage_cfg, inputs], sort_keys=True, default=str))[:16]


def write_manifest(
    path: Path,
    *,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``path`` atomically; return the manifest written."""
    stage_cfg = scrub(config)
    manifest = {
        "stage": stage,
        "fingerprint": fingerprint(stage_cfg, inputs),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": stage_cfg,
        "inputs": inputs,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "argv": [scrub_arg(a) for a in sys.argv],
        **(extra or {}),
    }
    atomic_write_json(path, manifest)
    return manifest


def scrub_arg(arg: str) -> str:
    key, sep, _ = arg.partition("=")
    return f"{key}=***" if sep and _SECRET_KEY.search(key) else arg


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
