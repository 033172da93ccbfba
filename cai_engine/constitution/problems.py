"""Problems found in a constitution or policy file, each with its file, line and JSON path, and "did you mean"
suggestions for misspelt names.

Validation collects every problem it can find before it reports, so that one run of ``cai constitutions validate``
or ``cai policy validate`` lists them all (``file:line: field.path: message``, as compilers do), and the exceptions
the Python API raises carry the same list in ``problems``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cai_engine.errors import ConfigError, ConstitutionError, UnknownComponentError

LineMap = Mapping[tuple[Any, ...], int]


def json_path(loc: Sequence[Any]) -> str:
    """Render a pydantic/JSON location as ``principles[3].critique_request``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def line_of(loc: Sequence[Any], lines: LineMap | None) -> int | None:
    """The line of ``loc`` in a file, or of the nearest enclosing node the file has (a missing key is reported at
    the mapping that should hold it)."""
    if not lines:
        return None
    probe = tuple(loc)
    while probe and probe not in lines:
        probe = probe[:-1]
    return lines.get(probe)


SUGGEST_LIMIT = 1_000  # past this many names, no suggestion: each one compares the word with every name


def suggest(word: str, known: Iterable[str], *, n: int = 1) -> list[str]:
    """The known names most like ``word``, best first (difflib's similarity ratio of at least 0.7); none when
    there are more than ``SUGGEST_LIMIT`` names, so that a file with thousands of typos stays linear to check."""
    names = sorted(set(known))
    if len(names) > SUGGEST_LIMIT:
        return []
    return difflib.get_close_matches(word, names, n=n, cutoff=0.7)


def did_you_mean(word: str, known: Iterable[str], *, listing: str | None = None, n: int = 1) -> str:
    """``; did you mean 'x'?`` (with ``n`` > 1, up to n names: ``'x' or 'y'``) for a misspelt name; otherwise, with
    ``listing``, the known names under that label (``; known checks: a, b``); empty when there is nothing to say."""
    known = sorted(set(known))
    close = suggest(word, known, n=n)
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    if listing is not None and len(known) <= SUGGEST_LIMIT:
        return f"; {listing}: {', '.join(known) if known else '(none)'}"
    return ""


@dataclass(frozen=True)
class Problem:
    """One problem in a file: where it is (file, line, JSON path) and what to do about it."""

    message: str
    source: str | None = None
    path: str = ""
    line: int | None = None
    level: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        head = (self.source or "") + (f":{self.line}" if self.line is not None else "")
        message = self.message if self.level == "error" else f"{self.level}: {self.message}"
        return ": ".join(part for part in (head, self.path, message) if part)


class _Problems:
    problems: list[Problem]

    @staticmethod
    def _text(problems: Sequence[Problem]) -> str:
        if len(problems) == 1:
            return str(problems[0])
        return f"{len(problems)} problems: " + "; ".join(str(p) for p in problems)


class ConstitutionProblems(_Problems, ConstitutionError):
    """A constitution has one or more problems; ``problems`` lists them all, in file order where known."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        if not problems:
            raise ValueError("ConstitutionProblems needs at least one problem")
        self.problems = list(problems)
        first = self.problems[0]
        super().__init__(first.message, source=first.source, where=first.path or None)
        self.args = (self._text(self.problems),)

    def __str__(self) -> str:
        return str(self.args[0])


class PolicyProblems(_Problems, ConfigError):
    """A policy has one or more problems; ``problems`` lists them all."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        if not problems:
            raise ValueError("PolicyProblems needs at least one problem")
        self.problems = list(problems)
        super().__init__(self._text(self.problems))


def problems_of(exc: BaseException) -> list[Problem]:
    """The problems an error carries, or the error as one problem (an unreadable file, a YAML syntax error)."""
    found = getattr(exc, "problems", None)
    if isinstance(found, list) and found:
        return list(found)
    if isinstance(exc, ConstitutionError):
        return [Problem(exc.detail, source=exc.source, path=exc.where or "")]
    return [Problem(str(exc))]


def sort_problems(problems: Iterable[Problem]) -> list[Problem]:
    """In file order: files in the order they first come up, then by line (problems without one first)."""
    listed = list(problems)
    files: dict[str | None, int] = {}
    for problem in listed:
        files.setdefault(problem.source, len(files))
    order = {id(p): i for i, p in enumerate(listed)}
    return sorted(listed, key=lambda p: (files[p.source], p.line or 0, order[id(p)]))


class UnknownNameError(UnknownComponentError):
    """:class:`UnknownComponentError` that also says which known names are most like the one asked for
    (``unknown constitution 'medicl'; known constitutions: ...; did you mean 'medical'?``)."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        super().__init__(kind, name, known)
        self.suggestions = suggest(name, self.known, n=1)
        if self.suggestions:
            self.args = (f"{self.args[0]}; did you mean {' or '.join(repr(s) for s in self.suggestions)}?",)
