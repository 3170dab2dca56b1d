"""Write docs/configuration.md, the reference of every config key, from the dataclasses in diffalign/config.py.

    python scripts/gen_config_docs.py            # rewrite docs/configuration.md
    python scripts/gen_config_docs.py --check    # exit 1 when the committed file is out of date

Each section of :class:`diffalign.config.Config` becomes a table: the dotted key, its type (the annotation as written),
its default (as YAML would spell it) and what it means — the field's comments in the source (the lines right above
it and the one on its line), or the class docstring for the section. A reference to a ``.md`` file that is not in
the repository is left out, since a reader cannot open it. ``tests/test_config_docs.py`` fails when the committed
file differs from what this script writes.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "configuration.md"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_DIVIDER = re.compile(r"^--\s*(.*?)\s*-*$")  # "# -- title -----" starts a group of keys
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj):`~?([^`]+)`")  # Sphinx roles → plain `name`
_MD_REF = re.compile(r"(?<![\w/.-])([\w./-]+\.md)((?:\s+(?:§|section)\s*[\d.–-]+)?)")


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    """One documented key: its name, annotation, default (YAML spelling), comment text and group title."""

    name: str
    type: str
    default: str
    text: str
    group: str = ""


# ------------------------------------------------------------------------------------------------ reading source


def _comments(source: str) -> dict[int, str]:
    """Comment text by 1-based line of ``source`` (without the ``#``)."""
    found: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string[1:].strip()
    return found


def _class_node(cls: type) -> tuple[ast.ClassDef, list[str]]:
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    node = ast.parse(source).body[0]
    if not isinstance(node, ast.ClassDef):
        raise TypeError(f"{cls.__qualname__}: source does not start with a class definition")
    return node, source.splitlines()


def _leading_comments(lines: list[str], comments: dict[int, str], lineno: int) -> list[str]:
    """The comment-only lines directly above line ``lineno`` (1-based), top to bottom."""
    block: list[str] = []
    line = lineno - 1
    while line >= 1 and lines[line - 1].strip().startswith("#"):
        block.append(comments.get(line, ""))
        line -= 1
    return block[::-1]


def _own_source(cls: type) -> bool:
    """Whether ``cls`` has a class statement of its own (a section composed with ``make_dataclass`` has none)."""
    try:
        _class_node(cls)
    except (OSError, TypeError):
        return False
    return True


def _parts(cls: type) -> list[type]:
    """The dataclasses whose class statements define the fields of ``cls``: itself, or for a composed section the
    settings classes it was made of, base classes first."""
    if _own_source(cls):
        return [cls]
    return [c for c in reversed(cls.__mro__) if dataclasses.is_dataclass(c) and c is not cls and _own_source(c)]


def class_docstring(cls: type) -> str:
    """The class's own docstring (dataclasses invent one from the signature when there is none); a composed
    section's is its own ``__doc__``."""
    if not _own_source(cls):
        return cls.__doc__ or ""
    node, _ = _class_node(cls)
    return ast.get_docstring(node) or ""


def _type_text(annotation: str, hint: Any) -> str:
    """The annotation as written, or for a ``Literal`` alias its values (``"a" | "b"``)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if not any(typing.get_origin(a) is typing.Literal for a in args):
        return annotation
    texts = [
        " | ".join(f'"{v}"' for v in typing.get_args(a)) if typing.get_origin(a) is typing.Literal else "None"
        for a in args
    ]
    return " | ".join(texts)


def field_docs(cls: type) -> list[FieldDoc]:
    """Every field of dataclass ``cls`` in definition order, with its comments from the source; the fields of a
    composed section are grouped by the settings class that defines them (its docstring's first sentence)."""
    parts = _parts(cls)
    if len(parts) == 1:
        return _own_field_docs(parts[0], cls)
    docs: dict[str, FieldDoc] = {}
    for part in parts:
        title = class_docstring(part).split("\n\n")[0].replace("\n", " ").strip().rstrip(".")
        for fd in _own_field_docs(part, cls):
            docs[fd.name] = dataclasses.replace(fd, group=title)
    return [docs[f.name] for f in dataclasses.fields(cls)]


def _own_field_docs(part: type, cls: type) -> list[FieldDoc]:
    """The fields that the class statement of ``part`` defines, with defaults and types as ``cls`` has them."""
    node, lines = _class_node(part)
    hints = typing.get_type_hints(cls)
    cls_fields = {f.name: f for f in dataclasses.fields(cls)}
    comments = _comments("\n".join(lines) + "\n")
    defaults = {name: _default(f) for name, f in cls_fields.items()}
    docs: list[FieldDoc] = []
    group = ""
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        above: list[str] = []
        for text in _leading_comments(lines, comments, stmt.lineno):
            title = _DIVIDER.match(text)
            if title:
                group, above = title.group(1).rstrip(" -;,"), []
            else:
                above.append(text)
        inline = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
        annotation = _type_text(ast.get_source_segment("\n".join(lines), stmt.annotation) or "", hints[name])
        docs.append(FieldDoc(name, annotation, defaults[name], " ".join(above + inline), group))
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return yaml_value(value)


def yaml_value(value: Any) -> str:
    """``value`` as a config file spells it: ``null``, ``true``, ``"text"``, ``1.0e-05``, ``[a, b]``, ``{}``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float):
        text = repr(value)
        return text.replace("e-0", "e-").replace("e+0", "e+") if "e" in text else text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


# ----------------------------------------------------------------------------------------------------- rendering


def clean_text(text: str, repo: Path = REPO) -> str:
    """Markdown of a comment or docstring: ``x`` → `x`, references to .md files the repository lacks left out."""

    def keep_existing(match: re.Match[str]) -> str:
        return match.group(0) if (repo / match.group(1)).is_file() else "\0"

    text = _ROLE.sub(r"`\1`", text.replace("``", "`"))
    text = _MD_REF.sub(keep_existing, text)
    if "\0" in text:  # tidy the punctuation around each removed reference
        text = re.sub(r"\s*\(\s*[;,]?\s*\0\s*\)", "", text)
        text = re.sub(r"\(\s*\0\s*[;,]\s*", "(", text)
        text = re.sub(r"\s*[;,]\s*\0\s*\)", ")", text)
        text = re.sub(r"\s*[;,]?\s*\0", "", text)
    return re.sub(r"(?<=\S)[ \t]{2,}", " ", text).rstrip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _docstring_markdown(doc: str) -> str:
    """A reST-flavoured docstring as markdown: ``::`` blocks become fenced code, the rest is cleaned text."""
    out: list[str] = []
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            out.append(clean_text(line.rstrip()[:-1]) if line.strip() != "::" else "")
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:])
                i += 1
            out += ["", "```python", *"\n".join(block).strip("\n").splitlines(), "```", ""]
            continue
        out.append(clean_text(line))
        i += 1
    return "\n".join(out).strip()


def section_markdown(section: str, cls: type) -> str:
    """One ``## section`` with its docstring and the table of its keys."""
    parts = [f"## `{section}`", ""]
    doc = class_docstring(cls)
    if doc:
        parts += [clean_text(" ".join(doc.split())), ""]
    parts += ["| key | type | default | meaning |", "|---|---|---|---|"]
    group = ""
    for fd in field_docs(cls):
        if fd.group != group:
            group = fd.group
            parts.append(f"| **{_cell(clean_text(group))}** | | | |")
        text, rule = clean_text(fd.text), _rule(cls, fd.name)
        if rule:
            text = f"{text}{'' if not text or text.endswith('.') else '.'} {rule}".strip()
        parts.append(f"| `{section}.{fd.name}` | `{_cell(fd.type)}` | `{_cell(fd.default)}` | {_cell(text)} |")
    return "\n".join(parts)


def _rule(cls: type, name: str) -> str:
    """``Must be >= 1.`` for a field declared with bounds (:func:`diffalign.config_fields.setting`)."""
    from diffalign.config_fields import LIMIT

    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    limit = field.metadata.get(LIMIT)
    if limit is None:
        return ""
    optional = type(None) in typing.get_args(typing.get_type_hints(cls)[name])
    return f"Must be {limit.requirement(optional)}."


def render(config_module: Any = None) -> str:
    """The whole of docs/configuration.md for the ``Config`` dataclass of ``config_module`` (default: diffalign's)."""
    if config_module is None:
        from diffalign import config as config_module
    sections = typing.get_type_hints(config_module.Config)
    intro = _docstring_markdown(inspect.getdoc(config_module) or "")
    toc = " · ".join(f"[`{name}`](#{name})" for name in sections)
    parts = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_config_docs.py from diffalign/config.py and diffalign/methods/: "
        "edit the dataclasses and rerun it. -->",
        "",
        "Every key a config file or a `dotted.key=value` override can set, with its type and default. "
        "`python scripts/train.py --config FILE --print-config` prints the resolved values of a run; "
        "error messages and accepted spellings: [cli.md](cli.md).",
        "",
        intro,
        "",
        f"Sections: {toc}",
    ]
    for name, cls in sections.items():
        parts += ["", section_markdown(name, cls)]
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/configuration.md from diffalign/config.py.")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write (default: docs/configuration.md)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
        if current != text:
            print(f"error: {args.output} is out of date; run `python scripts/gen_config_docs.py`", file=sys.stderr)
            return 1
        print(f"{args.output}: up to date")
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
