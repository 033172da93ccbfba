"""The error hierarchy.

Every error a user can cause by what they pass in (files, options, names) is a :class:`CaiError`; the CLI prints
``str(error)`` as one line with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class CaiError(Exception):
    """Base class for errors caused by input; the CLI shows only the message."""


class ConfigError(CaiError):
    """A run config, policy or component options are invalid."""


class ConstitutionError(CaiError):
    """A constitution file or mapping is invalid.

    :param source: the file (or a description of where the data came from).
    :param where: a JSON path (``principles[3].critique_request``) and, for files, a line.
    """

    def __init__(self, message: str, *, source: str | None = None, where: str | None = None) -> None:
        self.source = source
        self.where = where
        self.detail = message
        prefix = ": ".join(p for p in (source, where) if p)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class PluginError(CaiError):
    """A plugin misbehaved; the message names the plugin."""

    def __init__(self, message: str, *, plugin: str | None = None) -> None:
        self.plugin = plugin
        super().__init__(f"plugin {plugin!r}: {message}" if plugin else message)


class DuplicateComponentError(PluginError):
    """Two plugins registered the same name for the same kind of component."""


class UnknownComponentError(CaiError, KeyError):
    """A name was looked up that nobody registered; the message lists the known names."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        listed = ", ".join(self.known) if self.known else "(none registered)"
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {listed}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class ModelError(CaiError):
    """A model could not be loaded or run (missing path, corrupt file, prompt too long, server down)."""


class PromptTooLongError(ModelError):
    """A prompt does not fit the model's context; runs skip that item and record why."""


class BackendUnavailableError(ModelError):
    """A backend cannot do what was asked (for example a server that returns no log-probs)."""


class RunError(CaiError):
    """A run directory cannot be used as asked (different config, corrupt records)."""


def describe_validation(
    exc: Any, *, empty: str = "(input)", first_only: bool = False, unknown: str = "unknown key; check its spelling"
) -> str:
    """A pydantic ``ValidationError`` as one line, ``loc: message; loc: message`` (an unknown key says so)."""
    parts = []
    for error in exc.errors()[:1] if first_only else exc.errors():
        loc = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-")) or empty
        if error["type"] == "extra_forbidden":
            message = unknown
        elif error["type"] == "missing":
            message = "required but missing"
        else:
            message = error["msg"]
        parts.append(f"{loc}: {message}")
    return "; ".join(parts)
