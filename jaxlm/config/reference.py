"""The config reference, docs/config.md, generated from the dataclasses and the comments on their
fields, so that it cannot drift from the schema (a test compares the two).

    python -m jaxlm.config.reference > docs/config.md
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import typing

from jaxlm.config import load
from jaxlm.config.model import PRESET_NAMES
from jaxlm.config.schema import type_name

INTRO = """# Config reference

Every key of a jaxlm config: its type, default and meaning. A YAML file sets some of them
(`model: {preset: tiny, n_layers: 4}`), `key.sub=value` arguments override them on the command
line, and `model.preset` ({presets}) picks a named size whose fields the other `model.*` keys then
override. Relative paths are relative to the working directory. A bad key, type or value stops
with one line naming it.

Generated from `jaxlm/config/*.py` by `python -m jaxlm.config.reference > docs/config.md`; a test
fails when the two differ.
"""


def field_notes(cls) -> dict[str, str]:
    """field name -> its comments: the comment lines right above the field, then the one after it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    notes = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        above, line = [], node.lineno - 1
        while line in comments and line not in code_lines:
            above.insert(0, comments[line])
            line -= 1
        after = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        notes[node.target.id] = " ".join(above + after)
    return notes


def _default(f: dataclasses.Field):
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(value):
        return "(section)"
    if isinstance(value, str):
        return json.dumps(value)
    return json.dumps(value, default=list).replace('"', "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _doc(cls) -> str:
    """A section's description: its class docstring (not the one dataclasses makes up), else the
    first line of its module's."""
    doc = cls.__doc__ or ""
    if not doc or doc.startswith(f"{cls.__name__}("):
        doc = (inspect.getdoc(inspect.getmodule(cls)) or "").split("\n")[0]
    return " ".join(doc.split())


def _element(typ):
    """The dataclass of a tuple[SomeConfig, ...] field, else None."""
    args = typing.get_args(typ)
    return args[0] if typing.get_origin(typ) is tuple and args and dataclasses.is_dataclass(args[0]) else None


def _table(prefix: str, cls) -> list[str]:
    hints, notes = typing.get_type_hints(cls), field_notes(cls)
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    nested = []
    for f in dataclasses.fields(cls):
        key, typ = f"{prefix}.{f.name}", hints[f.name]
        note = notes.get(f.name, "")
        if key in load.CHOICES:
            note = f"{note} (allowed: {', '.join(load.CHOICES[key])})".strip()
        element = _element(typ)
        if element is not None:
            nested.append((f"{key}[]", element))
            note = f"{note} A list; each item's keys: `{key}[]` below.".strip()
        rows.append(f"| `{key}` | {_cell(type_name(typ))} | `{_cell(_default(f))}` | {_cell(note)} |")
    out = rows
    for name, element in nested:
        out += ["", f"`{name}`: {_doc(element)}".rstrip(), ""] + _table(name, element)
    return out


def markdown() -> str:
    """docs/config.md: one table per section of `Config`, in the order of its fields."""
    lines = [INTRO.replace("{presets}", ", ".join(PRESET_NAMES))]
    for section in dataclasses.fields(load.Config):
        cls = section.type if isinstance(section.type, type) else typing.get_type_hints(load.Config)[section.name]
        lines += [f"## {section.name}", "", _doc(cls), ""]
        lines += _table(section.name, cls) + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
