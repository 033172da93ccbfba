"""A griffe extension (mkdocs.yml, mkdocstrings ``extensions:``) that reads the reStructuredText bits of our
docstrings the way Sphinx would, so that the API and hooks pages show them as Markdown:

- ``:class:`cai_engine.Backend``` and the other roles become inline code (``~a.b.C`` shows as ``C``);
- ``.. versionadded:: 0.1`` (also ``versionchanged``, ``deprecated``) becomes a line "*Added in version 0.1.*"
  at the end of the description, before the ``:param:`` fields it would otherwise be read as part of;
- a paragraph ending in ``::`` (a literal block follows) ends in ``:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`~?([^`]+)`")
VERSION = re.compile(r"^\s*\.\. (versionadded|versionchanged|deprecated):: *(\S+)(.*)$")
FIELD = re.compile(r"^:(param|parameter|arg|type|raises|raise|returns|return|rtype|var|ivar|cvar)\b")
WORDS = {"versionadded": "Added in version", "versionchanged": "Changed in version", "deprecated": "Deprecated since"}


def role(match: re.Match[str]) -> str:
    target = match.group(1)
    if match.group(0).startswith((":class:`~", ":func:`~", ":meth:`~", ":attr:`~", ":mod:`~", ":exc:`~")):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def convert(text: str) -> str:
    lines = ROLE.sub(role, text).splitlines()
    notes: list[str] = []
    kept: list[str] = []
    for line in lines:
        version = VERSION.match(line)
        if version:
            kind, number, rest = version.groups()
            notes.append(f"*{WORDS[kind]} {number}.{' ' + rest.strip() if rest.strip() else ''}*")
        else:
            kept.append(line)
    for index, line in enumerate(kept):
        if line.rstrip().endswith("::") and index + 1 < len(kept) and not kept[index + 1].strip():
            kept[index] = line.rstrip()[:-1] if line.strip() != "::" else ""
    if notes:
        first_field = next((i for i, line in enumerate(kept) if FIELD.match(line)), len(kept))
        while first_field > 0 and not kept[first_field - 1].strip():
            first_field -= 1
        kept[first_field:first_field] = ["", *notes]
    return "\n".join(kept).strip() + "\n"


class RstToMarkdown(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
