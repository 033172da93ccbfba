"""The ``cai`` command line: a thin click layer over the library, one module per command or command group
(``cli/rl.py`` is ``cai rl``); every command calls one library function.

Errors caused by input (``CaiError``) print one line and exit non-zero; anything else keeps its traceback.
"""

from __future__ import annotations

from cai_engine.cli import (  # noqa: F401 - each module registers its command or group
    checks,
    classifiers,
    constitutions,
    eval,
    export,
    guard,
    merge,
    models,
    plugins,
    policy,
    rl,
    run,
    serve,
    sl,
    train,
)
from cai_engine.cli.base import cli

__all__ = ["cli", "main"]


def main() -> None:  # pragma: no cover - console entry point
    cli(prog_name="cai")
