"""The `rlaif` command: a thin dispatcher. Heavy modules are imported only when their command runs.

Stage commands take ``rlaif <cmd> [CONFIG.yaml] [key.sub=value ...]`` and call ``module.run(cfg)``;
other commands receive their own argv.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rlaif import __version__, heap, runlock
from rlaif.errors import UserError


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    target: str
    """'module:function'. Stage commands: function(cfg) -> Path. Others: function(argv) -> int."""
    section: str | None = None
    """For stage commands: the config section whose fields `--help` lists."""


COMMANDS: list[Command] = [
    Command(
        "revise",
        "stage 1: answer red-team prompts, then critique and revise the answers",
        "rlaif.stages.revise:run",
        "revise",
    ),
    Command(
        "constitution", "show or validate a constitution (YAML/JSON)", "rlaif.constitution_cli:main"
    ),
    Command(
        "sft",
        "stage 2: fine-tune the model on its revisions (SL-CAI)",
        "rlaif.stages.sft:run",
        "sft",
    ),
    Command(
        "label",
        "stage 3: AI-feedback preference labels on pairs of the SL-CAI model's answers",
        "rlaif.stages.label:run",
        "label",
    ),
    Command(
        "eval-labeler",
        "agreement of the AI labeller with human labels: FILE [model=...] [limit=N] [key=value ...]",
        "rlaif.stages.eval_labeler:main",
    ),
    Command(
        "reward",
        "stage 4: preference model (Stack Exchange PMP, then soft labels); also pmp-data, eval",
        "rlaif.stages.reward:main",
    ),
    Command(
        "ppo", "stage 5: PPO against the preference model (RLAIF)", "rlaif.stages.ppo:run", "ppo"
    ),
    Command(
        "dpo",
        "stage 5': DPO on the AI-labelled preferences (RL-free)",
        "rlaif.stages.dpo:run",
        "dpo",
    ),
    Command(
        "evaluate",
        "stage 6: Elo for harmlessness and helpfulness across checkpoints, report.md with plots",
        "rlaif.stages.evaluate:run",
        "evaluate",
    ),
    Command(
        "run",
        "the whole pipeline: revise, sft, label, reward, ppo, dpo, evaluate (skips what is done)",
        "rlaif.stages.pipeline:run",
        "*",
    ),
    Command(
        "models", "pull or list models in the local cache ($RLAIF_HOME)", "rlaif.models_cli:main"
    ),
]


def _usage() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = [
        f"rlaif {__version__}: Constitutional AI / RLAIF, end to end",
        "",
        "usage: rlaif <command> [CONFIG.yaml] [key.sub=value ...]",
        "       rlaif <command> --help",
        "",
        "commands:",
    ]
    lines += [f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS]
    lines += ["", "options:", "  --version  print the version and exit"]
    return "\n".join(lines)


def _resolve(target: str) -> Callable[..., Any]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


def stage_help(cmd: Command) -> str:
    from rlaif.config import RunConfig
    from rlaif.configspec import describe

    rows = describe(RunConfig)
    defaults = RunConfig()
    sections = [cmd.section] if cmd.section and cmd.section != "*" else []
    if cmd.section == "*":
        sections = [f.name for f in dataclasses.fields(RunConfig) if f.name != "backend"]
        sections = [s for s in sections if dataclasses.is_dataclass(getattr(defaults, s))]
    for name in ["backend", *sections]:
        rows += describe(type(getattr(defaults, name)), prefix=f"{name}.")
    out = [
        f"usage: rlaif {cmd.name} [CONFIG.yaml] [key.sub=value ...]",
        "",
        cmd.summary,
        "",
        "config keys (set in the YAML file or as key=value; defaults shown):",
    ]
    for key, tp, default, doc in rows:
        out.append(f"  {key} ({tp}, default {default})")
        if doc:
            out.append(f"      {doc}")
    return "\n".join(out)


def split_stage_args(name: str, argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split stage argv into (config path or None, overrides)."""
    config: str | None = None
    overrides: list[str] = []
    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        elif arg.startswith("-"):
            raise UserError(f"rlaif {name}: unknown option '{arg}' (see rlaif {name} --help)")
        elif config is None:
            config = arg
        else:
            raise UserError(
                f"rlaif {name}: unexpected argument '{arg}' (one CONFIG.yaml, then key=value pairs)"
            )
    return config, overrides


def run_stage(cmd: Command, argv: Sequence[str]) -> int:
    from rlaif.config import load_config

    config, overrides = split_stage_args(cmd.name, argv)
    cfg = load_config(config, overrides)
    heap.configure(cfg.backend.heap)
    with runlock.hold(cfg.run_path, f"rlaif {cmd.name}"):
        out = _resolve(cmd.target)(cfg)
    if out is not None:
        print(f"rlaif {cmd.name}: done -> {out}")
    return 0


def _setup_logging() -> None:
    """Logging from ``RLAIF_LOG``; a bad ``RLAIF_LOG`` or ``RLAIF_PROGRESS_S`` is a user error
    here, before any work, not a traceback or a silent default later."""
    from rlaif.progress import log_interval

    raw = os.environ.get("RLAIF_LOG", "INFO")
    level = raw.strip().upper()
    if not isinstance(logging.getLevelName(level), int):
        raise UserError(f"RLAIF_LOG={raw!r}: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    log_interval()
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"rlaif {__version__}")
        return 0
    by_name = {c.name: c for c in COMMANDS}
    cmd = by_name.get(args[0])
    if cmd is None:
        import difflib

        close = difflib.get_close_matches(args[0], list(by_name), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"rlaif: error: unknown command '{args[0]}'{hint}; see rlaif --help", file=sys.stderr)
        return 2
    rest = args[1:]
    if cmd.section is not None and any(a in ("-h", "--help") for a in rest):
        print(stage_help(cmd))
        return 0
    from rlaif import distributed

    if distributed.launched():
        distributed.follow_launcher()
    try:
        _setup_logging()
        if cmd.section is not None:
            return run_stage(cmd, rest)
        return int(_resolve(cmd.target)(rest) or 0)
    except UserError as exc:
        print(f"rlaif {cmd.name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"rlaif {cmd.name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if distributed.launched():
            distributed.close()


if __name__ == "__main__":
    raise SystemExit(main())
