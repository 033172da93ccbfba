"""MkDocs hooks (``hooks:`` in mkdocs.yml): reference tables generated from the code while the site builds.

Two markers, each alone on a line of a page, are replaced before the page is rendered:

``<!-- cai-commands -->``
    a table of the top-level ``cai`` commands, each linked to its page in ``reference/cli/``.
``<!-- fields: cai_engine.pipeline.PipelineConfig -->``
    (indented as far as needed, e.g. inside a content tab) a table of the pydantic model's fields (name, type, default, description), followed by one table per model
    nested in it. An optional heading level for the nested tables follows the name (``... PipelineConfig 3``).

A marker naming something that does not exist stops the build.

click's marker for "no default" (``Sentinel.UNSET``), which mkdocs-click prints in its option tables, shows as an
empty cell.

Files of the repository root included with snippets (``--8<-- "CHANGELOG.md"``) link to pages as ``docs/x.md``;
such links are rewritten relative to the including page, after the include and before MkDocs checks the links.
"""

from __future__ import annotations

import enum
import importlib
import json
import posixpath
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from markdown import Extension, Markdown
from markdown.preprocessors import Preprocessor
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

TOOLS = Path(__file__).resolve().parent
PROJECT = TOOLS.parent
COMMANDS = re.compile(r"^<!-- cai-commands -->$", re.MULTILINE)
FIELDS = re.compile(r"^([ \t]*)<!-- fields: ([\w.]+)(?: (\d))? -->$", re.MULTILINE)
DOCS_LINK = re.compile(r"\]\(docs/([^)\s]*)\)")
_page_folder = ""  # the folder of the page being rendered, inside docs/


class AfterIncludes(Preprocessor):
    """What snippets and mkdocs-click wrote, mended: ``](docs/x.md)`` from an included repository file as a link
    from the page being rendered, and no ``Sentinel.UNSET`` default."""

    def run(self, lines: list[str]) -> list[str]:
        def relative(match: re.Match[str]) -> str:
            return f"]({posixpath.relpath(match.group(1), _page_folder or '.')})"

        return [DOCS_LINK.sub(relative, line).replace("| `Sentinel.UNSET` |", "| |") for line in lines]


class AfterIncludesExtension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:
        md.preprocessors.register(AfterIncludes(md), "cai_after_includes", 1)  # after snippets (32), mkdocs-click


def on_config(config: Any) -> Any:
    for path in (str(PROJECT), str(TOOLS)):  # this checkout's cai_engine, and cli_docs for mkdocs-click
        if path not in sys.path:
            sys.path.insert(0, path)
    config.markdown_extensions.append(AfterIncludesExtension())
    return config


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    global _page_folder
    _page_folder = posixpath.dirname(page.file.src_uri)
    markdown = COMMANDS.sub(lambda _: commands_table(), markdown)
    return FIELDS.sub(fields_marker, markdown)


def fields_marker(match: re.Match[str]) -> str:
    indent, dotted, level = match.groups()
    tables = fields_tables(load_model(dotted), int(level or 3))
    return "\n".join(indent + line if line else line for line in tables.splitlines())


def commands_table() -> str:
    import cli_docs

    rows = ["| Command | What it does |", "| --- | --- |"]
    for name, command in cli_docs.top_level().items():
        rows.append(f"| [`cai {name}`]({name}.md) | {cell(command.get_short_help_str(limit=200))} |")
    return "\n".join(rows)


def load_model(dotted: str) -> type[BaseModel]:
    """A model by dotted path; a nested class too (``cai_engine.default_plugins.trainers.SFT.Options``)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            model: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            model = getattr(model, name, None)
        break
    else:
        model = None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ValueError(f"<!-- fields: {dotted} -->: not a pydantic model")
    return model


def fields_tables(root: type[BaseModel], level: int) -> str:
    """The root model's table, then each nested model's under a heading of its own, each model once."""
    seen: list[type[BaseModel]] = [root]
    parts: list[str] = []
    index = 0
    while index < len(seen):
        model = seen[index]
        if index:
            parts.append(f"{'#' * level} `{model.__name__}`")
            doc = (model.__doc__ or "").strip()
            if doc and model.__doc__ != BaseModel.__doc__:
                parts.append(" ".join(doc.split("\n\n")[0].split()))
        parts.append(table(model, seen))
        index += 1
    return "\n\n".join(parts)


def table(model: type[BaseModel], seen: list[type[BaseModel]]) -> str:
    rows = ["| Field | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        for nested in models_in(field.annotation):
            if nested not in seen:
                seen.append(nested)
        key = field.alias or name
        rows.append(
            f"| `{key}` | {cell(type_name(field.annotation))} | {cell(default(field))} | {cell(field.description or '')} |"
        )
    return "\n".join(rows)


def models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in models_in(arg)]


def type_name(annotation: Any) -> str:
    """A type as a YAML author reads it: ``list[str]``, ``'a' | 'b'``, ``SLConfig`` (a link to its table)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(json.dumps(member.value) for member in annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"  # the heading `fields_tables` gives it
    return getattr(annotation, "__name__", str(annotation))


def default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return ""
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
        if not value:
            return "its defaults"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{json.dumps(value, default=str)}`"


def cell(text: str) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")
