"""`rlaif models pull [NAME]` and `rlaif models list`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rlaif import models
from rlaif.errors import UserError


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _quant_note(info: dict[str, Any]) -> str:
    quant = info.get("quantisation")
    if not quant:
        return "original weights"
    return str(quant.get("summary", "quantized"))


def cached_models() -> list[tuple[Path, dict[str, Any]]]:
    """Complete models in the cache (aliases, then hub snapshots) with their info records."""
    found = []
    for root in (models.models_dir(), models.model_home() / "hub"):
        if root.is_dir():
            for p in sorted(root.iterdir()):
                if p.is_dir() and not p.name.startswith(".") and models.is_complete(p):
                    found.append(
                        (p, json.loads((p / models.INFO_FILE).read_text(encoding="utf-8")))
                    )
    return found


def list_lines() -> list[str]:
    rows = [
        (
            str(info.get("name", path.name)),
            human_size(models.dir_size(path)),
            str(info.get("source", "?")),
            _quant_note(info),
        )
        for path, info in cached_models()
    ]
    if not rows:
        return [f"no models in {models.model_home()} (run `rlaif models pull`)"]
    header = ("NAME", "SIZE", "SOURCE", "WEIGHTS")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [f"models in {models.model_home()}:"]
    for r in [header, *rows]:
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        )
    aliases = [a for a in models.ALIASES if not models.is_complete(models.models_dir() / a)]
    if aliases:
        lines.append(f"available to pull: {', '.join(aliases)}")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rlaif models", description="Pull or list models in the local cache ($RLAIF_HOME)."
    )
    sub = parser.add_subparsers(dest="action", metavar="{pull,list}")
    pull = sub.add_parser("pull", help="make a model available offline")
    pull.add_argument(
        "name",
        nargs="?",
        default=models.DEFAULT_ALIAS,
        help=f"alias ({', '.join(models.ALIASES)}) or hub id; default {models.DEFAULT_ALIAS}",
    )
    pull.add_argument("--no-hub", action="store_true", help="skip the Hugging Face hub")
    sub.add_parser("list", help="show cached models with sizes, source and quantisation")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.action == "list":
        print("\n".join(list_lines()))
        return 0
    if args.action == "pull":
        if args.name in models.ALIASES:
            path = models.pull_model(args.name, hub=not args.no_hub)
        elif "/" in args.name:
            path = models.resolve_model(args.name)
        else:
            raise models.unknown_alias(args.name)
        print(f"{args.name}: {path} ({human_size(models.dir_size(path))})")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    import sys

    try:
        raise SystemExit(main(sys.argv[1:]))
    except UserError as exc:
        print(f"rlaif models: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
