"""``rlaif constitution show [REF] [--yaml]`` and ``rlaif constitution validate FILE``."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from rlaif.constitution import Constitution, load_constitution
from rlaif.errors import UserError

USAGE = """usage: rlaif constitution show [REF] [--yaml]
       rlaif constitution validate FILE [FILE ...]

REF is 'default' (the bundled constitution), 'paper' (the CAI paper's released prompts) or a
YAML/JSON file. 'show --yaml' prints it in the YAML format, ready to copy and edit."""


def describe(c: Constitution) -> str:
    """A readable listing of a constitution."""
    lines = [
        f"constitution: {c.name}",
        f"source: {c.source}",
        f"sha256: {c.sha256}",
        f"principles: {len(c.principles)}; few-shot examples: {len(c.few_shot)}",
    ]
    if c.notes:
        lines.append(f"notes: {c.notes}")
    wrap = textwrap.TextWrapper(width=100, initial_indent="    ", subsequent_indent="    ")
    for p in c.principles:
        lines += ["", f"[{p.id}]"]
        for label, text in (("critique", p.critique), ("revision", p.revision)):
            lines += [f"  {label}:", wrap.fill(text)]
        lines += ["  feedback:", wrap.fill(p.feedback)]
    for i, shot in enumerate(c.few_shot):
        first = shot.messages[0]["content"]
        lines += ["", f"few-shot {i}: {first[:90]}{'...' if len(first) > 90 else ''}"]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd == "show":
        as_yaml = "--yaml" in rest
        refs = [a for a in rest if a != "--yaml"]
        if len(refs) > 1 or any(r.startswith("-") for r in refs):
            raise UserError(f"constitution show: unexpected arguments {' '.join(refs)}\n{USAGE}")
        c = load_constitution(refs[0] if refs else "default")
        if as_yaml:
            import yaml

            print(yaml.safe_dump(c.to_dict(), sort_keys=False, allow_unicode=True, width=100))
        else:
            print(describe(c))
        return 0
    if cmd == "validate":
        if not rest:
            raise UserError("constitution validate: name at least one FILE")
        for ref in rest:
            c = load_constitution(ref)
            print(
                f"{ref}: ok ({len(c.principles)} principles, {len(c.few_shot)} few-shot examples,"
                f" sha256 {c.sha256[:16]})"
            )
        return 0
    raise UserError(f"constitution: unknown subcommand '{cmd}' (show or validate)")
