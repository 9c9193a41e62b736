"""Typed config machinery: YAML + ``key.sub=value`` overrides checked against dataclasses.

The dataclasses themselves live in :mod:`rlaif.config`. Field documentation is written as an
attribute docstring (a string literal right under the field) and read back with :func:`field_docs`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from rlaif.errors import UserError

T = TypeVar("T")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass ``cls`` to its attribute docstring ('' where none)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        stmts = body.body
        for stmt, nxt in zip(stmts, [*stmts[1:], None], strict=True):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    """A readable name for a type annotation, as shown in errors and ``--help``."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def coerce(value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp`` and convert where lossless; raise _Mismatch."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if isinstance(value, str) and args and args[0] is str:
            value = [value]
        if not isinstance(value, list | tuple):
            raise _Mismatch
        items = [coerce(v, args[0]) if args else v for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise _Mismatch
    raise _Mismatch


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def build(cls: type[T], data: Mapping[str, Any], *, where: str = "", prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a nested mapping, checking every key and type."""
    if not isinstance(data, Mapping):
        raise UserError(f"{where}{prefix.rstrip('.') or 'config'}: expected a mapping")
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            options = [f"{prefix}{n}" for n in names]
            raise UserError(f"{where}unknown key '{full}'{_suggest(full, options)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value or {}, where=where, prefix=f"{full}.")  # type: ignore[arg-type]
            continue
        try:
            kwargs[key] = coerce(value, tp)
        except _Mismatch:
            raise UserError(
                f"{where}'{full}' must be {type_name(tp)}, got {value!r} ({type(value).__name__})"
            ) from None
    try:
        obj = cls(**kwargs)
    except ValueError as exc:  # __post_init__ range checks
        raise UserError(f"{where}{exc}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML scalar/list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{text}': expected key=value (e.g. revise.limit=8)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def merge_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def key_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line in a YAML text, for error messages."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    dotted = f"{prefix}{k.value}"
                    lines[dotted] = k.start_mark.line + 1
                    walk(v, dotted + ".")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def load_yaml_mapping(path: Path) -> tuple[dict[str, Any], str]:
    """Read a YAML file that must hold a mapping; one-line errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Where the broken construct starts (an unclosed bracket, a key missing its colon) is
        # more useful than where the parser gave up, which can be the end of the file.
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{path}{line}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top, got {type(data).__name__}")
    return data, text


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) rows for ``--help``, nested sections flattened."""
    rows: list[tuple[str, str, str, str]] = []
    docs = field_docs(cls)
    hints = _type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            continue
        default = getattr(defaults, f.name)
        rows.append((f"{prefix}{f.name}", type_name(tp), repr(to_dict(default)), docs[f.name]))
    return rows


def reference_markdown(root: type) -> str:
    """The config reference as Markdown: one table per section, generated from the dataclasses."""
    out = [
        "# Config reference",
        "",
        "Generated from `rlaif.config` (`python -m rlaif.config`).",
        "",
    ]
    defaults = root()
    sections: list[tuple[str, type]] = [("", root)]
    for f in dataclasses.fields(root):  # type: ignore[arg-type]
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, type(value)))
    for name, cls in sections:
        title = f"`{name}`" if name else "top level"
        doc = " ".join((cls.__doc__ or "").split())
        out += [
            f"## {title}",
            "",
            doc,
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for key, tp, default, text in describe(cls, prefix=f"{name}." if name else ""):
            cell = default.replace("|", "\\|")
            out.append(f"| `{key}` | {tp.replace('|', 'or')} | `{cell}` | {text} |")
        out.append("")
    return "\n".join(out)
