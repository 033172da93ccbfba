"""The process's default runtime, for library calls made without one.

``models.runtime`` installs ``Runtime.default`` here when it is imported, which is always the case once anything
in ``cai_engine`` is (the package's public API imports it). Lower layers (components, prompt sets, the catalogue)
reach the shared runtime through :func:`default_runtime` instead of importing the layer above them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_factory: Callable[[], Any] | None = None


def install_default_runtime(factory: Callable[[], Any]) -> None:
    """Name the callable that returns the process's shared runtime (``Runtime.default``)."""
    global _factory
    _factory = factory


def default_runtime() -> Any:
    """The process's shared runtime: installed plugins and one model pool."""
    if _factory is None:
        raise RuntimeError("no default runtime is installed; import cai_engine first")
    return _factory()
